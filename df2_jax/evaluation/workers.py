"""The evaluation's host work per image, in worker processes: no jax, no TensorFlow.

``process_image`` turns one image's outputs of ``MatchRCNN.detect`` into its result rows
(``postprocess`` then ``results.from_detections``: boxes, detectron2-pasted mask RLEs, the kept
landmarks), its retrieval entries and, for a drawn image, its detections with full masks. The
evaluator runs it in a pool of worker processes beside the accelerator (``host_pool``): the
work is mostly many small numpy and pycocotools calls per detection, which hold the GIL, so
threads do not scale and processes do (docs/PERFORMANCE.md, "Evaluation", has the figures).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os

import numpy as np
from pycocotools import mask as mask_util

from data_pipeline.transforms import original_scale
from df2_jax import postprocess
from df2_jax.evaluation import results as results_lib
from df2_jax.evaluation import retrieval_protocol


@dataclasses.dataclass
class ImageOutput:
  """What the host work of one image returns (``process_image``)."""
  results: results_lib.ImageResults
  retrieval: list[dict]  # query (consumer) or gallery (shop) entries with embeddings
  gt_retrieval: list[dict]  # the same for the ground-truth boxes
  drawn: dict | None  # the drawn detections, for the pictures


def process_image(image_id: int, source: str, out: dict[str, np.ndarray], hw: np.ndarray,
                  orig: np.ndarray, gt: dict[str, np.ndarray] | None, gt_emb: np.ndarray | None,
                  query_gt: dict[str, np.ndarray] | None, gallery_nms: float,
                  gallery_min_score: float, draw_min_score: float | None, *,
                  spec) -> ImageOutput:
  """One image's host work, run in a worker process: its detections in its pixels
  (``postprocess.image_detections``, RLE masks), as result rows (``results.from_detections``:
  boxes, mask RLEs, the kept landmarks), its retrieval entries and, for a drawn image, its
  detections with full masks.

  Retrieval entries: of a consumer image only the detections the official protocol can pick
  as queries (``retrieval_protocol.protocol_queries`` against ``query_gt``, the image's GT query
  items) and its best-scoring detection (for the pictures); of a shop image the gallery (score
  >= ``gallery_min_score``, then the class-agnostic NMS of ``retrieval_protocol.dedupe_gallery``).
  Both are exactly what the protocol scores, and they keep the query x gallery matrix small at
  the scale of the validation split.
  """
  detections = postprocess.image_detections(out, hw, orig, masks="rle", spec=spec)
  res = results_lib.from_detections(image_id, detections, spec)
  rows = np.nonzero(out["valid"])[0]
  emb = detections["embeddings"]
  entry = lambda j: dict(image_id=image_id, bbox=res.boxes[j].tolist(), cls=int(res.classes[j]),
                         score=float(res.scores[j]), embedding=emb[j])
  if source == "user":
    chosen = np.zeros((0,), np.int64)
    if query_gt is not None and len(rows):
      chosen = retrieval_protocol.protocol_queries(res.boxes, res.classes, res.scores,
                                                   query_gt["bbox"], query_gt["cls"],
                                                   query_gt["style"])
    # Plus the image's best detection, whose ranked shop items the pictures show (any
    # superset of the protocol's picks scores the same).
    best = [int(np.argmax(res.scores))] if len(rows) else []
    entries = [entry(int(j)) for j in np.unique(np.concatenate([chosen[chosen >= 0], best]))]
  else:
    entries = retrieval_protocol.dedupe_gallery([entry(j) for j in range(len(rows))],
                                                gallery_nms, gallery_min_score)
  gt_entries = []
  if gt is not None:
    gt_boxes = postprocess.scale_boxes(gt["boxes"], hw, orig)
    gt_entries = [dict(image_id=image_id, bbox=gt_boxes[m].tolist(), cls=int(gt["classes"][m]),
                       score=1.0, embedding=gt_emb[m])
                  for m in np.nonzero(gt["instance_valid"])[0]]
  drawn = None
  if draw_min_score is not None:
    sel = np.nonzero(res.scores >= draw_min_score)[0]
    h, w = res.image_hw
    full = (np.stack([mask_util.decode({"size": [h, w], "counts": res.rles[j]}) for j in sel])
            .astype(bool) if len(sel) and res.rles else np.zeros((len(sel), h, w), bool))
    lms = out["landmarks"][rows[sel]].copy()
    lms[..., :2] *= original_scale(hw, orig)
    drawn = dict(boxes=res.boxes[sel], scores=res.scores[sel], classes=res.classes[sel],
                 valid=np.ones(len(sel), bool), masks=full, landmarks=lms)
  return ImageOutput(res, entries, gt_entries, drawn)


def host_workers(requested: int = 0) -> int:
  """Worker processes for the host work: ``requested``, or by default every core but one (the
  main process feeds the accelerator and runs the input pipeline), at least 1."""
  return int(requested) if requested > 0 else max(1, (os.cpu_count() or 2) - 1)


HOST_POOLS = ("process", "thread")  # config.eval.host_pool


def host_pool(workers: int = 0, kind: str = "process") -> concurrent.futures.Executor:
  """The pool running ``process_image`` (``config.eval.host_workers``, ``host_pool``).

  "process": worker processes started with "spawn" (a fork of a process running XLA's threads
  can deadlock); they import only this module (numpy, pycocotools), once per evaluation.
  "thread": threads of this process, which the GIL serialises (see the module docstring); for
  debugging, or when processes cannot be started.
  """
  n = host_workers(workers)
  if kind == "process":
    return concurrent.futures.ProcessPoolExecutor(
        n, mp_context=multiprocessing.get_context("spawn"))
  if kind == "thread":
    return concurrent.futures.ThreadPoolExecutor(n)
  raise ValueError(f"config.eval.host_pool must be {' or '.join(map(repr, HOST_POOLS))}, got "
                   f"{kind!r}")
