"""Landmark head: Detectron's keypoint head (KRCNNConvDeconvUpsampleHead).

[N, 14, 14, C] pooled RoI features -> 8 x (3x3 conv 512 + ReLU) -> 4x4
stride-2 transposed conv to K = 294 channels (torch ConvTranspose2d(k=4, s=2,
p=1): 14 -> 28). `LandmarkHead` returns these 28x28 logits; the fixed x2
bilinear upsampling to the 56x56 heatmaps is the separate function
`upsample_heatmaps`, so a caller can upsample only what it needs (for
instance the channels of each RoI's category: 294 x 56 x 56 float32 logits
are 3.7 MB per RoI). Channel `LANDMARK_START[c] + j` is landmark j of
category c (data_pipeline.spec).

Init as detectron2: every conv and the deconv use kaiming normal (fan_out,
ReLU gain) with zero bias (for the deconv "fan_out" is torch's
in_channels * k * k, which the transposed-kernel layout reproduces).

With a bfloat16 `dtype` the convs run in bfloat16; the deconv takes bfloat16
inputs and weights but accumulates into and returns float32.

`heatmaps_to_landmarks` decodes the 56x56 heatmaps to image coordinates as detectron2's
heatmaps_to_keypoints does: the argmax pixel of each heatmap resized bicubically to the box's
ceil(h) x ceil(w) pixels, but evaluated only at the pixels near the heatmap's peaks so that the
program keeps static shapes and costs little (see there).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from df2_jax.models.layers import SubpixelConvTranspose, c2_msra_fill

Array = jnp.ndarray
Dtype = Any

# kaiming_normal_(mode="fan_out", nonlinearity="relu"), as detectron2.


class LandmarkHead(nn.Module):
  """Low-resolution landmark logits for every RoI.

  Attributes:
    num_landmarks: K, output channels (the dataset spec's landmarks of all categories;
      DeepFashion2: 294).
    conv_dim: width of the convs (512).
    num_convs: number of 3x3 convs (8).
    deconv_kernel: kernel of the stride-2 transposed conv (4; even).
    dtype: compute dtype of the convs (bfloat16 works); logits are float32.
    param_dtype: parameter dtype.
  """
  num_landmarks: int
  conv_dim: int = 512
  num_convs: int = 8
  deconv_kernel: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, channels: Array | None = None) -> Array:
    """Predicts landmark logits before the x2 upsampling.

    Args:
      x: [N, h, w, C] pooled RoI features (14x14x256 in Match R-CNN).
      channels: optional [N, M] int32: compute only these output channels of each RoI
        (its category's, DatasetSpec.category_channels), the same values as gathering them
        from the full output (see SubpixelConvTranspose).

    Returns:
      [N, 2h, 2w, num_landmarks] float32 logits (28x28 from 14x14), or [N, 2h, 2w, M] with
      ``channels``; feed them to `upsample_heatmaps` for the 56x56 heatmaps.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=c2_msra_fill, bias_init=nn.initializers.zeros)
    for i in range(self.num_convs):
      x = nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)),
                  name=f"conv_fcn{i + 1}", **kw)(x)
      x = nn.relu(x)
    k = self.deconv_kernel
    # torch ConvTranspose2d(k, stride=2, padding=k // 2 - 1): 14 -> 28, kernel stored as
    # [k, k, out, in] (torch's fan_out = in * k * k), run as a conv + pixel shuffle.
    x = SubpixelConvTranspose(self.num_landmarks, k, k // 2 - 1,
                              preferred_element_type=jnp.float32,
                              name="score_lowres", **kw)(x, channels)
    return x.astype(jnp.float32)


