r"""Input-pipeline throughput: training images per second out of the tf.data pipeline.

  python bench/pipeline.py --root data/synthetic/train --short_side 256 --max_size 256
  python bench/pipeline.py --coco ../shared/fixtures/deepfashion2_real/coco.json \
      --images ../shared/fixtures/deepfashion2_real/image --short_side 800 --max_size 1333

  # The 1x recipe's orientation buckets, one decoding call per core (--workers 0):
  python bench/pipeline.py --coco ../shared/fixtures/deepfashion2_real/coco.json \
      --images ../shared/fixtures/deepfashion2_real/image --buckets 800x1344,1344x800

Reads --warmup batches, then times --batches batches of --pairs image pairs (2 images each) and
prints images/s. The canvas is the smallest square multiple of 32 holding any orientation
(--canvas overrides, as HxW); --buckets adds smaller canvases (each batch on the smallest that
holds its images, as in training), and the canvases of the timed batches are counted.
"""

from __future__ import annotations

import collections
import logging
import time

from absl import app, flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "Raw split directory.")
flags.DEFINE_string("coco", None, "COCO-format JSON (with --images).")
flags.DEFINE_string("images", None, "Image folder of --coco.")
flags.DEFINE_integer("short_side", 800, "Resize: shorter side.")
flags.DEFINE_integer("max_size", 1333, "Resize: longer-side cap.")
flags.DEFINE_string("canvas", None, "Canvas HxW (default: square, fits any orientation).")
flags.DEFINE_integer("max_instances", 8, "M.")
flags.DEFINE_integer("mask_size", 112, "S.")
flags.DEFINE_integer("pairs", 8, "Image pairs per batch.")
flags.DEFINE_integer("warmup", 3, "Untimed batches.")
flags.DEFINE_integer("batches", 20, "Timed batches.")
flags.DEFINE_list("buckets", [], "Orientation bucket canvases HxW, e.g. 800x1344,1344x800.")
flags.DEFINE_integer("workers", 0, "Parallel decoding calls (0: the cores this process may use).")


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  from data_pipeline import pairs, pipeline, sources, transforms
  from data_pipeline.spec import DEEPFASHION2
  if FLAGS.root:
    source = sources.raw_source(FLAGS.root)
  else:
    source = sources.coco_source(FLAGS.coco, FLAGS.images, spec=DEEPFASHION2)
  if FLAGS.canvas:
    canvas = tuple(int(v) for v in FLAGS.canvas.split("x"))
  else:
    side = int(np.ceil(max(FLAGS.short_side, FLAGS.max_size) / 32) * 32)
    canvas = (side, side)
  buckets = tuple(tuple(int(v) for v in b.split("x")) for b in FLAGS.buckets)
  geometry = transforms.ImageGeometry(canvas, FLAGS.short_side, FLAGS.max_size,
                                      FLAGS.max_instances, FLAGS.mask_size, buckets,
                                      spec=DEEPFASHION2)
  ds = pipeline.train_dataset(source, pairs.build_pair_index(source.records), geometry,
                              global_batch_pairs=FLAGS.pairs, seed=0, process_index=0,
                              process_count=1, num_parallel_calls=FLAGS.workers)
  it = ds.as_numpy_iterator()
  for _ in range(FLAGS.warmup):
    next(it)
  shapes = collections.Counter()
  start = time.perf_counter()
  for _ in range(FLAGS.batches):
    shapes["x".join(map(str, next(it)["image"].shape[2:4]))] += 1
  elapsed = time.perf_counter() - start
  images = FLAGS.batches * FLAGS.pairs * 2
  workers = FLAGS.workers or pipeline.host_cores()
  print(f"{images / elapsed:.1f} images/s ({images} images in {elapsed:.2f} s, "
        f"{images / elapsed / workers:.1f} per decoding call, {workers} calls; canvases "
        f"{dict(shapes)}, short {FLAGS.short_side}, max {FLAGS.max_size}, masks "
        f"{FLAGS.mask_size}, {len(source.records)} source images)")


if __name__ == "__main__":
  app.run(main)
