"""Tests for data_pipeline.annotations: the real fixture, every validation rule, scanning."""

import copy
import functools
import io
import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from data_pipeline import annotations
from data_pipeline import deepfashion2 as df2
from data_pipeline import records
from data_pipeline.spec import DEEPFASHION2

from conftest import fixtures_dir


FIXTURE = fixtures_dir()


def _issue4() -> dict:
  return json.loads((FIXTURE / "annos_example_issue4.json").read_text())


@functools.cache
def _jpeg(width=600, height=500, noise=False) -> bytes:
  if noise:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
  else:
    image = Image.new("RGB", (width, height), (255, 255, 255))
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def _make_root(root: Path, files: dict) -> Path:
  """files: stem -> (annotation dict | bytes | None, image bytes | None)."""
  (root / "annos").mkdir(parents=True, exist_ok=True)
  (root / "image").mkdir(parents=True, exist_ok=True)
  for stem, (anno, image) in files.items():
    if anno is not None:
      data = anno if isinstance(anno, bytes) else json.dumps(anno).encode()
      (root / "annos" / f"{stem}.json").write_bytes(data)
    if image is not None:
      (root / "image" / f"{stem}.jpg").write_bytes(image)
  return root


def _parse(anno, width=600, height=500, drops=None):
  return annotations.parse_raw_annotation(anno, "annos/000001.json", 1, "image/000001.jpg",
                                          width, height, drops=drops)


# --------------------------------------------------------------------------------------------
# The real fixture.


def test_read_coco_real_fixture():
  result = annotations.read_coco(FIXTURE / "coco.json", FIXTURE / "image", num_workers=1,
                                 spec=DEEPFASHION2)
  assert result.num_skipped == 0
  assert len(result.records) == 16
  assert sum(len(r.items) for r in result.records) == 29
  ids = [r.image_id for r in result.records]
  assert ids == sorted(ids) and ids[0] == 2092 and ids[-1] == 187453
  assert len({i.category_id for r in result.records for i in r.items}) == 9

  first = result.records[0]  # 002092.jpg, 468 x 702, pair 171: trousers (style 0), top (1).
  assert (first.width, first.height, first.pair_id, first.source) == (468, 702, 171, "")
  assert first.image_path == str(FIXTURE / "image" / "002092.jpg")
  assert [i.category_id for i in first.items] == [8, 1]
  assert [i.style for i in first.items] == [0, 1]
  # bbox [16, 417, 366, 283] (xywh) -> corners.
  np.testing.assert_array_equal(first.items[0].box, [16, 417, 382, 700])
  assert first.items[0].landmarks.shape == (14, 3)
  np.testing.assert_array_equal(first.items[0].landmarks[:3], [[102, 426, 1], [226, 443, 1],
                                                                [363, 453, 1]])
  assert first.items[1].landmarks.shape == (25, 3)
  assert int((first.items[1].landmarks[:, 2] > 0).sum()) == 20
  assert [p.shape for p in first.items[0].polygons] == [(7, 2), (5, 2), (5, 2)]
  for record in result.records:
    for item in record.items:
      assert item.landmarks.shape == (df2.LANDMARK_COUNTS[item.category_id], 3)
      assert item.box.dtype == np.float32


def test_read_coco_header_mode_matches_decode():
  decoded = annotations.read_coco(FIXTURE / "coco.json", FIXTURE / "image", num_workers=1,
                                  spec=DEEPFASHION2)
  header = annotations.read_coco(FIXTURE / "coco.json", FIXTURE / "image", num_workers=1,
                                 check_image="header", spec=DEEPFASHION2)
  assert [(r.image_id, r.width, r.height) for r in decoded.records] == [
      (r.image_id, r.width, r.height) for r in header.records]


