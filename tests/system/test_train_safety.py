"""A user's training work is never lost or silently overwritten (issue 25), tiny config.

* Another config's workdir: refused in one line naming the run's config, nothing moved
  (training, --mode eval; a changed optimizer too); WORKDIR/config.json and every checkpoint
  record the config.
* One training per workdir: the second exits 1 naming the holder's pid.
* A signal during an evaluation stops at once (the step is saved); the next run redoes every
  evaluation without a complete metrics.json, the final one included.
* A torn last line of metrics.jsonl is dropped on resume.
* Checkpoint files carry checksums: changed bytes make the step damaged, not loaded.
* A full disk: one line naming the folder and the bytes, earlier checkpoints intact.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from configs import tiny
from df2_jax import checkpoint, files, train
from df2_jax.config import run_config
from df2_jax.evaluation import evaluator

ROOT = Path(__file__).resolve().parents[2]
ORIGIN = {"config_file": "configs/tiny.py", "overrides": ["--config.train.num_steps=4"]}


def _config(data_dir, **train_overrides):
  config = tiny.get_config()
  config.data.synthetic_dir = str(data_dir)
  config.train.update(dict(num_steps=4, log_every_steps=1, checkpoint_every_steps=2,
                           keep_checkpoints=5, eval_every_steps=2))
  config.train.update(train_overrides)
  return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipeline import sources
  path = tmp_path_factory.mktemp("safety_data")
  sources.ensure_synthetic(_config(path).data)
  return path


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
  """A workdir trained 4 steps, evaluated at 2 and 4 (checkpoints 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("safety_run") / "run")
  train.train_and_evaluate(_config(data_dir), workdir, origin=ORIGIN)
  return workdir


