"""RoIAlign as one gather (torchvision roi_align / detectron2 ROIAlignV2).

Every output bin averages sampling_ratio^2 bilinear samples. For each sample
the four neighbour indices and bilinear weights are computed from the boxes
alone; the features, flattened to [H * W, C] per image, are gathered at those
indices and the weights are applied after the gather, so the cost is
O(samples * C) per box and independent of the map size. The backward pass is
a scatter-add into float32 features (bf16 scatter-adds are slow on GPU).

Border rules (torchvision's bilinear_interpolate): a sample with y < -1,
y > H, x < -1 or x > W contributes 0; otherwise coordinates are clamped to
>= 0 and a low index at or past the last row / column uses that row / column
with weight 1.

`multilevel_roi_align` pools every box from its FPN level (detectron2's
assign_boxes_to_levels) with one gather over the flattened, concatenated
pyramid: each box carries its level's flat offset, width, height and scale.

`method="matmul"` computes the same values another way: bilinear sampling, its border
rules and the bin average factor into a y part times an x part, so each box's output is
``My @ F @ Mx^T`` per channel with dense [oh, H] and [ow, W] interpolation matrices. That
is two einsums (and two in the backward, no scatter), O(oh H W C) per box instead of the
gather's O(oh ow 4 s^2 C): the faster choice for small feature maps on a CPU (the demo's
128 px canvases), the slower one for 800 px images.

`method="window"` computes the same values as "gather" with a windowed gather: the maps
(each padded by one zero row and column, the widest level's width) are stacked row-wise and
every sample reads its 2x2 neighbourhood as one [2, 2, C] slice, so the gather moves
contiguous runs of channels instead of single rows; the weights are applied after it. On a
CPU it is more than ten times faster than "gather" (1000 RoIs at 7x7 from a 512x512 image's
pyramid: 0.29 s against 3.6 s, docs/PERFORMANCE.md); detection uses it for every
"gather" model (``MatchRCNN.detect``). Equal to "gather" up to float32 summation order.

Boxes get no gradient (as in torchvision and detectron2).
"""

import math
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from df2_jax.ops import boxes as box_ops

Array = jnp.ndarray
Size = Union[int, Tuple[int, int]]


def _pair(output_size: Size) -> Tuple[int, int]:
  if isinstance(output_size, int):
    return output_size, output_size
  oh, ow = output_size
  return int(oh), int(ow)


def _axis_taps(coords: Array, size: Array):
  """Neighbours and weights of sample coordinates along one axis.

  Args:
    coords: [..., out, s] sample coordinates on the feature map.
    size: the map's extent along this axis, broadcastable to coords
      (float; integer valued).

  Returns:
    idx [..., out, s, 2] int32 (low, high), weights [..., out, s, 2]
    ((1 - frac, frac), zero for samples outside [-1, size]).
  """
  valid = (coords >= -1.0) & (coords <= size)
  # Clamping to [0, size] keeps the float -> int cast defined for any input;
  # samples beyond size are invalid anyway.
  c = jnp.clip(coords, 0.0, size)
  low = jnp.floor(c)
  at_edge = low >= size - 1
  low = jnp.where(at_edge, size - 1, low)
  high = jnp.where(at_edge, size - 1, low + 1)
  frac = jnp.where(at_edge, 0.0, c - low)
  frac = jnp.where(valid, frac, 0.0)
  w = jnp.stack([jnp.where(valid, 1.0 - frac, 0.0), frac], axis=-1)
  idx = jnp.stack([low, high], axis=-1).astype(jnp.int32)
  return idx, w


def _sample_coords(boxes: Array, spatial_scale: Array, output_hw: Tuple[int, int],
                   sampling_ratio: int, aligned: bool) -> Tuple[Array, Array]:
  """Feature-map coordinates of every sample: ys [..., N, oh, s], xs [..., N, ow, s].

  Same arithmetic as torchvision: start + p * bin + (i + .5) * bin / s.
  """
  oh, ow = output_hw
  s = sampling_ratio
  dtype = boxes.dtype
  scale = jnp.broadcast_to(jnp.asarray(spatial_scale, dtype), boxes.shape[:-1])
  offset = 0.5 if aligned else 0.0
  x1 = boxes[..., 0] * scale - offset
  y1 = boxes[..., 1] * scale - offset
  roi_w = boxes[..., 2] * scale - offset - x1
  roi_h = boxes[..., 3] * scale - offset - y1
  if not aligned:
    roi_w = jnp.maximum(roi_w, 1.0)
    roi_h = jnp.maximum(roi_h, 1.0)
  bin_w = roi_w / ow
  bin_h = roi_h / oh
  e = lambda a: a[..., None, None]
  sub = (jnp.arange(s, dtype=dtype) + 0.5) / s  # [s]
  ys = (e(y1) + jnp.arange(oh, dtype=dtype)[:, None] * e(bin_h)
        + sub[None, :] * e(bin_h))  # [..., N, oh, s]
  xs = (e(x1) + jnp.arange(ow, dtype=dtype)[:, None] * e(bin_w)
        + sub[None, :] * e(bin_w))  # [..., N, ow, s]
  return ys, xs


