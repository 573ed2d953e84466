import dataclasses
import logging

import numpy as np
import pytest

from data_pipeline import transforms
from data_pipeline.spec import DEEPFASHION2
from data_pipeline.transforms import ImageGeometry
from conftest import make_item, make_record

GEOM = ImageGeometry(canvas_hw=(64, 64), short_side=48, max_size=64, max_instances=3,
                     mask_size=8, spec=DEEPFASHION2)


def test_resize_scale_rules():
  g = ImageGeometry((1344, 1344), 800, 1333, 4, 28, spec=DEEPFASHION2)
  assert transforms.resize_scale(600, 400, g) == 2.0           # shorter side -> 800
  assert transforms.resize_scale(1000, 400, g) == pytest.approx(1.333)  # longer side capped
  narrow = ImageGeometry((800, 1344), 800, 1333, 4, 28, spec=DEEPFASHION2)
  assert transforms.resize_scale(1000, 400, narrow) == pytest.approx(0.8)  # canvas height
  assert transforms.resized_hw(1000, 400, 0.8, (800, 1344)) == (800, 320)


def test_rasterize_crop_left_half():
  box = np.array([10, 20, 30, 40], np.float32)  # 20 x 20 px, crop 8 x 8 -> 2.5 px per cell
  half = [np.array([[10, 20], [20, 20], [20, 40], [10, 40]], np.float32)]
  crop = transforms.rasterize_crop(half, box, 8)
  expected = np.zeros((8, 8), np.uint8)
  expected[:, :4] = 1
  np.testing.assert_array_equal(crop, expected)


def test_global_landmarks_and_flip_by_hand():
  local = np.zeros((10, 3), np.float32)  # shorts: local 1 <-> 3, 2 is the centre
  local[0] = (10, 5, 2)
  local[1] = (20, 6, 1)
  g = transforms.global_landmarks(7, local, DEEPFASHION2)
  assert g.shape == (294, 3)
  np.testing.assert_array_equal(g[158], (10, 5, 2))
  f = transforms.flip_landmarks(g, 100.0, DEEPFASHION2)
  np.testing.assert_array_equal(f[160], (90, 5, 2))  # left became right, mirrored
  np.testing.assert_array_equal(f[159], (80, 6, 1))  # centre stays the centre
  np.testing.assert_array_equal(f[158], (0, 0, 0))   # unlabelled stays zero
  np.testing.assert_array_equal(transforms.flip_landmarks(f, 100.0, DEEPFASHION2), g)


def test_flip_boxes_twice_is_identity():
  boxes = np.array([[1.5, 2, 10, 20], [0, 0, 64, 30]], np.float32)
  np.testing.assert_array_equal(transforms.flip_boxes(boxes, 64.0), [[54, 2, 62.5, 20],
                                                                     [0, 0, 64, 30]])
  np.testing.assert_array_equal(transforms.flip_boxes(transforms.flip_boxes(boxes, 64.), 64.),
                                boxes)


def _record_and_image():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (40, 32, 3), dtype=np.uint8)
  lms = np.zeros((25, 3), np.float32)
  lms[1] = (8, 10, 2)    # local 2 <-> 6
  lms[6] = (6, 30, 1)    # local 7 <-> 25
  tri = (np.array([[4, 4], [28, 6], [10, 36]], np.float32),)
  items = [make_item(1, 1, (4, 4, 28, 36), lms, tri),
           make_item(9, 0, (0, 0, 16, 20))]
  return make_record(5, items, width=32, height=40), image


def test_encode_image_shapes_and_scale():
  record, image = _record_and_image()
  out = transforms.encode_image(record, image, GEOM, flip=False)
  spec = transforms.image_spec(GEOM)
  assert set(out) == set(spec)
  for k, (shape, dtype) in spec.items():
    assert out[k].shape == shape and out[k].dtype == dtype, k
  # 32 x 40 -> shorter side 48 -> scale 1.5 -> 48 x 60 (longer 60 <= 64).
  assert out["scale"] == pytest.approx(1.5)
  np.testing.assert_array_equal(out["image_hw"], [60, 48])
  np.testing.assert_array_equal(out["orig_hw"], [40, 32])
  np.testing.assert_allclose(out["boxes"][0], [6, 6, 42, 54])
  np.testing.assert_array_equal(out["classes"], [1, 9, 0])
  np.testing.assert_array_equal(out["instance_valid"], [True, True, False])
  # Landmark index (8, 10) -> its pixel's centre (8.5, 10.5) -> x 1.5.
  np.testing.assert_allclose(out["landmarks"][0, 1], [12.75, 15.75, 2])
  assert (out["image"][60:] == 0).all() and (out["image"][:, 48:] == 0).all()
  # The second item's mask is its full box (a rectangle polygon).
  assert out["masks"][1].all() and not out["masks"][2].any()


