"""Raw DeepFashion2 -> COCO JSON (the official converter's semantics) and retrieval GT files.

  python -m data_pipeline.convert --root DIR/validation --out DIR/validation_coco.json \
      [--query_gt Q.json --gallery_gt G.json] [--strict] [--check_image header] [--num_workers N]

COCO output (reference/deepfashion2.md, section 3), built from the items' values as annotated
(``Item.raw_box``, ``raw_landmarks``, ``raw_polygons``: not clipped to the image, as the official
converter copies them): ``categories`` = the 13 DeepFashion2
categories with 294 keypoint names; ``images`` ``{id, file_name, width, height}``; one annotation
per item, ids from 1 in record then item order, ``bbox`` [x1, y1, w, h], ``area`` = w * h (box
area), ``keypoints`` 882 numbers (the item's landmarks at its category's slice, zeros elsewhere),
``num_keypoints`` = landmarks with v > 0, ``segmentation`` the raw polygons, ``pair_id``,
``style``, ``iscrowd`` 0. Extra keys beyond the official converter: ``source`` (when known) and
``scale``, ``occlusion``, ``zoom_in``, ``viewpoint`` (when known, i.e. non-zero); pycocotools
ignores them and ``annotations.read_coco`` reads them back.

Retrieval GT (section 5): query = items of user images ``{query_image_id, style, cls, pair_id,
bbox [x1, y1, x2, y2]}`` (style 0 included); gallery = items of shop images
``{gallery_image_id, style, pair_id, bbox [x1, y1, x2, y2]}``.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
import os
import sys

from absl import logging
import numpy as np

from data_pipeline import annotations
from data_pipeline import deepfashion2 as df2
from data_pipeline import records
from data_pipeline import spec as spec_lib
from df2_jax import errors
from df2_jax import files


def _num(value) -> int | float:
  """A stored float32 value back as JSON: an int when integral, else its shortest float."""
  value = np.float32(value)
  if float(value).is_integer():
    return int(value)
  return float(str(value))


def _nums(values: Iterable) -> list[int | float]:
  return [_num(v) for v in np.asarray(values, np.float32).reshape(-1)]


def _xywh(box: np.ndarray) -> tuple[list[int | float], int | float]:
  """[x1, y1, w, h] and w * h, computed like the official converter: from the annotated numbers
  (recovered from float32 by ``_num``) in Python arithmetic."""
  x1, y1, x2, y2 = _nums(box)
  w, h = x2 - x1, y2 - y1
  return [x1, y1, w, h], w * h


def _file_name(record: records.ImageRecord) -> str:
  if record.image_path:
    return os.path.basename(record.image_path)
  return f"{record.image_id:06d}.jpg"


def to_coco(image_records: Sequence[records.ImageRecord], spec: spec_lib.DatasetSpec) -> dict:
  """Records -> a COCO dataset dict with the official DeepFashion2 converter's semantics, in the
  taxonomy ``spec`` (its category ids and names; every category lists the spec's whole landmark
  list, each annotation 3 L keypoints, its category's slice filled: DeepFashion2's layout; an
  RLE mask as its RLE; ``iscrowd`` as read)."""
  out_images, out_anns = [], []
  ann_id = 0
  for record in image_records:
    out_images.append({"id": int(record.image_id), "file_name": _file_name(record),
                       "width": int(record.width), "height": int(record.height)})
    for item in record.items:
      ann_id += 1
      bbox, area = _xywh(item.raw_box)
      keypoints = [0] * (3 * spec.num_landmarks)
      start = 3 * int(spec.landmark_start[item.category_id])
      local = _nums(item.raw_landmarks)
      keypoints[start:start + len(local)] = local
      ann = {
          "id": ann_id,
          "image_id": int(record.image_id),
          "category_id": int(spec.original_ids[item.category_id]),
          "bbox": bbox,
          "area": area,
          "iscrowd": int(item.iscrowd),
          "segmentation": (dict(item.rle) if item.rle is not None
                           else [_nums(poly) for poly in item.raw_polygons]),
          "keypoints": keypoints,
          "num_keypoints": int((np.asarray(item.raw_landmarks)[:, 2] > 0).sum()),
          "pair_id": int(record.pair_id),
          "style": int(item.style),
      }
      if record.source:
        ann["source"] = record.source
      for name in df2.ATTRIBUTES:
        value = int(getattr(item, name))
        if value:
          ann[name] = value
      out_anns.append(ann)
  return {"info": {}, "licenses": [], "categories": spec.coco_categories(),
          "images": out_images, "annotations": out_anns}


def retrieval_gt(image_records: Sequence[records.ImageRecord]) -> tuple[list[dict], list[dict]]:
  """Records -> (query GT list, gallery GT list) of the consumer-to-shop retrieval protocol.

  Records with unknown source ('') belong to neither list; they are counted in a warning.
  """
  queries, gallery = [], []
  unknown = 0
  for record in image_records:
    if record.source not in df2.SOURCES:
      unknown += 1
      continue
    for item in record.items:
      bbox = _nums(item.raw_box)
      if record.source == "user":
        queries.append({"query_image_id": int(record.image_id), "style": int(item.style),
                        "cls": int(item.category_id), "pair_id": int(record.pair_id),
                        "bbox": bbox})
      else:
        gallery.append({"gallery_image_id": int(record.image_id), "style": int(item.style),
                        "pair_id": int(record.pair_id), "bbox": bbox})
  if unknown:
    logging.warning("retrieval_gt: %d images with unknown source left out", unknown)
  return queries, gallery


def write_json(obj, path: str) -> None:
  """Writes atomically (``df2_jax.files``: temporary file, fsync, rename), creating the folder."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  files.write_json(path, obj, separators=(",", ":"))


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipeline.convert",
      description="Convert a raw DeepFashion2 split to COCO JSON and retrieval GT files.")
  parser.add_argument("--root", required=True,
                      help="split directory holding image/ and annos/")
  parser.add_argument("--out", required=True, help="output COCO JSON file")
  parser.add_argument("--query_gt", help="output retrieval query GT JSON file")
  parser.add_argument("--gallery_gt", help="output retrieval gallery GT JSON file")
  parser.add_argument("--strict", action="store_true",
                      help="fail on the first problem instead of dropping the bad image, item, "
                           "polygon or landmark")
  parser.add_argument("--check_image", choices=annotations.CHECK_IMAGE_MODES, default="decode",
                      help="decode every image fully, or read only its header")
  parser.add_argument("--num_workers", type=int, default=None,
                      help="processes for the image checks (default: all CPUs)")
  args = parser.parse_args(argv)
  if (args.query_gt is None) != (args.gallery_gt is None):
    parser.error("--query_gt and --gallery_gt go together")
  return args


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.set_verbosity(logging.INFO)
  try:
    scan = annotations.scan_raw_root(args.root, strict=args.strict,
                                     check_image=args.check_image, num_workers=args.num_workers)
  except errors.Df2Error as e:  # a --strict scan's first bad field, or an unusable --root
    return errors.report(e)
  if not scan.records:
    logging.error("No readable image in %s (%d files skipped): nothing to convert, %s not "
                  "written.", args.root, scan.num_skipped, args.out)
    return 1
  coco = to_coco(scan.records, spec_lib.DEEPFASHION2)
  write_json(coco, args.out)
  logging.info("Wrote %s: %d images, %d annotations (dropped as invalid: %s)", args.out,
               len(coco["images"]), len(coco["annotations"]), scan.counts)
  if args.query_gt:
    queries, gallery = retrieval_gt(scan.records)
    write_json(queries, args.query_gt)
    write_json(gallery, args.gallery_gt)
    logging.info("Wrote %s: %d query items (%d with style > 0); %s: %d gallery items",
                 args.query_gt, len(queries), sum(q["style"] > 0 for q in queries),
                 args.gallery_gt, len(gallery))
  return 0


if __name__ == "__main__":
  sys.exit(main())
