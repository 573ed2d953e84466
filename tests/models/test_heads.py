"""Tests for the RoI heads: box, mask, landmark and matching."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import deepfashion2 as df2

from df2_jax.models import box_head
from df2_jax.models import landmark_head
from df2_jax.models import mask_head
from df2_jax.models import matching

DTYPES = (jnp.float32, jnp.bfloat16)


def _param_shapes(module, x_shape):
  """Parameter shapes of a full-size module without computing anything."""
  variables = jax.eval_shape(module.init, jax.random.key(0),
                             jnp.zeros(x_shape, jnp.float32))
  return jax.tree.map(lambda a: tuple(a.shape), variables["params"])


def _init_apply(module, x):
  variables = jax.jit(module.init)(jax.random.key(0), x)
  return variables, jax.jit(module.apply)(variables, x)


def _torch_conv_transpose(x, w_torch, bias, stride, padding):
  """torch ConvTranspose2d on one NHWC image by its definition.

  out[i * s - p + k] += x[i] * w[ci, co, k] (per axis); x [H, W, Ci],
  w_torch [Ci, Co, kh, kw].
  """
  h, w, _ = x.shape
  _, co, kh, kw = w_torch.shape
  oh = (h - 1) * stride - 2 * padding + kh
  ow = (w - 1) * stride - 2 * padding + kw
  out = np.zeros((oh, ow, co)) + bias
  for iy in range(h):
    for ix in range(w):
      for ky in range(kh):
        for kx in range(kw):
          oy, ox = iy * stride - padding + ky, ix * stride - padding + kx
          if 0 <= oy < oh and 0 <= ox < ow:
            out[oy, ox] += x[iy, ix] @ w_torch[:, :, ky, kx]
  return out


def _torch_bilinear_x2(x):
  """torch F.interpolate(x2, bilinear, align_corners=False) of [H, W]."""
  def taps(n_in, n_out):
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    return i0, i1, lam
  h, w = x.shape
  y0, y1, ly = taps(h, 2 * h)
  x0, x1, lx = taps(w, 2 * w)
  top = x[y0][:, x0] * (1 - lx) + x[y0][:, x1] * lx
  bot = x[y1][:, x0] * (1 - lx) + x[y1][:, x1] * lx
  return top * (1 - ly)[:, None] + bot * ly[:, None]


# ----------------------------------------------------------------- box head


@pytest.mark.parametrize("dtype", DTYPES)
def test_box_head_shapes_and_dtypes(dtype):
  head = box_head.BoxHead(num_classes=13, fc_dim=32, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (3, 7, 7, 8)).astype(dtype)
  variables, (logits, deltas) = _init_apply(head, x)
  assert logits.shape == (3, 14) and logits.dtype == jnp.float32
  assert deltas.shape == (3, 13 * 4) and deltas.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert np.isfinite(np.asarray(logits)).all()
  assert np.isfinite(np.asarray(deltas)).all()


def test_box_head_full_param_shapes():
  shapes = _param_shapes(box_head.BoxHead(num_classes=13), (2, 7, 7, 256))
  assert shapes == {
      "fc6": {"kernel": (7 * 7 * 256, 1024), "bias": (1024,)},
      "fc7": {"kernel": (1024, 1024), "bias": (1024,)},
      "cls_score": {"kernel": (1024, 14), "bias": (14,)},
      "bbox_pred": {"kernel": (1024, 52), "bias": (52,)},
  }


def test_box_head_init():
  head = box_head.BoxHead(num_classes=13, fc_dim=512)
  params = head.init(jax.random.key(0), jnp.zeros((1, 2, 2, 4)))["params"]
  np.testing.assert_allclose(np.std(params["cls_score"]["kernel"]), 0.01,
                             rtol=0.1)
  np.testing.assert_allclose(np.std(params["bbox_pred"]["kernel"]), 0.001,
                             rtol=0.1)
  # c2_xavier_fill: U(+-sqrt(3 / fan_in)), fan_in = 2 * 2 * 4.
  bound = np.sqrt(3.0 / 16)
  k6 = np.asarray(params["fc6"]["kernel"])
  assert np.abs(k6).max() <= bound and np.abs(k6).max() > 0.9 * bound
  for name in ("fc6", "fc7", "cls_score", "bbox_pred"):
    assert not np.any(np.asarray(params[name]["bias"]))


def test_box_head_class_agnostic_regression():
  """One 4-output regressor, its deltas repeated in every class's columns; the loss of RoIs
  of different classes trains that one regressor."""
  head = box_head.BoxHead(num_classes=13, fc_dim=16, cls_agnostic_bbox_reg=True)
  x = jax.random.normal(jax.random.key(2), (3, 7, 7, 4))
  variables = head.init(jax.random.key(0), x)
  assert variables["params"]["bbox_pred"]["kernel"].shape == (16, 4)
  _, deltas = head.apply(variables, x)
  assert deltas.shape == (3, 13 * 4)
  per_class = np.asarray(deltas).reshape(3, 13, 4)
  np.testing.assert_array_equal(per_class, np.broadcast_to(per_class[:, :1], (3, 13, 4)))

  def class_columns_sum(params, cls):  # the loss's view: RoI i reads class cls[i]'s columns
    _, d = head.apply({"params": params}, x)
    return jnp.take_along_axis(d.reshape(3, 13, 4), cls[:, None, None], axis=1).sum()
  g_a = jax.grad(class_columns_sum)(variables["params"], jnp.array([0, 5, 12]))
  g_b = jax.grad(class_columns_sum)(variables["params"], jnp.array([3, 3, 3]))
  np.testing.assert_allclose(g_a["bbox_pred"]["kernel"], g_b["bbox_pred"]["kernel"],
                             rtol=1e-6)
  assert np.abs(np.asarray(g_a["bbox_pred"]["kernel"])).sum() > 0


# ---------------------------------------------------------------- mask head




@pytest.mark.parametrize("dtype", DTYPES)
def test_mask_head_shapes_and_dtypes(dtype):
  head = mask_head.MaskHead(num_classes=13, conv_dim=16, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (2, 14, 14, 8)).astype(dtype)
  variables, logits = _init_apply(head, x)
  assert logits.shape == (2, 28, 28, 13) and logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert np.isfinite(np.asarray(logits)).all()


def test_mask_head_full_param_shapes():
  shapes = _param_shapes(mask_head.MaskHead(num_classes=13), (2, 14, 14, 256))
  expected = {f"mask_fcn{i}": {"kernel": (3, 3, 256, 256), "bias": (256,)}
              for i in range(1, 5)}
  expected["deconv"] = {"kernel": (2, 2, 256, 256), "bias": (256,)}
  expected["predictor"] = {"kernel": (1, 1, 256, 13), "bias": (13,)}
  assert shapes == expected


def test_mask_head_init():
  head = mask_head.MaskHead(num_classes=13, conv_dim=64)
  params = head.init(jax.random.key(0), jnp.zeros((1, 4, 4, 64)))["params"]
  # kaiming normal, fan_out = 3 * 3 * 64.
  np.testing.assert_allclose(np.std(params["mask_fcn2"]["kernel"]),
                             np.sqrt(2.0 / (9 * 64)), rtol=0.05)
  np.testing.assert_allclose(np.std(params["predictor"]["kernel"]), 0.001,
                             rtol=0.3)
  assert not np.any(np.asarray(params["predictor"]["bias"]))


def test_mask_head_deconv_is_torch_conv_transpose():
  """The 2x2 stride-2 deconv equals torch ConvTranspose2d(k=2, s=2, p=0)."""
  head = mask_head.MaskHead(conv_dim=3, num_convs=0, num_classes=2)
  x = jax.random.normal(jax.random.key(2), (1, 3, 4, 3))
  variables = head.init(jax.random.key(0), x)
  p = jax.tree.map(np.asarray, variables["params"]["deconv"])
  p["bias"] = np.arange(3, dtype=np.float32) * 0.1
  variables["params"]["deconv"] = p
  _, state = head.apply(variables, x, capture_intermediates=True)
  got = state["intermediates"]["deconv"]["__call__"][0][0]
  w_torch = p["kernel"].transpose(3, 2, 0, 1)  # [k, k, out, in] -> torch
  want = _torch_conv_transpose(np.asarray(x[0], np.float64), w_torch,
                               p["bias"], stride=2, padding=0)
  assert got.shape == (6, 8, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------ landmark head


@pytest.mark.parametrize("dtype", DTYPES)
def test_landmark_head_shapes_and_dtypes(dtype):
  head = landmark_head.LandmarkHead(num_landmarks=294, conv_dim=16, num_convs=2, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (2, 14, 14, 8)).astype(dtype)
  variables = head.init(jax.random.key(0), x)
  logits, state = head.apply(variables, x, capture_intermediates=True)
  assert logits.shape == (2, 28, 28, 294) and logits.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  conv_out = state["intermediates"]["conv_fcn2"]["__call__"][0]
  assert conv_out.dtype == dtype  # the convs compute in `dtype`
  assert np.isfinite(np.asarray(logits)).all()
  heatmaps = landmark_head.upsample_heatmaps(logits)
  assert heatmaps.shape == (2, 56, 56, 294) and heatmaps.dtype == jnp.float32


def test_landmark_head_full_param_shapes():
  shapes = _param_shapes(landmark_head.LandmarkHead(num_landmarks=294), (2, 14, 14, 256))
  expected = {f"conv_fcn{i}": {"kernel": (3, 3, 512, 512), "bias": (512,)}
              for i in range(2, 9)}
  expected["conv_fcn1"] = {"kernel": (3, 3, 256, 512), "bias": (512,)}
  expected["score_lowres"] = {"kernel": (4, 4, 294, 512), "bias": (294,)}
  assert shapes == expected


def test_landmark_head_init():
  head = landmark_head.LandmarkHead(conv_dim=64, num_convs=1,
                                    num_landmarks=32)
  params = head.init(jax.random.key(0), jnp.zeros((1, 4, 4, 8)))["params"]
  np.testing.assert_allclose(np.std(params["conv_fcn1"]["kernel"]),
                             np.sqrt(2.0 / (9 * 64)), rtol=0.05)
  # torch's fan_out of a ConvTranspose2d weight [in, out, k, k] is in * k * k.
  np.testing.assert_allclose(np.std(params["score_lowres"]["kernel"]),
                             np.sqrt(2.0 / (16 * 64)), rtol=0.05)


@pytest.mark.parametrize("kernel,torch_padding", [(4, 1), (2, 0)])
def test_landmark_deconv_is_torch_conv_transpose(kernel, torch_padding):
  """score_lowres equals torch ConvTranspose2d(k, s=2, p=k // 2 - 1)."""
  head = landmark_head.LandmarkHead(num_landmarks=3, num_convs=0,
                                    deconv_kernel=kernel)
  x = jax.random.normal(jax.random.key(3), (1, 4, 3, 2))
  variables = head.init(jax.random.key(0), x)
  p = jax.tree.map(np.asarray, variables["params"]["score_lowres"])
  p["bias"] = np.array([0.1, -0.2, 0.3], np.float32)
  variables["params"]["score_lowres"] = p
  got = head.apply(variables, x)[0]
  w_torch = p["kernel"].transpose(3, 2, 0, 1)
  want = _torch_conv_transpose(np.asarray(x[0], np.float64), w_torch,
                               p["bias"], stride=2, padding=torch_padding)
  assert got.shape == want.shape == (8, 6, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_landmark_head_selected_channels_equal_full_output(dtype):
  """channels=[N, M] computes exactly those output channels of each RoI."""
  head = landmark_head.LandmarkHead(num_landmarks=294, conv_dim=16, num_convs=1, dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (4, 7, 7, 8)).astype(dtype)
  variables = head.init(jax.random.key(0), x)
  # A non-zero bias, so that its per-channel gather is checked too.
  variables = jax.tree.map(lambda a: a + 0.01 * jnp.arange(a.size).reshape(a.shape) / a.size,
                           variables)
  channels = jnp.asarray(df2.CATEGORY_CHANNELS[np.array([1, 4, 13, 9])])
  full = head.apply(variables, x)
  sel = head.apply(variables, x, channels)
  assert sel.shape == (4, 14, 14, 39) and sel.dtype == jnp.float32
  want = jnp.take_along_axis(full, channels[:, None, None, :], axis=-1)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(sel, want, rtol=tol, atol=tol)
  # Gradients with respect to the parameters agree as well (on the selected channels).
  cot = jax.random.normal(jax.random.key(2), sel.shape)
  g_sel = jax.grad(lambda v: jnp.sum(head.apply(v, x, channels) * cot))(variables)
  g_full = jax.grad(lambda v: jnp.sum(jnp.take_along_axis(
      head.apply(v, x), channels[:, None, None, :], axis=-1) * cot))(variables)
  for a, b in zip(jax.tree.leaves(g_sel), jax.tree.leaves(g_full)):
    np.testing.assert_allclose(a, b, rtol=10 * tol, atol=10 * tol)


def test_upsample_heatmaps_hand_values():
  x = jnp.array([[0.0, 1.0], [2.0, 3.0]])[None, :, :, None]
  got = landmark_head.upsample_heatmaps(x)[0, :, :, 0]
  want = np.array([[0.0, 0.25, 0.75, 1.0],
                   [0.5, 0.75, 1.25, 1.5],
                   [1.5, 1.75, 2.25, 2.5],
                   [2.0, 2.25, 2.75, 3.0]])
  np.testing.assert_allclose(got, want, atol=1e-7)


@pytest.mark.parametrize("dtype", DTYPES)
def test_upsample_heatmaps_matches_torch_formula(dtype):
  x = np.asarray(jax.random.normal(jax.random.key(4), (2, 5, 3, 4)))
  x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  got = landmark_head.upsample_heatmaps(jnp.asarray(x, dtype))
  assert got.shape == (2, 10, 6, 4) and got.dtype == dtype
  want = np.stack([np.stack([_torch_bilinear_x2(x[n, :, :, k])
                             for k in range(4)], -1) for n in range(2)])
  tol = 1e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol)
  # jax.image.resize's half-pixel bilinear upsampling agrees.
  ref = jax.image.resize(jnp.asarray(x, jnp.float32), (2, 10, 6, 4), "bilinear")
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, ref, atol=1e-6)


