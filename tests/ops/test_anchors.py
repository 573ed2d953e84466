"""Tests for df2_jax.ops.anchors (detectron2 DefaultAnchorGenerator)."""

import math

import numpy as np

from df2_jax.ops import anchors as anchor_ops


def test_feature_sizes_and_counts_64x96():
  assert anchor_ops.feature_sizes((64, 96)) == [
      (16, 24), (8, 12), (4, 6), (2, 3), (1, 2)]
  # 16*24*3, 8*12*3, 4*6*3, 2*3*3, 1*2*3.
  assert anchor_ops.num_anchors_per_level((64, 96)) == [1152, 288, 72, 18, 6]
  levels = anchor_ops.fpn_anchors((64, 96))
  assert [a.shape for a in levels] == [(1152, 4), (288, 4), (72, 4), (18, 4),
                                       (6, 4)]
  assert all(a.dtype == np.float32 for a in levels)


def test_ceil_feature_sizes_for_non_divisible_canvas():
  assert anchor_ops.feature_sizes((100, 70), (4, 64)) == [(25, 18), (2, 2)]


def test_first_p2_anchors_hand_values():
  p2 = anchor_ops.fpn_anchors((64, 96))[0]
  r = math.sqrt(2.) * 16.  # size 32, ratio 0.5: w = sqrt(1024 / 0.5) = 45.25
  expected = np.array([
      [-r, -r / 2, r, r / 2],          # (y=0, x=0), ratio 0.5: h = w / 2
      [-16., -16., 16., 16.],          # ratio 1
      [-r / 2, -r, r / 2, r],          # ratio 2: h = 2 w
      [4. - r, -r / 2, 4. + r, r / 2],  # (y=0, x=1): centre x = 4
  ])
  np.testing.assert_allclose(p2[:4], expected, rtol=1e-6)
  # (y=1, x=0) comes after the 24 positions of row 0: centre y = 4.
  np.testing.assert_allclose(p2[24 * 3 + 1], [-16., -12., 16., 20.])
  # Last anchor: (y=15, x=23), ratio 2, centre (92, 60).
  np.testing.assert_allclose(p2[-1], [92. - r / 2, 60. - r, 92. + r / 2,
                                      60. + r], rtol=1e-6)


def test_p6_anchors_and_areas():
  p6 = anchor_ops.fpn_anchors((64, 96))[4]
  np.testing.assert_allclose(p6[1], [-256., -256., 256., 256.])
  np.testing.assert_allclose(p6[4], [64. - 256., -256., 64. + 256., 256.])
  w = p6[:, 2] - p6[:, 0]
  h = p6[:, 3] - p6[:, 1]
  np.testing.assert_allclose(w * h, 512. ** 2, rtol=1e-5)
  np.testing.assert_allclose(h / w, [0.5, 1., 2.] * 2, rtol=1e-5)


def test_order_matches_nhwc_head_reshape():
  """anchors[i] belongs to element i of [1, Hl, Wl, A, k] -> [1, Hl*Wl*A, k]."""
  stride, (gh, gw), a = 8, (8, 12), 3
  p3 = anchor_ops.fpn_anchors((64, 96))[1]
  ys, xs, ks = np.meshgrid(np.arange(gh), np.arange(gw), np.arange(a),
                           indexing='ij')
  head = np.stack([ys, xs, ks], -1)[None]  # [1, Hl, Wl, A, 3] NHWC-like
  flat = head.reshape(1, gh * gw * a, 3)[0]
  centre_x = (p3[:, 0] + p3[:, 2]) / 2
  centre_y = (p3[:, 1] + p3[:, 3]) / 2
  np.testing.assert_allclose(centre_x, flat[:, 1] * stride, atol=1e-5)
  np.testing.assert_allclose(centre_y, flat[:, 0] * stride, atol=1e-5)
  cells = anchor_ops.cell_anchors([64], [0.5, 1., 2.])
  np.testing.assert_allclose(p3[:, 2] - p3[:, 0],
                             (cells[:, 2] - cells[:, 0])[flat[:, 2]],
                             rtol=1e-6)


def test_offset_half():
  p2 = anchor_ops.fpn_anchors((8, 8), strides=(4,), sizes=(32,),
                              aspect_ratios=(1.,), offset=0.5)[0]
  np.testing.assert_allclose(p2[0], [2. - 16., 2. - 16., 2. + 16., 2. + 16.])
