"""Evaluation of a trained model on a split: detections -> official metrics and result files.

``evaluate(config, variables, step, outdir)`` runs the jitted ``MatchRCNN.detect`` over the
evaluation split (single images in file order, the last batch padded), maps every detection
back to its original image (boxes, 28x28 masks pasted into the image at threshold 0.5,
landmarks), and writes into ``outdir``:
  bbox_results.json, segm_results.json, keypoints_results.json  (DeepFashion2 result formats)
  retrieval_submission.json                                      (official format, top 20)
  metrics.json                                                   (every number below)
  detections.png, retrieval.png                                  (pictures; see ``evaluate``)
and returns the metrics: COCO AP/AP50/AP75 for boxes, masks and landmarks (visible only, and
visible + occluded) with per-category tables, and retrieval top-1/5/10/15/20 with detected
boxes and with ground-truth boxes. Every detection of a consumer image is a query; the gallery
is the detections of the shop images scoring at least ``config.eval.gallery_score_threshold``,
after a class-agnostic NMS per image (``config.eval.gallery_nms_threshold``; see
``retrieval.dedupe_gallery``).
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import os
from typing import Any

import cv2
import jax
import numpy as np

from data_pipeline import convert, draw, transforms
from df2_jax.evaluation import coco, retrieval, visualize
from df2_jax.models import matching
from df2_jax.models.match_rcnn import MatchRCNN, model_from_config

log = logging.getLogger(__name__)
COCO_TYPES = ("bbox", "segm", "keypoints_visible", "keypoints")


def _to_original(boxes: np.ndarray, image_hw: np.ndarray, orig_hw: np.ndarray) -> np.ndarray:
  """Per-axis factors from the canvas content back to the original image."""
  sy, sx = orig_hw / np.maximum(image_hw, 1)
  return boxes * np.array([sx, sy, sx, sy], np.float32)


@functools.lru_cache(maxsize=4)
def _jitted(model: MatchRCNN):
  """(detect, embed) jitted once per model (evaluations during training reuse them)."""
  detect = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))
  embed = jax.jit(lambda v, x, b: model.apply(v, x, b, method=MatchRCNN.embed))
  return detect, embed


def subset_indices(records, max_images: int, seed: int = 0) -> np.ndarray:
  """Record indices of the evaluation subset ``config.eval.max_images`` asks for.

  ``max_images <= 0`` (or at least the split's size): every record. Otherwise whole pair_ids,
  in an order drawn from ``seed`` (fixed, so every evaluation of every run sees the same
  images), until ``max_images`` images (the last pair_id may be cut); a consumer image and
  its shop images stay together, so retrieval keeps its ground truth. Returned in file order.
  """
  n = len(records)
  if max_images <= 0 or max_images >= n:
    return np.arange(n)
  groups: dict[int, list[int]] = collections.defaultdict(list)
  for i, record in enumerate(records):
    groups[int(record.pair_id)].append(i)
  keys = sorted(groups)
  chosen: list[int] = []
  for g in np.random.default_rng(seed).permutation(len(keys)):
    chosen.extend(groups[keys[g]][:max_images - len(chosen)])
    if len(chosen) >= max_images:
      break
  return np.sort(np.asarray(chosen, np.int64))


def run_detection(model: MatchRCNN, variables: Any, dataset, records_by_id: dict,
                  with_gt_embeddings: bool = True, keep_outputs: frozenset = frozenset(),
                  keep_min_score: float = 0.0):
  """Detections and embeddings of every image of ``dataset`` (eval batches), on the host.

  The outputs (original-image boxes, scores, classes, valid, pasted masks, landmarks) of the
  valid detections scoring at least ``keep_min_score`` in the images of ``keep_outputs``
  (image ids) are returned under "outputs", for drawing.
  """
  detect, embed = _jitted(model)
  bbox, segm, kps, query, gallery, gt_query, gt_gallery = [], [], [], [], [], [], []
  outputs = {}
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
      if image_id in keep_outputs:
        sel = np.nonzero(keep & (out["scores"][i] >= keep_min_score))[0]
        outputs[image_id] = dict(boxes=boxes[sel], scores=out["scores"][i][sel],
                                 classes=out["classes"][i][sel], valid=keep[sel],
                                 masks=masks[sel], landmarks=lms[sel])
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
              gt_query=gt_query, gt_gallery=gt_gallery, outputs=outputs)


def evaluate(config, variables: Any, outdir: str, *, eval_source=None, writer=None,
             step: int | None = None) -> dict[str, Any]:
  """Evaluates ``variables`` ({"params", "constants"}) on ``config.data.eval_split`` (or
  ``eval_source``), or on its fixed subset of ``config.eval.max_images`` images (see
  ``subset_indices``).

  Also draws the first ``config.eval.num_drawn_images`` images with their detections
  (``detections.png``) and, for the first ``config.eval.num_retrieval_strips`` consumer images,
  the top-5 shop items retrieved for their best detection (``retrieval.png``). With a
  ``writer`` (train.MetricsWriter) the metrics and both pictures also go to TensorBoard at
  ``step``.
  """
  from data_pipeline import pipeline, sources  # TensorFlow is loaded here only.
  if eval_source is None:
    eval_source = sources.source_from_config(config.data, config.data.eval_split)
  max_images = int(config.eval.max_images)
  if 0 < max_images < len(eval_source.records):
    eval_source = eval_source.subset(subset_indices(eval_source.records, max_images))
    log.info("Evaluating on a fixed subset: %s (config.eval.max_images).", eval_source.name)
  geometry = sources.geometry_from_config(config.data)
  model = model_from_config(config)
  dataset = pipeline.eval_dataset(eval_source, geometry, batch_size=config.eval.batch_size,
                                  process_index=0, process_count=1)
  records = {r.image_id: r for r in eval_source.records}
  drawn_ids = [r.image_id for r in eval_source.records[:int(config.eval.num_drawn_images)]]
  found = run_detection(model, variables, dataset, records, keep_outputs=frozenset(drawn_ids),
                        keep_min_score=float(config.eval.draw_score_threshold))

  gt = convert.to_coco(eval_source.records)
  metrics: dict[str, Any] = coco.evaluate_all(gt, found["bbox"], found["segm"],
                                              found["keypoints"])
  scorer = jax.device_get(variables["params"]["scorer"])
  score_fn = lambda q, g: np.asarray(matching.pairwise_logits(scorer, q, g))
  query_gt, gallery_gt = convert.retrieval_gt(eval_source.records)
  k = int(config.eval.retrieval_topk)
  gallery = retrieval.dedupe_gallery(found["gallery"],
                                     float(config.eval.gallery_nms_threshold),
                                     float(config.eval.gallery_score_threshold))
  submission = retrieval.build_submission(found["query"], gallery, score_fn, k=k)
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
  pictures = draw_pictures(eval_source, found["outputs"], drawn_ids, submission, query_gt,
                           gallery_gt, int(config.eval.num_retrieval_strips),
                           float(config.eval.draw_score_threshold))
  for name, picture in pictures.items():
    cv2.imwrite(os.path.join(outdir, f"{name}.png"), picture[:, :, ::-1])
  if writer is not None and step is not None:
    writer.scalars(step, summary_scalars(metrics))
    for name, picture in pictures.items():
      writer.image(step, f"eval/{name}", picture)
  log.info("Evaluation (%d images) written to %s (metrics.json, result files, %s):\n%s\n"
           "retrieval (detected boxes): %s\nretrieval (GT boxes): %s",
           len(eval_source.records), outdir, ", ".join(f"{n}.png" for n in pictures),
           coco.format_table({k: metrics[k] for k in COCO_TYPES if k in metrics}), _topk_line(metrics["retrieval"]),
           _topk_line(metrics["retrieval_gt_boxes"]))
  return metrics


def _topk_line(r: dict) -> str:
  return "  ".join(f"top-{k} {r[f'top{k}']:.3f}" for k in (1, 5, 10, 15, 20))


def metric_names() -> list[str]:
  """The names ``config.train.best_metric`` may take: the keys of ``summary_scalars`` without
  their "eval/" prefix (e.g. "bbox/AP", "keypoints/AP", "retrieval/top20")."""
  names = [f"{kind}/{key}" for kind in COCO_TYPES for key in ("AP", "AP50", "AP75")]
  return names + [f"{kind}/top{k}" for kind in ("retrieval", "retrieval_gt_boxes")
                  for k in (1, 5, 10, 15, 20)]


def summary_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The headline numbers as flat "eval/..." scalars (for TensorBoard and metrics.jsonl)."""
  out = {}
  for kind in COCO_TYPES:
    for key in ("AP", "AP50", "AP75"):
      if kind in metrics and key in metrics[kind]:
        out[f"eval/{kind}/{key}"] = float(metrics[kind][key])
  for kind in ("retrieval", "retrieval_gt_boxes"):
    for k in (1, 5, 10, 15, 20):
      if kind in metrics:
        out[f"eval/{kind}/top{k}"] = float(metrics[kind][f"top{k}"])
  return out


def _fitted(pixels: np.ndarray, out: dict, min_side: int = 320, max_side: int = 640):
  """An image and its detections rescaled for drawing: small images up by an integer factor
  (shorter side >= ``min_side``: boxes, labels and points are unreadable on 128 px), large ones
  down (longer side <= ``max_side``, so the picture grid stays small)."""
  h, w = pixels.shape[:2]
  f = float(max(1, -(-min_side // min(h, w))))
  if max(h, w) > max_side:
    f = max_side / max(h, w)
  if f == 1.0:
    return pixels, out
  size = (max(1, round(w * f)), max(1, round(h * f)))
  out = dict(out)
  pixels = cv2.resize(pixels, size, interpolation=cv2.INTER_LINEAR if f > 1 else cv2.INTER_AREA)
  out["boxes"] = out["boxes"] * f
  out["masks"] = np.stack([cv2.resize(m.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST)
                           for m in out["masks"]]).astype(bool) if len(out["masks"]) else (
                               np.zeros((0, size[1], size[0]), bool))
  out["landmarks"] = out["landmarks"] * np.array([f, f, 1], np.float32)
  return pixels, out


def draw_pictures(source, outputs: dict[int, dict], drawn_ids: list[int],
                  submission: list[dict], query_gt: list[dict], gallery_gt: list[dict],
                  num_strips: int, score_threshold: float = 0.3, k: int = 5
                  ) -> dict[str, np.ndarray]:
  """{"detections": grid of drawn images, "retrieval": strips} (each only when non-empty)."""
  index_of = {r.image_id: i for i, r in enumerate(source.records)}
  cache: dict[int, np.ndarray] = {}

  def pixels(image_id: int) -> np.ndarray:
    if image_id not in cache:
      cache[image_id] = source.load_image(index_of[image_id])
    return cache[image_id]

  pictures = {}
  drawn = []
  for i in drawn_ids:
    if i in outputs:
      scaled, out = _fitted(pixels(i), outputs[i])
      drawn.append(draw.draw_detections(scaled, **out, score_threshold=score_threshold))
  if drawn:
    pictures["detections"] = visualize.tile_grid(drawn)
  # The best-scoring detection of each of the first consumer images that has one.
  best: dict[int, dict] = {}
  for entry in submission:
    qid = int(entry["query_image_id"])
    if qid not in best or entry["query_score"] > best[qid]["query_score"]:
      best[qid] = entry
  strips = []
  for record in source.records:
    if len(strips) >= num_strips:
      break
    entry = best.get(record.image_id)
    if entry is None or not entry["gallery_image_id"]:
      continue
    hits, status = visualize.hits_of_entry(entry, query_gt, gallery_gt, k)
    gallery = {int(g): pixels(int(g)) for g in entry["gallery_image_id"][:k]}
    strips.append(visualize.retrieval_strip(pixels(record.image_id), entry, gallery, hits,
                                            status, k=k))
  if strips:
    pictures["retrieval"] = visualize.stack_rows(strips)
  return pictures
