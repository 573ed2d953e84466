"""--mode predict keeps the user's files safe: the input folder is never written, the output
folder is replaced whole or not at all (a kill or an error leaves the previous one), one
prediction at a time writes it, and a command that cannot run says why in one line."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import jax
import numpy as np
import pytest

from configs import tiny
from data_pipeline import transforms
from data_pipeline.transforms import geometry_from_config
from df2_jax import checkpoint, files, predict
from df2_jax.models.match_rcnn import init_variables, model_from_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A workdir with a checkpoint of the (untrained) tiny model, its variables, and a folder of
  three small photos."""
  root = tmp_path_factory.mktemp("predict_safety")
  config = tiny.get_config()
  variables = jax.device_get(init_variables(
      model_from_config(config), jax.random.key(0),
      transforms.zero_train_batch(geometry_from_config(config.data),
                             config.train.global_batch_pairs)))
  import optax
  from df2_jax import train_step
  with checkpoint.CheckpointManager(root / "run" / "checkpoints") as mgr:
    mgr.save(1, train_step.create_train_state(variables, optax.sgd(0.1)), force=True)
  photos = root / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  for n, (h, w) in enumerate([(60, 80), (80, 60), (64, 64)]):
    cv2.imwrite(str(photos / f"{n + 1:06d}.jpg"), rng.integers(0, 255, (h, w, 3), np.uint8))
  return dict(root=root, workdir=root / "run", photos=photos, config=config,
              variables=variables)


def _hashes(folder: Path) -> dict[str, str]:
  """Every entry of ``folder`` (hidden ones too) with its content's hash."""
  return {n: hashlib.sha256((folder / n).read_bytes()).hexdigest() if (folder / n).is_file()
          else "<folder>" for n in sorted(os.listdir(folder))}


def _command(world, *args: str) -> list[str]:
  return [sys.executable, "run.py", "--config", "configs/tiny.py", "--workdir",
          str(world["workdir"]), "--mode", "predict", *args]


