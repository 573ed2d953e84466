"""The exported detector (df2_jax.export): same outputs as the jitted detect, manifest, errors."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from configs import tiny
from conftest import fixtures_dir, subprocess_env
from data_pipeline import images as images_lib
from data_pipeline import synthetic_batches, transforms
from data_pipeline.records import ImageRecord
from data_pipeline.transforms import geometry_from_config
from df2_jax import checkpoint, export
from df2_jax.config import run_config
from df2_jax import train_step
from df2_jax.models.match_rcnn import MatchRCNN, init_variables, model_from_config

BATCH = 2
BUCKETS = ((96, 128), (128, 96))  # the tiny config's landscape and portrait canvases


def _config(buckets=BUCKETS):
  config = tiny.get_config()
  config.data.bucket_canvases = buckets
  return config


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """The tiny model (untrained) exported for its 3 canvases, batch 2, cpu and cuda."""
  config = _config()
  model = model_from_config(config)
  batch = synthetic_batches.synthetic_pair_batch(1, geometry_from_config(config.data),
                                                 image_size=128)
  variables = jax.device_get(init_variables(model, jax.random.key(0), batch))
  out = tmp_path_factory.mktemp("export") / "detector"
  manifest = export.export_model(model, variables, config, str(out), batch_size=BATCH,
                                 source={"step": 3})
  return dict(config=config, model=model, variables=variables, out=out, manifest=manifest)


def _fixture_images(names):
  folder = fixtures_dir() / "image"
  if not folder.is_dir():
    pytest.fail(f"Real DeepFashion2 fixtures not found at {folder}; set DF2_FIXTURES.")
  return [images_lib.load_image(folder / n) for n in names]


def _encode(config, pixels_list):
  """Images resized and padded onto their batch's canvas as evaluation and prediction do."""
  geometry = geometry_from_config(config.data)
  canvas = transforms.batch_canvas(geometry, [p.shape[:2] for p in pixels_list])
  encoded = [transforms.encode_image(ImageRecord(i + 1, f"<{i}>", p.shape[1], p.shape[0], "",
                                                 -1, ()), p, geometry, False, canvas)
             for i, p in enumerate(pixels_list)]
  return (canvas, np.stack([e["image"] for e in encoded]),
          np.stack([e["image_hw"] for e in encoded]))


def _reference(model, variables, images, image_hw):
  """The jitted detect on batches of BATCH, the last padded with empty images."""
  detect = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))
  parts = []
  for start in range(0, len(images), BATCH):
    x, hw = images[start:start + BATCH], image_hw[start:start + BATCH]
    k = len(x)
    x = np.concatenate([x, np.zeros((BATCH - k,) + x.shape[1:], np.uint8)])
    hw = np.concatenate([hw, np.zeros((BATCH - k, 2), np.int32)])
    parts.append({n: np.asarray(v)[:k] for n, v in jax.device_get(detect(variables, x,
                                                                          hw)).items()})
  return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}


def _assert_same(got, want):
  assert set(got) == set(want) == set(export.OUTPUT_MEANINGS)
  for name in want:
    assert got[name].shape == want[name].shape and got[name].dtype == want[name].dtype, name
    if name in ("classes", "valid"):
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    else:
      np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_exported_detect_equals_jitted_detect_on_real_images(exported):
  """A batch that mixes orientations goes on the full canvas (as evaluation resizes and pads
  it): 3 images, two calls of 2, the last padded with an empty image. (One canvas only: each
  costs two compilations; the other canvases' choice is tested without running them.)"""
  config, model, variables = exported["config"], exported["model"], exported["variables"]
  detector = export.load(exported["out"])
  assert detector.batch_size == BATCH
  assert detector.canvases == ((96, 128), (128, 96), (128, 128))
  pixels = _fixture_images(["057421.jpg", "045585.jpg", "171642.jpg"])  # landscape, portrait
  canvas, images, image_hw = _encode(config, pixels)
  assert canvas == (128, 128)
  assert detector.canvas_for([detector.resize_plan(*p.shape[:2])[1] for p in pixels]) == canvas
  got = detector(images, image_hw)
  _assert_same(got, _reference(model, variables, images, image_hw))
  assert got["valid"].any(axis=1).all()  # score_threshold 0: every image keeps detections
  # No images: empty outputs of the right shapes.
  empty = detector(np.zeros((0, 96, 128, 3), np.uint8), np.zeros((0, 2), np.int32))
  assert empty["boxes"].shape == (0, 10, 4) and empty["valid"].dtype == bool


