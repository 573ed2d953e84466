"""Loss terms of Match R-CNN, normalised as detectron2 normalises them.

One function per term; each takes batched [B, ...] model outputs and targets
(from df2_jax.ops.targets, vmapped over the batch), computes in float32 and
returns float32 scalars. Masked entries never reach a loss (every masked
value is finite, so no NaN gradient leaks through a `where`).

Class conventions: 0 = background, 1..13 = DeepFashion2 categories; class
logits are [.., 14] with background at index 0; class-specific box deltas
and mask logits hold the 13 foreground classes, class c at index c - 1.
"""

from typing import Callable, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from df2_jax.models.landmark_head import upsample_heatmaps

Array = jnp.ndarray


def sigmoid_bce(logits: Array, targets: Array) -> Array:
  """Elementwise binary cross-entropy with logits (float32, stable)."""
  x = jnp.asarray(logits, jnp.float32)
  z = jnp.asarray(targets, jnp.float32)
  return jnp.maximum(x, 0.0) - x * z + jnp.log1p(jnp.exp(-jnp.abs(x)))


def smooth_l1(diff: Array, beta: float = 0.0) -> Array:
  """detectron2 smooth_l1_loss, elementwise; beta < 1e-5 gives |diff|."""
  a = jnp.abs(jnp.asarray(diff, jnp.float32))
  if beta < 1e-5:
    return a
  return jnp.where(a < beta, 0.5 * a * a / beta, a - 0.5 * beta)


def _safe_div(num: Array, den: Array) -> Array:
  """num / den, and 0 where den == 0 (then num is 0 too)."""
  return num / jnp.maximum(den, 1.0)


def rpn_losses(logits: Array, deltas: Array, labels: Array,
               target_deltas: Array, batch_size_per_image: int = 256,
               smooth_l1_beta: float = 0.0) -> Tuple[Array, Array]:
  """RPN objectness and box losses (detectron2 StandardRPNHead losses).

  Objectness: BCE with logits over sampled anchors (labels >= 0, target
  labels == 1). Box: smooth L1 (beta 0: L1) over fg anchors. Both are sums
  divided by batch_size_per_image * B, not by the number actually sampled.

  Args:
    logits: [B, A] objectness logits, all levels concatenated.
    deltas: [B, A, 4] predicted anchor deltas.
    labels: [B, A] int in {-1 not sampled, 0 bg, 1 fg} (rpn_targets).
    target_deltas: [B, A, 4] (rpn_targets; finite everywhere).
    batch_size_per_image: static RPN.BATCH_SIZE_PER_IMAGE.
    smooth_l1_beta: static RPN.SMOOTH_L1_BETA.

  Returns:
    (objectness, box) float32 scalars.
  """
  sampled = labels >= 0
  fg = labels == 1
  norm = float(batch_size_per_image * labels.shape[0])
  bce = sigmoid_bce(logits, fg)
  objectness = jnp.sum(jnp.where(sampled, bce, 0.0)) / norm
  l1 = smooth_l1(jnp.asarray(deltas, jnp.float32) - target_deltas,
                 smooth_l1_beta)
  box = jnp.sum(jnp.where(fg[..., None], l1, 0.0)) / norm
  return objectness, box