def _upsample2x_axis(x: Array, axis: int) -> Array:
  """Doubles one axis with torch's bilinear, align_corners=False weights.

  Output 2i samples source i - 0.25 and 2i + 1 samples i + 0.25, so
  out[2i] = 0.25 x[i - 1] + 0.75 x[i] and out[2i + 1] = 0.75 x[i] +
  0.25 x[i + 1], with indices clamped to [0, n - 1] (torch clamps the source
  coordinate at 0 and the upper neighbour at n - 1).
  """
  n = x.shape[axis]
  sl = functools.partial(jax.lax.slice_in_dim, x, axis=axis)
  prev = jnp.concatenate([sl(0, 1), sl(0, n - 1)], axis=axis)  # x[max(i-1, 0)]
  nxt = jnp.concatenate([sl(1, n), sl(n - 1, n)], axis=axis)  # x[min(i+1, n-1)]
  even = 0.25 * prev + 0.75 * x
  odd = 0.75 * x + 0.25 * nxt
  out = jnp.stack([even, odd], axis=axis + 1).astype(x.dtype)
  shape = x.shape[:axis] + (2 * n,) + x.shape[axis + 1:]
  return out.reshape(shape)


def upsample_heatmaps(x: Array) -> Array:
  """x2 bilinear upsampling of heatmaps, torch F.interpolate semantics.

  Equal to torch `F.interpolate(x, scale_factor=2, mode="bilinear",
  align_corners=False)` (on NCHW) for NHWC input: [[0, 1], [2, 3]] becomes a
  4x4 map whose first row is [0, 0.25, 0.75, 1].

  Args:
    x: [..., H, W, K] logits (28x28 from LandmarkHead), any float dtype.

  Returns:
    [..., 2H, 2W, K] in x's dtype.
  """
  if x.ndim < 3:
    raise ValueError(f"expected [..., H, W, K], got shape {x.shape}")
  x = _upsample2x_axis(x, x.ndim - 3)
  return _upsample2x_axis(x, x.ndim - 2)


# torch's bicubic kernel (upsample_bicubic2d, as OpenCV's): cubic convolution with a = -0.75.
CUBIC_A = -0.75
# Heatmap rows (and columns) a decoding window reads: 8 consecutive ones when the box side is at
# least the heatmap's (up-sampling), 4 taps of each of at most 4 candidates when it is smaller.
_PATCH = 16
# How far (in heatmap cells) from a peak cell the resized map's maximum is looked for. Measured
# on 24000 random smooth maps: at most 0.6 cells, 99.9% within 0.53.
_REACH = 0.75


def cubic_weights(t: Array) -> Array:
  """torch's bicubic weights [..., 4] of the taps floor(s) - 1 .. floor(s) + 2, t = s - floor(s).

  The cubic convolution kernel W(x) = (a + 2)|x|^3 - (a + 3)|x|^2 + 1 for |x| <= 1 and
  a|x|^3 - 5a|x|^2 + 8a|x| - 4a for 1 < |x| < 2 (a = CUBIC_A), at distances t + 1, t, 1 - t,
  2 - t, written as torch's get_cubic_upsample_coefficients writes it.
  """
  a = CUBIC_A
  near = lambda x: ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
  far = lambda x: ((a * x - 5.0 * a) * x + 8.0 * a) * x - 4.0 * a
  return jnp.stack([far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)], axis=-1)


