"""The COCO reader on a set of another taxonomy: any category ids (mapped to the spec's classes),
per-category keypoints or none, polygons and RLE masks, crowds, no pairs; and what it refuses,
in one line naming the file and the field."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipeline import annotations, convert, transforms
from data_pipeline import spec as spec_lib
from data_pipeline.records import DataError

W, H = 468, 624  # 079952.jpg of the real fixture
CATS = [{"id": 40, "name": "top", "keypoints": ["neck", "l_hem", "r_hem"]},
        {"id": 7, "name": "dress", "keypoints": []}]
SPEC_FILE = {"categories": {"top": {"flip_pairs": [["l_hem", "r_hem"]]}}}


def _write(tmp_path, anns, cats=CATS):
  path = tmp_path / "own.json"
  path.write_text(json.dumps({
      "images": [{"id": 5, "file_name": "079952.jpg", "width": W, "height": H}],
      "annotations": anns, "categories": cats}))
  extra = tmp_path / "spec.json"
  extra.write_text(json.dumps(SPEC_FILE))
  return path, spec_lib.from_coco(path, extra)


def _rle(box):
  x1, y1, x2, y2 = box
  bitmap = np.zeros((H, W), np.uint8, order="F")
  bitmap[y1:y2, x1:x2] = 1
  rle = mask_utils.encode(np.asfortranarray(bitmap))
  return {"size": [H, W], "counts": rle["counts"].decode()}


ANNS = [
    {"id": 1, "image_id": 5, "category_id": 40, "bbox": [10, 20, 100, 200],
     "segmentation": [[10, 20, 110, 20, 110, 220, 10, 220]],
     "keypoints": [50, 30, 2, 15, 200, 1, 105, 210, 2], "iscrowd": 0},
    {"id": 2, "image_id": 5, "category_id": 7, "bbox": [200, 100, 100, 300],
     "segmentation": _rle((200, 100, 300, 400)), "iscrowd": 0},
    {"id": 3, "image_id": 5, "category_id": 7, "bbox": [300, 400, 50, 50],
     "segmentation": _rle((300, 400, 350, 450)), "iscrowd": 1},
]


def test_own_taxonomy_records(tmp_path, real_fixture):
  path, spec = _write(tmp_path, ANNS)
  scan = annotations.read_coco(path, real_fixture / "image", spec=spec, strict=True,
                               num_workers=1)
  record, = scan.records
  top, dress, crowd = record.items
  assert (top.category_id, dress.category_id, crowd.category_id) == (1, 2, 2)  # classes
  assert (record.pair_id, top.style) == (-1, 0)  # no pairs in the set: not required
  np.testing.assert_array_equal(top.landmarks, [[50, 30, 2], [15, 200, 1], [105, 210, 2]])
  assert dress.landmarks.shape == (0, 3) and dress.polygons == () and dress.rle is not None
  assert (top.iscrowd, crowd.iscrowd) == (False, True)
  # The evaluation's ground truth: the set's own ids, the RLE as given, the crowd kept.
  gt = convert.to_coco(scan.records, spec)
  assert [a["category_id"] for a in gt["annotations"]] == [40, 7, 7]
  assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0, 1]
  assert gt["annotations"][1]["segmentation"] == ANNS[1]["segmentation"]
  assert gt["annotations"][0]["keypoints"] == [50, 30, 2, 15, 200, 1, 105, 210, 2]
  assert gt["categories"][0]["keypoints"] == ["neck", "l_hem", "r_hem"]
  # Training arrays: crowds left out; the RLE mask's crop is the box full (a filled rectangle);
  # the flip swaps l_hem and r_hem.
  geometry = transforms.ImageGeometry((640, 640), 624, 640, 4, 8, spec=spec)
  image = np.zeros((H, W, 3), np.uint8)
  out = transforms.encode_image(record, image, geometry, flip=False)
  assert out["instance_valid"].tolist() == [True, True, False, False]
  assert out["landmarks"].shape == (4, 3, 3)
  assert out["masks"][1].min() == 1
  flipped = transforms.encode_image(record, image, geometry, flip=True)
  nw = out["image_hw"][1]
  np.testing.assert_allclose(flipped["landmarks"][0, 1, :2],
                             [nw - out["landmarks"][0, 2, 0], out["landmarks"][0, 2, 1]])
  assert flipped["masks"][1].min() == 1


def test_rle_crop_is_the_polygon_crop(tmp_path):
  """An item's mask as an RLE crops as its polygon does (within the pixel grid's rounding)."""
  poly = np.array([[30, 40], [200, 60], [150, 300], [40, 250]], np.float64)
  rle = mask_utils.merge(mask_utils.frPyObjects([poly.reshape(-1).tolist()], H, W))
  rle = {"size": [H, W], "counts": rle["counts"].decode()}
  box = np.array([30, 40, 200, 300], np.float32)
  a = transforms.rasterize_crop([poly.astype(np.float32)], box, 28)
  b = transforms.rle_crop(rle, box, 28)
  assert (a != b).mean() < 0.03


@pytest.mark.parametrize("change, field, message", [
    (lambda a: a[0].update(category_id=3), "annotations[id=1].category_id",
     "value 3 is not a category of dataset 'own'"),
    (lambda a: a[0].update(keypoints=[1, 2, 2]), "annotations[id=1].keypoints",
     "expected 9 numbers (3 x 3 landmarks of category"),
    (lambda a: a[1].update(segmentation={"size": [10, 10], "counts": "abc"}),
     "annotations[id=2].segmentation.size", "expected [624, 468]"),
    (lambda a: a[1].update(segmentation={"size": [H, W], "counts": [1, 2]}),
     "annotations[id=2].segmentation.counts", "summing to 468 x 624"),
    (lambda a: a[0].update(iscrowd=2), "annotations[id=1].iscrowd", "outside 0..1"),
])
def test_a_bad_annotation_is_one_line_naming_the_file_and_field(tmp_path, real_fixture, change,
                                                                field, message):
  anns = json.loads(json.dumps(ANNS))
  change(anns)
  path, spec = _write(tmp_path, anns)
  with pytest.raises(DataError) as info:
    annotations.read_coco(path, real_fixture / "image", spec=spec, strict=True, num_workers=1)
  assert (info.value.path, info.value.field) == (str(path), field)
  assert message in info.value.message
  # Not strict: the item is dropped, counted; the rest is read.
  scan = annotations.read_coco(path, real_fixture / "image", spec=spec, num_workers=1)
  assert scan.counts.items == 1 and len(scan.records[0].items) == 2


def test_a_file_of_another_taxonomy_is_refused(tmp_path, real_fixture):
  path, spec = _write(tmp_path, ANNS)
  other = tmp_path / "other.json"
  other.write_text(json.dumps({"images": [], "annotations": [],
                               "categories": [{"id": 40, "name": "shirt"}] + CATS[1:]}))
  with pytest.raises(DataError) as info:
    annotations.read_coco(other, real_fixture / "image", spec=spec, num_workers=1)
  assert info.value.field == "categories[0]"
  assert "(id=40, name='shirt') is not a category of dataset 'own'" in info.value.message
