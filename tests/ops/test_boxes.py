"""Tests for df2_jax.ops.boxes: hand-checkable IoUs and box transforms."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from df2_jax.ops import boxes as box_ops

# Jitted once per shape: much faster on CPU than op-by-op dispatch.
_iou = jax.jit(box_ops.pairwise_iou)


def test_box_area_hand_values():
  b = jnp.array([[0., 0., 2., 3.], [1., 1., 1., 5.], [3., 3., 1., 1.]])
  np.testing.assert_allclose(box_ops.box_area(b), [6., 0., 0.])


def test_pairwise_iou_hand_values():
  a = jnp.array([[0., 0., 2., 2.], [0., 0., 1., 1.]])
  b = jnp.array([[1., 1., 3., 3.], [0., 0., 2., 2.], [5., 5., 6., 6.]])
  iou = _iou(a, b)
  assert iou.shape == (2, 3)
  # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7.
  expected = [[1. / 7., 1., 0.],
              [0., 1. / 4., 0.]]
  np.testing.assert_allclose(iou, expected, rtol=1e-6)


def test_pairwise_iou_empty_and_padded_boxes_are_zero_not_nan():
  a = jnp.array([[0., 0., 0., 0.], [2., 2., 2., 5.], [0., 0., 2., 2.]])
  b = jnp.array([[0., 0., 0., 0.], [0., 0., 2., 2.], [1., 1., 1., 1.]])
  iou = np.asarray(_iou(a, b))
  assert np.all(np.isfinite(iou))
  np.testing.assert_allclose(iou, [[0., 0., 0.], [0., 0., 0.], [0., 1., 0.]])
  # Gradients through padded boxes stay finite too.
  g = jax.jit(jax.grad(lambda x: box_ops.pairwise_iou(x, b).sum()))(a)
  assert np.all(np.isfinite(np.asarray(g)))


def test_pairwise_iou_batched_matches_per_image():
  rng = np.random.default_rng(0)
  xy = rng.uniform(0, 50, (3, 5, 2))
  a = np.concatenate([xy, xy + rng.uniform(1, 30, (3, 5, 2))], -1)
  xy = rng.uniform(0, 50, (3, 7, 2))
  b = np.concatenate([xy, xy + rng.uniform(1, 30, (3, 7, 2))], -1)
  a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
  batched = jax.jit(box_ops.batched_pairwise_iou)(a, b)
  assert batched.shape == (3, 5, 7)
  per_image = jax.jit(jax.vmap(box_ops.pairwise_iou))(a, b)
  np.testing.assert_allclose(batched, per_image, rtol=1e-6)
  np.testing.assert_allclose(
      jax.jit(box_ops.elementwise_iou)(a[:, :5], b[:, :5]),
      np.stack([np.diag(np.asarray(batched[i])) for i in range(3)]),
      rtol=1e-6)


def test_clip_boxes():
  b = jnp.array([[-5., 2., 50., 70.], [10., -1., 20., 30.]])
  np.testing.assert_allclose(box_ops.clip_boxes(b, (40, 30)),
                             [[0., 2., 30., 40.], [10., 0., 20., 30.]])
  # Per-image sizes [B, 2] with boxes [B, N, 4].
  bb = jnp.stack([b, b])
  out = box_ops.clip_boxes(bb, jnp.array([[40., 30.], [25., 15.]]))
  np.testing.assert_allclose(out[1], [[0., 2., 15., 25.], [10., 0., 15., 25.]])


def test_nonempty():
  b = jnp.array([[0., 0., 1., 1.], [0., 0., 0., 1.], [0., 0., 2., 0.5]])
  np.testing.assert_array_equal(box_ops.nonempty(b), [True, False, True])
  np.testing.assert_array_equal(box_ops.nonempty(b, 0.75),
                                [True, False, False])


def test_encode_hand_values():
  anchors = jnp.array([[0., 0., 10., 10.]])
  boxes = jnp.array([[1., 1., 11., 11.]])
  # Centre shift 1 on a width of 10, same size.
  np.testing.assert_allclose(box_ops.encode(boxes, anchors, (10, 10, 5, 5)),
                             [[1., 1., 0., 0.]], atol=1e-6)
  boxes = jnp.array([[-5., 0., 15., 10.]])  # twice as wide, same centre
  np.testing.assert_allclose(box_ops.encode(boxes, anchors),
                             [[0., 0., math.log(2.), 0.]], atol=1e-6)


@pytest.mark.parametrize('weights', [(1., 1., 1., 1.), (10., 10., 5., 5.)])
def test_encode_decode_round_trip(weights):
  rng = np.random.default_rng(1)
  def rand_boxes(n):
    xy = rng.uniform(0, 500, (n, 2))
    return np.concatenate([xy, xy + rng.uniform(4, 300, (n, 2))], -1)
  anchors = jnp.asarray(rand_boxes(50), jnp.float32)
  boxes = jnp.asarray(rand_boxes(50), jnp.float32)
  round_trip = jax.jit(
      lambda b, a: box_ops.decode(box_ops.encode(b, a, weights), a, weights))
  np.testing.assert_allclose(round_trip(boxes, anchors), boxes,
                             rtol=1e-5, atol=1e-3)


def test_decode_clamps_scale():
  anchors = jnp.array([[0., 0., 16., 16.]])
  out = box_ops.decode(jnp.array([[0., 0., 100., -1.]]), anchors)
  # exp(dw) is clamped to 1000/16: width 16 * 1000 / 16 = 1000 around x = 8.
  w = out[0, 2] - out[0, 0]
  h = out[0, 3] - out[0, 1]
  np.testing.assert_allclose([w, h], [1000., 16. * math.exp(-1.)], rtol=1e-5)
  np.testing.assert_allclose((out[0, 0] + out[0, 2]) / 2, 8., atol=1e-4)


def test_encode_padded_boxes_is_finite():
  anchors = jnp.array([[0., 0., 0., 0.], [0., 0., 4., 4.]])
  boxes = jnp.zeros((2, 4))
  assert np.all(np.isfinite(np.asarray(box_ops.encode(boxes, anchors))))