def _axis_window(peak: Array, size: Array, n: int, count: int):
  """The candidate output pixels of one axis around a heatmap peak, and how to evaluate them.

  The heatmap axis has n cells; the resized map has ``size`` = ceil(box side) pixels, pixel i
  sampling the heatmap at s_i = (i + 0.5) * n / size - 0.5 from the taps floor(s_i) - 1 ..
  floor(s_i) + 2 clamped to [0, n - 1] (torch, align_corners=False). The candidates are the
  pixels with |s_i - peak| <= _REACH + n / size: every pixel next to a point within _REACH
  cells of the peak, where the resized map's maximum near that peak lies. There are at most
  2 _REACH size / n + 3 of them (4 when size < n); ``count`` leaves one more for rounding.

  Args:
    peak: [N, K] int32 peak cells.
    size: [N, 1] float32 resized lengths (>= 1).
    n: heatmap length.
    count: C, the static number of candidates (>= 4).

  Returns:
    pixels [N, K, C] float32 candidate pixel indices, valid [N, K, C] bool, cells [N, K, 16]
    int32 heatmap rows (or columns) of the patch, weights [N, K, C, 16] float32: candidate c's
    value is sum_p weights[c, p] * heatmap[cells[p]]. Up-sampling (size >= n) puts every tap in
    peak - 3 .. peak + 3 (patch row p is cell peak - 3 + p); down-sampling (size < n) leaves at
    most 4 candidates, and patch row 4c + u is tap u of candidate c.
  """
  scale = n / size  # Heatmap cells per output pixel, as torch's float32 scale.
  peak_f = peak.astype(jnp.float32)
  reach = _REACH + scale
  # The first pixel with s_i >= peak - reach: i >= (peak - _REACH + 0.5) / scale - 1.5.
  first = jnp.maximum(jnp.ceil((peak_f - _REACH + 0.5) / scale - 1.5), 0.0)
  pixels = first[..., None] + jnp.arange(count, dtype=jnp.float32)  # [N, K, C]
  src = scale[..., None] * (pixels + 0.5) - 0.5
  down = jnp.broadcast_to(scale > 1.0, peak.shape)
  valid = ((pixels < size[..., None]) & (jnp.abs(src - peak_f[..., None]) <= reach[..., None])
           & (~down[..., None] | (jnp.arange(count) < 4)))
  floor = jnp.floor(src)
  c0, c1, c2, c3 = jnp.moveaxis(cubic_weights(src - floor), -1, 0)  # each [N, K, C]
  # Patch slot of each candidate's tap 0 (taps 1..3 follow it).
  base = jnp.where(down[..., None], 4.0 * jnp.arange(count, dtype=jnp.float32),
                   floor - peak_f[..., None] + 2.0)
  d = jnp.arange(_PATCH, dtype=jnp.float32) - base[..., None]  # [N, K, C, 16]
  weights = jnp.where(d == 0, c0[..., None], jnp.where(d == 1, c1[..., None], jnp.where(
      d == 2, c2[..., None], jnp.where(d == 3, c3[..., None], jnp.zeros_like(d)))))
  cells_up = peak_f[..., None] - 3.0 + jnp.arange(_PATCH, dtype=jnp.float32)
  cells_down = (floor[..., :4, None] + jnp.arange(-1.0, 3.0)).reshape(peak.shape + (_PATCH,))
  cells = jnp.clip(jnp.where(down[..., None], cells_down, cells_up), 0, n - 1)
  return pixels, valid, cells.astype(jnp.int32), weights


def _window_maximum(maps: Array, map_hw: tuple[int, int], peak_y: Array, peak_x: Array,
                    size_h: Array, size_w: Array, count_hw: tuple[int, int]):
  """Maximum of the bicubically resized heatmaps over the candidate pixels around a peak.

  Args:
    maps: [N, H * W, K] float32 heatmaps, cells in row-major order.
    map_hw: (H, W).
    peak_y, peak_x: [N, K] int32 peak cell of each heatmap.
    size_h, size_w: [N, 1] float32 resized height and width (ceil of the box's, >= 1).
    count_hw: static number of candidates per axis.

  Returns:
    value, y, x: [N, K] float32: the largest resampled value among the candidates and its pixel
    (the first in row-major order among equal values); value is -inf where none is valid.
  """
  n, _, k = maps.shape
  py, valid_y, rows, wy = _axis_window(peak_y, size_h, map_hw[0], count_hw[0])
  px, valid_x, cols, wx = _axis_window(peak_x, size_w, map_hw[1], count_hw[1])
  index = rows[..., :, None] * map_hw[1] + cols[..., None, :]  # [N, K, 16, 16]
  # One batch axis B = N * K from here: XLA's CPU dots and fusions are much faster on 3-d
  # operands than with two batch axes.
  patch = maps[jnp.arange(n)[:, None, None, None], index, jnp.arange(k)[None, :, None, None]]
  patch = patch.reshape(-1, _PATCH, _PATCH)
  wy, wx = wy.reshape((-1,) + wy.shape[2:]), wx.reshape((-1,) + wx.shape[2:])
  # Separable: rows, then columns ([B, Cy, Cx]), as float32 products on every backend.
  hi = jax.lax.Precision.HIGHEST
  by_row = jnp.einsum("bcp,bpq->bcq", wy, patch, precision=hi)
  values = jnp.einsum("bcq,bdq->bcd", by_row, wx, precision=hi)
  values = jnp.where(valid_x.reshape(-1, 1, wx.shape[1]), values, -jnp.inf)
  # Row maxima, then the best row's columns: cheap reductions in place of a variadic argmax
  # over Cy * Cx; the first row, then its first column, is row-major order.
  row_max = jnp.where(valid_y, jnp.max(values, axis=-1).reshape(valid_y.shape), -jnp.inf)
  best_row = jnp.argmax(row_max, axis=-1)  # [N, K]
  in_row = jnp.take_along_axis(values, best_row.reshape(-1, 1, 1), axis=1)  # [B, 1, Cx]
  best_col = jnp.argmax(in_row.reshape(n, k, -1), axis=-1)
  y = jnp.take_along_axis(py, best_row[..., None], axis=-1)[..., 0]
  x = jnp.take_along_axis(px, best_col[..., None], axis=-1)[..., 0]
  return jnp.max(row_max, axis=-1), y, x


