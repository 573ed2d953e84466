"""RPN head (detectron2 StandardRPNHead), shared across pyramid levels.

Per level: conv 3x3 (channels) + ReLU, then 1x1 convs to A objectness logits
and 4A anchor deltas, all initialised N(0, 0.01) with zero bias. The outputs
of each level [B, Hl, Wl, A] and [B, Hl, Wl, A * 4] are flattened in
(y, x, anchor) order, exactly the order of ops/anchors.fpn_anchors, and the
levels are concatenated P2 first. Deltas use detectron2's channel layout
(anchor-major: channel a * 4 + k is coordinate k of anchor a).

With a bfloat16 `dtype` the two 1x1 predictors still take bfloat16 inputs
and weights but accumulate into and return float32 (preferred_element_type),
so logits and deltas are never rounded to bfloat16.
"""

from typing import Any, Mapping, Sequence, Tuple

import flax.linen as nn
import jax.numpy as jnp

from df2_jax.models.layers import f32_conv

Array = jnp.ndarray
Dtype = Any

DEFAULT_IN_FEATURES = ("P2", "P3", "P4", "P5", "P6")


class RPNHead(nn.Module):
  """Objectness and box deltas for every anchor of every level.

  Attributes:
    num_anchors: A, anchors per location (3 aspect ratios).
    channels: width of the shared 3x3 conv (the FPN's 256).
    in_features: pyramid levels, in output order.
    dtype: compute dtype of the convs (bfloat16 works); outputs are float32.
    param_dtype: parameter dtype.
  """
  num_anchors: int = 3
  channels: int = 256
  in_features: Sequence[str] = DEFAULT_IN_FEATURES
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, feats: Mapping[str, Array]) -> Tuple[Array, Array]:
    """Runs the head on every level with shared weights.

    Args:
      feats: {"P2": [B, H2, W2, C], ..., "P6": [B, H6, W6, C]}.

    Returns:
      logits: [B, sum_l Hl * Wl * A] float32 objectness logits.
      deltas: [B, sum_l Hl * Wl * A, 4] float32 (dx, dy, dw, dh).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=nn.initializers.normal(0.01),
              bias_init=nn.initializers.zeros)
    a = self.num_anchors
    conv = nn.Conv(self.channels, (3, 3), padding=((1, 1), (1, 1)),
                   name="conv", **kw)
    cls = nn.Conv(a, (1, 1), name="objectness_logits",
                  conv_general_dilated=f32_conv, **kw)
    box = nn.Conv(4 * a, (1, 1), name="anchor_deltas",
                  conv_general_dilated=f32_conv, **kw)
    logits, deltas = [], []
    for name in self.in_features:
      x = feats[name]
      b = x.shape[0]
      t = nn.relu(conv(x))
      logits.append(cls(t).astype(jnp.float32).reshape(b, -1))
      deltas.append(box(t).astype(jnp.float32).reshape(b, -1, 4))
    return jnp.concatenate(logits, axis=1), jnp.concatenate(deltas, axis=1)
