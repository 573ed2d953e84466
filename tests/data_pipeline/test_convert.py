"""Tests for data_pipeline.convert: COCO output semantics, round trips, retrieval GT, the CLI."""

import contextlib
import io
import json
import logging
import os
from pathlib import Path
import shutil

import numpy as np
from PIL import Image
from pycocotools import coco as coco_api
from pycocotools import cocoeval
import pytest

from data_pipeline import annotations
from data_pipeline import convert
from data_pipeline import deepfashion2 as df2
from data_pipeline import records
from data_pipeline.spec import DEEPFASHION2

from conftest import fixtures_dir


FIXTURE = fixtures_dir()


def _issue4() -> dict:
  return json.loads((FIXTURE / "annos_example_issue4.json").read_text())


def _blank_jpeg(path: Path, width=600, height=500):
  Image.new("RGB", (width, height), (255, 255, 255)).save(path, format="JPEG")


def _raw_root(root: Path, annos: dict) -> Path:
  """annos: stem -> annotation dict; every image is a blank 600 x 500 JPEG."""
  (root / "annos").mkdir(parents=True)
  (root / "image").mkdir(parents=True)
  for stem, anno in annos.items():
    (root / "annos" / f"{stem}.json").write_text(json.dumps(anno))
    _blank_jpeg(root / "image" / f"{stem}.jpg")
  return root