def test_upsample_heatmaps_single_pixel_and_leading_dims():
  x = jnp.full((3, 2, 1, 1, 5), 7.0)
  got = landmark_head.upsample_heatmaps(x)
  assert got.shape == (3, 2, 2, 2, 5)
  np.testing.assert_array_equal(got, 7.0)


def test_heatmaps_to_landmarks_hand_case():
  logits = np.zeros((1, 4, 4, 2), np.float32)
  logits[0, 1, 2, 0] = 5.0  # iy = 1, ix = 2
  logits[0, 3, 0, 1] = 7.0  # iy = 3, ix = 0
  logits[0, 0, 0, 1] = -1.0
  # A 4x4 box: the bicubic resize to 4x4 pixels is the identity, so the answer is the argmax
  # cell's centre, x = 10 + ix + 0.5, y = 20 + iy + 0.5.
  rois = np.array([[10.0, 20.0, 14.0, 24.0]])
  decode = jax.jit(landmark_head.heatmaps_to_landmarks, static_argnums=2)
  got = decode(jnp.asarray(logits), jnp.asarray(rois), (4, 4))
  want = np.array([[[12.5, 21.5, 5.0], [10.5, 23.5, 7.0]]])
  assert got.shape == (1, 2, 3) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_heatmaps_to_landmarks_56_grid():
  logits = np.full((2, 56, 56, 3), -3.0, np.float32)
  logits[0, 20, 10, 0] = 2.0
  logits[0, 0, 55, 1] = 1.0
  logits[0, 55, 0, 2] = 0.5
  logits[1, 5, 6, :] = 4.0
  rois = np.array([[0.0, 0.0, 56.0, 56.0], [100.0, 200.0, 128.0, 256.0]])
  decode = jax.jit(landmark_head.heatmaps_to_landmarks, static_argnums=2)
  got = np.asarray(decode(jnp.asarray(logits), jnp.asarray(rois), (64, 64)))
  # 56x56 box: the resize is the identity; the cell centres, corners included.
  np.testing.assert_allclose(got[0], [[10.5, 20.5, 2.0], [55.5, 0.5, 1.0],
                                      [0.5, 55.5, 0.5]], rtol=1e-6)
  # w = 28 (h = 56 is the identity): pixel i samples s = 2i + 0.5. The spike at cell 6 gets
  # weight W(0.5) = 0.59375 at s = 6.5 (i = 3) and W(1.5) = -0.09375 at s = 4.5, so i = 3 and
  # x = 100 + 3.5 * 28 / 28 (the argmax cell's centre was 103.25); y = 200 + 5.5.
  np.testing.assert_allclose(got[1], [[103.5, 205.5, 4.0]] * 3, rtol=1e-6)


