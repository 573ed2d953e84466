"""Evaluation of a trained model on a split: detections -> official metrics and result files.

``evaluate(config, variables, outdir)`` runs the jitted ``MatchRCNN.detect`` over the
evaluation split (single images in file order, the last batch padded) one batch ahead of the
host, whose worker threads map every detection back to its original image (boxes, the soft
28x28 masks pasted with detectron2's semantics and run-length encoded from the box region only,
landmarks) and stream the rows to compact result chunks (``results``). It writes into
``outdir``:
  detections-NNNNN.npz        the results (``python -m df2_jax.evaluation.results --eval_dir``
                              writes the DeepFashion2 JSON result files from them)
  retrieval_submission.json   official format, top 20, for the queries (see below)
  metrics.json                every number below, and the time of each stage
  detections.png, retrieval.png  pictures (see ``evaluate``)
and returns the metrics: COCO AP/AP50/AP75 for boxes, masks and landmarks (visible only, and
visible + occluded) with per-category tables, and retrieval top-1/5/10/15/20 with detected
boxes and with ground-truth boxes. The queries are the consumer-image detections the official
protocol picks for its GT items (``retrieval.protocol_queries``: the other detections cannot
change a number) and each consumer image's best detection (shown in the pictures); the gallery
is the detections of the shop images scoring at least ``config.eval.gallery_score_threshold``,
after a class-agnostic NMS per image (``config.eval.gallery_nms_threshold``; see
``retrieval.dedupe_gallery``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import logging
import os
import time
from typing import Any

import cv2
import jax
import numpy as np
from pycocotools import mask as mask_util

from data_pipeline import convert, draw
from df2_jax.evaluation import coco, retrieval, visualize
from df2_jax.evaluation import results as results_lib
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


@dataclasses.dataclass
class _ImageOutput:
  """What the host work of one image returns (``_host_image``)."""
  results: results_lib.ImageResults
  retrieval: list[dict]  # query (consumer) or gallery (shop) entries with embeddings
  gt_retrieval: list[dict]  # the same for the ground-truth boxes
  drawn: dict | None  # the drawn detections, for the pictures


def _host_image(image_id: int, source: str, out: dict[str, np.ndarray], hw: np.ndarray,
                orig: np.ndarray, gt: dict[str, np.ndarray] | None, gt_emb: np.ndarray | None,
                query_gt: dict[str, np.ndarray] | None, gallery_nms: float,
                gallery_min_score: float, draw_min_score: float | None) -> _ImageOutput:
  """One image's host work, run in a worker thread: result rows (``results.image_results``:
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
    gt_boxes = _to_original(gt["boxes"], hw, orig)
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
    sy, sx = orig / np.maximum(hw, 1)
    lms[..., 0] *= sx
    lms[..., 1] *= sy
    drawn = dict(boxes=res.boxes[sel], scores=res.scores[sel], classes=res.classes[sel],
                 valid=np.ones(len(sel), bool), masks=full, landmarks=lms)
  return _ImageOutput(res, entries, gt_entries, drawn)


def host_workers(requested: int = 0) -> int:
  """Threads for the host work: ``requested``, or by default every core but one for the
  accelerator's feeding thread (at least 1). The work is numpy, OpenCV and pycocotools, which
  release the GIL in their heavy parts."""
  return int(requested) if requested > 0 else max(1, (os.cpu_count() or 2) - 1)


