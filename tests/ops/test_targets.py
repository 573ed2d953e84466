"""Tests for df2_jax.ops.sampling and df2_jax.ops.targets on hand cases."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipeline import deepfashion2 as df2
from df2_jax.ops import sampling
from df2_jax.ops import targets

_subsample = jax.jit(sampling.subsample_labels, static_argnums=(2, 3))
_sample_indices = jax.jit(sampling.sample_indices, static_argnums=(2, 3))
_match = jax.jit(targets.match, static_argnums=(2, 3, 4))
_rpn_targets = jax.jit(targets.rpn_targets, static_argnums=(4, 5, 6, 7))
_roi_targets = jax.jit(targets.roi_targets, static_argnums=(6, 7, 8))
_mask_targets_jit = jax.jit(targets.mask_targets, static_argnums=(4, 5, 6))
_landmark_targets = jax.jit(functools.partial(  # DeepFashion2's category channels
    targets.landmark_targets, own_channels=df2.CATEGORY_LANDMARK_MASK), static_argnums=(4, 5))
_pair_targets = jax.jit(targets.pair_targets)


def _labels(num_fg, num_bg, num_ignore=0, seed=0):
  lab = np.array([1] * num_fg + [0] * num_bg + [-1] * num_ignore, np.int32)
  return jnp.asarray(np.random.default_rng(seed).permutation(lab))


# ----------------------------------------------------------------- sampling


@pytest.mark.parametrize('num_fg,num_bg,want_fg,want_bg', [
    (100, 1000, 100, 412),   # fewer fg than the cap of 128
    (300, 1000, 128, 384),   # capped at 512 * 0.25
    (10, 1000, 10, 502),
    (10, 20, 10, 20),        # too few candidates: everything is sampled
    (0, 600, 0, 512),
])
def test_subsample_counts(num_fg, num_bg, want_fg, want_bg):
  labels = _labels(num_fg, num_bg, num_ignore=50)
  fg, bg = _subsample(jax.random.PRNGKey(1), labels, 512, 0.25)
  fg, bg, labels = np.asarray(fg), np.asarray(bg), np.asarray(labels)
  assert fg.sum() == want_fg and bg.sum() == want_bg
  assert np.all(labels[fg] == 1) and np.all(labels[bg] == 0)
  assert not np.any(fg & bg)


def test_subsample_exact_fractions():
  labels = _labels(100, 1000)
  fg, bg = _subsample(jax.random.PRNGKey(0), labels, 512, 0.25)
  assert int(fg.sum()) == 100 and int(bg.sum()) == 412
  labels = _labels(200, 1000)
  fg, bg = _subsample(jax.random.PRNGKey(0), labels, 512, 0.25)
  assert int(fg.sum()) == 128 and int(bg.sum()) == 384


def test_subsample_key_dependence():
  labels = _labels(300, 1000)
  a = _subsample(jax.random.PRNGKey(3), labels, 512, 0.25)
  b = _subsample(jax.random.PRNGKey(3), labels, 512, 0.25)
  c = _subsample(jax.random.PRNGKey(4), labels, 512, 0.25)
  np.testing.assert_array_equal(a[0], b[0])
  np.testing.assert_array_equal(a[1], b[1])
  assert not np.array_equal(a[0], c[0])
  assert not np.array_equal(a[1], c[1])


def test_subsample_is_uniform():
  # 20 fg candidates, 5 drawn: each is picked with probability 1/4.
  labels = jnp.asarray([1] * 20 + [-1] * 5, jnp.int32)
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  fg, bg = jax.vmap(lambda k: sampling.subsample_labels(k, labels, 5, 1.0))(
      keys)
  freq = np.asarray(fg).mean(0)
  assert np.all(np.asarray(fg).sum(1) == 5)
  assert not np.any(bg)
  np.testing.assert_allclose(freq[:20], 0.25, atol=0.035)
  assert np.all(freq[20:] == 0)


def test_positive_fraction_zero_and_one():
  labels = _labels(30, 30)
  fg, bg = _subsample(jax.random.PRNGKey(0), labels, 16, 0.0)
  assert int(fg.sum()) == 0 and int(bg.sum()) == 16
  fg, bg = _subsample(jax.random.PRNGKey(0), labels, 16, 1.0)
  assert int(fg.sum()) == 16 and int(bg.sum()) == 0


@pytest.mark.parametrize('num_fg,num_bg', [(100, 1000), (10, 20), (0, 5)])
def test_sample_indices_layout(num_fg, num_bg):
  labels = _labels(num_fg, num_bg, num_ignore=7)
  key = jax.random.PRNGKey(5)
  idx, valid, is_fg = _sample_indices(key, labels, 64, 0.25)
  idx, valid, is_fg = np.asarray(idx), np.asarray(valid), np.asarray(is_fg)
  n_fg = min(num_fg, 16)
  n_bg = min(num_bg, 64 - n_fg)
  assert idx.shape == valid.shape == is_fg.shape == (64,)
  np.testing.assert_array_equal(is_fg, np.arange(64) < n_fg)
  np.testing.assert_array_equal(valid, np.arange(64) < n_fg + n_bg)
  lab = np.asarray(labels)
  assert np.all(lab[idx[is_fg]] == 1)
  assert np.all(lab[idx[valid & ~is_fg]] == 0)
  assert np.all(idx[~valid] == 0)
  assert len(set(idx[valid].tolist())) == n_fg + n_bg
  # The same key selects the same sets as subsample_labels.
  fg, bg = _subsample(key, labels, 64, 0.25)
  assert set(np.flatnonzero(np.asarray(fg))) == set(idx[is_fg])
  assert set(np.flatnonzero(np.asarray(bg))) == set(idx[valid & ~is_fg])


# -------------------------------------------------------------------- match

_IOU = np.array([
    [0.8, 0.4, 0.1, 0.0, 0.65],
    [0.2, 0.6, 0.25, 0.0, 0.6],
    [0.9, 0.9, 0.9, 0.9, 0.9],   # padding: must be ignored
], np.float32)
_GT_VALID = np.array([True, True, False])


def test_match_rpn_without_low_quality():
  matched, labels = _match(_IOU, _GT_VALID, (0.3, 0.7), (0, -1, 1), False)
  np.testing.assert_array_equal(matched, [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(labels, [1, -1, 0, 0, -1])


def test_match_rpn_low_quality():
  # gt1's best IoU is 0.6, reached by predictions 1 and 4 (a tie): both
  # become fg; prediction 4 keeps its argmax gt0 (detectron2 semantics).
  matched, labels = _match(_IOU, _GT_VALID, (0.3, 0.7), (0, -1, 1), True)
  np.testing.assert_array_equal(matched, [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(labels, [1, 1, 0, 0, 1])


def test_match_roi_thresholds():
  matched, labels = _match(_IOU, _GT_VALID, (0.5,), (0, 1), False)
  np.testing.assert_array_equal(matched, [0, 1, 1, 0, 0])
  np.testing.assert_array_equal(labels, [1, 1, 0, 0, 1])
  # Exactly at the threshold is fg (>=), just below is bg.
  iou = np.array([[0.5, 0.4999]], np.float32)
  _, labels = _match(iou, np.array([True]), (0.5,), (0, 1), False)
  np.testing.assert_array_equal(labels, [1, 0])


def test_match_without_valid_gt_is_background():
  matched, labels = _match(_IOU, np.zeros(3, bool), (0.3, 0.7), (0, -1, 1),
                           True)
  np.testing.assert_array_equal(matched, [0] * 5)
  np.testing.assert_array_equal(labels, [0] * 5)


def test_match_zero_iou_gt_promotes_nothing():
  iou = np.array([[0.0, 0.0, 0.0], [0.1, 0.2, 0.0]], np.float32)
  _, labels = _match(iou, np.array([True, True]), (0.3, 0.7), (0, -1, 1),
                     True)
  np.testing.assert_array_equal(labels, [0, 1, 0])


# -------------------------------------------------------------- rpn_targets

_GT = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], np.float32)
_GT_OK = np.array([True, False])


def test_rpn_targets_by_hand():
  anchors = np.array([
      [0, 0, 10, 12],     # IoU 100 / 120 = 0.83 -> fg
      [0, 0, 10, 25],     # IoU 0.4 -> ignored
      [20, 20, 30, 30],   # IoU 0 -> bg
  ], np.float32)
  out = _rpn_targets(jax.random.PRNGKey(0), anchors, _GT, _GT_OK, 256, 0.5,
                     0.7, 0.3)
  np.testing.assert_array_equal(out['labels'], [1, -1, 0])
  # anchor centre (5, 6), size (10, 12); GT centre (5, 5), size (10, 10).
  np.testing.assert_allclose(out['deltas'][0],
                             [0.0, -1 / 12, 0.0, math.log(10 / 12)],
                             rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(out['deltas'][1:], 0.0)
  assert out['labels'].dtype == jnp.int32
  assert out['deltas'].dtype == jnp.float32


def test_rpn_targets_low_quality_match():
  anchors = np.array([
      [0, 0, 10, 20],     # IoU 0.5: ignored by threshold, best for the GT
      [0, 0, 20, 20],     # IoU 0.25 -> bg
      [40, 40, 50, 50],   # IoU 0 -> bg
  ], np.float32)
  out = _rpn_targets(jax.random.PRNGKey(0), anchors, _GT, _GT_OK, 256, 0.5,
                     0.7, 0.3)
  np.testing.assert_array_equal(out['labels'], [1, 0, 0])
  np.testing.assert_allclose(out['deltas'][0],
                             [0.0, -0.25, 0.0, math.log(0.5)], rtol=1e-6)


def test_rpn_targets_without_gt_all_background():
  anchors = np.array([[0, 0, 10, 12], [0, 0, 10, 25], [20, 20, 30, 30]],
                     np.float32)
  out = _rpn_targets(jax.random.PRNGKey(0), anchors, _GT, np.zeros(2, bool),
                     256, 0.5, 0.7, 0.3)
  np.testing.assert_array_equal(out['labels'], [0, 0, 0])
  np.testing.assert_array_equal(out['deltas'], 0.0)


def test_rpn_targets_sampling_cap():
  # 300 fg anchors (copies of the GT) and 300 bg: 128 fg + 128 bg of 256.
  anchors = np.concatenate([np.tile(_GT[:1], (300, 1)),
                            np.tile([[50, 50, 60, 60]], (300, 1))]).astype(
                                np.float32)
  out = _rpn_targets(jax.random.PRNGKey(2), anchors, _GT, _GT_OK, 256, 0.5,
                     0.7, 0.3)
  labels = np.asarray(out['labels'])
  assert (labels == 1).sum() == 128 and (labels == 0).sum() == 128
  assert np.all(labels[:300] != 0) and np.all(labels[300:] != 1)


def test_rpn_targets_vmapped():
  anchors = np.array([[0, 0, 10, 12], [0, 0, 10, 25], [20, 20, 30, 30]],
                     np.float32)
  gt = np.stack([_GT, _GT])
  ok = np.stack([_GT_OK, np.zeros(2, bool)])
  keys = jax.random.split(jax.random.PRNGKey(0), 2)
  out = jax.jit(jax.vmap(targets.rpn_targets, in_axes=(0, None, 0, 0)))(
      keys, anchors, gt, ok)
  np.testing.assert_array_equal(out['labels'], [[1, -1, 0], [0, 0, 0]])
  assert out['deltas'].shape == (2, 3, 4)



def test_rpn_targets_ignore_anchors_centred_in_the_padding():
  # Content 40 high x 30 wide on a larger canvas: anchors centred at x >= 30 or y >= 40 are
  # neither fg nor bg, whatever their IoU; the rest as without image_hw.
  anchors = np.array([
      [0, 0, 10, 12],     # centre (5, 6), IoU 0.83 -> fg
      [20, 20, 30, 30],   # centre (25, 25) -> bg
      [25, 0, 45, 10],    # centre (35, 5): in the padding on the right -> ignored
      [0, 35, 10, 50],    # centre (5, 42.5): in the padding below -> ignored
      [0, 0, 10, 10.5],   # centre (5, 5.25), IoU 0.95, a copy of the GT but for 0.5 px
  ], np.float32)
  free = _rpn_targets(jax.random.PRNGKey(0), anchors, _GT, _GT_OK, 256, 0.5, 0.7, 0.3)
  np.testing.assert_array_equal(free['labels'], [1, 0, 0, 0, 1])
  out = jax.jit(targets.rpn_targets, static_argnums=(4, 5, 6, 7))(
      jax.random.PRNGKey(0), anchors, _GT, _GT_OK, 256, 0.5, 0.7, 0.3, np.array([40, 30]))
  np.testing.assert_array_equal(out['labels'], [1, 0, -1, -1, 1])
  np.testing.assert_array_equal(out['deltas'][2:4], 0.0)
  # A GT whose only overlapping anchors are centred in the padding gets no fg anchor.
  gt = np.array([[26, 0, 30, 10], [0, 0, 0, 0]], np.float32)
  out = jax.jit(targets.rpn_targets, static_argnums=(4, 5, 6, 7))(
      jax.random.PRNGKey(0), anchors, gt, _GT_OK, 256, 0.5, 0.7, 0.3, np.array([40, 30]))
  assert (np.asarray(out['labels']) == 1).sum() == 0


# -------------------------------------------------------------- roi_targets

_RT_GT = np.array([[0, 0, 10, 10], [20, 20, 40, 40], [0, 0, 10, 10]],
                  np.float32)
_RT_CLS = np.array([3, 7, 0], np.int32)
_RT_GT_OK = np.array([True, True, False])
_RT_PROPS = np.array([
    [0, 0, 10, 11],     # p0: IoU 0.91 with g0 -> fg, class 3
    [20, 20, 40, 41],   # p1: IoU 0.95 with g1 -> fg, class 7
    [50, 50, 60, 60],   # p2: bg
    [0, 0, 10, 10],     # p3: invalid (would be fg)
    [60, 0, 70, 10],    # p4: bg
    [20, 20, 40, 40],   # p5: invalid (would be fg)
], np.float32)
_RT_PROPS_OK = np.array([True, True, True, False, True, False])


def _rows(a):
  return sorted(map(tuple, np.asarray(a).tolist()))


def test_roi_targets_by_hand():
  out = _roi_targets(jax.random.PRNGKey(0), _RT_PROPS, _RT_PROPS_OK, _RT_GT,
                     _RT_CLS, _RT_GT_OK, 8, 0.5, 0.5)
  rois, valid, fg = (np.asarray(out[k]) for k in ('rois', 'roi_valid',
                                                    'is_fg'))
  assert rois.shape == (8, 4) and out['box_deltas'].shape == (8, 4)
  # Candidates: p0, p1, g0, g1 fg; p2, p4 bg; 2 padding rows.
  np.testing.assert_array_equal(fg, [1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 1, 0, 0])
  assert _rows(rois[:4]) == _rows([_RT_PROPS[0], _RT_PROPS[1], _RT_GT[0],
                                   _RT_GT[1]])
  assert _rows(rois[4:6]) == _rows([_RT_PROPS[2], _RT_PROPS[4]])
  np.testing.assert_array_equal(rois[6:], 0.0)
  classes = np.asarray(out['classes'])
  matched = np.asarray(out['matched_gt'])
  deltas = np.asarray(out['box_deltas'])
  np.testing.assert_array_equal(classes[4:], 0)
  for i in range(4):
    box = tuple(rois[i].tolist())
    if box in (tuple(_RT_GT[0]), tuple(_RT_GT[1])):
      # An appended GT box is fg for its own GT with zero deltas.
      g = 0 if box == tuple(_RT_GT[0]) else 1
      assert matched[i] == g and classes[i] == _RT_CLS[g]
      np.testing.assert_allclose(deltas[i], 0.0, atol=1e-6)
    elif box == tuple(_RT_PROPS[0]):
      assert matched[i] == 0 and classes[i] == 3
      # RoI centre (5, 5.5), size (10, 11) -> GT (5, 5), (10, 10), weights
      # (10, 10, 5, 5).
      np.testing.assert_allclose(
          deltas[i], [0, 10 * -0.5 / 11, 0, 5 * math.log(10 / 11)],
          rtol=1e-5, atol=1e-6)
    else:
      assert matched[i] == 1 and classes[i] == 7
  np.testing.assert_array_equal(deltas[4:], 0.0)


def test_roi_targets_fraction_and_padding():
  out = _roi_targets(jax.random.PRNGKey(1), _RT_PROPS, _RT_PROPS_OK, _RT_GT,
                     _RT_CLS, _RT_GT_OK, 4, 0.25, 0.5)
  # 1 fg (4 * 0.25), the 2 bg candidates, 1 padding row.
  np.testing.assert_array_equal(out['is_fg'], [1, 0, 0, 0])
  np.testing.assert_array_equal(out['roi_valid'], [1, 1, 1, 0])
  assert int(out['classes'][0]) in (3, 7)


def test_roi_targets_always_num_samples_rows():
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  props = np.stack([_RT_PROPS] * 3)
  props_ok = np.stack([_RT_PROPS_OK, np.zeros(6, bool), np.zeros(6, bool)])
  gt_ok = np.stack([_RT_GT_OK, _RT_GT_OK, np.zeros(3, bool)])
  fn = jax.jit(jax.vmap(
      lambda k, p, pv, gv: targets.roi_targets(k, p, pv, _RT_GT, _RT_CLS, gv,
                                               num_samples=16)))
  out = fn(keys, props, props_ok, gt_ok)
  assert out['rois'].shape == (3, 16, 4)
  for k in ('roi_valid', 'classes', 'matched_gt', 'is_fg'):
    assert out[k].shape == (3, 16)
  # Image 1: only the 2 appended GT boxes are candidates, both fg.
  np.testing.assert_array_equal(out['roi_valid'][1].sum(), 2)
  np.testing.assert_array_equal(out['is_fg'][1].sum(), 2)
  # Image 2: no valid proposal, no valid GT: nothing to sample.
  assert not np.any(out['roi_valid'][2])
  np.testing.assert_array_equal(out['classes'][2], 0)


def test_roi_targets_without_gt_only_background():
  out = _roi_targets(jax.random.PRNGKey(0), _RT_PROPS, _RT_PROPS_OK, _RT_GT,
                     _RT_CLS, np.zeros(3, bool), 8, 0.25, 0.5)
  assert not np.any(out['is_fg'])
  # The 4 valid proposals, all bg (appended padded GT are invalid).
  assert int(out['roi_valid'].sum()) == 4
  np.testing.assert_array_equal(out['classes'], 0)


# ------------------------------------------------------------- mask_targets

_S = 8
_MASK_GT_BOX = np.array([10, 20, 26, 36], np.float32)  # 2 canvas px / crop px


def _crop(seed=0):
  return np.random.default_rng(seed).integers(0, 2, (_S, _S)).astype(np.uint8)


def _block_mean(a, f):
  h, w = a.shape
  return a.reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _crop_targets(crop, rois, output_size, ratio, threshold=None):
  masks = np.stack([np.zeros_like(crop), crop])   # the RoIs match GT 1
  boxes = np.stack([np.array([0, 0, 5, 5], np.float32), _MASK_GT_BOX])
  rois = np.asarray(rois, np.float32)
  return np.asarray(_mask_targets_jit(masks, boxes, rois,
                                  np.ones(len(rois), np.int32), output_size,
                                  ratio, threshold))


def test_mask_target_of_gt_box_reproduces_crop():
  crop = _crop()
  out = _crop_targets(crop, [_MASK_GT_BOX], _S, 1)
  np.testing.assert_allclose(out[0], crop, atol=1e-6)
  # 4 x 4 output with 2 x 2 samples per bin: the mean of each 2 x 2 block.
  out = _crop_targets(crop, [_MASK_GT_BOX], 4, 2)
  np.testing.assert_allclose(out[0], _block_mean(crop.astype(float), 2),
                             atol=1e-6)
  assert out.dtype == np.float32


def test_mask_target_right_half():
  crop = _crop(1)
  right = [18, 20, 26, 36]
  out = _crop_targets(crop, [right], (_S, _S // 2), 1)
  np.testing.assert_allclose(out[0], crop[:, _S // 2:], atol=1e-6)
  # Square 4 x 4 grid: bins 1 crop column wide, 2 crop rows tall; the one
  # sample per bin sits between two rows.
  out = _crop_targets(crop, [right], 4, 1)
  want = 0.5 * (crop[0::2, 4:] + crop[1::2, 4:].astype(float))
  np.testing.assert_allclose(out[0], want, atol=1e-6)


def test_mask_target_is_zero_outside_gt_box():
  crop = np.ones((_S, _S), np.uint8)
  left = [-6, 20, 10, 36]   # entirely left of the GT box
  out = _crop_targets(crop, [left], 4, 2)
  np.testing.assert_allclose(out[0], 0.0, atol=1e-6)
  # A RoI twice the box's size, centred on it: 8 bins of 2 crop pixels;
  # the 2 outer bins on each side lie outside the box.
  crop = _crop(2)
  big = [2, 12, 34, 44]
  out = _crop_targets(crop, [big], 8, 1)
  want = np.zeros((8, 8))
  want[2:6, 2:6] = _block_mean(crop.astype(float), 2)
  np.testing.assert_allclose(out[0], want, atol=1e-6)


def test_mask_target_threshold_and_matching():
  crop = _crop(3)
  masks = np.stack([crop, 1 - crop])
  boxes = np.stack([_MASK_GT_BOX, _MASK_GT_BOX + 100])
  rois = np.stack([_MASK_GT_BOX + 100, _MASK_GT_BOX])
  out = np.asarray(_mask_targets_jit(masks, boxes, rois, np.array([1, 0]),
                                     _S, 1, None))
  np.testing.assert_allclose(out[0], 1 - crop, atol=1e-6)
  np.testing.assert_allclose(out[1], crop, atol=1e-6)
  soft = _crop_targets(crop, [_MASK_GT_BOX], 4, 2)
  hard = _crop_targets(crop, [_MASK_GT_BOX], 4, 2, 0.5)
  np.testing.assert_array_equal(hard[0], (soft[0] >= 0.5).astype(np.float32))


def test_mask_targets_matmul_method_equals_gather():
  crop = _crop(3)
  masks = np.stack([crop, 1 - crop])
  boxes = np.stack([_MASK_GT_BOX, _MASK_GT_BOX + 100]).astype(np.float32)
  rois = np.array([[18, 20, 26, 36], [2, 12, 34, 44], [-6, 20, 10, 36], [120, 125, 130, 133]],
                  np.float32)
  matched = np.array([1, 1, 0, 1], np.int32)
  run = jax.jit(targets.mask_targets, static_argnums=(4, 5, 6, 7))
  gather = run(masks, boxes, rois, matched, 7, 2, None, "gather")
  matmul = run(masks, boxes, rois, matched, 7, 2, None, "matmul")
  assert float(jnp.max(gather)) > 0.5
  np.testing.assert_allclose(matmul, gather, atol=1e-6)


def test_mask_targets_vmapped():
  crop = _crop()
  masks = np.stack([crop[None], 1 - crop[None]])  # [B=2, M=1, S, S]
  boxes = np.tile(_MASK_GT_BOX, (2, 1, 1))
  fn = jax.jit(jax.vmap(lambda m, b, r, g: targets.mask_targets(
      m, b, r, g, output_size=_S, sampling_ratio=1)))
  out = fn(masks, boxes, boxes, np.zeros((2, 1), np.int32))
  assert out.shape == (2, 1, _S, _S)
  np.testing.assert_allclose(out[1, 0], 1 - crop, atol=1e-6)


# --------------------------------------------------------- landmark_targets


def _landmarks(points):
  lm = np.zeros((df2.NUM_LANDMARKS, 3), np.float32)
  for ch, p in points.items():
    lm[ch] = p
  return lm


def test_landmark_targets_by_hand():
  roi = np.array([[10, 20, 66, 76]], np.float32)   # 56 x 56: 1 px per bin
  lm = _landmarks({
      0: (10, 20, 2),        # top-left corner -> bin (0, 0)
      1: (15.5, 30.2, 1),    # x 5, y 10 -> 565
      2: (66, 76, 2),        # bottom-right corner -> last bin 3135
      3: (66.01, 30, 2),     # right of the RoI
      4: (9.99, 30, 2),      # left of the RoI
      5: (20, 30, 0),        # unlabelled
      6: (40, 50, 1),        # occluded: x 30, y 30 -> 1710
      30: (20, 30, 2),       # a category-2 channel
  })
  gt = np.stack([np.zeros_like(lm), lm])
  idx, valid = _landmark_targets(gt, roi, np.array([1]), np.array([1]), 56,
                                 False)
  idx, valid = np.asarray(idx)[0], np.asarray(valid)[0]
  assert idx.dtype == np.int32 and idx.shape == (294,)
  np.testing.assert_array_equal(np.flatnonzero(valid), [0, 1, 2, 6])
  np.testing.assert_array_equal(idx[[0, 1, 2, 6]], [0, 565, 3135, 1710])
  assert np.all(idx[~valid] == 0)
  # Visible only: the occluded point drops out.
  _, vis = _landmark_targets(gt, roi, np.array([1]), np.array([1]), 56, True)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(vis)[0]), [0, 2])
  # The same points for a category-2 RoI: only channel 30 counts.
  _, v2 = _landmark_targets(gt, roi, np.array([1]), np.array([2]), 56, False)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(v2)[0]), [30])
  # Background RoIs have no landmarks.
  _, v0 = _landmark_targets(gt, roi, np.array([1]), np.array([0]), 56, False)
  assert not np.any(v0)


def test_landmark_targets_scaled_roi_and_edges():
  rois = np.array([[0, 0, 112, 28],     # 2 px per bin in x, 0.5 in y
                   [0, 0, 0, 10]], np.float32)   # degenerate
  lm = _landmarks({0: (100, 10, 2), 1: (112, 5, 2), 2: (3, 28, 2),
                   3: (112, 28.5, 2)})
  idx, valid = _landmark_targets(lm[None], rois, np.zeros(2, np.int32),
                                 np.array([1, 1]), 56, False)
  idx, valid = np.asarray(idx), np.asarray(valid)
  # (100, 10) -> x 50, y 20; right edge -> x 55; bottom edge -> y 55.
  np.testing.assert_array_equal(np.flatnonzero(valid[0]), [0, 1, 2])
  np.testing.assert_array_equal(idx[0, :3],
                                [20 * 56 + 50, 10 * 56 + 55, 55 * 56 + 1])
  assert not np.any(valid[1])


# ------------------------------------------------------------- pair_targets


def test_pair_targets_by_hand():
  labels, valid = _pair_targets(
      np.array([5, 5, 5, 5]), np.array([1, 2, 0, 1]),
      np.array([True, True, True, False]),
      np.array([5, 5, 6]), np.array([1, 0, 1]), np.array([True, True, True]))
  np.testing.assert_array_equal(labels, [[1, 0, 0],
                                         [0, 0, 0],
                                         [0, 0, 0],    # style 0 never matches
                                         [0, 0, 0]])
  np.testing.assert_array_equal(valid, [[1, 1, 1]] * 3 + [[0, 0, 0]])
  assert labels.dtype == jnp.float32 and valid.dtype == jnp.bool_


def test_pair_targets_vmapped_over_pairs():
  fn = jax.jit(jax.vmap(targets.pair_targets))
  pid = np.array([[1, 2], [3, 3]])
  style = np.array([[1, 1], [2, 1]])
  ok = np.ones((2, 2), bool)
  labels, valid = fn(pid, style, ok, pid, style, ok)
  np.testing.assert_array_equal(labels, [[[1, 0], [0, 1]], [[1, 0], [0, 1]]])
  assert np.all(valid)
