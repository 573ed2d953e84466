"""Evaluation of a trained model on a split: detections -> official metrics and result files.

``evaluate(config, variables, step, outdir)`` runs the jitted ``MatchRCNN.detect`` over the
evaluation split (single images in file order, the last batch padded), maps every detection
back to its original image (boxes, 28x28 masks pasted into the image at threshold 0.5,
landmarks), and writes into ``outdir``:
  bbox_results.json, segm_results.json, keypoints_results.json  (DeepFashion2 result formats)
  retrieval_submission.json                                      (official format, top 20)
  metrics.json                                                   (every number below)
and returns the metrics: COCO AP/AP50/AP75 for boxes, masks and landmarks (visible only, and
visible + occluded) with per-category tables, and retrieval top-1/5/10/15/20 with detected
boxes and with ground-truth boxes.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np

from data_pipeline import convert, transforms
from df2_jax.evaluation import coco, retrieval
from df2_jax.models import matching
from df2_jax.models.match_rcnn import MatchRCNN

log = logging.getLogger(__name__)
COCO_TYPES = ("bbox", "segm", "keypoints_visible", "keypoints")


def _to_original(boxes: np.ndarray, image_hw: np.ndarray, orig_hw: np.ndarray) -> np.ndarray:
  """Per-axis factors from the canvas content back to the original image."""
  sy, sx = orig_hw / np.maximum(image_hw, 1)
  return boxes * np.array([sx, sy, sx, sy], np.float32)


def run_detection(model: MatchRCNN, variables: Any, dataset, records_by_id: dict,
                  with_gt_embeddings: bool = True):
  """Detections and embeddings of every image of ``dataset`` (eval batches), on the host."""
  detect = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))
  embed = jax.jit(lambda v, x, b: model.apply(v, x, b, method=MatchRCNN.embed))
  bbox, segm, kps, query, gallery, gt_query, gt_gallery = [], [], [], [], [], [], []
  for batch in dataset.as_numpy_iterator():
    out = jax.device_get(detect(variables, batch["image"], batch["image_hw"]))
    gt_emb = (jax.device_get(embed(variables, batch["image"], batch["boxes"]))
              if with_gt_embeddings else None)
    for i in np.nonzero(batch["valid"])[0]:
      image_id = int(batch["image_id"][i])
      record = records_by_id[image_id]
      hw, orig = batch["image_hw"][i].astype(np.float32), batch["orig_hw"][i].astype(np.float32)
      keep = out["valid"][i]
      boxes = _to_original(out["boxes"][i], hw, orig)
      h, w = int(orig[0]), int(orig[1])
      masks = np.zeros((len(boxes), h, w), bool)
      for d in np.nonzero(keep)[0]:
        masks[d] = transforms.paste_mask((out["masks"][i, d] >= 0.5).astype(np.uint8),
                                         boxes[d], (h, w)).astype(bool)
      lms = out["landmarks"][i].copy()
      sy, sx = orig / np.maximum(hw, 1)
      lms[..., 0] *= sx
      lms[..., 1] *= sy
      b, s, k = coco.detections_to_results(image_id, boxes, out["scores"][i],
                                           out["classes"][i], keep, masks, lms)
      bbox += b
      segm += s
      kps += k
      dets = [dict(image_id=image_id, bbox=boxes[d].tolist(), cls=int(out["classes"][i, d]),
                   score=float(out["scores"][i, d]), embedding=out["embeddings"][i, d])
              for d in np.nonzero(keep)[0]]
      (query if record.source == "user" else gallery).extend(dets)
      if gt_emb is not None:
        gt_boxes = _to_original(batch["boxes"][i], hw, orig)
        gts = [dict(image_id=image_id, bbox=gt_boxes[m].tolist(),
                    cls=int(batch["classes"][i, m]), score=1.0, embedding=gt_emb[i, m])
               for m in np.nonzero(batch["instance_valid"][i])[0]]
        (gt_query if record.source == "user" else gt_gallery).extend(gts)
  return dict(bbox=bbox, segm=segm, keypoints=kps, query=query, gallery=gallery,
              gt_query=gt_query, gt_gallery=gt_gallery)


def evaluate(config, variables: Any, outdir: str, *, eval_source=None) -> dict[str, Any]:
  """Evaluates ``variables`` ({"params", "constants"}) on ``config.data.eval_split``."""
  from data_pipeline import pipeline, sources  # TensorFlow is loaded here only.
  from df2_jax.train import model_from_config
  if eval_source is None:
    eval_source = sources.source_from_config(config.data, config.data.eval_split)
  geometry = sources.geometry_from_config(config.data)
  model = model_from_config(config)
  dataset = pipeline.eval_dataset(eval_source, geometry, batch_size=config.eval.batch_size,
                                  process_index=0, process_count=1)
  records = {r.image_id: r for r in eval_source.records}
  found = run_detection(model, variables, dataset, records)

  gt = convert.to_coco(eval_source.records)
  metrics: dict[str, Any] = coco.evaluate_all(gt, found["bbox"], found["segm"],
                                              found["keypoints"])
  scorer = jax.device_get(variables["params"]["scorer"])
  score_fn = lambda q, g: np.asarray(matching.pairwise_logits(scorer, q, g))
  query_gt, gallery_gt = convert.retrieval_gt(eval_source.records)
  k = int(config.eval.retrieval_topk)
  submission = retrieval.build_submission(found["query"], found["gallery"], score_fn, k=k)
  metrics["retrieval"] = retrieval.evaluate_retrieval(submission, query_gt, gallery_gt)
  gt_submission = retrieval.build_submission(found["gt_query"], found["gt_gallery"], score_fn,
                                             k=k)
  metrics["retrieval_gt_boxes"] = retrieval.evaluate_retrieval(gt_submission, query_gt,
                                                               gallery_gt)

  os.makedirs(outdir, exist_ok=True)
  for name in ("bbox", "segm", "keypoints"):
    with open(os.path.join(outdir, f"{name}_results.json"), "w") as f:
      json.dump(found[name], f)
  with open(os.path.join(outdir, "retrieval_submission.json"), "w") as f:
    json.dump(submission, f)
  with open(os.path.join(outdir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, default=float)
  log.info("Evaluation (%d images) written to %s:\n%s\nretrieval (detected boxes): %s\n"
           "retrieval (GT boxes): %s", len(eval_source.records), outdir,
           coco.format_table({k: metrics[k] for k in COCO_TYPES if k in metrics}), _topk_line(metrics["retrieval"]),
           _topk_line(metrics["retrieval_gt_boxes"]))
  return metrics


def _topk_line(r: dict) -> str:
  return "  ".join(f"top-{k} {r[f'top{k}']:.3f}" for k in (1, 5, 10, 15, 20))