def _item(category_id, style, box, visible=(0,)):
  """A raw item: box corners, a rectangle polygon, the given landmarks visible at the center."""
  x1, y1, x2, y2 = box
  n = df2.LANDMARK_COUNTS[category_id]
  landmarks = [0] * (3 * n)
  for k in visible:
    landmarks[3 * k:3 * k + 3] = [(x1 + x2) // 2, (y1 + y2) // 2, 2]
  return {"category_id": category_id, "category_name": df2.RAW_NAMES[category_id],
          "style": style, "bounding_box": list(box), "landmarks": landmarks,
          "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
          "scale": 1, "occlusion": 2, "zoom_in": 1, "viewpoint": 3}


def _small_split() -> dict:
  """Three images of pair 7 (two user, one shop) and one shop image of pair 8."""
  return {
      "000001": {"source": "user", "pair_id": 7, "item1": _item(1, 1, (10, 20, 110, 220)),
                 "item2": _item(8, 0, (50, 200, 150, 480), visible=(0, 3))},
      "000002": {"source": "user", "pair_id": 7, "item1": _item(1, 1, (0, 0, 300, 300))},
      "000003": {"source": "shop", "pair_id": 7, "item1": _item(1, 1, (100, 100, 400, 450)),
                 "item2": _item(8, 2, (20, 30, 60, 90))},
      "000004": {"source": "shop", "pair_id": 8, "item1": _item(13, 1, (5, 5, 595, 495))},
  }


# --------------------------------------------------------------------------------------------
# The issue-4 example, by hand.


def test_issue4_by_hand(tmp_path):
  root = _raw_root(tmp_path / "validation", {"000001": _issue4()})
  out, q_path, g_path = tmp_path / "coco.json", tmp_path / "q.json", tmp_path / "g.json"
  assert convert.main(["--root", str(root), "--out", str(out), "--query_gt", str(q_path),
                       "--gallery_gt", str(g_path), "--num_workers", "1"]) == 0
  coco = json.loads(out.read_text())
  assert coco["images"] == [{"id": 1, "file_name": "000001.jpg", "width": 600, "height": 500}]
  assert [c["id"] for c in coco["categories"]] == list(range(1, 14))
  assert coco["categories"][8]["name"] == "skirt"
  assert len(coco["categories"][0]["keypoints"]) == 294
  skirt, top = coco["annotations"]

  # item1: skirt, [227, 86, 543, 455] -> w 316, h 369, area 316 * 369 = 116604.
  assert (skirt["id"], skirt["image_id"], skirt["category_id"]) == (1, 1, 9)
  assert skirt["bbox"] == [227, 86, 316, 369]
  assert skirt["area"] == 116604
  assert (skirt["pair_id"], skirt["style"], skirt["iscrowd"]) == (1811, 1, 0)
  # Category 9's 8 landmarks sit at global 182..189 = numbers 546..569 of the 882.
  raw_skirt = _issue4()["item1"]
  assert len(skirt["keypoints"]) == 882
  assert skirt["keypoints"][546:570] == raw_skirt["landmarks"]
  assert skirt["keypoints"][546:549] == [237, 160, 1]
  assert not any(skirt["keypoints"][:546]) and not any(skirt["keypoints"][570:])
  assert skirt["num_keypoints"] == 8  # v = 1, 2, 1, 2, 2, 2, 2, 2.
  assert skirt["segmentation"] == raw_skirt["segmentation"]
  assert (skirt["source"], skirt["scale"], skirt["occlusion"], skirt["zoom_in"],
          skirt["viewpoint"]) == ("shop", 2, 2, 1, 2)

  # item2: short sleeve top, [0, 0, 495, 179] -> area 495 * 179 = 88605.
  raw_top = _issue4()["item2"]
  assert (top["id"], top["category_id"], top["style"]) == (2, 1, 0)
  assert top["bbox"] == [0, 0, 495, 179]
  assert top["area"] == 88605
  assert top["keypoints"][:75] == raw_top["landmarks"]
  # Landmarks 10, 14, 15 (1-based) are labelled: (94, 58, 2), (180, 86, 2), (203, 173, 1).
  assert top["keypoints"][27:30] == [94, 58, 2]
  assert top["keypoints"][39:45] == [180, 86, 2, 203, 173, 1]
  assert top["num_keypoints"] == 3
  assert not any(top["keypoints"][75:])
  assert top["segmentation"] == raw_top["segmentation"]
  assert (top["scale"], top["occlusion"], top["zoom_in"], top["viewpoint"]) == (2, 1, 3, 2)

  # Integers stay integers in the JSON.
  for ann in coco["annotations"]:
    numbers = ann["bbox"] + ann["keypoints"] + sum(ann["segmentation"], []) + [ann["area"]]
    assert all(type(v) is int for v in numbers)

  # A shop image: no queries, two gallery items.
  assert json.loads(q_path.read_text()) == []
  assert json.loads(g_path.read_text()) == [
      {"gallery_image_id": 1, "style": 1, "pair_id": 1811, "bbox": [227, 86, 543, 455]},
      {"gallery_image_id": 1, "style": 0, "pair_id": 1811, "bbox": [0, 0, 495, 179]},
  ]


# --------------------------------------------------------------------------------------------
# The official converter's output on real data: the fixture's coco.json is that output for its
# images, so the fixture written back in the raw layout must convert to exactly it.

# The official converter keys of an annotation (its running id aside, which counts over the
# whole split there) and of an image; ours adds "source" (known in the raw layout) and nothing
# else for the fixture (no scale/occlusion/zoom_in/viewpoint in it).
_OFFICIAL_IMAGE_KEYS = ("id", "file_name", "width", "height")
_EXTRA_ANN_KEYS = {"source"}
# The item that gets a polygon point 0.2 px left of the image (within the readers' tolerance):
# the converter must keep -0.2 (the official one copies the raw polygon), training clips it.
_OUTSIDE_ANN, _OUTSIDE_POLY, _OUTSIDE_POINT = 288807, 0, 45  # image 177881, x = 0.39 there


def _official_with_outside_point() -> dict:
  official = json.loads((FIXTURE / "coco.json").read_text())
  ann, = [a for a in official["annotations"] if a["id"] == _OUTSIDE_ANN]
  assert ann["segmentation"][_OUTSIDE_POLY][2 * _OUTSIDE_POINT] == 0.39
  ann["segmentation"][_OUTSIDE_POLY][2 * _OUTSIDE_POINT] = -0.2
  return official


def _fixture_as_raw(official: dict, root: Path) -> Path:
  """The COCO fixture back in the raw layout (annos/NNNNNN.json, image/NNNNNN.jpg): the inverse
  of the official conversion, items in annotation id order, source "user" (the fixture has
  none; the official converter drops it)."""
  (root / "annos").mkdir(parents=True)
  (root / "image").mkdir()
  by_image = {}
  for ann in sorted(official["annotations"], key=lambda a: a["id"]):
    by_image.setdefault(ann["image_id"], []).append(ann)
  for image in official["images"]:
    anns = by_image[image["id"]]
    raw = {"source": "user", "pair_id": anns[0]["pair_id"]}
    for k, ann in enumerate(anns, 1):
      cat = ann["category_id"]
      x, y, w, h = ann["bbox"]
      start = 3 * df2.LANDMARK_START[cat]
      raw[f"item{k}"] = {
          "category_id": cat, "category_name": df2.RAW_NAMES[cat], "style": ann["style"],
          "bounding_box": [x, y, x + w, y + h],
          "landmarks": ann["keypoints"][start:start + 3 * df2.LANDMARK_COUNTS[cat]],
          "segmentation": ann["segmentation"]}
    stem = os.path.splitext(image["file_name"])[0]
    (root / "annos" / f"{stem}.json").write_text(json.dumps(raw))
    shutil.copy(FIXTURE / "image" / image["file_name"], root / "image" / image["file_name"])
  return root


def test_convert_equals_official_converter_on_real_items(tmp_path):
  official = _official_with_outside_point()
  root = _fixture_as_raw(official, tmp_path / "train")
  out = tmp_path / "coco.json"
  assert convert.main(["--root", str(root), "--out", str(out), "--check_image", "header",
                       "--num_workers", "1"]) == 0
  ours = json.loads(out.read_text())

  assert ours["categories"] == official["categories"]
  want_images = sorted(official["images"], key=lambda i: i["id"])
  assert [{k: i[k] for k in _OFFICIAL_IMAGE_KEYS} for i in ours["images"]] == [
      {k: i[k] for k in _OFFICIAL_IMAGE_KEYS} for i in want_images]
  want = sorted(official["annotations"], key=lambda a: (a["image_id"], a["id"]))
  assert len(ours["annotations"]) == len(want) == 29
  assert [a["id"] for a in ours["annotations"]] == list(range(1, 30))
  differ = []
  for got, expected in zip(ours["annotations"], want):
    assert set(got) - set(expected) <= _EXTRA_ANN_KEYS, sorted(got)
    assert set(expected) - set(got) == set(), sorted(expected)
    wrong = [key for key in expected if key != "id" and got[key] != expected[key]]
    if wrong:
      differ.append((expected["id"], wrong))
  assert not differ, f"{len(want) - len(differ)}/{len(want)} items equal; differ: {differ}"

  # The point outside the image is kept as annotated, and the item's box area is w * h.
  got, = [a for a, e in zip(ours["annotations"], want) if e["id"] == _OUTSIDE_ANN]
  assert got["segmentation"][_OUTSIDE_POLY][2 * _OUTSIDE_POINT] == -0.2
  assert got["area"] == got["bbox"][2] * got["bbox"][3]
  # Equal as numbers, not always as JSON text: an integral value is written as an integer
  # (the official keypoints pass through a float64 array, 237.0 there; a raw 506.0 is 506 here).


def test_training_records_clip_the_point_the_converter_keeps(tmp_path):
  root = _fixture_as_raw(_official_with_outside_point(), tmp_path / "train")
  scan = annotations.scan_raw_root(root, check_image="header", num_workers=1)
  assert len(scan.records) == 16 and scan.num_skipped == 0
  record, = [r for r in scan.records if r.image_id == 177881]
  outside = [item for item in record.items if item.unclipped is not None]
  assert len(outside) == 1  # the only item any clipping changes
  item, = outside
  assert item.raw_polygons[_OUTSIDE_POLY][_OUTSIDE_POINT, 0] == np.float32(-0.2)
  assert item.polygons[_OUTSIDE_POLY][_OUTSIDE_POINT, 0] == 0  # what training reads
  np.testing.assert_array_equal(np.delete(item.polygons[_OUTSIDE_POLY], _OUTSIDE_POINT, 0),
                                np.delete(item.raw_polygons[_OUTSIDE_POLY], _OUTSIDE_POINT, 0))
  np.testing.assert_array_equal(item.box, item.raw_box)
  assert all(i.unclipped is None for r in scan.records for i in r.items if i is not item)


# --------------------------------------------------------------------------------------------
# Round trips.


def test_real_fixture_round_trip():
  fixture = json.loads((FIXTURE / "coco.json").read_text())
  result = annotations.read_coco(FIXTURE / "coco.json", FIXTURE / "image", num_workers=1,
                                 spec=DEEPFASHION2)
  ours = convert.to_coco(result.records, DEEPFASHION2)
  assert len(ours["images"]) == 16 and len(ours["annotations"]) == 29
  assert [a["id"] for a in ours["annotations"]] == list(range(1, 30))
  assert ours["categories"] == fixture["categories"]

  want_images = sorted(fixture["images"], key=lambda i: i["id"])
  assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in ours["images"]] == [
      (i["id"], i["file_name"], i["width"], i["height"]) for i in want_images]
  want_anns = sorted(fixture["annotations"], key=lambda a: (a["image_id"], a["id"]))
  keys = ("image_id", "category_id", "bbox", "area", "keypoints", "num_keypoints",
          "segmentation", "pair_id", "style", "iscrowd")
  for got, want in zip(ours["annotations"], want_anns, strict=True):
    for key in keys:
      assert got[key] == want[key], (want["id"], key)
    assert "source" not in got and "scale" not in got  # Unknown in the fixture.
  first = ours["annotations"][0]
  assert (first["image_id"], first["bbox"], first["area"]) == (2092, [16, 417, 366, 283], 103578)


