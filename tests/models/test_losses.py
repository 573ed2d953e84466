"""Tests for df2_jax.models.losses on hand-computable cases."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import deepfashion2 as df2
from df2_jax.models import losses
from df2_jax.models.landmark_head import upsample_heatmaps

LN2 = math.log(2.0)


def _softplus(x):
  return math.log1p(math.exp(x))


# ------------------------------------------------------------------- helpers


def test_sigmoid_bce_values():
  x = jnp.array([0.0, 2.0, -3.0, 50.0, -50.0])
  z = jnp.array([1.0, 1.0, 0.0, 0.0, 0.0])
  np.testing.assert_allclose(
      losses.sigmoid_bce(x, z),
      [LN2, _softplus(-2.0), _softplus(-3.0), 50.0, 0.0], rtol=1e-6,
      atol=1e-7)


def test_smooth_l1():
  d = jnp.array([-2.0, 0.5, 0.0])
  np.testing.assert_allclose(losses.smooth_l1(d), [2.0, 0.5, 0.0])
  np.testing.assert_allclose(losses.smooth_l1(d, 1.0), [1.5, 0.125, 0.0])


def test_category_channel_table():
  assert df2.MAX_CATEGORY_LANDMARKS == 39
  assert df2.CATEGORY_CHANNELS.shape == (14, 39)
  assert not df2.CATEGORY_CHANNEL_VALID[0].any()
  for cid in df2.CATEGORY_IDS:
    ch = df2.CATEGORY_CHANNELS[cid][df2.CATEGORY_CHANNEL_VALID[cid]]
    want = np.flatnonzero(df2.CATEGORY_LANDMARK_MASK[cid])
    np.testing.assert_array_equal(ch, want)


# ------------------------------------------------------------------------ rpn


def test_rpn_losses_by_hand():
  logits = jnp.zeros((2, 3))
  labels = jnp.array([[1, 0, -1], [-1, -1, 0]])
  deltas = jnp.array([[[1.0, -2.0, 0.5, 0.0], [9, 9, 9, 9], [9, 9, 9, 9]],
                      [[9, 9, 9, 9], [9, 9, 9, 9], [9, 9, 9, 9]]])
  target = jnp.zeros((2, 3, 4))
  fn = jax.jit(losses.rpn_losses, static_argnums=(4, 5))
  obj, box = fn(logits, deltas, labels, target, 4, 0.0)
  # 3 sampled anchors at logit 0 (ln 2 each), normaliser 4 per image * 2.
  np.testing.assert_allclose(obj, 3 * LN2 / 8, rtol=1e-6)
  # One fg anchor with |d| summing to 3.5.
  np.testing.assert_allclose(box, 3.5 / 8, rtol=1e-6)
  assert obj.dtype == jnp.float32 and box.dtype == jnp.float32
  _, box = fn(logits, deltas, labels, target, 4, 1.0)
  # beta 1: 1 -> 0.5, 2 -> 1.5, 0.5 -> 0.125.
  np.testing.assert_allclose(box, (0.5 + 1.5 + 0.125) / 8, rtol=1e-6)


def test_rpn_losses_confident_logits():
  logits = jnp.array([[3.0, -1.0]])
  labels = jnp.array([[1, 0]])
  z = jnp.zeros((1, 2, 4))
  obj, box = losses.rpn_losses(logits, z, labels, z, batch_size_per_image=2)
  np.testing.assert_allclose(obj, (_softplus(-3.0) + _softplus(-1.0)) / 2,
                             rtol=1e-6)
  assert float(box) == 0.0


# ------------------------------------------------------------------ box head


def test_box_head_losses_by_hand():
  logits = np.zeros((1, 3, 14), np.float32)
  logits[0, 0, 2] = math.log(13.0)   # p(class 2) = 13 / 26 = 0.5
  logits[0, 2, :] = 100.0 * np.arange(14)   # invalid RoI: ignored
  classes = jnp.array([[2, 0, 5]])
  valid = jnp.array([[True, True, False]])
  deltas = np.full((1, 3, 13 * 4), 100.0, np.float32)
  deltas[0, 0, 4:8] = 1.0            # class 2 occupies columns 4..7
  target = jnp.zeros((1, 3, 4))
  cls, box = jax.jit(losses.box_head_losses)(logits, deltas, classes, target,
                                             valid)
  np.testing.assert_allclose(cls, (LN2 + math.log(14.0)) / 2, rtol=1e-6)
  # Only RoI 0 is fg: L1 = 4, divided by the 2 valid RoIs.
  np.testing.assert_allclose(box, 2.0, rtol=1e-6)


def test_detectron_smooth_l1_betas_by_hand():
  """The 1x recipe's betas: 1/9 in the RPN, 1 in the box head (Detectron's)."""
  # RPN: one fg anchor with errors (0.05, -0.5, 0.1, 0), normaliser 2 anchors x 1 image.
  # |d| < 1/9: 0.5 d^2 * 9; otherwise |d| - 1/18.
  deltas = jnp.array([[[0.05, -0.5, 0.1, 0.0], [9.0, 9.0, 9.0, 9.0]]])
  labels = jnp.array([[1, 0]])
  _, box = losses.rpn_losses(jnp.zeros((1, 2)), deltas, labels, jnp.zeros((1, 2, 4)), 2,
                             1.0 / 9.0)
  want = (0.5 * 0.05**2 * 9 + (0.5 - 1 / 18) + 0.5 * 0.1**2 * 9 + 0.0) / 2
  np.testing.assert_allclose(box, want, rtol=1e-6)  # 0.267361...
  # Box head, class-agnostic: one fg RoI with errors (0.5, -2, 0, 1.5) among 2 valid RoIs.
  # |d| < 1: 0.5 d^2; otherwise |d| - 0.5.
  d = jnp.array([[[0.5, -2.0, 0.0, 1.5], [3.0, 3.0, 3.0, 3.0]]])
  _, box = losses.box_head_losses(jnp.zeros((1, 2, 14)), d, jnp.array([[4, 0]]),
                                  jnp.zeros((1, 2, 4)), jnp.array([[True, True]]), 1.0)
  np.testing.assert_allclose(box, (0.125 + 1.5 + 0.0 + 1.0) / 2, rtol=1e-6)  # 1.3125


def test_box_head_losses_class_agnostic_and_empty():
  logits = jnp.zeros((2, 1, 14))
  classes = jnp.array([[3], [0]])
  deltas = jnp.array([[[0.5, 0.5, 0.0, -1.0]], [[7.0, 7.0, 7.0, 7.0]]])
  valid = jnp.array([[True], [True]])
  cls, box = losses.box_head_losses(logits, deltas, classes,
                                    jnp.zeros((2, 1, 4)), valid)
  np.testing.assert_allclose(cls, math.log(14.0), rtol=1e-6)
  np.testing.assert_allclose(box, 2.0 / 2, rtol=1e-6)
  cls, box = losses.box_head_losses(logits, deltas, classes,
                                    jnp.zeros((2, 1, 4)),
                                    jnp.zeros((2, 1), bool))
  assert float(cls) == 0.0 and float(box) == 0.0


# ---------------------------------------------------------------------- mask


def test_mask_loss_by_hand():
  logits = np.full((1, 2, 2, 2, 3), 100.0, np.float32)
  logits[0, 0, :, :, 1] = 0.0           # RoI 0 is class 2 -> channel 1
  logits[0, 0, 0, 0, 1] = 2.0
  targets = np.zeros((1, 2, 2, 2), np.float32)
  targets[0, 0, 0, 0] = 1.0
  classes = jnp.array([[2, 1]])
  fg = jnp.array([[True, False]])
  got = jax.jit(losses.mask_loss)(logits, classes, targets, fg)
  want = (_softplus(-2.0) + 3 * LN2) / 4
  np.testing.assert_allclose(got, want, rtol=1e-6)
  assert float(losses.mask_loss(logits, classes, targets,
                                jnp.zeros((1, 2), bool))) == 0.0


def test_mask_loss_soft_targets():
  logits = jnp.zeros((1, 1, 28, 28, 13))
  got = losses.mask_loss(logits, jnp.array([[13]]),
                         jnp.full((1, 1, 28, 28), 0.3), jnp.array([[True]]))
  np.testing.assert_allclose(got, LN2, rtol=1e-6)


# ----------------------------------------------------------------- landmarks

# The loss with DeepFashion2's tables (the run's spec's, in the model).
_landmark_loss = functools.partial(
    losses.landmark_loss, category_channels=df2.CATEGORY_CHANNELS,
    category_channel_valid=df2.CATEGORY_CHANNEL_VALID)


def _landmark_loss_all_channels(logits, indices, valid, upsample):
  """Reference: upsample all 294 channels, CE per valid (RoI, landmark)."""
  b, r, h, w, k = logits.shape
  up = np.asarray(upsample(jnp.asarray(logits).reshape(b * r, h, w, k)),
                  np.float64).reshape(b, r, -1, k)
  m = up.max(axis=2, keepdims=True)
  lse = (np.log(np.exp(up - m).sum(axis=2)) + m[:, :, 0])  # [B, R, K]
  picked = np.take_along_axis(up, indices[:, :, None, :], axis=2)[:, :, 0]
  ce = lse - picked
  return (ce * valid).sum() / max(valid.sum(), 1)


def _landmark_case(h, seed=0):
  rng = np.random.default_rng(seed)
  classes = np.array([[4, 9, 0], [13, 1, 4]], np.int32)   # 4: 39 landmarks
  logits = rng.normal(size=(2, 3, h, h, df2.NUM_LANDMARKS)).astype(np.float32)
  indices = rng.integers(0, (2 * h) ** 2, (2, 3, df2.NUM_LANDMARKS)).astype(
      np.int32)
  valid = (rng.random((2, 3, df2.NUM_LANDMARKS)) < 0.7)
  valid &= df2.CATEGORY_LANDMARK_MASK[classes]
  return logits, indices, valid, classes


def test_landmark_loss_uniform_logits():
  logits = jnp.zeros((1, 2, 28, 28, df2.NUM_LANDMARKS))
  indices = jnp.full((1, 2, df2.NUM_LANDMARKS), 1234, jnp.int32)
  classes = jnp.array([[1, 4]])
  valid = jnp.asarray(df2.CATEGORY_LANDMARK_MASK[np.asarray(classes)])
  got = jax.jit(_landmark_loss)(logits, indices, valid, classes)
  np.testing.assert_allclose(got, math.log(56 * 56), rtol=1e-6)  # ln 3136


def test_landmark_loss_equals_all_channel_loss():
  logits, indices, valid, classes = _landmark_case(6)
  got = jax.jit(_landmark_loss)(logits, indices, valid, classes)
  want = _landmark_loss_all_channels(logits, indices, valid,
                                     upsample_heatmaps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert got.dtype == jnp.float32


def test_landmark_loss_on_pre_gathered_channels():
  """gathered=True takes each RoI's category channels (the head's channel-selecting path)
  and gives the same loss and gradient."""
  logits, indices, valid, classes = _landmark_case(6, seed=4)
  channels = df2.CATEGORY_CHANNELS[classes]  # [B, R, 39]
  own = np.take_along_axis(logits, channels[:, :, None, None, :], axis=-1)
  full = jax.jit(jax.value_and_grad(_landmark_loss))(logits, indices, valid, classes)
  sel = jax.jit(jax.value_and_grad(
      lambda x, i, v, c: _landmark_loss(x, i, v, c, gathered=True)))(
          own, indices, valid, classes)
  np.testing.assert_allclose(sel[0], full[0], rtol=1e-6)
  want_grad = np.take_along_axis(np.asarray(full[1]), channels[:, :, None, None, :], axis=-1)
  # Padded slots of a category repeat its first channel with no loss: compare real slots.
  real = df2.CATEGORY_CHANNEL_VALID[classes][:, :, None, None, :]
  np.testing.assert_allclose(np.where(real, sel[1], 0), np.where(real, want_grad, 0),
                             rtol=1e-5, atol=1e-7)


def test_landmark_loss_custom_upsample_and_foreign_channels():
  logits, indices, valid, classes = _landmark_case(4, seed=1)
  nearest = lambda x: jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  got = _landmark_loss(logits, indices, valid, classes, nearest)
  want = _landmark_loss_all_channels(logits, indices, valid, nearest)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Channels outside an RoI's category are ignored even if marked valid.
  noisy = valid | (np.random.default_rng(2).random(valid.shape) < 0.5)
  again = _landmark_loss(logits, indices, noisy, classes, nearest)
  assert not np.array_equal(noisy, valid)
  own = noisy & df2.CATEGORY_LANDMARK_MASK[classes]
  np.testing.assert_allclose(
      again, _landmark_loss_all_channels(logits, indices, own, nearest),
      rtol=1e-5)


def test_landmark_loss_no_valid_is_zero_with_finite_grad():
  logits, indices, valid, classes = _landmark_case(4, seed=3)
  none = np.zeros_like(valid)
  loss, grad = jax.value_and_grad(_landmark_loss)(
      jnp.asarray(logits), indices, none, classes)
  assert float(loss) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_landmark_loss_grad_only_on_category_channels():
  logits, indices, valid, classes = _landmark_case(4, seed=4)
  grad = jax.grad(_landmark_loss)(jnp.asarray(logits), indices, valid,
                                        classes)
  touched = np.abs(np.asarray(grad)).sum(axis=(2, 3)) > 0   # [B, R, 294]
  assert not np.any(touched & ~df2.CATEGORY_LANDMARK_MASK[classes])
  np.testing.assert_array_equal(touched, valid)


# ---------------------------------------------------------------------- pair


def test_pair_loss_by_hand():
  logits = jnp.array([[[0.0, 2.0], [-1.0, 50.0]]])
  labels = jnp.array([[[1.0, 1.0], [0.0, 0.0]]])
  valid = jnp.array([[[True, True], [True, False]]])
  got = jax.jit(losses.pair_loss)(logits, labels, valid)
  np.testing.assert_allclose(got,
                             (LN2 + _softplus(-2.0) + _softplus(-1.0)) / 3,
                             rtol=1e-6)
  assert float(losses.pair_loss(logits, labels, jnp.zeros_like(valid))) == 0.0


def test_balanced_pair_loss_by_hand():
  # Positives (0, 0), (0, 1); negatives (1, 0) and (1, 2); (1, 1) is not valid.
  logits = jnp.array([[0.0, 2.0, 3.0], [-1.0, 50.0, 1.0]])
  labels = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
  valid = jnp.array([[True, True, False], [True, False, True]])
  got = jax.jit(losses.pair_loss, static_argnames="balanced")(logits, labels, valid,
                                                               balanced=True)
  pos = (LN2 + _softplus(-2.0)) / 2
  neg = (_softplus(-1.0) + _softplus(1.0)) / 2
  np.testing.assert_allclose(got, (pos + neg) / 2, rtol=1e-6)
  # One kind alone: its mean (not half of it); nothing valid: 0.
  only_neg = valid & (labels == 0)
  np.testing.assert_allclose(losses.pair_loss(logits, labels, only_neg, balanced=True), neg,
                             rtol=1e-6)
  assert float(losses.pair_loss(logits, labels, jnp.zeros_like(valid), balanced=True)) == 0.0


# --------------------------------------------------------------------- total


def test_total_loss():
  terms = {'a': jnp.asarray(1.0), 'b': jnp.asarray(2.0, jnp.bfloat16)}
  total, out = jax.jit(lambda t: losses.total_loss(t, {'b': 0.5}))(terms)
  np.testing.assert_allclose(total, 2.0)
  assert total.dtype == jnp.float32
  assert set(out) == {'a', 'b'} and out['b'].dtype == jnp.float32
  np.testing.assert_allclose(out['b'], 2.0)
  total, _ = losses.total_loss(terms)
  np.testing.assert_allclose(total, 3.0)
  with pytest.raises(ValueError, match='unknown'):
    losses.total_loss(terms, {'c': 1.0})
