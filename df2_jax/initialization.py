"""The variables a fresh training run starts from.

In this order (each step optional but the first):

1. a random initialisation of the whole model (``init_variables``, from ``config.seed``);
2. ``config.model.backbone_weights``: an ImageNet ResNet-50 (torchvision's names, ``.pth`` or
   ``.safetensors``; ``models.pretrained``) replaces the ResNet's params and frozen-BN
   constants, every tensor checked;
3. ``config.model.init_from``: another run's checkpoint (``init_from_step``, -1 the latest);
   its params and constants replace ours wherever the name and shape agree (fine-tuning, or a
   warm start from a detection-only model), and one log line lists what was not loaded. From
   a run of another taxonomy (its saved config's ``data.spec`` has other categories or
   landmarks: fine-tuning a DeepFashion2 run on one's own set) the class- and landmark-sized
   layers (``TAXONOMY_LAYERS``) start fresh even where their shapes happen to agree, and a log
   line lists them.

A resumed run reads its own checkpoint and none of these files. ``check_weight_files`` runs before
anything slow (data scan, compilation): a recipe whose backbone cannot learn from a random
start (frozen BatchNorm and frozen stages) and has no weights to load fails there.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np

from df2_jax import checkpoint as ckpt_lib
from df2_jax.errors import ConfigError
from df2_jax.models import pretrained

log = logging.getLogger(__name__)

RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


def check_weight_files(config) -> None:
  """Fails at start on initialisation settings that cannot work (a fresh run only).

  Raises:
    ConfigError: the ResNet has frozen BatchNorm and frozen stages (``norm="FrozenBN"``,
      ``freeze_at >= 1``) and nothing to load into them (with BN frozen at the identity and
      the stem frozen at random values the backbone cannot learn; the message says what to
      pass), or a weights file or checkpoint directory that does not exist.
  """
  m = config.model
  weights, init_from = str(m.backbone_weights), str(m.init_from)
  if not weights and not init_from and m.norm == "FrozenBN" and int(m.freeze_at) >= 1:
    raise ConfigError(
        f"config.model.backbone_weights is empty, but this recipe freezes BatchNorm and the "
        f"first {m.freeze_at} ResNet stage(s) (norm=FrozenBN, freeze_at={m.freeze_at}): a "
        f"random backbone cannot learn that way. Download torchvision's ImageNet ResNet-50 "
        f"({RESNET50_URL}) and pass --config.model.backbone_weights=/path/to/"
        f"resnet50-0676ba61.pth (or a .safetensors file with the same names), or warm-start "
        f"from a checkpoint with --config.model.init_from=DIR. To train from scratch instead, "
        f"unfreeze it: --config.model.freeze_at=0 --config.model.norm=GN.")
  if weights and not os.path.isfile(weights):
    raise ConfigError(f"config.model.backbone_weights: no such file: {weights}")
  if init_from and "://" not in init_from and not os.path.isdir(init_from):
    raise ConfigError(f"config.model.init_from: no such directory: {init_from}")


def _paths(tree: Any) -> dict[str, Any]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {"/".join(str(getattr(k, "key", k)) for k in path): leaf for path, leaf in flat}


def _checkpoint_directory(path: str) -> str:
  """``path`` itself, or ``path/checkpoints`` when ``path`` is a run's workdir."""
  inner = os.path.join(path, "checkpoints")
  if "://" not in path and os.path.isdir(inner) and not any(
      name.isdigit() for name in os.listdir(path)):
    return inner
  return path


