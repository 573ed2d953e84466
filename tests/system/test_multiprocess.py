"""Many processes: two local processes of two CPU devices each train the tiny config to the
same parameters as one process of four devices, with the same global batch, evaluate to the
same metrics, and, killed and restarted, resume from the checkpoint they wrote together (also
as one process: another process count).

Each run is a subprocess of this file (``--worker``) with its own CPU device count; the two
processes join through ``parallel.initialize_distributed`` on a free localhost port (gloo
collectives), each reads its half of every global batch and detects its half of the
evaluation split, and the orbax checkpoints are written by both together.
"""

import dataclasses
import json
import os
from pathlib import Path
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from df2_jax import parallel
from df2_jax.evaluation import results as results_lib

STEPS = 4
GLOBAL_PAIRS = 4
READY = "Ready to be killed."


def _config(data_dir: str, steps: int = STEPS, eval_every_steps: int = 0):
  from configs import tiny
  config = tiny.get_config()
  config.data.synthetic_dir = data_dir
  config.train.update(dict(global_batch_pairs=GLOBAL_PAIRS, num_steps=steps, warmup_steps=2,
                           log_every_steps=2, checkpoint_every_steps=2, keep_checkpoints=3,
                           eval_every_steps=eval_every_steps))
  config.eval.batch_size = 2  # per device
  return config


def _worker(args: dict) -> None:
  """One process of a run: optionally evaluates a checkpoint first (``eval_step``), trains,
  then process 0 writes the final params to ``out``; with ``kill`` every process then says it
  is ready and waits for the test to kill the job with SIGKILL (no orderly exit, as a
  preempted job)."""
  import logging
  import jax
  from df2_jax import train
  from df2_jax.evaluation import evaluator
  logging.basicConfig(level=logging.INFO)
  logging.getLogger().setLevel(logging.INFO)
  if args["num_processes"] > 1:
    parallel.initialize_distributed(f"localhost:{args['port']}", args["num_processes"],
                                    args["process_id"], timeout_s=60)
  assert jax.device_count() == 4 and jax.local_device_count() == args["devices"]
  config = _config(args["data_dir"], args["steps"], args.get("eval_every_steps", 0))
  if args.get("eval_step") is not None:
    evaluator.evaluate_checkpoint(config, args["workdir"], step=args["eval_step"])
  state = train.train(config, args["workdir"])
  params = parallel.one_replica(state.params)
  if jax.process_index() == 0:
    flat = {jax.tree_util.keystr(k): np.asarray(v)
            for k, v in jax.tree_util.tree_leaves_with_path(params)}
    np.savez(args["out"], **flat)
  if args.get("kill"):
    parallel.barrier("kill")
    print(READY, flush=True)
    time.sleep(600)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(args: dict) -> subprocess.Popen:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={args['devices']}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  # The test session's compilation cache (conftest): the second round's processes run the
  # first round's programs and load them instead of compiling again.
  import jax
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  log = open(args["log"], "w")
  return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                           json.dumps(args)], env=env, stdout=log, stderr=subprocess.STDOUT,
                          cwd=str(Path(__file__).resolve().parents[2]))


def _kill_when_ready(procs, args) -> None:
  """Kills each ``kill`` run once all of its processes have said they are ready, as a
  scheduler preempts a job: SIGKILL from outside, the processes that do not host the
  coordination service first (the service's host going first would let another process
  see it gone and abort before its own SIGKILL: a race seen once in CI)."""
  runs = {}
  for p, a in zip(procs, args):
    if a.get("kill"):
      runs.setdefault(a["port"], []).append((a["process_id"], p, a))
  for members in runs.values():
    ended = any(p.poll() is not None for _, p, _ in members)  # one failed: end the others
    if ended or all(READY in Path(a["log"]).read_text() for _, _, a in members):
      for _, p, _ in sorted(members, key=lambda m: m[0], reverse=True):
        if p.poll() is None:
          p.send_signal(signal.SIGKILL)
          p.wait()


def _wait(procs, args, timeout_s=600):
  deadline = time.time() + timeout_s
  while any(p.poll() is None for p in procs):
    if time.time() > deadline:
      for q in procs:
        q.kill()
      raise TimeoutError(f"the runs did not end in {timeout_s} s")
    _kill_when_ready(procs, args)
    time.sleep(0.5)
  for p, a in zip(procs, args):
    text = Path(a["log"]).read_text()
    if a.get("kill"):
      assert p.returncode == -signal.SIGKILL and READY in text, text[-4000:]
    else:
      assert p.returncode == 0, text[-4000:]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  """The tiny synthetic split, generated once here."""
  from data_pipeline import sources
  path = str(tmp_path_factory.mktemp("mp_data"))
  sources.ensure_synthetic(_config(path).data)
  return path


