"""Evaluation of a trained model on a split: detections -> official metrics and result files.

``evaluate(config, variables, outdir)`` runs the jitted ``MatchRCNN.detect`` over the
evaluation split (single images in file order, the last batch padded; ``config.eval.batch_size``
images on each device, every device of the run; with several processes each detects a
contiguous shard and process 0 scores them all) one batch ahead of the host, whose worker
processes (``workers_lib.process_image``) map every detection back to its original image (boxes, the
soft 28x28 masks pasted with detectron2's semantics and run-length encoded from the box region
only, landmarks); the rows stream to compact result chunks (``results``). It builds, in a
staging folder beside ``outdir`` that then replaces ``outdir`` whole (``files.swap_in``: a
failed or killed evaluation leaves the previous ``outdir`` as it was, and a metrics.json there
means a complete evaluation):
  detections-NNNNN.npz        the results (``python -m df2_jax.evaluation.results --eval_dir``
                              writes the DeepFashion2 JSON result files from them; several
                              processes write detections-SSSSS-NNNNN.npz, S the process)
  retrieval_submission.json   official format, top 20, for the queries (see below)
  metrics.json                every number below, the time of each stage, and what the
                              split's reader dropped as invalid ("dropped_ground_truth":
                              images, items, polygons, landmarks; see ``check_ground_truth``)
  detections.png, retrieval.png  pictures (see ``evaluate``)
and returns the metrics: COCO AP/AP50/AP75 for boxes, masks and landmarks (visible only, and
visible + occluded) with per-category tables, and retrieval top-1/5/10/15/20 with detected
boxes and with ground-truth boxes. The queries are the consumer-image detections the official
protocol picks for its GT items (``retrieval_protocol.protocol_queries``: the other detections
cannot change a number) and each consumer image's best detection (shown in the pictures); the gallery
is the detections of the shop images scoring at least ``config.eval.gallery_score_threshold``,
after a class-agnostic NMS per image (``config.eval.gallery_nms_threshold``; see
``retrieval_protocol.dedupe_gallery``).
"""

from __future__ import annotations

import collections
import logging
import os
import re
import shutil
import time
from typing import Any

import cv2
import jax
import numpy as np

from data_pipeline import convert, draw, transforms
from data_pipeline import spec as spec_lib
from df2_jax import files, inference, parallel, progress
from df2_jax.config import rules
from df2_jax.errors import Df2Error
from df2_jax.evaluation import coco, retrieval_protocol, summary, visualize
from df2_jax.evaluation import workers as workers_lib
from df2_jax.evaluation import results as results_lib
from df2_jax.models import matching

log = logging.getLogger(__name__)
# metrics.json: {"images", "items", "polygons", "landmarks"} the evaluation split's reader
# dropped as invalid (``data_pipeline.records.DropCounts``).
DROPPED_KEY = "dropped_ground_truth"
ALLOW_SKIPPED_FLAG = "--config.eval.allow_skipped=True"


class SkippedGroundTruth(Df2Error, RuntimeError):
  """The evaluation split's reader dropped images, items, polygons or landmarks as invalid,
  and ``config.eval.allow_skipped`` is False. The message is one line naming the split, what
  was dropped and the override (run.py exits with it, status 2)."""

  exit_code = 2


def check_ground_truth(config, source) -> None:
  """Refuses to evaluate on ``source`` when its reader dropped any ground truth: images,
  items, polygons or landmarks.

  A dropped image or item is missing from the ground truth: its clothes count for no metric
  (their detections even count as false positives where the image stayed), and a dropped
  query or gallery item leaves the retrieval denominator. A dropped polygon or landmark alters
  the ground truth AP_mask and AP_pt are scored against. Numbers computed so look comparable
  with the official ones and are not, so any dropped count takes
  ``config.eval.allow_skipped=True`` to accept (then evaluated, with a warning). Every
  evaluation's metrics.json records the counts either way.

  Raises:
    SkippedGroundTruth: one line naming the split, what was dropped (the non-zero counts,
      e.g. "3 polygons, 2 landmarks") and the override.
  """
  dropped = source.dropped
  if not dropped:
    return
  if not bool(config.eval.allow_skipped):
    named = ", ".join(f"{count} {kind}" for kind, count in dropped.as_dict().items() if count)
    raise SkippedGroundTruth(
        f"Refusing to evaluate on {source.name}: its reader dropped {named} as invalid (the "
        f"warnings of its scan name them), whose ground truth every metric and the retrieval "
        f"denominator would miss. Fix the data, or pass {ALLOW_SKIPPED_FLAG} to evaluate "
        f"without them.")
  log.warning("Evaluating on %s without the ground truth its reader dropped as invalid: %s "
              "(recorded in metrics.json as %r).", source.name, dropped, DROPPED_KEY)


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