def _bilinear_taps(boxes: Array, spatial_scale: Array, height: Array,
                   width: Array, base: Array, output_hw: Tuple[int, int],
                   sampling_ratio: int, aligned: bool) -> Tuple[Array, Array]:
  """Flat gather indices and weights of every sample of every bin.

  Args:
    boxes: [..., N, 4] float boxes in input coordinates.
    spatial_scale: broadcastable to [..., N]: input -> feature coordinates.
    height, width: broadcastable to [..., N]: the box's feature map size.
    base: broadcastable to [..., N] int32: flat offset of that map's first
      pixel in the gathered array.
    output_hw: (oh, ow).
    sampling_ratio: samples per bin along each axis (> 0).
    aligned: shift by -0.5 pixel (ROIAlignV2) when True.

  Returns:
    idx [..., N, oh, ow, K] int32 and weights [..., N, oh, ow, K] with
    K = 4 * sampling_ratio^2; the weights of a bin sum to <= 1 (they include
    the 1 / sampling_ratio^2 average).
  """
  oh, ow = output_hw
  s = sampling_ratio
  dtype = boxes.dtype
  f = lambda a: jnp.broadcast_to(jnp.asarray(a, dtype), boxes.shape[:-1])
  h_f, w_f = f(height), f(width)
  e = lambda a: a[..., None, None]
  ys, xs = _sample_coords(boxes, spatial_scale, output_hw, s, aligned)
  y_idx, y_w = _axis_taps(ys, e(h_f))  # [..., N, oh, s, 2]
  x_idx, x_w = _axis_taps(xs, e(w_f))  # [..., N, ow, s, 2]
  # -> [..., N, oh, ow, s_y, s_x, 2_y, 2_x]
  yi = y_idx[..., :, None, :, None, :, None]
  xi = x_idx[..., None, :, None, :, None, :]
  row = jnp.broadcast_to(jnp.asarray(width, jnp.int32), boxes.shape[:-1])
  b = jnp.broadcast_to(jnp.asarray(base, jnp.int32), boxes.shape[:-1])
  g = lambda a: a[..., None, None, None, None, None, None]
  idx = g(b) + yi * g(row) + xi
  w = (y_w[..., :, None, :, None, :, None] * x_w[..., None, :, None, :, None, :]
       * (1.0 / (s * s)))
  k = 4 * s * s
  lead = boxes.shape[:-1]
  return idx.reshape(lead + (oh, ow, k)), w.reshape(lead + (oh, ow, k))


def _axis_matrix(idx: Array, w: Array, size: int) -> Array:
  """Dense interpolation weights along one axis from `_axis_taps`' [..., out, s, 2] indices
  and weights -> [..., out, size].

  Row o holds the bilinear weights of bin o's s samples on the axis' cells, averaged over
  the samples (the bin's 1 / s^2 average is 1 / s per axis). Bilinear sampling, its border
  rules and the average all factor into a y part times an x part, so RoIAlign is
  ``My @ F @ Mx^T`` per channel.
  """
  onehot = jax.nn.one_hot(idx, size, dtype=w.dtype)  # [..., out, s, 2, size]
  return jnp.sum(onehot * w[..., None], axis=(-3, -2)) / idx.shape[-2]


def _separable_reduce(features: Array, my: Array, mx: Array) -> Array:
  """[B, H, W, C] with My [B, N, oh, H], Mx [B, N, ow, W] -> [B, N, oh, ow, C].

  Default matmul precision, like the convolutions around it (full float32 on a CPU; a GPU
  may use TF32 for float32 inputs).
  """
  t = jnp.einsum('bniy,byxc->bnixc', my, features)
  return jnp.einsum('bnjx,bnixc->bnijc', mx, t)