def _copy(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


def _tree(folder) -> dict[str, bytes]:
  """Every file's bytes but the lock file's (the pid of its last holder)."""
  out = {}
  for root, _, names in os.walk(folder):
    for name in names:
      if name == files.LOCK_NAME:
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = f.read()
  return out


def _run(args, timeout=600):
  return subprocess.run([sys.executable, "run.py", "--config", "configs/tiny.py"] + args,
                        cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)


def test_the_run_config_is_recorded_in_the_workdir_and_every_checkpoint(trained):
  stored = run_config.read(trained)
  assert stored["config_file"] == "configs/tiny.py"
  assert stored["overrides"] == ["--config.train.num_steps=4"]
  assert stored["config"]["model"]["width"] == tiny.get_config().model.width
  assert stored["config"]["train"]["num_steps"] == 4
  for folder in ("checkpoints", "best"):
    with checkpoint.CheckpointManager(os.path.join(trained, folder)) as manager:
      extra = manager.read_extra()
    assert extra["config"] == stored["config"], folder
    assert extra["config_file"] == "configs/tiny.py"


def test_another_config_is_refused_in_one_line_and_nothing_is_moved(trained, data_dir,
                                                                    tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _tree(workdir)
  width = tiny.get_config().model.width
  common = ["--workdir", workdir, f"--config.data.synthetic_dir={data_dir}",
            f"--config.model.width={2 * width}"]
  for mode in ("train", "eval"):
    proc = _run(common + [f"--mode={mode}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if "holds checkpoints of another config" in l]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "configs/tiny.py --config.train.num_steps=4" in lines[0]
    assert f"model.width {width} (run) vs {2 * width}" in lines[0]
    assert "Nothing was changed" in lines[0]
    assert _tree(workdir) == before, mode  # no <step>.damaged, no config.json rewritten
  # Another optimizer: the params fit, the optimizer state does not (found at the restore).
  config = _config(data_dir, num_steps=6, optimizer="adamw")
  with pytest.raises(run_config.RunMismatch, match="holds checkpoints of another config.*"
                     "train.optimizer 'sgd' \\(run\\) vs 'adamw'"):
    train.train(config, workdir)
  assert _tree(workdir) == before


def test_a_second_training_on_the_same_workdir_exits_naming_the_holder(trained, data_dir,
                                                                      tmp_path):
  workdir = _copy(trained, tmp_path)
  before = _tree(workdir)
  with files.FolderLock(workdir, "training"):
    proc = _run(["--workdir", workdir, f"--config.data.synthetic_dir={data_dir}",
                 "--config.train.num_steps=6"])
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  line = [l for l in proc.stderr.splitlines() if "is in use by another training" in l]
  assert len(line) == 1 and f"(pid {os.getpid()};" in line[0], proc.stderr[-3000:]
  assert _tree(workdir) == before
  # In process too, and the lock is free again once the holder is gone.
  holder = files.FolderLock(workdir, "training").acquire()
  with pytest.raises(files.Locked, match=f"pid {os.getpid()}"):
    train.train(_config(data_dir), workdir)
  holder.release()
  assert int(train.train(_config(data_dir), workdir).step) == 4


def _signal_during_scoring(monkeypatch):
  """SIGTERM to this process in the middle of an evaluation (after its detections)."""
  from df2_jax.evaluation import evaluator
  real = evaluator.coco_metrics
  calls = []

  def scoring(*args, **kwargs):
    calls.append(1)
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
  monkeypatch.setattr(evaluator, "coco_metrics", scoring)
  return calls


def test_a_signal_during_evaluations_stops_and_the_next_run_redoes_them(trained, data_dir,
                                                                       tmp_path, monkeypatch):
  workdir = _copy(trained, tmp_path)
  # The periodic evaluation of step 6: the step is saved, the evaluation left unfinished.
  calls = _signal_during_scoring(monkeypatch)
  with pytest.raises(train.Interrupted) as stopped:
    train.train_and_evaluate(_config(data_dir, num_steps=8), workdir)
  assert stopped.value.signum == signal.SIGTERM and stopped.value.step == 6 and calls
  assert checkpoint.latest_step(os.path.join(workdir, "checkpoints")) == 6
  assert not os.path.exists(os.path.join(workdir, "eval_6", "metrics.json"))
  monkeypatch.undo()
  # Resumed: step 6 is evaluated first, then training goes on to 8 and evaluates it.
  metrics = train.train_and_evaluate(_config(data_dir, num_steps=8), workdir)
  for step in (6, 8):
    with open(os.path.join(workdir, f"eval_{step}", "metrics.json")) as f:
      assert "bbox" in json.load(f), step
  logged = files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  assert [m["step"] for m in logged if "eval/bbox/AP" in m] == [2, 4, 6, 8]
  assert metrics["bbox"]["AP"] == logged[-1]["eval/bbox/AP"]
  # The final evaluation (nothing left to train) is stopped the same way, then redone.
  shutil.rmtree(os.path.join(workdir, "eval_8"))
  _signal_during_scoring(monkeypatch)
  with pytest.raises(train.Interrupted):
    train.train_and_evaluate(_config(data_dir, num_steps=8), workdir)
  assert not os.path.exists(os.path.join(workdir, "eval_8", "metrics.json"))
  monkeypatch.undo()
  train.train_and_evaluate(_config(data_dir, num_steps=8), workdir)
  assert os.path.exists(os.path.join(workdir, "eval_8", "metrics.json"))


def test_a_torn_last_line_of_metrics_jsonl_is_dropped_on_resume(trained, data_dir, tmp_path,
                                                                 caplog):
  workdir = _copy(trained, tmp_path)
  path = os.path.join(workdir, "metrics.jsonl")
  complete = files.read_jsonl(path)
  with open(path, "a") as f:
    f.write('{"step": 5, "loss": 1.2')  # a kill in the middle of a write
  with pytest.raises(ValueError, match="line"):
    json.loads(open(path).read().splitlines()[-1])
  with caplog.at_level("WARNING"):
    state = train.train(_config(data_dir), workdir)
  assert int(state.step) == 4
  assert "torn" in caplog.text
  assert files.read_jsonl(path) == complete
  assert open(path).read().endswith("}\n")


def _flip_bytes(step_dir: str, count: int = 64) -> str:
  data_files = [os.path.join(r, f) for r, _, fs in os.walk(os.path.join(step_dir, "state"))
                for f in fs if "/d/" in os.path.join(r, f)]
  target = max(data_files, key=os.path.getsize)
  data = bytearray(open(target, "rb").read())
  middle = len(data) // 2
  for i in range(count):
    data[middle + i] ^= 0xFF
  open(target, "wb").write(bytes(data))
  return target


def test_checkpoint_checksums_catch_flipped_bytes(tmp_path):
  directory = str(tmp_path / "ckpt")
  states = {s: {"params": {"w": np.arange(4096, dtype=np.float32) * s}, "step": np.asarray(s, np.int32)}
            for s in (1, 2)}
  with checkpoint.CheckpointManager(directory) as manager:
    for s, state in states.items():
      manager.save(s, state)
  for s in (1, 2):
    recorded = json.load(open(os.path.join(directory, str(s), checkpoint.CHECKSUMS)))
    assert recorded["algorithm"] == "crc32" and any("/d/" in k for k in recorded["files"])
  changed = _flip_bytes(os.path.join(directory, "2"))
  # Read-only loading (eval, predict) refuses the step, naming the file.
  with pytest.raises(checkpoint.ChecksumError, match=os.path.basename(changed)):
    checkpoint.restore_params(directory, 2)
  # Resuming moves it aside as damaged and restores the step before, exactly.
  with checkpoint.CheckpointManager(directory) as manager:
    state, _, step = manager.restore_latest_intact(states[1])
  assert step == 1
  np.testing.assert_array_equal(state["params"]["w"], states[1]["params"]["w"])
  assert sorted(os.listdir(directory)) == ["1", "2.damaged"]


def test_a_full_disk_is_one_line_and_earlier_checkpoints_stay_intact(data_dir, tmp_path):
  mount = tmp_path / "small_disk"
  mount.mkdir()
  # 5 MiB: the step-1 checkpoint (about 4 MB with the optimizer state) fits, step 2 does not.
  made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(mount)],
                        capture_output=True, text=True, check=False)
  if made.returncode != 0:
    pytest.skip(f"cannot mount a small tmpfs here: {made.stderr.strip()}")
  try:
    workdir = mount / "run"
    proc = _run(["--workdir", str(workdir), f"--config.data.synthetic_dir={data_dir}",
                 "--config.train.num_steps=8", "--config.train.checkpoint_every_steps=2",
                 "--config.train.keep_checkpoints=10"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if "No space left" in l]
    assert len(lines) == 1, proc.stderr[-5000:]
    assert f"No space left on the disk of {workdir}" in lines[0]
    assert "bytes needed" in lines[0] and "bytes free" in lines[0]
    assert proc.stderr.count("Traceback") == 0, proc.stderr[-5000:]
    saved = checkpoint.latest_step(str(workdir / "checkpoints"))
    assert saved is not None
    params, _ = checkpoint.restore_params(str(workdir / "checkpoints"), saved)  # verified
    assert all(np.all(np.isfinite(p)) for p in jax.tree_util.tree_leaves(params))
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_another_checkpoint_is_evaluated_into_a_folder_of_its_own(trained, data_dir,
                                                                 tmp_path):
  workdir = _copy(trained, tmp_path)
  assert evaluator.eval_folder(workdir, 4) == os.path.join(workdir, "eval_4")
  assert evaluator.eval_folder(workdir, 4, os.path.join(workdir, "checkpoints")) == os.path.join(
      workdir, "eval_4")
  assert evaluator.eval_folder(workdir, 4, os.path.join(workdir, "best")) == os.path.join(
      workdir, "eval_4-best")
  assert evaluator.eval_folder(workdir, 4, "/runs/other run/checkpoints") == os.path.join(
      workdir, "eval_4-other_run")
  own = _tree(os.path.join(workdir, "eval_4"))
  with checkpoint.CheckpointManager(os.path.join(workdir, "best")) as best:
    step = best.latest_step()
  metrics = evaluator.evaluate_checkpoint(_config(data_dir), workdir,
                                      checkpoint_dir=os.path.join(workdir, "best"))
  assert _tree(os.path.join(workdir, "eval_4")) == own  # the workdir's own results unchanged
  stored = files.read_json(os.path.join(workdir, f"eval_{step}-best", "metrics.json"))
  assert stored["checkpoint"] == os.path.join(workdir, "best", str(step))
  assert stored["bbox"]["AP"] == metrics["bbox"]["AP"]