def run_detection(model: MatchRCNN, variables: Any, dataset, records_by_id: dict, *,
                  writer: results_lib.ResultWriter, query_gt_by_image: dict | None = None,
                  gallery_nms: float = 0.5, gallery_min_score: float = 0.0,
                  with_gt_embeddings: bool = True, keep_outputs: frozenset = frozenset(),
                  keep_min_score: float = 0.0, num_images: int | None = None,
                  workers: int = 0, log_every_s: float = 30.0) -> dict[str, Any]:
  """Detects every image of ``dataset`` (eval batches) and streams the results to ``writer``.

  The accelerator runs one batch ahead of the host: while batch k+1 is detected, the images of
  batch k are post-processed by ``workers`` threads (``_host_image``), and their rows reach
  ``writer`` in file order. Progress with an ETA is logged every ``log_every_s`` seconds.

  Returns:
    {"query", "gallery", "gt_query", "gt_gallery": retrieval entries (see ``_host_image``),
     "outputs": {image_id: drawn detections} for ``keep_outputs`` (scoring >= keep_min_score),
     "seconds": wall time, "images": number of images}.
  """
  detect, embed = _jitted(model)
  found: dict[str, Any] = dict(query=[], gallery=[], gt_query=[], gt_gallery=[], outputs={})
  started = last_log = time.perf_counter()
  done = 0
  pool = concurrent.futures.ThreadPoolExecutor(host_workers(workers))
  futures: collections.deque = collections.deque()

  def collect(block: bool) -> None:
    nonlocal done
    while futures and (block or futures[0][2].done()):
      image_id, source, future = futures.popleft()
      result = future.result()
      writer.add(result.results)
      kind = "query" if source == "user" else "gallery"
      found[kind].extend(result.retrieval)
      found[f"gt_{kind}"].extend(result.gt_retrieval)
      if result.drawn is not None:
        found["outputs"][image_id] = result.drawn
      done += 1

  def submit(batch, out, gt_emb) -> None:
    out = jax.device_get(out)
    gt_emb = jax.device_get(gt_emb) if gt_emb is not None else None
    for i in np.nonzero(batch["valid"])[0]:
      image_id = int(batch["image_id"][i])
      source = records_by_id[image_id].source
      per_image = {k: v[i] for k, v in out.items()}
      gt = ({k: batch[k][i] for k in ("boxes", "classes", "instance_valid")}
            if gt_emb is not None else None)
      futures.append((image_id, source, pool.submit(
          _host_image, image_id, source, per_image, batch["image_hw"][i].astype(np.float32),
          batch["orig_hw"][i].astype(np.float32), gt,
          gt_emb[i] if gt_emb is not None else None,
          (query_gt_by_image or {}).get(image_id), gallery_nms, gallery_min_score,
          keep_min_score if image_id in keep_outputs else None)))

  try:
    previous = None
    for batch in dataset.as_numpy_iterator():
      out = detect(variables, batch["image"], batch["image_hw"])  # dispatched, not awaited
      gt_emb = embed(variables, batch["image"], batch["boxes"]) if with_gt_embeddings else None
      if previous is not None:
        submit(*previous)
      previous = (batch, out, gt_emb)
      collect(block=False)
      now = time.perf_counter()
      if num_images and now - last_log >= log_every_s:
        rate = done / max(now - started, 1e-9)
        log.info("Evaluation: %d/%d images, %.1f images/s, eta %s", done, num_images, rate,
                 _fmt_time((num_images - done) / max(rate, 1e-9)))
        last_log = now
    if previous is not None:
      submit(*previous)
    collect(block=True)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  found["seconds"] = time.perf_counter() - started
  found["images"] = done
  return found


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _query_gt_by_image(query_gt: list[dict]) -> dict[int, dict[str, np.ndarray]]:
  """The GT query items of each consumer image as arrays (``retrieval.protocol_queries``)."""
  by_image: dict[int, list[dict]] = collections.defaultdict(list)
  for q in query_gt:
    by_image[int(q["query_image_id"])].append(q)
  return {i: dict(bbox=np.array([q["bbox"] for q in qs], np.float64).reshape(-1, 4),
                  cls=np.array([int(q["cls"]) for q in qs], np.int64),
                  style=np.array([int(q["style"]) for q in qs], np.int64))
          for i, qs in by_image.items()}