# ----------------------------------------------------------------- matching


@pytest.mark.parametrize("dtype", DTYPES)
def test_matching_head_shapes_and_dtypes(dtype):
  head = matching.MatchingHead(embed_dim=8, conv_dim=16, proj_dim=32,
                               dtype=dtype)
  x = jax.random.normal(jax.random.key(1), (3, 7, 7, 8)).astype(dtype)
  variables, v = _init_apply(head, x)
  assert v.shape == (3, 8) and v.dtype == jnp.float32
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert np.isfinite(np.asarray(v)).all()


def test_matching_head_full_param_shapes():
  shapes = _param_shapes(matching.MatchingHead(), (2, 7, 7, 256))
  expected = {f"conv{i}": {"kernel": (3, 3, 256, 256), "bias": (256,)}
              for i in range(1, 4)}
  expected["conv4"] = {"kernel": (1, 1, 256, 1024), "bias": (1024,)}
  expected["fc"] = {"kernel": (1024, 256), "bias": (256,)}
  assert shapes == expected


def test_pair_scorer_params():
  scorer = matching.PairScorer(embed_dim=16)
  v = jnp.zeros((2, 16))
  params = scorer.init(jax.random.key(0), v, v)["params"]
  assert params["kernel"].shape == (16,) and params["bias"].shape == ()
  with pytest.raises(ValueError):
    scorer.apply({"params": params}, jnp.zeros((2, 8)), jnp.zeros((2, 8)))
  assert 0 < float(jnp.std(params["kernel"])) < 0.05  # "normal": N(0, 0.01^2)


