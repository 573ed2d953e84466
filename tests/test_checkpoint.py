"""orbax checkpoints of the train state: interval, retention, round trips, params-only reads."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from df2_jax import checkpoint
from df2_jax import train_step


def _tiny_state(seed=0):
  """A TrainState over a two-layer parameter tree, with momentum that is not all zero."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {"dense": {"kernel": jax.random.normal(k1, (3, 4)), "bias": jnp.zeros(4)},
            "head": {"kernel": jax.random.normal(k2, (4, 2))}}
  constants = {"bn": {"mean": jnp.arange(4.0), "var": jnp.ones(4)}}
  tx = optax.sgd(0.1, momentum=0.9)
  state = train_step.create_train_state({"params": params, "constants": constants}, tx)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  return state.replace(step=jnp.array(seed, jnp.int32),
                       params=optax.apply_updates(params, updates), opt_state=opt_state)


def _assert_trees_equal(a, b):
  la, ta = jax.tree_util.tree_flatten(a)
  lb, tb = jax.tree_util.tree_flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps=range(5)):
  mgr = checkpoint.CheckpointManager(directory, save_interval_steps=2, max_to_keep=2)
  states = {}
  for s in steps:
    states[s] = _tiny_state(s)
    mgr.save(s, states[s], extra={"step": s, "data_position": 100 * s,
                                  "config": {"name": "tiny", "lr": 0.02}})
  mgr.wait_until_finished()
  return mgr, states


def test_interval_and_retention(tmp_path):
  mgr, _ = _save_steps(tmp_path / "ckpt")
  assert mgr.all_steps() == [2, 4]  # 0, 2, 4 saved on the interval; the newest 2 kept
  assert mgr.latest_step() == 4
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == ["2", "4"]
  mgr.close()


def test_restore_latest_and_chosen_step(tmp_path):
  mgr, states = _save_steps(tmp_path / "ckpt")
  target = _tiny_state(99)
  state, extra = mgr.restore(target_state=target)
  assert isinstance(state, train_step.TrainState)
  _assert_trees_equal(state, states[4])
  assert int(state.step) == 4
  assert extra == {"step": 4, "data_position": 400, "config": {"name": "tiny", "lr": 0.02}}
  state2, extra2 = mgr.restore(2, target_state=target)
  _assert_trees_equal(state2, states[2])
  assert extra2["data_position"] == 200
  # An abstract target (shapes, dtypes, shardings) is enough.
  abstract = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), target)
  state3, _ = mgr.restore(4, target_state=abstract)
  _assert_trees_equal(state3, states[4])
  # Restored leaves take the target's placement.
  leaf = jax.tree_util.tree_leaves(state.params)[0]
  assert leaf.sharding == jax.tree_util.tree_leaves(target.params)[0].sharding
  with pytest.raises(FileNotFoundError):
    mgr.restore(3, target_state=target)
  mgr.close()


def test_restore_without_target_gives_plain_trees(tmp_path):
  mgr, states = _save_steps(tmp_path / "ckpt")
  state, _ = mgr.restore()
  assert set(state) == {"step", "params", "constants", "opt_state", "memory"}
  _assert_trees_equal(state["params"], states[4].params)
  mgr.close()


def test_resume_in_a_new_manager(tmp_path):
  mgr, states = _save_steps(tmp_path / "ckpt")
  mgr.close()
  with checkpoint.CheckpointManager(tmp_path / "ckpt", save_interval_steps=2,
                                    max_to_keep=2) as again:
    assert again.latest_step() == 4
    state, extra = again.restore(target_state=_tiny_state(0))
    _assert_trees_equal(state, states[4])
    assert extra["step"] == 4
    again.save(6, _tiny_state(6))
    again.wait_until_finished()
    assert again.all_steps() == [4, 6]
    assert again.restore(6, target_state=_tiny_state(0))[1] == {}


def test_relative_directory(tmp_path, monkeypatch):
  """A relative directory (``--workdir runs/demo``) saves, resumes and restores params: orbax's
  array writer rejects relative paths, so the manager resolves them against the cwd."""
  monkeypatch.chdir(tmp_path)
  mgr, states = _save_steps("runs/demo/checkpoints")
  assert mgr.all_steps() == [2, 4]
  assert mgr.directory == str(tmp_path / "runs" / "demo" / "checkpoints")
  mgr.close()
  with checkpoint.CheckpointManager("runs/demo/checkpoints") as again:
    state, _ = again.restore(target_state=_tiny_state(0))
  _assert_trees_equal(state, states[4])
  params, _ = checkpoint.restore_params("runs/demo/checkpoints", step=2)
  _assert_trees_equal(params, states[2].params)


