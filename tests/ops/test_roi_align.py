"""Tests for df2_jax.ops.roi_align against hand values and a loop reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from df2_jax.ops import roi_align as ra

_roi_align = jax.jit(ra.roi_align, static_argnums=(2, 3, 4, 5))


def _bilinear_ref(fm, y, x):
  """torchvision's bilinear_interpolate (roi_align_kernel.cpp), fm [H, W, C]."""
  h, w = fm.shape[:2]
  if y < -1.0 or y > h or x < -1.0 or x > w:
    return np.zeros(fm.shape[-1])
  y, x = max(y, 0.0), max(x, 0.0)
  y_low, x_low = int(y), int(x)
  if y_low >= h - 1:
    y_high = y_low = h - 1
    y = float(y_low)
  else:
    y_high = y_low + 1
  if x_low >= w - 1:
    x_high = x_low = w - 1
    x = float(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - y_low, x - x_low
  hy, hx = 1.0 - ly, 1.0 - lx
  return (hy * hx * fm[y_low, x_low] + hy * lx * fm[y_low, x_high] +
          ly * hx * fm[y_high, x_low] + ly * lx * fm[y_high, x_high])


def _roi_align_ref(features, boxes, out, scale, ratio, aligned=True):
  """Straight loops over images, boxes, bins and samples (float64)."""
  features = np.asarray(features, np.float64)
  boxes = np.asarray(boxes, np.float64)
  b, n = boxes.shape[:2]
  oh, ow = (out, out) if isinstance(out, int) else out
  result = np.zeros((b, n, oh, ow, features.shape[-1]))
  off = 0.5 if aligned else 0.0
  for i in range(b):
    for j in range(n):
      x1, y1, x2, y2 = boxes[i, j] * scale - off
      rw, rh = x2 - x1, y2 - y1
      if not aligned:
        rw, rh = max(rw, 1.0), max(rh, 1.0)
      bw, bh = rw / ow, rh / oh
      for ph in range(oh):
        for pw in range(ow):
          acc = 0.0
          for iy in range(ratio):
            y = y1 + ph * bh + (iy + 0.5) * bh / ratio
            for ix in range(ratio):
              x = x1 + pw * bw + (ix + 0.5) * bw / ratio
              acc = acc + _bilinear_ref(features[i], y, x)
          result[i, j, ph, pw] = acc / (ratio * ratio)
  return result


def _random_boxes(rng, b, n, h, w, scale):
  """Boxes in input coordinates; many partly outside the map."""
  hi = np.array([w, h]) / scale
  c = rng.uniform(-0.2, 1.2, (b, n, 2)) * hi
  half = rng.uniform(0.05, 0.6, (b, n, 2)) * hi
  boxes = np.concatenate([c - half, c + half], -1)
  boxes[:, 0] = [0., 0., 0., 0.]  # padded / empty box
  boxes[:, 1] = [-3 * hi[0], 1., -hi[0], 2.]  # fully outside
  return boxes.astype(np.float32)


def test_detectron2_hand_case_aligned():
  x = jnp.arange(25., dtype=jnp.float32).reshape(1, 5, 5, 1)
  box = jnp.array([[[1., 1., 3., 3.]]])
  out = _roi_align(x, box, 4, 1.0, 2, True)
  assert out.shape == (1, 1, 4, 4, 1)
  np.testing.assert_allclose(out[0, 0, :, :, 0], [
      [4.5, 5.0, 5.5, 6.0],
      [7.0, 7.5, 8.0, 8.5],
      [9.5, 10.0, 10.5, 11.0],
      [12.0, 12.5, 13.0, 13.5]], rtol=1e-6)


def test_detectron2_hand_case_not_aligned():
  x = jnp.arange(25., dtype=jnp.float32).reshape(1, 5, 5, 1)
  box = jnp.array([[[1., 1., 3., 3.]]])
  out = _roi_align(x, box, 4, 1.0, 2, False)
  np.testing.assert_allclose(out[0, 0, :, :, 0], [
      [7.5, 8.0, 8.5, 9.0],
      [10.0, 10.5, 11.0, 11.5],
      [12.5, 13.0, 13.5, 14.0],
      [15.0, 15.5, 16.0, 16.5]], rtol=1e-6)


def test_border_rules_hand_values():
  x = jnp.arange(25., dtype=jnp.float32).reshape(1, 5, 5, 1)
  boxes = jnp.array([[
      # 1x1 output, 1 sample at (y, x) = (4.5, 4.5) - 0.5 + 0.5 = (4.5, 4.5)
      # -> low index clamped to the last row / column: value 24.
      [4., 4., 6., 6.],
      # sample at (-1.25, 1.5): y < -1 -> 0.
      [1., -2.5, 3., 0.5],
      # sample at (-0.5, 1.5): clamped to y = 0 -> (1 + 2) / 2 = 1.5.
      [1., -1., 3., 1.],
  ]])
  out = _roi_align(x, boxes, 1, 1.0, 1, True)
  np.testing.assert_allclose(out[0, :, 0, 0, 0], [24., 0., 1.5], atol=1e-6)


@pytest.mark.parametrize('aligned', [True, False])
def test_matches_loop_reference(aligned):
  rng = np.random.default_rng(0)
  b, h, w, c, n, out, ratio, scale = 2, 7, 9, 3, 6, 3, 2, 0.5
  feats = rng.normal(size=(b, h, w, c)).astype(np.float32)
  boxes = _random_boxes(rng, b, n, h, w, scale)
  got = _roi_align(jnp.asarray(feats), jnp.asarray(boxes), out, scale, ratio,
                   aligned)
  want = _roi_align_ref(feats, boxes, out, scale, ratio, aligned)
  assert got.shape == (b, n, out, out, c) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Fully outside the map: every sample is dropped.
  np.testing.assert_allclose(got[:, 1], 0., atol=0)
  # A padded [0, 0, 0, 0] box samples (-0.5, -0.5) -> clamped to pixel (0, 0).
  if aligned:
    np.testing.assert_allclose(
        got[:, 0], np.broadcast_to(feats[:, None, None, 0, 0],
                                   (b, out, out, c)), rtol=1e-6)


def test_rectangular_output_and_ratio_3():
  rng = np.random.default_rng(3)
  feats = rng.normal(size=(1, 6, 8, 2)).astype(np.float32)
  boxes = _random_boxes(rng, 1, 4, 6, 8, 1.0)
  got = jax.jit(functools.partial(ra.roi_align, output_size=(2, 3),
                                  spatial_scale=1.0, sampling_ratio=3))(
                                      jnp.asarray(feats), jnp.asarray(boxes))
  assert got.shape == (1, 4, 2, 3, 2)
  want = _roi_align_ref(feats, boxes, (2, 3), 1.0, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gradient_matches_central_differences():
  """roi_align is linear in the features, so central differences are exact
  up to float32 rounding; every feature entry is checked."""
  rng = np.random.default_rng(1)
  b, h, w, c, n, out = 1, 5, 6, 2, 4, 2
  feats = jnp.asarray(rng.normal(size=(b, h, w, c)), jnp.float32)
  boxes = jnp.asarray(_random_boxes(rng, b, n, h, w, 1.0))
  boxes = boxes.at[0, 0].set(jnp.array([0.3, 0.6, 4.2, 3.9]))
  cot = jnp.asarray(rng.normal(size=(b, n, out, out, c)), jnp.float32)

  def f(x):
    return jnp.sum(ra.roi_align(x, boxes, out, 1.0, 2) * cot)

  grad = jax.jit(jax.grad(f))(feats)
  eye = jnp.eye(feats.size, dtype=jnp.float32).reshape((-1,) + feats.shape)
  step = 0.5
  fd = jax.jit(jax.vmap(lambda e: (f(feats + step * e) - f(feats - step * e))
                        / (2 * step)))(eye)
  np.testing.assert_allclose(grad.reshape(-1), fd, atol=2e-5)
  assert np.abs(np.asarray(grad)).sum() > 0


def test_gradient_of_bf16_features_is_bf16_and_close():
  rng = np.random.default_rng(2)
  feats = jnp.asarray(rng.normal(size=(1, 6, 6, 4)), jnp.float32)
  boxes = jnp.asarray(_random_boxes(rng, 1, 5, 6, 6, 1.0))
  f = lambda x: jnp.sum(ra.roi_align(x, boxes, 3, 1.0, 2).astype(jnp.float32))
  g32 = jax.jit(jax.grad(f))(feats)
  g16 = jax.jit(jax.grad(f))(feats.astype(jnp.bfloat16))
  assert g16.dtype == jnp.bfloat16
  np.testing.assert_allclose(g16.astype(jnp.float32), g32, rtol=1e-2,
                             atol=1e-2)


def test_bf16_features_close_to_fp32():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(2, 8, 10, 4)).astype(np.float32)
  boxes = jnp.asarray(_random_boxes(rng, 2, 5, 8, 10, 1.0))
  f32 = _roi_align(jnp.asarray(feats), boxes, 3, 1.0, 2, True)
  bf = _roi_align(jnp.asarray(feats, jnp.bfloat16), boxes, 3, 1.0, 2, True)
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf.astype(jnp.float32), f32, rtol=2e-2,
                             atol=2e-2)