def test_resize_plan_and_canvas_match_the_pipeline(exported):
  """The manifest's preprocessing, as load() computes it, is transforms' resize and bucket
  choice for every fixture image."""
  detector = export.load(exported["out"])
  geometry = geometry_from_config(exported["config"].data)
  names = sorted(os.listdir(fixtures_dir() / "image"))
  for name in names:
    with Image.open(fixtures_dir() / "image" / name) as im:
      w, h = im.size
    scale = transforms.resize_scale(h, w, geometry)
    want_hw = transforms.resized_hw(h, w, scale, geometry.canvas_hw)
    got_scale, got_hw = detector.resize_plan(h, w)
    assert got_scale == pytest.approx(scale) and got_hw == want_hw, name
    assert detector.canvas_for([got_hw]) == transforms.batch_canvas(geometry, [(h, w)]), name


def test_manifest(exported):
  out, manifest = exported["out"], exported["manifest"]
  assert json.loads((out / export.MANIFEST).read_text()) == manifest
  assert manifest["format"] == export.FORMAT and manifest["format_version"] == 1
  assert manifest["jax_version"] == jax.__version__
  assert manifest["platforms"] == ["cpu", "cuda"]  # cuda lowered on this CPU-only machine
  assert manifest["batch_size"] == BATCH and manifest["source"] == {"step": 3}
  assert manifest["head_slots"] == exported["config"].model.detections_per_image
  assert manifest["canvases"] == [[96, 128], [128, 96], [128, 128]]
  want_out = jax.eval_shape(
      lambda v, x, hw: exported["model"].apply(v, x, hw, method=MatchRCNN.detect),
      exported["variables"], jax.ShapeDtypeStruct((BATCH, 128, 128, 3), np.uint8),
      jax.ShapeDtypeStruct((BATCH, 2), np.int32))
  assert [a["file"] for a in manifest["artifacts"]] == [
      "detect_96x128.jaxexport", "detect_128x96.jaxexport", "detect_128x128.jaxexport"]
  for artifact, (h, w) in zip(manifest["artifacts"], manifest["canvases"]):
    assert artifact["canvas_hw"] == [h, w]
    data = (out / artifact["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    assert artifact["inputs"] == [
        {"name": "images", "shape": [BATCH, h, w, 3], "dtype": "uint8"},
        {"name": "image_hw", "shape": [BATCH, 2], "dtype": "int32"}]
    assert artifact["outputs"] == [
        {"name": k, "shape": list(want_out[k].shape), "dtype": np.dtype(want_out[k].dtype).name}
        for k in ("boxes", "scores", "classes", "valid", "masks", "landmarks", "embeddings")]
  assert {a["dtype"] for a in manifest["artifacts"][0]["outputs"]} == {"float32", "int32",
                                                                      "bool"}
  pre = manifest["preprocessing"]
  assert (pre["short_side"], pre["max_size"], pre["max_canvas_hw"]) == (96, 128, [128, 128])
  assert manifest["categories"]["1"] == {"id": 1, "name": "short sleeve top",
                                         "coco_name": "short_sleeved_shirt"}
  assert manifest["dataset"] == "deepfashion2" and manifest["spec"]["categories"][12][
      "sigmas"][-1] == 0.0173
  assert len(manifest["categories"]) == 13
  assert manifest["landmark_slices"]["13"] == [275, 294]
  # The weights: every "params" and "constants" tensor, in the programs' order.
  leaves = jax.tree_util.tree_leaves({k: exported["variables"][k]
                                      for k in ("params", "constants")})
  tensors = manifest["weights"]["tensors"]
  assert len(tensors) == len(leaves) and tensors[0]["key"] == "t00000"
  assert any(t["name"].startswith("constants/") for t in tensors)
  with np.load(out / export.WEIGHTS) as npz:
    for t, leaf in zip(tensors, leaves):
      np.testing.assert_array_equal(npz[t["key"]], leaf)
      assert t["shape"] == list(np.shape(leaf))
  # Nothing else in the folder, no staging folder left beside it.
  assert sorted(os.listdir(out)) == sorted([export.MANIFEST, export.WEIGHTS] + [
      a["file"] for a in manifest["artifacts"]])
  assert not [n for n in os.listdir(out.parent) if ".partial." in n or ".old." in n]


_BLOCKER = """
import sys
class Block:
  def find_spec(self, name, path=None, target=None):
    # Not tensorflow: jax's persistent compilation cache reads through etils, which imports
    # it where installed.
    if name.split(".")[0] in ("flax", "optax", "cv2", "ml_collections", "orbax", "PIL",
                              "data_pipeline", "configs") or name.startswith(
                                  "df2_jax.models") or name == "df2_jax.files":
      raise ImportError(f"{name} is blocked: load() must need only jax and numpy")
sys.meta_path.insert(0, Block())
import numpy as np
from df2_jax import export
d = export.load(sys.argv[1])
x = np.load(sys.argv[2])
out = d(x["images"], x["image_hw"])
np.savez(sys.argv[3], **out)
"""


def test_load_needs_only_jax_and_numpy(exported, tmp_path):
  """A process that cannot import flax, optax, orbax, ml_collections, the model code, the
  input pipeline, OpenCV or Pillow loads the export and gets the same detections."""
  config = exported["config"]
  # On the full canvas: the program the test above compiled (the persistent compilation cache
  # spares the subprocess compiling it again).
  _, images, image_hw = _encode(config, _fixture_images(["107133.jpg", "060097.jpg"]))
  np.savez(tmp_path / "in.npz", images=images, image_hw=image_hw)
  script = tmp_path / "run_export.py"
  script.write_text(_BLOCKER)
  env = subprocess_env()
  env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                       env.get("PYTHONPATH", "")])
  done = subprocess.run([sys.executable, str(script), str(exported["out"]),
                         str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
                        env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  with np.load(tmp_path / "out.npz") as got:
    got = dict(got)
  _assert_same(got, export.load(exported["out"])(images, image_hw))


def test_load_refusals(exported, tmp_path):
  out = exported["out"]
  with pytest.raises(export.ExportError, match="no such folder"):
    export.load(tmp_path / "missing")
  (tmp_path / "empty").mkdir()
  with pytest.raises(export.ExportError, match=r"is not an export: it has no manifest\.json"):
    export.load(tmp_path / "empty")
  other = tmp_path / "other"
  other.mkdir()
  (other / "manifest.json").write_text(json.dumps({"format": "df2_jax.retrieval_index"}))
  with pytest.raises(export.ExportError, match="is not an export: manifest.json is not of "
                                               "format 'df2_jax.export'"):
    export.load(other)
  newer = tmp_path / "newer"
  shutil.copytree(out, newer)
  manifest = json.loads((newer / "manifest.json").read_text())
  (newer / "manifest.json").write_text(json.dumps(dict(manifest, format_version=99)))
  with pytest.raises(export.ExportError, match="format version 99, this loader reads 1"):
    export.load(newer)
  (newer / "manifest.json").write_text(json.dumps(manifest))
  artifact = newer / "detect_128x96.jaxexport"
  data = bytearray(artifact.read_bytes())
  data[len(data) // 2] ^= 0xFF
  artifact.write_bytes(bytes(data))
  with pytest.raises(export.ExportError, match=r"detect_128x96\.jaxexport does not match the "
                                               r"manifest's sha256"):
    export.load(newer)
  artifact.unlink()
  with pytest.raises(export.ExportError, match=r"detect_128x96\.jaxexport is missing"):
    export.load(newer)
  (newer / "manifest.json").write_text(json.dumps(dict(manifest, platforms=["tpu"])))
  with pytest.raises(export.ExportError, match=r"exported for \['tpu'\], not for this "
                                               r"machine's cpu"):
    export.load(newer)

  detector = export.load(out)
  with pytest.raises(ValueError, match="canvas 64x64 was not exported; this export has "
                                       "96x128, 128x96, 128x128"):
    detector(np.zeros((1, 64, 64, 3), np.uint8), np.array([[64, 64]]))
  with pytest.raises(ValueError, match=r"images must be uint8 \[N, H, W, 3\], got float32"):
    detector(np.zeros((1, 96, 128, 3), np.float32), np.array([[96, 128]]))
  with pytest.raises(ValueError, match=r"image_hw must be integers \[1, 2\]"):
    detector(np.zeros((1, 96, 128, 3), np.uint8), np.array([96, 128]))
  with pytest.raises(ValueError, match="outside the 96x128 canvas"):
    detector(np.zeros((1, 96, 128, 3), np.uint8), np.array([[128, 96]]))


def test_export_refusals_leave_the_folder(exported, tmp_path):
  config, model, variables = exported["config"], exported["model"], exported["variables"]
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "notes.txt").write_text("keep me")
  with pytest.raises(export.ExportError, match="holds files that are not an earlier export"):
    export.export_model(model, variables, config, str(mine))
  assert os.listdir(mine) == ["notes.txt"]
  with pytest.raises(export.ExportError, match="platforms"):
    export.export_model(model, variables, config, str(tmp_path / "x"), platforms=["gpu"])
  with pytest.raises(export.ExportError, match="batch size must be >= 1"):
    export.export_model(model, variables, config, str(tmp_path / "x"), batch_size=0)
  broken = jax.tree_util.tree_map(np.array, variables)
  broken["params"]["box_head"][next(iter(broken["params"]["box_head"]))]["kernel"][0] = np.nan
  with pytest.raises(export.ExportError, match="NaN or inf in 1 tensors .*box_head"):
    export.export_model(model, broken, config, str(tmp_path / "x"))
  assert not os.path.exists(tmp_path / "x")


def test_command_line_exports_a_saved_run(exported, tmp_path, caplog):
  """python -m df2_jax.export on a checkpoint saved with its config (inference.load_run):
  the tiny config's one canvas, --batch, --platforms; an export folder is replaced, another
  folder refused; a folder without checkpoints in one line."""
  config = _config(())
  variables = exported["variables"]
  workdir = tmp_path / "run"
  with checkpoint.CheckpointManager(workdir / "checkpoints") as mgr:
    mgr.save(7, train_step.create_train_state(variables, optax.sgd(0.1)), force=True)
  run_config.write(str(workdir), config)
  out = tmp_path / "exp"
  for _ in range(2):  # the second replaces the first
    assert export.main(["--workdir", str(workdir), "--out", str(out), "--batch", "1",
                        "--platforms", "cpu"]) == 0
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["batch_size"] == 1 and manifest["platforms"] == ["cpu"]
  assert manifest["canvases"] == [[128, 128]]
  assert manifest["source"]["step"] == 7
  assert manifest["source"]["checkpoint_dir"] == str(workdir / "checkpoints")
  assert manifest["artifacts"][0]["inputs"][0]["shape"] == [1, 128, 128, 3]
  # The checkpoint's weights are the variables it was saved from.
  with np.load(out / export.WEIGHTS) as got, np.load(exported["out"] / export.WEIGHTS) as want:
    assert sorted(got.files) == sorted(want.files)
    for key in want.files:
      np.testing.assert_array_equal(got[key], want[key])
  assert export.main(["--workdir", str(tmp_path / "nothing"), "--out", str(tmp_path / "e")]) == 1
  assert "no such folder" in caplog.text
  assert not os.path.exists(tmp_path / "e")
