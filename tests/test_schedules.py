"""detectron2's WarmupMultiStepLR on the DeepFashion2 training set, checked by hand."""

import numpy as np
import pytest

from df2_jax import schedules

# An epoch of the DeepFashion2 training split: its 191,961 images in elements of two.
NUM_ELEMENTS = 95_981
BATCH_PAIRS = 8


# optax evaluates the warm-up line in float32 as (init - end) * frac + end, so values carry an
# absolute error of about one float32 ulp of base_lr (0.02 -> 1.9e-9).
TOL = dict(rtol=1e-6, atol=2e-9)


def _lr(schedule, step):
  return float(schedule(step))


def test_steps_per_epoch_rounds_up():
  # 95981 / 8 = 11997.625 -> 11998 steps, the last one a partial batch.
  assert schedules.steps_per_epoch(NUM_ELEMENTS, BATCH_PAIRS) == 11_998
  assert schedules.steps_per_epoch(16, 8) == 2
  assert schedules.steps_per_epoch(17, 8) == 3
  with pytest.raises(ValueError):
    schedules.steps_per_epoch(10, 0)


def test_step_decay_on_deepfashion2():
  spe = schedules.steps_per_epoch(NUM_ELEMENTS, BATCH_PAIRS)
  lr = schedules.step_decay_schedule(0.02, spe)
  # Warm-up: 0.02 * 0.001 at step 0; at step 500 the factor is 0.001 * 0.5 + 0.5 = 0.5005.
  np.testing.assert_allclose(_lr(lr, 0), 2e-5, **TOL)
  np.testing.assert_allclose(_lr(lr, 500), 0.02 * 0.5005, **TOL)
  np.testing.assert_allclose(_lr(lr, 999), 0.02 * (0.001 * 0.001 + 0.999), **TOL)
  np.testing.assert_allclose(_lr(lr, 1000), 0.02, **TOL)
  np.testing.assert_allclose(_lr(lr, 5000), 0.02, **TOL)
  # Decays at the first step of epoch 8 (8 * 11998 = 95984) and epoch 11 (131978).
  b8, b11 = 95_984, 131_978
  np.testing.assert_allclose(_lr(lr, b8 - 1), 0.02, **TOL)
  np.testing.assert_allclose(_lr(lr, b8), 0.002, **TOL)
  np.testing.assert_allclose(_lr(lr, b11 - 1), 0.002, **TOL)
  np.testing.assert_allclose(_lr(lr, b11), 0.0002, **TOL)
  # After: the end of the 12-epoch schedule and beyond.
  np.testing.assert_allclose(_lr(lr, 12 * spe - 1), 0.0002, **TOL)
  np.testing.assert_allclose(_lr(lr, 20 * spe), 0.0002, **TOL)


def test_schedule_works_on_traced_step_counts():
  import jax
  import jax.numpy as jnp
  lr = schedules.step_decay_schedule(0.02, 100, warmup_steps=10)
  got = jax.jit(jax.vmap(lr))(jnp.array([0, 5, 10, 799, 800, 1099, 1100], jnp.int32))
  want = [2e-5, 0.02 * (0.0005 + 0.5), 0.02, 0.02, 0.002, 0.002, 0.0002]
  np.testing.assert_allclose(np.asarray(got), want, **TOL)


def test_decay_inside_warmup_multiplies_the_ramp():
  """detectron2 multiplies both factors: boundaries at 100, 200 with a 1000-step warm-up."""
  lr = schedules.step_decay_schedule(1.0, 100, decay_epochs=(1, 2), warmup_steps=1000,
                                     warmup_factor=0.0)
  for step in (0, 50, 99, 100, 150, 199, 200, 999, 1000, 1500):
    want = min(step / 1000, 1.0) * 0.1 ** ((step >= 100) + (step >= 200))
    np.testing.assert_allclose(_lr(lr, step), want, rtol=1e-6, atol=1e-9)


def test_no_warmup_is_a_step_function():
  lr = schedules.step_decay_schedule(0.01, 10, decay_epochs=(1,), warmup_steps=0)
  assert [round(_lr(lr, s), 9) for s in (0, 9, 10, 11)] == [0.01, 0.01, 0.001, 0.001]


def test_linear_scaling_rule():
  assert schedules.scaled_lr(16) == pytest.approx(0.02)  # 8 pairs = 16 images
  assert schedules.scaled_lr(8) == pytest.approx(0.01)
  assert schedules.scaled_lr(64) == pytest.approx(0.08)
  assert schedules.scaled_lr(4, base_lr=0.01, base_batch_images=8) == pytest.approx(0.005)
  with pytest.raises(TypeError):
    schedules.scaled_lr(0.02, 16, 16)  # pylint: disable=too-many-function-args


def test_undecayed_modules_keep_the_base_learning_rate():
  """SGD without momentum or decay: each update is -lr * grad; after the step decay the
  modules named ``undecayed`` still move by the base rate, the others by a tenth."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from df2_jax import train_step  # pylint: disable=import-outside-toplevel
  params = {"box_head": {"w": jnp.zeros(2)}, "matching_head": {"w": jnp.zeros(2)},
            "scorer": {"kernel": jnp.zeros(2)}}
  grads = {k: {n: jnp.ones(2) for n in v} for k, v in params.items()}
  decayed = schedules.step_decay_schedule(1.0, 10, (1,), 0.1, 0, 1.0)
  undecayed = schedules.step_decay_schedule(1.0, 10, (), 0.1, 0, 1.0)
  tx = train_step.make_optimizer(decayed, params, momentum=0.0, weight_decay=0.0,
                                 undecayed=("matching_head", "scorer"),
                                 undecayed_learning_rate=undecayed)
  state = tx.init(params)
  moves = []
  for _ in range(12):
    updates, state = tx.update(grads, state, params)
    moves.append({k: float(v[next(iter(v))][0]) for k, v in updates.items()})
  np.testing.assert_allclose([m["box_head"] for m in moves], [-1.0] * 10 + [-0.1] * 2)
  np.testing.assert_allclose([m["matching_head"] for m in moves], [-1.0] * 12)
  np.testing.assert_allclose([m["scorer"] for m in moves], [-1.0] * 12)
  with pytest.raises(ValueError, match="matching"):
    train_step.make_optimizer(decayed, params, undecayed=("matching",))
