"""Landmark decoding (landmark_head.heatmaps_to_landmarks) against detectron2's formula.

detectron2's heatmaps_to_keypoints resizes each RoI's 56x56 heatmap with torch
F.interpolate(size=(ceil(h), ceil(w)), mode="bicubic", align_corners=False) and returns the argmax
pixel's centre mapped onto the box. The reference here is written from that formula alone, with
no code shared with the implementation: the whole map resized in float64 (cubic convolution with
a = -0.75, taps floor(s) - 1 .. floor(s) + 2 clamped to the map, s = (i + 0.5) * 56 / ceil(h) - 0.5
computed in float32 as torch does), then a flat argmax. The reference's kernel is pinned by
hand-computed values and by torch's published outputs, since torch is not a test dependency.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from df2_jax.models import landmark_head

A = -0.75
decode = jax.jit(landmark_head.heatmaps_to_landmarks, static_argnums=(2, 3))


def _kernel(x):
  """The cubic convolution kernel W(x), a = -0.75 (Keys 1981; torch, OpenCV)."""
  x = np.abs(x)
  return np.where(x <= 1, ((A + 2) * x - (A + 3)) * x * x + 1,
                  np.where(x < 2, ((A * x - 5 * A) * x + 8 * A) * x - 4 * A, 0.0))


def _resize_matrix(n_in, n_out):
  """[n_out, n_in] float64 weights of torch's bicubic resize along one axis."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = (scale * (np.arange(n_out, dtype=np.float32) + np.float32(0.5))
         - np.float32(0.5)).astype(np.float64)
  floor = np.floor(src)
  m = np.zeros((n_out, n_in))
  for j in range(-1, 3):
    taps = np.clip(floor + j, 0, n_in - 1).astype(int)
    np.add.at(m, (np.arange(n_out), taps), _kernel(src - floor - j))
  return m


def _resize(maps, h, w):
  """[..., H, W] maps resized to [..., h, w]."""
  return _resize_matrix(maps.shape[-2], h) @ maps.astype(np.float64) @ _resize_matrix(
      maps.shape[-1], w).T


def _reference(maps, roi):
  """detectron2's decoding of [K, H, W] maps on one box: ([K, 2] points, [K, h, w] resized)."""
  x0, y0, x1, y1 = np.asarray(roi, np.float32)
  w, h = max(x1 - x0, np.float32(1)), max(y1 - y0, np.float32(1))
  wc, hc = int(np.ceil(w)), int(np.ceil(h))
  resized = _resize(maps, hc, wc)
  pos = resized.reshape(len(maps), -1).argmax(axis=1)
  iy, ix = pos // wc, pos % wc
  points = np.stack([(ix + 0.5) * (w / np.float32(wc)) + x0,
                     (iy + 0.5) * (h / np.float32(hc)) + y0], axis=-1)
  return points, resized


def _gaussians(rng, shape, peaks, amplitudes=(1.0, 5.0), sigmas=(1.0, 3.5), n=56):
  """[*shape, n, n] sums of Gaussian peaks at random sub-cell positions plus a little noise."""
  yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
  maps = np.zeros(tuple(shape) + (n, n))
  for _ in range(peaks):
    cy, cx = (rng.uniform(-1.5, n + 0.5, tuple(shape) + (1, 1)) for _ in range(2))
    sigma = rng.uniform(*sigmas, tuple(shape) + (1, 1))
    amp = rng.uniform(*amplitudes, tuple(shape) + (1, 1))
    maps += amp * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * sigma ** 2))
  return (maps + 0.02 * rng.standard_normal(maps.shape)).astype(np.float32)


def _decode_errors(maps, rois, max_box_hw=(640, 640)):
  """Per-axis errors [N, K] of the decoded points against the reference, float32 near-ties
  (the reference's value at our pixel within 1e-6 of its maximum) set to 0."""
  got = np.asarray(decode(jnp.asarray(maps.transpose(0, 2, 3, 1)), jnp.asarray(rois),
                          max_box_hw, 3))
  errors = np.zeros(maps.shape[:2])
  for i, roi in enumerate(rois):
    want, resized = _reference(maps[i], roi)
    err = np.abs(got[i, :, :2] - want).max(axis=-1)
    w, h = max(roi[2] - roi[0], np.float32(1)), max(roi[3] - roi[1], np.float32(1))
    for j in np.nonzero(err > 0.25)[0]:
      px = int(round((got[i, j, 0] - roi[0]) * np.ceil(w) / w - 0.5))
      py = int(round((got[i, j, 1] - roi[1]) * np.ceil(h) / h - 0.5))
      if resized[j].max() - resized[j, py, px] <= 1e-6 * abs(resized[j].max()):
        err[j] = 0.0
    errors[i] = err
  return errors