def test_assign_boxes_to_levels():
  # sqrt(area): 50 -> 2, 111 -> 2, 112 -> 3, 224 -> 4, 447 -> 4, 448 -> 5,
  # 2000 -> 5 (clamped), 0 (padding) -> 2.
  sides = [50., 111., 112., 224., 447., 448., 2000., 0.]
  boxes = jnp.array([[0., 0., s, s] for s in sides])
  got = jax.jit(ra.assign_boxes_to_levels)(boxes)
  np.testing.assert_array_equal(got, np.array([2, 2, 3, 4, 4, 5, 5, 2]) - 2)


def test_multilevel_equals_per_level_roi_align():
  rng = np.random.default_rng(5)
  canvas, c, out = (128, 160), 3, 3
  feats = [jnp.asarray(rng.normal(size=(2, -(-canvas[0] // s),
                                        -(-canvas[1] // s), c)), jnp.float32)
           for s in (4, 8, 16, 32)]
  # sqrt(area) ~ 50 (P2), 150 (P3), 300 (P4), 500 (P5); centres anywhere on
  # the canvas so that large boxes stick out of it.
  sides = np.array([[40., 62.], [120., 188.], [250., 360.], [400., 625.],
                    [20., 20.], [130., 130.], [0., 0.]])
  levels = np.array([2, 3, 4, 5, 2, 3, 2])
  n = len(sides)
  centres = rng.uniform(0, 1, (2, n, 2)) * np.array(canvas[::-1])
  boxes = np.concatenate([centres - sides / 2, centres + sides / 2], -1)
  boxes = jnp.asarray(boxes, jnp.float32)
  np.testing.assert_array_equal(ra.assign_boxes_to_levels(boxes),
                                np.broadcast_to(levels - 2, (2, n)))
  got = jax.jit(ra.multilevel_roi_align, static_argnums=(2,))(feats, boxes,
                                                              out)
  assert got.shape == (2, n, out, out, c)
  for k in range(2, 6):
    want = _roi_align(feats[k - 2], boxes, out, 2.0 ** -k, 2, True)
    sel = levels == k
    np.testing.assert_allclose(got[:, sel], want[:, sel], rtol=1e-5,
                               atol=1e-6)
  # And the loop reference for P3 boxes.
  ref = _roi_align_ref(np.asarray(feats[1]), np.asarray(boxes), out, 1 / 8, 2)
  np.testing.assert_allclose(got[:, levels == 3], ref[:, levels == 3],
                             rtol=1e-5, atol=1e-5)


def test_multilevel_bf16_and_gradient_flows_to_each_level():
  rng = np.random.default_rng(6)
  feats = [jnp.asarray(rng.normal(size=(1, 64 // s, 64 // s, 2)),
                       jnp.bfloat16) for s in (4, 8, 16, 32)]
  # One box per level P2..P5, each with samples inside its (small) map.
  boxes = jnp.array([[[2., 2., 30., 30.], [0., 0., 150., 150.],
                      [0., 0., 300., 300.], [0., 0., 500., 500.]]])
  f = lambda fs: jnp.sum(ra.multilevel_roi_align(fs, boxes, 4).astype(
      jnp.float32))
  grads = jax.jit(jax.grad(f))(feats)
  assert [g.dtype for g in grads] == [jnp.bfloat16] * 4
  assert all(float(jnp.abs(g.astype(jnp.float32)).sum()) > 0 for g in grads)
  out = jax.jit(ra.multilevel_roi_align, static_argnums=(2,))(feats, boxes, 4)
  assert out.dtype == jnp.bfloat16


def test_invalid_arguments():
  x = jnp.zeros((1, 4, 4, 1))
  with pytest.raises(ValueError):
    ra.roi_align(x, jnp.zeros((1, 2, 4)), 2, 1.0, sampling_ratio=0)
  with pytest.raises(ValueError):
    ra.roi_align(x, jnp.zeros((2, 2, 4)), 2, 1.0)
  with pytest.raises(ValueError):
    ra.multilevel_roi_align([x] * 3, jnp.zeros((1, 2, 4)), 2)


@pytest.mark.parametrize("method", ["matmul", "window"])
@pytest.mark.parametrize("aligned", [True, False])
def test_other_methods_equal_loop_reference_and_gather(aligned, method):
  """The separable (matmul) and the windowed RoIAlign give torchvision's values, border rules
  included: boxes partly or wholly off the map, on the last row and column, tiny and empty
  boxes, non-square bins."""
  rng = np.random.default_rng(11)
  feats = rng.normal(size=(2, 9, 12, 3)).astype(np.float32)
  boxes = np.array([[[1.0, 2.0, 7.5, 6.0], [-4.0, -3.0, 5.0, 4.0], [10.0, 6.0, 16.0, 14.0],
                     [3.3, 3.3, 3.4, 3.9]],
                    [[0.0, 0.0, 12.0, 9.0], [11.5, 8.5, 13.0, 10.0], [-8.0, -8.0, -3.0, -2.0],
                     [2.0, 1.0, 2.0, 1.0]]], np.float32)
  run = jax.jit(ra.roi_align, static_argnums=(2, 3, 4, 5, 6))
  got = run(jnp.asarray(feats), jnp.asarray(boxes), (3, 4), 1.0, 2, aligned, method)
  want = _roi_align_ref(feats, boxes, (3, 4), 1.0, 2, aligned)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  gather = run(jnp.asarray(feats), jnp.asarray(boxes), (3, 4), 1.0, 2, aligned, "gather")
  np.testing.assert_allclose(got, gather, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["matmul", "window"])
def test_multilevel_methods_equal_gather_values_and_gradients(method):
  rng = np.random.default_rng(12)
  feats = [jnp.asarray(rng.normal(size=(2, 128 // s, 96 // s, 4)), jnp.float32)
           for s in (4, 8, 16, 32)]
  # Boxes of every level (sqrt(area) 20..600), some sticking out of the canvas.
  sides = rng.uniform(10, 600, (2, 12, 1)) * np.array([1.0, 1.3])
  centres = rng.uniform(-20, 140, (2, 12, 2))
  boxes = jnp.asarray(np.concatenate([centres - sides / 2, centres + sides / 2], -1),
                      jnp.float32)
  assert len(set(np.asarray(ra.assign_boxes_to_levels(boxes)).ravel())) == 4
  cot = jnp.asarray(rng.normal(size=(2, 12, 5, 5, 4)), jnp.float32)

  def pooled_and_grads(method):
    f = lambda fs: ra.multilevel_roi_align(fs, boxes, 5, method=method)
    out, vjp = jax.vjp(f, feats)
    return out, vjp(cot)[0]

  out_g, grads_g = jax.jit(functools.partial(pooled_and_grads, "gather"))()
  out_m, grads_m = jax.jit(functools.partial(pooled_and_grads, method))()
  np.testing.assert_allclose(out_m, out_g, rtol=1e-5, atol=1e-5)
  for gm, gg in zip(grads_m, grads_g):
    assert float(jnp.abs(gg).sum()) > 0
    np.testing.assert_allclose(gm, gg, rtol=1e-4, atol=1e-5)
  # bfloat16 features: bfloat16 out, computed in float32.
  bf = jax.jit(lambda fs: ra.multilevel_roi_align(fs, boxes, 5, method=method))(
      [f.astype(jnp.bfloat16) for f in feats])
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(bf.astype(jnp.float32), out_g, rtol=0.05, atol=0.05)


def test_unknown_method_is_refused():
  with pytest.raises(ValueError, match="gather"):
    ra.roi_align(jnp.zeros((1, 4, 4, 1)), jnp.zeros((1, 1, 4)), 2, 1.0, method="loop")
  with pytest.raises(ValueError, match="matmul"):
    ra.multilevel_roi_align([jnp.zeros((1, 4, 4, 1))] * 4, jnp.zeros((1, 1, 4)), 2,
                            method="dense")
