"""Mask head: detectron2's MaskRCNNConvUpsampleHead.

[N, 14, 14, C] pooled RoI features -> 4 x (3x3 conv 256 + ReLU) -> 2x2
stride-2 transposed conv 256 + ReLU (14 -> 28, torch ConvTranspose2d(k=2,
s=2, p=0) semantics) -> 1x1 conv to one mask logit per category ->
[N, 28, 28, 13]. Channel c - 1 is the mask of category c (class-specific
masks; no background channel).

Init as detectron2: the convs and the deconv use c2_msra_fill (kaiming normal,
mode fan_out, ReLU gain, zero bias; for the deconv "fan_out" is torch's
in_channels * k * k, which the transposed-kernel layout reproduces), the
predictor N(0, 0.001) with zero bias.

With a bfloat16 `dtype` the convs run in bfloat16; the predictor takes
bfloat16 inputs and weights but accumulates into and returns float32.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from df2_jax.models.layers import SubpixelConvTranspose, c2_msra_fill, f32_conv

Array = jnp.ndarray
Dtype = Any


class MaskHead(nn.Module):
  """Per-category 28x28 mask logits for every RoI.

  Attributes:
    num_classes: categories (the dataset spec's; DeepFashion2: 13), one mask channel
      each.
    conv_dim: width of the convs and the deconv (256).
    num_convs: number of 3x3 convs (4).
    dtype: compute dtype of the convs (bfloat16 works); logits are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int
  conv_dim: int = 256
  num_convs: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Predicts mask logits.

    Args:
      x: [N, h, w, C] pooled RoI features (14x14x256 in Match R-CNN).

    Returns:
      [N, 2h, 2w, num_classes] float32 mask logits (28x28 from 14x14);
      channel c - 1 belongs to category c.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              bias_init=nn.initializers.zeros)
    for i in range(self.num_convs):
      x = nn.Conv(self.conv_dim, (3, 3), padding=((1, 1), (1, 1)),
                  kernel_init=c2_msra_fill, name=f"mask_fcn{i + 1}", **kw)(x)
      x = nn.relu(x)
    # torch ConvTranspose2d(k=2, s=2, p=0): 14 -> 28, kernel stored as [k, k, out, in]
    # (torch's fan_out = in * k * k), run as a 1x1 conv + pixel shuffle.
    x = SubpixelConvTranspose(self.conv_dim, 2, 0, kernel_init=c2_msra_fill, name="deconv",
                              **kw)(x)
    x = nn.relu(x)
    x = nn.Conv(self.num_classes, (1, 1),
                kernel_init=nn.initializers.normal(0.001),
                conv_general_dilated=f32_conv, name="predictor", **kw)(x)
    return x.astype(jnp.float32)
