"""Tests for df2_jax.ops.nms against a brute-force greedy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from df2_jax.ops import nms as nms_ops


def _iou_ref(a, b):
  """torchvision's IoU in float32; 0 instead of NaN for empty unions."""
  a = a.astype(np.float32)
  b = b.astype(np.float32)
  iw = max(np.float32(0), min(a[2], b[2]) - max(a[0], b[0]))
  ih = max(np.float32(0), min(a[3], b[3]) - max(a[1], b[1]))
  inter = np.float32(iw * ih)
  if inter <= 0:
    return np.float32(0)
  area = lambda x: max(np.float32(0), x[2] - x[0]) * max(np.float32(0),
                                                          x[3] - x[1])
  return np.float32(inter / (area(a) + area(b) - inter))


def _greedy_ref(boxes, scores, thr, valid=None, classes=None):
  """Brute-force greedy NMS; returns the kept indices in selection order."""
  n = len(scores)
  valid = np.ones(n, bool) if valid is None else valid
  valid = valid & ~np.isnan(scores) & (scores > -np.inf)
  keep = []
  for i in np.argsort(-scores, kind='stable'):
    if not valid[i]:
      continue
    if all((classes is not None and classes[i] != classes[j])
           or _iou_ref(boxes[i], boxes[j]) <= thr for j in keep):
      keep.append(int(i))
  return keep


