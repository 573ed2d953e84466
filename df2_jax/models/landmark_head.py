"""Landmark head: Detectron's keypoint head (KRCNNConvDeconvUpsampleHead).

[N, 14, 14, C] pooled RoI features -> 8 x (3x3 conv 512 + ReLU) -> 4x4
stride-2 transposed conv to K = 294 channels (torch ConvTranspose2d(k=4, s=2,
p=1): 14 -> 28). `LandmarkHead` returns these 28x28 logits; the fixed x2
bilinear upsampling to the 56x56 heatmaps is the separate function
`upsample_heatmaps`, so a caller can upsample only what it needs (for
instance the channels of each RoI's category: 294 x 56 x 56 float32 logits
are 3.7 MB per RoI). Channel `LANDMARK_START[c] + j` is landmark j of
category c (data_pipeline.deepfashion2).

Init as detectron2: every conv and the deconv use kaiming normal (fan_out,
ReLU gain) with zero bias (for the deconv "fan_out" is torch's
in_channels * k * k, which the transposed-kernel layout reproduces).

With a bfloat16 `dtype` the convs run in bfloat16; the deconv takes bfloat16
inputs and weights but accumulates into and returns float32.

`heatmaps_to_landmarks` decodes heatmaps to image coordinates:
argmax cell (ix, iy) of each channel of an [H, W] heatmap over the RoI
(x1, y1, x2, y2) gives

  x = x1 + (ix + 0.5) * (x2 - x1) / W,   y = y1 + (iy + 0.5) * (y2 - y1) / H,

the centre of that cell mapped onto the box (detectron2's heatmaps_to_keypoints
formula, on the fixed H x W grid instead of a map resized to the box), and
score = the maximal logit.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from df2_jax.models.layers import SubpixelConvTranspose, c2_msra_fill
from data_pipeline.deepfashion2 import NUM_LANDMARKS

Array = jnp.ndarray
Dtype = Any

# kaiming_normal_(mode="fan_out", nonlinearity="relu"), as detectron2.


class LandmarkHead(nn.Module):
  """Low-resolution landmark logits for every RoI.

  Attributes:
    num_landmarks: K, output channels (294: all categories' landmarks).
    conv_dim: width of the convs (512).
    num_convs: number of 3x3 convs (8).
    deconv_kernel: kernel of the stride-2 transposed conv (4; even).
    dtype: compute dtype of the convs (bfloat16 works); logits are float32.
    param_dtype: parameter dtype.
  """
  num_landmarks: int = NUM_LANDMARKS
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
        (its category's, losses.CATEGORY_CHANNELS), the same values as gathering them
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


def heatmaps_to_landmarks(logits: Array, rois: Array) -> Array:
  """Decodes heatmaps to image coordinates and scores (argmax per channel).

  For channel k with argmax cell (ix, iy) of the H x W map:
    x = x1 + (ix + 0.5) * (x2 - x1) / W
    y = y1 + (iy + 0.5) * (y2 - y1) / H
    score = logits[iy, ix, k]
  Ties resolve to the first cell in row-major order.

  Args:
    logits: [N, H, W, K] heatmap logits (56x56 after `upsample_heatmaps`).
    rois: [N, 4] boxes (x1, y1, x2, y2) in image coordinates.

  Returns:
    [N, K, 3] float32 (x, y, score).
  """
  n, h, w, k = logits.shape
  flat = logits.astype(jnp.float32).reshape(n, h * w, k)
  idx = jnp.argmax(flat, axis=1)  # [N, K]
  score = jnp.take_along_axis(flat, idx[:, None, :], axis=1)[:, 0, :]
  iy = (idx // w).astype(jnp.float32)
  ix = (idx % w).astype(jnp.float32)
  rois = rois.astype(jnp.float32)
  x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))
  x = x1 + (ix + 0.5) * (x2 - x1) / w
  y = y1 + (iy + 0.5) * (y2 - y1) / h
  return jnp.stack([x, y, score], axis=-1)
