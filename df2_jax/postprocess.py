"""One image's detections in its own pixels: the host-side post-processing of ``detect``.

``image_detections(out, image_hw, orig_hw, masks=...)`` turns one image's outputs of
``MatchRCNN.detect`` (canvas coordinates; the image's content is ``image_hw`` of the canvas)
into its valid detections in the original (H, W) = ``orig_hw`` image: boxes scaled per axis
(``transforms.original_scale``), each soft mask pasted into its box as detectron2 pastes it
(``masks``; a bitmap or COCO RLEs), each detection's own category's landmarks
scaled the same way and given as the annotations' pixel indices
(``transforms.landmarks_to_pixel_indices``), and the embeddings. The evaluation (in its worker
processes), ``--mode predict``, the ``Predictor`` and the retrieval tool all post-process
through it, so their numbers agree to the bit. numpy and pycocotools only: no jax, no
TensorFlow.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from data_pipeline import transforms
from data_pipeline.spec import DatasetSpec
from df2_jax import masks as mask_lib

MASK_FORMATS = ("bitmap", "rle", None)


def scale_boxes(boxes: np.ndarray, image_hw: Sequence[float], orig_hw: Sequence[float]
                ) -> np.ndarray:
  """[n, 4] boxes on the canvas content -> the original image's pixels (float32)."""
  return np.asarray(boxes, np.float32) * np.tile(transforms.original_scale(image_hw, orig_hw), 2)


def own_landmarks(landmarks: np.ndarray, classes: np.ndarray, scale: np.ndarray,
                  spec: DatasetSpec) -> list[np.ndarray]:
  """Each detection's own category's landmarks: [n, L, 3] canvas (x, y, score), continuous
  coordinates -> n float32 arrays [K_c, 3] (K_c the category's count) of x, y as the original
  image's pixel indices (scaled by ``scale`` = [sx, sy], then less half a pixel) and the
  score."""
  classes = np.asarray(classes, np.int64)
  if not spec.has_landmarks:
    return [np.zeros((0, 3), np.float32) for _ in classes]
  own = np.take_along_axis(np.asarray(landmarks, np.float32),
                           spec.category_channels[classes][..., None], axis=1)  # [n, K, 3]
  own[..., :2] = transforms.landmarks_to_pixel_indices(own[..., :2] * scale)
  return [own[d, :spec.landmark_counts[int(c)]] for d, c in enumerate(classes)]


def image_detections(out: Mapping[str, np.ndarray], image_hw: Sequence[float],
                     orig_hw: Sequence[float], masks: str | None = "bitmap", *,
                     spec: DatasetSpec) -> dict[str, Any]:
  """One image's valid detections (``out["valid"]``, in ``detect``'s order) in its pixels.

  Args:
    out: one image's ``MatchRCNN.detect`` outputs (``boxes``, ``scores``, ``classes``,
      ``valid``; ``masks``, ``landmarks`` and ``embeddings`` where present).
    image_hw: the content's (h, w) on the canvas; orig_hw: the original image's (H, W).
    masks: "bitmap" ([N, H, W] bool), "rle" (N COCO RLEs ``{"size": [H, W], "counts": str}``)
      or None (no masks).
    spec: the run's dataset spec (names, ids and landmark layout).

  Returns:
    ``boxes`` [N, 4] float32 (x1, y1, x2, y2), ``scores`` [N] float32, ``classes`` [N] int32
    (the spec's classes 1..C), ``category_ids`` [N] int64 (the dataset's own ids),
    ``names`` (the categories' names), ``landmarks`` (N arrays [K, 3]: x, y as pixel indices,
    score; ``own_landmarks``), ``embeddings`` [N, D] float32, ``image_hw`` (H, W), and
    ``masks`` in the format asked (absent with None). Keys of ``out`` that are absent give no
    entry (landmarks, embeddings) or no masks.
  """
  if masks not in MASK_FORMATS:
    raise ValueError(f"masks must be one of {MASK_FORMATS}, got {masks!r}")
  h, w = int(orig_hw[0]), int(orig_hw[1])
  scale = transforms.original_scale(image_hw, orig_hw)  # [sx, sy]
  rows = np.nonzero(np.asarray(out["valid"], bool))[0]
  boxes = np.asarray(out["boxes"], np.float32)[rows] * np.tile(scale, 2)
  classes = np.asarray(out["classes"])[rows].astype(np.int32)
  result = {"boxes": boxes, "scores": np.asarray(out["scores"], np.float32)[rows],
            "classes": classes, "category_ids": spec.original_ids[classes],
            "names": [spec.class_name(int(c)) for c in classes],
            "image_hw": (h, w)}
  if "landmarks" in out:
    result["landmarks"] = own_landmarks(np.asarray(out["landmarks"])[rows], classes, scale,
                                        spec)
  if "embeddings" in out:
    result["embeddings"] = np.asarray(out["embeddings"], np.float32)[rows]
  if masks is not None and "masks" in out:
    soft = np.asarray(out["masks"], np.float32)[rows]
    if masks == "rle":
      result["masks"] = mask_lib.paste_masks_rle(soft, boxes, (h, w))
    else:
      bitmaps = np.zeros((len(rows), h, w), bool)
      for d in range(len(rows)):  # detectron2's pasting, the box's region only
        region, (top, left) = mask_lib.paste_mask_region(soft[d], boxes[d], (h, w))
        bitmaps[d, top:top + region.shape[0], left:left + region.shape[1]] = region
      result["masks"] = bitmaps
  return result