def _gather_reduce(flat: Array, idx: Array, weights: Array) -> Array:
  """[P, C] gathered at [N, oh, ow, K] and weighted-summed -> [N, oh, ow, C]."""
  vals = flat.at[idx].get(mode='promise_in_bounds')  # [N, oh, ow, K, C]
  # A multiply + reduce (not an einsum) so XLA fuses it with the gather.
  return jnp.sum(vals * weights[..., None].astype(flat.dtype), axis=-2)


def _compute_dtype(dtype) -> jnp.dtype:
  return jnp.promote_types(dtype, jnp.float32)


def roi_align(features: Array, boxes: Array, output_size: Size,
              spatial_scale: float, sampling_ratio: int = 2,
              aligned: bool = True, method: str = "gather") -> Array:
  """RoIAlign of one feature map (torchvision roi_align semantics).

  Args:
    features: [B, H, W, C] NHWC.
    boxes: [B, N, 4] (x1, y1, x2, y2) in the coordinates that spatial_scale
      maps onto the feature map (image coordinates and 1 / stride, usually).
    output_size: int or (oh, ow).
    spatial_scale: feature coordinate = input coordinate * spatial_scale.
    sampling_ratio: fixed number of samples per bin along each axis (> 0).
    aligned: True for ROIAlignV2 (pixel centres at +0.5); False for the
      legacy behaviour (no shift, RoI sides at least 1).
    method: "gather" (the default: O(N oh ow 4 s^2 C), independent of the map size, a
      scatter-add backward) or "matmul" (two einsums with dense per-box interpolation
      matrices: O(N oh H W C), matmul forward and backward; faster for small maps,
      e.g. on a CPU at 128 px) or "window" (2x2 slices; see the module's docstring). All
      give the same values.

  Returns:
    [B, N, oh, ow, C] in features.dtype (accumulated in float32).
  """
  _check_method(method)
  if sampling_ratio <= 0:
    raise ValueError('sampling_ratio must be > 0 (adaptive sampling has '
                     f'data-dependent shapes), got {sampling_ratio}')
  bsz, height, width, c = features.shape
  if boxes.ndim != 3 or boxes.shape[0] != bsz or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be [{bsz}, N, 4], got {boxes.shape}')
  cdt = _compute_dtype(features.dtype)
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, cdt))
  if method == "window":
    return _window_align([features], boxes, jnp.zeros(boxes.shape[:2], jnp.int32),
                         [spatial_scale], _pair(output_size), sampling_ratio,
                         aligned).astype(features.dtype)
  if method == "matmul":
    ys, xs = _sample_coords(boxes, spatial_scale, _pair(output_size), sampling_ratio,
                            aligned)
    my = _axis_matrix(*_axis_taps(ys, jnp.asarray(height, cdt)), height)
    mx = _axis_matrix(*_axis_taps(xs, jnp.asarray(width, cdt)), width)
    out = _separable_reduce(features.astype(cdt), my, mx)
    return out.astype(features.dtype)
  idx, w = _bilinear_taps(boxes, spatial_scale, height, width, 0,
                          _pair(output_size), sampling_ratio, aligned)
  flat = features.astype(cdt).reshape(bsz, height * width, c)
  out = jax.vmap(_gather_reduce)(flat, idx, w.astype(cdt))
  return out.astype(features.dtype)


METHODS = ("gather", "window", "matmul")


def _check_method(method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"RoIAlign method must be one of {METHODS}, got {method!r}")


def assign_boxes_to_levels(boxes: Array, min_level: int = 2,
                           max_level: int = 5, canonical_level: int = 4,
                           canonical_size: float = 224.0) -> Array:
  """FPN level index of each box (detectron2 assign_boxes_to_levels).

  level = clamp(floor(canonical_level + log2(sqrt(area) / canonical_size
  + 1e-8)), min_level, max_level). Empty or padded boxes go to min_level.

  Args:
    boxes: [..., 4] in image coordinates.

  Returns:
    [...] int32 index into the pyramid list: level - min_level.
  """
  size = jnp.sqrt(box_ops.box_area(jnp.asarray(boxes, jnp.float32)))
  level = jnp.floor(canonical_level +
                    jnp.log2(size / canonical_size + 1e-8))
  level = jnp.clip(level, min_level, max_level)
  return level.astype(jnp.int32) - min_level


