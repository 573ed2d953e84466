"""Runs that survive signals, damaged checkpoints and divergence (tiny config, in process).

* SIGTERM / SIGINT between two checkpoint steps: the loop saves the interrupted step and stops;
  rerun, it finishes with params bit-for-bit equal to an uninterrupted run.
* A damaged latest checkpoint (truncated array file, truncated _METADATA, an empty step
  directory) is moved aside with a warning and the previous step resumes.
* A diverging run never saves a non-finite state and stops naming the step; evaluation refuses
  non-finite params.
"""

import glob
import json
import logging
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest

from configs import tiny
from df2_jax import checkpoint, train
from df2_jax.evaluation import evaluator

STEPS = 12


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  from data_pipeline import sources
  path = str(tmp_path_factory.mktemp("robust_data"))
  sources.ensure_synthetic(_config(path).data)
  return path


def _config(data_dir, **overrides):
  config = tiny.get_config()
  config.data.synthetic_dir = data_dir
  config.train.update(dict(num_steps=STEPS, log_every_steps=1, checkpoint_every_steps=100,
                           keep_checkpoints=3))
  config.train.update(overrides)
  return config


def _flat(params):
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(jax.device_get(params))}


def _assert_bitwise_equal(a, b):
  assert sorted(a) == sorted(b) and len(a) > 50
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
  """The uninterrupted run's final params."""
  workdir = str(tmp_path_factory.mktemp("robust_ref"))
  return _flat(train.train(_config(data_dir), workdir).params)


def _steps(directory):
  with checkpoint.CheckpointManager(directory) as manager:
    return manager.all_steps()


def _signal_after_step(workdir: str, step: int, signum: int) -> threading.Thread:
  """Sends ``signum`` to this process once metrics.jsonl shows ``step``."""
  def watch():
    path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline:
      if os.path.exists(path) and any(f'"step": {step},' in l for l in open(path)):
        os.kill(os.getpid(), signum)
        return
      time.sleep(0.02)
  thread = threading.Thread(target=watch, daemon=True)
  thread.start()
  return thread


def test_signals_save_the_step_and_the_rerun_equals_an_uninterrupted_run(
    data_dir, reference, tmp_path, caplog):
  """SIGTERM after step 2, then (resumed) SIGINT two steps later: each run saves the step it
  stopped at; the third run finishes bit-for-bit equal to the uninterrupted run."""
  config = _config(data_dir)
  workdir = str(tmp_path / "run")
  resumed_at = 0
  for signum in (signal.SIGTERM, signal.SIGINT):
    before = signal.getsignal(signum)
    _signal_after_step(workdir, resumed_at + 2, signum)
    with pytest.raises(train.Interrupted) as stopped:
      train.train(config, workdir)
    assert signal.getsignal(signum) is before  # the handlers are put back
    step = stopped.value.step
    assert stopped.value.signum == signum and resumed_at + 3 <= step < STEPS
    steps = _steps(os.path.join(workdir, "checkpoints"))
    assert steps[-1] == step, steps  # saved though it is not a checkpoint step (every 100)
    assert f"Stopped by {signal.Signals(signum).name} after step {step}" in caplog.text
    assert not glob.glob(os.path.join(workdir, "checkpoints", "*tmp*"))
    resumed_at = step

  state = train.train(config, workdir)  # the same command again
  assert int(state.step) == STEPS
  _assert_bitwise_equal(reference, _flat(state.params))
  # metrics.jsonl: one line per step, though the stopped runs logged steps they did not save.
  logged = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert logged == list(range(1, STEPS + 1))


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _damage_array(step_dir):
  files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
  _truncate(max(files, key=os.path.getsize))


def _damage_metadata(step_dir):
  _truncate(os.path.join(step_dir, "state", "_METADATA"))


@pytest.fixture(scope="module")
def six_steps(data_dir, tmp_path_factory):
  """A run stopped at step 6 with checkpoints at steps 2, 4 and 6 (copied by each test)."""
  workdir = str(tmp_path_factory.mktemp("robust_six"))
  train.train(_config(data_dir, num_steps=6, checkpoint_every_steps=2), workdir)
  return workdir


