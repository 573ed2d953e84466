"""Per-image transforms in numpy: resize, horizontal flip, padding, static-shape instance arrays.

This module also defines the per-image part of the batch contract (``image_spec``); the input
pipeline stacks these into batches and the model reads them. It imports neither TensorFlow nor
JAX (and OpenCV only inside ``encode_image``), so every part of the project can use it.

Coordinates are continuous: a pixel (i, j) covers [j, j + 1) x [i, i + 1); resizing multiplies
coordinates by the per-axis scale; a horizontal flip of content of width w maps x to w - x.
Boxes and polygons are annotated in these coordinates. Landmarks are not: DeepFashion2, like
COCO, gives a landmark as the integer index of its pixel (0..W-1, 0..H-1). detectron2's
convention, kept here: ``landmarks_to_continuous`` adds 0.5 when the training arrays are built
(the pixel's centre; then a flip maps index x to W - 1 - x, the mirror pixel, where x -> W - x
on the index itself would land 1 px off), and ``landmarks_to_pixel_indices`` subtracts it again
when predictions are exported (``evaluation.results``, ``predict``), so that they are compared
with the annotations' indices. The evaluation ground truth keeps the annotated indices
(``Item.raw_landmarks``, ``convert``).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from data_pipeline.records import ImageRecord
from data_pipeline.spec import DatasetSpec

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageGeometry:
  """How an input image maps onto the canvas.

  Attributes:
    canvas_hw: (H, W) of the canvas that holds any image (e.g. 1344x1344 for shorter side 800,
      longer <= 1333); the resize never exceeds it.
    short_side: target length of the shorter side.
    max_size: cap on the longer side.
    max_instances: M, items per image after padding/truncation.
    mask_size: S, each instance mask is cropped to its box and resampled to S x S.
    buckets: smaller canvases (H, W) (e.g. 800x1344 landscape and 1344x800 portrait): a batch
      whose resized images all fit one of them is padded onto the smallest such (each canvas
      shape is one compiled program); other batches onto ``canvas_hw``. The resize is the same
      on every canvas, only the padding differs. Empty: every batch on ``canvas_hw``.
    spec: the dataset's taxonomy (the landmark layout and flip pairs of the instance arrays).
  """
  canvas_hw: tuple[int, int]
  short_side: int
  max_size: int
  max_instances: int
  mask_size: int
  buckets: tuple[tuple[int, int], ...] = ()
  spec: DatasetSpec = dataclasses.field(kw_only=True)

  @property
  def canvases(self) -> tuple[tuple[int, int], ...]:
    """The bucket canvases by increasing area (ties in the given order), then ``canvas_hw``:
    a canvas index is a position here."""
    ordered = sorted(dict.fromkeys(tuple(int(v) for v in c) for c in self.buckets),
                     key=lambda c: c[0] * c[1])
    return tuple(c for c in ordered if c != tuple(self.canvas_hw)) + (tuple(self.canvas_hw),)

  def fit_mask(self, height: int, width: int) -> int:
    """Bit k set where canvas k (``canvases``) holds an image of ``height`` x ``width`` once
    resized; the last bit (``canvas_hw``) is always set."""
    nh, nw = resized_hw(height, width, resize_scale(height, width, self), self.canvas_hw)
    return sum(1 << k for k, (ch, cw) in enumerate(self.canvases)
               if nh <= ch and nw <= cw) | (1 << (len(self.canvases) - 1))


def canvas_index(mask):
  """The smallest canvas of a ``fit_mask`` (or the AND of several: a batch's canvas): the index
  of its lowest set bit; elementwise for an array of masks."""
  masks = np.asarray(mask, np.int64)
  if np.any(masks <= 0):
    raise ValueError(f"no canvas in fit mask {mask}")
  index = np.log2(masks & -masks).astype(np.int64)
  return int(index) if index.ndim == 0 else index


def batch_canvas(geometry: ImageGeometry, sizes) -> tuple[int, int]:
  """The smallest of ``geometry.canvases`` that holds every (height, width) of ``sizes`` once
  resized (``geometry.canvas_hw`` without buckets or sizes)."""
  mask = -1
  for h, w in sizes:
    mask &= geometry.fit_mask(int(h), int(w))
  return geometry.canvases[canvas_index(mask)] if sizes and geometry.buckets else tuple(
      geometry.canvas_hw)


def image_spec(geometry: ImageGeometry, canvas_hw: tuple[int, int] | None = None
               ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of one encoded image (the batch contract without batch axes), on
  ``canvas_hw`` (default ``geometry.canvas_hw``; only "image" depends on the canvas)."""
  h, w = canvas_hw or geometry.canvas_hw
  m, s = geometry.max_instances, geometry.mask_size
  return {
      "image": ((h, w, 3), np.dtype(np.uint8)),
      "image_hw": ((2,), np.dtype(np.int32)),       # content size on the canvas
      "image_id": ((), np.dtype(np.int32)),
      "scale": ((), np.dtype(np.float32)),          # canvas = original * scale
      "orig_hw": ((2,), np.dtype(np.int32)),
      "flipped": ((), np.dtype(np.bool_)),
      "boxes": ((m, 4), np.dtype(np.float32)),      # x1, y1, x2, y2 on the canvas
      "classes": ((m,), np.dtype(np.int32)),        # 1..C (the spec's order), 0 = padding
      "instance_valid": ((m,), np.dtype(np.bool_)),
      "masks": ((m, s, s), np.dtype(np.uint8)),     # 0/1, cropped to the box
      # x, y (continuous: an annotated pixel index + 0.5, on the canvas), v
      "landmarks": ((m, geometry.spec.num_landmarks, 3), np.dtype(np.float32)),
      "pair_id": ((m,), np.dtype(np.int32)),
      "style": ((m,), np.dtype(np.int32)),
  }


def geometry_from_config(data) -> ImageGeometry:
  """The ``ImageGeometry`` of ``config.data`` (its spec: ``data.spec``)."""
  from data_pipeline import spec
  return ImageGeometry(tuple(int(v) for v in data.canvas), int(data.short_side),
                       int(data.max_size), int(data.max_instances), int(data.mask_size),
                       tuple(tuple(int(v) for v in c) for c in data.bucket_canvases),
                       spec=spec.from_config(data))


def zero_train_batch(geometry: ImageGeometry, pairs: int) -> dict[str, np.ndarray]:
  """A training batch of ``pairs`` image pairs in the contract's shapes, all zeros (``image_spec``
  with a [pairs, 2] lead, and ``match_valid`` [pairs]): the shapes that initialise a model."""
  batch = {k: np.zeros((pairs, 2) + shape, dtype)
           for k, (shape, dtype) in image_spec(geometry).items()}
  batch["match_valid"] = np.zeros((pairs,), bool)
  return batch


def resize_scale(height: int, width: int, geometry: ImageGeometry) -> float:
  """Scale that brings the shorter side to short_side, the longer to <= max_size, onto canvas."""
  scale = geometry.short_side / min(height, width)
  if max(height, width) * scale > geometry.max_size:
    scale = geometry.max_size / max(height, width)
  ch, cw = geometry.canvas_hw
  return min(scale, ch / height, cw / width)


def resized_hw(height: int, width: int, scale: float,
               canvas_hw: tuple[int, int]) -> tuple[int, int]:
  ch, cw = canvas_hw
  return (max(1, min(ch, int(round(height * scale)))),
          max(1, min(cw, int(round(width * scale)))))


def original_scale(image_hw, orig_hw) -> np.ndarray:
  """[sx, sy] float32: from the resized content on the canvas (``image_hw``, (h, w)) back to
  the original image (``orig_hw``, (H, W)), per axis: x_original = x_canvas * sx. Every path
  from detections to image pixels (evaluation, prediction, the Python API, the retrieval tool)
  scales with these factors, so their numbers agree to the bit."""
  (ch, cw), (h, w) = (np.asarray(image_hw).reshape(2).tolist(),
                      np.asarray(orig_hw).reshape(2).tolist())
  return np.array([float(w) / max(float(cw), 1.0), float(h) / max(float(ch), 1.0)], np.float32)


# Half a pixel: from a landmark's annotated pixel index to the pixel's centre (load) and back
# (export). See the module docstring.
LANDMARK_PIXEL_CENTRE = 0.5


def landmarks_to_continuous(local: np.ndarray, width: float, height: float) -> np.ndarray:
  """[..., 3] annotated landmarks (x, y, v; pixel indices) -> continuous coordinates.

  Labelled landmarks (v > 0) move to their pixel's centre, (x + 0.5, y + 0.5), then onto the
  image [0, width] x [0, height]: ``Item.landmarks`` are clipped to that range as indices, so an
  index on the far border (x = width, within the readers' tolerance) would end half a pixel
  outside. Unlabelled landmarks keep x = y = 0.
  """
  out = np.array(local, np.float32, copy=True)
  labelled = out[..., 2] > 0
  moved = np.clip(out[..., :2] + np.float32(LANDMARK_PIXEL_CENTRE), 0.0,
                  np.float32([width, height]))
  out[..., :2] = np.where(labelled[..., None], moved, out[..., :2])
  return out


def landmarks_to_pixel_indices(xy: np.ndarray) -> np.ndarray:
  """Continuous (x, y) of predicted landmarks -> the annotations' pixel-index convention
  (minus 0.5; detectron2's ``instances_to_coco_json``), in the original image's pixels, i.e.
  after scaling from the canvas: the inverse of ``landmarks_to_continuous`` up to the clipping.
  Apply it to real landmarks only (a detection's own category), not to zero-filled slots."""
  return np.asarray(xy, np.float32) - np.float32(LANDMARK_PIXEL_CENTRE)


def global_landmarks(category_id: int, local: np.ndarray, spec: DatasetSpec) -> np.ndarray:
  """Category-local [n, 3] landmarks -> the spec's global [L, 3] layout (zeros elsewhere)."""
  out = np.zeros((spec.num_landmarks, 3), np.float32)
  out[spec.landmark_slice(category_id)] = local
  return out


def flip_landmarks(landmarks: np.ndarray, width: float, spec: DatasetSpec) -> np.ndarray:
  """Horizontal flip of [..., L, 3] landmarks in the spec's global layout.

  Left and right landmarks swap (``spec.flip_perm``) and x becomes ``width - x`` (continuous
  coordinates: ``landmarks_to_continuous``); unlabelled points (v = 0) keep x = y = 0.
  """
  out = landmarks[..., spec.flip_perm, :].copy()
  labelled = out[..., 2] > 0
  out[..., 0] = np.where(labelled, width - out[..., 0], 0.0)
  return out


def flip_boxes(boxes: np.ndarray, width: float) -> np.ndarray:
  """Horizontal flip of [..., 4] (x1, y1, x2, y2) boxes."""
  out = boxes.copy()
  out[..., 0] = width - boxes[..., 2]
  out[..., 2] = width - boxes[..., 0]
  return out


def _polygon_samples(poly: np.ndarray, n: int) -> np.ndarray:
  """Even-odd inside test of the n x n sample centres (k + 0.5) of a polygon in grid units.

  Scanline form, no loop over pixels: each edge crossing a sample row adds 1 at the first
  sample centre right of the crossing; a prefix sum gives the crossings to the left of every
  centre, and an odd count means inside. Half-open in x and y, so a polygon and its mirror
  image cover mirrored samples exactly.
  """
  xa, ya = poly[:, 0], poly[:, 1]
  xb, yb = np.roll(xa, -1), np.roll(ya, -1)
  yc = np.arange(n) + 0.5  # [R]
  lo, hi = np.minimum(ya, yb), np.maximum(ya, yb)
  crosses = (lo[None, :] <= yc[:, None]) & (yc[:, None] < hi[None, :])  # [R, E]
  dy = np.where(yb == ya, 1.0, yb - ya)
  xc = xa[None, :] + (yc[:, None] - ya[None, :]) * ((xb - xa) / dy)[None, :]
  col = np.clip(np.ceil(xc - 0.5), 0, n).astype(np.int64)  # first centre at or right of xc
  flat = (np.arange(n)[:, None] * (n + 1) + col)[crosses]
  counts = np.bincount(flat, minlength=n * (n + 1)).reshape(n, n + 1)[:, :n] & 1
  return np.bitwise_xor.accumulate(counts.astype(np.uint8), axis=1).astype(bool)


def rasterize_crop(polygons: list[np.ndarray], box: np.ndarray, size: int,
                   supersample: int = 2) -> np.ndarray:
  """Rasterizes polygons (continuous coords) into the S x S grid spanning ``box``.

  Crop pixel (i, j) covers [x1 + j * w / S, x1 + (j + 1) * w / S) (likewise in y). It is 1
  when at least half of its ``supersample``^2 sample points lie inside the union of the
  polygons (each polygon even-odd). Exact and flip-symmetric: the crop of a mirrored item in
  its mirrored box is the mirrored crop.

  Returns: [S, S] uint8 in {0, 1}.
  """
  x1, y1, x2, y2 = (float(v) for v in box)
  fine = size * supersample
  scale = np.array([fine / max(x2 - x1, 1e-6), fine / max(y2 - y1, 1e-6)])
  inside = np.zeros((fine, fine), bool)
  for poly in polygons:
    inside |= _polygon_samples((poly.astype(np.float64) - (x1, y1)) * scale, fine)
  blocks = inside.reshape(size, supersample, size, supersample).sum(axis=(1, 3))
  return (2 * blocks >= supersample * supersample).astype(np.uint8)


def rle_crop(rle: dict, box: np.ndarray, size: int, flip: bool = False,
             supersample: int = 2) -> np.ndarray:
  """``rasterize_crop`` of a COCO RLE mask of the original image: the S x S grid spanning
  ``box`` (original pixels), each crop pixel 1 when at least half of its ``supersample``^2
  sample points fall on mask pixels; mirrored left-right with ``flip`` (the crop of the
  flipped item in its flipped box).

  Returns: [S, S] uint8 in {0, 1}.
  """
  from pycocotools import mask as mask_utils
  bitmap = mask_utils.decode({"size": list(rle["size"]), "counts": rle["counts"].encode()
                              if isinstance(rle["counts"], str) else rle["counts"]})
  h, w = bitmap.shape
  x1, y1, x2, y2 = (float(v) for v in box)
  fine = size * supersample
  xs = np.clip(np.floor(x1 + (np.arange(fine) + 0.5) * (x2 - x1) / fine), 0, w - 1).astype(int)
  ys = np.clip(np.floor(y1 + (np.arange(fine) + 0.5) * (y2 - y1) / fine), 0, h - 1).astype(int)
  inside = bitmap[ys][:, xs].astype(bool)
  blocks = inside.reshape(size, supersample, size, supersample).sum(axis=(1, 3))
  crop = (2 * blocks >= supersample * supersample).astype(np.uint8)
  return crop[:, ::-1].copy() if flip else crop


def encode_pixels(image: np.ndarray, geometry: ImageGeometry,
                  canvas_hw: tuple[int, int] | None = None, *, flip: bool = False,
                  name: str = "image") -> tuple[np.ndarray, tuple[int, int], float]:
  """One image's pixels resized by ``geometry``'s rule (``resize_scale``), optionally flipped,
  top-left on a zero canvas: ``(canvas [ch, cw, 3] uint8, (nh, nw) content size, scale)``.

  ``canvas_hw``: the canvas (one of ``geometry.canvases`` that holds the resized image; default
  ``geometry.canvas_hw``); ``ValueError`` naming ``name`` when the image does not fit it.
  """
  import cv2  # Here, not at the top: the batch contract must import without OpenCV.
  h, w = image.shape[:2]
  scale = resize_scale(h, w, geometry)
  nh, nw = resized_hw(h, w, scale, geometry.canvas_hw)
  resized = image if (nh, nw) == (h, w) else cv2.resize(
      image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
  if flip:
    resized = resized[:, ::-1]
  ch, cw = canvas_hw or geometry.canvas_hw
  if nh > ch or nw > cw:
    raise ValueError(f"{name}: resized to {nw}x{nh}, larger than the {cw}x{ch} canvas it was "
                     f"assigned")
  canvas = np.zeros((ch, cw, 3), np.uint8)
  canvas[:nh, :nw] = resized
  return canvas, (nh, nw), scale


def encode_image(record: ImageRecord, image: np.ndarray, geometry: ImageGeometry,
                 flip: bool, canvas_hw: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
  """Resizes, optionally flips and pads one image and its items into ``image_spec`` arrays.

  Args:
    record: the image's validated record.
    image: [h, w, 3] uint8, the decoded image (h, w = record.height, record.width).
    geometry: canvas and instance sizes.
    flip: whether to flip horizontally.
    canvas_hw: the canvas to pad onto (one of ``geometry.canvases`` that holds the resized
      image); default ``geometry.canvas_hw``.

  The pixels go through ``encode_pixels``; the items are scaled, flipped and padded with them.
  """
  h, w = image.shape[:2]
  if (h, w) != (record.height, record.width):
    raise ValueError(f"{record.image_path}: decoded size {w}x{h} differs from the record's "
                     f"{record.width}x{record.height}")
  canvas, (nh, nw), scale = encode_pixels(image, geometry, canvas_hw, flip=flip,
                                          name=record.image_path)
  ch, cw = canvas.shape[:2]
  sx, sy = nw / w, nh / h

  m, s = geometry.max_instances, geometry.mask_size
  items = tuple(item for item in record.items if not item.iscrowd)  # crowds: evaluation only
  if len(items) > m:
    log.warning("%s: image %d has %d items, more than max_instances=%d; keeping the first %d",
                record.anno_path or record.image_path, record.image_id, len(items), m, m)
    items = items[:m]
  spec = image_spec(geometry, (ch, cw))
  out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
  out["image"] = canvas
  out["image_hw"] = np.array([nh, nw], np.int32)
  out["image_id"] = np.int32(record.image_id)
  out["scale"] = np.float32(scale)
  out["orig_hw"] = np.array([h, w], np.int32)
  out["flipped"] = np.bool_(flip)
  axis_scale = np.array([sx, sy], np.float32)
  for k, item in enumerate(items):
    box = item.box.astype(np.float32) * np.tile(axis_scale, 2)
    # The one place where annotated landmark indices become continuous coordinates.
    lms = global_landmarks(item.category_id, landmarks_to_continuous(item.landmarks, w, h),
                           geometry.spec)
    lms[:, :2] *= axis_scale
    polys = [p.astype(np.float32) * axis_scale for p in item.polygons]
    if flip:
      box = flip_boxes(box, nw)
      lms = flip_landmarks(lms, nw, geometry.spec)
      polys = [np.stack([nw - p[:, 0], p[:, 1]], axis=1) for p in polys]
    out["boxes"][k] = box
    out["classes"][k] = item.category_id
    out["instance_valid"][k] = True
    out["masks"][k] = (rle_crop(item.rle, item.box, s, flip) if item.rle is not None
                       else rasterize_crop(polys, box, s))
    out["landmarks"][k] = lms
    out["pair_id"][k] = record.pair_id
    out["style"][k] = item.style
  return out


def paste_mask(crop: np.ndarray, box: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
  """Inverse of ``rasterize_crop`` up to resampling: an [S, S] crop back onto an [h, w] image.

  Image pixel (i, j) takes the crop value nearest to its centre (for drawing and checks).
  """
  h, w = hw
  x1, y1, x2, y2 = (float(v) for v in box)
  size = crop.shape[0]
  out = np.zeros((h, w), crop.dtype)
  jx = np.floor(((np.arange(w) + 0.5) - x1) * size / max(x2 - x1, 1e-6)).astype(np.int64)
  iy = np.floor(((np.arange(h) + 0.5) - y1) * size / max(y2 - y1, 1e-6)).astype(np.int64)
  inside_x = (jx >= 0) & (jx < size)
  inside_y = (iy >= 0) & (iy < size)
  sub = crop[np.clip(iy, 0, size - 1)][:, np.clip(jx, 0, size - 1)]
  out[:] = np.where(inside_y[:, None] & inside_x[None, :], sub, 0)
  return out
