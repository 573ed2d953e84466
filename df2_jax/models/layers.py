"""Layers shared by the heads."""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# detectron2's initialisations. c2_xavier_fill: kaiming_uniform_(a=1) -> U(+-sqrt(3 / fan_in));
# c2_msra_fill: kaiming_normal_(mode="fan_out", nonlinearity="relu").
c2_xavier_fill = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
c2_msra_fill = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

# Matmul / convolution that accumulate and return float32 whatever the input dtype: the last
# layer of a head takes bf16 activations and weights but its logits are never rounded to bf16.
f32_dot = functools.partial(jax.lax.dot_general, preferred_element_type=jnp.float32)
f32_conv = functools.partial(jax.lax.conv_general_dilated, preferred_element_type=jnp.float32)


def _phase_taps(kernel: int, padding: int) -> tuple[np.ndarray, int]:
  """Kernel tap of every (output phase, input offset) of a stride-2 transposed conv.

  torch ConvTranspose2d computes out[o] = sum_i x[i] * w[o + padding - 2 i]. Writing
  o = 2 m + p and i = m + d, output phase p takes tap t = p + padding - 2 d from input m + d.
  Returns taps [2, 2R + 1] (d = -R..R; -1 where no tap exists) and R.
  """
  radius = (kernel + padding + 1) // 2
  d = np.arange(-radius, radius + 1)
  taps = np.array([[p + padding - 2 * dd for dd in d] for p in (0, 1)])
  taps = np.where((taps >= 0) & (taps < kernel), taps, -1)
  used = np.nonzero((taps >= 0).any(axis=0))[0]
  r = int(max(abs(d[used[0]]), abs(d[used[-1]])))
  return taps[:, radius - r:radius + r + 1], r


class SubpixelConvTranspose(nn.Module):
  """torch ``ConvTranspose2d(kernel, stride=2, padding)`` computed as a plain conv + pixel shuffle.

  The kernel is stored like a transposed-kernel ``nn.ConvTranspose``: [k, k, out, in] (torch's
  [in, out, k, k] is ``kernel.transpose(3, 2, 0, 1)``), with a bias [out]. Each of the four
  output phases (py, px) is a (2R + 1)^2 correlation of the input with the kernel taps that
  reach it, so the layer runs as one stride-1 convolution with 4 * out channels followed by a
  depth-to-space; no dilated input and no scatter in the backward pass (XLA's CPU backend is
  very slow on lhs-dilated convolutions; GPUs run both forms well).

  Attributes:
    features: output channels.
    kernel_size: k (2 and 4 are the heads' cases; any k works).
    padding: torch's padding (k = 2: 0; k = 4: 1), so the output is exactly 2x the input.
  """
  features: int
  kernel_size: int
  padding: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal()
  bias_init: Callable = nn.initializers.zeros
  preferred_element_type: Any = None

  @nn.compact
  def __call__(self, x: Array, channels: Array | None = None) -> Array:
    """[N, h, w, in] -> [N, 2h, 2w, features], or [N, 2h, 2w, M] with ``channels``.

    ``channels`` [N, M] int32 computes only output channels ``channels[n]`` for sample n (the
    same values as the full layer followed by a gather of those channels): the kernel columns
    of each sample are gathered and applied to the input's 3x3 patches as one batched matmul.
    That costs N * K * 4M gathered weights (K = (2R + 1)^2 * in) instead of the full layer's
    features / M times more multiply-adds; worth it when M is much smaller than features and
    the input is narrow (the landmark head's 39 of 294 channels in small models).
    """
    k, c_in = self.kernel_size, x.shape[-1]
    if 2 * self.padding != k - 2:
      raise ValueError(f"kernel {k} with padding {self.padding} does not double the size")
    kernel = self.param("kernel", self.kernel_init, (k, k, self.features, c_in),
                        self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    taps, r = _phase_taps(k, self.padding)
    # [k + 1, k + 1, in, out] with a zero row/column at index k for the missing taps (-1).
    w = jnp.pad(jnp.transpose(kernel, (0, 1, 3, 2)), ((0, 1), (0, 1), (0, 0), (0, 0)))
    t = np.where(taps < 0, k, taps)  # [2 phases, 2R + 1 offsets]
    w = w[t[:, :, None, None], t[None, None, :, :]]  # [py, dy, px, dx, in, out]
    if channels is not None:
      return self._selected(x, w, bias, r, channels)
    w = jnp.transpose(w, (1, 3, 4, 0, 2, 5)).reshape(2 * r + 1, 2 * r + 1, c_in,
                                                      4 * self.features)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), w.astype(self.dtype), (1, 1), ((r, r), (r, r)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=self.preferred_element_type)
    n, h, wd = y.shape[:3]
    y = y.reshape(n, h, wd, 2, 2, self.features).transpose(0, 1, 3, 2, 4, 5)
    y = y.reshape(n, 2 * h, 2 * wd, self.features)
    return y + bias.astype(y.dtype)

  def _selected(self, x: Array, w: Array, bias: Array, r: int, channels: Array) -> Array:
    # w: [py, dy, px, dx, in, out] -> per sample [N, dy * dx * in, py * px * M].
    n, m = channels.shape
    side = 2 * r + 1
    wsel = jnp.take(w, channels, axis=-1)  # [py, dy, px, dx, in, N, M]
    wsel = jnp.transpose(wsel, (5, 1, 3, 4, 0, 2, 6)).reshape(n, side * side * x.shape[-1],
                                                              4 * m)
    xp = jnp.pad(x.astype(self.dtype), ((0, 0), (r, r), (r, r), (0, 0)))
    h, wd = x.shape[1:3]
    patches = jnp.concatenate([xp[:, dy:dy + h, dx:dx + wd]
                               for dy in range(side) for dx in range(side)], axis=-1)
    y = jnp.einsum("nhwk,nkq->nhwq", patches, wsel.astype(self.dtype),
                   preferred_element_type=self.preferred_element_type)
    y = y.reshape(n, h, wd, 2, 2, m).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * wd, m)
    return y + jnp.take(bias, channels, axis=0)[:, None, None, :].astype(y.dtype)
