"""Landmark coordinates on the real fixtures: annotated pixel indices load as pixel centres
(+ 0.5, detectron2's load), flip to the mirror pixel, and export back to the annotated indices
(- 0.5, detectron2's export) through both exporters (evaluation results and predict)."""

import numpy as np
import pytest

from conftest import fixtures_dir
from data_pipeline import annotations, convert, draw, images, transforms
from data_pipeline import deepfashion2 as df2
from data_pipeline.spec import DEEPFASHION2
from df2_jax.evaluation import results


@pytest.fixture(scope="module")
def fixture_records():
  root = fixtures_dir()
  if not (root / "coco.json").exists():
    pytest.fail(f"Real DeepFashion2 fixtures not found at {root}; set DF2_FIXTURES.")
  scan = annotations.read_coco(root / "coco.json", root / "image", num_workers=1,
                               check_image="header", spec=DEEPFASHION2)
  assert scan.num_skipped == 0 and len(scan.records) == 16
  return scan.records


def _record(records, image_id):
  return next(r for r in records if r.image_id == image_id)


def _same_size(record, max_instances=4):
  """No resize: the canvas is the image (scale exactly 1)."""
  h, w = record.height, record.width
  return transforms.ImageGeometry((h, w), min(h, w), max(h, w), max_instances, 8, spec=DEEPFASHION2)


def _labelled(record):
  """(item k, global slot, x, y, v) of every labelled landmark, as annotated (indices)."""
  for k, item in enumerate(record.items):
    start = df2.LANDMARK_START[item.category_id]
    for i, (x, y, v) in enumerate(item.raw_landmarks):
      if v > 0:
        yield k, start + i, float(x), float(y), float(v)


def test_to_continuous_by_hand():
  local = np.float32([[0, 0, 2], [467, 701, 1], [468, 3, 2], [0, 0, 0], [7, 9, 0]])
  got = transforms.landmarks_to_continuous(local, 468, 702)
  # Pixel 0 -> 0.5, the last pixel 467 -> 467.5; an index on the far border (x = W, inside the
  # readers' tolerance) stays on it; unlabelled points are left as they are.
  np.testing.assert_array_equal(got, [[0.5, 0.5, 2], [467.5, 701.5, 1], [468, 3.5, 2],
                                      [0, 0, 0], [7, 9, 0]])
  np.testing.assert_array_equal(transforms.landmarks_to_pixel_indices(got[:2, :2]),
                                local[:2, :2])
  # Flipping pixel centres of width 468: index 0 -> 467, 467 -> 0 (the mirror pixels).
  flipped = transforms.flip_landmarks(transforms.global_landmarks(9, np.concatenate(
      [got[:2], np.zeros((6, 3), np.float32)]), DEEPFASHION2), 468.0, DEEPFASHION2)
  skirt = flipped[df2.landmark_slice(9)]
  # Skirt pairs 1-3, 4-8, 5-7: local 1 lands in slot 3, local 2 (the centre) stays.
  np.testing.assert_array_equal(skirt[2], [467.5, 0.5, 2])
  np.testing.assert_array_equal(skirt[1], [0.5, 701.5, 1])
  np.testing.assert_array_equal(transforms.landmarks_to_pixel_indices(skirt[[2, 1], :2]),
                                [[467, 0], [0, 701]])