def evaluate(config, variables: Any, outdir: str, *, eval_source=None, writer=None,
             step: int | None = None) -> dict[str, Any]:
  """Evaluates ``variables`` ({"params", "constants"}) on ``config.data.eval_split`` (or
  ``eval_source``), or on its fixed subset of ``config.eval.max_images`` images (see
  ``subset_indices``).

  Writes into ``outdir``: the results as compact ``detections-*.npz`` chunks
  (``results.write_official_json`` or ``python -m df2_jax.evaluation.results --eval_dir
  OUTDIR`` turns them into the DeepFashion2 JSON files), ``retrieval_submission.json`` (the
  official format, for the queries the protocol scores), ``metrics.json`` (with the time of
  each stage under "timing"), and two pictures: the first ``config.eval.num_drawn_images``
  images with their detections (``detections.png``) and, for the first
  ``config.eval.num_retrieval_strips`` consumer images, the top-5 shop items retrieved for their
  best detection (``retrieval.png``). With a ``writer`` (train.MetricsWriter) the metrics and
  both pictures also go to TensorBoard at ``step``.
  """
  from data_pipeline import pipeline, sources  # TensorFlow is loaded here only.
  timing: dict[str, float] = {}
  started = time.perf_counter()
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
  query_gt, gallery_gt = convert.retrieval_gt(eval_source.records)
  timing["prepare"] = time.perf_counter() - started

  os.makedirs(outdir, exist_ok=True)
  result_writer = results_lib.ResultWriter(outdir)
  found = run_detection(model, variables, dataset, records, writer=result_writer,
                        query_gt_by_image=_query_gt_by_image(query_gt),
                        gallery_nms=float(config.eval.gallery_nms_threshold),
                        gallery_min_score=float(config.eval.gallery_score_threshold),
                        keep_outputs=frozenset(drawn_ids),
                        keep_min_score=float(config.eval.draw_score_threshold),
                        num_images=len(eval_source.records),
                        workers=int(config.eval.host_workers))
  result_writer.close()
  timing["detection"] = found["seconds"]
  log.info("Detection and host post-processing: %d images in %.1f s (%.2f images/s); result "
           "files %.1f MB (%.3f MB per image).", found["images"], found["seconds"],
           found["images"] / max(found["seconds"], 1e-9), result_writer.num_bytes / 1e6,
           result_writer.num_bytes / 1e6 / max(found["images"], 1))

  stage = time.perf_counter()
  results = results_lib.load(outdir)
  gt = convert.to_coco(eval_source.records)
  metrics: dict[str, Any] = coco.evaluate_all(gt, results.coco("bbox"), results.coco("segm"),
                                              results.coco("keypoints"))
  del results
  timing["coco"] = time.perf_counter() - stage

  stage = time.perf_counter()
  scorer = jax.device_get(variables["params"]["scorer"])
  score_fn = lambda q, g: np.asarray(matching.pairwise_logits(scorer, q, g))
  k = int(config.eval.retrieval_topk)
  submission = retrieval.build_submission(found["query"], found["gallery"], score_fn, k=k)
  metrics["retrieval"] = retrieval.evaluate_retrieval(submission, query_gt, gallery_gt)
  gt_submission = retrieval.build_submission(found["gt_query"], found["gt_gallery"], score_fn,
                                             k=k)
  metrics["retrieval_gt_boxes"] = retrieval.evaluate_retrieval(gt_submission, query_gt,
                                                               gallery_gt)
  with open(os.path.join(outdir, "retrieval_submission.json"), "w") as f:
    json.dump(submission, f)
  timing["retrieval"] = time.perf_counter() - stage

  stage = time.perf_counter()
  pictures = draw_pictures(eval_source, found["outputs"], drawn_ids, submission, query_gt,
                           gallery_gt, int(config.eval.num_retrieval_strips),
                           float(config.eval.draw_score_threshold))
  for name, picture in pictures.items():
    cv2.imwrite(os.path.join(outdir, f"{name}.png"), picture[:, :, ::-1])
  timing["pictures"] = time.perf_counter() - stage
  timing["total"] = time.perf_counter() - started
  metrics["timing"] = timing
  with open(os.path.join(outdir, "metrics.json"), "w") as f:
    json.dump(metrics, f, indent=1, default=float)
  if writer is not None and step is not None:
    writer.scalars(step, summary_scalars(metrics))
    for name, picture in pictures.items():
      writer.image(step, f"eval/{name}", picture)
  log.info("Evaluation (%d images) written to %s (metrics.json, result chunks, %s) in %.1f s "
           "(%s):\n%s\nretrieval (detected boxes): %s\nretrieval (GT boxes): %s",
           len(eval_source.records), outdir, ", ".join(f"{n}.png" for n in pictures),
           timing["total"], ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()
                                      if k != "total"),
           coco.format_table({k: metrics[k] for k in COCO_TYPES if k in metrics}),
           _topk_line(metrics["retrieval"]), _topk_line(metrics["retrieval_gt_boxes"]))
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
