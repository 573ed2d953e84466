r"""Evaluation's host side at the validation split's scale, without a model: post-processing,
result files and COCO AP for many images.

  # 2,000 images of 800x600, 100 detections each, 1.6 garments per image (DeepFashion2's
  # validation split has 52,490 items in 32,153 images)
  python bench/eval_results.py --images 2000 --detections 100

Generates, in memory and from ``--seed``, the ground truth of ``--images`` images (each item a
32-vertex ellipse polygon of a random category with its landmarks) and ``detect``-like outputs
for them: per image ``--detections`` detections, a few jittered copies of each item (its
category, scores 0.5-1, landmarks near the truth) and random boxes of random categories for
the rest (scores below 0.5), every one with a smooth soft 28x28 mask and its category's
landmarks. Then it times what ``evaluator.evaluate`` does with them, stage by stage:
  * host post-processing (``results.image_results``: detectron2 mask pasting, region RLE, the
    kept landmarks) in this process, then in the evaluator's pool (``--workers`` processes by
    default; the arguments pickled to them, as in the evaluation);
  * streaming the rows to result chunks (``results.ResultWriter``) and their bytes per image;
  * COCO AP of every type from the chunks (``evaluator.coco_metrics``: boxes, masks, landmarks
    visible and visible + occluded, on ``--backend``);
and reports the peak resident memory of the process. Neither TensorFlow nor an accelerator is
used, so it runs as it is on the GPU machine.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("images", 2000, "Images.")
flags.DEFINE_integer("detections", 100, "Detections per image.")
flags.DEFINE_integer("height", 600, "Image height.")
flags.DEFINE_integer("width", 800, "Image width.")
flags.DEFINE_float("items_per_image", 1.63, "Mean garments per image (1 to 3).")
flags.DEFINE_integer("workers", 0, "Host workers for the second timing (0: cores - 1).")
flags.DEFINE_enum("pool", "process", ["process", "thread"], "config.eval.host_pool.")
flags.DEFINE_string("backend", "faster", "COCO backend: faster or pycocotools.")
flags.DEFINE_integer("seed", 0, "Random seed.")


def _peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _ellipse(box: np.ndarray, n: int = 32) -> np.ndarray:
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  rx, ry = (box[2] - box[0]) / 2, (box[3] - box[1]) / 2
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1).astype(np.float32)


def _soft_mask(size: int = 28) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size]
  r2 = ((x + 0.5) / size * 2 - 1) ** 2 + ((y + 0.5) / size * 2 - 1) ** 2
  return (1 / (1 + np.exp(-8 * (1 - r2)))).astype(np.float32)


def make_split(rng: np.random.Generator, num_images: int, num_dets: int, hw: tuple[int, int],
               items_per_image: float):
  """(records, per-image detect-like outputs) of a generated split (see the module doc)."""
  from data_pipeline import deepfashion2 as df2
  from data_pipeline.records import ImageRecord, Item
  h, w = hw
  mask = _soft_mask()
  records, outputs = [], []
  p3 = max(0.0, min(1.0, (items_per_image - 1) / 2))
  for image_id in range(1, num_images + 1):
    n_items = 1 + rng.binomial(2, p3)
    items = []
    boxes = np.zeros((num_dets, 4), np.float32)
    classes = rng.integers(1, 14, num_dets).astype(np.int32)
    scores = rng.uniform(0.0, 0.5, num_dets).astype(np.float32)
    landmarks = np.zeros((num_dets, df2.NUM_LANDMARKS, 3), np.float32)
    size = rng.uniform([60, 60], [w * 0.6, h * 0.6], (num_dets, 2))
    corner = rng.uniform(0, 1, (num_dets, 2)) * ([w, h] - size)
    boxes[:] = np.concatenate([corner, corner + size], 1)
    d = 0
    for _ in range(n_items):
      cat = int(rng.integers(1, 14))
      bw, bh = rng.uniform(150, w * 0.8), rng.uniform(150, h * 0.8)
      x0, y0 = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
      box = np.array([x0, y0, x0 + bw, y0 + bh], np.float32)
      count = df2.LANDMARK_COUNTS[cat]
      pts = np.concatenate([rng.uniform(box[:2], box[2:], (count, 2)),
                            rng.integers(1, 3, (count, 1))], 1).astype(np.float32)
      items.append(Item(category_id=cat, style=1, box=box, landmarks=pts,
                        polygons=(_ellipse(box),)))
      start = df2.LANDMARK_START[cat]
      for _ in range(min(5, num_dets - d)):  # jittered copies of the item
        boxes[d] = box + rng.normal(0, 0.05, 4) * [bw, bh, bw, bh]
        classes[d], scores[d] = cat, rng.uniform(0.5, 1.0)
        landmarks[d, start:start + count, :2] = pts[:, :2] + rng.normal(0, 3, (count, 2))
        landmarks[d, start:start + count, 2] = rng.uniform(0, 1, count)
        d += 1
    for k in range(d, num_dets):  # random detections: landmarks anywhere in their box
      cat, start = int(classes[k]), df2.LANDMARK_START[int(classes[k])]
      count = df2.LANDMARK_COUNTS[cat]
      landmarks[k, start:start + count, :2] = rng.uniform(boxes[k, :2], boxes[k, 2:],
                                                          (count, 2))
    boxes = np.clip(boxes, 0, [w, h, w, h]).astype(np.float32)
    records.append(ImageRecord(image_id=image_id, image_path="", width=w, height=h,
                               source="user", pair_id=image_id, items=tuple(items)))
    outputs.append(dict(boxes=boxes, scores=scores, classes=classes,
                        valid=np.ones(num_dets, bool),
                        masks=np.broadcast_to(mask, (num_dets,) + mask.shape), landmarks=landmarks))
  return records, outputs


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  from data_pipeline import convert
  from data_pipeline.spec import DEEPFASHION2
  from df2_jax.evaluation import evaluator
  from df2_jax.evaluation import results as results_lib
  from df2_jax.evaluation import workers as workers_lib

  hw = (FLAGS.height, FLAGS.width)
  started = time.perf_counter()
  records, outputs = make_split(np.random.default_rng(FLAGS.seed), FLAGS.images,
                                FLAGS.detections, hw, FLAGS.items_per_image)
  print(f"generated {FLAGS.images} images ({sum(len(r.items) for r in records)} items) in "
        f"{time.perf_counter() - started:.1f} s; peak RSS {_peak_rss_gb():.2f} GB")

  def args(i: int):
    o = outputs[i]
    return (records[i].image_id, o["boxes"], o["scores"], o["classes"], o["valid"], hw, hw,
            o["masks"], o["landmarks"])

  n1 = min(200, FLAGS.images)
  started = time.perf_counter()
  for i in range(n1):
    results_lib.image_results(*args(i), spec=DEEPFASHION2)
  one = (time.perf_counter() - started) / n1
  workers = workers_lib.host_workers(FLAGS.workers)
  outdir = tempfile.mkdtemp(prefix="df2_bench_eval_results_")
  try:
    writer = results_lib.ResultWriter(outdir)
    started = time.perf_counter()
    with workers_lib.host_pool(workers, FLAGS.pool) as pool:
      futures = [pool.submit(results_lib.image_results, *args(i)) for i in range(FLAGS.images)]
      for future in futures:
        writer.add(future.result())
    writer.close()
    many = time.perf_counter() - started
    print(f"host post-processing, {FLAGS.detections} detections per {hw[1]}x{hw[0]} image: "
          f"{1e3 * one:.1f} ms per image in this process ({n1} images); {workers} "
          f"{FLAGS.pool} workers with the result writer: {FLAGS.images / many:.1f} images/s "
          f"({many:.1f} s for {FLAGS.images})")
    print(f"result files: {writer.num_bytes / 1e6:.1f} MB, "
          f"{writer.num_bytes / 1e6 / FLAGS.images:.4f} MB per image")
    del outputs[:]
    gt = convert.to_coco(records, DEEPFASHION2)
    rss = _peak_rss_gb()
    started = time.perf_counter()
    metrics = evaluator.coco_metrics(outdir, gt, DEEPFASHION2, backend=FLAGS.backend)
    coco_s = time.perf_counter() - started
  finally:
    shutil.rmtree(outdir, ignore_errors=True)
  aps = ", ".join(f"{k} {v['AP']:.3f}" for k, v in metrics.items())
  print(f"COCO AP of every type [{FLAGS.backend}]: {coco_s:.1f} s "
        f"({1e3 * coco_s / FLAGS.images:.2f} ms per image); AP: {aps}")
  print(f"peak RSS: {rss:.2f} GB before COCO, {_peak_rss_gb():.2f} GB after")


if __name__ == "__main__":
  app.run(main)
