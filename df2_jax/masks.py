"""Soft box-frame masks -> binary masks of the original image -> COCO RLE, region by region.

The mask head predicts, per detection, an [S, S] soft mask (probabilities) over the detection's
box. The evaluation needs a binary mask of the whole original image, as COCO RLE. This module
does it with detectron2's semantics (``detectron2.layers.mask_ops.paste_masks_in_image`` and
``_do_paste_mask``): the soft mask is resampled bilinearly into the box with
``F.grid_sample(..., align_corners=False)``, zeros padding, at the centres of the image pixels,
then thresholded ``>= 0.5``. For a box (x0, y0, x1, y1) and image pixel (i, j), on each axis
(shown for x; y likewise with i, y0, y1):

  g = (j + 0.5 - x0) / (x1 - x0) * 2 - 1      the pixel centre, normalised to the box ([-1, 1])
  u = (g + 1) * S / 2 - 0.5                   the same point in mask cells (cell k's centre: k)
  weight of cell floor(u): 1 - (u - floor(u));  of cell floor(u) + 1: u - floor(u)

cells outside 0..S-1 weigh nothing (zeros padding), and the value at (i, j) is the sum over the
four corners of soft[cell_y, cell_x] * weight_y * weight_x. The weights are separable, so the
values of a whole block of pixels are two small matrix products, value = Wy @ soft @ Wx^T, with
Wy [h, S] and Wx [w, S] the (dense, at most two nonzeros a row) interpolation matrices.

Arithmetic is float64. detectron2 runs it in float32 (and its CPU and GPU grid_sample kernels
unnormalise in different orders), so its own results disagree with the exact values, and with
each other, on pixels within about 1e-6 of 0.5. This module thresholds the exact values: in
float64 it agrees with a float64 per-pixel reference, and the region-only design pays for the
wider arithmetic (the comparison and the cost: docs/PERFORMANCE.md, "Evaluation").

Which pixels can be foreground. Bilinear sampling with zeros padding gives a pixel up to half a
cell outside the box a share of the border cells (u in (-1, -0.5) or (S - 0.5, S)), but that
share is below 1/2: the value there is below 0.5 * max(soft) <= 0.5, so it never passes the
threshold for probabilities in [0, 1]. Only pixels whose centres lie in the box can be
foreground, and this module computes the box widened by detectron2's CPU margin,
columns floor(x0) - 1 .. ceil(x1) (rows likewise), clipped to the image: exactly
``_do_paste_mask(..., skip_empty=True)``'s region, and equal to the full-image (GPU) result.

Why region by region. The old path (``data_pipeline.transforms.paste_mask`` then
``pycocotools.mask.encode``) built a full [H, W] array per detection and scanned it twice: with
100 detections per image and 32k images, that was the host's bottleneck. Here the work and
memory are proportional to the box, and the RLE comes straight from the region: the run
boundaries found in the region's columns map to full-image column-major indices
((col + left) * H + row + top), their differences are the uncompressed RLE counts, and
pycocotools only compresses them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools import mask as mask_utils

THRESHOLD = 0.5
# Outputs per block of the resampling products (128 KiB of float64; see _paste_transposed).
_BLOCK = 16384


def _pixel_range(b0: float, b1: float, size: int) -> tuple[int, int]:
  """detectron2's CPU region on one axis: [floor(b0) - 1, ceil(b1) + 1) clipped to [0, size)."""
  lo = min(max(int(np.floor(b0)) - 1, 0), size)
  hi = min(max(int(np.ceil(b1)) + 1, lo), size)
  return lo, hi


def _axis_weights(lo: int, hi: int, b0: float, b1: float, cells: int) -> np.ndarray:
  """[hi - lo, cells] bilinear weights of the mask cells for pixels lo..hi-1 of one axis.

  detectron2's normalisation, then grid_sample's unnormalisation (align_corners=False): u is
  the pixel centre in mask-cell units, cell k's centre at u = k. Cells outside 0..cells-1 get
  no row entry (zeros padding), so a pixel near the box border keeps only its inside share.
  """
  centres = np.arange(lo, hi, dtype=np.float64) + 0.5
  g = (centres - b0) / (b1 - b0) * 2 - 1
  u = ((g + 1) * cells - 1) / 2
  floor = np.floor(u)
  frac = u - floor
  first = floor.astype(np.int64)
  weights = np.zeros((hi - lo, cells), np.float64)
  rows = np.arange(hi - lo)
  ok = (first >= 0) & (first < cells)
  weights[rows[ok], first[ok]] = 1 - frac[ok]
  ok = (first >= -1) & (first < cells - 1)
  weights[rows[ok], first[ok] + 1] = frac[ok]
  return weights