def _peak_cells(maps: Array, num_peaks: int, radius: int = 1):
  """The argmax cell of each heatmap and ``num_peaks - 1`` further peaks.

  Peak i + 1 is the argmax over the cells outside the (2 radius + 1)^2 blocks centred on peaks
  1..i (radius 1 keeps a neighbour two cells away on a ridge, which a wider block would hide,
  and measured better than 2). Each argmax is two-level, the best row by its maximum and then
  the best cell of that row (the first in row-major order, as a flat argmax): a plain max over
  the maps is far cheaper on a CPU than a variadic argmax over all cells, and the exclusions
  only touch the blocks' rows.

  Args:
    maps: [N, H, W, K] float32.
    num_peaks: P >= 1.
    radius: half-width of the excluded blocks.

  Returns:
    ys, xs: lists of P [N, K] int32 cells; score [N, K]: the maximum (the value at peak 1).
  """
  n, h, w, k = maps.shape
  row_max = jnp.max(maps, axis=2)  # [N, H, K]
  row_ids = jnp.arange(h)[None, :, None]
  col_ids = jnp.arange(w)[None, :, None]
  ys, xs = [], []
  for _ in range(num_peaks):  # A few peaks: a static loop over whole arrays.
    masked = row_max
    if ys:
      offsets = jnp.arange(-radius, radius + 1)[None, :, None]
      touched = jnp.concatenate([jnp.clip(y[:, None, :] + offsets, 0, h - 1) for y in ys],
                                axis=1)  # [N, A, K]: the rows that meet a block.
      cells = jnp.take_along_axis(maps, touched[:, :, None, :], axis=1)  # [N, A, W, K]
      out = functools.reduce(jnp.logical_or, [
          (jnp.abs(touched - y[:, None, :]) <= radius)[:, :, None, :]
          & (jnp.abs(col_ids - x[:, None, :]) <= radius)[:, None, :, :]
          for y, x in zip(ys, xs)])
      kept_max = jnp.max(jnp.where(out, -jnp.inf, cells), axis=2)  # [N, A, K]
      for a in range(touched.shape[1]):
        masked = jnp.where(row_ids == touched[:, a:a + 1, :], kept_max[:, a:a + 1, :], masked)
    y = jnp.argmax(masked, axis=1)  # [N, K]
    row = jnp.take_along_axis(maps, y[:, None, None, :], axis=1)[:, 0]  # [N, W, K]
    for py, px in zip(ys, xs):
      out = (jnp.abs(y - py) <= radius)[:, None, :] & (jnp.abs(col_ids - px[:, None, :]) <= radius)
      row = jnp.where(out, -jnp.inf, row)
    if not ys:
      score = jnp.max(row, axis=1)
    ys.append(y)
    xs.append(jnp.argmax(row, axis=1))
  return ys, xs, score