def box_head_losses(class_logits: Array, box_deltas: Array, classes: Array,
                    target_deltas: Array, roi_valid: Array,
                    smooth_l1_beta: float = 0.0) -> Tuple[Array, Array]:
  """Box head classification and regression losses (detectron2 FastRCNN).

  Classification: softmax cross-entropy averaged over valid RoIs. Box:
  smooth L1 (beta 0: L1) of the GT class's 4 deltas over fg RoIs (valid and
  class > 0), summed and divided by the number of valid RoIs.

  Args:
    class_logits: [B, R, 1 + K] with background at index 0.
    box_deltas: [B, R, K * 4] class-specific (class c in columns
      4 (c - 1) .. 4 c - 1) or [B, R, 4] class-agnostic.
    classes: [B, R] int32 in 0..K (roi_targets).
    target_deltas: [B, R, 4] (roi_targets, weights (10, 10, 5, 5)).
    roi_valid: [B, R] bool.
    smooth_l1_beta: static ROI_BOX_HEAD.SMOOTH_L1_BETA.

  Returns:
    (cls, box) float32 scalars; both 0 without valid RoIs.
  """
  classes = jnp.asarray(classes, jnp.int32)
  roi_valid = jnp.asarray(roi_valid, bool)
  n = jnp.sum(roi_valid.astype(jnp.float32))
  logp = jax.nn.log_softmax(jnp.asarray(class_logits, jnp.float32), axis=-1)
  ce = -jnp.take_along_axis(logp, classes[..., None], axis=-1)[..., 0]
  cls = _safe_div(jnp.sum(jnp.where(roi_valid, ce, 0.0)), n)

  fg = roi_valid & (classes > 0)
  d = jnp.asarray(box_deltas, jnp.float32)
  if d.shape[-1] != 4:
    num_fg_classes = d.shape[-1] // 4
    d = d.reshape(d.shape[:-1] + (num_fg_classes, 4))
    pick = jnp.clip(classes - 1, 0, num_fg_classes - 1)
    d = jnp.take_along_axis(d, pick[..., None, None], axis=-2)[..., 0, :]
  l1 = smooth_l1(d - target_deltas, smooth_l1_beta)
  box = _safe_div(jnp.sum(jnp.where(fg[..., None], l1, 0.0)), n)
  return cls, box


def mask_loss(mask_logits: Array, classes: Array, targets: Array,
              fg: Array) -> Array:
  """Mask loss (detectron2 mask_rcnn_loss): sigmoid BCE on the GT class.

  Args:
    mask_logits: [B, R, H, W, K] class-specific logits (class c at c - 1).
    classes: [B, R] int32 in 1..K for fg RoIs.
    targets: [B, R, H, W] in [0, 1] (mask_targets).
    fg: [B, R] bool, the RoIs that count.

  Returns:
    float32 scalar: mean BCE over all pixels of the fg RoIs; 0 without fg.
  """
  k = mask_logits.shape[-1]
  pick = jnp.clip(jnp.asarray(classes, jnp.int32) - 1, 0, k - 1)
  logits = jnp.take_along_axis(mask_logits, pick[:, :, None, None, None],
                               axis=-1)[..., 0]  # [B, R, H, W]
  bce = sigmoid_bce(logits, targets)
  fg = jnp.asarray(fg, bool)
  pixels = mask_logits.shape[2] * mask_logits.shape[3]
  num = jnp.sum(fg.astype(jnp.float32)) * pixels
  return _safe_div(jnp.sum(jnp.where(fg[:, :, None, None], bce, 0.0)), num)


