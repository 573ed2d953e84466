"""RPN proposals with static shapes (detectron2 find_top_rpn_proposals).

Per image and level the pre_nms_topk anchors with the highest objectness
logits, among those centred in the image content, are decoded (weights
(1, 1, 1, 1), dw / dh clamped at log(1000/16)), clipped to the image's
content size and marked invalid when non-finite or when a side is not longer
than min_size. NMS (IoU > nms_threshold suppresses) runs over all levels at
once but only within a level (the level index is the NMS class), and the
post_nms_topk best survivors are kept in decreasing logit order.

Differences from detectron2:
- an anchor whose centre lies in the canvas padding (outside image_hw, the
  rule of anchors.centre_in_image) gets objectness -inf before the top-k, in
  training and at test time alike, so it never becomes a proposal:
  rpn_targets never samples such anchors, so their logits are untrained and
  would otherwise take top-k slots from real ones (detectron2 samples them as
  background and ranks them with the rest);
the others are forced by static shapes or harmless:
- outputs always have post_nms_topk rows; rows that hold no proposal have
  valid=False, zero boxes and a score of -inf;
- non-finite logits are ranked last by the top-k (detectron2 ranks NaN
  first, then drops it) and non-finite proposals are dropped in training too
  (detectron2 raises FloatingPointError).
Everything runs under stop_gradient: proposals are constants for the heads.
"""

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from df2_jax.ops import anchors as anchor_ops
from df2_jax.ops import boxes as box_ops
from df2_jax.ops import nms as nms_ops

Array = jnp.ndarray


def generate_proposals(logits: Array, deltas: Array,
                       anchors_by_level: Sequence[Array], image_hw: Array,
                       pre_nms_topk: int, post_nms_topk: int,
                       nms_threshold: float = 0.7,
                       min_size: float = 0.0) -> Tuple[Array, Array, Array]:
  """Top RPN proposals per image.

  Args:
    logits: [B, N] objectness logits, N = sum_l N_l, levels concatenated in
      the order of anchors_by_level (each level in (y, x, anchor) order, as
      RPNHead returns them).
    deltas: [B, N, 4] (dx, dy, dw, dh) for the same anchors.
    anchors_by_level: per level an [N_l, 4] array (ops/anchors.fpn_anchors).
    image_hw: [B, 2] (height, width) of each image's content on the canvas;
      anchors centred outside it are never selected, proposals are clipped
      to it.
    pre_nms_topk: anchors kept per level before NMS (min(pre_nms_topk, N_l)).
    post_nms_topk: K, proposals returned per image.
    nms_threshold: IoU above which a lower-scoring box of the same level is
      suppressed.
    min_size: proposals whose width or height is <= min_size are dropped.

  Returns:
    boxes: [B, K, 4] float32 (x1, y1, x2, y2), in decreasing score order.
    scores: [B, K] float32 objectness logits (-inf in invalid rows).
    valid: [B, K] bool.
  """
  sizes = [int(a.shape[0]) for a in anchors_by_level]
  b, n = logits.shape
  if n != sum(sizes) or deltas.shape != (b, n, 4):
    raise ValueError(f"logits {logits.shape} / deltas {deltas.shape} do not "
                     f"match the anchors per level {sizes}")
  logits = jax.lax.stop_gradient(jnp.asarray(logits, jnp.float32))
  deltas = jax.lax.stop_gradient(jnp.asarray(deltas, jnp.float32))
  image_hw = jnp.asarray(image_hw, jnp.float32)
  # Anchors centred in the padding score -inf: ranked last and, as their
  # selected score stays -inf, invalid even when a level has fewer content
  # anchors than its top-k.
  inside = anchor_ops.centre_in_image(
      jnp.concatenate([jnp.asarray(a, jnp.float32) for a in anchors_by_level]),
      image_hw)  # [B, N]
  logits = jnp.where(inside, logits, -jnp.inf)

  # Per level top-k by logit; non-finite logits rank last.
  ranked = jnp.where(jnp.isfinite(logits), logits, -jnp.inf)
  starts = np.cumsum([0] + sizes)
  sel_scores, sel_boxes, sel_levels = [], [], []
  for level, anchors in enumerate(anchors_by_level):
    k = min(pre_nms_topk, sizes[level])
    lo, hi = int(starts[level]), int(starts[level + 1])
    _, idx = jax.lax.top_k(ranked[:, lo:hi], k)  # [B, k]
    sel_scores.append(jnp.take_along_axis(logits[:, lo:hi], idx, axis=1))
    level_deltas = jnp.take_along_axis(deltas[:, lo:hi], idx[..., None],
                                       axis=1)
    level_anchors = jnp.asarray(anchors, jnp.float32)[idx]  # [B, k, 4]
    sel_boxes.append(box_ops.decode(level_deltas, level_anchors,
                                    weights=box_ops.RPN_BOX_WEIGHTS,
                                    clip=box_ops.DEFAULT_SCALE_CLAMP))
    sel_levels.append(np.full((k,), level, np.int32))
  scores = jnp.concatenate(sel_scores, axis=1)  # [B, M]
  boxes = jnp.concatenate(sel_boxes, axis=1)  # [B, M, 4]
  levels = jnp.broadcast_to(jnp.asarray(np.concatenate(sel_levels)),
                            scores.shape)

  finite = jnp.all(jnp.isfinite(boxes), axis=-1)
  valid = finite & jnp.isfinite(scores)
  boxes = box_ops.clip_boxes(jnp.where(finite[..., None], boxes, 0.0),
                             image_hw)
  valid &= box_ops.nonempty(boxes, min_size)

  keep, keep_valid = nms_ops.batched_nms(boxes, scores, levels, valid,
                                         nms_threshold, post_nms_topk)
  out_boxes = jnp.take_along_axis(boxes, keep[..., None], axis=1)
  out_scores = jnp.take_along_axis(scores, keep, axis=1)
  out_boxes = jnp.where(keep_valid[..., None], out_boxes, 0.0)
  out_scores = jnp.where(keep_valid, out_scores, -jnp.inf)
  return out_boxes, out_scores, keep_valid
