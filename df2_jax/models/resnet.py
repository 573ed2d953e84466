"""ResNet-50 backbone with frozen batch norm (torchvision / detectron2 layout).

The module tree mirrors torchvision's `resnet50` so that ImageNet weights map
1:1 (torch name -> Flax path):

  conv1.weight                 -> params/conv1/kernel        (OIHW -> HWIO)
  bn1.{weight,bias,running_*}  -> constants/bn1/{weight,bias,running_*}
  layer1.0.conv1.weight        -> params/layer1_0/conv1/kernel
  layer1.0.downsample.0.weight -> params/layer1_0/downsample_conv/kernel
  layer1.0.downsample.1.*      -> constants/layer1_0/downsample_bn/*

Bottlenecks are v1.5 (the stride sits on the 3x3 conv), convolutions have no
bias and use torch's explicit symmetric padding. Batch-norm statistics and
affine parameters live in the "constants" collection: they are never trained,
so an optimizer over "params" cannot touch them.

Everything is NHWC. On a canvas whose sides are multiples of 32 every stage
halves the size exactly: C2..C5 have strides 4, 8, 16, 32.
"""

import re
from typing import Any, Dict, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jnp.ndarray
Dtype = Any

# torchvision's ImageNet normalisation, in 0..255 RGB units.
IMAGENET_MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")

_STAGE_RE = re.compile(r"^layer(\d+)_\d+$")


def normalize_image(images: Array, dtype: Dtype = jnp.float32,
                    image_hw: Optional[Array] = None) -> Array:
  """(x - mean) / std with torchvision's ImageNet RGB statistics.

  With image_hw, each image's content is its top-left image_hw pixels and the
  rest of the canvas is padding, set to 0: the pixel mean, as Detectron and
  detectron2 pad (after normalisation). This is done here rather than by
  filling the uint8 canvas: the mean (123.675, 116.28, 103.53) is not a uint8
  value, and whatever the canvas holds there (zeros, stale pixels) cannot
  reach the network.

  Args:
    images: [B, H, W, 3] uint8 (or float in 0..255) RGB.
    dtype: output dtype; the arithmetic is done in float32.
    image_hw: optional [B, 2] content (height, width) of each image.

  Returns:
    [B, H, W, 3] normalised images in `dtype`.
  """
  x = jnp.asarray(images).astype(jnp.float32)
  mean = jnp.asarray(IMAGENET_MEAN_RGB, jnp.float32)
  std = jnp.asarray(IMAGENET_STD_RGB, jnp.float32)
  x = (x - mean) / std
  if image_hw is not None:
    b, h, w = x.shape[:3]
    hw = jnp.asarray(image_hw)
    if hw.shape != (b, 2):
      raise ValueError(f"image_hw {hw.shape} must be [B, 2] for images {x.shape}")
    rows = jnp.arange(h)[None, :, None] < hw[:, 0, None, None]  # [B, H, 1]
    cols = jnp.arange(w)[None, None, :] < hw[:, 1, None, None]  # [B, 1, W]
    x = jnp.where((rows & cols)[..., None], x, 0.0)
  return x.astype(dtype)


