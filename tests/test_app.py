"""The web app's handler on its own (``df2_jax.app.PhotoApp``, no server): a photo's garments
drawn, tabled and matched against the shop index as ``retrieval query`` matches them; a second
photo compiles nothing; every bad upload is a message and the next photo is answered."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from conftest import make_app_world, write_huge_png
from data_pipeline import images
from df2_jax import app as app_lib
from df2_jax import inference, retrieval


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  return make_app_world(tmp_path_factory.mktemp("app"))


@pytest.fixture(scope="module")
def app(world):
  return app_lib.PhotoApp.from_workdir(str(world["workdir"]), index_dir=str(world["index"]),
                                       top=3, min_score=0.0)


def test_a_photo_is_drawn_tabled_and_matched_as_the_retrieval_tool_matches_it(world, app):
  photo = str(world["images"] / "000002.jpg")  # pair 1's user photo
  a = app.answer(photo)
  pixels = images.read_image(photo)
  scale = app_lib.DRAW_SIZE // max(pixels.shape)  # a small photo is drawn scaled up
  h, w = pixels.shape[:2]
  assert a.ok and a.picture.shape == (h * scale, w * scale, 3) and a.picture.dtype == np.uint8
  upscaled = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
  assert (a.picture != upscaled).any(axis=2).mean() > 0.05  # masks, boxes and labels drawn
  n = len(a.table)
  assert n > 0 and a.message.startswith(f"000002.jpg: {n} garment(s) in ")
  assert len(a.choices) == n and len(a.matches) == n

  # The page's garments and matches are those of `retrieval query` at the same min_score.
  finder = retrieval.GarmentFinder(world["config"], app.predictor.run.variables, min_score=0.0,
                                   nms=app.nms)
  [(_, want)] = list(retrieval.run_query(app.index, finder, [photo], top=3))
  r = a.result
  assert r["names"] == [g["category"] for g in want["garments"]]
  np.testing.assert_allclose(r["boxes"], [g["box"] for g in want["garments"]], atol=0.01)
  assert r["matches"] == [g["results"] for g in want["garments"]]
  assert [len(m) for m in a.matches] == [min(3, len(app.index))] * n
  first = want["garments"][0]["results"][0]
  assert a.matches[0][0][1] == (f"#1 {first['match_score']:.3f} "
                                f"{os.path.basename(first['image'])}")
  assert a.table[0][:3] == [1, r["names"][0], round(r["scores"][0], 3)]

  # The JSON holds the Predictor's fields of those garments; masks as COCO RLE.
  full = app.predictor(pixels)
  rows = retrieval.garment_rows(full, min_score=0.0, nms=app.nms)
  np.testing.assert_array_equal(mask_utils.decode(r["masks"][0]).astype(bool),
                                full["masks"][rows[0]])
  assert r["category_ids"] == full["category_ids"][rows].tolist()
  np.testing.assert_allclose(r["landmarks"][0], full["landmarks"][rows[0]], atol=0.006)
  assert r["image_hw"] == list(pixels.shape[:2]) and len(r["embeddings"][0]) == 16


def test_a_shop_photo_finds_itself_first(world, app):
  a = app.answer(str(world["images"] / "000001.jpg"))
  assert a.ok and a.result["matches"]
  for garment_box, matches in zip(a.result["boxes"], a.result["matches"]):
    assert matches[0]["image"].endswith("000001.jpg")
    np.testing.assert_allclose(matches[0]["box"], garment_box, atol=0.01)


def test_a_second_photo_on_the_same_canvas_compiles_nothing(world, app):
  app.answer(str(world["images"] / "000004.jpg"))  # the programs of this canvas, if not yet
  a = app.answer(str(world["images"] / "000006.jpg"))
  assert a.ok and a.compiled == 0 and "compiling" not in a.message


def test_bad_uploads_are_messages_and_the_next_photo_is_answered(world, app, tmp_path):
  good = str(world["images"] / "000002.jpg")
  want = app.answer(good).result["boxes"]
  text = tmp_path / "notes.jpg"
  text.write_text("not a photo")
  empty = tmp_path / "empty.png"
  empty.write_bytes(b"")
  huge = tmp_path / "huge.png"
  write_huge_png(huge, 20000, 20000)
  truncated = tmp_path / "truncated.jpg"
  truncated.write_bytes(Path(good).read_bytes()[:700])
  cases = {text: "notes.jpg is not an image this server can read",
           empty: "empty.png is an empty file (0 bytes)",
           huge: "huge.png has too many pixels",
           truncated: "truncated.jpg is not an image this server can read",
           None: "Upload a photo"}
  for path, words in cases.items():
    a = app.answer(str(path) if path else None)
    assert not a.ok and a.picture is None and a.message.startswith(words), a.message
    assert str(tmp_path) not in a.message  # the upload's temporary path is not shown
    assert app.answer(good).result["boxes"] == want

  # Over the server's own limit, from the header: the limit is named.
  small = app_lib.PhotoApp(app.predictor, top=1, min_score=0.0, max_megapixels=0.01)
  a = small.answer(good)
  h, w = images.read_image(good).shape[:2]
  assert not a.ok and (f"{w}x{h} (0.0 megapixels): this server takes photos up to 0.01"
                       in a.message), a.message
  # A CMYK JPEG is a photo: answered like its RGB.
  cmyk = tmp_path / "cmyk.jpg"
  Image.open(good).convert("CMYK").save(cmyk, quality=100)
  a = app.answer(str(cmyk))
  assert a.ok and a.picture.shape[0] == h * (app_lib.DRAW_SIZE // max(h, w)) and a.table
  # No garment above min_score: a message, the photo shown undrawn, an empty table.
  strict = app_lib.PhotoApp(app.predictor, top=1, min_score=0.999)
  a = strict.answer(good)
  assert a.ok and a.table == [] and "no garment found (none scores 0.999 or more)" in a.message
  s = app_lib.DRAW_SIZE // max(h, w)
  np.testing.assert_array_equal(a.picture, images.read_image(good).repeat(s, 0).repeat(s, 1))
  assert a.result["matches"] is None and "No shop index" in strict.retrieval_note()
  assert f"--checkpoint_dir {app.predictor.run.checkpoint_dir} " in strict.retrieval_note()


def test_an_index_of_another_model_is_refused(world, tmp_path):
  index = tmp_path / "index"
  shutil.copytree(world["index"], index)
  manifest = json.loads((index / "manifest.json").read_text())
  manifest["scorer"]["bias"] = (np.asarray(manifest["scorer"]["bias"]) + 1.5).tolist()
  (index / "manifest.json").write_text(json.dumps(manifest))
  predictor = inference.Predictor.from_workdir(world["workdir"])
  with pytest.raises(retrieval.IndexFolderError, match="scorers differ"):
    app_lib.PhotoApp(predictor, index=retrieval.GalleryIndex(str(index)))


def test_demo_examples_are_the_synthetic_validation_user_photos(world):
  examples = app_lib.demo_examples(world["config"], count=2)
  assert [os.path.basename(p) for p in examples] == ["000002.jpg", "000004.jpg"]


def test_an_unexpected_failure_is_a_message_and_the_next_photo_is_answered(world, app,
                                                                           monkeypatch):
  good = str(world["images"] / "000004.jpg")

  def broken(*args, **kwargs):
    raise RuntimeError("drawing failed")

  monkeypatch.setattr(app_lib.predict, "draw_prediction", broken)
  a = app.answer(good)
  assert not a.ok and a.message == ("000004.jpg: this server could not answer it (RuntimeError: "
                                    "drawing failed); the server log has the details.")
  monkeypatch.undo()
  assert app.answer(good).ok


def test_the_command_refuses_a_missing_run_in_one_line(tmp_path, caplog):
  with caplog.at_level(logging.ERROR):
    assert app_lib.main(["--workdir", str(tmp_path / "nothing")]) == 1
  errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
  assert len(errors) == 1 and str(tmp_path / "nothing") in errors[0], errors
  with pytest.raises(SystemExit):
    app_lib.main(["--workdir", str(tmp_path), "--top", "0"])
