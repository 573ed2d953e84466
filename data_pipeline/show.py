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

from absl import app, flags
import cv2
import numpy as np

from data_pipeline import deepfashion2 as df2
from data_pipeline import transforms

FLAGS = flags.FLAGS
flags.DEFINE_string("root", None, "A split directory in the raw layout (image/, annos/).")
flags.DEFINE_string("coco", None, "A COCO-format JSON (instead of --root).")
flags.DEFINE_string("images", None, "The image folder of --coco.")
flags.DEFINE_string("out", "batch.png", "Output PNG.")
flags.DEFINE_integer("pairs", 4, "Elements (rows) to draw.")
flags.DEFINE_integer("seed", 0, "Shuffle/flip seed.")
flags.DEFINE_integer("step", 0, "Which batch of the stream to draw.")
flags.DEFINE_integer("short_side", 400, "Resize: shorter side.")
flags.DEFINE_integer("max_size", 667, "Resize: cap on the longer side.")
flags.DEFINE_integer("max_instances", 8, "Instances per image.")
flags.DEFINE_integer("mask_size", 56, "Mask crop size.")
flags.DEFINE_boolean("strict", False, "Fail on the first bad file instead of skipping it.")

_PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)], np.uint8)


def draw_image(ex: dict[str, np.ndarray]) -> np.ndarray:
  """Draws one encoded image (``transforms.image_spec`` arrays) onto a copy of its canvas."""
  img = ex["image"].copy()
  h, w = img.shape[:2]
  for k in np.nonzero(ex["instance_valid"])[0]:
    color = _PALETTE[int(ex["classes"][k]) % len(_PALETTE)]
    full = transforms.paste_mask(ex["masks"][k], ex["boxes"][k], (h, w)).astype(bool)
    img[full] = (0.5 * img[full] + 0.5 * color).astype(np.uint8)
    x1, y1, x2, y2 = np.round(ex["boxes"][k]).astype(int)
    c = tuple(int(v) for v in color)
    cv2.rectangle(img, (x1, y1), (x2, y2), c, 2)
    label = f"{df2.COCO_NAMES[int(ex['classes'][k])]} s{int(ex['style'][k])}"
    cv2.putText(img, label, (x1 + 2, max(y1 + 12, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                (255, 255, 255), 2, cv2.LINE_AA)
    cv2.putText(img, label, (x1 + 2, max(y1 + 12, 12)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, c, 1,
                cv2.LINE_AA)
    for x, y, v in ex["landmarks"][k]:
      if v > 0:
        cv2.circle(img, (int(round(x)), int(round(y))), 3, c, -1 if v == 2 else 1, cv2.LINE_AA)
  ch, cw = (int(v) for v in ex["image_hw"])
  cv2.rectangle(img, (0, 0), (cw - 1, ch - 1), (255, 255, 255), 1)
  flip = " flipped" if ex["flipped"] else ""
  cv2.putText(img, f"id {int(ex['image_id'])}{flip}", (4, ch - 6), cv2.FONT_HERSHEY_SIMPLEX,
              0.45, (255, 255, 255), 1, cv2.LINE_AA)
  return img


def draw_batch(batch: dict[str, np.ndarray], max_rows: int | None = None) -> np.ndarray:
  """[P, 2, ...] training batch -> one RGB image, a row per element, pair lines across."""
  rows = []
  num = batch["image"].shape[0] if max_rows is None else min(max_rows, batch["image"].shape[0])
  for p in range(num):
    halves = [draw_image({k: v[p, j] for k, v in batch.items() if v.ndim >= 2})
              for j in range(2)]
    # Crop the shared canvas padding: each row as tall as its taller image, each half as wide
    # as its image's content.
    hw = batch["image_hw"][p]
    halves = [img[:int(hw[:, 0].max()), :int(hw[j, 1]) + 4] for j, img in enumerate(halves)]
    w = halves[0].shape[1]
    row = np.concatenate(halves, axis=1)
    if batch["match_valid"][p]:
      ex = [{k: batch[k][p, j] for k in ("boxes", "style", "pair_id", "instance_valid")}
            for j in range(2)]
      for a in np.nonzero(ex[0]["instance_valid"])[0]:
        for b in np.nonzero(ex[1]["instance_valid"])[0]:
          if (ex[0]["style"][a] > 0 and ex[0]["style"][a] == ex[1]["style"][b]
              and ex[0]["pair_id"][a] == ex[1]["pair_id"][b]):
            ca = ex[0]["boxes"][a].reshape(2, 2).mean(0)
            cb = ex[1]["boxes"][b].reshape(2, 2).mean(0) + (w, 0)
            cv2.line(row, tuple(int(v) for v in ca), tuple(int(v) for v in cb), (255, 255, 0),
                     2, cv2.LINE_AA)
    else:
      cv2.putText(row, "singles: no matching targets", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                  (255, 255, 0), 1, cv2.LINE_AA)
    rows.append(row)
  width = max(r.shape[1] for r in rows)
  rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
  return np.concatenate(rows, axis=0)


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO)
  from data_pipeline import pipeline, pairs, sources  # TensorFlow loads only here.
  if FLAGS.root:
    source = sources.raw_source(FLAGS.root, strict=FLAGS.strict)
  elif FLAGS.coco and FLAGS.images:
    source = sources.coco_source(FLAGS.coco, FLAGS.images, strict=FLAGS.strict)
  else:
    raise app.UsageError("Give --root, or --coco and --images.")
  size = int(np.ceil(max(FLAGS.short_side, FLAGS.max_size) / 32) * 32)
  geometry = transforms.ImageGeometry((size, size), FLAGS.short_side, FLAGS.max_size,
                                      FLAGS.max_instances, FLAGS.mask_size)
  ds = pipeline.train_dataset(source, pairs.build_pair_index(source.records), geometry,
                              global_batch_pairs=FLAGS.pairs, seed=FLAGS.seed,
                              start_step=FLAGS.step, process_index=0, process_count=1)
  batch = next(ds.as_numpy_iterator())
  picture = draw_batch(batch)
  cv2.imwrite(FLAGS.out, picture[:, :, ::-1])
  logging.info("Wrote %s (%dx%d).", FLAGS.out, picture.shape[1], picture.shape[0])


if __name__ == "__main__":
  app.run(main)
