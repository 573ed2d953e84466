"""Evaluation results on the host: one image's detections -> compact arrays -> result files.

``image_results`` turns the outputs of ``MatchRCNN.detect`` for one image into what the
protocol reads, in the original image's pixels: boxes, scores, categories, each soft mask
pasted into its box and run-length encoded (``masks.paste_masks_rle``: detectron2's pasting,
only the box region is ever built), and the landmarks of the detections that COCOeval's
keypoint evaluation can see (as the annotations' pixel indices: the model's continuous
coordinates less half a pixel, ``transforms.landmarks_to_pixel_indices``). It imports neither
jax nor TensorFlow, so it runs in worker threads or processes beside the accelerator.

What is kept, and why it loses nothing:
  * keypoints: COCOeval evaluates keypoints with ``maxDets = [20]``, applied per image and
    category after a stable sort by score (``computeOks`` and ``evaluateImg``), so only the 20
    best-scoring detections of each category in each image can count; the others are not
    stored. Of a kept detection only its category's landmarks are stored (DeepFashion2: at
    most 39 of the 294; the official format's other 255 slots are zeros).
  * categories: the spec's classes 1..C; the COCO entries (``Results.coco``) and the result
    files carry the dataset's own category ids (``DatasetSpec.original_ids``).
  * numbers: float32 (a thousandth of a pixel at 10,000 px), ``np.savez_compressed``.

``ResultWriter`` streams the per-image results to ``detections-NNNNN.npz`` chunks in the
evaluation directory as they come (the split never sits in memory as JSON); ``load`` reads
them back as one ``Results`` whose ``coco(kind)`` builds the COCO-format entries of one kind
at a time for COCOeval, and ``write_official_json`` writes the DeepFashion2 result files
(``bbox_results.json``, ``segm_results.json``, ``keypoints_results.json``: the challenge
format) on request::

  python -m df2_jax.evaluation.results --eval_dir WORKDIR/eval_STEP
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import logging
import os
import sys
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipeline.spec import DatasetSpec
from df2_jax import files, postprocess

log = logging.getLogger(__name__)

KEYPOINT_MAX_DETS = 20  # COCOeval's keypoint maxDets: per image and category
CHUNK_PREFIX = "detections-"
_ARRAYS = ("image_id", "boxes", "scores", "classes", "image_hw", "rle_offsets", "rle_bytes",
           "keypoint_rows", "keypoints")


def keypoint_keep(scores: np.ndarray, classes: np.ndarray, valid: np.ndarray,
                  max_dets: int = KEYPOINT_MAX_DETS) -> np.ndarray:
  """[D] bool: the valid detections among the ``max_dets`` best-scoring of their category in
  this image, ties broken by position (the stable order COCOeval uses)."""
  scores = np.asarray(scores)
  keep = np.zeros(len(scores), bool)
  for cat in np.unique(np.asarray(classes)[valid]):
    idx = np.nonzero(valid & (classes == cat))[0]
    order = idx[np.argsort(-scores[idx], kind="stable")]
    keep[order[:max_dets]] = True
  return keep


@dataclasses.dataclass
class ImageResults:
  """One image's valid detections in original-image pixels (n rows, k kept for keypoints).

  Attributes:
    image_id: the image's id.
    image_hw: (H, W) of the original image.
    boxes: [n, 4] float32 [x1, y1, x2, y2].
    scores: [n] float32.
    classes: [n] int16, the spec's classes 1..C.
    rles: n compressed COCO RLE ``counts`` (bytes) of the pasted masks (empty without masks).
    keypoint_rows: [k] int32 rows whose landmarks are kept (``keypoint_keep``).
    keypoints: [k, 39, 2] float32 (x, y) of each kept row's category landmarks, zero-padded,
      as pixel indices like the annotations (``transforms.landmarks_to_pixel_indices``).
  """
  image_id: int
  image_hw: tuple[int, int]
  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  rles: list[bytes]
  keypoint_rows: np.ndarray
  keypoints: np.ndarray


def image_results(image_id: int, boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray,
                  valid: np.ndarray, image_hw: Sequence[float], orig_hw: Sequence[float],
                  masks: np.ndarray | None = None, landmarks: np.ndarray | None = None, *,
                  spec: DatasetSpec) -> ImageResults:
  """The result rows of one image from ``detect``'s outputs (``from_detections`` of
  ``postprocess.image_detections`` with RLE masks).

  Args:
    image_id: the image's id.
    boxes: [D, 4] canvas boxes; scores [D]; classes [D] (1..C); valid [D] bool.
    image_hw: the content's (h, w) on the canvas; orig_hw: the original image's (H, W).
    masks: [D, S, S] soft masks in the box frame (probabilities), or None.
    landmarks: [D, L, 3] canvas (x, y, score), continuous coordinates (the model's, as
      trained on ``transforms.landmarks_to_continuous``), the category's slice filled, or None.
    spec: the run's dataset spec.
  """
  out = dict(boxes=boxes, scores=scores, classes=classes, valid=valid)
  if masks is not None:
    out["masks"] = masks
  if landmarks is not None:
    out["landmarks"] = landmarks
  return from_detections(image_id, postprocess.image_detections(
      out, image_hw, orig_hw, masks="rle" if masks is not None else None, spec=spec), spec)


def from_detections(image_id: int, detections: dict[str, Any], spec: DatasetSpec
                    ) -> ImageResults:
  """The result rows of one image's detections in its pixels (``postprocess.image_detections``
  with ``masks="rle"`` or None): the landmarks of ``keypoint_keep``'s rows only, as [n, K, 2]
  (K = ``spec.max_category_landmarks``)."""
  width = spec.max_category_landmarks
  n = len(detections["scores"])
  classes = np.asarray(detections["classes"]).astype(np.int16)
  rles = [r["counts"].encode() for r in detections.get("masks", [])] if n else []
  kp_rows = np.zeros((0,), np.int32)
  kps = np.zeros((0, width, 2), np.float32)
  if "landmarks" in detections and n:
    kp_rows = np.nonzero(keypoint_keep(detections["scores"], classes, np.ones(n, bool)))[0]
    kp_rows = kp_rows.astype(np.int32)
    kps = np.zeros((len(kp_rows), width, 2), np.float32)
    for i, row in enumerate(kp_rows):
      own = detections["landmarks"][row]
      kps[i, :len(own)] = own[:, :2]
  return ImageResults(int(image_id), tuple(detections["image_hw"]), detections["boxes"],
                      detections["scores"], classes, rles, kp_rows, kps)


class ResultWriter:
  """Streams ``ImageResults`` into ``detections-NNNNN.npz`` chunks of ``directory``.

  Chunks are written every ``images_per_chunk`` images and by ``close``. One writer
  (``shard=None``) removes the chunks of an earlier evaluation in the directory when it opens.
  In an evaluation split over processes each process writes its own shard's chunks,
  ``detections-SSSSS-NNNNN.npz`` (``shard`` = the process index, shards in file order), so that
  ``load`` reads the whole split in file order; the caller clears old chunks
  (``remove_chunks``) before any writer opens (``evaluator.evaluate`` writes into a fresh
  staging folder). Each chunk is written atomically (``files.save_npz``).
  """

  def __init__(self, directory: str, images_per_chunk: int = 1000, shard: int | None = None):
    self.directory = directory
    self.images_per_chunk = int(images_per_chunk)
    self._prefix = CHUNK_PREFIX if shard is None else f"{CHUNK_PREFIX}{int(shard):05d}-"
    os.makedirs(directory, exist_ok=True)
    if shard is None:
      remove_chunks(directory)
    self._pending: list[ImageResults] = []
    self.num_chunks = 0
    self.num_images = 0
    self.num_bytes = 0

  def add(self, result: ImageResults) -> None:
    self._pending.append(result)
    self.num_images += 1
    if len(self._pending) >= self.images_per_chunk:
      self._flush()

  def close(self) -> None:
    if self._pending or not self.num_chunks:
      self._flush()

  def _flush(self) -> None:
    pending, self._pending = self._pending, []
    counts = [len(r.scores) for r in pending]
    starts = np.cumsum([0] + counts)[:-1]
    rles = [b for r in pending for b in r.rles]
    lengths = np.array([len(b) for b in rles], np.int64)
    arrays = dict(
        image_id=np.repeat([r.image_id for r in pending], counts).astype(np.int64),
        boxes=_cat([r.boxes for r in pending], (0, 4), np.float32),
        scores=_cat([r.scores for r in pending], (0,), np.float32),
        classes=_cat([r.classes for r in pending], (0,), np.int16),
        image_hw=np.repeat(np.array([r.image_hw for r in pending], np.int32).reshape(-1, 2),
                           counts, axis=0),
        rle_offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        rle_bytes=np.frombuffer(b"".join(rles), np.uint8),
        keypoint_rows=_cat([r.keypoint_rows.astype(np.int64) + s
                            for r, s in zip(pending, starts)], (0,), np.int64),
        keypoints=_cat([r.keypoints for r in pending],
                       (0, pending[0].keypoints.shape[1] if pending else 0, 2), np.float32))
    path = os.path.join(self.directory, f"{self._prefix}{self.num_chunks:05d}.npz")
    files.save_npz(path, **arrays)  # whole or absent, never a torn chunk
    self.num_chunks += 1
    self.num_bytes += os.path.getsize(path)


def _cat(parts: list[np.ndarray], empty_shape: tuple[int, ...], dtype) -> np.ndarray:
  parts = [p for p in parts if len(p)]
  return np.concatenate(parts).astype(dtype) if parts else np.zeros(empty_shape, dtype)


@dataclasses.dataclass
class Results:
  """Every detection of an evaluation (the chunks concatenated; see ``ResultWriter``)."""
  image_id: np.ndarray
  boxes: np.ndarray
  scores: np.ndarray
  classes: np.ndarray
  image_hw: np.ndarray
  rle_offsets: np.ndarray
  rle_bytes: np.ndarray
  keypoint_rows: np.ndarray
  keypoints: np.ndarray

  def __len__(self) -> int:
    return len(self.scores)

  def coco(self, kind: str, spec: DatasetSpec) -> list[dict[str, Any]]:
    """The COCO-format result entries of one kind ("bbox", "segm" or "keypoints"), with the
    dataset's own category ids (``spec``).

    bbox: ``{image_id, category_id, bbox [x, y, w, h], score}``; segm: the same with
    ``segmentation`` (compressed RLE) instead of bbox; keypoints: ``keypoints`` (3 L numbers,
    DeepFashion2's 882: the category's landmarks as (x, y, 2), zeros elsewhere; a float32
    array, which COCOeval reads like a list) for the kept detections only.
    """
    ids = spec.original_ids
    base = lambda i: {"image_id": int(self.image_id[i]),
                      "category_id": int(ids[int(self.classes[i])])}
    if kind == "bbox":
      xywh = np.concatenate([self.boxes[:, :2], self.boxes[:, 2:] - self.boxes[:, :2]], 1)
      return [{**base(i), "bbox": xywh[i].tolist(), "score": float(self.scores[i])}
              for i in range(len(self))]
    if kind == "segm":
      if len(self.rle_offsets) - 1 != len(self):
        return []
      return [{**base(i), "segmentation": {"size": self.image_hw[i].tolist(),
                                           "counts": self.rle(i)},
               "score": float(self.scores[i])} for i in range(len(self))]
    if kind == "keypoints":
      return [{**base(i), "keypoints": self.official_keypoints(j, spec),
               "score": float(self.scores[i])} for j, i in enumerate(self.keypoint_rows)]
    raise ValueError(f"kind must be bbox, segm or keypoints, got {kind!r}")

  def rle(self, i: int) -> str:
    return self.rle_bytes[self.rle_offsets[i]:self.rle_offsets[i + 1]].tobytes().decode()

  def official_keypoints(self, j: int, spec: DatasetSpec) -> np.ndarray:
    """[3 L] float32: kept row j's landmarks as (x, y, 2) in its category's slots."""
    i = int(self.keypoint_rows[j])
    cat = int(self.classes[i])
    out = np.zeros((spec.num_landmarks, 3), np.float32)
    start, count = int(spec.landmark_start[cat]), int(spec.landmark_counts[cat])
    out[start:start + count, :2] = self.keypoints[j, :count]
    out[start:start + count, 2] = 2.0
    return out.reshape(-1)


def chunk_paths(directory: str) -> list[str]:
  """The result chunks of ``directory`` in the order they were written (shard by shard)."""
  return sorted(glob.glob(os.path.join(directory, f"{CHUNK_PREFIX}*.npz")))


def remove_chunks(directory: str) -> None:
  """Removes every result chunk of ``directory`` (an earlier evaluation's)."""
  for path in chunk_paths(directory):
    os.remove(path)


def load(directory: str) -> Results:
  """The results of ``directory``'s chunks, in the order they were written."""
  paths = chunk_paths(directory)
  if not paths:
    raise FileNotFoundError(f"no {CHUNK_PREFIX}*.npz result chunks in {directory}")
  parts: dict[str, list[np.ndarray]] = {k: [] for k in _ARRAYS}
  rows = 0
  rle_base = 0
  for path in paths:
    with np.load(path) as chunk:
      for k in _ARRAYS:
        value = chunk[k]
        if k == "keypoint_rows":
          value = value + rows
        elif k == "rle_offsets":
          value = (value if not parts[k] else value[1:]) + rle_base
        parts[k].append(value)
      rows += len(chunk["scores"])
      rle_base += len(chunk["rle_bytes"])
  # Chunks without kept landmarks may be [0, 0, 2] (an empty writer's).
  parts["keypoints"] = [v for v in parts["keypoints"] if len(v)] or parts["keypoints"][:1]
  return Results(**{k: np.concatenate(v) for k, v in parts.items()})


def iter_json_array(entries: Iterator[dict]) -> Iterator[str]:
  """A JSON array written piece by piece (numpy arrays as lists)."""
  yield "["
  for n, entry in enumerate(entries):
    entry = {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in entry.items()}
    yield ("," if n else "") + json.dumps(entry)
  yield "]"


def write_official_json(directory: str, spec: DatasetSpec) -> list[str]:
  """Writes bbox_results.json, segm_results.json and keypoints_results.json (the DeepFashion2
  result formats, with ``spec``'s category ids) into ``directory`` from its chunks; returns the
  paths. Each file is written atomically (``files.atomic_write``): an interrupted write leaves
  the previous file or none."""
  results = load(directory)
  paths = []
  for kind, name in (("bbox", "bbox"), ("segm", "segm"), ("keypoints", "keypoints")):
    path = os.path.join(directory, f"{name}_results.json")
    with files.atomic_write(path, "w") as f:
      for piece in iter_json_array(iter(results.coco(kind, spec))):
        f.write(piece)
    paths.append(path)
  return paths


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m df2_jax.evaluation.results",
      description="Write the DeepFashion2 result JSON files (bbox, segm, keypoints) of an "
                  "evaluation directory from its compact detections-*.npz chunks.")
  parser.add_argument("--eval_dir", required=True, help="an eval_<step>/ directory")
  parser.add_argument("--workdir", default="",
                      help="the run whose config.json holds the dataset spec (default: the "
                           "eval directory's parent)")
  args = parser.parse_args(argv)
  from df2_jax.config import run_config
  from data_pipeline import spec as spec_lib
  workdir = args.workdir or os.path.dirname(os.path.abspath(args.eval_dir))
  saved = run_config.read(workdir)
  if saved is None:
    print(f"error: no {run_config.FILE} in {workdir} (the run's dataset spec): give --workdir",
          file=sys.stderr)
    return 1
  try:
    spec = spec_lib.from_config(run_config.config_from_json(saved[run_config.CONFIG_KEY]))
    for path in write_official_json(args.eval_dir, spec):
      print(f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
  except FileNotFoundError as e:  # no result chunks in --eval_dir
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