def test_parse_issue4_example():
  record = _parse(_issue4())
  assert (record.image_id, record.source, record.pair_id) == (1, "shop", 1811)
  skirt, top = record.items  # item1 before item2 although the JSON lists item2 first.
  assert (skirt.category_id, skirt.style, top.category_id, top.style) == (9, 1, 1, 0)
  np.testing.assert_array_equal(skirt.box, [227, 86, 543, 455])
  np.testing.assert_array_equal(top.box, [0, 0, 495, 179])
  assert skirt.landmarks.shape == (8, 3) and top.landmarks.shape == (25, 3)
  np.testing.assert_array_equal(top.landmarks[[9, 13, 14]],
                                [[94, 58, 2], [180, 86, 2], [203, 173, 1]])
  assert int((top.landmarks[:, 2] > 0).sum()) == 3
  assert [p.shape for p in top.polygons] == [(11, 2), (5, 2)]
  assert (skirt.scale, skirt.occlusion, skirt.zoom_in, skirt.viewpoint) == (2, 2, 1, 2)
  assert (top.scale, top.occlusion, top.zoom_in, top.viewpoint) == (2, 1, 3, 2)


def test_attributes_optional():
  anno = _issue4()
  for name in df2.ATTRIBUTES:
    del anno["item1"][name]
  skirt = _parse(anno).items[0]
  assert (skirt.scale, skirt.occlusion, skirt.zoom_in, skirt.viewpoint) == (0, 0, 0, 0)


def test_box_within_tolerance_is_clipped():
  anno = _issue4()
  anno["item1"]["bounding_box"] = [-1, 86, 601, 501]
  skirt = _parse(anno).items[0]
  np.testing.assert_array_equal(skirt.box, [0, 86, 600, 500])
  np.testing.assert_array_equal(skirt.raw_box, [-1, 86, 601, 501])  # as annotated


def test_landmarks_and_polygons_within_tolerance_are_clipped():
  anno = _issue4()
  anno["item2"]["landmarks"][27:30] = [600.5, -0.5, 2]  # landmark 10, visible
  anno["item2"]["landmarks"][0:3] = [7000, 7000, 0]  # unlabelled: coordinates not checked
  anno["item2"]["segmentation"][1] = [-1, 2, 94, 58, 601, 501]
  skirt, top = _parse(anno).items
  np.testing.assert_array_equal(top.landmarks[9], [600, 0, 2])
  np.testing.assert_array_equal(top.polygons[1], [[0, 2], [94, 58], [600, 500]])
  # The annotated values survive beside the clipped ones; nothing else is copied.
  np.testing.assert_array_equal(top.raw_landmarks[9], [600.5, -0.5, 2])
  np.testing.assert_array_equal(top.raw_landmarks[0], [7000, 7000, 0])
  np.testing.assert_array_equal(top.landmarks[0], [7000, 7000, 0])
  np.testing.assert_array_equal(top.raw_polygons[1], [[-1, 2], [94, 58], [601, 501]])
  np.testing.assert_array_equal(top.raw_polygons[0], top.polygons[0])
  np.testing.assert_array_equal(top.raw_box, top.box)
  assert top.unclipped is not None
  assert skirt.unclipped is None and skirt.raw_box is skirt.box  # nothing clipped: no copy


def test_training_targets_clipped_conversion_not(tmp_path):
  """One record, two readers: the training targets (transforms.encode_image) see the point at
  x = -0.2 on the border, the COCO conversion (the evaluation ground truth) sees -0.2."""
  from data_pipeline import convert, transforms
  anno = _issue4()
  top = anno["item2"]  # box [0, 0, 495, 179], landmark 10 at (94, 58), visible
  top["bounding_box"][0] = -0.2
  top["landmarks"][27] = -0.2
  top["segmentation"][1][0] = -0.2
  record = _parse(anno)
  item = record.items[1]
  assert item.polygons[1][0, 0] == 0 and item.raw_polygons[1][0, 0] == np.float32(-0.2)

  geometry = transforms.ImageGeometry((512, 640), 500, 600, 3, 8,
                                      spec=DEEPFASHION2)  # scale 1: 600 x 500
  out = transforms.encode_image(record, np.zeros((500, 600, 3), np.uint8), geometry, flip=False)
  assert out["scale"] == 1
  np.testing.assert_array_equal(out["boxes"][1], [0, 0, 495, 179])
  # The landmark's pixel index clipped to the image (0, 58), then the pixel's centre (+0.5).
  np.testing.assert_array_equal(out["landmarks"][1][9], [0.5, 58.5, 2])
  flipped = transforms.encode_image(record, np.zeros((500, 600, 3), np.uint8), geometry,
                                    flip=True)
  np.testing.assert_array_equal(flipped["boxes"][1], [105, 0, 600, 179])  # not beyond 600

  ann = convert.to_coco([record], DEEPFASHION2)["annotations"][1]
  assert ann["bbox"] == [-0.2, 0, 495.2, 179]  # w = 495 - (-0.2) as the official converter
  assert ann["area"] == (495 - -0.2) * 179
  assert ann["keypoints"][27:30] == [-0.2, 58, 2]
  assert ann["segmentation"][1][:2] == [-0.2, 2]
  assert ann["segmentation"] == top["segmentation"]  # the raw polygons, -0.2 included


