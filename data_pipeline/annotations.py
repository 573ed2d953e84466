"""Reading and validating DeepFashion2 annotations: the raw per-image JSON and the COCO conversion.

Both formats go through the same validation code (``_parse_item``, ``_item_or_drop`` and
``_make_record``); the format-specific readers only locate the values and name the fields. Every
problem is a ``records.DataError`` naming the file and the field, e.g. ``annos/000001.json:
field 'item2.landmarks': ...`` or ``coco.json: field 'annotations[id=7].bbox': ...``.

A problem drops only the part it spoils, as detectron2 drops an instance rather than its image
(``records.DROP_KINDS``): a bad landmark (a non-finite value, a visibility not 0/1/2, or
labelled beyond the tolerance outside the image) is made unlabelled (0, 0, 0); a bad polygon
(not a flat list of finite numbers, an odd count, fewer than 3 points, a point beyond the
tolerance) is removed from its item; an item with a bad category, style, box, landmark array,
attribute or segmentation list, or with no polygon left, is removed from its image; only
image-level problems (unreadable or invalid JSON, a bad image-level field such as source or
pair_id, a bad or missing size, a missing or undecodable image file, an image without any item)
drop the image. An image whose items were all dropped stays, with no items: its pixels
still show clothing, and an evaluation without it would quietly drop it from every metric. The
parts of an image or item that is dropped as a whole are not counted again.

The parsers collect what they drop in a ``Drops``; without one they raise the first problem.
The scanners (``scan_raw_root``, ``read_coco``) log one warning line per dropped thing and one
summary line with the counts (``records.DropCounts``, also in the returned ``ScanResult``), or
raise the first problem with ``strict=True``. Image checks (decoding 200k JPEGs is slow) run in a
spawn-based multiprocessing pool, in order, so results are deterministic.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping, Sequence
import json
import math
import multiprocessing
import os
import re
from typing import Any

from absl import logging
import numpy as np

from data_pipeline import deepfashion2 as df2
from data_pipeline import images
from data_pipeline import records
from data_pipeline import spec as spec_lib

CHECK_IMAGE_MODES = ("decode", "header")
# Box corners, labelled landmarks and polygon points may lie this many pixels beyond the image
# border. The record keeps them as annotated (``Item.raw_*``: the COCO conversion and the
# evaluation ground truth) and clipped to the image (``Item.box`` etc.: the training targets).
BOX_TOLERANCE = 1.0
# The pool is only worth its start-up cost with at least this many images per worker.
_MIN_TASKS_PER_WORKER = 32
_MAX_CHUNKSIZE = 64

_MISSING = object()
_ITEM_KEY = re.compile(r"^item(\d+)$")


def _fail(path: str, field: str, message: str):
  raise records.DataError(path, field, message)


class Drops:
  """What the validation of one image dropped (``records.Drop``, in the order met).

  With ``strict`` the first problem raises its DataError instead: the scanners' strict mode,
  and every direct call of a parser without a ``Drops``, where nothing may be lost silently.
  """

  def __init__(self, strict: bool = False):
    self.strict = strict
    self.entries: list[records.Drop] = []

  def add(self, kind: str, error: records.DataError) -> None:
    if kind not in records.DROP_KINDS:
      raise ValueError(f"kind must be one of {records.DROP_KINDS}, got {kind!r}")
    if self.strict:
      raise error
    self.entries.append(records.Drop(kind, error.path, error.field, error.message))

  @property
  def counts(self) -> records.DropCounts:
    return records.DropCounts.of(self.entries)


# --------------------------------------------------------------------------------------------
# Scalar and array checks.


def _get(src: Mapping[str, Any], key: str) -> Any:
  return src.get(key, _MISSING)


def _check_int(value: Any, path: str, field: str, *, lo: int | None = None,
               hi: int | None = None) -> int:
  """An integer (or an integral float, as some converters write) within [lo, hi]."""
  if value is _MISSING:
    _fail(path, field, "missing")
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    _fail(path, field, f"expected an integer, got {type(value).__name__} {value!r}")
  if isinstance(value, float):
    if not math.isfinite(value):
      _fail(path, field, f"non-finite value {value!r}")
    if value != int(value):
      _fail(path, field, f"expected an integer, got {value!r}")
  value = int(value)
  if (lo is not None and value < lo) or (hi is not None and value > hi):
    low = "-inf" if lo is None else lo
    high = "inf" if hi is None else hi
    _fail(path, field, f"value {value} outside {low}..{high}")
  return value


def _check_numbers(value: Any, path: str, field: str, *, finite: bool = True) -> np.ndarray:
  """A flat list of numbers -> [n] float64; all finite unless ``finite`` is False (the
  landmarks: one bad landmark drops only itself, ``_parse_item``)."""
  if value is _MISSING:
    _fail(path, field, "missing")
  if not isinstance(value, (list, tuple)):
    _fail(path, field, f"expected a list of numbers, got {type(value).__name__}")
  try:
    array = np.array(value)
  except (ValueError, OverflowError) as e:
    _fail(path, field, f"expected a flat list of numbers: {e}")
  if array.size == 0:
    return np.zeros([0], np.float64)
  if array.ndim != 1 or array.dtype.kind not in "iuf":
    _fail(path, field, "expected a flat list of numbers")
  array = array.astype(np.float64)
  bad = ~np.isfinite(array)
  if finite and bad.any():
    _fail(path, field, f"non-finite value {array[bad][0]!r} at index {int(np.argmax(bad))}")
  return array


# --------------------------------------------------------------------------------------------
# The shared validation: one item, one image record.


def _parse_item(src: Mapping[str, Any], path: str, prefix: str, width: int, height: int,
                drops: Drops, *, box_key: str, box_format: str, landmark_key: str,
                landmark_layout: str, spec: spec_lib.DatasetSpec) -> records.Item:
  """Validates one item of either format.

  A problem with the item's own fields raises (the item is dropped, by ``_item_or_drop``); a
  bad landmark or polygon goes to ``drops`` and only it is lost, but an item with no polygon
  left raises. The checks run in one fixed order, so strict mode raises the first problem.

  Args:
    src: the item's dict (raw ``itemN`` value or COCO annotation).
    path: the annotation file, for errors.
    prefix: the item's name in errors, e.g. "item2" or "annotations[id=7]".
    width, height: the image size.
    drops: where dropped landmarks and polygons go (or, strict, the first raises).
    box_key: "bounding_box" (raw) or "bbox" (COCO).
    box_format: "xyxy" (raw corners) or "xywh" (COCO).
    landmark_key: "landmarks" (raw) or "keypoints" (COCO).
    landmark_layout: "local" (3 * n category-local numbers), "global" (3 * L numbers, the
      category's slice used, zeros elsewhere required: the DeepFashion2 conversion's 882) or
      "coco" (either; missing or empty: unlabelled).
    spec: the taxonomy: ``category_id`` is a dataset id of it, mapped to its class 1..C; without
      pairs (``has_pairs`` False) ``style`` is optional (0), without masks the segmentation is.

  Returns:
    The validated item: box, labelled landmarks and polygons clipped to the image, and the
    annotated values in ``unclipped`` where clipping changed any of them; dropped landmarks are
    (0, 0, 0) in both views, dropped polygons are in neither.

  Raises:
    records.DataError: the item is bad as a whole.
  """
  def field(key):
    return f"{prefix}.{key}"

  original = _check_int(_get(src, "category_id"), path, field("category_id"), lo=1)
  cat = spec.class_of(original)
  if cat is None:
    _fail(path, field("category_id"), f"value {original} is not a category of dataset "
                                      f"{spec.name!r} (ids {[c.id for c in spec.categories]})")
  name = _get(src, "category_name")
  names = spec.accepted_names(cat)
  if name is not _MISSING and name not in names:
    _fail(path, field("category_name"),
          f"{name!r} does not match category_id {original} ({sorted(names)[-1]!r})")
  style = (0 if not spec.has_pairs and _get(src, "style") is _MISSING
           else _check_int(_get(src, "style"), path, field("style"), lo=0))
  iscrowd = _get(src, "iscrowd")
  iscrowd = False if iscrowd is _MISSING else bool(
      _check_int(iscrowd, path, field("iscrowd"), lo=0, hi=1))

  # Box.
  box = _check_numbers(_get(src, box_key), path, field(box_key))
  if box.shape != (4,):
    _fail(path, field(box_key), f"expected 4 numbers, got {box.size}")
  if box_format == "xywh":
    box = np.array([box[0], box[1], box[0] + box[2], box[1] + box[3]])
  x1, y1, x2, y2 = box.tolist()
  if x2 <= x1 or y2 <= y1:
    _fail(path, field(box_key), f"degenerate box (x1, y1, x2, y2) = {(x1, y1, x2, y2)}")
  tol = BOX_TOLERANCE
  if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
    _fail(path, field(box_key),
          f"box (x1, y1, x2, y2) = {(x1, y1, x2, y2)} outside the {width}x{height} image "
          f"(tolerance {tol:g} px)")
  raw_box = box.astype(np.float32)
  box = np.clip(box, 0.0, [width, height, width, height])
  if box[2] <= box[0] or box[3] <= box[1]:
    _fail(path, field(box_key), f"box {(x1, y1, x2, y2)} is empty after clipping to the image")

  # The landmark array as a whole (its values are checked one landmark at a time below).
  count = int(spec.landmark_counts[cat])
  marks_field = field(landmark_key)
  given = _get(src, landmark_key)
  if landmark_layout == "coco" and (given is _MISSING or given == []):
    given = [0] * (3 * count)  # a set or item without landmarks: all unlabelled
  marks = _check_numbers(given, path, marks_field, finite=False)
  total = spec.num_landmarks
  if landmark_layout == "coco" and marks.size != 3 * count and marks.size == 3 * total:
    landmark_layout = "global"  # the DeepFashion2 conversion's shared layout
  if landmark_layout == "global":
    if marks.size != 3 * total:
      _fail(path, marks_field, f"expected {3 * total} numbers, got {marks.size}")
    sl = spec.landmark_slice(cat)
    inside = np.zeros(3 * total, bool)
    inside[3 * sl.start:3 * sl.stop] = True
    stray = np.flatnonzero((marks != 0) & ~inside)
    if stray.size:
      _fail(path, marks_field,
            f"non-zero value at index {int(stray[0])}, outside category {cat}'s slice "
            f"[{3 * sl.start}, {3 * sl.stop})")
    marks = marks[3 * sl.start:3 * sl.stop]
  elif marks.size != 3 * count:
    _fail(path, marks_field,
          f"expected {3 * count} numbers (3 x {count} landmarks of category {cat}), "
          f"got {marks.size}")
  marks = marks.reshape(count, 3)

  # Each landmark: a bad one is made unlabelled (0, 0, 0), in both views. Vectorised (the
  # release has ~10M landmarks); only the bad ones are looked at one by one.
  finite = np.isfinite(marks).all(axis=1)
  visibility_ok = np.isin(marks[:, 2], (0.0, 1.0, 2.0))
  with np.errstate(invalid="ignore"):
    # Labelled landmarks lie in the image (with the boxes' tolerance, then clipped to it).
    outside = (marks[:, 2] > 0) & _outside(marks[:, :2], width, height, tol)
  for k in np.flatnonzero(~finite | ~visibility_ok | outside):
    x, y, v = marks[k]
    if not finite[k]:
      why = f"non-finite value in landmark {k + 1} ({x:g}, {y:g}, {v:g})"
    elif not visibility_ok[k]:
      why = f"visibility {v:g} of landmark {k + 1} not in {{0, 1, 2}}"
    else:
      why = (f"landmark {k + 1} at ({x:g}, {y:g}) outside the {width}x{height} image "
             f"(tolerance {tol:g} px)")
    drops.add("landmark", records.DataError(path, marks_field, why))
    marks[k] = 0.0
  labelled = marks[:, 2] > 0
  raw_marks = marks.astype(np.float32)
  marks[labelled, :2] = np.clip(marks[labelled, :2], 0.0, [width, height])

  # The segmentation list as a whole.
  seg_field = field("segmentation")
  seg = _get(src, "segmentation")
  rle = None
  if not spec.has_masks and (seg is _MISSING or seg == [] or seg == {}):
    seg = []  # a set without masks: the mask loss and AP_mask are off
  elif seg is _MISSING:
    _fail(path, seg_field, "missing")
  elif isinstance(seg, dict):
    rle, seg = _check_rle(seg, path, seg_field, width, height), []
  elif not isinstance(seg, (list, tuple)):
    _fail(path, seg_field, f"expected a list of polygons or an RLE, got {type(seg).__name__}")
  elif not seg:
    _fail(path, seg_field, "no polygons")

  # Each polygon: a bad one is dropped; an item with none left is dropped.
  polygons, raw_polygons, first_bad = [], [], None
  for i, poly in enumerate(seg):
    try:
      points = _check_polygon(poly, path, f"{seg_field}[{i}]", width, height, tol)
    except records.DataError as e:
      first_bad = first_bad or e
      drops.add("polygon", e)
      continue
    raw_polygons.append(points.astype(np.float32))
    polygons.append(np.clip(points, 0.0, [width, height]).astype(np.float32))
  if not polygons and seg:
    _fail(path, seg_field, f"no valid polygon: all {len(seg)} are bad (first: "
                           f"{first_bad.field}: {first_bad.message})")

  # Optional attributes.
  attributes = {}
  for name in df2.ATTRIBUTES:
    value = _get(src, name)
    attributes[name] = 0 if value is _MISSING else _check_int(value, path, field(name),
                                                              lo=1, hi=3)

  box, marks = box.astype(np.float32), marks.astype(np.float32)
  # The annotated values survive where clipping changed them (compared as stored, float32).
  unclipped = None
  if (not np.array_equal(box, raw_box) or not np.array_equal(marks, raw_marks)
      or any(not np.array_equal(p, r) for p, r in zip(polygons, raw_polygons))):
    unclipped = records.Geometry(raw_box, raw_marks, tuple(raw_polygons))
  return records.Item(category_id=cat, style=style, box=box, landmarks=marks,
                      polygons=tuple(polygons), unclipped=unclipped, rle=rle, iscrowd=iscrowd,
                      **attributes)


def _check_rle(seg: Mapping[str, Any], path: str, field: str, width: int, height: int) -> dict:
  """A COCO RLE mask of the image -> {"size": [h, w], "counts": str} (compressed)."""
  size, counts = seg.get("size"), seg.get("counts")
  if (not isinstance(size, (list, tuple)) or len(size) != 2
      or [int(v) if isinstance(v, (int, float)) else v for v in size] != [height, width]):
    _fail(path, f"{field}.size", f"expected [{height}, {width}] (the image's height, width), "
                                 f"got {size!r}")
  from pycocotools import mask as mask_utils
  if isinstance(counts, list):  # uncompressed
    if not all(isinstance(v, int) and v >= 0 for v in counts) or sum(counts) != width * height:
      _fail(path, f"{field}.counts", f"uncompressed counts must be non-negative integers "
                                     f"summing to {width} x {height}")
  elif not isinstance(counts, str) or not counts:
    _fail(path, f"{field}.counts", f"expected a string or a list of run lengths, got "
                                   f"{type(counts).__name__}")
  try:
    rle = (mask_utils.frPyObjects({"size": [height, width], "counts": counts}, height, width)
           if isinstance(counts, list) else {"size": [height, width], "counts": counts.encode()})
    area = float(mask_utils.area(rle))
  except (ValueError, TypeError) as e:  # pycocotools' own complaint about the counts
    raise records.DataError(path, f"{field}.counts", f"not a valid RLE: {e}") from e
  if area <= 0:
    _fail(path, field, "empty mask")
  counts = rle["counts"]
  return {"size": [height, width],
          "counts": counts.decode() if isinstance(counts, bytes) else counts}


def _check_polygon(poly: Any, path: str, field: str, width: int, height: int,
                   tol: float) -> np.ndarray:
  """One polygon -> its [k, 2] float64 points (k >= 3, each within the tolerance)."""
  coords = _check_numbers(poly, path, field)
  if coords.size % 2:
    _fail(path, field, f"odd number of coordinates ({coords.size})")
  if coords.size < 6:
    _fail(path, field, f"a polygon needs at least 3 points, got {coords.size // 2}")
  points = coords.reshape(-1, 2)
  outside = _outside(points, width, height, tol)
  if outside.any():
    k = int(np.argmax(outside))
    _fail(path, field, f"point {k + 1} at ({points[k, 0]:g}, {points[k, 1]:g}) outside "
                       f"the {width}x{height} image (tolerance {tol:g} px)")
  return points


def _item_or_drop(drops: Drops, path: str, prefix: str, src: Any, width: int, height: int,
                  **layout) -> records.Item | None:
  """``_parse_item``, or None with the item in ``drops`` (its landmarks and polygons dropped
  before are not counted again: the item is gone whole)."""
  mark = len(drops.entries)
  try:
    if not isinstance(src, dict):
      _fail(path, prefix, f"expected a JSON object, got {type(src).__name__}")
    return _parse_item(src, path, prefix, width, height, drops, **layout)
  except records.DataError as e:
    del drops.entries[mark:]
    drops.add("item", e)
    return None


def _outside(points: np.ndarray, width: int, height: int, tol: float) -> np.ndarray:
  """[N] bool: points (x, y) farther than ``tol`` pixels outside the image."""
  return ((points[:, 0] < -tol) | (points[:, 1] < -tol) | (points[:, 0] > width + tol)
          | (points[:, 1] > height + tol))


def _check_source(value: Any, path: str, field: str, *, required: bool) -> str:
  """'user' or 'shop'; '' (unknown) allowed only when not required."""
  if value is _MISSING or (value == "" and not required):
    if required:
      _fail(path, field, "missing")
    return ""
  if value not in df2.SOURCES:
    _fail(path, field, f"{value!r} is not one of {df2.SOURCES}")
  return value


def _make_record(path: str, image_id: int, image_path: str, width: int, height: int,
                 source: str, pair_id: int, items: Sequence[records.Item | None]
                 ) -> records.ImageRecord:
  """The record of both formats: the items that were not dropped (possibly none)."""
  return records.ImageRecord(image_id=int(image_id), image_path=str(image_path),
                             width=int(width), height=int(height), source=source,
                             pair_id=int(pair_id),
                             items=tuple(item for item in items if item is not None),
                             anno_path=str(path))


def _check_size(path: str, field: str, width: Any, height: Any) -> None:
  """An image-level check: the image size every coordinate is checked against."""
  if not all(isinstance(v, (int, np.integer)) and v > 0 for v in (width, height)):
    _fail(path, field, f"image size {width}x{height}")


def _measure_image(image_path: str, check_image: str) -> tuple[int, int]:
  """(width, height), by full decode or from the header."""
  if check_image == "decode":
    array = images.load_image(image_path)
    return int(array.shape[1]), int(array.shape[0])
  if check_image == "header":
    return images.image_size(image_path)
  raise ValueError(f"check_image must be one of {CHECK_IMAGE_MODES}, got {check_image!r}")


# --------------------------------------------------------------------------------------------
# Raw per-image JSON.


def parse_raw_annotation(anno: Any, anno_path: str, image_id: int, image_path: str,
                         width: int, height: int, *,
                         drops: Drops | None = None) -> records.ImageRecord:
  """Validates one raw DeepFashion2 annotation (the parsed ``annos/NNNNNN.json``).

  Args:
    anno: the parsed JSON object.
    anno_path: its file, for error messages.
    image_id: int(stem).
    image_path: the image file.
    width, height: the image size in pixels.
    drops: where dropped items, polygons and landmarks go (see the module docstring); None:
      the first problem raises.

  Returns:
    The record; items in item-number order (item1, item2, ...), their geometry clipped to the
    image (``Item.box`` etc.) and as annotated (``Item.raw_box`` etc.).

  Raises:
    records.DataError: naming ``anno_path`` and the bad field: an image-level problem, or
      (``drops`` None) any.
  """
  drops = drops if drops is not None else Drops(strict=True)
  path = str(anno_path)
  # Image-level checks first: an image dropped whole never has its parts counted as well.
  _check_size(path, "size", width, height)
  if not isinstance(anno, dict):
    _fail(path, "json", f"expected a JSON object, got {type(anno).__name__}")
  source = _check_source(_get(anno, "source"), path, "source", required=True)
  pair_id = _check_int(_get(anno, "pair_id"), path, "pair_id", lo=0)
  keys = sorted((int(m.group(1)), key) for key in anno if (m := _ITEM_KEY.match(key)))
  if not keys:
    _fail(path, "items", "the image has no items")
  items = [_item_or_drop(drops, path, key, anno[key], width, height, box_key="bounding_box",
                         box_format="xyxy", landmark_key="landmarks", landmark_layout="local",
                         spec=spec_lib.DEEPFASHION2)
           for _, key in keys]
  return _make_record(path, image_id, image_path, width, height, source, pair_id, items)


def _read_json(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise records.DataError(path, "json", f"cannot read file: {e}") from e
  if not data.strip():
    _fail(path, "json", "empty file")
  try:
    return json.loads(data)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise records.DataError(path, "json", f"invalid JSON: {e}") from e


def _stem_id(path: str, field: str) -> int:
  stem = os.path.splitext(os.path.basename(path))[0]
  if not stem.isdigit():
    _fail(path, field, f"file name stem {stem!r} is not a number")
  return int(stem)


def read_raw_record(anno_path: str | os.PathLike, image_path: str | os.PathLike,
                    check_image: str = "decode", *,
                    drops: Drops | None = None) -> records.ImageRecord:
  """Reads and validates one raw annotation file and checks its image.

  Args:
    anno_path: ``annos/NNNNNN.json``; image_id = int(NNNNNN).
    image_path: ``image/NNNNNN.jpg``.
    check_image: "decode" (full decode, catches truncated files) or "header" (size only).
    drops: as in ``parse_raw_annotation``; None: the first problem raises.

  Raises:
    records.DataError: naming the file and the field.
  """
  if check_image not in CHECK_IMAGE_MODES:
    raise ValueError(f"check_image must be one of {CHECK_IMAGE_MODES}, got {check_image!r}")
  anno_path, image_path = os.fspath(anno_path), os.fspath(image_path)
  image_id = _stem_id(anno_path, "file_name")
  anno = _read_json(anno_path)
  width, height = _measure_image(image_path, check_image)
  return parse_raw_annotation(anno, anno_path, image_id, image_path, width, height,
                              drops=drops)


# --------------------------------------------------------------------------------------------
# Running per-image work in order, dropping or raising.

# A task's outcome, sent back from the worker processes: its record (None: the image is
# dropped) and what was dropped, the image included.
_Outcome = tuple[records.ImageRecord | None, list[records.Drop]]

# The warning line of each kind of drop.
_DROPPING = {"image": "Dropping the image", "item": "Dropping an item",
             "polygon": "Dropping a polygon", "landmark": "Dropping a landmark (made unlabelled)"}


def _capture(fn: Callable[..., records.ImageRecord], *args) -> _Outcome:
  """``fn(*args, drops=...)``'s record and drops; an image-level DataError drops the image."""
  drops = Drops()
  try:
    record = fn(*args, drops=drops)
  except records.DataError as e:
    return None, [records.Drop("image", e.path, e.field, e.message)]
  return record, drops.entries


