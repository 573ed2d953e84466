"""The training state, the optimizer and the jitted train step.

The step is one pure function: ``model.apply`` -> weighted loss -> gradients -> optax update.
It is compiled once for the batch shapes of a config (static canvas, instance count and RoI
counts) and takes a fresh sampling key per step by folding the step number into a base key.
Frozen BatchNorm statistics live in the "constants" collection and are never differentiated;
frozen backbone stages are kept out of the update by an optimizer mask.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax

from df2_jax import losses as loss_lib
from df2_jax.models.match_rcnn import MatchRCNN
from df2_jax.models.resnet import frozen_param_mask


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  constants: Any
  opt_state: Any


def make_optimizer(learning_rate: float | optax.Schedule, params: Any, *,
                   momentum: float = 0.9, weight_decay: float = 1e-4, freeze_at: int = 0,
                   optimizer: str = "sgd") -> optax.GradientTransformation:
  """The optimizer; frozen backbone stages get no update.

  "sgd": SGD with momentum and weight decay added to the gradient (detectron2's recipe, the
  paper's). "adamw": AdamW (decoupled weight decay), for small models trained from scratch,
  such as the synthetic demo, where plain SGD needs a long warm-up.
  """
  if optimizer == "sgd":
    tx = optax.chain(optax.add_decayed_weights(weight_decay),
                     optax.sgd(learning_rate, momentum=momentum))
  elif optimizer == "adamw":
    tx = optax.adamw(learning_rate, weight_decay=weight_decay)
  else:
    raise ValueError(f"optimizer={optimizer!r}: expected 'sgd' or 'adamw'")
  frozen = frozen_param_mask(params, freeze_at)
  labels = jax.tree_util.tree_map(lambda f: "frozen" if f else "train", frozen)
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def create_train_state(variables: Mapping[str, Any],
                       tx: optax.GradientTransformation) -> TrainState:
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    constants=variables.get("constants", {}), opt_state=tx.init(params))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], base_key: jax.Array, *,
               model: MatchRCNN, tx: optax.GradientTransformation,
               loss_weights: Mapping[str, float]) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step. Returns the new state and float32 metrics (terms, loss, grad_norm)."""
  key = jax.random.fold_in(base_key, state.step)

  def loss_fn(params):
    terms = model.apply({"params": params, "constants": state.constants}, batch,
                        rngs={"sampling": key}, method=MatchRCNN.losses)
    total, terms = loss_lib.total_loss(terms, loss_weights)
    return total, terms

  (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(terms, loss=total, grad_norm=optax.global_norm(grads))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  return new_state, metrics


def make_train_step(model: MatchRCNN, tx: optax.GradientTransformation,
                    loss_weights: Mapping[str, float], **jit_kwargs
                    ) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """``step(state, batch, base_key) -> (state, metrics)``, jitted, the state donated."""
  fn = functools.partial(train_step, model=model, tx=tx, loss_weights=dict(loss_weights))
  return jax.jit(fn, donate_argnums=(0,), **jit_kwargs)