def _run(tmp_path, runs: list[dict]) -> list[list[dict]]:
  """Starts every run at once (each a list of processes' args completed here) and waits."""
  out = []
  for run in runs:
    port = _free_port()
    n = run.pop("num_processes")
    out.append([dict(run, num_processes=n, process_id=i, devices=4 // n, port=port,
                     log=f"{run['out'][:-4]}_{i}.log") for i in range(n)])
  _wait([_start(a) for group in out for a in group], [a for group in out for a in group])
  return out


def _params(path):
  return dict(np.load(path))


def _assert_same_params(one, both):
  """Within 1e-5 relative to the whole parameter vector (the issue's bound), and each tensor
  within 1e-4 of its largest value (measured: at most 1.2e-5 after 6 steps, summation order)
  with an absolute floor of 1e-6, 1e-4 of one step at the tiny config's learning rate 0.01, for
  tensors that stay near zero (measured: 1.04e-7 on an FPN bias of largest value 1e-3 with the
  pair loss over the whole batch, whose sums cross the devices in another order; the tiny config
  now keeps it within image pairs)."""
  assert sorted(one) == sorted(both) and len(one) > 50
  diff2 = sum(float(np.sum((one[k] - both[k]) ** 2)) for k in one)
  norm2 = sum(float(np.sum(one[k] ** 2)) for k in one)
  assert (diff2 / norm2) ** 0.5 <= 1e-5, (diff2 / norm2) ** 0.5
  for k in one:
    scale = float(np.max(np.abs(one[k])))
    assert float(np.max(np.abs(one[k] - both[k]))) <= 1e-4 * scale + 1e-6, k


def _losses(path):
  return re.findall(r"step (\d+)/\d+  loss ([\d.]+)", Path(path).read_text())


def _checkpoint_params(directory: str, step: int):
  """A saved step's params flattened like the workers' npz files."""
  import jax
  from df2_jax import checkpoint
  params, _ = checkpoint.restore_params(directory, step)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(params)}


def _metrics(eval_dir):
  with open(os.path.join(eval_dir, "metrics.json")) as f:
    metrics = json.load(f)
  metrics.pop("timing")
  metrics.pop("checkpoint", None)  # the checkpoint path differs between the two runs
  assert os.path.exists(metrics.pop("ground_truth")["coco"])  # each workdir has its own copy
  return metrics