def heatmaps_to_landmarks(logits: Array, rois: Array, max_box_hw: tuple[int, int],
                          num_peaks: int = 3) -> Array:
  """Decodes heatmaps to image coordinates and scores, as detectron2's heatmaps_to_keypoints.

  detectron2 resizes each RoI's H x W heatmap bicubically (torch F.interpolate, align_corners
  False: cubic convolution with a = -0.75, clamped border taps) to ceil(h) x ceil(w) pixels for
  the box (x0, y0, x0 + w, y0 + h), w and h clamped to >= 1, takes the argmax pixel (ix, iy)
  (the first in row-major order) and returns

    x = x0 + (ix + 0.5) * w / ceil(w),   y = y0 + (iy + 0.5) * h / ceil(h).

  Resizing every map to its box is a dynamic shape and costs ceil(h) * ceil(w) per channel, so
  this evaluates the resized map only near peaks of the H x W map: for a peak cell (a, b) the
  candidates are the pixels next to a source point within 0.75 cells of it (the resized
  maximum lies within about half a cell of its peak cell), at most 1.5 ceil(h) / H + 3 per axis
  (4 when the box is smaller than the map): a static count from ``max_box_hw``. Their values
  are computed separably from a 16 x 16 patch of the map, exactly as torch computes them
  (float32). A lower but broader peak can overtake the argmax cell after resizing, so there is
  a window on each of ``num_peaks`` cells: the argmax, then the argmax outside 3x3 blocks
  around the earlier ones; the best candidate of all wins (among equal values the first in
  row-major order).

  The result is torch's unless its maximum lies outside every window: more competing peaks
  than windows, or a box side below H / 2 (28 px) where the resize aliases (samples over two
  cells apart) and a peak outside the windows happens to be sampled higher; float32 near-ties
  (values within an ulp) may also resolve to the neighbouring pixel.

  The score is the heatmap's maximal logit (the H x W map's, as before; detectron2's "logit"
  column is the resized map's maximum).

  Args:
    logits: [N, H, W, K] heatmap logits (56x56 after `upsample_heatmaps`), any float dtype;
      decoded in float32.
    rois: [N, 4] boxes (x0, y0, x1, y1) in image coordinates.
    max_box_hw: (height, width) bound on the boxes' sides in pixels (the canvas, for boxes
      clipped to it); sizes the windows. Larger boxes get truncated windows.
    num_peaks: windows per heatmap (>= 1); each costs about as much as the first.

  Returns:
    [N, K, 3] float32 (x, y, score).
  """
  if num_peaks < 1:
    raise ValueError(f"num_peaks must be >= 1, got {num_peaks}")
  n, h, w, k = logits.shape
  maps = logits.astype(jnp.float32)
  rois = rois.astype(jnp.float32)
  x0, y0 = rois[:, 0:1], rois[:, 1:2]
  box_w = jnp.maximum(rois[:, 2:3] - x0, 1.0)
  box_h = jnp.maximum(rois[:, 3:4] - y0, 1.0)
  size_w, size_h = jnp.ceil(box_w), jnp.ceil(box_h)  # [N, 1]
  count_hw = (int(2 * _REACH * max_box_hw[0] / h) + 4, int(2 * _REACH * max_box_hw[1] / w) + 4)
  peak_ys, peak_xs, score = _peak_cells(maps, num_peaks)
  # One window at a time: smaller temporaries than all at once, which is faster on a CPU.
  windows = [_window_maximum(maps.reshape(n, h * w, k), (h, w), py, px, size_h, size_w,
                             count_hw) for py, px in zip(peak_ys, peak_xs)]
  value, y, x = (jnp.stack(v, axis=1) for v in zip(*windows))  # [N, P, K]
  # The best window; among equal values the pixel first in row-major order.
  top = jnp.max(value, axis=1, keepdims=True)
  order = jnp.where(value == top, y * size_w[:, None] + x, jnp.inf)
  pick = jnp.argmin(order, axis=1)[:, None]  # [N, 1, K]
  # The clamps only matter if no candidate were valid, which the windows' reach rules out.
  best_y = jnp.minimum(jnp.take_along_axis(y, pick, axis=1)[:, 0], size_h - 1.0)
  best_x = jnp.minimum(jnp.take_along_axis(x, pick, axis=1)[:, 0], size_w - 1.0)
  x = x0 + (best_x + 0.5) * (box_w / size_w)
  y = y0 + (best_y + 0.5) * (box_h / size_h)
  return jnp.stack([x, y, score], axis=-1)