# ------------------------------------------------------------------ the reference's kernel


def test_reference_resize_hand_values():
  # [0, 1, 2, 3] to 8 samples: s = 0.5 i - 0.25. s = -0.25: floor -1, t = 0.75, taps x[-2..1]
  # clamped = 0, 0, 0, 1, so the value is W(2 - t) = W(1.25) = -0.10546875. s = 1.25: taps
  # 0, 1, 2, 3 with weights W(1.25), W(0.25), W(0.75), W(1.75) = -0.10546875, 0.87890625,
  # 0.26171875, -0.03515625: 0.87890625 + 0.5234375 - 0.10546875 = 1.296875 (a = -0.75 does not
  # reproduce a ramp). The rest follow likewise, or by symmetry (3 - value).
  want = [-0.10546875, 0.19140625, 0.66796875, 1.296875, 1.703125, 2.33203125, 2.80859375,
          3.10546875]
  np.testing.assert_allclose(_resize_matrix(4, 8) @ np.arange(4.0), want, atol=1e-12)
  np.testing.assert_allclose(_kernel(np.array([0.0, 0.25, 0.5, 1.0, 1.25, 1.5, 2.0])),
                             [1.0, 0.87890625, 0.59375, 0.0, -0.10546875, -0.09375, 0.0])
  # Each row sums to 1; the same size is the identity; a step overshoots on both sides.
  for n_in, n_out in ((56, 13), (56, 56), (56, 601)):
    np.testing.assert_allclose(_resize_matrix(n_in, n_out).sum(axis=1), 1.0, atol=1e-12)
  np.testing.assert_allclose(_resize_matrix(7, 7), np.eye(7), atol=1e-12)
  step = _resize_matrix(4, 8) @ np.array([0.0, 0.0, 1.0, 1.0])
  assert step.min() < 0 and step.max() > 1


def test_reference_resize_matches_torch_outputs():
  # torch F.interpolate(x, scale_factor=2, mode="bicubic", align_corners=False) on
  # [[0, 1], [2, 3]], as quoted (5 decimals) by PyTorch's bicubic correctness tests.
  torch_2x2 = [[-0.31641, 0.01562, 0.56250, 0.89453],
               [0.34766, 0.67969, 1.22656, 1.55859],
               [1.44141, 1.77344, 2.32031, 2.65234],
               [2.10547, 2.43750, 2.98438, 3.31641]]
  np.testing.assert_allclose(_resize(np.array([[0.0, 1.0], [2.0, 3.0]]), 4, 4), torch_2x2,
                             atol=6e-6)
  # torch's first row for arange(16).reshape(4, 4) resized to 8x8 (size=(8, 8), align_corners
  # False), as published by other libraries' tests against PyTorch.
  torch_row = [-0.52734375, -0.23046875, 0.24609375, 0.875, 1.28125, 1.9101563, 2.3867188,
               2.6835938]
  np.testing.assert_allclose(_resize(np.arange(16.0).reshape(4, 4), 8, 8)[0], torch_row,
                             atol=1e-6)


def test_cubic_weights_are_the_kernel():
  t = np.array([0.0, 0.25, 0.5, 0.75, 0.999], np.float32)
  got = np.asarray(landmark_head.cubic_weights(jnp.asarray(t)))
  want = np.stack([_kernel(t + 1), _kernel(t), _kernel(1 - t), _kernel(2 - t)], axis=-1)
  np.testing.assert_allclose(got, want, atol=1e-6)
  np.testing.assert_allclose(got[1], [-0.10546875, 0.87890625, 0.26171875, -0.03515625])


# ----------------------------------------------------------------------------- decoding


def test_decoding_matches_detectron2_on_multi_peak_maps():
  """Three peaks of random heights per map (so a lower, broader peak often wins after
  resizing), boxes of 28 to 600 px per side with fractional corners."""
  rng = np.random.default_rng(0)
  sizes = np.concatenate([
      [[28.0, 30.5], [56.0, 56.0], [150.3, 449.6], [300.7, 200.2], [450.0, 600.0],
       [599.9, 37.4], [40.2, 451.1], [55.5, 57.5]],
      rng.uniform(28, 600, (24, 2))]).astype(np.float32)
  x0 = rng.uniform(0, 40, sizes.shape).astype(np.float32)
  rois = np.concatenate([x0, x0 + sizes], axis=1)
  maps = _gaussians(rng, (len(rois), 6), peaks=3)
  errors = _decode_errors(maps, rois)
  print(f"max error vs the reference: {errors.max():.2g} px over {errors.size} maps")
  assert errors.max() <= 0.25