def _dropped(kind: str, path: str, field: str, message: str) -> _Outcome:
  return None, [records.Drop(kind, path, field, message)]


def _raw_task(task: tuple[Any, ...]) -> _Outcome:
  if task[0] == "error":
    return _dropped(*task[1:])
  _, anno_path, image_path, check_image = task
  return _capture(read_raw_record, anno_path, image_path, check_image)


def _num_workers(num_workers: int | None, num_tasks: int) -> int:
  workers = (os.cpu_count() or 1) if num_workers is None else int(num_workers)
  useful = -(-num_tasks // _MIN_TASKS_PER_WORKER)
  return max(1, min(workers, useful))


def _run_tasks(fn: Callable[[Any], _Outcome], tasks: Sequence[Any], *, strict: bool,
               num_workers: int | None, what: str) -> records.ScanResult:
  """Runs ``fn`` over ``tasks`` in order (in a pool when worth it) and collects the outcomes:
  one warning line per dropped thing and a summary line, or (strict) the first one raised."""
  result = records.ScanResult(records=[], drops=[])

  def collect(outcome: _Outcome) -> None:
    record, drops = outcome
    if drops and strict:
      raise drops[0].error()
    for drop in drops:
      logging.warning("%s: %s", _DROPPING[drop.kind], drop)
    result.drops.extend(drops)
    if record is not None:
      result.records.append(record)

  workers = _num_workers(num_workers, len(tasks))
  if workers <= 1:
    for task in tasks:
      collect(fn(task))
  else:
    chunksize = max(1, min(_MAX_CHUNKSIZE, len(tasks) // (4 * workers)))
    # spawn, not fork: the caller may already hold threads (JAX, TensorFlow).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      for outcome in pool.imap(fn, tasks, chunksize=chunksize):
        collect(outcome)
  result.records.sort(key=lambda r: r.image_id)
  counts = result.counts
  if counts:
    emptied = sum(1 for r in result.records if not r.items)
    logging.warning("%s: %d records; dropped %s (see the warnings above)%s", what,
                    len(result.records), counts,
                    f"; {emptied} images kept with no item left" if emptied else "")
  else:
    logging.info("%s: %d records, nothing dropped", what, len(result.records))
  return result


def _list_files(directory: str, extensions: tuple[str, ...]) -> list[str]:
  with os.scandir(directory) as entries:
    return sorted(e.name for e in entries
                  if e.is_file() and os.path.splitext(e.name)[1].lower() in extensions)


def scan_raw_root(root: str | os.PathLike, *, strict: bool = False, check_image: str = "decode",
                  num_workers: int | None = None) -> records.ScanResult:
  """Reads and validates a raw split directory (``root/image/*.jpg``, ``root/annos/*.json``).

  Files are paired by stem (image_id = int(stem)). Unpaired or unreadable files and images
  with a bad image-level field are dropped, and so are bad items, polygons and landmarks of
  the other images (see the module docstring), each with one warning line naming the file and
  the field; a summary line gives the counts.

  Args:
    root: the split directory, e.g. ``DeepFashion2/validation``.
    strict: raise the first DataError (in image_id order) instead of dropping anything.
    check_image: "decode" (full decode of every image) or "header" (size only; fast).
    num_workers: processes for the checks; None = os.cpu_count(); 1 = in this process.

  Returns:
    ScanResult with records sorted by image_id and what was dropped (``drops``, ``counts``;
    ``skipped``: (path, reason) of every dropped image).

  Raises:
    records.DataError: when ``root/annos`` or ``root/image`` is not a directory, or (strict)
      for the first bad file.
  """
  if check_image not in CHECK_IMAGE_MODES:
    raise ValueError(f"check_image must be one of {CHECK_IMAGE_MODES}, got {check_image!r}")
  root = os.fspath(root)
  anno_dir, image_dir = os.path.join(root, "annos"), os.path.join(root, "image")
  for directory, field in ((anno_dir, "annos"), (image_dir, "image")):
    if not os.path.isdir(directory):
      _fail(root, field, f"directory {directory} not found")

  annos: dict[str, list[str]] = collections.defaultdict(list)
  for name in _list_files(anno_dir, (".json",)):
    annos[os.path.splitext(name)[0]].append(os.path.join(anno_dir, name))
  pictures: dict[str, list[str]] = collections.defaultdict(list)
  for name in _list_files(image_dir, images.IMAGE_EXTENSIONS):
    pictures[os.path.splitext(name)[0]].append(os.path.join(image_dir, name))

  def order(stem):
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)

  tasks = []
  for stem in sorted(set(annos) | set(pictures), key=order):
    anno_paths, image_paths = annos.get(stem, []), pictures.get(stem, [])
    if not stem.isdigit():
      path = (anno_paths or image_paths)[0]
      tasks.append(("error", "image", path, "file_name",
                    f"file name stem {stem!r} is not a number"))
    elif not image_paths:
      tasks.append(("error", "image", anno_paths[0], "image",
                    f"no image file {stem}.jpg for this annotation"))
    elif not anno_paths:
      tasks.append(("error", "image", image_paths[0], "annotation",
                    f"no annotation file annos/{stem}.json for this image"))
    elif len(image_paths) > 1:
      tasks.append(("error", "image", image_paths[0], "image",
                    f"several images for one annotation: {image_paths}"))
    else:
      tasks.append(("read", anno_paths[0], image_paths[0], check_image))
  return _run_tasks(_raw_task, tasks, strict=strict, num_workers=num_workers, what=root)


# --------------------------------------------------------------------------------------------
# The COCO conversion.


def _parse_coco_image(image: Mapping[str, Any], anns: Sequence[Mapping[str, Any]],
                      json_path: str, image_dir: str, check_image: str,
                      spec: spec_lib.DatasetSpec, *,
                      drops: Drops | None = None) -> records.ImageRecord:
  """One COCO image entry and its annotations -> a validated record.

  The image-level checks come first (its entry; the pair_id and source, which the conversion
  copies into every annotation, so that they must agree; the image file and its size), then
  each annotation as an item (a bad one is dropped, into ``drops``; None: the first problem
  raises).
  """
  drops = drops if drops is not None else Drops(strict=True)
  image_id = image["id"]  # Checked by read_coco.
  prefix = f"images[id={image_id}]"
  file_name = _get(image, "file_name")
  if not isinstance(file_name, str) or not file_name:
    _fail(json_path, f"{prefix}.file_name",
          "missing" if file_name is _MISSING else f"expected a file name, got {file_name!r}")
  width = _check_int(_get(image, "width"), json_path, f"{prefix}.width", lo=1)
  height = _check_int(_get(image, "height"), json_path, f"{prefix}.height", lo=1)
  if not anns:
    _fail(json_path, prefix, "the image has no annotations")

  prefixes = [f"annotations[id={ann.get('id', '?')}]" for ann in anns]
  pair_id = None
  for ann, ann_prefix in zip(anns, prefixes):
    value = (-1 if not spec.has_pairs and _get(ann, "pair_id") is _MISSING else
             _check_int(_get(ann, "pair_id"), json_path, f"{ann_prefix}.pair_id", lo=-1))
    if pair_id is None:
      pair_id = value
    elif value != pair_id:
      _fail(json_path, f"{ann_prefix}.pair_id", f"pair_id {value} differs from pair_id "
            f"{pair_id} of the first item of image {image_id}")
  source = ""
  sources = [(f"{prefix}.source", _get(image, "source"))] + [
      (f"{ann_prefix}.source", _get(ann, "source")) for ann, ann_prefix in zip(anns, prefixes)]
  for field, value in sources:
    value = _check_source(value, json_path, field, required=False)
    if value and source and value != source:
      _fail(json_path, field, f"source {value!r} differs from {source!r} of image {image_id}")
    source = source or value

  image_path = os.path.join(image_dir, file_name)
  actual = _measure_image(image_path, check_image)
  if actual != (width, height):
    _fail(json_path, f"{prefix}.width", f"declared size {width}x{height} but {image_path} is "
          f"{actual[0]}x{actual[1]}")

  layout = "global" if spec.categories == spec_lib.DEEPFASHION2.categories else "coco"
  items = [_item_or_drop(drops, json_path, ann_prefix, ann, width, height, box_key="bbox",
                         box_format="xywh", landmark_key="keypoints", landmark_layout=layout,
                         spec=spec)
           for ann, ann_prefix in zip(anns, prefixes)]
  return _make_record(json_path, image_id, image_path, width, height, source, pair_id, items)


def _coco_task(task: tuple[Any, ...]) -> _Outcome:
  if task[0] == "error":
    return _dropped(*task[1:])
  _, image, anns, json_path, image_dir, check_image, spec = task
  return _capture(_parse_coco_image, image, anns, json_path, image_dir, check_image, spec)


def read_coco(json_path: str | os.PathLike, image_dir: str | os.PathLike, *,
              spec: spec_lib.DatasetSpec, strict: bool = False, check_image: str = "decode",
              num_workers: int | None = None) -> records.ScanResult:
  """Reads and validates a COCO-format annotation file of the taxonomy ``spec``: the official
  DeepFashion2 conversion (``spec.DEEPFASHION2``) or one's own set (``spec.from_coco``).

  category_id (any ids of the spec) -> the spec's class 1..C; bbox xywh -> box x1y1x2y2;
  keypoints -> the category's landmarks (DeepFashion2: the 882 numbers' category slice, values
  elsewhere zero; another spec: the category's own 3 x n numbers, or none: unlabelled);
  segmentation polygons or an RLE (optional for a spec without masks); ``iscrowd`` kept (crowd
  items are evaluation-only); the image's pair_id from its annotations (which must agree;
  optional, -1, and ``style`` optional, 0, for a spec without pairs); source '' unless the
  image or its annotations have a ``source`` key. Images without annotations and bad images
  are dropped, and so are annotations of no image and bad items, polygons and landmarks (see
  the module docstring), each with a warning line, and a summary line gives the counts.

  Args:
    json_path: the COCO JSON file.
    image_dir: the directory holding the ``file_name`` images.
    strict: raise the first DataError instead of dropping anything.
    check_image: "decode" or "header".
    num_workers: processes for the checks; None = os.cpu_count(); 1 = in this process.

  Returns:
    ScanResult with records sorted by image id, items in annotation file order.

  Raises:
    records.DataError: when the file is not valid COCO JSON as a whole (unreadable, no
      ``images``/``annotations`` lists, ``categories`` not the spec's), or (strict) the first
      problem.
  """
  if check_image not in CHECK_IMAGE_MODES:
    raise ValueError(f"check_image must be one of {CHECK_IMAGE_MODES}, got {check_image!r}")
  json_path, image_dir = os.fspath(json_path), os.fspath(image_dir)
  data = _read_json(json_path)
  if not isinstance(data, dict):
    _fail(json_path, "json", f"expected a JSON object, got {type(data).__name__}")
  for key in ("images", "annotations"):
    if not isinstance(data.get(key), list):
      _fail(json_path, key, "missing" if key not in data else "expected a list")
  categories = data.get("categories")
  if categories is not None:
    if not isinstance(categories, list):
      _fail(json_path, "categories", "expected a list")
    for i, cat in enumerate(categories):
      cid = cat.get("id") if isinstance(cat, dict) else None
      name = cat.get("name") if isinstance(cat, dict) else None
      cls = spec.class_of(cid) if isinstance(cid, int) and not isinstance(cid, bool) else None
      if name not in (spec.accepted_names(cls) if cls else set()):
        _fail(json_path, f"categories[{i}]",
              f"category (id={cid!r}, name={name!r}) is not a category of dataset "
              f"{spec.name!r} (the run's config.data.spec)")

  # (sort key, ("error", kind, path, field, message)): image entries that are no image, and
  # annotations that belong to none.
  errors: list[tuple[int, tuple[str, str, str, str, str]]] = []
  entries: dict[int, Mapping[str, Any]] = {}
  for i, image in enumerate(data["images"]):
    if not isinstance(image, dict):
      errors.append((-1, ("error", "image", json_path, f"images[{i}]", "expected a JSON object")))
      continue
    try:
      image_id = _check_int(_get(image, "id"), json_path, f"images[{i}].id")
    except records.DataError as e:
      errors.append((-1, ("error", "image", e.path, e.field, e.message)))
      continue
    if image_id in entries:
      errors.append((image_id, ("error", "image", json_path, f"images[{i}].id",
                                f"duplicate image id {image_id}")))
      continue
    entries[image_id] = image

  anns_by_image: dict[int, list[Mapping[str, Any]]] = collections.defaultdict(list)
  for i, ann in enumerate(data["annotations"]):
    if not isinstance(ann, dict):
      errors.append((-1, ("error", "item", json_path, f"annotations[{i}]",
                          "expected a JSON object")))
      continue
    field = f"annotations[id={ann.get('id', '?')}].image_id"
    try:
      image_id = _check_int(_get(ann, "image_id"), json_path, field)
    except records.DataError as e:
      errors.append((-1, ("error", "item", e.path, e.field, e.message)))
      continue
    if image_id not in entries:
      errors.append((image_id, ("error", "item", json_path, field,
                                f"no image with id {image_id}")))
      continue
    anns_by_image[image_id].append(ann)

  tasks = list(errors)
  for image_id, image in entries.items():
    tasks.append((image_id, ("read", image, anns_by_image.get(image_id, []), json_path,
                             image_dir, check_image, spec)))
  tasks.sort(key=lambda t: t[0])  # Stable: file order among equal keys.
  return _run_tasks(_coco_task, [t for _, t in tasks], strict=strict, num_workers=num_workers,
                    what=json_path)