def test_real_landmark_loads_as_pixel_centre_and_flips_into_its_partner(fixture_records):
  """002092.jpg (468 x 702), trousers landmark 1 at pixel (102, 426), occluded; resized by
  exactly 0.5 (234 x 351)."""
  record = _record(fixture_records, 2092)
  trousers = record.items[0]
  assert trousers.category_id == 8
  np.testing.assert_array_equal(trousers.landmarks[0], [102, 426, 1])
  image = images.load_image(record.image_path)
  geometry = transforms.ImageGeometry((352, 352), 234, 400, 4, 8, spec=DEEPFASHION2)
  a = transforms.encode_image(record, image, geometry, flip=False)
  b = transforms.encode_image(record, image, geometry, flip=True)
  np.testing.assert_array_equal(a["image_hw"], [351, 234])
  start = df2.LANDMARK_START[8]
  # Unflipped: (102 + 0.5, 426 + 0.5) * 0.5, in its own slot.
  np.testing.assert_array_equal(a["landmarks"][0, start], [51.25, 213.25, 1])
  # Flipped: trousers pair 1-3, so slot 3 holds 234 - 51.25 = (468 - 102.5) * 0.5.
  assert tuple(df2.FLIP_PAIRS[8][0]) == (1, 3)
  assert df2.FLIP_PERM[start] == start + 2
  np.testing.assert_array_equal(b["landmarks"][0, start + 2], [182.75, 213.25, 1])
  # Back in the original's pixels: 182.75 / 0.5 - 0.5 = 365 = 468 - 1 - 102, the mirror pixel.
  x = transforms.landmarks_to_pixel_indices(b["landmarks"][0, start + 2, :2] / 0.5)
  np.testing.assert_array_equal(x, [365, 426])
  # Every labelled landmark of the image, both ways.
  for k, slot, x, y, v in _labelled(record):
    np.testing.assert_array_equal(a["landmarks"][k, slot], [(x + 0.5) / 2, (y + 0.5) / 2, v])
    np.testing.assert_array_equal(b["landmarks"][k, df2.FLIP_PERM[slot]],
                                  [234 - (x + 0.5) / 2, (y + 0.5) / 2, v])
  # Unlabelled slots and other categories' slots stay zero, flipped or not.
  for out in (a, b):
    assert not out["landmarks"][out["landmarks"][..., 2] == 0].any()


def test_flip_round_trip_on_every_fixture_image(fixture_records):
  """At scale 1 on all 16 images: the flipped array holds W - (x + 0.5) in the partner's slot,
  which is the pixel index W - 1 - x exactly and shows the annotated pixel of the mirrored
  image; flipping the flipped array again gives the unflipped one exactly."""
  checked = 0
  for record in fixture_records:
    image = images.load_image(record.image_path)
    geometry = _same_size(record)
    a = transforms.encode_image(record, image, geometry, flip=False)
    b = transforms.encode_image(record, image, geometry, flip=True)
    h, w = record.height, record.width
    assert a["scale"] == 1.0 and b["scale"] == 1.0
    np.testing.assert_array_equal(transforms.flip_landmarks(b["landmarks"], w, DEEPFASHION2),
                                  a["landmarks"])
    np.testing.assert_array_equal(transforms.flip_landmarks(a["landmarks"], w, DEEPFASHION2),
                                  b["landmarks"])
    for k, slot, x, y, v in _labelled(record):
      x, y = min(max(x, 0), w - 1), min(max(y, 0), h - 1)  # in the image (all are, here)
      np.testing.assert_array_equal(a["landmarks"][k, slot], [x + 0.5, y + 0.5, v])
      partner = df2.FLIP_PERM[slot]
      np.testing.assert_array_equal(b["landmarks"][k, partner], [w - (x + 0.5), y + 0.5, v])
      xi, yi = transforms.landmarks_to_pixel_indices(b["landmarks"][k, partner, :2])
      assert (xi, yi) == (w - 1 - x, y)
      np.testing.assert_array_equal(b["image"][int(yi), int(xi)], image[int(y), int(x)])
      checked += 1
  assert checked == sum(int((i.raw_landmarks[:, 2] > 0).sum())
                        for r in fixture_records for i in r.items) == 474


