"""Tests for df2_jax.ops.proposals with hand-checkable numbers."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from df2_jax.ops import anchors as anchor_ops
from df2_jax.ops import proposals

# Level 0: a0 and a1 overlap with IoU 9.5^2 / (200 - 9.5^2) = 0.822 > 0.7.
# Level 1: a2, and a3, a copy of a0 (a different level: never suppressed).
ANCHORS = [np.array([[0, 0, 10, 10], [0.5, 0.5, 10.5, 10.5]], np.float32),
           np.array([[20, 20, 40, 40], [0, 0, 10, 10]], np.float32)]


def _hand_case():
  logits = np.array([[2.0, 1.0, 0.5, 0.1],
                     [1.0, 2.0, -1.0, 3.0]], np.float32)
  deltas = np.zeros((2, 4, 4), np.float32)
  # a2 in image 0: centre (30, 30) + 0.5 * 20 in x, width 20 * exp(ln 2):
  # [20, 20, 60, 40] before clipping to the 35 x 50 content.
  deltas[0, 2] = [0.5, 0.0, math.log(2.0), 0.0]
  image_hw = np.array([[35, 50], [8, 8]], np.float32)
  return logits, deltas, image_hw


def test_hand_case_decode_clip_and_per_level_nms():
  logits, deltas, image_hw = _hand_case()
  boxes, scores, valid = proposals.generate_proposals(
      logits, deltas, ANCHORS, image_hw, pre_nms_topk=10, post_nms_topk=4)
  assert boxes.shape == (2, 4, 4) and scores.shape == (2, 4)
  assert boxes.dtype == jnp.float32 and valid.dtype == jnp.bool_
  # Image 0: a0 (2.0), a1 suppressed by a0, a2 clipped (0.5), a3 (0.1).
  np.testing.assert_array_equal(valid[0], [True, True, True, False])
  np.testing.assert_allclose(boxes[0], [[0, 0, 10, 10], [20, 20, 50, 35],
                                        [0, 0, 10, 10], [0, 0, 0, 0]],
                             atol=1e-5)
  np.testing.assert_array_equal(scores[0], np.float32([2.0, 0.5, 0.1, -np.inf]))
  # Image 1 (8 x 8): a3 (3.0) -> [0, 0, 8, 8]; a1 (2.0) -> [.5, .5, 8, 8];
  # a0 (1.0) -> [0, 0, 8, 8] has IoU 56.25 / 64 = 0.88 with a1: suppressed;
  # a2 clips to the empty [8, 8, 8, 8]: invalid.
  np.testing.assert_array_equal(valid[1], [True, True, False, False])
  np.testing.assert_allclose(boxes[1, :2], [[0, 0, 8, 8], [0.5, 0.5, 8, 8]])
  np.testing.assert_array_equal(boxes[1, 2:], 0.0)
  np.testing.assert_array_equal(scores[1], [3.0, 2.0, -np.inf, -np.inf])


def test_jit_matches_eager_and_has_no_gradient():
  logits, deltas, image_hw = _hand_case()
  fn = functools.partial(proposals.generate_proposals,
                         anchors_by_level=ANCHORS, pre_nms_topk=10,
                         post_nms_topk=4)
  eager = fn(logits, deltas, image_hw=image_hw)
  jitted = jax.jit(fn)(logits, deltas, image_hw=image_hw)
  for a, b in zip(eager, jitted):
    np.testing.assert_array_equal(a, b)
  grad = jax.grad(lambda d: jnp.sum(
      fn(logits, d, image_hw=image_hw)[0]))(jnp.asarray(deltas))
  np.testing.assert_array_equal(grad, 0.0)


def _disjoint_level(n):
  """n disjoint 10 x 10 anchors in a row."""
  x = np.arange(n, dtype=np.float32) * 20
  return np.stack([x, np.zeros(n), x + 10, np.full(n, 10.0)], -1)


def test_pre_and_post_nms_topk_bounds():
  anchors = [_disjoint_level(5)]
  logits = np.array([[0.0, 4.0, 1.0, 3.0, 2.0]], np.float32)
  deltas = np.zeros((1, 5, 4), np.float32)
  hw = np.array([[100, 200]], np.float32)
  # pre_nms_topk 2: only anchors 1 and 3 can survive; 3 padding rows.
  boxes, scores, valid = proposals.generate_proposals(
      logits, deltas, anchors, hw, pre_nms_topk=2, post_nms_topk=5)
  np.testing.assert_array_equal(valid[0], [True, True, False, False, False])
  np.testing.assert_array_equal(scores[0, :2], [4.0, 3.0])
  np.testing.assert_array_equal(boxes[0, :2, 0], [20, 60])
  # post_nms_topk 3: the 3 best of 5.
  boxes, scores, valid = proposals.generate_proposals(
      logits, deltas, anchors, hw, pre_nms_topk=100, post_nms_topk=3)
  assert bool(jnp.all(valid))
  np.testing.assert_array_equal(scores[0], [4.0, 3.0, 2.0])
  np.testing.assert_array_equal(boxes[0, :, 0], [20, 60, 80])


def test_topk_is_per_level():
  # pre_nms_topk 1 keeps the best of each level even if a level's best is
  # worse than the other level's second best.
  anchors = [_disjoint_level(3), _disjoint_level(3) + [0, 50, 0, 50]]
  logits = np.array([[5.0, 4.0, 3.0, 0.0, -1.0, -2.0]], np.float32)
  boxes, scores, valid = proposals.generate_proposals(
      logits, np.zeros((1, 6, 4), np.float32), anchors,
      np.array([[100, 100]], np.float32), pre_nms_topk=1, post_nms_topk=3)
  np.testing.assert_array_equal(valid[0], [True, True, False])
  np.testing.assert_array_equal(scores[0, :2], [5.0, 0.0])
  np.testing.assert_array_equal(boxes[0, 1], [0, 50, 10, 60])


def test_min_size_nonfinite_and_scale_clamp():
  anchors = [_disjoint_level(4)]
  logits = np.array([[4.0, 3.0, np.nan, 1.0]], np.float32)
  deltas = np.zeros((1, 4, 4), np.float32)
  deltas[0, 0, 2] = math.log(0.2)  # width 2: not > min_size 2
  deltas[0, 1, 2] = 10.0  # clamped at log(1000 / 16): width 625 about x = 25
  deltas[0, 3, 0] = np.inf  # non-finite box
  boxes, scores, valid = proposals.generate_proposals(
      logits, deltas, anchors, np.array([[1000, 1000]], np.float32),
      pre_nms_topk=4, post_nms_topk=4, min_size=2.0)
  np.testing.assert_array_equal(valid[0], [True, False, False, False])
  np.testing.assert_allclose(boxes[0, 0], [0, 0, 337.5, 10], rtol=1e-5)
  assert scores[0, 0] == 3.0
  assert np.all(np.isfinite(boxes))


def test_batched_random_on_fpn_anchors():
  canvas = (64, 96)
  anchors = anchor_ops.fpn_anchors(canvas)
  n = sum(a.shape[0] for a in anchors)
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, n)).astype(np.float32)
  deltas = (0.3 * rng.normal(size=(2, n, 4))).astype(np.float32)
  image_hw = np.array([[64, 96], [50, 70]], np.float32)
  fn = jax.jit(functools.partial(
      proposals.generate_proposals, anchors_by_level=anchors,
      pre_nms_topk=100, post_nms_topk=150))
  boxes, scores, valid = fn(logits, deltas, image_hw=image_hw)
  assert boxes.shape == (2, 150, 4)
  # At most 100 + 100 + 72 + 18 + 6 candidates per image; survivors first,
  # sorted by decreasing logit, inside the content, and not empty.
  for i in range(2):
    k = int(valid[i].sum())
    assert 0 < k <= 150 and bool(jnp.all(valid[i, :k]))
    s = np.asarray(scores[i, :k])
    assert np.all(np.diff(s) <= 0)
    b = np.asarray(boxes[i, :k])
    assert np.all(b[:, 2] > b[:, 0]) and np.all(b[:, 3] > b[:, 1])
    assert np.all(b >= 0)
    assert np.all(b[:, [0, 2]] <= image_hw[i, 1])
    assert np.all(b[:, [1, 3]] <= image_hw[i, 0])
    assert np.all(np.asarray(scores[i, k:]) == -np.inf)


def test_shape_mismatch_raises():
  with pytest.raises(ValueError):
    proposals.generate_proposals(np.zeros((1, 3)), np.zeros((1, 3, 4)),
                                 ANCHORS, np.ones((1, 2)), 10, 4)
