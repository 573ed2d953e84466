"""Static-shape greedy non-maximum suppression.

Boxes are sorted by score (stable, so ties keep index order) and processed in
tiles of `tile_size` sorted boxes. A tile is first suppressed by the boxes
already kept in earlier tiles (one [tile, N] IoU block), then by itself: the
rule "kept_i = alive_i and no kept j < i overlaps i by more than the
threshold" is iterated to its fixed point, which is unique and equals greedy
NMS (entry i is final after i + 1 iterations; in practice a few suffice).
The loop over tiles stops once `max_output` boxes are kept. Memory is
O(tile_size * N); results equal torchvision's nms exactly, including the
strict IoU > threshold test and zero-area boxes never suppressing anything.

`batched_nms` is class-aware: IoUs between boxes of different classes are
zeroed. This selects exactly what torchvision's batched_nms (per-class NMS)
selects, without the coordinate-offset trick, whose large shifted
coordinates change float32 IoUs by rounding.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp

from df2_jax.ops import boxes as box_ops

Array = jnp.ndarray


def _nms_sorted(boxes: Array, valid: Array, classes: Optional[Array],
                iou_threshold: float, max_output: int,
                tile_size: int) -> Array:
  """Greedy NMS keep mask over boxes already sorted by decreasing score.

  Args:
    boxes: [N, 4] float32, N a multiple of tile_size.
    valid: [N] bool; invalid boxes are never kept and suppress nothing.
    classes: [N] int or None; boxes of different classes never interact.
    iou_threshold: a box is suppressed when IoU > iou_threshold.
    max_output: the loop stops once this many boxes are kept.
    tile_size: boxes per tile.

  Returns:
    [N] bool keep mask (at most the first max_output kept boxes are
    guaranteed; later tiles may be left unprocessed).
  """
  n = boxes.shape[0]
  num_tiles = n // tile_size
  lower = jnp.tril(jnp.ones((tile_size, tile_size), bool), k=-1)  # j < i

  def overlaps(a_boxes, a_cls, b_boxes, b_cls):
    over = box_ops.pairwise_iou(a_boxes, b_boxes) > iou_threshold
    if classes is not None:
      over &= a_cls[:, None] == b_cls[None, :]
    return over

  def tile_body(state):
    t, keep, count = state
    start = t * tile_size
    tile_boxes = jax.lax.dynamic_slice_in_dim(boxes, start, tile_size)
    alive = jax.lax.dynamic_slice_in_dim(valid, start, tile_size)
    tile_cls = (None if classes is None else
                jax.lax.dynamic_slice_in_dim(classes, start, tile_size))
    # Suppression by the boxes kept in earlier tiles (keep is False from this
    # tile on).
    cross = overlaps(tile_boxes, tile_cls, boxes, classes)  # [T, N]
    alive &= ~jnp.any(cross & keep[None, :], axis=1)
    # Suppression inside the tile: iterate to the greedy fixed point.
    self_over = overlaps(tile_boxes, tile_cls, tile_boxes, tile_cls) & lower

    def step(k):
      return alive & ~jnp.any(self_over & k[None, :], axis=1)

    def not_done(carry):
      prev, cur = carry
      return jnp.any(prev != cur)

    def body(carry):
      _, cur = carry
      return cur, step(cur)

    _, tile_keep = jax.lax.while_loop(not_done, body, (alive, step(alive)))
    keep = jax.lax.dynamic_update_slice_in_dim(keep, tile_keep, start, 0)
    return t + 1, keep, count + jnp.sum(tile_keep, dtype=jnp.int32)

  def tile_cond(state):
    t, _, count = state
    return (t < num_tiles) & (count < max_output)

  init = (jnp.int32(0), jnp.zeros((n,), bool), jnp.int32(0))
  _, keep, _ = jax.lax.while_loop(tile_cond, tile_body, init)
  return keep


def nms(boxes: Array, scores: Array, iou_threshold: float, max_output: int,
        valid: Optional[Array] = None, classes: Optional[Array] = None,
        tile_size: int = 256) -> Tuple[Array, Array]:
  """Greedy NMS with static shapes (torchvision.ops.nms semantics).

  Args:
    boxes: [N, 4] (x1, y1, x2, y2).
    scores: [N]; entries that are -inf or NaN are never selected.
    iou_threshold: suppress boxes whose IoU with a kept box is > this.
    max_output: K, the static number of output slots.
    valid: optional [N] bool; False entries are never selected and never
      suppress anything.
    classes: optional [N] int; when given, only boxes of the same class
      suppress each other (see `batched_nms`).
    tile_size: boxes per suppression tile (memory O(tile_size * N)).

  Returns:
    indices: [K] int32 into the inputs, kept boxes in decreasing score order
      (ties in index order); 0 in unused slots.
    valid: [K] bool, True for the slots that hold a kept box.
  """
  n = boxes.shape[0]
  boxes = jnp.asarray(boxes, jnp.float32)
  scores = jnp.asarray(scores, jnp.float32)
  ok = ~jnp.isnan(scores) & (scores > -jnp.inf)
  if valid is not None:
    ok &= jnp.asarray(valid, bool)
  if n == 0:
    return jnp.zeros((max_output,), jnp.int32), jnp.zeros((max_output,), bool)
  # Stable ascending sort of -score: descending scores, ties by index, the
  # invalid entries last.
  order = jnp.argsort(jnp.where(ok, -scores, jnp.inf), stable=True)
  order = order.astype(jnp.int32)
  tile = max(1, min(tile_size, n))
  n_pad = -(-n // tile) * tile
  pad = n_pad - n
  s_boxes = jnp.pad(boxes[order], ((0, pad), (0, 0)))
  s_ok = jnp.pad(ok[order], (0, pad))
  s_cls = None
  if classes is not None:
    s_cls = jnp.pad(jnp.asarray(classes)[order], (0, pad))
  keep = _nms_sorted(s_boxes, s_ok, s_cls, iou_threshold, max_output, tile)
  (pos,) = jnp.nonzero(keep, size=max_output, fill_value=n_pad)
  out_valid = pos < n_pad
  indices = jnp.where(out_valid, order[jnp.minimum(pos, n - 1)], 0)
  return indices.astype(jnp.int32), out_valid


def batched_nms(boxes: Array, scores: Array, classes: Array, valid: Array,
                iou_threshold: float, max_output: int,
                tile_size: int = 256) -> Tuple[Array, Array]:
  """Class-aware NMS per image (torchvision batched_nms, vmapped).

  Args:
    boxes: [B, N, 4].
    scores: [B, N].
    classes: [B, N] int; boxes of different classes never suppress each
      other.
    valid: [B, N] bool.
    iou_threshold: suppression threshold (IoU > threshold).
    max_output: K output slots per image.
    tile_size: see `nms`.

  Returns:
    indices: [B, K] int32 into each image's N boxes (0 in unused slots).
    valid: [B, K] bool.
  """
  fn = lambda b, s, c, v: nms(b, s, iou_threshold, max_output, valid=v,
                              classes=c, tile_size=tile_size)
  return jax.vmap(fn)(boxes, scores, classes, valid)