def multilevel_roi_align(features_by_level: Sequence[Array], boxes: Array,
                         output_size: Size, sampling_ratio: int = 2,
                         canonical_level: int = 4,
                         canonical_size: float = 224.0, min_level: int = 2,
                         max_level: int = 5, aligned: bool = True,
                         method: str = "gather") -> Array:
  """RoIAlign from each box's FPN level, as one gather over the pyramid.

  Level k has stride 2^k (spatial_scale 2^-k). Equivalent to calling
  `roi_align` on every level and keeping each box's own level (detectron2
  ROIPooler with ROIAlignV2), at the cost of a single level.

  Args:
    features_by_level: [B, Hl, Wl, C] for levels min_level..max_level
      (P2..P5), all with the same B, C and dtype.
    boxes: [B, N, 4] in image (canvas) coordinates.
    output_size: int or (oh, ow).
    sampling_ratio: fixed samples per bin along each axis (> 0).
    canonical_level, canonical_size: a box of sqrt(area) = canonical_size
      maps to canonical_level.
    min_level, max_level: the levels of features_by_level.
    aligned: see `roi_align`.
    method: "gather" (one gather over the concatenated pyramid), "window" (one gather of
      2x2 slices over the stacked pyramid) or "matmul" (per level, the
      separable interpolation matrices of the boxes assigned to it, zero rows for the
      others; see `roi_align`).

  Returns:
    [B, N, oh, ow, C] in the features' dtype.
  """
  _check_method(method)
  num_levels = max_level - min_level + 1
  if len(features_by_level) != num_levels:
    raise ValueError(f'{len(features_by_level)} feature maps for levels '
                     f'{min_level}..{max_level}')
  if sampling_ratio <= 0:
    raise ValueError(f'sampling_ratio must be > 0, got {sampling_ratio}')
  dtype = features_by_level[0].dtype
  bsz, _, _, c = features_by_level[0].shape
  if boxes.ndim != 3 or boxes.shape[0] != bsz or boxes.shape[-1] != 4:
    raise ValueError(f'boxes must be [{bsz}, N, 4], got {boxes.shape}')
  cdt = _compute_dtype(dtype)
  if method == "matmul":
    return _multilevel_matmul(features_by_level, boxes, _pair(output_size), sampling_ratio,
                              canonical_level, canonical_size, min_level, max_level,
                              aligned).astype(dtype)
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, cdt))
  level = assign_boxes_to_levels(boxes, min_level, max_level,
                                 canonical_level, canonical_size)  # [B, N]
  scales = [math.ldexp(1.0, -k) for k in range(min_level, max_level + 1)]
  if method == "window":
    return _window_align(features_by_level, boxes, level, scales, _pair(output_size),
                         sampling_ratio, aligned).astype(dtype)
  heights, widths, bases, flats = [], [], [], []
  base = 0
  for f in features_by_level:
    _, h, w, _ = f.shape
    heights.append(h)
    widths.append(w)
    bases.append(base)
    base += h * w
    flats.append(f.astype(cdt).reshape(bsz, h * w, c))
  flat = jnp.concatenate(flats, axis=1)  # [B, sum Hl * Wl, C]
  table = lambda v, dt: jnp.asarray(v, dt)[level]
  idx, w = _bilinear_taps(boxes, table(scales, cdt), table(heights, cdt),
                          table(widths, cdt), table(bases, jnp.int32),
                          _pair(output_size), sampling_ratio, aligned)
  out = jax.vmap(_gather_reduce)(flat, idx, w.astype(cdt))
  return out.astype(dtype)