def test_item_order_is_numeric():
  anno = _issue4()
  anno["item10"] = anno.pop("item2")
  assert [i.category_id for i in _parse(anno).items] == [9, 1]


# --------------------------------------------------------------------------------------------
# One test per validation rule: the DataError names the field.


def _set(path, value):
  def mutate(anno):
    target = anno
    for key in path[:-1]:
      target = target[key]
    target[path[-1]] = value
  return mutate


def _delete(path):
  def mutate(anno):
    target = anno
    for key in path[:-1]:
      target = target[key]
    del target[path[-1]]
  return mutate


def _no_items(anno):
  del anno["item1"], anno["item2"]


def _set_landmark(item, index, value):
  def mutate(anno):
    anno[item]["landmarks"][index] = value
  return mutate


RULES = {
    "missing source": (_delete(["source"]), "source"),
    "missing pair_id": (_delete(["pair_id"]), "pair_id"),
    "missing category_id": (_delete(["item2", "category_id"]), "item2.category_id"),
    "missing style": (_delete(["item2", "style"]), "item2.style"),
    "missing bounding_box": (_delete(["item2", "bounding_box"]), "item2.bounding_box"),
    "missing landmarks": (_delete(["item2", "landmarks"]), "item2.landmarks"),
    "missing segmentation": (_delete(["item2", "segmentation"]), "item2.segmentation"),
    "category 0": (_set(["item1", "category_id"], 0), "item1.category_id"),
    "category 14": (_set(["item1", "category_id"], 14), "item1.category_id"),
    "category not int": (_set(["item1", "category_id"], "9"), "item1.category_id"),
    "category_name mismatch": (_set(["item1", "category_name"], "shorts"),
                               "item1.category_name"),
    "wrong landmark count": (_set(["item2", "landmarks"], [0] * 72), "item2.landmarks"),
    "category_name checked against new id": (_set(["item1", "category_id"], 7),
                                      "item1.category_name"),
    "visibility 3": (_set_landmark("item1", 2, 3), "item1.landmarks"),
    "visibility -1": (_set_landmark("item1", 5, -1), "item1.landmarks"),
    "non-finite landmark": (_set_landmark("item1", 0, float("nan")), "item1.landmarks"),
    "degenerate box x": (_set(["item1", "bounding_box"], [227, 86, 227, 455]),
                         "item1.bounding_box"),
    "degenerate box y": (_set(["item1", "bounding_box"], [227, 455, 543, 86]),
                         "item1.bounding_box"),
    "box 3 numbers": (_set(["item1", "bounding_box"], [227, 86, 543]), "item1.bounding_box"),
    "box not numbers": (_set(["item1", "bounding_box"], ["a", 86, 543, 455]),
                        "item1.bounding_box"),
    "box infinite": (_set(["item1", "bounding_box"], [227, 86, float("inf"), 455]),
                     "item1.bounding_box"),
    "box out of image right": (_set(["item1", "bounding_box"], [227, 86, 602, 455]),
                               "item1.bounding_box"),
    "box out of image top": (_set(["item1", "bounding_box"], [227, -2, 543, 455]),
                             "item1.bounding_box"),
    "odd polygon": (_set(["item1", "segmentation"], [[237, 160, 378, 153, 461, 92, 519]]),
                    "item1.segmentation[0]"),
    "polygon with 2 points": (_set(["item2", "segmentation", 1], [1, 2, 94, 58]),
                              "item2.segmentation[1]"),
    "no polygons": (_set(["item2", "segmentation"], []), "item2.segmentation"),
    "polygon not flat": (_set(["item2", "segmentation"], [[[1, 2], [3, 4], [5, 6]]]),
                         "item2.segmentation[0]"),
    "landmark out of image": (_set_landmark("item2", 27, 5000), "item2.landmarks"),
    "landmark above image": (_set_landmark("item2", 28, -3), "item2.landmarks"),
    "polygon point out of image": (_set(["item2", "segmentation", 1],
                                        [1, 2, 94, 58, 900, 10]), "item2.segmentation[1]"),
    "no items": (_no_items, "items"),
    "bad source": (_set(["source"], "consumer"), "source"),
    "negative style": (_set(["item1", "style"], -1), "item1.style"),
    "negative pair_id": (_set(["pair_id"], -5), "pair_id"),
    "attribute 4": (_set(["item1", "occlusion"], 4), "item1.occlusion"),
    "attribute 0": (_set(["item2", "scale"], 0), "item2.scale"),
    "item not an object": (_set(["item1"], [1, 2]), "item1"),
}


