"""The Python API (df2_jax.inference): a trained run loads without its config file, predicts
what ``run.py --mode predict`` writes, matches with the model's own scorer, and says in one
line why a folder cannot be loaded."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from configs import tiny
from data_pipeline import deepfashion2 as df2
from df2_jax import checkpoint, inference, train
from df2_jax.models.match_rcnn import MatchRCNN

ROOT = Path(__file__).resolve().parents[1]
# Sizes: landscape, portrait, square, larger than the 128 px canvas (resized down), small.
SIZES = [(60, 80), (80, 60), (64, 64), (150, 200), (40, 52)]


def _env():
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess_env()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """The tiny config trained 2 steps (checkpoints 1 and 2, no evaluation) and five photos."""
  root = tmp_path_factory.mktemp("inference")
  config = tiny.get_config()
  config.data.synthetic_dir = str(root / "data")
  config.train.update(dict(num_steps=2, log_every_steps=1, checkpoint_every_steps=1,
                           keep_checkpoints=2, eval_every_steps=0))
  workdir = root / "run"
  train.train(config, str(workdir), origin={"config_file": "configs/tiny.py", "overrides": []})
  photos = root / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for n, (h, w) in enumerate(SIZES):
    cv2.imwrite(str(photos / f"{n + 1:06d}.png"), rng.integers(0, 255, (h, w, 3), np.uint8))
  return dict(root=root, workdir=workdir, photos=photos, config=config)


@pytest.fixture(scope="module")
def predictor(world):
  return inference.Predictor.from_workdir(world["workdir"])


def test_load_run_needs_no_config_file(world, predictor):
  run = predictor.run
  assert run.step == 2 and run.checkpoint_dir == str(world["workdir"] / "checkpoints")
  assert run.config.data.canvas == (128, 128) and run.config.model.stage_sizes == (1, 1, 1, 1)
  assert run.config.model.to_dict() == world["config"].model.to_dict()
  assert isinstance(run.model, MatchRCNN)
  # The import and the load need no TensorFlow (blocked in a fresh interpreter).
  code = ("import sys; sys.modules['tensorflow'] = None\n"
          "from df2_jax import inference\n"
          f"run = inference.load_run({str(world['workdir'])!r}, step=1)\n"
          "assert run.step == 1 and 'tensorflow' not in [m.split('.')[0] for m in sys.modules"
          " if sys.modules[m] is not None], 'tensorflow imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]


def test_predictor_equals_run_py_predict(world, predictor, tmp_path):
  out = tmp_path / "out"
  command = [sys.executable, "run.py", "--config", "configs/tiny.py", "--workdir",
             str(world["workdir"]), "--mode", "predict", "--input_dir", str(world["photos"]),
             "--output_dir", str(out)]
  proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  paths = sorted(str(p) for p in world["photos"].iterdir())
  mine = predictor.predict_files(paths)
  arrays = [cv2.imread(p)[:, :, ::-1] for p in paths]
  again = predictor(arrays, mask_format="rle")
  one = predictor(arrays[3], mask_format=None)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  want = json.loads((out / "predictions.json").read_text())
  assert [i["file_name"] for i in want["images"]] == [os.path.basename(p) for p in paths]
  assert len(mine) == len(paths) and sum(len(r["scores"]) for r in mine) > 0
  for image, r, r2 in zip(want["images"], mine, again):
    assert r["image_hw"] == (image["height"], image["width"]) and r["path"].endswith(
        image["file_name"])
    bbox = [b for b in want["bbox"] if b["image_id"] == image["id"]]
    keypoints = [k for k in want["keypoints"] if k["image_id"] == image["id"]]
    segm = [s for s in want["segm"] if s["image_id"] == image["id"]]
    n = len(bbox)
    assert len(r["scores"]) == n and r["boxes"].shape == (n, 4) and r["masks"].shape == (
        n,) + r["image_hw"]
    xywh = np.array([b["bbox"] for b in bbox]).reshape(n, 4)
    np.testing.assert_allclose(r["boxes"], np.concatenate(
        [xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), atol=1e-4)
    np.testing.assert_allclose(r["scores"], [b["score"] for b in bbox], atol=1e-4)
    np.testing.assert_array_equal(r["classes"], [b["category_id"] for b in bbox])
    assert r["names"] == [df2.COCO_NAMES[b["category_id"]] for b in bbox]
    for d, (k, s) in enumerate(zip(keypoints, segm)):
      cat = int(r["classes"][d])
      assert r["landmarks"][d].shape == (df2.LANDMARK_COUNTS[cat], 3)
      np.testing.assert_allclose(
          r["landmarks"][d][:, :2],
          np.array(k["keypoints"]).reshape(-1, 3)[df2.landmark_slice(cat), :2], atol=1e-4)
      np.testing.assert_array_equal(r["masks"][d], mask_utils.decode(s["segmentation"]) > 0)
      np.testing.assert_array_equal(mask_utils.decode(r2["masks"][d]),
                                    mask_utils.decode(s["segmentation"]))
    np.testing.assert_allclose(r["embeddings"], np.array(
        want["embeddings"][str(image["id"])]).reshape(n, -1), atol=1e-4)
    # Arrays give what the files give.
    np.testing.assert_array_equal(r2["boxes"], r["boxes"])
  assert "masks" not in one
  np.testing.assert_array_equal(one["boxes"], mine[3]["boxes"])


def test_from_checkpoint_a_copied_folder_and_a_step_folder(world, predictor, tmp_path):
  copy = tmp_path / "elsewhere" / "ckpts"
  shutil.copytree(world["workdir"] / "checkpoints", copy)  # no config.json beside it
  run = inference.load_run(copy)
  assert run.step == 2 and run.checkpoint_dir == str(copy)
  assert run.config.to_dict() == predictor.run.config.to_dict()
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(run.variables),
                         jax.device_get(predictor.run.variables))
  first = inference.Predictor.from_checkpoint(copy / "1")
  assert first.run.step == 1
  image = np.full((70, 90, 3), 120, np.uint8)
  assert first(image)["boxes"].shape[1] == 4


def test_one_line_errors(world, predictor, tmp_path):
  def error(*args, **kwargs) -> str:
    with pytest.raises(inference.LoadRunError) as e:
      inference.load_run(*args, **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)

  empty = tmp_path / "empty"
  empty.mkdir()
  assert "holds no checkpoints" in error(empty)
  assert "no such folder" in error(tmp_path / "missing")
  assert "no checkpoint of step 7" in error(world["workdir"], step=7) and "1, 2" in error(
      world["workdir"], step=7)
  # A checkpoint saved without its config (an earlier version): say so; config= loads it.
  old = tmp_path / "old"
  with checkpoint.CheckpointManager(old) as manager:
    manager.save(5, jax.device_get(predictor.run.variables), force=True)
  assert "load_run(path, config=...)" in error(old)
  run = inference.load_run(old, config=predictor.run.config)
  assert run.step == 5
  with pytest.raises(ValueError, match="HxWx3"):
    predictor(np.zeros((10, 10), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    predictor(np.zeros((10, 10, 3), np.float32))


def test_match_is_the_sigmoid_of_match_logits(predictor):
  rng = np.random.default_rng(1)
  query, gallery = predictor(
      [rng.integers(0, 255, (64, 80, 3), np.uint8), rng.integers(0, 255, (90, 70, 3), np.uint8)],
      mask_format=None)
  scores = predictor.match(query, gallery)
  q, g = len(query["scores"]), len(gallery["scores"])
  assert scores.shape == (q, g) and q > 0 and g > 0
  run = predictor.run
  logits = run.model.apply(run.variables, query["embeddings"], gallery["embeddings"],
                           method=MatchRCNN.match_logits)
  np.testing.assert_allclose(scores, jax.nn.sigmoid(np.asarray(logits)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(predictor.match(query["embeddings"][:3], [gallery, query]),
                             np.concatenate([scores[:3], predictor.match(
                                 query, query)[:3]], axis=1), rtol=1e-5, atol=1e-6)
  assert predictor.match(query, np.zeros((0, query["embeddings"].shape[1]))).shape == (q, 0)


def test_read_image_applies_the_exif_orientation(tmp_path):
  from PIL import Image, ImageOps
  pixels = np.random.default_rng(2).integers(0, 255, (20, 30, 3), np.uint8)
  for orientation in (1, 3, 6, 8):
    path = tmp_path / f"o{orientation}.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(path, exif=exif)
    with Image.open(path) as im:
      want = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
    np.testing.assert_array_equal(inference.read_image(path), want)
    np.testing.assert_array_equal(inference.read_image(path, exif_transpose=False), pixels)