def test_decoding_matches_detectron2_on_small_boxes():
  """Boxes from 10x12 px (and degenerate ones), one peak per map. Below 28 px the resize skips
  more than two cells between samples: which of several peaks it samples best is beyond the
  windows, and a peak narrower than the sample spacing leaves only noise; so one peak, at least
  2 cells wide."""
  rng = np.random.default_rng(1)
  sizes = np.concatenate([[[10.0, 12.0], [12.3, 10.1], [0.4, 0.3], [1.0, 1.0], [27.5, 13.2],
                           [10.5, 300.5]], rng.uniform(10, 60, (26, 2))]).astype(np.float32)
  x0 = rng.uniform(0, 40, sizes.shape).astype(np.float32)
  rois = np.concatenate([x0, x0 + sizes], axis=1)
  maps = _gaussians(rng, (len(rois), 6), peaks=1, amplitudes=(3.0, 5.0), sigmas=(2.0, 3.5))
  errors = _decode_errors(maps, rois)
  print(f"max error vs the reference: {errors.max():.2g} px over {errors.size} maps")
  assert errors.max() <= 0.25


def test_broad_peak_overtakes_a_spike_after_resizing():
  # A single cell of 1.0 and, elsewhere, a 2x2 plateau of 0.9 on zeros. Resized x2 (a 112 px box)
  # the spike's best pixel is 0.87890625^2 = 0.77, the plateau's (1.140625 * 0.9 per axis
  # squared) 1.05: detectron2 answers the plateau, which the argmax cell alone would miss.
  maps = np.zeros((1, 1, 56, 56), np.float32)
  maps[0, 0, 10, 12] = 1.0
  maps[0, 0, 40:42, 30:32] = 0.9
  rois = np.array([[100.0, 200.0, 212.0, 312.0]], np.float32)
  want, _ = _reference(maps[0], rois[0])
  # Sample s = 0.5 i - 0.25: pixels 61 and 62 (s = 30.25, 30.75) tie in exact arithmetic; the
  # resize here is symmetric, so both implementations may pick either.
  assert 100 + 61.5 <= want[0, 0] <= 100 + 62.5 and 200 + 81.5 <= want[0, 1] <= 200 + 82.5
  got = np.asarray(decode(jnp.asarray(maps.transpose(0, 2, 3, 1)), jnp.asarray(rois),
                          (640, 640), 3))
  np.testing.assert_allclose(got[0, 0, :2], want[0], atol=1.01)
  assert got[0, 0, 2] == 1.0  # The score stays the heatmap's maximal logit.
  single = np.asarray(decode(jnp.asarray(maps.transpose(0, 2, 3, 1)), jnp.asarray(rois),
                             (640, 640), 1))
  assert abs(single[0, 0, 0] - (100 + 24.5)) <= 0.5  # Window on the argmax cell only: the spike.


def test_decoding_ties_degenerate_boxes_dtypes_and_shapes():
  maps = np.zeros((3, 2, 56, 56), np.float32)
  maps[1:] = _gaussians(np.random.default_rng(2), (2, 2), peaks=2)
  rois = np.array([[10.0, 20.0, 110.0, 70.0],    # Constant maps: the first pixel, (0, 0).
                   [5.0, 5.0, 5.0, 5.0],         # Empty: w = h = 1, the one pixel.
                   [7.25, 3.5, 7.5, 4.0]],       # w = 0.25 and h = 0.5 count as 1.
                  np.float32)
  logits = jnp.asarray(maps.transpose(0, 2, 3, 1))
  got = np.asarray(decode(logits, jnp.asarray(rois), (640, 640), 3))
  assert got.shape == (3, 2, 3) and got.dtype == np.float32
  np.testing.assert_allclose(got[:, 0, :2], [[10.5, 20.5], [5.5, 5.5], [7.75, 4.0]])
  np.testing.assert_allclose(got[:, :, 2], maps.max(axis=(2, 3)))  # The maximal logits.
  # bfloat16 logits decode as their float32 values.
  half = logits.astype(jnp.bfloat16)
  np.testing.assert_array_equal(decode(half, jnp.asarray(rois), (640, 640), 3),
                                decode(half.astype(jnp.float32), jnp.asarray(rois), (640, 640), 3))
  with pytest.raises(ValueError, match="num_peaks"):
    landmark_head.heatmaps_to_landmarks(logits, rois, (640, 640), num_peaks=0)
