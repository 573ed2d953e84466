r"""Synthetic-data generator throughput on one worker (one process, one core).

  python bench/synthetic.py --image_size 256 --pairs 200

Times (1) rendering alone (image + annotation in memory) and (2) the whole generator writing
JPEG + JSON files (``synthetic.generate`` with one worker) into a temporary directory, and
prints images/s for each.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_integer("image_size", 256, "Longer image side, pixels.")
flags.DEFINE_integer("pairs", 200, "Pair ids to generate (2 images each).")
flags.DEFINE_integer("seed", 0, "Seed.")


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  os.environ.setdefault("OMP_NUM_THREADS", "1")
  import cv2
  cv2.setNumThreads(1)
  from data_pipeline import synthetic
  n = 2 * FLAGS.pairs
  synthetic.render_example(FLAGS.seed, 0, 0, FLAGS.image_size)  # Warm-up.
  start = time.perf_counter()
  for i in range(n):
    synthetic.render_example(FLAGS.seed, 0, i, FLAGS.image_size)
  render = n / (time.perf_counter() - start)
  with tempfile.TemporaryDirectory() as out:
    start = time.perf_counter()
    synthetic.generate(out, FLAGS.pairs, 0, FLAGS.image_size, FLAGS.seed, workers=1)
    full = n / (time.perf_counter() - start)
  print(f"render only: {render:.1f} images/s")
  print(f"render + JPEG + JSON files: {full:.1f} images/s "
        f"({n} images at {FLAGS.image_size} px, 1 worker)")


if __name__ == "__main__":
  app.run(main)