def test_params_only_restore_from_a_copied_directory(tmp_path):
  mgr, states = _save_steps(tmp_path / "ckpt")
  mgr.close()
  copy = tmp_path / "elsewhere" / "ckpt"
  shutil.copytree(tmp_path / "ckpt", copy)
  params, constants = checkpoint.restore_params(copy)
  _assert_trees_equal(params, states[4].params)
  _assert_trees_equal(constants, states[4].constants)
  assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(params))
  params2, _ = checkpoint.restore_params(copy, step=2)
  _assert_trees_equal(params2, states[2].params)
  with pytest.raises(FileNotFoundError):
    checkpoint.restore_params(copy, step=0)
  with pytest.raises(FileNotFoundError):
    checkpoint.restore_params(tmp_path / "empty")


def test_restore_onto_a_mesh_sharding(tmp_path):
  from df2_jax import parallel  # pylint: disable=import-outside-toplevel
  mgr, states = _save_steps(tmp_path / "ckpt")
  mesh = parallel.make_mesh()
  target = parallel.replicate(jax.tree_util.tree_map(np.asarray, _tiny_state(0)), mesh)
  state, _ = mgr.restore(target_state=target)
  _assert_trees_equal(state, states[4])
  assert all(x.sharding == parallel.replicated(mesh) for x in jax.tree_util.tree_leaves(state))
  mgr.close()


def test_empty_directory_has_no_latest_step(tmp_path):
  with checkpoint.CheckpointManager(tmp_path / "new", save_interval_steps=1) as mgr:
    assert mgr.latest_step() is None
    with pytest.raises(FileNotFoundError):
      mgr.restore(target_state=_tiny_state())


def test_match_rcnn_train_state_round_trip(tmp_path):
  """The real TrainState of the TINY model (multi_transform optimizer state included)."""
  # pylint: disable-next=import-outside-toplevel
  from tests.models.test_match_rcnn import _model_and_variables
  _, variables = _model_and_variables()
  tx = train_step.make_optimizer(0.01, variables["params"], freeze_at=2)
  state = train_step.create_train_state(variables, tx)
  state = state.replace(step=jnp.array(7, jnp.int32))
  with checkpoint.CheckpointManager(tmp_path / "ckpt", save_interval_steps=1) as mgr:
    mgr.save(7, state, extra={"element": 56})
    mgr.wait_until_finished()
    target = train_step.create_train_state(variables, tx)
    restored, extra = mgr.restore(target_state=target)
  _assert_trees_equal(restored, state)
  assert extra == {"element": 56}
  params, constants = checkpoint.restore_params(tmp_path / "ckpt")
  _assert_trees_equal(params, state.params)
  _assert_trees_equal(constants, state.constants)


def test_a_checkpoint_without_the_memory_field_resumes_with_a_fresh_memory(tmp_path, caplog):
  """Checkpoints written before TrainState had ``memory`` restore into today's state (the
  memory as the target gives it, with a warning) and are not taken for damaged ones."""
  import flax  # pylint: disable=import-outside-toplevel

  @flax.struct.dataclass
  class EarlierTrainState:  # TrainState before the pair loss's memory
    step: jax.Array
    params: dict
    constants: dict
    opt_state: tuple

  state = _tiny_state(3)
  earlier = EarlierTrainState(step=state.step, params=state.params, constants=state.constants,
                              opt_state=state.opt_state)
  with checkpoint.CheckpointManager(tmp_path / "ckpt", save_interval_steps=1) as mgr:
    mgr.save(3, earlier)
  fresh = {"pair_memory": {"cursor": jnp.array(0, jnp.int32), "valid": jnp.zeros((2, 3), bool)}}
  target = _tiny_state(0).replace(memory=fresh)
  with checkpoint.CheckpointManager(tmp_path / "ckpt", save_interval_steps=1) as mgr:
    restored, _, step = mgr.restore_latest_intact(target)
  assert step == 3 and "has no ['memory']" in caplog.text
  _assert_trees_equal(restored, state.replace(memory=fresh))
  # A state with a memory round-trips it.
  written = state.replace(memory={"pair_memory": {"cursor": jnp.array(1, jnp.int32),
                                                  "valid": jnp.ones((2, 3), bool)}})
  with checkpoint.CheckpointManager(tmp_path / "ckpt2", save_interval_steps=1) as mgr:
    mgr.save(3, written)
    mgr.wait_until_finished()
    _assert_trees_equal(mgr.restore(target_state=target)[0], written)
