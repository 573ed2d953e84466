"""Tests for df2_jax.masks: detectron2's mask pasting, region-only RLE encoding."""

import cv2
import numpy as np
from pycocotools import mask as mask_utils
import pytest

from data_pipeline import transforms
from df2_jax import masks

# pycocotools' mask.decode trips a NumPy 2 copy-keyword deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

S = 28


def _reference_values(soft, box, image_hw):
  """detectron2's pasted values over the whole image, per pixel, in float64.

  ``_do_paste_mask`` without skip_empty: every pixel centre normalised to the box, then
  ``F.grid_sample(align_corners=False)`` bilinear with zeros padding written out as its four
  corners (torch's formula, not the module's separable one).
  """
  h, w = image_hw
  size = soft.shape[0]
  x0, y0, x1, y1 = (float(v) for v in box)
  gx = (np.arange(w) + 0.5 - x0) / (x1 - x0) * 2 - 1
  gy = (np.arange(h) + 0.5 - y0) / (y1 - y0) * 2 - 1
  ix = ((gx + 1) * size - 1) / 2  # grid_sampler_unnormalize, align_corners=False
  iy = ((gy + 1) * size - 1) / 2
  ix, iy = np.meshgrid(ix, iy)  # [h, w]
  x_w, y_n = np.floor(ix), np.floor(iy)
  x_e, y_s = x_w + 1, y_n + 1
  out = np.zeros((h, w))
  for cx, cy, weight in ((x_w, y_n, (x_e - ix) * (y_s - iy)), (x_e, y_n, (ix - x_w) * (y_s - iy)),
                         (x_w, y_s, (x_e - ix) * (iy - y_n)), (x_e, y_s, (ix - x_w) * (iy - y_n))):
    inside = (cx >= 0) & (cx < size) & (cy >= 0) & (cy < size)
    value = soft[np.clip(cy, 0, size - 1).astype(int), np.clip(cx, 0, size - 1).astype(int)]
    out += np.where(inside, value * weight, 0.0)
  return out


def _soft_ellipse(a=0.8, b=0.55, cx=0.1, cy=-0.05, sharpness=6.0):
  """[S, S] float32 soft ellipse: sigmoid of a signed distance, in the box frame [-1, 1]^2."""
  c = (np.arange(S) + 0.5) / S * 2 - 1
  y, x = np.meshgrid(c, c, indexing="ij")
  d = np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2) - 1
  return (1 / (1 + np.exp(sharpness * d))).astype(np.float32)


def _full(region, top_left, image_hw):
  out = np.zeros(image_hw, bool)
  top, left = top_left
  out[top:top + region.shape[0], left:left + region.shape[1]] = region
  return out


def _encode(full):
  rle = mask_utils.encode(np.asfortranarray(full.astype(np.uint8)))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("utf-8")}


BOXES = [
    (100.3, 50.8, 110.3, 57.8),      # small: 10 x 7 px
    (37.25, 81.6, 357.25, 501.6),    # large: 320 x 420 px
    (-40.7, 300.2, 129.9, 660.4),    # partly outside, left and bottom
    (700.1, -20.35, 830.6, 90.5),    # partly outside, right and top
    (5.5, 6.5, 33.5, 34.5),          # 28 x 28 px on half-integers: pixel centres on cell centres
    (200.9, 200.1, 201.4, 200.4),    # smaller than a pixel
    (-90.0, -50.0, -10.0, -5.0),     # entirely outside
]


@pytest.mark.parametrize("box", BOXES)
def test_paste_matches_detectron2_reference(box):
  """The region's mask equals detectron2's (thresholded full-image values) everywhere."""
  image_hw = (600, 800)
  for soft in (_soft_ellipse(), _soft_ellipse(0.5, 1.1, -0.2, 0.3, 12.0)):
    region, top_left = masks.paste_mask_region(soft, box, image_hw)
    assert region.dtype == bool
    ref = _reference_values(soft.astype(np.float64), box, image_hw)
    np.testing.assert_array_equal(_full(region, top_left, image_hw), ref >= 0.5)
    # Region only: detectron2's CPU region, the box plus one pixel, clipped to the image.
    top, left = top_left
    x0, y0, x1, y1 = box
    if region.size:
      assert left >= max(np.floor(x0) - 1, 0) and top >= max(np.floor(y0) - 1, 0)
      assert left + region.shape[1] <= min(np.ceil(x1) + 1, 800)
      assert top + region.shape[0] <= min(np.ceil(y1) + 1, 600)