@pytest.mark.parametrize("mutate,field", RULES.values(), ids=RULES.keys())
def test_validation_rule(mutate, field):
  anno = _issue4()
  mutate(anno)
  with pytest.raises(records.DataError) as info:
    _parse(anno)
  assert info.value.field == field
  assert info.value.path == "annos/000001.json"
  assert "annos/000001.json" in str(info.value) and field in str(info.value)


# What each rule drops when the reader collects drops instead of raising: "image" (the parser
# raises: the whole image goes), "item", "polygon" or "landmark" (the rest of the image stays).
# An item whose only polygon is bad is dropped whole, under the segmentation list's field.
RULE_DROPS = {
    "missing source": "image", "missing pair_id": "image", "missing category_id": "item",
    "missing style": "item", "missing bounding_box": "item", "missing landmarks": "item",
    "missing segmentation": "item", "category 0": "item", "category 14": "item",
    "category not int": "item", "category_name mismatch": "item",
    "wrong landmark count": "item", "category_name checked against new id": "item",
    "visibility 3": "landmark", "visibility -1": "landmark", "non-finite landmark": "landmark",
    "degenerate box x": "item", "degenerate box y": "item", "box 3 numbers": "item",
    "box not numbers": "item", "box infinite": "item", "box out of image right": "item",
    "box out of image top": "item", ("odd polygon", "item1.segmentation"): "item",
    "polygon with 2 points": "polygon", "no polygons": "item",
    ("polygon not flat", "item2.segmentation"): "item", "landmark out of image": "landmark",
    "landmark above image": "landmark", "polygon point out of image": "polygon",
    "no items": "image", "bad source": "image", "negative style": "item",
    "negative pair_id": "image", "attribute 4": "item", "attribute 0": "item",
    "item not an object": "item",
}


@pytest.mark.parametrize("key", RULE_DROPS, ids=lambda k: k if isinstance(k, str) else k[0])
def test_validation_rule_drops_only_its_part(key):
  name, field = key if isinstance(key, tuple) else (key, RULES[key][1])
  kind = RULE_DROPS[key]
  assert {k if isinstance(k, str) else k[0] for k in RULE_DROPS} == set(RULES)
  anno = _issue4()
  RULES[name][0](anno)
  drops = annotations.Drops()
  if kind == "image":
    with pytest.raises(records.DataError) as info:
      _parse(anno, drops=drops)
    assert info.value.field == field
    return
  record = _parse(anno, drops=drops)
  drop, = drops.entries
  assert (drop.kind, drop.path, drop.field) == (kind, "annos/000001.json", field)
  clean = _parse(_issue4())
  bad = int(field[4]) - 1  # item1 or item2
  if kind == "item":
    assert len(record.items) == 1
    kept, = record.items
    np.testing.assert_array_equal(kept.box, clean.items[1 - bad].box)
  elif kind == "polygon":
    assert len(record.items[bad].polygons) == len(clean.items[bad].polygons) - 1
  else:  # one landmark made unlabelled, the others as they were
    got, want = record.items[bad].landmarks, clean.items[bad].landmarks
    changed = np.flatnonzero((got != want).any(1))
    assert len(changed) <= 1 and (got[changed] == 0).all()
    assert int((got[:, 2] > 0).sum()) == int((want[:, 2] > 0).sum()) - len(changed)


def test_not_an_object():
  with pytest.raises(records.DataError) as info:
    _parse([1, 2, 3])
  assert info.value.field == "json"