def run_detection(detector: inference.Detector, dataset, records_by_id: dict, *,
                  writer: results_lib.ResultWriter, query_gt_by_image: dict | None = None,
                  gallery_nms: float = 0.5, gallery_min_score: float = 0.0,
                  with_gt_embeddings: bool = True, keep_outputs: frozenset = frozenset(),
                  keep_min_score: float = 0.0, num_images: int | None = None,
                  workers: int = 0, pool_kind: str = "process", log_every_s: float = 30.0
                  ) -> dict[str, Any]:
  """Detects every image of ``dataset`` (eval batches) and streams the results to ``writer``.

  ``detector`` (``inference.Detector``: the model's variables on every device of the run)
  detects each batch, split over its devices; in a run of several processes, ``dataset`` is
  this process's shard and every process must run this together (each detection step is one
  program over every device). The accelerators run one batch ahead of the host: while batch
  k+1 is detected, the images of batch k are post-processed by ``workers`` worker processes
  (``workers_lib.process_image``; see ``host_pool`` for ``pool_kind``), and their rows reach
  ``writer`` in file order. Only each image's valid detections travel to the workers.
  Progress with an ETA is logged every ``log_every_s`` seconds.

  Returns:
    {"query", "gallery", "gt_query", "gt_gallery": retrieval entries (see
     ``workers_lib.process_image``),
     "outputs": {image_id: drawn detections} for ``keep_outputs`` (scoring >= keep_min_score),
     "seconds": wall time, "images": number of images}.
  """
  found: dict[str, Any] = dict(query=[], gallery=[], gt_query=[], gt_gallery=[], outputs={})
  started = time.perf_counter()
  counter = progress.Progress(num_images or 0, "Evaluation", every_s=log_every_s)
  done = 0
  pool = workers_lib.host_pool(workers, pool_kind)
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
    out = detector.fetch(out)
    gt_emb = detector.fetch(gt_emb) if gt_emb is not None else None
    for i in np.nonzero(batch["valid"])[0]:
      image_id = int(batch["image_id"][i])
      source = records_by_id[image_id].source
      keep = out["valid"][i]
      per_image = {k: v[i][keep] for k, v in out.items()}  # valid rows only
      gt = ({k: batch[k][i] for k in ("boxes", "classes", "instance_valid")}
            if gt_emb is not None else None)
      futures.append((image_id, source, pool.submit(
          workers_lib.process_image, image_id, source, per_image,
          batch["image_hw"][i].astype(np.float32),
          batch["orig_hw"][i].astype(np.float32), gt,
          gt_emb[i] if gt_emb is not None else None,
          (query_gt_by_image or {}).get(image_id), gallery_nms, gallery_min_score,
          keep_min_score if image_id in keep_outputs else None, spec=detector.spec)))

  try:
    previous = None
    for batch in dataset.as_numpy_iterator():
      # dispatched: the first stage awaited (the heads need its count), the heads not
      out, gt_emb = detector.dispatch(batch, embed_boxes=with_gt_embeddings)
      if previous is not None:
        submit(*previous)
      previous = (batch, out, gt_emb)
      collect(block=False)
      if num_images:
        counter.update(done)
    if previous is not None:
      submit(*previous)
    collect(block=True)
  finally:
    pool.shutdown(wait=True, cancel_futures=True)
  found["seconds"] = time.perf_counter() - started
  found["images"] = done
  return found