def test_paste_random_soft_masks_match_reference():
  """Arbitrary soft masks and boxes; the values beyond the box (half a cell of bilinear share
  outside it, zeros padding) are nonzero in the reference but never reach 0.5."""
  rng = np.random.default_rng(0)
  image_hw = (120, 90)
  outside_nonzero = 0
  for _ in range(40):
    soft = rng.random((S, S)).astype(np.float32)
    bw, bh = rng.uniform(2, 150, 2)
    x0, y0 = rng.uniform(-bw / 2, 90 - bw / 2), rng.uniform(-bh / 2, 120 - bh / 2)
    box = np.float32([x0, y0, x0 + bw, y0 + bh])
    region, top_left = masks.paste_mask_region(soft, box, image_hw)
    ref = _reference_values(soft.astype(np.float64), box, image_hw)
    np.testing.assert_array_equal(_full(region, top_left, image_hw), ref >= 0.5)
    cx = np.arange(90) + 0.5
    cy = np.arange(120) + 0.5
    outside = ~(((cy >= box[1]) & (cy <= box[3]))[:, None] & ((cx >= box[0]) & (cx <= box[2])))
    outside_nonzero += int((ref[outside] > 0).sum())
  assert outside_nonzero > 0  # the reference does give pixels outside the box a share


def test_paste_all_ones_reaches_box_edges():
  """A constant 1 mask covers the pixels whose centres lie in the box; a centre exactly on the
  box edge samples half a border cell (0.5, kept by >= 0.5), up to float rounding."""
  image_hw = (40, 50)
  box = (10.5, 5.2, 30.5, 25.9)
  region, top_left = masks.paste_mask_region(np.ones((S, S), np.float32), box, image_hw)
  got = _full(region, top_left, image_hw)
  ref = _reference_values(np.ones((S, S)), box, image_hw)
  differ = got != (ref >= 0.5)
  assert np.all(np.abs(ref[differ] - 0.5) < 1e-9)  # only exact ties can round either way
  assert got[6:26, 11:30].all() and not got[:, :10].any() and not got[:, 31:].any()
  assert not got[:5].any() and not got[26:].any()


@pytest.mark.parametrize("box", [(10.0, 10.0, 10.0, 20.0), (10.0, 20.0, 30.0, 5.0),
                                 (np.nan, 1.0, 5.0, 6.0)])
def test_degenerate_box_is_empty(box):
  region, _ = masks.paste_mask_region(_soft_ellipse(), box, (30, 40))
  assert not region.any()
  rle = masks.paste_masks_rle(_soft_ellipse()[None], np.array([box]), (30, 40))[0]
  assert rle == _encode(np.zeros((30, 40), bool))