def warm_start(variables: dict[str, Any], directory: str, step: int | None = None, *,
               reinit: tuple[str, ...] = ()) -> dict[str, Any]:
  """``variables`` with every array of a checkpoint's params and constants whose path and
  shape agree with ours, but those under a ``reinit`` prefix; the rest keep their values. Logs
  what was and was not loaded.

  Args:
    variables: {"params", "constants"} of the model being trained.
    directory: a checkpoint directory (``WORKDIR/checkpoints``, ``WORKDIR/best``) or a workdir.
    step: the checkpoint step; None for the latest.
    reinit: path prefixes (e.g. ``TAXONOMY_LAYERS``) whose arrays keep their fresh values.

  Raises:
    ValueError: when not a single array matches (the wrong model or directory).
  """
  directory = _checkpoint_directory(directory)
  params, constants = ckpt_lib.restore_params(directory, step)
  theirs = _paths({"params": params, "constants": constants})
  loaded, fresh, mismatched, renewed = 0, [], [], []

  def take(path, leaf):
    nonlocal loaded
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    if any(name.startswith(p + "/") for p in reinit):
      renewed.append(name)
      return leaf
    value = theirs.get(name)
    if value is None:
      fresh.append(name)
      return leaf
    if tuple(np.shape(value)) != tuple(np.shape(leaf)):
      mismatched.append(f"{name} {tuple(np.shape(value))} vs ours {tuple(np.shape(leaf))}")
      return leaf
    loaded += 1
    return np.asarray(value, leaf.dtype)

  out = jax.tree_util.tree_map_with_path(take, dict(variables))
  ours = set(_paths(variables))
  unused = sorted(set(theirs) - ours)
  if not loaded:
    raise ConfigError(f"config.model.init_from={directory}: none of its {len(theirs)} arrays "
                     f"matches this model's names and shapes (e.g. ours: "
                     f"{sorted(ours)[:3]}, theirs: {sorted(theirs)[:3]})")
  short = lambda names: ", ".join(names[:20]) + (f" ... ({len(names)} in all)"
                                                  if len(names) > 20 else "")
  log.info("Warm start from %s: loaded %d of our %d arrays; initialised fresh: %s; "
           "shape differs (fresh): %s; in the checkpoint but not in this model: %s.",
           directory, loaded, len(ours), short(fresh) or "none",
           short(mismatched) or "none", short(unused) or "none")
  if renewed:
    log.info("Re-initialised for the new taxonomy (not loaded): %s.", ", ".join(renewed))
  return out


# The layers whose outputs are the taxonomy's: one per class (scores, per-class box deltas and
# masks) or per landmark. Fine-tuning across taxonomies re-initialises them.
TAXONOMY_LAYERS = ("params/box_head/cls_score", "params/box_head/bbox_pred",
                   "params/mask_head/predictor", "params/landmark_head/score_lowres")


def _source_spec(directory: str, step: int | None):
  """The dataset spec of the run ``directory`` holds (its saved config), or None when it has
  none (a run of an earlier version: then only shapes decide)."""
  from data_pipeline import spec as spec_lib
  from df2_jax.config import run_config
  try:
    config, _, _ = run_config.saved_config(directory, step)
  except run_config.NoSavedConfig:
    return None
  return spec_lib.from_config(config)


def initial_variables(config, variables: dict[str, Any]) -> dict[str, Any]:
  """Applies ``backbone_weights`` then ``init_from`` of ``config.model`` to a fresh model's
  ``variables`` ({"params", "constants"}).

  ``variables`` may be abstract (``jax.ShapeDtypeStruct`` leaves, from ``jax.eval_shape`` of
  the initialisation): every file is then read and checked against the model's names and
  shapes in seconds, before anything is compiled, and the result holds numpy arrays where
  something was loaded and the abstract leaves elsewhere (see ``fill``).
  """
  m = config.model
  if m.backbone_weights:
    variables = pretrained.load_backbone_weights(variables, str(m.backbone_weights))
  if m.init_from:
    from data_pipeline import spec as spec_lib
    step = None if int(m.init_from_step) < 0 else int(m.init_from_step)
    theirs, ours = _source_spec(str(m.init_from), step), spec_lib.from_config(config)
    reinit = ()
    if theirs is not None and (theirs.categories != ours.categories):
      reinit = TAXONOMY_LAYERS
      log.info("Fine-tuning across taxonomies: %s -> %s; the class- and landmark-sized layers "
               "start fresh.", theirs.describe(), ours.describe())
    variables = warm_start(variables, str(m.init_from), step, reinit=reinit)
  return variables


def fill(loaded: dict[str, Any], variables: dict[str, Any]) -> dict[str, Any]:
  """``loaded``'s arrays, with each abstract leaf replaced by ``variables``' value there."""
  return jax.tree_util.tree_map(
      lambda l, v: v if isinstance(l, jax.ShapeDtypeStruct) else l, loaded, variables)