def _env() -> dict[str, str]:
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess_env()


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
  """Runs the commands at once (their start-up, mostly imports, overlaps); their results."""
  procs = [subprocess.Popen(c, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  done = []
  for c, p in zip(commands, procs):
    out, err = p.communicate(timeout=300)
    done.append(subprocess.CompletedProcess(c, p.returncode, out, err))
  return done


def _errors(proc: subprocess.CompletedProcess) -> list[str]:
  """The error lines of a run (absl's "E..." lines), without a traceback."""
  text = proc.stdout + proc.stderr
  assert "Traceback" not in text, text
  return [l for l in text.splitlines() if l.startswith("E")]


def test_predict_refuses_an_output_dir_in_or_around_the_input_dir(world, tmp_path):
  photos = world["photos"]
  before = _hashes(photos)
  # The user's command: the same folder as input and output (and a relative spelling of it).
  rel = os.path.relpath(photos, ROOT)
  same, relative = _run_all([_command(world, "--input_dir", str(photos), "--output_dir",
                                      str(photos)),
                             _command(world, "--input_dir", rel, "--output_dir",
                                      str(photos) + "/./")])
  for proc in (same, relative):
    assert proc.returncode == 1, proc.stderr
    errors = _errors(proc)
    assert len(errors) == 1 and "is the same folder as input_dir" in errors[0], errors
  assert _hashes(photos) == before  # the PNG-named inputs untouched, nothing added
  assert not [n for n in os.listdir(photos.parent) if n.startswith(f".{photos.name}.")]
  # The other spellings, checked before anything is written: a symlink to the input folder,
  # a folder inside it, a relative path through "..", a folder around it.
  link = tmp_path / "link"
  link.symlink_to(photos, target_is_directory=True)
  for output_dir, what in [(link, "is the same folder as"), (photos / "out", "is inside"),
                           (photos / "sub" / ".." / "..", "is inside output_dir"),
                           (photos.parent, "is inside output_dir")]:
    with pytest.raises(predict.PredictError, match=what):
      predict.predict(world["config"], world["variables"], str(photos), str(output_dir))
  with pytest.raises(predict.PredictError, match="is the same folder as"):
    predict.check_folders(str(link), str(photos))
  assert _hashes(photos) == before
  assert not (photos / "out").exists()


def test_predict_refuses_a_file_an_empty_folder_and_a_foreign_output(world, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "predictions.json").write_text(json.dumps({"images": [{"id": 1}]}))
  (out / "000001.png").write_bytes(b"an earlier drawing")
  before = _hashes(out)
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "notes.txt").write_text("not an image")
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("a user's file")
  a_file = world["photos"] / "000001.jpg"
  is_file, is_empty, foreign = _run_all([
      _command(world, "--input_dir", str(a_file), "--output_dir", str(out)),
      _command(world, "--input_dir", str(empty), "--output_dir", str(out)),
      _command(world, "--input_dir", str(world["photos"]), "--output_dir", str(mine))])
  for proc, line in [(is_file, f"input_dir {a_file} is a file, not a folder of images"),
                     (is_empty, f"input_dir {empty} holds no images"),
                     (foreign, f"output_dir {mine} holds files that are not an earlier "
                               f"prediction's")]:
    assert proc.returncode == 1, proc.stderr
    errors = _errors(proc)
    assert len(errors) == 1 and line in errors[0], errors
  assert _hashes(out) == before  # the earlier predictions.json is not replaced
  assert _hashes(mine) == {"thesis.tex": hashlib.sha256(b"a user's file").hexdigest()}
  assert sorted(os.listdir(tmp_path)) == ["empty", "mine", "out"]  # no lock, no staging
  # Files that exist but none decodes: an error too, nothing replaced.
  (empty / "broken.jpg").write_bytes(b"not a jpeg")
  with pytest.raises(predict.PredictError, match="none of the 1 image files"):
    predict.predict(world["config"], world["variables"], str(empty), str(out))
  assert _hashes(out) == before
  assert not [n for n in os.listdir(tmp_path) if ".partial." in n]


def _predict(world, input_dir, output_dir):
  return predict.predict(world["config"], world["variables"], str(input_dir), str(output_dir))


def test_a_failed_predict_leaves_the_previous_output_whole(world, tmp_path, monkeypatch):
  out = tmp_path / "out"
  first = _predict(world, world["photos"], out)
  assert sorted(os.listdir(out)) == ["000001.png", "000002.png", "000003.png",
                                     "predictions.json"]
  assert (out / "predictions.json").stat().st_mode & 0o777 == 0o644
  assert out.stat().st_mode & 0o077 == 0o777 & ~_umask() & 0o077  # not mkdtemp's 0700
  before = _hashes(out)
  assert json.loads((out / "predictions.json").read_text())["images"] == first["images"]
  # Another folder of photos, and a run that dies after drawing its first image.
  photos2 = tmp_path / "photos2"
  photos2.mkdir()
  for n in ("000002.jpg", "000003.jpg"):
    (photos2 / f"x{n}").write_bytes((world["photos"] / n).read_bytes())
  real_add = predict._add_image
  calls = []

  def dying(*args, **kwargs):
    calls.append(args[2])
    if len(calls) == 2:
      raise KeyboardInterrupt("simulated kill")
    return real_add(*args, **kwargs)

  monkeypatch.setattr(predict, "_add_image", dying)
  with pytest.raises(KeyboardInterrupt):
    _predict(world, photos2, out)
  monkeypatch.undo()
  assert _hashes(out) == before  # no new PNG beside the old predictions.json
  assert json.loads((out / "predictions.json").read_text())["images"] == first["images"]
  assert not [n for n in os.listdir(tmp_path) if ".partial." in n]
  # A staging folder that a killed run (SIGKILL: no cleanup) left is deleted by the next run,
  # which replaces the output whole: the old drawings go with the old predictions.
  stale = tmp_path / ".out.partial.killed"
  stale.mkdir()
  (stale / "x000002.png").write_bytes(b"half")
  second = _predict(world, photos2, out)
  assert sorted(os.listdir(out)) == ["predictions.json", "x000002.png", "x000003.png"]
  assert [i["file_name"] for i in second["images"]] == ["x000002.jpg", "x000003.jpg"]
  assert sorted(n for n in os.listdir(tmp_path) if n.startswith(".out.")) == [".out.lock"]
  with files.FolderLock(predict.lock_folder(str(out))):  # released by the runs
    pass


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_a_killed_predict_leaves_the_previous_output(world, tmp_path):
  """SIGKILL of the command once it has drawn its first image: the previous output folder is
  as it was (the next run deletes the staging folder: the test above)."""
  out = tmp_path / "out"
  out.mkdir()
  old = {"images": [{"id": 7, "file_name": "old.jpg", "height": 1, "width": 1}], "bbox": []}
  files.write_json(out / "predictions.json", old)
  (out / "old.png").write_bytes(b"old drawing")
  before = _hashes(out)
  photos = tmp_path / "many"
  photos.mkdir()
  for n in range(24):
    (photos / f"{n:06d}.jpg").write_bytes((world["photos"] / "000001.jpg").read_bytes())
  proc = subprocess.Popen(_command(world, "--input_dir", str(photos), "--output_dir", str(out)),
                          cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  try:
    deadline = time.monotonic() + 240
    drawn = []
    while not drawn and proc.poll() is None and time.monotonic() < deadline:
      drawn = [p for p in tmp_path.glob(".out.partial.*/*.png")]
      time.sleep(0.01)
    assert drawn, f"no drawing appeared (exit status {proc.poll()})"
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.kill()
    proc.communicate()
  assert proc.returncode == -signal.SIGKILL
  assert _hashes(out) == before
  assert json.loads((out / "predictions.json").read_text()) == old


def test_a_second_predict_into_the_same_output_exits_naming_the_first(world, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "predictions.json").write_text("{}")
  before = _hashes(out)
  with files.FolderLock(predict.lock_folder(str(out)), "prediction"):
    [proc] = _run_all([_command(world, "--input_dir", str(world["photos"]), "--output_dir",
                                str(out))])
  assert proc.returncode == 1, proc.stderr
  errors = _errors(proc)
  assert len(errors) == 1, errors
  assert f"output_dir {out} is being written by another prediction (pid {os.getpid()}" in (
      errors[0])
  assert _hashes(out) == before
  assert not [n for n in os.listdir(tmp_path) if ".partial." in n]


def test_shards_of_processes_are_joined_in_order(tmp_path, monkeypatch):
  """Several processes: each one's predictions reach process 0 as numbers only (its results as
  JSON bytes, its counts) through the shared folder, joined in process order; the files are
  removed."""
  shards = [{"images": [{"id": i}], "bbox": [{"image_id": i}], "segm": [], "keypoints": [],
             "embeddings": {str(i): [[0.5]]}} for i in (1, 2)]
  files.save_npz(str(tmp_path / "predictions-00001.npz"), compressed=False,
                 **predict.shard_arrays(shards[1], 1, 1))  # process 1's
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(predict.parallel, "barrier", lambda *args, **kwargs: None)
  joined, predicted, skipped = predict._join_shards(str(tmp_path), shards[0], 1, 0)
  assert [i["id"] for i in joined["images"]] == [1, 2]
  assert joined["embeddings"] == {"1": [[0.5]], "2": [[0.5]]}
  assert (predicted, skipped) == (2, 1)
  assert os.listdir(tmp_path) == []


def test_no_pickle_in_predict_and_retrieval():
  for name in ("df2_jax/predict.py", "df2_jax/retrieval.py"):
    text = (ROOT / name).read_text()
    assert "pickle" not in text.replace("allow_pickle=False", ""), name
