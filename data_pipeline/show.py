r"""Draws one training batch, after resize and flip, so a person can check the alignment by eye.

  python -m data_pipeline.show --root data/synthetic/train --out batch.png
  python -m data_pipeline.show --coco ../shared/fixtures/deepfashion2_real/coco.json \
      --images ../shared/fixtures/deepfashion2_real/image --out real.png

Each row is one element (user image | shop image): boxes with category names, masks pasted
back from their box crops, landmarks (filled: visible, hollow: occluded), and lines between
the positive items of the pair (equal pair_id and style > 0).
"""

from __future__ import annotations

import logging
import os

from absl import app, flags
import cv2
import numpy as np

from data_pipeline import draw, transforms

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "A split directory in the raw layout (image/, annos/).")
flags.DEFINE_string("coco", None, "A COCO-format JSON (instead of --root).")
flags.DEFINE_string("images", None, "The image folder of --coco.")
flags.DEFINE_string("spec_file", "", "--coco of another taxonomy: its flip pairs and sigmas "
                    "(data_pipeline/spec.py).")
flags.DEFINE_string("out", "batch.png", "Output PNG.")
flags.DEFINE_integer("pairs", 4, "Elements (rows) to draw.")
flags.DEFINE_integer("seed", 0, "Shuffle/flip seed.")
flags.DEFINE_integer("step", 0, "Which batch of the stream to draw.")
flags.DEFINE_integer("short_side", 400, "Resize: shorter side.")
flags.DEFINE_integer("max_size", 667, "Resize: cap on the longer side.")
flags.DEFINE_integer("max_instances", 8, "Instances per image.")
flags.DEFINE_integer("mask_size", 56, "Mask crop size.")
flags.DEFINE_boolean("strict", False, "Fail on the first bad file instead of skipping it.")

def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO)
  from data_pipeline import pipeline, pairs, sources  # TensorFlow loads only here.
  from data_pipeline import spec as spec_lib
  from df2_jax import errors
  try:
    if FLAGS.root:
      spec = spec_lib.DEEPFASHION2
      source = sources.raw_source(FLAGS.root, strict=FLAGS.strict)
    elif FLAGS.coco and FLAGS.images:
      spec = spec_lib.from_coco(FLAGS.coco, FLAGS.spec_file)
      source = sources.coco_source(FLAGS.coco, FLAGS.images, spec=spec, strict=FLAGS.strict)
    else:
      raise app.UsageError("Give --root, or --coco and --images.")
  except errors.Df2Error as e:  # a --strict scan's first bad field: one line
    return errors.report(e)
  size = int(np.ceil(max(FLAGS.short_side, FLAGS.max_size) / 32) * 32)
  geometry = transforms.ImageGeometry((size, size), FLAGS.short_side, FLAGS.max_size,
                                      FLAGS.max_instances, FLAGS.mask_size, spec=spec)
  ds = pipeline.train_dataset(source, pairs.build_pair_index(source.records), geometry,
                              global_batch_pairs=FLAGS.pairs, seed=FLAGS.seed,
                              start_step=FLAGS.step, process_index=0, process_count=1)
  batch = next(ds.as_numpy_iterator())
  picture = draw.draw_batch(batch, spec.names)
  parent = os.path.dirname(os.path.abspath(FLAGS.out))
  os.makedirs(parent, exist_ok=True)
  if not cv2.imwrite(FLAGS.out, picture[:, :, ::-1]):
    raise app.UsageError(f"could not write {FLAGS.out} (the file name needs an image "
                         f"extension such as .png, and the folder must be writable)")
  logging.info("Wrote %s (%dx%d).", FLAGS.out, picture.shape[1], picture.shape[0])


if __name__ == "__main__":
  app.run(main)
