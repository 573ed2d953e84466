"""Reading DeepFashion2 images: full decode to uint8 RGB, or the size from the header only.

Every failure (missing, empty, unreadable or truncated file) raises ``records.DataError`` with
field ``"image"``. Pixels are returned in stored order: EXIF orientation is not applied, so the
array matches the width and height in the file header, which is what the annotations refer to.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image
from PIL import ImageFile

from data_pipeline import records

_FIELD = "image"
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