# --------------------------------------------------------------------------------------------
# File-level failures (pairing, unreadable files), strict scans.


def _file_case(kind):
  anno, image = _issue4(), _jpeg()
  if kind == "annotation without image":
    return {"000001": (anno, None)}, "annos/000001.json", "image"
  if kind == "image without annotation":
    return {"000001": (None, image)}, "image/000001.jpg", "annotation"
  if kind == "corrupt JPEG":
    return {"000001": (anno, b"\xff\xd8\xff\xe0 not really a jpeg")}, "image/000001.jpg", "image"
  if kind == "truncated JPEG":
    data = _jpeg(noise=True)
    return {"000001": (anno, data[:len(data) // 2])}, "image/000001.jpg", "image"
  if kind == "empty image file":
    return {"000001": (anno, b"")}, "image/000001.jpg", "image"
  if kind == "empty annotation file":
    return {"000001": (b"", image)}, "annos/000001.json", "json"
  if kind == "invalid JSON":
    return {"000001": (b'{"source": "shop",', image)}, "annos/000001.json", "json"
  raise ValueError(kind)


FILE_CASES = ["annotation without image", "image without annotation", "corrupt JPEG",
              "truncated JPEG", "empty image file", "empty annotation file", "invalid JSON"]


@pytest.mark.parametrize("kind", FILE_CASES)
def test_file_failure(tmp_path, kind):
  files, rel_path, field = _file_case(kind)
  root = _make_root(tmp_path / "split", files)
  with pytest.raises(records.DataError) as info:
    annotations.scan_raw_root(root, strict=True, num_workers=1)
  assert info.value.field == field
  assert info.value.path == str(root / rel_path)
  # Not strict: the image is dropped with the same reason.
  result = annotations.scan_raw_root(root, num_workers=1)
  assert result.records == []
  assert result.skipped == [(str(root / rel_path), str(info.value))]
  assert result.counts == records.DropCounts(images=1)


def test_image_smaller_than_a_box_drops_that_item_only(tmp_path):
  """The measured size is what items are checked against: the skirt's box (y2 455) does not
  fit a 500x400 image, the top does."""
  root = _make_root(tmp_path / "split", {"000001": (_issue4(), _jpeg(500, 400))})
  with pytest.raises(records.DataError) as info:
    annotations.scan_raw_root(root, strict=True, num_workers=1)
  assert info.value.field == "item1.bounding_box"
  assert info.value.path == str(root / "annos/000001.json")
  result = annotations.scan_raw_root(root, num_workers=1)
  record, = result.records
  assert (record.width, record.height) == (500, 400)
  assert [i.category_id for i in record.items] == [1]  # the skirt (item1) is gone
  assert result.counts == records.DropCounts(items=1)
  assert result.skipped == []


def test_read_raw_record_header_mode_misses_truncation(tmp_path):
  data = _jpeg(noise=True)
  root = _make_root(tmp_path / "split", {"000001": (_issue4(), data[:len(data) // 2])})
  anno_path, image_path = root / "annos/000001.json", root / "image/000001.jpg"
  record = annotations.read_raw_record(anno_path, image_path, check_image="header")
  assert (record.width, record.height) == (600, 500)
  with pytest.raises(records.DataError) as info:
    annotations.read_raw_record(anno_path, image_path, check_image="decode")
  assert info.value.field == "image"


def test_missing_annos_directory(tmp_path):
  (tmp_path / "image").mkdir()
  with pytest.raises(records.DataError) as info:
    annotations.scan_raw_root(tmp_path)
  assert info.value.field == "annos"


def _good_anno(pair_id, source="user"):
  anno = _issue4()
  anno["pair_id"], anno["source"] = pair_id, source
  return anno


def test_scan_mixed_root(tmp_path, caplog):
  bad_anno = _good_anno(4)
  bad_anno["item2"]["landmarks"] = bad_anno["item2"]["landmarks"][:-3]  # 24 landmarks, not 25.
  root = _make_root(tmp_path / "split", {
      "000005": (_good_anno(5), _jpeg()),
      "000001": (_good_anno(1), _jpeg()),
      "000002": (_good_anno(2), b"\xff\xd8\xff\xe0 corrupt"),
      "000004": (bad_anno, _jpeg()),
      "000003": (_good_anno(3, "shop"), _jpeg()),
  })
  caplog.set_level(logging.INFO)
  result = annotations.scan_raw_root(root, num_workers=1)
  # The corrupt image is dropped; image 4 keeps its other item (item2's landmark array is bad).
  assert [r.image_id for r in result.records] == [1, 3, 4, 5]
  assert [r.pair_id for r in result.records] == [1, 3, 4, 5]
  assert [r.source for r in result.records] == ["user", "shop", "user", "user"]
  assert [len(r.items) for r in result.records] == [2, 2, 1, 2]
  assert result.counts == records.DropCounts(images=1, items=1)
  assert result.num_skipped == 1
  (path2, reason2), = result.skipped
  assert path2 == str(root / "image/000002.jpg") and "field 'image'" in reason2
  _, drop4 = result.drops
  assert (drop4.kind, drop4.path, drop4.field) == ("item", str(root / "annos/000004.json"),
                                                   "item2.landmarks")
  assert "expected 75 numbers" in drop4.message

  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 3  # one per dropped thing, and the summary
  assert "Dropping the image" in warnings[0]
  assert "000002.jpg" in warnings[0] and "'image'" in warnings[0]
  assert "Dropping an item" in warnings[1]
  assert "000004.json" in warnings[1] and "'item2.landmarks'" in warnings[1]
  assert warnings[2] == (f"{root}: 4 records; dropped 1 images, 1 items, 0 polygons, "
                         f"0 landmarks (see the warnings above)")

  with pytest.raises(records.DataError) as info:
    annotations.scan_raw_root(root, strict=True, num_workers=1)
  assert info.value.path == str(root / "image/000002.jpg")  # The first bad file, by image_id.


def test_scan_pool_matches_serial(tmp_path):
  files = {f"{i:06d}": (_good_anno(i, "user" if i % 2 else "shop"), _jpeg()) for i in
           range(1, 41)}
  files["000017"] = (files["000017"][0], b"")
  root = _make_root(tmp_path / "split", files)
  serial = annotations.scan_raw_root(root, num_workers=1)
  pooled = annotations.scan_raw_root(root, num_workers=2)
  assert [r.image_id for r in pooled.records] == [i for i in range(1, 41) if i != 17]
  assert pooled.skipped == serial.skipped
  assert len(pooled.skipped) == 1 and "000017.jpg" in pooled.skipped[0][0]
  for a, b in zip(serial.records, pooled.records):
    assert (a.image_id, a.source, a.pair_id, a.width) == (b.image_id, b.source, b.pair_id,
                                                          b.width)
    np.testing.assert_array_equal(a.items[1].landmarks, b.items[1].landmarks)


# --------------------------------------------------------------------------------------------
# COCO-specific rules (same validation code, COCO field names).


def _coco_fixture() -> dict:
  return json.loads((FIXTURE / "coco.json").read_text())


def _read_coco_dict(tmp_path, data, **kwargs):
  path = tmp_path / "coco.json"
  path.write_text(json.dumps(data))
  return annotations.read_coco(path, FIXTURE / "image", num_workers=1, check_image="header",
                               **kwargs, spec=DEEPFASHION2)


def _first_ann(data):
  return data["annotations"][0]  # id 3446, image 2092, trousers.


def _keypoint_outside_slice(data):
  _first_ann(data)["keypoints"][0] = 5.0  # Category 8's slice starts at 3 * 168.


def _pair_id_disagrees(data):
  data["annotations"][1]["pair_id"] = 172


def _keypoints_short(data):
  _first_ann(data)["keypoints"] = _first_ann(data)["keypoints"][:-3]


def _negative_width(data):
  _first_ann(data)["bbox"][2] = -3


def _bbox_past_border(data):
  _first_ann(data)["bbox"][3] = 290  # y2 = 707 > 702 + 1.


def _size_mismatch(data):
  image, = [i for i in data["images"] if i["id"] == 2092]
  image["width"] = 469  # 002092.jpg is 468 wide.


def _bad_source(data):
  _first_ann(data)["source"] = "consumer"


def _source_disagrees(data):
  data["annotations"][0]["source"] = "user"
  data["annotations"][1]["source"] = "shop"


def _bad_visibility(data):
  _first_ann(data)["keypoints"][3 * 168 + 2] = 1.5


COCO_RULES = {
    "keypoint outside slice": (_keypoint_outside_slice, "annotations[id=3446].keypoints"),
    "pair_id disagrees": (_pair_id_disagrees, "annotations[id=3447].pair_id"),
    "882 keypoints expected": (_keypoints_short, "annotations[id=3446].keypoints"),
    "negative width": (_negative_width, "annotations[id=3446].bbox"),
    "bbox past border": (_bbox_past_border, "annotations[id=3446].bbox"),
    "size mismatch": (_size_mismatch, "images[id=2092].width"),
    "bad source": (_bad_source, "annotations[id=3446].source"),
    "source disagrees": (_source_disagrees, "annotations[id=3447].source"),
    "bad visibility": (_bad_visibility, "annotations[id=3446].keypoints"),
}


# What each rule drops: the image (15 records left), the item (image 2092 keeps its top) or a
# landmark (every item kept).
COCO_KINDS = {
    "keypoint outside slice": "item", "pair_id disagrees": "image",
    "882 keypoints expected": "item", "negative width": "item", "bbox past border": "item",
    "size mismatch": "image", "bad source": "image", "source disagrees": "image",
    "bad visibility": "landmark",
}


@pytest.mark.parametrize("name", COCO_RULES)
def test_coco_validation_rule(tmp_path, name):
  mutate, field = COCO_RULES[name]
  data = _coco_fixture()
  assert _first_ann(data)["id"] == 3446 and _first_ann(data)["image_id"] == 2092
  mutate(data)
  with pytest.raises(records.DataError) as info:
    _read_coco_dict(tmp_path, data, strict=True)
  assert info.value.field == field
  assert info.value.path == str(tmp_path / "coco.json")
  result = _read_coco_dict(tmp_path, data)
  kind = COCO_KINDS[name]
  drop, = result.drops
  assert (drop.kind, drop.field) == (kind, field)
  assert result.counts == records.DropCounts(**{f"{kind}s": 1})
  ids = [r.image_id for r in result.records]
  assert len(ids) == (15 if kind == "image" else 16) and (2092 in ids) == (kind != "image")
  if kind != "image":
    first = result.records[0]
    assert [i.category_id for i in first.items] == ([1] if kind == "item" else [8, 1])
    assert sum(len(r.items) for r in result.records) == (28 if kind == "item" else 29)


def test_coco_image_without_annotations_skipped(tmp_path):
  data = _coco_fixture()
  data["annotations"] = [a for a in data["annotations"] if a["image_id"] != 2092]
  result = _read_coco_dict(tmp_path, data)
  assert len(result.records) == 15
  assert result.skipped == [(str(tmp_path / "coco.json"),
                             f"{tmp_path / 'coco.json'}: field 'images[id=2092]': the image "
                             "has no annotations")]


def test_coco_annotation_of_unknown_image_skipped(tmp_path):
  data = _coco_fixture()
  extra = copy.deepcopy(_first_ann(data))
  extra["id"], extra["image_id"] = 99999, 12345
  data["annotations"].append(extra)
  result = _read_coco_dict(tmp_path, data)
  assert len(result.records) == 16 and sum(len(r.items) for r in result.records) == 29
  assert result.counts == records.DropCounts(items=1)
  assert result.drops[0].field == "annotations[id=99999].image_id"


def test_coco_source_and_attributes_read(tmp_path):
  data = _coco_fixture()
  for ann in data["annotations"]:
    if ann["image_id"] == 2092:
      ann["source"] = "user"
      ann["occlusion"] = 3
  result = _read_coco_dict(tmp_path, data, strict=True)
  first = result.records[0]
  assert first.source == "user"
  assert [i.occlusion for i in first.items] == [3, 3]
  assert [i.scale for i in first.items] == [0, 0]
  assert all(r.source == "" for r in result.records[1:])


def test_coco_invalid_json_raises(tmp_path):
  path = tmp_path / "coco.json"
  path.write_text('{"images": [')
  with pytest.raises(records.DataError) as info:
    annotations.read_coco(path, FIXTURE / "image", spec=DEEPFASHION2)
  assert info.value.field == "json"