def _paste_transposed(soft: np.ndarray, box: Sequence[float], image_hw: tuple[int, int]
                      ) -> tuple[np.ndarray, int, int]:
  """The thresholded region, transposed and padded for ``_padded_to_rle``.

  Returns:
    (padded, top, left): padded is [w, h + 2] bool, padded[c, r + 1] the pixel (top + r,
    left + c) of the [h, w] region; its first and last columns are False. Column-major order
    of the image is row-major order of this array, which is what the RLE wants.
  """
  img_h, img_w = (int(v) for v in image_hw)
  soft = np.asarray(soft, np.float64)
  x0, y0, x1, y1 = (float(v) for v in box)
  if not (np.isfinite([x0, y0, x1, y1]).all() and x1 > x0 and y1 > y0):
    return np.zeros((0, 2), bool), 0, 0  # no area (detectron2 would divide by zero)
  top, bottom = _pixel_range(y0, y1, img_h)
  left, right = _pixel_range(x0, x1, img_w)
  h, w = bottom - top, right - left
  padded = np.zeros((w, h + 2), bool)
  if not (h and w):
    return padded, top, left
  wx = _axis_weights(left, right, x0, x1, soft.shape[1])
  wy = _axis_weights(top, bottom, y0, y1, soft.shape[0])
  # value^T = Wx @ (Wy @ soft)^T, in row blocks of at most _BLOCK outputs: small enough that
  # OpenBLAS runs each product on the calling thread, since a threaded product is much slower
  # beside other busy processes (docs/PERFORMANCE.md, "Evaluation"). The evaluation runs this
  # beside other host work.
  wy_soft = np.empty((h, soft.shape[1]), np.float64)
  step = max(1, _BLOCK // soft.shape[1])
  for r in range(0, h, step):
    np.matmul(wy[r:r + step], soft, out=wy_soft[r:r + step])
  step = max(1, _BLOCK // h)
  block = np.empty((min(step, w), h), np.float64)
  for c in range(0, w, step):
    out = block[:min(step, w - c)]
    np.matmul(wx[c:c + step], wy_soft.T, out=out)
    np.greater_equal(out, THRESHOLD, out=padded[c:c + step, 1:-1])
  return padded, top, left


def _padded_to_rle(padded: np.ndarray, top: int, left: int, image_hw: tuple[int, int]) -> dict:
  """COCO RLE of the full image whose only foreground is the padded region (see above)."""
  img_h, img_w = (int(v) for v in image_hw)
  total = img_h * img_w
  stride = padded.shape[1]
  flat = padded.ravel()
  # Each padded column starts and ends with False, so boundaries alternate start, end, ...
  edges = np.flatnonzero(flat[1:] != flat[:-1]) + 1
  col, row = np.divmod(edges, stride)
  bounds = (col + left) * img_h + (row - 1 + top)  # full-image column-major indices
  if len(bounds) > 2:
    # A run ending at the bottom of one image column and one starting at the top of the next
    # are one run in the full image: drop such end/start pairs (equal indices).
    joined = np.zeros(len(bounds), bool)
    joined[1:-1:2] = joined[2::2] = bounds[1:-1:2] == bounds[2::2]
    bounds = bounds[~joined]
  counts = np.diff(np.concatenate([[0], bounds, [total]]))
  if len(bounds) and bounds[-1] == total:
    counts = counts[:-1]  # pycocotools never ends with an empty run of zeros
  rle = mask_utils.frPyObjects({"size": [img_h, img_w], "counts": counts.astype(np.uint32)},
                               img_h, img_w)
  counts_str = rle["counts"]
  return {"size": [img_h, img_w],
          "counts": counts_str.decode("utf-8") if isinstance(counts_str, bytes) else counts_str}


def paste_mask_region(soft: np.ndarray, box: Sequence[float], image_hw: tuple[int, int]
                      ) -> tuple[np.ndarray, tuple[int, int]]:
  """One soft mask pasted into its box, thresholded, as the region that can be foreground.

  Args:
    soft: [S, S] probabilities in the box frame (row = y, column = x).
    box: (x0, y0, x1, y1) in image pixels (continuous: pixel (i, j) covers [j, j + 1) x
      [i, i + 1)).
    image_hw: (H, W) of the image.

  Returns:
    (region, (top, left)): region [h, w] bool, the image's pixels top..top+h-1 x
    left..left+w-1 (every foreground pixel lies inside it; see the module docstring), with
    detectron2's ``paste_masks_in_image`` values there. A degenerate box (x1 <= x0, y1 <= y0 or
    not finite) gives an empty region.
  """
  padded, top, left = _paste_transposed(soft, box, image_hw)
  return padded[:, 1:-1].T, (top, left)


def region_to_rle(mask_region: np.ndarray, top_left: tuple[int, int],
                  image_hw: tuple[int, int]) -> dict:
  """COCO RLE of the [H, W] image whose only foreground is ``mask_region`` at ``top_left``.

  Never builds the full image. Equals ``pycocotools.mask.encode`` of the full mask, with counts
  as a utf-8 str (``coco._encode_mask``'s format): ``{"size": [H, W], "counts": str}``.
  """
  region = np.asarray(mask_region, bool)
  top, left = (int(v) for v in top_left)
  img_h, img_w = (int(v) for v in image_hw)
  h, w = region.shape
  if top < 0 or left < 0 or top + h > img_h or left + w > img_w:
    raise ValueError(f"region {h}x{w} at {(top, left)} is not inside the {img_h}x{img_w} image")
  padded = np.zeros((w, h + 2), bool)
  padded[:, 1:-1] = region.T
  return _padded_to_rle(padded, top, left, (img_h, img_w))


def paste_masks_rle(soft_masks: np.ndarray, boxes: np.ndarray, image_hw: tuple[int, int]
                    ) -> list[dict]:
  """COCO RLEs of D detections' masks: ``soft_masks`` [D, S, S] pasted into ``boxes`` [D, 4].

  ``boxes`` are (x0, y0, x1, y1) in the pixels of the (H, W) = ``image_hw`` image. Each RLE is
  ``{"size": [H, W], "counts": str}`` as ``region_to_rle`` gives (what COCOeval loads).
  """
  soft_masks = np.asarray(soft_masks, np.float64)
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  if len(soft_masks) != len(boxes):
    raise ValueError(f"{len(soft_masks)} masks but {len(boxes)} boxes")
  out = []
  for soft, box in zip(soft_masks, boxes):
    padded, top, left = _paste_transposed(soft, box, image_hw)
    out.append(_padded_to_rle(padded, top, left, image_hw))
  return out
