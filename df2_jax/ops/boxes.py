"""Box utilities: areas, IoU, clipping, and detectron2's Box2BoxTransform.

All boxes are (x1, y1, x2, y2) in continuous coordinates; a box's width is
x2 - x1 (no "+1"), its area (x2 - x1) * (y2 - y1). Every function broadcasts
over leading dimensions, so a batch of images needs no vmap.

Padded (all-zero) and degenerate boxes are safe everywhere: they have zero
area, zero IoU with everything and finite regression targets.
"""

import math
from typing import Sequence, Tuple, Union

import jax.numpy as jnp

Array = jnp.ndarray

# detectron2's default clamp on dw, dh: exp(dw) never exceeds 1000 / 16.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)
# Weights of the two box regressors in detectron2's defaults.
RPN_BOX_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
ROI_BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
# Widths and heights below this are treated as this in `encode` so that
# padded or degenerate boxes give finite targets (and no NaN gradients leak
# through a masked loss).
_MIN_SIZE = 1e-6


def box_area(boxes: Array) -> Array:
  """Areas of boxes; inverted boxes count as empty.

  Args:
    boxes: [..., 4] (x1, y1, x2, y2).

  Returns:
    [...] (x2 - x1) * (y2 - y1), with negative extents clamped to 0.
  """
  w = jnp.maximum(boxes[..., 2] - boxes[..., 0], 0)
  h = jnp.maximum(boxes[..., 3] - boxes[..., 1], 0)
  return w * h


def nonempty(boxes: Array, threshold: float = 0.0) -> Array:
  """Whether both sides are longer than `threshold` (detectron2 Boxes.nonempty).

  Args:
    boxes: [..., 4].
    threshold: minimum side length, exclusive.

  Returns:
    [...] bool.
  """
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return (w > threshold) & (h > threshold)


def _iou_from_parts(inter: Array, area1: Array, area2: Array) -> Array:
  union = area1 + area2 - inter
  # inter > 0 implies union > 0; elsewhere the IoU is 0 (not NaN).
  safe_union = jnp.where(inter > 0, union, 1)
  return jnp.where(inter > 0, inter / safe_union, 0)


def pairwise_intersection(boxes1: Array, boxes2: Array) -> Array:
  """Intersection areas of all pairs.

  Args:
    boxes1: [..., N, 4].
    boxes2: [..., M, 4] (leading dims broadcast with boxes1's).

  Returns:
    [..., N, M].
  """
  a = boxes1[..., :, None, :]
  b = boxes2[..., None, :, :]
  w = jnp.minimum(a[..., 2], b[..., 2]) - jnp.maximum(a[..., 0], b[..., 0])
  h = jnp.minimum(a[..., 3], b[..., 3]) - jnp.maximum(a[..., 1], b[..., 1])
  return jnp.maximum(w, 0) * jnp.maximum(h, 0)


def pairwise_iou(boxes1: Array, boxes2: Array) -> Array:
  """IoU of all pairs (detectron2 pairwise_iou), batched over leading dims.

  Args:
    boxes1: [..., N, 4].
    boxes2: [..., M, 4] (leading dims broadcast with boxes1's, e.g. both
      [B, ., 4] for a batch of images).

  Returns:
    [..., N, M] in [0, 1]; 0 wherever the intersection is empty, including
    between empty or padded boxes.
  """
  inter = pairwise_intersection(boxes1, boxes2)
  return _iou_from_parts(inter, box_area(boxes1)[..., :, None],
                         box_area(boxes2)[..., None, :])


def batched_pairwise_iou(boxes1: Array, boxes2: Array) -> Array:
  """Per-image IoU matrices: [B, N, 4] x [B, M, 4] -> [B, N, M]."""
  if boxes1.ndim != 3 or boxes2.ndim != 3:
    raise ValueError(f'expected [B, N, 4] and [B, M, 4], got {boxes1.shape} '
                     f'and {boxes2.shape}')
  return pairwise_iou(boxes1, boxes2)


def elementwise_iou(boxes1: Array, boxes2: Array) -> Array:
  """IoU of matched pairs: [..., 4] x [..., 4] -> [...] (broadcasting)."""
  w = (jnp.minimum(boxes1[..., 2], boxes2[..., 2]) -
       jnp.maximum(boxes1[..., 0], boxes2[..., 0]))
  h = (jnp.minimum(boxes1[..., 3], boxes2[..., 3]) -
       jnp.maximum(boxes1[..., 1], boxes2[..., 1]))
  inter = jnp.maximum(w, 0) * jnp.maximum(h, 0)
  return _iou_from_parts(inter, box_area(boxes1), box_area(boxes2))


