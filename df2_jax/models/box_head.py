"""Box head: detectron2's FastRCNNConvFCHead ("2fc") and FastRCNNOutputLayers.

Pooled RoI features [N, 7, 7, 256] are flattened (in (y, x, channel) order,
NHWC) and go through fc6 -> ReLU -> fc7 -> ReLU (1024 wide, detectron2's
c2_xavier_fill: kaiming uniform with a = 1, zero bias), then two linear
predictors:

  * `cls_score`: [N, num_classes + 1] logits. Index 0 is BACKGROUND and index
    c in 1..13 is DeepFashion2 category id c (torchvision's convention, so a
    class index is the category id; detectron2 puts background last instead).
    Init N(0, 0.01), zero bias.
  * `bbox_pred`: [N, num_classes * 4] class-specific deltas (dx, dy, dw, dh);
    columns 4 * (c - 1) .. 4 * (c - 1) + 3 belong to category c (there is no
    background regressor). Init N(0, 0.001), zero bias.

With a bfloat16 `dtype` the fcs run in bfloat16; the two predictors take
bfloat16 inputs and weights but accumulate into and return float32
(preferred_element_type), so logits and deltas are never rounded to bfloat16.
"""

from typing import Any, Tuple

import flax.linen as nn
import jax.numpy as jnp

from df2_jax.models.layers import c2_xavier_fill, f32_dot

Array = jnp.ndarray
Dtype = Any


class BoxHead(nn.Module):
  """Two fcs, then class logits and class-specific box deltas per RoI.

  Attributes:
    num_classes: foreground categories (the dataset spec's; DeepFashion2: 13); logits get
      one more column
      (background, index 0).
    fc_dim: width of each fc (1024).
    num_fc: number of hidden fcs (2).
    cls_agnostic_bbox_reg: one set of deltas for every class (detectron2's
      CLS_AGNOSTIC_BBOX_REG): `bbox_pred` has 4 outputs, repeated into every
      class's columns, so all foreground RoIs train the same regressor.
    dtype: compute dtype of the fcs (bfloat16 works); outputs are float32.
    param_dtype: parameter dtype.
  """
  num_classes: int
  fc_dim: int = 1024
  num_fc: int = 2
  cls_agnostic_bbox_reg: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Tuple[Array, Array]:
    """Scores and regresses every RoI.

    Args:
      x: [N, h, w, C] pooled RoI features (7x7x256 in Match R-CNN).

    Returns:
      class_logits: [N, num_classes + 1] float32; column 0 is background,
        column c is category c.
      box_deltas: [N, num_classes * 4] float32; columns 4 (c - 1) .. 4 c - 1
        are the (dx, dy, dw, dh) of category c.
    """
    n = x.shape[0]
    x = x.reshape(n, -1)
    for i in range(self.num_fc):
      x = nn.Dense(self.fc_dim, dtype=self.dtype, param_dtype=self.param_dtype,
                   kernel_init=c2_xavier_fill, bias_init=nn.initializers.zeros,
                   name=f"fc{6 + i}")(x)
      x = nn.relu(x)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              bias_init=nn.initializers.zeros, dot_general=f32_dot)
    logits = nn.Dense(self.num_classes + 1,
                      kernel_init=nn.initializers.normal(0.01),
                      name="cls_score", **kw)(x)
    num_reg = 1 if self.cls_agnostic_bbox_reg else self.num_classes
    deltas = nn.Dense(num_reg * 4,
                      kernel_init=nn.initializers.normal(0.001),
                      name="bbox_pred", **kw)(x)
    if self.cls_agnostic_bbox_reg:
      deltas = jnp.tile(deltas, (1, self.num_classes))
    return logits.astype(jnp.float32), deltas.astype(jnp.float32)