def test_encode_flip_is_the_mirror_and_flip_twice_is_identity():
  record, image = _record_and_image()
  a = transforms.encode_image(record, image, GEOM, flip=False)
  b = transforms.encode_image(record, image, GEOM, flip=True)
  w = int(a["image_hw"][1])
  np.testing.assert_array_equal(b["image"][:, :w], a["image"][:, :w][:, ::-1])
  np.testing.assert_allclose(b["boxes"][:2], transforms.flip_boxes(a["boxes"][:2], w))
  np.testing.assert_allclose(b["landmarks"], transforms.flip_landmarks(a["landmarks"], w,
                                                                       DEEPFASHION2))
  # Local landmark 2 moved to local 6 (global 5) at the mirrored x.
  np.testing.assert_allclose(b["landmarks"][0, 5], [48 - 12.75, 15.75, 2])
  # Masks: the crop of the flipped item is the mirrored crop (up to boundary pixels).
  agree = (b["masks"][0] == a["masks"][0][:, ::-1]).mean()
  assert agree >= 0.95
  np.testing.assert_allclose(transforms.flip_boxes(b["boxes"][:2], w), a["boxes"][:2])
  np.testing.assert_allclose(transforms.flip_landmarks(b["landmarks"], w, DEEPFASHION2),
                             a["landmarks"])


def test_truncation_warns_and_keeps_first_items(caplog):
  items = [make_item(c, 0, (c, c, c + 10, c + 10)) for c in (1, 2, 3, 4, 5)]
  record = make_record(7, items, width=32, height=32)
  with caplog.at_level(logging.WARNING):
    out = transforms.encode_image(record, np.zeros((32, 32, 3), np.uint8), GEOM, False)
  np.testing.assert_array_equal(out["classes"], [1, 2, 3])
  assert any("5 items" in r.message and "max_instances=3" in r.message for r in caplog.records)


def test_paste_mask_inverts_the_crop():
  box = np.array([8, 4, 24, 20], np.float32)
  poly = [np.array([[8, 4], [24, 4], [24, 12], [8, 12]], np.float32)]  # top half of the box
  crop = transforms.rasterize_crop(poly, box, 16)
  full = transforms.paste_mask(crop, box, (32, 32))
  expected = np.zeros((32, 32), np.uint8)
  expected[4:12, 8:24] = 1
  np.testing.assert_array_equal(full, expected)


def test_batch_canvas_is_the_smallest_holding_every_image():
  geometry = ImageGeometry((64, 64), 32, 48, 3, 8, buckets=((64, 32), (32, 64)), spec=DEEPFASHION2)
  # Ties in area keep the given order; the full canvas comes last.
  assert geometry.canvases == ((64, 32), (32, 64), (64, 64))
  # (height, width): a portrait image resizes to 43x32, a landscape one to 32x43, a square one
  # to 32x32 (either bucket).
  assert transforms.batch_canvas(geometry, [(40, 30)]) == (64, 32)
  assert transforms.batch_canvas(geometry, [(30, 40), (40, 40)]) == (32, 64)
  assert transforms.batch_canvas(geometry, [(40, 40)]) == (64, 32)
  assert transforms.batch_canvas(geometry, [(40, 30), (30, 40)]) == (64, 64)
  assert transforms.batch_canvas(geometry, []) == (64, 64)
  assert transforms.batch_canvas(dataclasses.replace(geometry, buckets=()), [(40, 30)]) == (
      64, 64)
  with pytest.raises(ValueError, match="no canvas"):
    transforms.canvas_index(0)
