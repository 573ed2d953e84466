"""Tests for data_pipeline.images: mode conversions and failures on bad files."""

import io

import numpy as np
from PIL import Image
from PIL import ImageFile
import pytest

from data_pipeline import images
from data_pipeline import records


def _save(image: Image.Image, path, **kwargs):
  image.save(path, **kwargs)
  return str(path)


def _noise_jpeg_bytes(width=64, height=48, seed=0) -> bytes:
  rng = np.random.default_rng(seed)
  pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
  return buf.getvalue()


def test_rgb_jpeg_shape_and_size(tmp_path):
  path = _save(Image.new("RGB", (7, 5), (255, 0, 0)), tmp_path / "a.jpg", quality=100)
  array = images.load_image(path)
  assert array.shape == (5, 7, 3)
  assert array.dtype == np.uint8
  np.testing.assert_allclose(array[2, 3], [255, 0, 0], atol=3)
  assert images.image_size(path) == (7, 5)


def test_grayscale_png(tmp_path):
  path = _save(Image.new("L", (4, 3), 100), tmp_path / "g.png")
  array = images.load_image(path)
  assert array.shape == (3, 4, 3) and array.dtype == np.uint8
  assert (array == 100).all()


def test_grayscale_alpha_png(tmp_path):
  path = _save(Image.new("LA", (4, 3), (60, 0)), tmp_path / "la.png")
  array = images.load_image(path)
  assert array.shape == (3, 4, 3)
  assert (array == 60).all()  # Alpha dropped, not composited onto black or white.


def test_grayscale_jpeg(tmp_path):
  path = _save(Image.new("L", (8, 8), 128), tmp_path / "g.jpg", quality=100)
  array = images.load_image(path)
  assert array.shape == (8, 8, 3)
  np.testing.assert_allclose(array, 128, atol=2)


def test_cmyk_jpeg(tmp_path):
  # CMYK (0, 255, 255, 0) is pure red; (0, 0, 0, 255) is black.
  image = Image.new("CMYK", (16, 8), (0, 255, 255, 0))
  image.paste((0, 0, 0, 255), (8, 0, 16, 8))
  path = _save(image, tmp_path / "cmyk.jpg", quality=100)
  with Image.open(path) as check:
    assert check.mode == "CMYK"
  array = images.load_image(path)
  assert array.shape == (8, 16, 3) and array.dtype == np.uint8
  np.testing.assert_allclose(array[4, 2], [255, 0, 0], atol=4)
  np.testing.assert_allclose(array[4, 13], [0, 0, 0], atol=4)


def test_rgba_png_drops_alpha(tmp_path):
  path = _save(Image.new("RGBA", (3, 2), (10, 20, 30, 0)), tmp_path / "rgba.png")
  array = images.load_image(path)
  assert array.shape == (2, 3, 3)
  assert (array == [10, 20, 30]).all()


@pytest.mark.parametrize("transparency", [None, 0])
def test_palette_png(tmp_path, transparency):
  image = Image.new("P", (4, 2), 0)
  image.putpalette([0, 0, 0, 200, 100, 50] + [0] * (3 * 254))
  image.paste(1, (2, 0, 4, 2))
  kwargs = {} if transparency is None else {"transparency": transparency}
  path = _save(image, tmp_path / "p.png", **kwargs)
  array = images.load_image(path)
  assert array.shape == (2, 4, 3)
  assert (array[:, :2] == [0, 0, 0]).all()
  assert (array[:, 2:] == [200, 100, 50]).all()


def test_16bit_png_scaled_to_8bit(tmp_path):
  values = np.array([[0, 257 * 10, 32896, 65535]], np.uint16)
  path = _save(Image.fromarray(values), tmp_path / "16.png")
  with Image.open(path) as check:
    assert check.mode.startswith("I")
  array = images.load_image(path)
  assert array.shape == (1, 4, 3) and array.dtype == np.uint8
  assert array[0, :, 0].tolist() == [0, 10, 128, 255]
  assert (array[..., 0] == array[..., 2]).all()


def test_truncated_jpeg_raises(tmp_path):
  data = _noise_jpeg_bytes()
  path = tmp_path / "trunc.jpg"
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(records.DataError) as info:
    images.load_image(path)
  assert info.value.field == "image"
  assert info.value.path == str(path)
  # The header alone is intact: the cheap check passes, as documented.
  assert images.image_size(path) == (64, 48)


def test_truncated_jpeg_raises_even_if_pillow_flag_set(tmp_path):
  data = _noise_jpeg_bytes()
  path = tmp_path / "trunc.jpg"
  path.write_bytes(data[:len(data) // 2])
  previous = ImageFile.LOAD_TRUNCATED_IMAGES
  ImageFile.LOAD_TRUNCATED_IMAGES = True
  try:
    with pytest.raises(records.DataError):
      images.load_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # Restored for the other users.
  finally:
    ImageFile.LOAD_TRUNCATED_IMAGES = previous


@pytest.mark.parametrize("content,reason", [
    (b"", "empty file"),
    (b"this is not an image at all", "cannot"),
    (b"\xff\xd8\xff\xe0" + b"\x00" * 40, "cannot"),  # JPEG magic, garbage after it.
])
@pytest.mark.parametrize("fn", [images.load_image, images.image_size])
def test_bad_files_raise(tmp_path, content, reason, fn):
  path = tmp_path / "bad.jpg"
  path.write_bytes(content)
  with pytest.raises(records.DataError, match=reason) as info:
    fn(path)
  assert info.value.field == "image"
  assert info.value.path == str(path)


def test_missing_file_raises(tmp_path):
  with pytest.raises(records.DataError) as info:
    images.load_image(tmp_path / "nope.jpg")
  assert info.value.field == "image"


def test_decode_image_bytes(tmp_path):
  buf = io.BytesIO()
  Image.new("LA", (5, 4), (77, 255)).save(buf, format="PNG")
  array = images.decode_image_bytes(buf.getvalue(), "tfds:x[3]")
  assert array.shape == (4, 5, 3) and (array == 77).all()
  data = _noise_jpeg_bytes()
  for bad, reason in ((b"", "empty"), (data[:len(data) // 2], "cannot decode")):
    with pytest.raises(records.DataError, match=reason) as info:
      images.decode_image_bytes(bad, "tfds:x[3]")
    assert (info.value.path, info.value.field) == ("tfds:x[3]", "image")