def _multilevel_matmul(features_by_level: Sequence[Array], boxes: Array,
                       output_hw: Tuple[int, int], sampling_ratio: int,
                       canonical_level: int, canonical_size: float, min_level: int,
                       max_level: int, aligned: bool) -> Array:
  """`multilevel_roi_align(method="matmul")`: the levels stacked along y.

  The maps are zero-padded to the widest level's width and stacked row-wise into one
  [B, sum Hl, Wmax, C] array; each box's y matrix addresses its own level's block of rows
  (the others are zero) and its x matrix that level's columns, so one pair of einsums pools
  every box from its own level.
  """
  cdt = _compute_dtype(features_by_level[0].dtype)
  wmax = max(f.shape[2] for f in features_by_level)
  stacked = jnp.concatenate(
      [jnp.pad(f.astype(cdt), ((0, 0), (0, 0), (0, wmax - f.shape[2]), (0, 0)))
       for f in features_by_level], axis=1)  # [B, sum Hl, Wmax, C]
  boxes = jax.lax.stop_gradient(jnp.asarray(boxes, cdt))
  level = assign_boxes_to_levels(boxes, min_level, max_level,
                                 canonical_level, canonical_size)  # [B, N]
  heights = [f.shape[1] for f in features_by_level]
  widths = [f.shape[2] for f in features_by_level]
  starts = np.cumsum([0] + heights[:-1])
  scales = [math.ldexp(1.0, -k) for k in range(min_level, max_level + 1)]
  table = lambda v: jnp.asarray(v, cdt)[level]
  ys, xs = _sample_coords(boxes, table(scales), output_hw, sampling_ratio, aligned)
  e = lambda a: a[..., None, None]
  y_idx, y_w = _axis_taps(ys, e(table(heights)))
  x_idx, x_w = _axis_taps(xs, e(table(widths)))
  y_idx = y_idx + e(jnp.asarray(starts, jnp.int32)[level])[..., None]
  my = _axis_matrix(y_idx, y_w, stacked.shape[1])
  mx = _axis_matrix(x_idx, x_w, wmax)
  return _separable_reduce(stacked, my, mx)


def _window_align(features_by_level: Sequence[Array], boxes: Array, level: Array,
                  scales: Sequence[float], output_hw: Tuple[int, int], sampling_ratio: int,
                  aligned: bool) -> Array:
  """RoIAlign (``method="window"``) of boxes [B, N, 4] (float32, no gradient) from maps
  [B, Hl, Wl, C], each box from map ``level`` [B, N] (index into the list) -> [B, N, oh, ow, C].

  The maps, each with one zero row and column added (bottom, right), are stacked row-wise at
  the widest width + 1. A sample's low neighbour (y0, x0) is within its map, so the slice
  [y0:y0 + 2, x0:x0 + 2] stays inside the map's padded block; where the high neighbour is
  clamped onto the low one (the last row or column) its weight is 0 and the slice reads the
  zero padding there instead, which adds nothing.
  """
  cdt = _compute_dtype(features_by_level[0].dtype)
  bsz, n = boxes.shape[:2]
  oh, ow = output_hw
  s = sampling_ratio
  wpad = max(f.shape[2] for f in features_by_level) + 1
  stacked = jnp.concatenate(
      [jnp.pad(f.astype(cdt), ((0, 0), (0, 1), (0, wpad - f.shape[2]), (0, 0)))
       for f in features_by_level], axis=1)  # [B, sum (Hl + 1), wpad, C]
  heights = [f.shape[1] for f in features_by_level]
  widths = [f.shape[2] for f in features_by_level]
  starts = np.cumsum([0] + [h + 1 for h in heights[:-1]])
  table = lambda v, dt: jnp.asarray(v, dt)[level]
  e = lambda a: a[..., None, None]
  ys, xs = _sample_coords(boxes, table(scales, cdt), output_hw, s, aligned)
  y_idx, y_w = _axis_taps(ys, e(table(heights, cdt)))  # [B, N, oh, s, 2]
  x_idx, x_w = _axis_taps(xs, e(table(widths, cdt)))  # [B, N, ow, s, 2]
  y0 = y_idx[..., 0] + e(table(starts, jnp.int32))  # [B, N, oh, s]
  x0 = x_idx[..., 0]
  shape = (bsz, n, oh, ow, s, s)
  start = jnp.stack([jnp.broadcast_to(y0[:, :, :, None, :, None], shape),
                     jnp.broadcast_to(x0[:, :, None, :, None, :], shape)], axis=-1)
  dims = jax.lax.GatherDimensionNumbers(offset_dims=(1, 2, 3), collapsed_slice_dims=(),
                                        start_index_map=(0, 1))
  c = stacked.shape[-1]
  gather = lambda m, st: jax.lax.gather(m, st.reshape(-1, 2), dims, (2, 2, c),
                                        mode="promise_in_bounds")
  win = jax.vmap(gather)(stacked, start)  # [B, N * oh * ow * s * s, 2, 2, C]
  win = win.reshape(shape + (2, 2, c))
  w = (y_w[:, :, :, None, :, None, :, None] * x_w[:, :, None, :, None, :, None, :]
       * (1.0 / (s * s)))  # [B, N, oh, ow, s_y, s_x, 2_y, 2_x]
  # A multiply + reduce (not an einsum) so XLA fuses it with the gather.
  return jnp.sum(win * w[..., None], axis=(4, 5, 6, 7))