def test_damaged_latest_checkpoints_are_moved_aside_and_the_intact_step_resumes(
    data_dir, reference, six_steps, tmp_path, caplog):
  """Three kinds of damage at once, newest first (one resumed run checks them all): an empty
  step directory whose writer died before anything was in it (8), a truncated array file (6)
  and truncated metadata (4); each is moved aside in turn and step 2 resumes."""
  workdir = str(tmp_path / "run")
  shutil.copytree(six_steps, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  assert _steps(ckpts) == [2, 4, 6]
  os.makedirs(os.path.join(ckpts, "8"))
  _damage_array(os.path.join(ckpts, "6"))
  _damage_metadata(os.path.join(ckpts, "4"))
  caplog.set_level(logging.INFO)
  state = train.train(_config(data_dir, checkpoint_every_steps=2), workdir)
  assert f"Resumed from {ckpts} at step 2." in caplog.text
  assert int(state.step) == STEPS
  _assert_bitwise_equal(reference, _flat(state.params))
  for bad in ("8", "6", "4"):
    assert f"Checkpoint step {bad} in {ckpts} does not restore" in caplog.text, bad
    assert os.path.isdir(os.path.join(ckpts, f"{bad}.damaged"))  # kept, renamed
  assert os.listdir(os.path.join(ckpts, "6.damaged")) and os.listdir(
      os.path.join(ckpts, "4.damaged"))


def test_a_diverging_run_never_saves_a_non_finite_state(data_dir, tmp_path):
  config = _config(data_dir, base_lr=1e4, warmup_steps=0, num_steps=10, log_every_steps=10,
                   checkpoint_every_steps=5)
  workdir = str(tmp_path / "run")
  with pytest.raises(FloatingPointError, match=r"Non-finite loss or gradient at step \d+: .*"
                                               r"loss=nan.*stopped at step 5 without saving"):
    train.train(config, workdir)
  ckpts = os.path.join(workdir, "checkpoints")
  steps = _steps(ckpts)
  assert steps and 5 not in steps
  for step in steps:
    params, _ = checkpoint.restore_params(ckpts, step)
    assert all(np.isfinite(v).all() for v in jax.tree_util.tree_leaves(params)), step

  # Evaluation refuses non-finite params (a diverged checkpoint would score AP 0 silently).
  params, constants = checkpoint.restore_params(ckpts, steps[-1])
  leaves, tree = jax.tree_util.tree_flatten(params)
  leaves[3] = np.full_like(leaves[3], np.nan)
  with checkpoint.CheckpointManager(os.path.join(tmp_path, "nan")) as manager:
    manager.save(7, {"params": jax.tree_util.tree_unflatten(tree, leaves),
                     "constants": constants}, force=True)
  with pytest.raises(FloatingPointError, match=r"non-finite values in 1 of \d+ tensors"):
    evaluator.evaluate_checkpoint(config, workdir, checkpoint_dir=os.path.join(tmp_path, "nan"))
  assert not os.path.exists(os.path.join(workdir, "eval_7"))


def test_a_failing_first_step_is_reported_as_the_step_not_as_a_checkpoint_error():
  """An out-of-memory first step (the 1x recipe on a CPU) fails as the step, before anything
  is saved, with what to change."""
  def step_fn(state, batch, key):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                       "67645734912 bytes.")
  with pytest.raises(RuntimeError, match=r"The training step failed at step 1, before any "
                                         r"checkpoint of this run was saved: RuntimeError: "
                                         r"RESOURCE_EXHAUSTED.* does not fit in memory"):
    train._first_step(step_fn, None, None, None, done=1)  # pylint: disable=protected-access
  # The first step on another canvas (orientation buckets: another program) is awaited too.
  batch = {"image": np.zeros((2, 2, 1344, 1344, 3), np.uint8)}
  with pytest.raises(RuntimeError, match=r"The training step failed at step 700, its first on "
                                         r"a 1344x1344 canvas: RuntimeError: RESOURCE_EXHAUSTED"
                                         r".* does not fit in memory"):
    train._first_step(step_fn, None, batch, None, done=700,  # pylint: disable=protected-access
                      first=False)
