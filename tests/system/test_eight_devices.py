"""Data parallelism on 8 fake CPU devices: two train steps equal the one-device steps, detect
equals the one-device detect, and the training loop refuses a batch the devices cannot share.

The pytest process has already initialised jax with one CPU device, so the 8-device checks
run in a subprocess started with ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
(this file's ``__main__``), which prints its findings as one JSON line for the asserts here.
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from data_pipeline.spec import DEEPFASHION2
from df2_jax import parallel

ROOT = Path(__file__).resolve().parents[2]
NUM_DEVICES = 8
CANVAS = 64
PAIRS = 8  # the pair axis is what is sharded: one pair per device


def _worker() -> dict:
  """Runs inside the 8-device subprocess."""
  # pylint: disable=import-outside-toplevel
  from data_pipeline import synthetic_batches, transforms
  from df2_jax import train_step
  from df2_jax.models.match_rcnn import MatchRCNN, init_variables
  from tests.models.test_match_rcnn import TINY

  out = {"devices": jax.device_count(), "threefry_partitionable":
         bool(jax.config.jax_threefry_partitionable)}
  geometry = transforms.ImageGeometry((CANVAS, CANVAS), 48, CANVAS, 4, 28, spec=DEEPFASHION2)
  batch = synthetic_batches.synthetic_pair_batch(PAIRS, geometry, image_size=CANVAS)
  # With the pair loss's memory of one step: the second step scores the first step's items too.
  model = MatchRCNN(dataclasses.replace(TINY, match_memory_steps=1), (CANVAS, CANVAS),
                    DEEPFASHION2)
  variables = init_variables(model, jax.random.key(0), batch)
  tx = train_step.make_optimizer(0.01, variables["params"], freeze_at=0)
  host_state = jax.tree_util.tree_map(np.asarray,
                                      train_step.create_train_state(variables, tx))
  key = np.asarray(jax.random.key_data(jax.random.key(7)))

  def run(num_devices):
    mesh = parallel.make_mesh(num_devices)
    # Fresh device copies from numpy each time: the step donates its state.
    state = parallel.replicate(host_state, mesh)
    step_key = parallel.replicate(jax.random.wrap_key_data(key), mesh)
    global_batch = parallel.host_local_to_global(batch, mesh)
    step = parallel.shard_train_step(train_step.make_train_step, mesh, model, tx, {})
    new_state, _ = step(state, global_batch, step_key)
    new_state, metrics = step(new_state, global_batch, step_key)
    image = global_batch["image"]
    info = {"image_shards": len(image.addressable_shards),
            "image_shard_shape": list(image.addressable_shards[0].data.shape),
            "params_replicated": bool(jax.tree_util.tree_leaves(
                new_state.params)[0].sharding.is_fully_replicated)}
    info["memory"] = {jax.tree_util.keystr(k): np.asarray(v) for k, v in
                      jax.tree_util.tree_leaves_with_path(new_state.memory)}
    return (jax.tree_util.tree_map(np.asarray, new_state.params),
            {k: float(v) for k, v in metrics.items()}, info)

  params8, metrics8, info8 = run(NUM_DEVICES)
  params1, metrics1, info1 = run(1)
  mem8, mem1 = info8.pop("memory"), info1.pop("memory")
  # The stored features come from the first step's params (equal to about 1e-6 relative)
  # through the backbone: compared relative to each array's largest value.
  out["memory"] = {"keys": sorted(mem1), "valid": int(sum(v.sum() for k, v in mem1.items()
                                                          if "valid" in k)),
                   "relative_diff": {k: float(np.max(np.abs(mem8[k].astype(np.float64) - v))
                                              / max(float(np.max(np.abs(v))), 1e-9))
                                     for k, v in mem1.items()}}
  out.update(metrics8=metrics8, metrics1=metrics1, info8=info8, info1=info1)
  worst, moved = None, False
  flat8 = jax.tree_util.tree_leaves_with_path(params8)
  flat1 = jax.tree_util.tree_leaves(params1)
  before = jax.tree_util.tree_leaves(host_state.params)
  mismatched = []
  for (path, a), b, p0 in zip(flat8, flat1, before):
    name = jax.tree_util.keystr(path)
    excess = np.abs(a - b) - (1e-6 + 1e-5 * np.abs(b))
    if (excess > 0).any():
      mismatched.append(name)
    diff = float(np.max(np.abs(a - b))) if a.size else 0.0
    if worst is None or diff > worst[1]:
      worst = (name, diff)
    moved |= bool(np.any(b != p0))
  out.update(params_mismatched=mismatched, worst_param=worst, params_moved=moved,
             num_param_leaves=len(flat8))

  # Evaluation's detect over all 8 devices (one image each, parallel.per_device) against the
  # plain one-device detect of each image.
  from df2_jax.models.match_rcnn import MatchRCNN as _M
  fn = lambda v, x, hw: model.apply(v, x, hw, method=_M.detect)
  images, image_hw = batch["image"][:, 0], batch["image_hw"][:, 0]
  mesh8 = parallel.make_mesh()
  x = parallel.host_local_to_global({"image": images, "image_hw": image_hw}, mesh8)
  global_out = parallel.per_device(fn, mesh8, 2)(parallel.replicate(variables, mesh8),
                                                 x["image"], x["image_hw"])
  out8 = parallel.host_local(global_out, mesh8)
  detect1 = jax.jit(fn)
  outs1 = [jax.device_get(detect1(variables, images[i:i + 1], image_hw[i:i + 1]))
           for i in range(PAIRS)]
  one = {k: np.concatenate([o[k] for o in outs1]) for k in outs1[0]}
  diff = {k: np.abs(out8[k].astype(np.float64) - one[k].astype(np.float64)) for k in out8}
  lm_xy = diff.pop("landmarks")
  out["detect"] = {
      "shards": len(global_out["boxes"].addressable_shards),
      "valid": int(out8["valid"].sum()),
      "max_diff": {k: float(v.max()) for k, v in diff.items()},
      "landmark_score_diff": float(lm_xy[..., 2].max()),
      "landmark_points": int((one["landmarks"][..., 2] != 0).sum()),
      "landmark_points_moved": int((lm_xy[..., :2].max(-1) > 0).sum())}

  try:
    parallel.check_batch_divisible(6, parallel.make_mesh(4))
    out["divisible_error"] = None
  except ValueError as e:
    out["divisible_error"] = str(e)
  parallel.check_batch_divisible(8, parallel.make_mesh(4))

  # The training loop refuses, at start, a global batch the 8 devices cannot share (the loop
  # itself on several devices, its logs, checkpoints and params: test_multiprocess's
  # one-process run on 4 devices).
  import tempfile
  from configs import tiny
  from df2_jax import train
  with tempfile.TemporaryDirectory() as tmp:
    config = tiny.get_config()
    config.data.synthetic_dir = os.path.join(tmp, "data")
    config.train.global_batch_pairs = 6
    try:
      train.train(config, os.path.join(tmp, "run6"))
      out["loop_divisible_error"] = None
    except ValueError as e:
      out["loop_divisible_error"] = str(e)
    out["loop_read_data"] = os.path.exists(config.data.synthetic_dir)
  return out


@pytest.fixture(scope="module")
def eight_device_run():
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={NUM_DEVICES}").strip()
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [env.get("PYTHONPATH")] if p])
  proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker"],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-5000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("{")][-1]
  return json.loads(line)


def test_eight_devices_shard_the_pair_axis(eight_device_run):
  r = eight_device_run
  assert r["devices"] == NUM_DEVICES
  assert r["threefry_partitionable"]
  assert r["info8"]["image_shards"] == NUM_DEVICES
  assert r["info8"]["image_shard_shape"] == [1, 2, CANVAS, CANVAS, 3]
  assert r["info1"]["image_shard_shape"] == [PAIRS, 2, CANVAS, CANVAS, 3]
  assert r["info8"]["params_replicated"] and r["info1"]["params_replicated"]


def test_two_steps_on_eight_devices_equal_one_device(eight_device_run):
  """Two steps (the second with the first's items in the pair loss's memory): the same params,
  metrics and memory on 8 devices as on one."""
  r = eight_device_run
  assert len(r["memory"]["keys"]) == 7 and r["memory"]["valid"] > 0
  assert max(r["memory"]["relative_diff"].values()) < 1e-4, r["memory"]["relative_diff"]
  assert r["params_moved"]
  assert not r["params_mismatched"], (r["params_mismatched"][:10], r["worst_param"])
  m8, m1 = r["metrics8"], r["metrics1"]
  assert set(m8) == set(m1) and "loss" in m8 and "grad_norm" in m8
  for k in m1:  # the second step's: its params differ by the first step's rounding
    np.testing.assert_allclose(m8[k], m1[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_detect_on_eight_devices_equals_one_device(eight_device_run):
  """Evaluation and prediction run detect on every device, each on its own images: the same
  detections as one device, exactly."""
  r = eight_device_run["detect"]
  assert r["shards"] == NUM_DEVICES and r["valid"] > 0
  assert set(r["max_diff"]) == {"boxes", "scores", "classes", "valid", "masks", "embeddings"}
  assert all(v == 0 for v in r["max_diff"].values()), r["max_diff"]
  # Landmarks: the same heatmaps (scores), but the untrained model's flat maps hold float32
  # near-ties that the two compilations' rounding may resolve to another pixel
  # (heatmaps_to_landmarks' docstring): measured 4 of 2,518 points.
  assert r["landmark_score_diff"] == 0 and r["landmark_points"] > 1000
  assert r["landmark_points_moved"] <= 0.01 * r["landmark_points"], r


def test_check_batch_divisible_message(eight_device_run):
  msg = eight_device_run["divisible_error"]
  assert msg is not None
  assert "6 image pairs" in msg and "4 devices" in msg and "multiple of 4" in msg


def test_training_loop_refuses_a_batch_the_devices_cannot_share(eight_device_run):
  msg = eight_device_run["loop_divisible_error"]
  assert msg is not None and "6 image pairs" in msg and "8 devices" in msg
  assert not eight_device_run["loop_read_data"]  # before any data is generated or read


def test_single_device_helpers():
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.size == jax.device_count()
  batch = {"image": np.zeros((2, 2, 4, 4, 3), np.uint8), "element": np.arange(2)}
  g = parallel.host_local_to_global(batch, mesh)
  assert g["image"].shape == (2, 2, 4, 4, 3) and g["element"].dtype == np.int32
  assert g["image"].sharding.spec == jax.sharding.PartitionSpec("data")
  with pytest.raises(ValueError, match="leading"):
    parallel.host_local_to_global({"a": np.zeros(2), "b": np.zeros(3)}, mesh)
  rep = parallel.replicate({"w": np.ones(3), "key": jax.random.key(1)}, mesh)
  assert rep["w"].sharding.is_fully_replicated
  assert jax.random.key_data(rep["key"]).tolist() == jax.random.key_data(
      jax.random.key(1)).tolist()
  with pytest.raises(ValueError, match="num_devices"):
    parallel.make_mesh(jax.device_count() + 1)
  if not parallel._cluster_environment():  # pylint: disable=protected-access
    assert parallel.initialize_distributed() is False


def test_batch_must_split_over_processes_too(monkeypatch):
  """Each process loads its slice: 3 pairs fit one device but not 2 processes."""
  mesh = parallel.make_mesh(1)
  parallel.check_batch_divisible(3, mesh)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match=r"3 image pairs cannot be split evenly over 1 devices "
                                       r"in 2 processes .* multiple of 2 pairs, e.g. 2 or 4"):
    parallel.check_batch_divisible(3, mesh)
  parallel.check_batch_divisible(4, mesh)


@pytest.mark.parametrize("index,expected", [
    (1, "[process 1] 3 images failed to load\n"),
    (0, "step 10\n[process 0] 3 images failed to load\n")])
def test_logging_of_many_processes(monkeypatch, index, expected):
  """Process 0 logs everything, the others only warnings; warnings name their process."""
  import io
  import logging
  root = logging.getLogger()
  stream = io.StringIO()
  handler = logging.StreamHandler(stream)
  old_level = root.level
  root.addHandler(handler)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(jax, "process_index", lambda: index)
  try:
    root.setLevel(logging.INFO)
    parallel.configure_logging()
    parallel.configure_logging()  # twice: still one prefix
    log = logging.getLogger("df2_jax.test_logging")
    log.info("step 10")
    log.warning("%d images failed to load", 3)
  finally:
    root.removeHandler(handler)
    root.setLevel(old_level)
    prefix = parallel._ProcessPrefix  # pylint: disable=protected-access
    for h in root.handlers:
      h.filters = [f for f in h.filters if not isinstance(f, prefix)]
  assert stream.getvalue() == expected


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
  print(json.dumps(_worker()))