def test_pair_scorer_distance_init_is_minus_the_mean_squared_distance():
  scorer = matching.PairScorer(embed_dim=4, weight_init="distance")
  a = jnp.array([[0.0, 1.0, 2.0, 3.0], [1.0, 1.0, 1.0, 1.0]])
  b = jnp.array([[0.0, 1.0, 2.0, 3.0], [2.0, 3.0, 4.0, 5.0]])
  params = scorer.init(jax.random.key(0), a, b)["params"]
  np.testing.assert_array_equal(params["kernel"], [-0.25] * 4)
  logits = scorer.apply({"params": params}, a, b)
  # Rows: a[0] (equal to b[0]; b[1] = a[0] + 2), a[1] (distances 1+0+1+4, 1+4+9+16).
  np.testing.assert_allclose(logits, [[0.0, -4.0], [-1.5, -7.5]], atol=1e-5)
  with pytest.raises(ValueError, match="weight_init"):
    matching.PairScorer(embed_dim=4, weight_init="zeros").init(jax.random.key(0), a, b)



def test_pair_memory_is_a_ring_of_the_last_steps():
  """Each call returns the items of the `steps` calls before it (slot order, empty slots
  invalid), keeps at most `items` valid items of a call (in their order) and overwrites the
  oldest slot; read-only without a mutable "memory"."""
  mem = matching.PairMemory(steps=2, items=3)

  def items(t):  # call t: 4 items, item i's features filled with 10 t + i; items 1 invalid
    return (10.0 * t + jnp.arange(4.0)[:, None, None, None] * jnp.ones((4, 1, 1, 2)),
            jnp.array([10 * t + i for i in range(4)]), jnp.array([1, 1, 0, 2]),
            jnp.array([0, 1, 0, 1]), jnp.array([0, 0, 1, 1]),
            jnp.array([True, False, True, t % 2 == 1]))

  variables = mem.init(jax.random.key(0), *items(0))
  assert variables["memory"]["features"].shape == (2, 3, 1, 1, 2)
  assert not np.asarray(variables["memory"]["valid"]).any()  # init stores nothing
  for t in range(1, 5):
    stored, variables = mem.apply(variables, *items(t), mutable=["memory"])
    assert stored["pair_id"].shape == stored["valid"].shape == (2, 3)
    if t > 1:  # call t - 1's valid items (0, 2 and, for odd calls, 3) in slot (t - 2) % 2
      slot, odd = (t - 2) % 2, (t - 1) % 2 == 1
      kept = [0, 2, 3] if odd else [0, 2]
      np.testing.assert_array_equal(stored["pair_id"][slot][:len(kept)],
                                    [10 * (t - 1) + i for i in kept])
      np.testing.assert_array_equal(stored["valid"][slot], [True, True, odd])
      np.testing.assert_array_equal(stored["features"][slot][:len(kept), 0, 0, 0],
                                    [10.0 * (t - 1) + i for i in kept])
      np.testing.assert_array_equal(stored["side"][slot][:len(kept)], [[0, 0, 1], [0, 0]][1 - odd])
      np.testing.assert_array_equal(stored["group"][slot][:len(kept)], [[0, 1, 1], [0, 1]][1 - odd])
  assert int(variables["memory"]["cursor"]) == 0
  for _ in range(2):  # not mutable: reads, writes nothing (slots hold calls 3 and 4)
    np.testing.assert_array_equal(mem.apply(variables, *items(5))["pair_id"][:, 0], [30, 40])
  # items=0: as many places as a call passes.
  assert matching.PairMemory(steps=2).init(jax.random.key(0), *items(0))["memory"][
      "valid"].shape == (2, 4)


