"""The Python API (df2_jax.inference): a trained run loads without its config file, predicts
what ``run.py --mode predict`` writes, matches with the model's own scorer, and says in one
line why a folder cannot be loaded; the evaluation, the retrieval index and the Predictor are
one inference path (equal to the bit); run.py evaluates and predicts with the saved config;
the README's Python example runs as written."""

import glob
import json
import logging
import os
import re
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
from df2_jax import checkpoint, errors, inference, train
from df2_jax.config import run_config
from df2_jax.models.match_rcnn import MatchRCNN

ROOT = Path(__file__).resolve().parents[2]
# Sizes: landscape, portrait, square, larger than the 128 px canvas (resized down), small.
SIZES = [(60, 80), (80, 60), (64, 64), (150, 200), (40, 52)]


def _env():
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess_env()


def _exif_photo(path, pixels, orientation=6):
  """A JPEG stored as ``pixels`` whose EXIF says: show it turned (6: 90 degrees clockwise)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  exif = Image.Exif()
  exif[0x0112] = orientation
  Image.fromarray(pixels).save(path, exif=exif, quality=95)


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
  _exif_photo(photos / f"{len(SIZES) + 1:06d}.jpg", rng.integers(0, 255, (40, 70, 3), np.uint8))
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
  # run.py reads the saved config before jax.distributed.initialize: no backend may start.
  code = ("import sys; sys.modules['tensorflow'] = None\n"
          "from jax._src import xla_bridge\n"
          "from df2_jax import checkpoint, inference\n"
          "from df2_jax.config import run_config\n"
          f"config, _, step = run_config.saved_config({str(world['workdir'])!r}, "
          "steps_of=checkpoint.step_folders)\n"
          "assert step == 2 and config.data.canvas == (128, 128), step\n"
          "assert not xla_bridge.backends_are_initialized(), 'a jax backend started'\n"
          f"run = inference.load_run({str(world['workdir'])!r}, step=1)\n"
          "assert run.step == 1 and 'tensorflow' not in [m.split('.')[0] for m in sys.modules"
          " if sys.modules[m] is not None], 'tensorflow imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  directory = world["workdir"] / "checkpoints"
  assert checkpoint.step_folders(directory) == checkpoint.saved_steps(directory) == [1, 2]


def test_predictor_equals_run_py_predict(world, predictor, tmp_path):
  """run.py --mode predict without --config (the config saved with the checkpoint) writes
  what the Predictor returns, to the bit; both turn an EXIF-rotated photo upright."""
  out = tmp_path / "out"
  command = [sys.executable, "run.py", "--workdir", str(world["workdir"]), "--mode", "predict",
             "--input_dir", str(world["photos"]), "--output_dir", str(out)]
  proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  paths = sorted(str(p) for p in world["photos"].iterdir())
  mine = predictor.predict_files(paths)
  arrays = [inference.read_image(p) for p in paths]
  again = predictor(arrays, mask_format="rle")
  one = predictor(arrays[3], mask_format=None)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert "No --config: the config saved with checkpoint 2 of" in err
  want = json.loads((out / "predictions.json").read_text())
  assert [i["file_name"] for i in want["images"]] == [os.path.basename(p) for p in paths]
  assert (want["images"][-1]["height"], want["images"][-1]["width"]) == (70, 40)  # upright
  assert mine[-1]["image_hw"] == (70, 40)
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
    np.testing.assert_array_equal(r["boxes"][:, :2], xywh[:, :2].astype(np.float32))
    np.testing.assert_allclose(r["boxes"], np.concatenate(
        [xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1), atol=1e-4)  # x + w in float64
    np.testing.assert_array_equal(r["scores"], np.float32([b["score"] for b in bbox]))
    np.testing.assert_array_equal(r["classes"], [b["category_id"] for b in bbox])
    assert r["names"] == [df2.COCO_NAMES[b["category_id"]] for b in bbox]
    for d, (k, s) in enumerate(zip(keypoints, segm)):
      cat = int(r["classes"][d])
      assert r["landmarks"][d].shape == (df2.LANDMARK_COUNTS[cat], 3)
      np.testing.assert_array_equal(
          r["landmarks"][d][:, :2],
          np.float32(k["keypoints"]).reshape(-1, 3)[df2.landmark_slice(cat), :2])
      np.testing.assert_array_equal(r["masks"][d], mask_utils.decode(s["segmentation"]) > 0)
      np.testing.assert_array_equal(mask_utils.decode(r2["masks"][d]),
                                    mask_utils.decode(s["segmentation"]))
    np.testing.assert_array_equal(r["embeddings"], np.float32(
        want["embeddings"][str(image["id"])]).reshape(n, -1))
    # Arrays give what the files give.
    np.testing.assert_array_equal(r2["boxes"], r["boxes"])
  assert "masks" not in one
  np.testing.assert_array_equal(one["boxes"], mine[3]["boxes"])


def test_evaluation_index_and_predictor_are_one_path(world, predictor, tmp_path):
  """The evaluation (run.py --mode eval, no --config: the saved config with an override), the
  retrieval index (no --config either) and the Predictor give the same detections of the
  validation images, to the bit: one inference path (inference.Detector), one scaling back to
  the image."""
  from df2_jax import retrieval  # pylint: disable=g-import-not-at-top
  from df2_jax.evaluation import results  # pylint: disable=g-import-not-at-top
  from df2_jax.evaluation import retrieval_protocol  # pylint: disable=g-import-not-at-top
  workdir = world["workdir"]
  command = [sys.executable, "run.py", "--workdir", str(workdir), "--mode", "eval",
             "--config.eval.num_drawn_images=1"]
  proc = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  images = sorted(glob.glob(os.path.join(world["config"].data.synthetic_dir, "*",
                                         "validation", "image", "*")))
  assert len(images) == 8
  mine = predictor.predict_files(images, mask_format="rle")
  index = tmp_path / "index"
  assert retrieval.main(["index", "--workdir", str(workdir), "--images", str(os.path.dirname(
      images[0])), "--out", str(index), "--min_score", "0"]) == 0  # the saved config
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  evaluated = results.load(str(workdir / "eval_2"))
  kept = {int(i): j for j, i in enumerate(evaluated.keypoint_rows)}
  gallery = retrieval.GalleryIndex(str(index))
  assert sum(len(r["scores"]) for r in mine) == len(evaluated) > 0
  for path, r in zip(images, mine):
    rows = np.nonzero(evaluated.image_id == int(os.path.basename(path).split(".")[0]))[0]
    np.testing.assert_array_equal(evaluated.boxes[rows], r["boxes"])
    np.testing.assert_array_equal(evaluated.scores[rows], r["scores"])
    np.testing.assert_array_equal(evaluated.classes[rows], r["classes"])
    assert [evaluated.rle(i) for i in rows] == [m["counts"] for m in r["masks"]]
    for d, i in enumerate(rows):
      if i in kept:  # the evaluation keeps the landmarks of its keypoint rows only
        own = evaluated.keypoints[kept[i], :len(r["landmarks"][d])]
        np.testing.assert_array_equal(own, r["landmarks"][d][:, :2])
    # The index: the gallery rule over the same detections.
    dets = [dict(image_id=0, bbox=b.tolist(), score=float(sc), row=n)
            for n, (b, sc) in enumerate(zip(r["boxes"], r["scores"]))]
    want = sorted(retrieval_protocol.dedupe_gallery(dets, float(gallery.manifest["nms"]), 0.0),
                  key=lambda d: -d["score"])
    items = [i for i in range(len(gallery)) if gallery.item(i)["image"] == path]
    take = [d["row"] for d in want]
    assert len(items) == len(take) > 0
    np.testing.assert_array_equal(gallery.array("boxes")[items], r["boxes"][take])
    np.testing.assert_array_equal(gallery.array("embeddings")[items], r["embeddings"][take])


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
    with pytest.raises(errors.Df2Error) as e:  # NoCheckpoint; NoSavedConfig
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


def test_detector_groups_images_by_canvas(predictor, monkeypatch):
  """With orientation buckets each image goes onto the smallest canvas that holds it, as the
  evaluation's input pipeline puts it (a portrait and a landscape photo of one call do not
  both go on the square canvas), in batches of config.eval.batch_size per device, and the
  results come back in the caller's order."""
  config = predictor.config.copy_and_resolve_references()
  config.data.bucket_canvases = ((96, 128), (128, 96))
  detector = inference.Detector(config, predictor.run.variables, model=predictor.model,
                                mesh=predictor.detector.mesh)
  assert detector.batch_size == 4 * len(predictor.detector.mesh.devices.flat)
  calls = []

  def fake_batch(arrays, canvas):
    calls.append((canvas, [a.shape[:2] for a in arrays]))
    return [{"shape": a.shape[:2], "canvas": canvas} for a in arrays]

  monkeypatch.setattr(detector, "detect_batch", fake_batch)
  # short side 96, long side <= 128: (60, 80) -> 96 x 128 landscape; (80, 60) -> portrait.
  shapes = [(60, 80), (80, 60), (64, 64), (60, 80), (60, 80), (60, 80), (60, 80), (80, 60)]
  found = detector.detect([np.zeros(s + (3,), np.uint8) for s in shapes])
  assert [f["shape"] for f in found] == shapes
  # A square photo (96 x 96 once resized) fits both buckets: the first.
  canvases = {(60, 80): (96, 128), (80, 60): (128, 96), (64, 64): (96, 128)}
  assert [f["canvas"] for f in found] == [canvases[s] for s in shapes]
  batch = detector.batch_size
  assert sorted(c for c, _ in calls) == sorted(
      [(96, 128)] * -(-6 // batch) + [(128, 96)] * -(-2 // batch))
  assert max(len(a) for _, a in calls) <= batch
  # One batch of both orientations needs the square canvas (what predict used for a batch).
  assert detector.canvas_for([(60, 80), (80, 60)]) == (128, 128)


def test_run_py_without_config_says_why_in_one_line(world, predictor, tmp_path, caplog):
  """--mode eval without --config: a checkpoint saved without its config (an earlier version)
  and a workdir without checkpoints are one line each, before anything runs; training still
  needs --config."""
  old = tmp_path / "old"
  with checkpoint.CheckpointManager(old / "checkpoints") as manager:
    manager.save(3, jax.device_get(predictor.run.variables), force=True)
  empty = tmp_path / "empty"
  empty.mkdir()
  for workdir, mode, code, words in [
      (old, "eval", 2, "has no saved config (a run of an earlier version): pass the config it "
       "was trained with (--config FILE)"),
      (empty, "predict", 1, "holds no checkpoints"),
      (world["workdir"], "train", 2, "Flag --config must have a value")]:
    proc = subprocess.run([sys.executable, "run.py", "--workdir", str(workdir), "--mode", mode,
                           "--input_dir", str(world["photos"])], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  # The same checkpoint for the Python API and the retrieval tool's index: the config asked.
  from df2_jax import retrieval  # pylint: disable=g-import-not-at-top
  with pytest.raises(run_config.NoSavedConfig, match=r"pass the config it was trained with: "
                     r"load_run\(path, config=\.\.\.\)"):
    inference.load_run(old)
  assert retrieval.main(["index", "--workdir", str(old), "--images", str(world["photos"]),
                         "--out", str(tmp_path / "index")]) == 2  # errors.ConfigError's status
  assert "pass the config it was trained with: pass it as --config" in caplog.text
  assert os.listdir(tmp_path / "index") == [".lock"]  # nothing but the lock's file


def test_a_damaged_checkpoint_is_one_line_in_every_command(world, tmp_path, caplog):
  """A checkpoint whose bytes changed since its save (its checksums say so) stops evaluation,
  prediction, the retrieval index and the export alike: status 1, one error line naming the
  file, no traceback (``errors.Df2Error``'s one report). run.py as a command; the retrieval
  tool's and the export's ``main`` in this process (their commands only add the log format)."""
  from df2_jax import export, retrieval  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  shutil.copytree(world["workdir"], workdir)
  step_dir = workdir / "checkpoints" / "2"
  sums = json.loads((step_dir / checkpoint.CHECKSUMS).read_text())["files"]
  victim = step_dir / max(sums, key=lambda name: sums[name]["bytes"])  # the largest array file
  data = bytearray(victim.read_bytes())
  data[len(data) // 2] ^= 0xFF
  victim.write_bytes(bytes(data))
  for mode, extra in (("eval", []), ("predict", ["--input_dir", str(world["photos"]),
                                                 "--output_dir", str(tmp_path / "out")])):
    proc = subprocess.run([sys.executable, "run.py", "--workdir", str(workdir), "--mode", mode,
                           *extra], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    lines = [line for line in proc.stderr.splitlines() if re.match(r"(E\d{4} |FATAL)", line)]
    assert proc.returncode == 1, (mode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, (mode, proc.stderr[-3000:])
    assert len(lines) == 1 and "has changed since it was saved" in lines[0], (mode, lines)
    assert str(victim) in lines[0], (mode, lines)
  for name, main, argv in (
      ("index", retrieval.main, ["index", "--workdir", str(workdir), "--images",
                                 str(world["photos"]), "--out", str(tmp_path / "index")]),
      ("export", export.main, ["--workdir", str(workdir), "--out", str(tmp_path / "export")])):
    caplog.clear()
    assert main(argv) == 1, name
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) == 1 and "has changed since it was saved" in lines[0], (name, lines)
    assert str(victim) in lines[0], (name, lines)


def readme_example() -> str:
  """The README's Python example: the python block after its <!-- python-example --> marker."""
  text = (ROOT / "README.md").read_text()
  after = text.split("<!-- python-example -->", 1)[1]
  match = re.match(r"\s*```python\n(.*?)\n```", after, re.S)
  assert match, "README.md: no python block after <!-- python-example -->"
  return match.group(1)


def test_readme_python_example_runs_as_written(world, predictor, tmp_path, monkeypatch, capsys):
  """The README's 10-line example, run as written in a folder holding runs/demo (the tiny run)
  and photos/user.jpg, photos/shop.jpg; what it prints is the Predictor's."""
  code = readme_example()
  assert len([l for l in code.splitlines() if l.strip()]) <= 10
  (tmp_path / "runs").mkdir()
  os.symlink(world["workdir"], tmp_path / "runs" / "demo")
  (tmp_path / "photos").mkdir()
  rng = np.random.default_rng(3)
  for name, (h, w) in (("user", (90, 70)), ("shop", (64, 96))):
    cv2.imwrite(str(tmp_path / "photos" / f"{name}.jpg"), rng.integers(0, 255, (h, w, 3),
                                                                       np.uint8))
  monkeypatch.chdir(tmp_path)
  namespace: dict = {}
  exec(compile(code, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  printed = capsys.readouterr().out.splitlines()
  user, shop, scores = namespace["user"], namespace["shop"], namespace["scores"]
  assert len(user["scores"]) > 0 and len(shop["scores"]) > 0
  assert scores.shape == (len(user["scores"]), len(shop["scores"]))
  assert user["masks"].shape == (len(user["scores"]), 90, 70)
  assert shop["masks"][0]["size"] == [64, 96]  # RLE
  want = predictor.predict_files([tmp_path / "photos" / "user.jpg"])[0]
  np.testing.assert_array_equal(user["boxes"], want["boxes"])
  assert printed[0].startswith(f"{want['names'][0]} {want['scores'][0]:.2f} at x1,y1,x2,y2 = ")
  assert len(printed) == len(want["scores"]) + 2
  assert printed[-1].startswith("best shop garment per user garment: [")


def test_heads_run_on_the_first_k_detections_with_the_same_outputs(predictor):
  """detect in two stages: the heads on the first K rows give those rows' masks, landmarks
  and embeddings of the one-program detect, to the bit; the rows past K are zero."""
  detector = predictor.detector
  rng = np.random.default_rng(3)
  batch = detector.encode([rng.integers(0, 255, (100, 128, 3), np.uint8)], (128, 128))
  whole = detector.fetch(detector._detect(detector.variables, batch["image"],
                                          batch["image_hw"]))
  boxes, heads = inference.jitted_stages(detector.model, detector.mesh)
  first = boxes(detector.variables, batch["image"], batch["image_hw"])
  features = first.pop("features")
  d = detector.detections_per_image
  assert int(whole["valid"][0].sum()) > 8  # rows past 8 hold detections to leave out
  for key in ("boxes", "scores", "classes", "valid"):
    np.testing.assert_array_equal(detector.fetch(first[key]), whole[key])
  for k in sorted({8, d}):
    out = detector.fetch(heads(k)(detector.variables, features, first["boxes"],
                                  first["classes"]))
    for key in ("masks", "landmarks", "embeddings"):
      assert out[key].shape == whole[key].shape
      np.testing.assert_array_equal(out[key][:, :k], whole[key][:, :k])
      assert not out[key][:, k:].any()
  assert inference.head_slots_for(0, 100) == 8 and inference.head_slots_for(9, 100) == 32
  assert inference.head_slots_for(33, 100) == 100 and inference.head_slots_for(5, 6) == 6


def test_detector_compiles_one_program_per_canvas_and_head_size(predictor, monkeypatch):
  """A long prediction keeps a fixed set of programs: one first stage per canvas and one
  heads program per canvas and K, whatever the images hold; a second pass compiles
  nothing."""
  config = predictor.config.copy_and_resolve_references()
  config.data.bucket_canvases = ((96, 128), (128, 96))
  detector = inference.Detector(config, predictor.run.variables, model=predictor.model,
                                mesh=predictor.detector.mesh)
  sizes = []
  real = inference.head_slots_for
  # Valid counts vary with the images; here every K is asked for in turn.
  monkeypatch.setattr(inference, "head_slots_for",
                      lambda n, d: sizes.append(real(n, d)) or [8, d][len(sizes) % 2])
  rng = np.random.default_rng(5)
  photos = [rng.integers(0, 255, s + (3,), np.uint8) for s in SIZES * 2]
  boxes, heads = inference.jitted_stages(detector.model, detector.mesh)
  d = detector.detections_per_image

  def programs():
    return boxes._cache_size() + sum(heads(k)._cache_size() for k in {8, d})

  before = programs()
  first = detector.detect(photos)
  compiled = programs() - before
  canvases = {detector.canvas_for([p.shape]) for p in photos}
  assert len(canvases) == 2 and len(sizes) >= 3
  assert compiled <= len(canvases) * (1 + 2)
  sizes.clear()  # the same K for the same batches
  second = detector.detect(photos)
  assert programs() - before == compiled
  for a, b in zip(first, second):
    np.testing.assert_array_equal(a["boxes"], b["boxes"])
