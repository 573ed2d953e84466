"""One image's host work in evaluation: no jax, no TensorFlow, so it runs in worker processes.

``process_image`` turns one image's outputs of ``MatchRCNN.detect`` into its result rows
(``results.image_results``: boxes, detectron2-pasted mask RLEs, the kept landmarks), its
retrieval entries and, for a drawn image, its detections with full masks. The evaluator runs it
in a pool of worker processes beside the accelerator (``evaluator.host_pool``): the work is
mostly many small numpy and pycocotools calls per detection, which hold the GIL, so threads do
not scale (measured on 2 cores, 100 detections per 800x600 image: 40 images/s serial, 40 on
one thread, 32 on two threads, 36 in one process, 72 in two processes).
"""

from __future__ import annotations

import dataclasses

import numpy as np
from pycocotools import mask as mask_util

from data_pipeline.transforms import original_scale
from df2_jax.evaluation import results as results_lib
from df2_jax.evaluation import retrieval


def to_original(boxes: np.ndarray, image_hw: np.ndarray, orig_hw: np.ndarray) -> np.ndarray:
  """Boxes on the canvas content scaled back to the original image (per-axis factors)."""
  return np.asarray(boxes, np.float32) * np.tile(original_scale(image_hw, orig_hw), 2)


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
                  gallery_min_score: float, draw_min_score: float | None) -> ImageOutput:
  """One image's host work, run in a worker process: result rows (``results.image_results``:
  boxes, pasted mask RLEs, kept landmarks), its retrieval entries and, for a drawn image, its
  detections with full masks.

  Retrieval entries: of a consumer image only the detections the official protocol can pick
  as queries (``retrieval.protocol_queries`` against ``query_gt``, the image's GT query items)
  and its best-scoring detection (for the pictures);
  of a shop image the gallery (score >= ``gallery_min_score``, then the class-agnostic NMS of
  ``retrieval.dedupe_gallery``). Both are exactly what the protocol scores, and they keep the
  query x gallery matrix small at the scale of the validation split.
  """
  res = results_lib.image_results(image_id, out["boxes"], out["scores"], out["classes"],
                                  out["valid"], hw, orig, out["masks"], out["landmarks"])
  rows = np.nonzero(out["valid"])[0]
  emb = out["embeddings"][rows]
  entry = lambda j: dict(image_id=image_id, bbox=res.boxes[j].tolist(), cls=int(res.classes[j]),
                         score=float(res.scores[j]), embedding=emb[j])
  if source == "user":
    chosen = np.zeros((0,), np.int64)
    if query_gt is not None and len(rows):
      chosen = retrieval.protocol_queries(res.boxes, res.classes, res.scores, query_gt["bbox"],
                                          query_gt["cls"], query_gt["style"])
    # Plus the image's best detection, whose ranked shop items the pictures show (any
    # superset of the protocol's picks scores the same).
    best = [int(np.argmax(res.scores))] if len(rows) else []
    entries = [entry(int(j)) for j in np.unique(np.concatenate([chosen[chosen >= 0], best]))]
  else:
    entries = retrieval.dedupe_gallery([entry(j) for j in range(len(rows))], gallery_nms,
                                       gallery_min_score)
  gt_entries = []
  if gt is not None:
    gt_boxes = to_original(gt["boxes"], hw, orig)
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