class FrozenBatchNorm(nn.Module):
  """torchvision FrozenBatchNorm2d: y = x * scale + shift.

  scale = weight / sqrt(running_var + eps), shift = bias - running_mean *
  scale, computed in float32 and applied in `dtype`. The four [C] vectors are
  variables of the "constants" collection (weight 1, bias 0, mean 0, var 1
  at init), not trainable params.

  Attributes:
    eps: added to the variance (torchvision's 1e-5).
    dtype: compute dtype of the output.
    param_dtype: dtype of the stored vectors.
  """
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[..., C] -> [..., C] in `dtype`."""
    c = x.shape[-1]
    ones = lambda: jnp.ones((c,), self.param_dtype)
    zeros = lambda: jnp.zeros((c,), self.param_dtype)
    weight = self.variable("constants", "weight", ones).value
    bias = self.variable("constants", "bias", zeros).value
    mean = self.variable("constants", "running_mean", zeros).value
    var = self.variable("constants", "running_var", ones).value
    scale = weight.astype(jnp.float32) * jax.lax.rsqrt(
        var.astype(jnp.float32) + self.eps)
    shift = bias.astype(jnp.float32) - mean.astype(jnp.float32) * scale
    x = jnp.asarray(x, self.dtype)
    return x * scale.astype(self.dtype) + shift.astype(self.dtype)


NORMS = ("FrozenBN", "GN")


def make_norm(norm: str, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
  """The normalisation after a conv: "FrozenBN" (constants; detectron2's default for
  pretrained backbones) or "GN" (GroupNorm with up to 32 groups, trainable scale and bias in
  "params"; detectron2's choice for training from scratch)."""
  if norm == "FrozenBN":
    return FrozenBatchNorm(name=name, dtype=dtype, param_dtype=param_dtype)
  if norm == "GN":
    return _GroupNorm(name=name, dtype=dtype, param_dtype=param_dtype)
  raise ValueError(f"norm={norm!r}: expected one of {NORMS}")


class _GroupNorm(nn.Module):
  """GroupNorm over min(32, C) groups (C = channels), statistics in float32."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    groups = min(32, c)
    while c % groups:
      groups -= 1
    y = nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32,
                     param_dtype=self.param_dtype, name="gn")(x.astype(jnp.float32))
    return y.astype(self.dtype)


def _conv(features: int, kernel: int, stride: int, name: str, dtype: Dtype,
          param_dtype: Dtype) -> nn.Conv:
  pad = (kernel - 1) // 2
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), use_bias=False,
                 kernel_init=conv_kernel_init, dtype=dtype,
                 param_dtype=param_dtype, name=name)


class Bottleneck(nn.Module):
  """torchvision Bottleneck (v1.5): 1x1 -> 3x3 (stride) -> 1x1 (x4) + skip.

  Attributes:
    planes: width of the 1x1 and 3x3 convs; the output has 4 * planes.
    stride: stride of the 3x3 conv (and of the projection shortcut).
    downsample: whether the shortcut is a 1x1 conv + frozen BN projection.
    dtype: compute dtype.
    param_dtype: parameter dtype.
  """
  planes: int
  stride: int = 1
  downsample: bool = False
  norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """[B, H, W, Cin] -> [B, H / stride, W / stride, 4 * planes]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: make_norm(self.norm, name, **kw)
    out = _conv(self.planes, 1, 1, "conv1", **kw)(x)
    out = nn.relu(norm("bn1")(out))
    out = _conv(self.planes, 3, self.stride, "conv2", **kw)(out)
    out = nn.relu(norm("bn2")(out))
    out = _conv(4 * self.planes, 1, 1, "conv3", **kw)(out)
    out = norm("bn3")(out)
    if self.downsample:
      identity = _conv(4 * self.planes, 1, self.stride, "downsample_conv",
                       **kw)(x)
      identity = norm("downsample_bn")(identity)
    else:
      identity = jnp.asarray(x, self.dtype)
    return nn.relu(out + identity)


class ResNet(nn.Module):
  """torchvision ResNet with Bottleneck blocks (ResNet-50 by default).

  Attributes:
    stage_sizes: blocks in layer1..layer4 ((3, 4, 6, 3) is ResNet-50).
    width: stem width; stage k has planes width * 2^(k-1) and outputs
      4 * width * 2^(k-1) channels (64 for the real network).
    freeze_at: detectron2's FREEZE_AT applied to the forward pass: 0 none,
      1 the stem, k >= 2 the stem and layer1..layer(k-1). The output of the
      last frozen part goes through stop_gradient, so no backward pass is
      computed for it and the gradients of its params are exactly zero. Use
      `frozen_param_mask` with the same value to keep the optimizer (and
      weight decay) off them.
    norm: "FrozenBN" (frozen batch norm in "constants", for pretrained
      weights) or "GN" (trainable GroupNorm, for training from scratch).
    dtype: compute dtype (bfloat16 works).
    param_dtype: parameter dtype.
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64
  freeze_at: int = 0
  norm: str = "FrozenBN"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Dict[str, Array]:
    """Bottom-up features.

    Args:
      x: [B, H, W, 3] normalised images (see `normalize_image`).

    Returns:
      {"C2": [B, H/4, W/4, 4w], "C3": [B, H/8, W/8, 8w],
       "C4": [B, H/16, W/16, 16w], "C5": [B, H/32, W/32, 32w]} in `dtype`
      (sizes rounded up; exact on a canvas that is a multiple of 32).
    """
    if len(self.stage_sizes) != 4:
      raise ValueError(f"expected 4 stages, got {self.stage_sizes}")
    if not 0 <= self.freeze_at <= 5:
      raise ValueError(f"freeze_at must be in [0, 5], got {self.freeze_at}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = _conv(self.width, 7, 2, "conv1", **kw)(jnp.asarray(x, self.dtype))
    x = nn.relu(make_norm(self.norm, "bn1", **kw)(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    if self.freeze_at >= 1:
      x = jax.lax.stop_gradient(x)
    feats = {}
    for i, num_blocks in enumerate(self.stage_sizes):
      planes = self.width * 2**i
      for j in range(num_blocks):
        x = Bottleneck(planes, stride=(2 if i > 0 and j == 0 else 1),
                       downsample=(j == 0), norm=self.norm, name=f"layer{i + 1}_{j}",
                       **kw)(x)
      if self.freeze_at >= i + 2:
        x = jax.lax.stop_gradient(x)
      feats[f"C{i + 2}"] = x
    return feats


def _key_name(key) -> Optional[str]:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return None


def frozen_param_mask(params: Any, freeze_at: int,
                      backbone: Optional[str] = "backbone") -> Any:
  """Which leaves detectron2's FREEZE_AT freezes (True = frozen).

  The ResNet is found by name: it is the subtree under the first path
  component equal to `backbone` (anywhere in the path, so both
  params["backbone"] and variables["params"]["backbone"] work), or the whole
  tree when `backbone` is None. Inside it, the component right below the
  ResNet decides: "conv1" / "bn1" are the stem (frozen when freeze_at >= 1)
  and "layer{k}_{j}" is a block of stage k (frozen when freeze_at > k).
  Leaves outside the ResNet are never frozen.

  Args:
    params: a pytree of nested dicts (model params, or a variables dict).
    freeze_at: 0 nothing, 1 the stem, 2 stem + layer1 (detectron2's default),
      ..., 5 the whole ResNet.
    backbone: name of the ResNet submodule, or None if `params` is the
      ResNet's own tree.

  Returns:
    A pytree of Python bools with the structure of `params` (usable as an
    optax mask, e.g. optax.multi_transform labels or optax.masked).
  """
  if not 0 <= freeze_at <= 5:
    raise ValueError(f"freeze_at must be in [0, 5], got {freeze_at}")

  def is_frozen(path, _):
    names = [_key_name(k) for k in path]
    if backbone is None:
      start = 0
    elif backbone in names:
      start = names.index(backbone) + 1
    else:
      return False
    if start >= len(names):
      return False
    top = names[start]
    if top in ("conv1", "bn1"):
      return freeze_at >= 1
    m = _STAGE_RE.match(top or "")
    return bool(m) and int(m.group(1)) < freeze_at

  return jax.tree_util.tree_map_with_path(is_frozen, params)