def clip_boxes(boxes: Array, hw: Union[Sequence[float], Array]) -> Array:
  """Clamps x to [0, width] and y to [0, height] (detectron2 Boxes.clip).

  Args:
    boxes: [..., N, 4].
    hw: (height, width): a pair for all boxes, or [..., 2] per image whose
      leading dims match boxes' leading dims (e.g. [B, 2] for [B, N, 4]).

  Returns:
    [..., N, 4] clipped boxes, same dtype.
  """
  hw = jnp.asarray(hw, dtype=boxes.dtype)
  h = hw[..., 0][..., None]
  w = hw[..., 1][..., None]
  x1 = jnp.clip(boxes[..., 0], 0, w)
  y1 = jnp.clip(boxes[..., 1], 0, h)
  x2 = jnp.clip(boxes[..., 2], 0, w)
  y2 = jnp.clip(boxes[..., 3], 0, h)
  return jnp.stack([x1, y1, x2, y2], axis=-1)


def _centre_size(boxes: Array) -> Tuple[Array, Array, Array, Array]:
  w = boxes[..., 2] - boxes[..., 0]
  h = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * w, boxes[..., 1] + 0.5 * h, w, h


def encode(boxes: Array, anchors: Array,
           weights: Sequence[float] = RPN_BOX_WEIGHTS) -> Array:
  """Deltas that take `anchors` to `boxes` (Box2BoxTransform.get_deltas).

  dx = wx * (cx_box - cx_anchor) / w_anchor, dw = ww * log(w_box / w_anchor),
  and likewise for y, h. Computed in float32. Widths and heights are
  floored at 1e-6 so that padded boxes give finite (meaningless) targets.

  Args:
    boxes: [..., 4] target boxes.
    anchors: [..., 4] source boxes (anchors or proposals), broadcastable.
    weights: (wx, wy, ww, wh): (1, 1, 1, 1) for the RPN, (10, 10, 5, 5) for
      the box head.

  Returns:
    [..., 4] float32 deltas (dx, dy, dw, dh).
  """
  boxes = jnp.asarray(boxes, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  wx, wy, ww, wh = weights
  acx, acy, aw, ah = _centre_size(anchors)
  bcx, bcy, bw, bh = _centre_size(boxes)
  aw = jnp.maximum(aw, _MIN_SIZE)
  ah = jnp.maximum(ah, _MIN_SIZE)
  bw = jnp.maximum(bw, _MIN_SIZE)
  bh = jnp.maximum(bh, _MIN_SIZE)
  dx = wx * (bcx - acx) / aw
  dy = wy * (bcy - acy) / ah
  dw = ww * jnp.log(bw / aw)
  dh = wh * jnp.log(bh / ah)
  return jnp.stack([dx, dy, dw, dh], axis=-1)


def decode(deltas: Array, anchors: Array,
           weights: Sequence[float] = RPN_BOX_WEIGHTS,
           clip: float = DEFAULT_SCALE_CLAMP) -> Array:
  """Applies deltas to anchors (Box2BoxTransform.apply_deltas).

  For class-specific regression reshape [..., K * 4] deltas to [..., K, 4]
  and pass anchors[..., None, :].

  Args:
    deltas: [..., 4] (dx, dy, dw, dh).
    anchors: [..., 4] (broadcastable with deltas).
    weights: (wx, wy, ww, wh) used by `encode`.
    clip: upper clamp on dw / ww and dh / wh before the exp.

  Returns:
    [..., 4] float32 boxes (x1, y1, x2, y2).
  """
  deltas = jnp.asarray(deltas, jnp.float32)
  anchors = jnp.asarray(anchors, jnp.float32)
  wx, wy, ww, wh = weights
  acx, acy, aw, ah = _centre_size(anchors)
  dx = deltas[..., 0] / wx
  dy = deltas[..., 1] / wy
  dw = jnp.minimum(deltas[..., 2] / ww, clip)
  dh = jnp.minimum(deltas[..., 3] / wh, clip)
  cx = dx * aw + acx
  cy = dy * ah + acy
  w = jnp.exp(dw) * aw
  h = jnp.exp(dh) * ah
  return jnp.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h],
                   axis=-1)