def landmark_loss(
    heatmap_logits: Array, indices: Array, valid: Array, classes: Array,
    upsample: Optional[Callable[[Array], Array]] = None, gathered: bool = False, *,
    category_channels: Array, category_channel_valid: Array) -> Array:
  """Landmark heatmap loss on each RoI's own category channels only.

  For every RoI the (at most K; DeepFashion2: 39) channels of its class are gathered from
  the head's low-resolution logits, upsampled, and scored with a softmax
  cross-entropy over all heatmap positions per landmark (detectron2
  keypoint_rcnn_loss), averaged over the valid (RoI, landmark) entries.
  Because upsampling acts per channel, this equals the loss on all L
  upsampled channels; channels outside an RoI's category are ignored even
  if `valid` marks them.

  Args:
    heatmap_logits: [B, R, h, w, L] head output before its upsampling.
    indices: [B, R, L] int32 flat target bins y * W + x of the upsampled
      [H, W] heatmap (landmark_targets).
    valid: [B, R, L] bool.
    classes: [B, R] int32 in 0..C (0: the RoI has no landmarks).
    upsample: maps [N, h, w, C] to [N, H, W, C]; default
      `landmark_head.upsample_heatmaps` (torch bilinear x2, align_corners=False).
    gathered: heatmap_logits is [B, R, h, w, K]: each RoI's category channels already
      (``category_channels[classes]`` order, the head's ``channels`` argument).
    category_channels, category_channel_valid: [C + 1, K] the dataset spec's tables
      (``DatasetSpec.category_channels``, ``category_channel_valid``).

  Returns:
    float32 scalar; 0 without valid entries.
  """
  upsample = upsample_heatmaps if upsample is None else upsample
  b, r, h, w, _ = heatmap_logits.shape
  table = jnp.asarray(category_channels)
  k = table.shape[1]
  classes = jnp.clip(jnp.asarray(classes, jnp.int32), 0, table.shape[0] - 1)
  channels = table[classes]  # [B, R, K]
  own = jnp.asarray(category_channel_valid)[classes]  # [B, R, K]
  logits = heatmap_logits if gathered else jnp.take_along_axis(
      heatmap_logits, channels[:, :, None, None, :], axis=-1)
  logits = logits.astype(jnp.float32).reshape(
      (b * r, h, w, k))
  up = upsample(logits)
  big_h, big_w = up.shape[1:3]
  up = up.reshape((b, r, big_h * big_w, k))
  target = jnp.take_along_axis(jnp.asarray(indices, jnp.int32), channels,
                               axis=-1)  # [B, R, K]
  ok = jnp.take_along_axis(jnp.asarray(valid, bool), channels, axis=-1) & own
  lse = jax.nn.logsumexp(up, axis=2)  # [B, R, K]
  picked = jnp.take_along_axis(up, target[:, :, None, :], axis=2)[:, :, 0]
  ce = lse - picked
  return _safe_div(jnp.sum(jnp.where(ok, ce, 0.0)),
                   jnp.sum(ok.astype(jnp.float32)))


def pair_loss(logits: Array, labels: Array, valid: Array, balanced: bool = False) -> Array:
  """Matching loss: BCE with logits averaged over valid item pairs.

  Args:
    logits: [..., Mu, Ms] match logits (P image pairs [P, Mu, Ms], or a whole batch's user
      items against its shop items [U, S]).
    labels: same shape, in {0, 1} (pair_targets).
    valid: same shape, bool.
    balanced: the mean over the positive pairs and the mean over the negative ones weigh half
      each (one of them alone when the other kind has no valid pair), so that many negatives
      do not drown the few positives; False: one mean over all valid pairs.

  Returns:
    float32 scalar; 0 without valid pairs.
  """
  valid = jnp.asarray(valid, bool)
  bce = sigmoid_bce(logits, labels)
  if not balanced:
    return _safe_div(jnp.sum(jnp.where(valid, bce, 0.0)),
                     jnp.sum(valid.astype(jnp.float32)))
  pos = valid & (jnp.asarray(labels) > 0.5)
  neg = valid & ~pos
  n_pos = jnp.sum(pos.astype(jnp.float32))
  n_neg = jnp.sum(neg.astype(jnp.float32))
  mean_pos = _safe_div(jnp.sum(jnp.where(pos, bce, 0.0)), n_pos)
  mean_neg = _safe_div(jnp.sum(jnp.where(neg, bce, 0.0)), n_neg)
  kinds = (n_pos > 0).astype(jnp.float32) + (n_neg > 0).astype(jnp.float32)
  return _safe_div(mean_pos + mean_neg, kinds)


def total_loss(terms: Mapping[str, Array],
               weights: Optional[Mapping[str, float]] = None
               ) -> Tuple[Array, Dict[str, Array]]:
  """Weighted sum of loss terms.

  Args:
    terms: name -> scalar loss.
    weights: name -> weight; a term without a weight counts with weight 1
      (the paper's lambdas were never published). A weight naming no term
      is an error (it would otherwise hide a typo).

  Returns:
    (total float32 scalar, the unweighted terms as float32, for logging).
  """
  weights = dict(weights or {})
  unknown = sorted(set(weights) - set(terms))
  if unknown:
    raise ValueError(f'weights for unknown loss terms {unknown}; terms are '
                     f'{sorted(terms)}')
  terms = {k: jnp.asarray(v, jnp.float32) for k, v in terms.items()}
  total = jnp.zeros((), jnp.float32)
  for name, value in terms.items():
    total = total + float(weights.get(name, 1.0)) * value
  return total, terms