def test_perfect_prediction_iou_bilinear_beats_nearest():
  """A perfect 28 x 28 prediction of a 320 x 420 px polygon: detectron2's pasting reaches IoU
  about 0.99 with the polygon's COCO mask, nearest-neighbour pasting of the thresholded crop
  (the old path) about 0.966."""
  image_hw = (600, 800)
  poly = np.array([[0, 60], [90, 0], [130, 25], [190, 25], [230, 0], [320, 60], [285, 140],
                   [250, 120], [255, 420], [65, 420], [70, 120], [35, 140]], np.float64)
  poly += (203.37, 91.71)  # a T-shirt, box 320 x 420 px at fractional coordinates
  (x0, y0), (x1, y1) = poly.min(0), poly.max(0)
  box = (x0, y0, x1, y1)
  # The perfect soft prediction: the fraction of each cell the polygon covers (16 x 16 points
  # a cell; cv2 fills the points, at pixel centres, inside the polygon).
  fine = S * 16
  points = ((poly - (x0, y0)) * (fine / (x1 - x0), fine / (y1 - y0)) - 0.5) * 16
  canvas = np.zeros((fine, fine), np.uint8)
  cv2.fillPoly(canvas, [np.round(points).astype(np.int32)], 1, shift=4)
  soft = canvas.reshape(S, 16, S, 16).mean(axis=(1, 3))

  gt = mask_utils.decode(mask_utils.frPyObjects([poly.ravel().tolist()], *image_hw)[0]) > 0
  new = mask_utils.decode(masks.paste_masks_rle(soft[None], np.array([box]), image_hw)[0]) > 0
  nearest = transforms.paste_mask((soft >= 0.5).astype(np.uint8), np.array(box), image_hw) > 0

  def iou(a, b):
    return (a & b).sum() / (a | b).sum()

  iou_new, iou_nearest = iou(new, gt), iou(nearest, gt)
  assert iou_new > iou_nearest, (iou_new, iou_nearest)
  assert iou_new == pytest.approx(0.989, abs=0.004), iou_new
  assert iou_nearest == pytest.approx(0.966, abs=0.006), iou_nearest


def _region_cases():
  rng = np.random.default_rng(1)
  cases = []
  for _ in range(150):
    img_h, img_w = (int(v) for v in rng.integers(1, 25, 2))
    h, w = int(rng.integers(0, img_h + 1)), int(rng.integers(0, img_w + 1))
    top, left = int(rng.integers(0, img_h - h + 1)), int(rng.integers(0, img_w - w + 1))
    region = rng.random((h, w)) < rng.choice([0.05, 0.5, 0.95])
    cases.append((region, (top, left), (img_h, img_w)))
  ones = lambda h, w: np.ones((h, w), bool)  # noqa: E731
  cases += [
      (np.zeros((0, 0), bool), (0, 0), (7, 9)),            # empty region
      (np.zeros((4, 5), bool), (2, 3), (7, 9)),            # region without foreground
      (ones(7, 9), (0, 0), (7, 9)),                        # the full image
      (ones(7, 3), (0, 4), (7, 9)),                        # full-height columns: runs join
      (ones(3, 9), (4, 0), (7, 9)),                        # bottom rows, every column
      (ones(1, 1), (6, 8), (7, 9)),                        # last pixel: ends on a run of ones
      (ones(1, 1), (0, 0), (7, 9)),                        # first pixel: counts start with 0
      (np.eye(7, 9, dtype=bool), (0, 0), (7, 9)),          # touching every border
  ]
  return cases


def test_region_to_rle_equals_pycocotools_encode():
  for region, top_left, image_hw in _region_cases():
    full = _full(region, top_left, image_hw)
    rle = masks.region_to_rle(region, top_left, image_hw)
    assert rle == _encode(full), (region.shape, top_left, image_hw)
    decoded = mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()})
    np.testing.assert_array_equal(decoded, full)


def test_region_to_rle_rejects_regions_outside_the_image():
  with pytest.raises(ValueError):
    masks.region_to_rle(np.ones((3, 3), bool), (5, 0), (7, 9))


def test_paste_masks_rle_matches_full_image_encoding():
  rng = np.random.default_rng(2)
  image_hw = (90, 130)
  soft = np.stack([_soft_ellipse(), rng.random((S, S)), _soft_ellipse(0.4, 0.9, 0.0, 0.0, 20.0),
                   np.ones((S, S))]).astype(np.float32)
  boxes = np.float32([[3.2, 4.1, 60.7, 80.3], [-10.0, 30.5, 40.0, 95.0],
                      [100.25, 0.0, 130.0, 89.9], [0.0, 0.0, 130.0, 90.0]])
  rles = masks.paste_masks_rle(soft, boxes, image_hw)
  assert len(rles) == 4
  for s, box, rle in zip(soft, boxes, rles):
    expected = _reference_values(s.astype(np.float64), box, image_hw) >= 0.5
    assert rle == _encode(expected)
  assert masks.paste_masks_rle(np.zeros((0, S, S)), np.zeros((0, 4)), image_hw) == []
