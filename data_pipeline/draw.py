"""Drawing instances, encoded images and training batches (for show, predict and TensorBoard)."""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np

from data_pipeline import transforms

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)], np.uint8)


def draw_instances(image: np.ndarray, boxes: np.ndarray, classes: np.ndarray, *,
                   masks: np.ndarray | None = None, landmarks: np.ndarray | None = None,
                   labels: list[str] | None = None) -> np.ndarray:
  """Draws instances onto a copy of an RGB image.

  Args:
    image: [H, W, 3] uint8.
    boxes: [N, 4] (x1, y1, x2, y2) in the image's pixels.
    classes: [N] the spec's classes 1..C (colours).
    masks: optional [N, H, W] bool, blended in.
    landmarks: optional [N, L, 3] (x, y, v) in continuous coordinates like the boxes (the
      training arrays' and the model's, ``transforms.landmarks_to_continuous``); each is drawn
      on the pixel that holds it, floor(x), floor(y) (an annotated pixel index x sits at
      x + 0.5); v > 0 is drawn, filled for v >= 2 (visible, or a predicted point), hollow for
      v = 1 (occluded).
    labels: optional text per instance (default: the class number).
  """
  img = image.copy()
  for k in range(len(boxes)):
    color = _PALETTE[int(classes[k]) % len(_PALETTE)]
    c = tuple(int(v) for v in color)
    if masks is not None:
      m = masks[k].astype(bool)
      img[m] = (0.5 * img[m] + 0.5 * color).astype(np.uint8)
    x1, y1, x2, y2 = np.round(boxes[k]).astype(int)
    cv2.rectangle(img, (x1, y1), (x2, y2), c, 2)
    label = labels[k] if labels is not None else str(int(classes[k]))
    for thickness, col in ((2, (255, 255, 255)), (1, c)):
      cv2.putText(img, label, (x1 + 2, max(y1 + 12, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, col,
                  thickness, cv2.LINE_AA)
    if landmarks is not None:
      for x, y, v in landmarks[k]:
        if v > 0:
          cv2.circle(img, (int(np.floor(x)), int(np.floor(y))), 3, c, -1 if v >= 2 else 1,
                     cv2.LINE_AA)
  return img


def draw_image(ex: dict[str, np.ndarray], names: Mapping[int, str]) -> np.ndarray:
  """Draws one encoded image (``transforms.image_spec`` arrays) onto a copy of its canvas,
  each item labelled with its category's name (``names``: ``DatasetSpec.names``)."""
  h, w = ex["image"].shape[:2]
  idx = np.nonzero(ex["instance_valid"])[0]
  masks = np.stack([transforms.paste_mask(ex["masks"][k], ex["boxes"][k], (h, w))
                    for k in idx]) if len(idx) else None
  labels = [f"{names.get(int(ex['classes'][k]), '?')} s{int(ex['style'][k])}" for k in idx]
  img = draw_instances(ex["image"], ex["boxes"][idx], ex["classes"][idx], masks=masks,
                       landmarks=ex["landmarks"][idx], labels=labels)
  ch, cw = (int(v) for v in ex["image_hw"])
  cv2.rectangle(img, (0, 0), (cw - 1, ch - 1), (255, 255, 255), 1)
  flip = " flipped" if ex["flipped"] else ""
  cv2.putText(img, f"id {int(ex['image_id'])}{flip}", (4, ch - 6), cv2.FONT_HERSHEY_SIMPLEX,
              0.45, (255, 255, 255), 1, cv2.LINE_AA)
  return img


def draw_batch(batch: dict[str, np.ndarray], names: Mapping[int, str],
               max_rows: int | None = None) -> np.ndarray:
  """[P, 2, ...] training batch -> one RGB image, a row per element, pair lines across."""
  rows = []
  num = batch["image"].shape[0] if max_rows is None else min(max_rows, batch["image"].shape[0])
  for p in range(num):
    halves = [draw_image({k: v[p, j] for k, v in batch.items() if v.ndim >= 2}, names)
              for j in range(2)]
    # Crop the shared canvas padding: each row as tall as its taller image, each half as wide
    # as its image's content.
    hw = batch["image_hw"][p]
    halves = [img[:int(hw[:, 0].max()), :int(hw[j, 1]) + 4] for j, img in enumerate(halves)]
    w = halves[0].shape[1]
    row = np.concatenate(halves, axis=1)
    if batch["match_valid"][p]:
      ex = [{k: batch[k][p, j] for k in ("boxes", "style", "pair_id", "instance_valid")}
            for j in range(2)]
      for a in np.nonzero(ex[0]["instance_valid"])[0]:
        for b in np.nonzero(ex[1]["instance_valid"])[0]:
          if (ex[0]["style"][a] > 0 and ex[0]["style"][a] == ex[1]["style"][b]
              and ex[0]["pair_id"][a] == ex[1]["pair_id"][b]):
            ca = ex[0]["boxes"][a].reshape(2, 2).mean(0)
            cb = ex[1]["boxes"][b].reshape(2, 2).mean(0) + (w, 0)
            cv2.line(row, tuple(int(v) for v in ca), tuple(int(v) for v in cb), (255, 255, 0),
                     2, cv2.LINE_AA)
    else:
      cv2.putText(row, "singles: no matching targets", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                  (255, 255, 0), 1, cv2.LINE_AA)
    rows.append(row)
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
  return np.concatenate(rows, axis=0)


def draw_detections(pixels: np.ndarray, boxes: np.ndarray, scores: np.ndarray,
                    classes: np.ndarray, valid: np.ndarray, masks: np.ndarray,
                    landmarks: np.ndarray, score_threshold: float = 0.3, *,
                    names: Mapping[int, str]) -> np.ndarray:
  """Draws a model's detections (valid and scoring >= score_threshold) onto an RGB image.

  Args:
    pixels: [H, W, 3] uint8.
    boxes: [D, 4] in the image's pixels; scores [D]; classes [D]; valid [D] bool.
    masks: [D, H, W] bool, pasted into the image.
    landmarks: [D, L, 3] (x, y, score), continuous coordinates (not the exported pixel
      indices); points with a nonzero entry (the category's slice) are drawn filled.
    names: the classes' names (``DatasetSpec.names``).
  """
  shown = np.nonzero(valid & (scores >= score_threshold))[0]
  points = landmarks[shown].copy()
  points[..., 2] = np.where(points[..., 2] != 0, 2, 0)
  labels = [f"{names.get(int(classes[d]), '?')} {scores[d]:.2f}" for d in shown]
  return draw_instances(pixels, boxes[shown], classes[shown], masks=masks[shown],
                        landmarks=points, labels=labels)