def _query_gt_by_image(query_gt: list[dict]) -> dict[int, dict[str, np.ndarray]]:
  """The GT query items of each consumer image as arrays
  (``retrieval_protocol.protocol_queries``)."""
  by_image: dict[int, list[dict]] = collections.defaultdict(list)
  for q in query_gt:
    by_image[int(q["query_image_id"])].append(q)
  return {i: dict(bbox=np.array([q["bbox"] for q in qs], np.float64).reshape(-1, 4),
                  cls=np.array([int(q["cls"]) for q in qs], np.int64),
                  style=np.array([int(q["style"]) for q in qs], np.int64))
          for i, qs in by_image.items()}


def staging_path(outdir: str) -> str:
  """The folder an evaluation into ``outdir`` is built in: ``.<name>.partial.eval`` beside it.

  The name is fixed, so every process of a run (they share the workdir) derives the same path
  without talking, and it is one ``files.remove_stale_staging(outdir)`` removes: the staging
  folder a killed evaluation left is deleted by the next evaluation into ``outdir``.
  """
  outdir = os.path.abspath(outdir)
  return os.path.join(os.path.dirname(outdir), f".{os.path.basename(outdir)}.partial.eval")


def evaluate(config, variables: Any, outdir: str, *, eval_source=None, writer=None,
             step: int | None = None, checkpoint: str | None = None) -> dict[str, Any]:
  """Evaluates ``variables`` ({"params", "constants"}) on ``config.data.eval_split`` (or
  ``eval_source``), or on its fixed subset of ``config.eval.max_images`` images (see
  ``subset_indices``).

  Writes into ``outdir``: the results as compact ``detections-*.npz`` chunks
  (``results.write_official_json`` or ``python -m df2_jax.evaluation.results --eval_dir
  OUTDIR`` turns them into the DeepFashion2 JSON files), ``retrieval_submission.json`` (the
  official format, for the queries the protocol scores), ``metrics.json`` (with the time of
  each stage under "timing", what the split's reader dropped under "dropped_ground_truth",
  and ``checkpoint``, the checkpoint evaluated, e.g. "/abs/workdir/checkpoints/1200", under
  "checkpoint" when given), and two pictures: the first
  ``config.eval.num_drawn_images`` images with their detections (``detections.png``) and, for
  the first ``config.eval.num_retrieval_strips`` consumer images, the top-5 shop items
  retrieved for their best detection (``retrieval.png``). With a ``writer``
  (train.MetricsWriter) the metrics and both pictures also go to TensorBoard at ``step``.

  The whole folder is built in a staging folder beside it (``staging_path``), metrics.json
  last, and then replaces ``outdir`` whole (``files.swap_in``): an evaluation that fails or is
  killed leaves the previous ``outdir`` as it was (or none), and an ``outdir`` with a
  metrics.json is a complete evaluation, with no file of an earlier one (result JSON files
  written later by ``results`` included). The next evaluation into ``outdir`` deletes the
  staging folder a killed one left. With several processes, process 0 creates the staging
  folder, every process writes its result chunks there, and process 0 scores and swaps.

  Raises:
    SkippedGroundTruth: the split's reader dropped images, items, polygons or landmarks
      and ``config.eval.allow_skipped`` is False (``check_ground_truth``), before anything is
      written.
  """
  from data_pipeline import pipeline, sources  # TensorFlow is loaded here only.
  timing: dict[str, float] = {}
  started = time.perf_counter()
  index, count = jax.process_index(), jax.process_count()
  if eval_source is None:
    eval_source = sources.source_from_config(config.data, config.data.eval_split)
  check_ground_truth(config, eval_source)  # before anything is compiled or written
  max_images = int(config.eval.max_images)
  if 0 < max_images < len(eval_source.records):
    eval_source = eval_source.subset(subset_indices(eval_source.records, max_images))
    log.info("Evaluating on a fixed subset: %s (config.eval.max_images).", eval_source.name)
  geometry = transforms.geometry_from_config(config.data)
  detector = inference.Detector(config, variables)  # replicated on every device, checked
  variables = detector.variables
  # config.eval.batch_size images per device; each process reads its contiguous shard.
  dataset = pipeline.eval_dataset(
      eval_source, geometry, batch_size=detector.batch_size,
      process_index=index, process_count=count)
  shard_size = len(np.array_split(np.arange(len(eval_source.records)), count)[index])
  records = {r.image_id: r for r in eval_source.records}
  drawn_ids = [r.image_id for r in eval_source.records[:int(config.eval.num_drawn_images)]]
  query_gt, gallery_gt = convert.retrieval_gt(eval_source.records)
  timing["prepare"] = time.perf_counter() - started

  staging = staging_path(outdir)
  if index == 0:  # a killed evaluation's staging folder goes before anyone writes
    files.remove_stale_staging(outdir)
    os.makedirs(staging)
  parallel.barrier("evaluation_start")
  try:
    result_writer = results_lib.ResultWriter(staging, shard=index if count > 1 else None)
    found = run_detection(detector, dataset, records, writer=result_writer,
                          query_gt_by_image=_query_gt_by_image(query_gt),
                          gallery_nms=float(config.eval.gallery_nms_threshold),
                          gallery_min_score=float(config.eval.gallery_score_threshold),
                          keep_outputs=frozenset(drawn_ids),
                          keep_min_score=float(config.eval.draw_score_threshold),
                          num_images=shard_size,
                          workers=int(config.eval.host_workers),
                          pool_kind=str(config.eval.host_pool))
    result_writer.close()
    found["bytes"] = result_writer.num_bytes
    if count > 1:
      found = _gather_found(found, staging)
    if index == 0:  # process 0 scores and writes; the others wait and read its metrics
      metrics, pictures = _score(config, variables, eval_source, found, staging, outdir,
                                 drawn_ids, query_gt, gallery_gt, timing, started, checkpoint)
      files.swap_in(staging, outdir)
  except BaseException:
    if index == 0:
      shutil.rmtree(staging, ignore_errors=True)
    raise
  parallel.barrier("evaluation_scored", timeout_s=_SCORING_TIMEOUT_S)
  if index != 0:
    return files.read_json(os.path.join(outdir, "metrics.json"), "evaluation metrics")
  if writer is not None and step is not None:
    writer.scalars(step, summary.summary_scalars(metrics))
    for name, picture in pictures.items():
      writer.image(step, f"eval/{name}", picture)
  log.info("Evaluation (%d images%s) written to %s (metrics.json, result chunks, %s) in %.1f s "
           "(%s):\n%s\nretrieval (detected boxes): %s\nretrieval (GT boxes): %s",
           len(eval_source.records), f" of checkpoint {checkpoint}" if checkpoint else "",
           outdir, ", ".join(f"{n}.png" for n in pictures),
           timing["total"], ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()
                                      if k != "total"),
           coco.format_table({k: metrics[k] for k in summary.COCO_TYPES if k in metrics}),
           *(summary.topk_line(metrics[k]) if k in metrics else "none (no user/shop pairs)"
             for k in summary.RETRIEVAL_KINDS))
  return metrics


