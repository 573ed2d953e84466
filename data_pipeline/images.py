"""Reading images: full decode to uint8 RGB, or the size from the header only; photos upright.

Every failure (missing, empty, unreadable or truncated file) raises ``records.DataError`` with
field ``"image"``. ``load_image`` returns the pixels in stored order: EXIF orientation is not
applied, so the array matches the width and height in the file header, which is what the
annotations refer to. ``read_image`` turns a photo upright by its EXIF orientation, as a photo
viewer shows it (prediction, the retrieval tool, the Python API), and ``read_windows`` reads
many such files a window at a time, decoded by a few threads one window ahead, with one error
policy: skip and count (the commands) or raise (the API).
"""

from __future__ import annotations

import concurrent.futures
import io
import logging
import os
from typing import Iterator, Sequence

import numpy as np
from PIL import Image
from PIL import ImageFile

from data_pipeline import records

log = logging.getLogger(__name__)

_FIELD = "image"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")  # the images a folder holds (any case)
# EXIF orientation (tag 0x0112) -> the Pillow transpose that shows the image upright
# (PIL.ImageOps.exif_transpose's table).
_EXIF_ORIENTATION = 0x0112
# Pillow modes that hold more than 8 bits per sample in one channel.
_WIDE_GRAY_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")


def _check_file(path: str) -> None:
  try:
    size = os.path.getsize(path)
  except OSError as e:
    raise records.DataError(path, _FIELD, f"cannot read file: {e}") from e
  if size == 0:
    raise records.DataError(path, _FIELD, "empty file")


def _to_rgb(image: Image.Image) -> np.ndarray:
  """A loaded Pillow image of any common mode -> [H, W, 3] uint8 RGB."""
  mode = image.mode
  if mode == "RGB":
    return np.asarray(image, dtype=np.uint8)
  if mode in _WIDE_GRAY_MODES:
    # 16-bit (or 32-bit integer) grayscale: scale the 16-bit range to 8 bits (65535 -> 255).
    gray = np.asarray(image).astype(np.float64)
    gray = np.clip(np.rint(gray / 257.0), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if mode == "F":
    gray = np.asarray(image, dtype=np.float64)
    gray = np.clip(np.rint(np.nan_to_num(gray)), 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
  if mode in ("P", "PA"):
    # Palette images may carry transparency; go through RGBA so it is dropped, not applied.
    image = image.convert("RGBA")
  # L, LA, 1, RGBA, RGBX, CMYK, YCbCr, LAB, HSV, ...: Pillow's conversion drops alpha.
  return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _decode(source, name: str) -> np.ndarray:
  """Fully decodes ``source`` (a path or a binary file object); errors name ``name``."""
  # A truncated file must fail, never decode to a partly grey image.
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = False
  try:
    with Image.open(source) as image:
      image.load()
      array = _to_rgb(image)
  except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError, ... on bad data.
    raise records.DataError(name, _FIELD, f"cannot decode image: {e}") from e
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous
  if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] == 0 or array.shape[1] == 0:
    raise records.DataError(name, _FIELD, f"decoded to an unusable array {array.shape}")
  return np.ascontiguousarray(array)


def load_image(path: str | os.PathLike) -> np.ndarray:
  """Fully decodes an image file (JPEG, PNG, ...) to RGB.

  Args:
    path: the image file.

  Returns:
    [H, W, 3] uint8 RGB array. Grayscale, palette, CMYK and alpha images are converted to RGB
    (alpha dropped); 16-bit images are scaled to 8 bits.

  Raises:
    records.DataError: field "image", for a missing, empty, unreadable or truncated file.
  """
  path = os.fspath(path)
  _check_file(path)
  return _decode(path, path)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """``load_image`` for encoded bytes held in memory; ``name`` identifies them in errors."""
  if not data:
    raise records.DataError(name, _FIELD, "empty file")
  return _decode(io.BytesIO(data), name)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
  """(width, height) of an image, read from its header only (no pixel decoding).

  Raises:
    records.DataError: field "image", for a missing, empty or unrecognised file or a header
      that gives an empty size. Truncated pixel data is NOT detected (use ``load_image``).
  """
  path = os.fspath(path)
  _check_file(path)
  try:
    with Image.open(path) as image:
      width, height = image.size
  except Exception as e:
    raise records.DataError(path, _FIELD, f"cannot read image header: {e}") from e
  if width <= 0 or height <= 0:
    raise records.DataError(path, _FIELD, f"image header gives size {width}x{height}")
  return int(width), int(height)


def image_names(folder: str | os.PathLike) -> list[str]:
  """The image files of ``folder`` (``IMAGE_EXTENSIONS`` in any case; not recursive), names
  sorted."""
  folder = os.fspath(folder)
  return sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(folder, n)))


def read_image(path: str | os.PathLike, *, exif_transpose: bool = True) -> np.ndarray:
  """An image file as [H, W, 3] uint8 RGB (``load_image``: any mode converted,
  ``records.DataError`` for a missing or broken file), turned upright by its EXIF orientation
  unless ``exif_transpose`` is False (the DeepFashion2 annotations take the pixels as
  stored)."""
  pixels = load_image(path)
  if not exif_transpose:
    return pixels
  try:
    with Image.open(os.fspath(path)) as image:
      orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
  except Exception:  # pylint: disable=broad-except  (an unreadable EXIF block: as stored)
    return pixels
  method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)
  if method is None:
    return pixels
  return np.ascontiguousarray(np.asarray(Image.fromarray(pixels).transpose(method)))


def _read_or_error(path: str, exif_transpose: bool) -> np.ndarray | records.DataError:
  try:
    return read_image(path, exif_transpose=exif_transpose)
  except records.DataError as e:
    return e


def read_windows(paths: Sequence[str], window: int, *, skipped: list[dict] | None = None,
                 exif_transpose: bool = True
                 ) -> Iterator[list[tuple[int, str, np.ndarray]]]:
  """The images of ``paths`` (``read_image``), ``window`` files at a time, in order: one list
  of (index in ``paths``, path, pixels) per ``window`` paths (a window of unreadable files
  only is an empty list). A few threads decode the next window while the caller works on this
  one, so that at most two windows of pixels are in memory.

  A file that cannot be decoded: with ``skipped`` (a list) it is logged, appended to it as
  ``{"path", "error"}`` and left out (the commands: skip and count); without, its
  ``records.DataError`` is raised (the API).
  """
  paths = [os.fspath(p) for p in paths]
  starts = range(0, len(paths), max(1, int(window)))
  with concurrent.futures.ThreadPoolExecutor(max(2, min(8, os.cpu_count() or 2))) as pool:
    decode = lambda start: pool.map(lambda p: _read_or_error(p, exif_transpose),
                                    paths[start:start + window])
    pending = decode(starts[0]) if starts else None
    for n, start in enumerate(starts):
      loaded = list(pending)
      pending = decode(starts[n + 1]) if n + 1 < len(starts) else None
      found = []
      for i, result in enumerate(loaded, start):
        if isinstance(result, records.DataError):
          if skipped is None:
            raise result
          log.warning("Skipping %s", result)
          skipped.append({"path": paths[i], "error": str(result)})
        else:
          found.append((i, paths[i], result))
      yield found
