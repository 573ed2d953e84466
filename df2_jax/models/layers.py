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
  def __call__(self, x: Array) -> Array:
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
