"""FPN anchors for a static canvas (detectron2 DefaultAnchorGenerator).

One anchor size per level (P2..P6: 32..512 at strides 4..64) and three
aspect ratios (h / w = 0.5, 1, 2). A cell anchor of size s and ratio r has
area s^2, w = sqrt(s^2 / r), h = r * w and is centred at 0; the anchors of a
level are the cell anchors shifted to (x * stride, y * stride) (offset 0).

Anchors are computed once with numpy from the static canvas shape; they are
constants under jit. Each level's anchors are ordered (y, x, anchor), matching
an NHWC head output [B, Hl, Wl, A * k] reshaped to [B, Hl * Wl * A, k].

An image sits top-left on its canvas with content size image_hw; the rest is
padding. `centre_in_image` is the one rule for which anchors belong to the
image: training never samples the others (targets.rpn_targets, which spells
the same rule inline; tests/test_padding.py checks that they agree) and no
proposal comes from them (proposals.generate_proposals).
"""

import math
from typing import List, Sequence, Tuple

import jax.numpy as jnp
import numpy as np

DEFAULT_STRIDES = (4, 8, 16, 32, 64)
DEFAULT_SIZES = (32, 64, 128, 256, 512)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def cell_anchors(sizes: Sequence[float],
                 aspect_ratios: Sequence[float]) -> np.ndarray:
  """Anchors centred at (0, 0), sizes outer and ratios inner (detectron2 order).

  Args:
    sizes: anchor sizes (sqrt of the area).
    aspect_ratios: h / w ratios.

  Returns:
    [len(sizes) * len(aspect_ratios), 4] float32 (x1, y1, x2, y2).
  """
  out = []
  for size in sizes:
    area = float(size) ** 2
    for ratio in aspect_ratios:
      w = math.sqrt(area / ratio)
      h = ratio * w
      out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
  return np.asarray(out, np.float32)


def feature_sizes(canvas_hw: Tuple[int, int],
                  strides: Sequence[int] = DEFAULT_STRIDES
                  ) -> List[Tuple[int, int]]:
  """(ceil(H / stride), ceil(W / stride)) per level."""
  h, w = canvas_hw
  return [(-(-h // s), -(-w // s)) for s in strides]


def grid_anchors(grid_hw: Tuple[int, int], stride: int,
                 cells: np.ndarray, offset: float = 0.0) -> np.ndarray:
  """Cell anchors shifted over a feature grid.

  Args:
    grid_hw: (Hl, Wl) of the feature map.
    stride: its stride in canvas pixels.
    cells: [A, 4] cell anchors.
    offset: anchor centres at ((x + offset) * stride, (y + offset) * stride).

  Returns:
    [Hl * Wl * A, 4] float32 in (y, x, anchor) order.
  """
  gh, gw = grid_hw
  shift_x = (np.arange(gw, dtype=np.float32) + offset) * stride
  shift_y = (np.arange(gh, dtype=np.float32) + offset) * stride
  sy, sx = np.meshgrid(shift_y, shift_x, indexing='ij')  # [Hl, Wl]
  shifts = np.stack([sx, sy, sx, sy], axis=-1).reshape(-1, 1, 4)
  return (shifts + cells[None, :, :]).reshape(-1, 4).astype(np.float32)


def fpn_anchors(canvas_hw: Tuple[int, int],
                strides: Sequence[int] = DEFAULT_STRIDES,
                sizes: Sequence[float] = DEFAULT_SIZES,
                aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS,
                offset: float = 0.0) -> List[np.ndarray]:
  """Anchors of every FPN level for a canvas.

  Args:
    canvas_hw: static (H, W) of the padded input.
    strides: one per level (P2..P6 by default).
    sizes: one anchor size per level.
    aspect_ratios: h / w ratios shared by all levels.
    offset: detectron2's ANCHOR_GENERATOR.OFFSET (0.0 by default).

  Returns:
    A list with one [Hl * Wl * A, 4] float32 array per level, where
    (Hl, Wl) = feature_sizes(canvas_hw, strides) and A = len(aspect_ratios).
  """
  if len(strides) != len(sizes):
    raise ValueError(f'{len(strides)} strides but {len(sizes)} sizes')
  grids = feature_sizes(canvas_hw, strides)
  return [grid_anchors(g, s, cell_anchors([size], aspect_ratios), offset)
          for g, s, size in zip(grids, strides, sizes)]


def num_anchors_per_level(canvas_hw: Tuple[int, int],
                          strides: Sequence[int] = DEFAULT_STRIDES,
                          num_ratios: int = len(DEFAULT_ASPECT_RATIOS)
                          ) -> List[int]:
  """Hl * Wl * A per level, e.g. [1152, 288, 72, 18, 6] for a 64x96 canvas."""
  return [h * w * num_ratios for h, w in feature_sizes(canvas_hw, strides)]


def centre_in_image(anchors, image_hw):
  """Whether each anchor's centre lies in the image content (not the padding).

  The centre (cx, cy) is inside when cx < w and cy < h (no lower bound: FPN
  centres are >= 0). An anchor centred in the padding sees no image content
  the RPN could learn from: rpn_targets never samples it, so its objectness is
  untrained and generate_proposals must not rank it either.

  Args:
    anchors: [A, 4] (x1, y1, x2, y2), e.g. all levels concatenated.
    image_hw: [2] or [B, 2] content (height, width) on the canvas.

  Returns:
    [A] or [B, A] bool, jit-friendly (image_hw may be traced).
  """
  anchors = jnp.asarray(anchors, jnp.float32)
  hw = jnp.asarray(image_hw, jnp.float32)
  cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
  cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
  return (cx < hw[..., 1:2]) & (cy < hw[..., 0:1])