def _rand(key, shape, offset=0.0):
  return jax.random.normal(jax.random.key(key), shape) + offset


@pytest.mark.parametrize("a_shape,b_shape", [
    ((1, 4), (1, 4)),
    ((5, 16), (7, 16)),
    ((3, 256), (50, 256)),
    ((4, 8, 32), (4, 8, 32)),     # batched [P, U, D] x [P, S, D]
    ((6, 32), (4, 9, 32)),        # one query set against P galleries
    ((2, 1, 3, 8), (1, 5, 4, 8)),  # broadcast leading dims
])
def test_expanded_square_equals_reference(a_shape, b_shape):
  d = a_shape[-1]
  w = _rand(0, (d,))
  bias = jnp.float32(0.3)
  a, b = _rand(1, a_shape), _rand(2, b_shape)
  got = matching.expanded_square_logits(w, bias, a, b)
  want = matching.pairwise_logits_reference(w, bias, a, b)
  assert got.shape == want.shape and got.dtype == jnp.float32
  assert got.shape[-2:] == (a_shape[-2], b_shape[-2])
  # Near-zero logits are differences of large terms: the absolute tolerance
  # is relative to the largest sum of |w_d| (a_d - b_d)^2 (float32 rounding).
  scale = float(np.max(matching.pairwise_logits_reference(jnp.abs(w), 0.0,
                                                          a, b)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * scale)


def test_expanded_square_with_common_offset():
  """Embeddings sharing a large component: compared to a float64 reference."""
  w = _rand(0, (64,))
  a = _rand(1, (10, 64), offset=30.0)
  b = _rand(2, (12, 64), offset=30.0)
  got = matching.expanded_square_logits(w, 0.0, a, b)
  a64, b64, w64 = (np.asarray(t, np.float64) for t in (a, b, w))
  want = np.sum(w64 * (a64[:, None] - b64[None]) ** 2, -1)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_expanded_square_is_symmetric():
  w = _rand(0, (32,))
  a, b = _rand(1, (6, 32)), _rand(2, (9, 32))
  ab = matching.expanded_square_logits(w, -0.5, a, b)
  ba = matching.expanded_square_logits(w, -0.5, b, a)
  np.testing.assert_allclose(ab, np.swapaxes(ba, -1, -2), rtol=1e-6, atol=1e-5)
  # A vector against itself scores exactly the bias (up to rounding).
  aa = matching.expanded_square_logits(w, -0.5, a, a)
  np.testing.assert_allclose(np.diagonal(aa), -0.5, atol=1e-5)


def test_gallery_ranking_matches_reference():
  w = -jnp.abs(_rand(0, (64,)))  # a trained scorer: distance lowers the logit
  query = _rand(1, (3, 64))
  gallery = _rand(2, (200, 64))
  got = matching.expanded_square_logits(w, 0.1, query, gallery)
  want = matching.pairwise_logits_reference(w, 0.1, query, gallery)
  np.testing.assert_array_equal(np.argsort(-np.asarray(got), axis=-1),
                                np.argsort(-np.asarray(want), axis=-1))
  # The nearest gallery item wins when it is a noisy copy of the query.
  gallery = gallery.at[17].set(query[0] + 0.01)
  got = matching.expanded_square_logits(w, 0.1, query[:1], gallery)
  assert int(np.argmax(got[0])) == 17


def test_paired_logits_equal_diagonal():
  w = _rand(0, (16,))
  a, b = _rand(1, (5, 16)), _rand(2, (5, 16))
  diag = np.diagonal(matching.pairwise_logits_reference(w, 0.2, a, b))
  np.testing.assert_allclose(matching.paired_logits(w, 0.2, a, b), diag,
                             rtol=1e-6)


class _TinyMatcher(nn.Module):
  """A model that embeds user and shop RoIs and scores them with one scorer."""

  @nn.compact
  def __call__(self, user_rois, shop_rois):
    embed = matching.MatchingHead(embed_dim=8, conv_dim=8, proj_dim=16,
                                  dtype=jnp.bfloat16, name="embed")
    scorer = matching.PairScorer(embed_dim=8, name="scorer")
    v_user, v_shop = embed(user_rois), embed(shop_rois)
    return scorer(v_user, v_shop), scorer.paired(v_user, v_shop), v_user, v_shop


def test_scorer_inside_model_and_for_retrieval():
  model = _TinyMatcher()
  user = _rand(1, (4, 7, 7, 8))
  shop = _rand(2, (4, 7, 7, 8))
  variables = model.init(jax.random.key(0), user, shop)
  assert set(variables["params"]) == {"embed", "scorer"}  # shared weights
  all_pairs, aligned, v_user, v_shop = model.apply(variables, user, shop)
  assert all_pairs.shape == (4, 4) and all_pairs.dtype == jnp.float32
  assert aligned.shape == (4,)
  np.testing.assert_allclose(aligned, np.diagonal(all_pairs), rtol=1e-5,
                             atol=1e-6)
  # Retrieval outside the model with the same weights.
  retrieval = matching.pairwise_logits(variables["params"]["scorer"], v_user,
                                       v_shop)
  np.testing.assert_allclose(retrieval, all_pairs, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
      matching.pairwise_logits({"params": variables["params"]["scorer"]},
                               v_user, v_shop), all_pairs, rtol=1e-6,
      atol=1e-7)

  labels = jnp.eye(4)

  def loss_fn(params):
    logits = model.apply({"params": params}, user, shop)[0]
    return jnp.mean(jnp.maximum(logits, 0) - logits * labels +
                    jnp.log1p(jnp.exp(-jnp.abs(logits))))

  grads = jax.jit(jax.grad(loss_fn))(variables["params"])
  leaves = jax.tree.leaves(grads)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert np.abs(np.asarray(grads["scorer"]["kernel"])).sum() > 0
  assert np.abs(np.asarray(grads["embed"]["conv1"]["kernel"])).sum() > 0


def test_expanded_square_gradient_matches_reference():
  w = _rand(0, (8,))
  a, b = _rand(1, (3, 8)), _rand(2, (4, 8))
  f = lambda fn: jax.grad(lambda w, a, b: jnp.sum(jnp.sin(fn(w, 0.1, a, b))),
                          argnums=(0, 1, 2))(w, a, b)
  for g, r in zip(f(matching.expanded_square_logits),
                  f(matching.pairwise_logits_reference)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
def test_heads_backward_in_dtype(dtype):
  """Gradients flow through every head in float32 and bfloat16 compute."""
  heads = [
      (box_head.BoxHead(num_classes=13, fc_dim=8, dtype=dtype), (2, 7, 7, 4)),
      (mask_head.MaskHead(num_classes=13, conv_dim=8, num_convs=1, dtype=dtype), (2, 6, 6, 4)),
      (landmark_head.LandmarkHead(conv_dim=8, num_convs=1, num_landmarks=5,
                                  dtype=dtype), (2, 6, 6, 4)),
      (matching.MatchingHead(embed_dim=4, conv_dim=8, proj_dim=8, dtype=dtype),
       (2, 7, 7, 4)),
  ]
  for head, shape in heads:
    x = _rand(5, shape).astype(dtype)
    params = head.init(jax.random.key(0), x)["params"]

    def loss(p):
      out = head.apply({"params": p}, x)
      return sum(jnp.sum(o ** 2) for o in jax.tree.leaves(out))

    grads = jax.jit(jax.grad(loss))(params)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(params)):
      assert g.dtype == p.dtype == jnp.float32
      assert np.isfinite(np.asarray(g)).all()
