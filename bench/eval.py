r"""Evaluation throughput: the whole evaluator against ``detect`` alone, and result bytes per image.

  # The issue's case: 96 synthetic 640 px images, 100 detections each, the untrained tiny model
  python bench/eval.py --image_size 640 --images 96 --detections 100 --batch 4

Builds the tiny config's model on a square canvas of ``--image_size``, initialised (untrained:
with ``score_threshold=0`` every image still yields ``--detections`` detections), generates a
synthetic validation split of ``--images`` images at that size (cached under ``--data_dir``),
then times, after a warm-up that compiles both programs:
  * ``detect`` alone: the jitted ``MatchRCNN.detect`` on the split's batches held in memory,
    outputs fetched to the host (``jax.device_get``);
  * the whole evaluation (``evaluator.evaluate``: input pipeline, detection, host
    post-processing, COCO AP, retrieval, pictures, files), from the call to its return;
and reports images/s of both, their ratio, and the bytes of the result files it wrote per image
(everything in the evaluation directory but the pictures and metrics.json).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # configs/

from absl import app, flags
import jax
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 640, "Synthetic image size and square canvas side (x32).")
flags.DEFINE_integer("images", 96, "Validation images (two per pair_id).")
flags.DEFINE_integer("detections", 100, "Detections per image (score threshold 0).")
flags.DEFINE_integer("batch", 4, "Evaluation batch size.")
flags.DEFINE_integer("repeats", 1, "Timed whole evaluations (the best is reported, and every "
                     "time).")
flags.DEFINE_integer("host_workers", 0, "config.eval.host_workers (0: cores - 1).")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "df2_bench_eval"),
                    "Where the synthetic split is generated (and cached).")


def _config():
  from configs import tiny
  config = tiny.get_config()
  size = FLAGS.image_size
  config.data.update(dict(synthetic_dir=FLAGS.data_dir, synthetic_train_pairs=1,
                          synthetic_val_pairs=FLAGS.images // 2, synthetic_image_size=size,
                          short_side=size, max_size=size, canvas=(size, size)))
  config.model.update(dict(score_threshold=0.0, detections_per_image=FLAGS.detections,
                           detection_candidates=max(FLAGS.detections * 4, 200)))
  config.eval.batch_size = FLAGS.batch
  config.eval.host_workers = FLAGS.host_workers
  return config


def main(argv):
  del argv
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from data_pipeline import pipeline, sources, transforms
  from df2_jax.evaluation import evaluator
  from df2_jax.models.match_rcnn import MatchRCNN, init_variables, model_from_config

  config = _config()
  source = sources.source_from_config(config.data, config.data.eval_split)
  geometry = transforms.geometry_from_config(config.data)
  model = model_from_config(config)
  variables = init_variables(model, jax.random.key(0), transforms.zero_train_batch(geometry, 1))
  variables = jax.device_put(variables)
  batches = list(pipeline.eval_dataset(source, geometry, batch_size=FLAGS.batch,
                                       process_index=0, process_count=1).as_numpy_iterator())
  detect = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))
  jax.device_get(detect(variables, batches[0]["image"], batches[0]["image_hw"]))
  started = time.perf_counter()
  for b in batches:
    out = jax.device_get(detect(variables, b["image"], b["image_hw"]))
  detect_s = time.perf_counter() - started
  n = len(source.records)
  per_image = int(np.mean(out["valid"].sum(-1)))

  outdir = tempfile.mkdtemp(prefix="df2_bench_eval_out_")
  try:
    evaluator.evaluate(config, variables, outdir, eval_source=source)  # warm-up
    times = []
    for _ in range(FLAGS.repeats):
      started = time.perf_counter()
      evaluator.evaluate(config, variables, outdir, eval_source=source)
      times.append(time.perf_counter() - started)
    best = min(times)
    skip = {"metrics.json", "detections.png", "retrieval.png"}
    result_bytes = sum(os.path.getsize(os.path.join(outdir, f)) for f in os.listdir(outdir)
                       if f not in skip)
  finally:
    shutil.rmtree(outdir, ignore_errors=True)
  print(f"{n} images at {FLAGS.image_size} px, {per_image} detections per image, batch "
        f"{FLAGS.batch}, {jax.devices()[0].platform}, jax {jax.__version__}")
  print(f"detect alone:      {n / detect_s:7.2f} images/s ({detect_s:.1f} s)")
  print(f"whole evaluation:  {n / best:7.2f} images/s ({best:.1f} s), "
        f"{100 * detect_s / best:.0f}% of detect alone; every repeat: "
        f"{', '.join(f'{t:.1f}' for t in times)} s")
  print(f"result files:      {result_bytes / n / 1e6:.3f} MB per image")


if __name__ == "__main__":
  app.run(main)