def eval_folder(workdir: str, step: int, checkpoint_dir: str | None = None) -> str:
  """Where an evaluation of ``step`` goes: ``workdir/eval_<step>`` for the workdir's own
  checkpoints, ``workdir/eval_<step>-<source>`` for any other folder (``best`` for
  WORKDIR/best, the run's folder name for RUN/checkpoints, else the folder's name), so that
  evaluating another checkpoint never replaces the workdir's own results."""
  if not checkpoint_dir:
    return os.path.join(workdir, f"eval_{step}")
  source = os.path.abspath(checkpoint_dir).rstrip(os.sep)
  root = os.path.abspath(workdir)
  if source == os.path.join(root, "checkpoints"):
    return os.path.join(workdir, f"eval_{step}")
  if source.startswith(root + os.sep):
    name = os.path.relpath(source, root)
  elif os.path.basename(source) == "checkpoints":
    name = os.path.basename(os.path.dirname(source))
  else:
    name = os.path.basename(source)
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "other"
  return os.path.join(workdir, f"eval_{step}-{name}")


def evaluate_checkpoint(config, workdir: str, *, checkpoint_dir: str | None = None,
                        step: int | None = None) -> dict[str, Any]:
  """``--mode eval``: evaluates a checkpoint's params (``inference.load_variables``, checked
  against ``config``) into ``eval_folder(workdir, step, checkpoint_dir)``, on every process of
  a multi-process run together (see ``evaluate``); its metrics.json records the checkpoint
  evaluated."""
  from data_pipeline import sources  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  rules.validate(config)
  variables, step = inference.load_variables(workdir, checkpoint_dir=checkpoint_dir, step=step,
                                             config=config)
  parallel.on_process_zero(lambda: sources.prepare(config.data), "synthetic_data",
                           timeout_s=4 * 3600)
  directory = os.path.abspath(checkpoint_dir or os.path.join(workdir, "checkpoints"))
  metrics = evaluate(config, variables, eval_folder(workdir, step, checkpoint_dir),
                     checkpoint=os.path.join(directory, str(step)))
  log.info("%s", summary.headline(metrics, step))
  return metrics