@pytest.mark.parametrize("flip", [False, True])
def test_loaded_landmarks_export_as_the_annotated_indices(fixture_records, flip):
  """A prediction equal to the loaded (continuous, canvas) landmarks exports through
  ``results.image_results`` as the annotation's integer indices: exactly at scale 1 and at the
  exact scale 0.5, to float32 rounding at another scale. Flipped predictions, flipped back on
  the canvas first, export the same."""
  gt = convert.to_coco(fixture_records, DEEPFASHION2)
  gt_kps = {a["id"]: np.asarray(a["keypoints"], np.float32).reshape(-1, 3)
            for a in gt["annotations"]}
  ann_ids = iter(a["id"] for a in gt["annotations"])
  for record in fixture_records:
    image = images.load_image(record.image_path)
    exact_half = transforms.ImageGeometry((record.height // 2 + 1, record.width // 2 + 1),
                                          min(record.height, record.width) / 2, 10_000, 4, 8,
                                          spec=DEEPFASHION2)
    other = transforms.ImageGeometry((512, 512), 333, 512, 4, 8, spec=DEEPFASHION2)
    ids = [next(ann_ids) for _ in record.items]
    for geometry, atol in ((_same_size(record), 0.0), (exact_half, 0.0), (other, 2e-3)):
      enc = transforms.encode_image(record, image, geometry, flip=flip)
      nh, nw = (int(v) for v in enc["image_hw"])
      if geometry is exact_half and (2 * nh, 2 * nw) != (record.height, record.width):
        atol = 2e-3  # an odd side: the scale is not exactly 0.5
      lms = enc["landmarks"]
      if flip:
        lms = transforms.flip_landmarks(lms, nw, DEEPFASHION2)
      n = len(record.items)
      res = results.image_results(
          record.image_id, enc["boxes"][:n], np.linspace(0.9, 0.5, n).astype(np.float32),
          enc["classes"][:n], np.ones(n, bool), enc["image_hw"], enc["orig_hw"], None, lms[:n],
          spec=DEEPFASHION2)
      assert res.keypoint_rows.tolist() == list(range(n))
      for j, (item, ann_id) in enumerate(zip(record.items, ids)):
        count = df2.LANDMARK_COUNTS[item.category_id]
        want = gt_kps[ann_id][df2.landmark_slice(item.category_id)]
        np.testing.assert_array_equal(want, item.raw_landmarks)  # GT: the raw indices
        labelled = want[:, 2] > 0
        np.testing.assert_allclose(res.keypoints[j, :count][labelled], want[labelled, :2],
                                   rtol=0, atol=atol)
        assert not res.keypoints[j, count:].any()  # the zero padding stays zero


def test_predict_exports_the_annotated_indices(fixture_records, tmp_path):
  """predict's exporter: detections equal to 002092.jpg's loaded items (canvas 0.5) give
  keypoint entries holding the annotated indices in the category's slice, zeros elsewhere."""
  from df2_jax import postprocess, predict  # jax: only this test needs it
  record = _record(fixture_records, 2092)
  image = images.load_image(record.image_path)
  geometry = transforms.ImageGeometry((352, 352), 234, 400, 4, 8, spec=DEEPFASHION2)
  enc = transforms.encode_image(record, image, geometry, flip=False)
  m = geometry.max_instances
  lms = enc["landmarks"].copy()
  lms[..., 2] = np.where(df2.CATEGORY_LANDMARK_MASK[enc["classes"]], 0.9, 0.0)  # scores
  out = dict(boxes=enc["boxes"], scores=np.linspace(0.9, 0.6, m).astype(np.float32),
             classes=enc["classes"], valid=enc["instance_valid"],
             masks=enc["masks"].astype(np.float32), landmarks=lms,
             embeddings=np.zeros((m, 4), np.float32))
  found = {"images": [], "bbox": [], "segm": [], "keypoints": [], "embeddings": {}}
  result = postprocess.image_detections(out, enc["image_hw"], image.shape[:2],
                                        spec=DEEPFASHION2)
  predict._add_image(found, record.image_id, ("002092.jpg", "002092.png"), image, result,
                     str(tmp_path), 0.3, DEEPFASHION2)
  assert (tmp_path / "002092.png").exists()
  assert len(found["keypoints"]) == len(record.items) == 2
  for entry, item in zip(found["keypoints"], record.items):
    kps = np.asarray(entry["keypoints"]).reshape(-1, 3)
    sl = df2.landmark_slice(item.category_id)
    labelled = item.raw_landmarks[:, 2] > 0
    np.testing.assert_array_equal(kps[sl][labelled, :2], item.raw_landmarks[labelled, :2])
    assert (kps[sl, 2] == 2).all()
    outside = np.ones(df2.NUM_LANDMARKS, bool)
    outside[sl] = False
    assert not kps[outside].any()


def test_drawn_landmark_sits_on_its_pixel():
  """Drawing takes continuous coordinates: (10.5, 20.5), the centre of pixel (10, 20), is drawn
  as a disc centred on that pixel (columns 6..14, rows 16..24)."""
  lms = np.zeros((1, df2.NUM_LANDMARKS, 3), np.float32)
  lms[0, 0] = (10.5, 20.5, 2)
  out = draw.draw_instances(np.zeros((80, 80, 3), np.uint8), np.float32([[40, 40, 60, 60]]),
                            np.int32([1]), landmarks=lms)
  ys, xs = np.nonzero(out[:35, :35].any(-1))
  assert (xs.min(), xs.max(), ys.min(), ys.max()) == (6, 14, 16, 24)
