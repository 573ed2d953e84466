"""The training state, the optimizer and the jitted train step.

The step is one pure function: ``model.apply`` -> weighted loss -> gradients -> optax update.
It is compiled once for the batch shapes of a config (static canvas, instance count and RoI
counts) and takes a fresh sampling key per step by folding the step number into a base key.
Frozen BatchNorm statistics live in the "constants" collection and are never differentiated;
frozen backbone stages are kept out of the update by an optimizer mask. The "memory" collection
(the pair loss's stored items, ``matching.PairMemory``; empty unless
``match_memory_steps`` > 0) is state too: read and rewritten by every step, checkpointed with
the rest, never differentiated.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from df2_jax.models import losses as loss_lib
from df2_jax.models.match_rcnn import MatchRCNN
from df2_jax.models.resnet import frozen_param_mask


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  constants: Any
  opt_state: Any
  memory: Any = flax.struct.field(default_factory=dict)


OPTIMIZERS = ("sgd", "adamw")  # config.train.optimizer


def make_optimizer(learning_rate: float | optax.Schedule, params: Any, *,
                   momentum: float = 0.9, weight_decay: float = 1e-4, freeze_at: int = 0,
                   optimizer: str = "sgd", undecayed: tuple[str, ...] = (),
                   undecayed_learning_rate: float | optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
  """The optimizer; frozen backbone stages get no update.

  "sgd": SGD with momentum and weight decay added to the gradient (detectron2's recipe, the
  paper's). "adamw": AdamW (decoupled weight decay), for small models trained from scratch,
  such as the synthetic demo, where plain SGD needs a long warm-up. The top-level modules named
  in ``undecayed`` (e.g. "matching_head") follow ``undecayed_learning_rate`` instead (the same
  optimizer, another schedule: e.g. one without the step decay).
  """
  def base(lr):
    if optimizer == "sgd":
      return optax.chain(optax.add_decayed_weights(weight_decay),
                         optax.sgd(lr, momentum=momentum))
    if optimizer == "adamw":
      return optax.adamw(lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer={optimizer!r}: expected one of {OPTIMIZERS}")

  unknown = sorted(set(undecayed) - set(params))
  if unknown:
    raise ValueError(f"undecayed modules {unknown} are not top-level parameter modules "
                     f"{sorted(params)}")
  frozen = frozen_param_mask(params, freeze_at)
  labels = {name: jax.tree_util.tree_map(
      lambda f, name=name: "frozen" if f else ("undecayed" if name in undecayed else "train"),
      frozen[name]) for name in params}
  transforms = {"train": base(learning_rate), "frozen": optax.set_to_zero()}
  if undecayed:
    transforms["undecayed"] = base(learning_rate if undecayed_learning_rate is None
                                   else undecayed_learning_rate)
  return optax.multi_transform(transforms, labels)


def create_train_state(variables: Mapping[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    constants=variables.get("constants", {}), opt_state=tx.init(params),
                    memory=variables.get("memory", {}))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], base_key: jax.Array, *,
               model: MatchRCNN, tx: optax.GradientTransformation,
               loss_weights: Mapping[str, float]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step. Returns the new state and float32 metrics (terms, loss, grad_norm)."""
  key = jax.random.fold_in(base_key, state.step)

  def loss_fn(params):
    variables = {"params": params, "constants": state.constants}
    if state.memory:
      variables["memory"] = state.memory
    terms, mutated = model.apply(variables, batch, rngs={"sampling": key},
                                 method=MatchRCNN.losses, mutable=["memory"])
    total, terms = loss_lib.total_loss(terms, loss_weights)
    return total, (terms, mutated.get("memory", state.memory))

  (total, (terms, memory)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(terms, loss=total, grad_norm=optax.global_norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            memory=memory)
  return new_state, metrics


def make_train_step(model: MatchRCNN, tx: optax.GradientTransformation,
                    loss_weights: Mapping[str, float], **jit_kwargs
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, batch, base_key) -> (state, metrics)``, jitted, the state donated."""
  fn = functools.partial(train_step, model=model, tx=tx, loss_weights=dict(loss_weights))
  return jax.jit(fn, donate_argnums=(0,), **jit_kwargs)