def _score(config, variables: Any, eval_source, found: dict[str, Any], staging: str,
           outdir: str, drawn_ids: list[int], query_gt: list, gallery_gt: list,
           timing: dict[str, float], started: float, checkpoint: str | None
           ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """``evaluate``'s scoring on process 0: the metrics of the result chunks in ``staging`` and
  of ``found`` (every process's, joined), the retrieval submission, the pictures, and
  metrics.json, written last, all into ``staging``. Returns (metrics, pictures)."""
  count = jax.process_count()
  timing["detection"] = found["seconds"]
  log.info("Detection and host post-processing: %d images in %.1f s (%.2f images/s%s); result "
           "files %.1f MB (%.3f MB per image).", found["images"], found["seconds"],
           found["images"] / max(found["seconds"], 1e-9),
           f" on {count} processes" if count > 1 else "", found["bytes"] / 1e6,
           found["bytes"] / 1e6 / max(found["images"], 1))

  stage = time.perf_counter()
  spec = spec_lib.from_config(config)
  gt = convert.to_coco(eval_source.records, spec)
  metrics: dict[str, Any] = coco_metrics(staging, gt, spec)
  timing["coco"] = time.perf_counter() - stage
  metrics["ground_truth"] = write_ground_truth(outdir, eval_source, gt, query_gt, gallery_gt)

  submission = None
  if spec.has_pairs:  # a set without user/shop pairs has no retrieval to score
    stage = time.perf_counter()
    scorer = jax.device_get(parallel.one_replica(variables["params"]["scorer"]))
    score_fn = lambda q, g: np.asarray(matching.pairwise_logits(scorer, q, g))
    k = int(config.eval.retrieval_topk)
    submission = retrieval_protocol.build_submission(found["query"], found["gallery"], score_fn,
                                                     k=k)
    metrics["retrieval"] = retrieval_protocol.evaluate_retrieval(submission, query_gt,
                                                                 gallery_gt)
    gt_submission = retrieval_protocol.build_submission(found["gt_query"], found["gt_gallery"],
                                                        score_fn, k=k)
    metrics["retrieval_gt_boxes"] = retrieval_protocol.evaluate_retrieval(
        gt_submission, query_gt, gallery_gt)
    files.write_json(os.path.join(staging, "retrieval_submission.json"), submission)
    timing["retrieval"] = time.perf_counter() - stage

  stage = time.perf_counter()
  pictures = draw_pictures(eval_source, found["outputs"], drawn_ids, submission, query_gt,
                           gallery_gt, int(config.eval.num_retrieval_strips),
                           float(config.eval.draw_score_threshold), names=spec.names)
  for name, picture in pictures.items():
    ok, png = cv2.imencode(".png", picture[:, :, ::-1])
    if not ok:
      raise OSError(f"could not encode {name}.png")
    files.write_bytes(os.path.join(staging, f"{name}.png"), png.tobytes())
  timing["pictures"] = time.perf_counter() - stage
  timing["total"] = time.perf_counter() - started
  metrics["timing"] = timing
  metrics[DROPPED_KEY] = eval_source.dropped.as_dict()
  if checkpoint is not None:
    metrics["checkpoint"] = str(checkpoint)
  # Last: a metrics.json in an evaluation folder means every other file is complete.
  files.write_json(os.path.join(staging, "metrics.json"), metrics, indent=1, default=float)
  return metrics, pictures


def write_ground_truth(outdir: str, source, gt: dict, query_gt: list, gallery_gt: list
                       ) -> dict[str, str]:
  """The ground truth an evaluation was scored against, as the files the scorer CLIs read:
  ``coco.json``, ``query_gt.json``, ``gallery_gt.json`` in ``ground_truth/<split>/`` beside
  ``outdir`` (written once per split and workdir; later evaluations reuse them). Returns their
  paths, which metrics.json records, so a scorer can be rerun on ``eval_<step>/``::

    python -m df2_jax.evaluation.coco --gt <coco.json> --results eval_<step>/bbox_results.json
  """
  name = re.sub(r"[^A-Za-z0-9._-]+", "_", f"{source.name}_{len(source.records)}").strip("_")
  folder = os.path.join(os.path.dirname(os.path.abspath(outdir)), "ground_truth", name[-150:])
  paths = {kind: os.path.join(folder, f"{kind}.json")
           for kind in ("coco", "query_gt", "gallery_gt")}
  os.makedirs(folder, exist_ok=True)
  for kind, obj in (("coco", gt), ("query_gt", query_gt), ("gallery_gt", gallery_gt)):
    if not os.path.exists(paths[kind]):  # written whole or not at all: an existing one is whole
      files.write_json(paths[kind], obj, separators=(",", ":"))
  return paths


# How long the other processes wait for process 0 to score an evaluation (COCO of the
# 32k-image validation split takes minutes; a process that dies fails the wait at once).
_SCORING_TIMEOUT_S = 4 * 3600


def _gather_found(found: dict[str, Any], directory: str) -> dict[str, Any]:
  """Several processes: what ``run_detection`` found on each process's shard (the retrieval
  entries and drawn detections, as numeric arrays: ``found_arrays``; its result chunks are
  already in ``directory``, the evaluation's staging folder), joined on process 0 in process
  order, which is file order, so every list is what one process would have built
  (``parallel.gather_on_process_zero``: numbers only, never a pickle). The other processes get
  their own ``found`` back."""
  parts = parallel.gather_on_process_zero(found_arrays(found), directory, "shard",
                                          timeout_s=_SCORING_TIMEOUT_S)
  if parts is None:
    return found
  joined: dict[str, Any] = dict(query=[], gallery=[], gt_query=[], gt_gallery=[], outputs={},
                                seconds=0.0, images=0, bytes=0)
  for arrays in parts:
    part = found_from_arrays(arrays)
    for key in _RETRIEVAL_KINDS:
      joined[key].extend(part[key])
    joined["outputs"].update(part["outputs"])
    joined["seconds"] = max(joined["seconds"], part["seconds"])
    joined["images"] += part["images"]
    joined["bytes"] += part["bytes"]
  return joined


_RETRIEVAL_KINDS = ("query", "gallery", "gt_query", "gt_gallery")
_ENTRY_KEYS = frozenset(("image_id", "bbox", "cls", "score", "embedding"))


def found_arrays(found: dict[str, Any]) -> dict[str, np.ndarray]:
  """``found`` (``run_detection``'s: retrieval entries, drawn detections, counts) as numeric
  arrays; ``found_from_arrays`` gives it back."""
  arrays: dict[str, np.ndarray] = dict(seconds=np.float64(found["seconds"]),
                                       images=np.int64(found["images"]),
                                       bytes=np.int64(found.get("bytes", 0)))
  for kind in _RETRIEVAL_KINDS:
    entries = found[kind]
    for e in entries:
      if set(e) != _ENTRY_KEYS:
        raise ValueError(f"a {kind} entry has keys {sorted(e)}, expected "
                         f"{sorted(_ENTRY_KEYS)}")
    arrays[f"{kind}.image_id"] = np.array([e["image_id"] for e in entries], np.int64)
    arrays[f"{kind}.bbox"] = np.array([e["bbox"] for e in entries], np.float64).reshape(-1, 4)
    arrays[f"{kind}.cls"] = np.array([e["cls"] for e in entries], np.int64)
    arrays[f"{kind}.score"] = np.array([e["score"] for e in entries], np.float64)
    arrays[f"{kind}.embedding"] = (np.stack([np.asarray(e["embedding"]) for e in entries])
                                   if entries else np.zeros((0, 0), np.float32))
  ids = list(found["outputs"])
  arrays["outputs.image_id"] = np.array(ids, np.int64)
  for n, image_id in enumerate(ids):
    for field, value in found["outputs"][image_id].items():
      arrays[f"outputs.{n}.{field}"] = np.asarray(value)
  return arrays  # parallel.gather_on_process_zero refuses any that is not numbers


def found_from_arrays(a: dict[str, np.ndarray]) -> dict[str, Any]:
  """What ``found_arrays`` made of a ``found``."""
  found: dict[str, Any] = dict(seconds=float(a["seconds"]), images=int(a["images"]),
                               bytes=int(a["bytes"]), outputs={})
  for kind in _RETRIEVAL_KINDS:
    ids, bbox, cls, score, emb = (a[f"{kind}.{k}"] for k in ("image_id", "bbox", "cls",
                                                              "score", "embedding"))
    if not len(ids) == len(bbox) == len(cls) == len(score) == len(emb):
      raise ValueError(f"the {kind} arrays differ in length")
    found[kind] = [dict(image_id=int(ids[i]), bbox=bbox[i].tolist(), cls=int(cls[i]),
                        score=float(score[i]), embedding=emb[i]) for i in range(len(ids))]
  for n, image_id in enumerate(a["outputs.image_id"].tolist()):
    prefix = f"outputs.{n}."
    found["outputs"][int(image_id)] = {k[len(prefix):]: v for k, v in a.items()
                                       if k.startswith(prefix)}
  return found


def coco_metrics(directory: str, gt: dict, spec, backend: str = coco.DEFAULT_BACKEND
                 ) -> dict[str, dict]:
  """``coco.evaluate_all``'s metrics of the result chunks in ``directory`` against ``gt``, in
  the taxonomy ``spec`` (its ids and OKS sigmas; no segm without masks, no keypoints without
  landmarks).

  The COCO-format entries are built one kind at a time and dropped after their evaluation, so
  the split's box, mask and landmark entries never sit in memory together (at 100 detections
  per image the landmark entries alone are a few GB for the validation split).
  """
  results = results_lib.load(directory)
  metrics: dict[str, dict] = {}
  kinds = [("bbox", "bbox_results")] + [("segm", "segm_results")] * spec.has_masks + [
      ("keypoints", "keypoint_results")] * spec.has_landmarks
  for kind, arg in kinds:
    metrics.update(coco.evaluate_all(gt, **{arg: results.coco(kind, spec)}, backend=backend,
                                     sigmas=spec.oks_sigmas))
  return metrics


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
                  submission: list[dict] | None, query_gt: list[dict], gallery_gt: list[dict],
                  num_strips: int, score_threshold: float = 0.3, k: int = 5, *,
                  names: dict[int, str]) -> dict[str, np.ndarray]:
  """{"detections": grid of drawn images, "retrieval": strips} (each only when non-empty);
  ``names``: the classes' names (``DatasetSpec.names``)."""
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
      drawn.append(draw.draw_detections(scaled, **out, score_threshold=score_threshold,
                                        names=names))
  if drawn:
    pictures["detections"] = visualize.tile_grid(drawn)
  # The best-scoring detection of each of the first consumer images that has one.
  best: dict[int, dict] = {}
  for entry in submission or []:
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
                                            status, k=k, names=names))
  if strips:
    pictures["retrieval"] = visualize.stack_rows(strips)
  return pictures
