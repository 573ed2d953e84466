"""Feature pyramid network (detectron2 FPN with LastLevelMaxPool).

Top-down: prev = lateral_5(C5); for k = 4, 3, 2:
prev = lateral_k(Ck) + upsample2x_nearest(prev); Pk = output_k(prev).
P6 = max_pool(P5, kernel 1, stride 2), i.e. every other pixel of P5.
Lateral convs are 1x1, output convs 3x3 with padding 1, all with bias and
detectron2's c2_xavier_fill init (kaiming_uniform with a=1, zero bias).

The canvas must be a multiple of 32, so each C level is exactly twice the
size of the next and no cropping is needed (asserted on the static shapes).
"""

from typing import Any, Dict, Mapping

import flax.linen as nn
import jax.numpy as jnp

from df2_jax.models.layers import c2_xavier_fill

Array = jnp.ndarray
Dtype = Any


def upsample2x_nearest(x: Array) -> Array:
  """[B, H, W, C] -> [B, 2H, 2W, C], like F.interpolate(x, 2, 'nearest')."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


class FPN(nn.Module):
  """detectron2 FPN over C2..C5 plus a max-pooled P6.

  Attributes:
    channels: output channels of every level (256).
    dtype: compute dtype (bfloat16 works).
    param_dtype: parameter dtype.
  """
  channels: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Mapping[str, Array]) -> Dict[str, Array]:
    """Builds the pyramid.

    Args:
      feats: {"C2": [B, H/4, W/4, c2], ..., "C5": [B, H/32, W/32, c5]}
        (extra keys are ignored).

    Returns:
      {"P2": [B, H/4, W/4, channels], ..., "P5": [B, H/32, W/32, channels],
       "P6": [B, ceil(H/64), ceil(W/64), channels]} in `dtype`.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=c2_xavier_fill, bias_init=nn.initializers.zeros)
    for k in (2, 3, 4):
      fine, coarse = feats[f"C{k}"].shape[1:3], feats[f"C{k + 1}"].shape[1:3]
      if fine != (2 * coarse[0], 2 * coarse[1]):
        raise ValueError(
            f"C{k} is {fine} but C{k + 1} is {coarse}: the canvas must be a "
            "multiple of 32")
    out = {}
    prev = None
    for k in (5, 4, 3, 2):
      lateral = nn.Conv(self.channels, (1, 1), name=f"lateral_{k}", **kw)(
          feats[f"C{k}"])
      prev = lateral if prev is None else lateral + upsample2x_nearest(prev)
      out[f"P{k}"] = nn.Conv(self.channels, (3, 3),
                             padding=((1, 1), (1, 1)), name=f"output_{k}",
                             **kw)(prev)
    out["P6"] = out["P5"][:, ::2, ::2, :]
    return {f"P{k}": out[f"P{k}"] for k in (2, 3, 4, 5, 6)}