def test_raw_coco_raw_round_trip(tmp_path):
  root = _raw_root(tmp_path / "split", _small_split())
  raw = annotations.scan_raw_root(root, num_workers=1)
  path = tmp_path / "coco.json"
  path.write_text(json.dumps(convert.to_coco(raw.records, DEEPFASHION2)))
  back = annotations.read_coco(path, root / "image", num_workers=1, spec=DEEPFASHION2)
  assert back.num_skipped == 0
  assert len(back.records) == len(raw.records) == 4
  for a, b in zip(raw.records, back.records):
    assert (a.image_id, a.source, a.pair_id, a.width, a.height, a.image_path) == (
        b.image_id, b.source, b.pair_id, b.width, b.height, b.image_path)
    for ia, ib in zip(a.items, b.items, strict=True):
      assert (ia.category_id, ia.style, ia.scale, ia.occlusion, ia.zoom_in, ia.viewpoint) == (
          ib.category_id, ib.style, ib.scale, ib.occlusion, ib.zoom_in, ib.viewpoint)
      np.testing.assert_array_equal(ia.box, ib.box)
      np.testing.assert_array_equal(ia.landmarks, ib.landmarks)
      for pa, pb in zip(ia.polygons, ib.polygons, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_non_integer_values_kept():
  item = records.Item(category_id=9, style=1,
                      box=np.array([10.5, 20, 30.25, 40], np.float32),
                      landmarks=np.zeros([8, 3], np.float32),
                      polygons=(np.array([[1.5, 2], [3, 4], [5, 6.75]], np.float32),))
  record = records.ImageRecord(image_id=3, image_path="", width=100, height=100, source="",
                               pair_id=-1, items=(item,))
  ann, = convert.to_coco([record], DEEPFASHION2)["annotations"]
  assert ann["bbox"] == [10.5, 20, 19.75, 20]
  assert ann["area"] == 395.0
  assert ann["segmentation"] == [[1.5, 2, 3, 4, 5, 6.75]]
  assert ann["num_keypoints"] == 0 and ann["pair_id"] == -1
  assert convert.to_coco([record], DEEPFASHION2)["images"][0]["file_name"] == "000003.jpg"


# --------------------------------------------------------------------------------------------
# pycocotools.


def test_pycocotools_loads_output(tmp_path):
  root = _raw_root(tmp_path / "split", _small_split())
  out = tmp_path / "coco.json"
  assert convert.main(["--root", str(root), "--out", str(out), "--num_workers", "1"]) == 0
  with contextlib.redirect_stdout(io.StringIO()):
    gt = coco_api.COCO(str(out))
  assert sorted(gt.getImgIds()) == [1, 2, 3, 4]
  assert gt.getCatIds() == list(range(1, 14))
  assert len(gt.getAnnIds()) == 6
  assert gt.getAnnIds(imgIds=[1]) == [1, 2]
  assert gt.getAnnIds(imgIds=[3]) == [4, 5]
  assert gt.getAnnIds(catIds=[8]) == [2, 5]
  ann2, = gt.loadAnns([2])
  # Trousers (50, 200, 150, 480) -> xywh (50, 200, 100, 280), area 28000, 2 labelled landmarks.
  assert (ann2["image_id"], ann2["category_id"], ann2["bbox"], ann2["area"]) == (
      1, 8, [50, 200, 100, 280], 28000)
  assert ann2["num_keypoints"] == 2
  assert gt.loadImgs([4])[0]["width"] == 600
  mask = gt.annToMask(gt.loadAnns([6])[0])  # Sling dress, rectangle 5..595 x 5..495.
  assert mask.shape == (500, 600)
  assert abs(int(mask.sum()) - 590 * 490) < 2 * (590 + 490)

  # GT evaluated against itself (score 1) is perfect box AP.
  dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"],
           "score": 1.0} for a in gt.loadAnns(gt.getAnnIds())]
  with contextlib.redirect_stdout(io.StringIO()):
    evaluator = cocoeval.COCOeval(gt, gt.loadRes(dets), "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
  assert evaluator.stats[0] == pytest.approx(1.0)


# --------------------------------------------------------------------------------------------
# Retrieval GT.


def test_retrieval_gt_small_split(tmp_path):
  root = _raw_root(tmp_path / "split", _small_split())
  queries, gallery = convert.retrieval_gt(annotations.scan_raw_root(root, num_workers=1).records)
  assert queries == [
      {"query_image_id": 1, "style": 1, "cls": 1, "pair_id": 7, "bbox": [10, 20, 110, 220]},
      {"query_image_id": 1, "style": 0, "cls": 8, "pair_id": 7, "bbox": [50, 200, 150, 480]},
      {"query_image_id": 2, "style": 1, "cls": 1, "pair_id": 7, "bbox": [0, 0, 300, 300]},
  ]
  assert gallery == [
      {"gallery_image_id": 3, "style": 1, "pair_id": 7, "bbox": [100, 100, 400, 450]},
      {"gallery_image_id": 3, "style": 2, "pair_id": 7, "bbox": [20, 30, 60, 90]},
      {"gallery_image_id": 4, "style": 1, "pair_id": 8, "bbox": [5, 5, 595, 495]},
  ]


def test_retrieval_gt_skips_unknown_source(caplog):
  result = annotations.read_coco(FIXTURE / "coco.json", FIXTURE / "image", num_workers=1,
                                 check_image="header", spec=DEEPFASHION2)
  caplog.set_level(logging.INFO)
  assert convert.retrieval_gt(result.records) == ([], [])
  assert any("16 images with unknown source" in r.getMessage() for r in caplog.records)


# --------------------------------------------------------------------------------------------
# The CLI with bad files.


def test_cli_skips_or_fails_on_bad_files(tmp_path, caplog):
  split = _small_split()
  split["000002"]["item1"]["landmarks"].append(0)
  root = _raw_root(tmp_path / "split", split)
  out = tmp_path / "out" / "coco.json"
  caplog.set_level(logging.INFO)
  assert convert.main(["--root", str(root), "--out", str(out), "--num_workers", "1"]) == 0
  coco = json.loads(out.read_text())
  # Image 2's only item is dropped; the image stays, without annotations (its detections are
  # then false positives, not unscored).
  assert [i["id"] for i in coco["images"]] == [1, 2, 3, 4]
  assert [a["id"] for a in coco["annotations"]] == [1, 2, 3, 4, 5]
  assert [a["image_id"] for a in coco["annotations"]] == [1, 1, 3, 3, 4]
  messages = [r.getMessage() for r in caplog.records]
  assert any("Dropping an item" in m and "000002.json" in m and "item1.landmarks" in m
             for m in messages)
  assert any(m.endswith("4 records; dropped 0 images, 1 items, 0 polygons, 0 landmarks (see "
                        "the warnings above); 1 images kept with no item left")
             for m in messages)
  assert any("5 annotations (dropped as invalid: 0 images, 1 items" in m for m in messages)

  strict_out = tmp_path / "strict.json"
  assert convert.main(["--root", str(root), "--out", str(strict_out), "--strict",
                       "--num_workers", "1"]) == 1
  assert not strict_out.exists()


def test_cli_on_an_empty_split_fails_and_writes_nothing(tmp_path, caplog):
  root = tmp_path / "empty"
  (root / "annos").mkdir(parents=True)
  (root / "image").mkdir()
  out = tmp_path / "coco.json"
  assert convert.main(["--root", str(root), "--out", str(out), "--num_workers", "1"]) == 1
  assert not out.exists()
  assert any("No readable image" in r.getMessage() and str(root) in r.getMessage()
             for r in caplog.records)


def test_synthetic_split_converts_for_pycocotools_and_retrieval(tmp_path):
  from pycocotools.coco import COCO
  from data_pipeline import synthetic
  synthetic.generate(tmp_path / "syn", train_pairs=0, val_pairs=6, image_size=96, seed=1)
  out, q, g = tmp_path / "val.json", tmp_path / "q.json", tmp_path / "g.json"
  assert convert.main(["--root", str(tmp_path / "syn" / "validation"), "--out", str(out),
                       "--query_gt", str(q), "--gallery_gt", str(g)]) == 0
  coco = COCO(str(out))
  assert len(coco.getImgIds()) == 12
  anns = coco.loadAnns(coco.getAnnIds())
  assert all(a["area"] == a["bbox"][2] * a["bbox"][3] for a in anns)
  assert all(coco.annToMask(a).sum() > 0 for a in anns)
  queries, gallery = json.loads(q.read_text()), json.loads(g.read_text())
  assert len(queries) + len(gallery) == len(anns)
  # Every pair_id's shop image holds a gallery item matching some style > 0 query item.
  positives = {(x["pair_id"], x["style"]) for x in queries if x["style"] > 0}
  shop_keys = {(x["pair_id"], x["style"]) for x in gallery}
  assert {p for p, _ in positives & shop_keys} == set(range(1, 7))