def _random_case(rng, n, num_pad, tie_levels=None):
  # Crowded: about half of the valid boxes get suppressed at IoU 0.5.
  centres = rng.uniform(0, 40, (n, 2))
  sizes = rng.uniform(8, 30, (n, 2))
  boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], -1)
  scores = rng.uniform(0, 1, n)
  if tie_levels:
    scores = np.round(scores * tie_levels) / tie_levels  # many ties
  valid = np.ones(n, bool)
  pad = rng.choice(n, num_pad, replace=False)
  valid[pad[: num_pad // 2]] = False
  scores[pad[num_pad // 2:]] = -np.inf
  boxes[pad[: num_pad // 3]] = 0.  # all-zero padded boxes
  boxes[rng.choice(n, 2, replace=False)] = [[5., 5., 5., 9.],
                                            [7., 7., 7., 7.]]  # empty
  return (boxes.astype(np.float32), scores.astype(np.float32), valid)


def _check(indices, valid, expected, max_output):
  indices, valid = np.asarray(indices), np.asarray(valid)
  assert indices.shape == (max_output,) and indices.dtype == np.int32
  k = min(len(expected), max_output)
  np.testing.assert_array_equal(valid, np.arange(max_output) < k)
  np.testing.assert_array_equal(indices[:k], expected[:k])
  np.testing.assert_array_equal(indices[k:], 0)


@functools.partial(jax.jit, static_argnames=('max_output', 'tile'))
def _nms(boxes, scores, valid, thr, max_output, tile):
  return nms_ops.nms(boxes, scores, thr, max_output, valid=valid,
                     tile_size=tile)


def test_hand_example():
  boxes = jnp.array([[0., 0., 10., 10.],    # 0: score .9, kept
                     [1., 1., 11., 11.],    # 1: IoU 81/119 = .68 with 0
                     [20., 20., 30., 30.],  # 2: disjoint, kept
                     [0., 0., 10., 10.]])   # 3: duplicate of 0, ties 0
  scores = jnp.array([0.9, 0.8, 0.7, 0.9])
  valid = jnp.ones(4, bool)
  idx, ok = _nms(boxes, scores, valid, 0.5, max_output=4, tile=256)
  np.testing.assert_array_equal(idx, [0, 2, 0, 0])
  np.testing.assert_array_equal(ok, [True, True, False, False])
  # At threshold 0.7 box 1 survives (0.68 <= 0.7); box 3 (IoU 1) never does.
  idx, ok = _nms(boxes, scores, valid, 0.7, max_output=4, tile=256)
  np.testing.assert_array_equal(idx, [0, 1, 2, 0])
  np.testing.assert_array_equal(ok, [True, True, True, False])


@pytest.mark.parametrize('thr', [0.3, 0.5, 0.7])
def test_matches_greedy_reference(thr):
  n, seeds = 70, range(4)
  for seed in seeds:
    rng = np.random.default_rng(seed)
    boxes, scores, valid = _random_case(rng, n, num_pad=12,
                                        tie_levels=8 if seed % 2 else None)
    expected = _greedy_ref(boxes, scores, thr, valid)
    assert 10 < len(expected) < n - 12  # some suppression happens
    args = (jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(valid), thr)
    # Several tiles (16 -> 5 tiles, the last one padded), a single tile, and
    # a truncated output (the loop over tiles stops early).
    for tile, max_output in [(16, 80), (256, 80), (16, 8)]:
      idx, ok = _nms(*args, max_output=max_output, tile=tile)
      _check(idx, ok, expected, max_output)


def test_chain_needs_many_fixed_point_iterations():
  # 10x10 boxes shifted by 1 pixel: neighbours overlap by IoU 90 / 110 = 0.82,
  # boxes two apart by 80 / 120 = 0.67. At threshold 0.8 greedy keeps every
  # other box, and inside one tile the fixed point takes ~n iterations.
  n = 24
  x = np.arange(n, dtype=np.float32)
  boxes = np.stack([x, np.zeros(n), x + 10, np.full(n, 10.)], -1)
  boxes = boxes.astype(np.float32)
  scores = np.linspace(1, 0.5, n).astype(np.float32)
  expected = _greedy_ref(boxes, scores, 0.8)
  idx, ok = _nms(jnp.asarray(boxes), jnp.asarray(scores),
                 jnp.ones(n, bool), 0.8, max_output=n, tile=32)
  assert expected == list(range(0, n, 2))
  _check(idx, ok, expected, n)


def test_all_invalid_and_nan_scores():
  boxes = jnp.tile(jnp.array([[0., 0., 4., 4.]]), (5, 1))
  scores = jnp.array([jnp.nan, -jnp.inf, 0.5, 0.6, 0.7])
  idx, ok = _nms(boxes, scores,
                 jnp.array([True, True, False, False, False]), 0.5,
                 max_output=3, tile=256)
  np.testing.assert_array_equal(ok, [False] * 3)
  np.testing.assert_array_equal(idx, [0] * 3)
  # Invalid boxes do not suppress valid ones: 4 (score .7) is invalid, so 3
  # (score .6) is kept and suppresses 2.
  idx, ok = _nms(boxes, scores,
                 jnp.array([True, True, True, True, False]), 0.5,
                 max_output=3, tile=256)
  np.testing.assert_array_equal(idx, [3, 0, 0])
  np.testing.assert_array_equal(ok, [True, False, False])


@functools.partial(jax.jit, static_argnames=('max_output', 'tile'))
def _batched(boxes, scores, classes, valid, thr, max_output, tile):
  return nms_ops.batched_nms(boxes, scores, classes, valid, thr, max_output,
                             tile_size=tile)


def test_batched_class_aware_matches_reference():
  rng = np.random.default_rng(7)
  b, n, k = 3, 60, 50
  cases = [_random_case(rng, n, num_pad=8, tie_levels=10) for _ in range(b)]
  boxes = np.stack([c[0] for c in cases])
  scores = np.stack([c[1] for c in cases])
  valid = np.stack([c[2] for c in cases])
  classes = rng.integers(1, 4, (b, n)).astype(np.int32)
  idx, ok = _batched(jnp.asarray(boxes), jnp.asarray(scores),
                     jnp.asarray(classes), jnp.asarray(valid), 0.5,
                     max_output=k, tile=16)
  assert idx.shape == (b, k) and ok.shape == (b, k)
  for i in range(b):
    expected = _greedy_ref(boxes[i], scores[i], 0.5, valid[i], classes[i])
    _check(idx[i], ok[i], expected, k)
    # Class-agnostic NMS would keep fewer boxes.
    assert len(expected) > len(_greedy_ref(boxes[i], scores[i], 0.5,
                                           valid[i]))


def test_batched_never_suppresses_across_classes():
  box = [10., 10., 50., 50.]
  boxes = jnp.array([[box, box, box, [11., 11., 50., 50.]]])
  scores = jnp.array([[0.9, 0.8, 0.7, 0.6]])
  classes = jnp.array([[1, 2, 1, 3]])
  valid = jnp.ones((1, 4), bool)
  idx, ok = _batched(boxes, scores, classes, valid, 0.5, max_output=4,
                     tile=256)
  # Box 2 is suppressed by box 0 (same class 1); 1 and 3 have their own class.
  np.testing.assert_array_equal(idx, [[0, 1, 3, 0]])
  np.testing.assert_array_equal(ok, [[True, True, True, False]])