def test_two_processes_train_evaluate_and_resume_like_one(tmp_path, data_dir):
  """The issue's acceptance, in two rounds of concurrent runs (4 CPU devices each):

  1. one process trains 6 steps without a stop ("one"); two processes train 4 steps ("two"),
     evaluating at step 4 together (into eval_4/ and best/), and are then killed (SIGKILL).
  2. the two processes restart and resume to step 6; a copy of their checkpoints is resumed
     by one process ("switch": another process count), which first evaluates step 4 alone.

  Checked: "two" at step 4 equals "one"'s step-4 checkpoint, "two" and "switch" at step 6
  equal "one" at step 6 (relative 1e-5), the same losses are logged, and the two-process
  evaluation's metrics equal the one-process evaluation of the same checkpoint exactly.
  """
  one_dir, two_dir, switch_dir = (str(tmp_path / n) for n in ("one", "two", "switch"))
  common = dict(data_dir=data_dir)
  [one], [two0, two1] = _run(tmp_path, [
      dict(common, num_processes=1, workdir=one_dir, steps=STEPS + 2,
           out=str(tmp_path / "one.npz")),
      dict(common, num_processes=2, workdir=two_dir, steps=STEPS, eval_every_steps=STEPS,
           kill=True, out=str(tmp_path / "two_first.npz"))])
  _assert_same_params(_checkpoint_params(os.path.join(one_dir, "checkpoints"), STEPS),
                      _params(two0["out"]))
  # The same losses; only process 0 logs them (and its evaluation).
  one_losses, two_losses = _losses(one["log"])[:2], _losses(two0["log"])
  assert [s for s, _ in one_losses] == [s for s, _ in two_losses] and len(two_losses) == 2
  # The same losses to the logged digit (the sums cross the devices in another order, which can
  # turn the third decimal: 13.374 against 13.373 was seen).
  np.testing.assert_allclose([float(v) for _, v in one_losses],
                             [float(v) for _, v in two_losses], rtol=0, atol=1.01e-3)
  (_, first), (_, last) = _losses(one["log"])[::2]
  assert first != last  # it trained
  text0, text1 = Path(two0["log"]).read_text(), Path(two1["log"]).read_text()
  assert "Process 0 of 2: 2 local devices, 4 in all." in text0
  assert f"Results at step {STEPS}" in text0
  assert not _losses(two1["log"]) and "Results at step" not in text1
  # The checkpoints and the best params both processes wrote together, the evaluation files
  # process 0 wrote and the result chunks of both shards.
  assert sorted(int(p) for p in os.listdir(os.path.join(two_dir, "checkpoints"))
                if p.isdigit()) == [1, 2, 4]  # orbax also saves a fresh run's first step
  assert [p for p in os.listdir(os.path.join(two_dir, "best")) if p.isdigit()] == [str(STEPS)]
  eval_files = sorted(os.listdir(os.path.join(two_dir, f"eval_{STEPS}")))
  assert [f for f in eval_files if f.startswith("detections-")] == [
      "detections-00000-00000.npz", "detections-00001-00000.npz"], eval_files
  assert "metrics.json" in eval_files and not [f for f in eval_files if "shard" in f]

  shutil.copytree(os.path.join(two_dir, "checkpoints"), os.path.join(switch_dir, "checkpoints"))
  [two0, _], [switch] = _run(tmp_path, [
      dict(common, num_processes=2, workdir=two_dir, steps=STEPS + 2, eval_every_steps=STEPS,
           out=str(tmp_path / "two_resumed.npz")),
      dict(common, num_processes=1, workdir=switch_dir, steps=STEPS + 2, eval_step=STEPS,
           out=str(tmp_path / "switch.npz"))])
  for args in (two0, switch):
    text = Path(args["log"]).read_text()
    assert f"at step {STEPS}." in text and "Resumed from" in text, args["log"]
    assert [s for s, _ in _losses(args["log"])] == [str(STEPS + 2)]
  one_params = _params(one["out"])
  _assert_same_params(one_params, _params(two0["out"]))
  _assert_same_params(one_params, _params(switch["out"]))
  # Two processes evaluating the step-4 checkpoint == one process evaluating it, exactly: the
  # metrics (at step 4 the boxes score AP 0, retrieval with GT boxes does not), every detection
  # and the retrieval submission.
  two_eval, switch_eval = (os.path.join(d, f"eval_{STEPS}") for d in (two_dir, switch_dir))
  two_metrics = _metrics(two_eval)
  assert two_metrics == _metrics(switch_eval)
  assert set(two_metrics) == {"bbox", "segm", "keypoints_visible", "keypoints", "retrieval",
                              "retrieval_gt_boxes", "dropped_ground_truth"}
  assert two_metrics["dropped_ground_truth"] == dict(images=0, items=0, polygons=0, landmarks=0)
  assert two_metrics["retrieval_gt_boxes"]["top20"] > 0
  two_results, switch_results = results_lib.load(two_eval), results_lib.load(switch_eval)
  assert len(two_results.scores) == 8 * 10  # 8 images, 10 detections each
  for field in dataclasses.fields(two_results):
    np.testing.assert_array_equal(getattr(two_results, field.name),
                                  getattr(switch_results, field.name), err_msg=field.name)
  submissions = [Path(d, "retrieval_submission.json").read_text()
                 for d in (two_eval, switch_eval)]
  assert submissions[0] == submissions[1] and json.loads(submissions[0])


def test_unreachable_coordinator_is_a_clear_error():
  port = _free_port()  # nothing listens there
  started = time.monotonic()
  with pytest.raises(ConnectionError, match=f"Process 1 could not reach the coordinator at "
                                            f"localhost:{port} within 1 s"):
    parallel.initialize_distributed(f"localhost:{port}", 2, 1, timeout_s=1)
  assert time.monotonic() - started < 10


@pytest.mark.parametrize("kwargs,message", [
    (dict(coordinator_address="localhost:1234", num_processes=2), "missing: --process_id"),
    (dict(coordinator_address="localhost:1234", num_processes=2, process_id=2),
     r"--process_id=2 must be in \[0, 2\)"),
    (dict(coordinator_address="localhost", num_processes=2, process_id=1), "host:port"),
])
def test_incomplete_cluster_flags_fail_at_start(kwargs, message):
  with pytest.raises(ValueError, match=message):
    parallel.initialize_distributed(**kwargs, timeout_s=1)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
  here = Path(__file__).resolve()
  sys.path[:0] = [str(here.parents[2]), str(here.parents[1])]  # the repo (configs), tests/
  _worker(json.loads(sys.argv[2]))
