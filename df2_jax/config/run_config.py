"""The config a run was trained with, kept beside its checkpoints.

Every training start writes ``WORKDIR/config.json`` (atomically): the config file, the
``--config.a.b=v`` overrides and the whole resolved config as JSON. Every checkpoint's
``extra`` JSON carries the resolved config too (``CONFIG_KEY``), so a checkpoint folder copied
elsewhere still says what made it.

``saved_config(path)`` reads the config a checkpoint was saved with back (``config_from_json``):
a config saved by an earlier version lacks the fields added since, and ``upgrade`` completes it
with the values that reproduce what that version did (``UPGRADES``), the one place that knows
them; the code reads every field directly.

When a workdir's checkpoints do not fit the config given (another model's shapes or another
optimizer's state), the run is refused with one line that names the run's config and the
fields that differ (``mismatch_line``): the checkpoints are not damaged and nothing is moved.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from typing import Any, Callable, Mapping

import ml_collections

from data_pipeline import spec
from df2_jax import checkpoint, files
from df2_jax.errors import Df2Error

log = logging.getLogger(__name__)

FILE = "config.json"
CONFIG_KEY = "config"

# Fields added after configs were first saved with runs (2026-12-05), with the value that
# reproduces what the code did before each existed; ``upgrade`` fills them into older configs.
# A new field gets its entry here (tests/config/test_saved.py completes the oldest saved config).
UPGRADES: dict[str, Any] = {
    "data.pair_sampling": "matching",     # one maximum matching per epoch
    "eval.allow_skipped": False,          # dropped validation items refused the evaluation
    "model.box_loss_beta": 0.0,           # L1 box regression
    "model.rpn_box_loss_beta": 0.0,
    "model.mask_binary_targets": False,   # soft mask targets
}
# Fields that retrieval indexes built before configs were saved with runs may lack (an index's
# manifest holds its config since the tool's first version), with their values then.
# Configs saved before dataset specs (issue 34) trained DeepFashion2's taxonomy.
UPGRADES.update({
    **{f"data.spec.{k}": v for k, v in spec.DEEPFASHION2.to_dict().items()},
    "data.spec_file": "",
})
UPGRADES.update({
    "data.bucket_canvases": (),           # one canvas for every image
    "data.category_batches": False,
    "data.input_workers": 0,
    "train.undecayed_modules": (),
})


class NoSavedConfig(Df2Error):
  """A checkpoint saved without its config (a run of an earlier version): the caller must give
  the config it was trained with."""

  exit_code = 2


class RunMismatch(Df2Error, ValueError):
  """The config does not fit the checkpoints it was pointed at; ``str`` is one line."""

  exit_code = 2


def as_dict(config) -> dict[str, Any]:
  """A config (ml_collections or a plain mapping) as plain JSON data."""
  if hasattr(config, "to_json_best_effort"):
    return json.loads(config.to_json_best_effort())
  return json.loads(json.dumps(config, default=str))


def record(config, origin: Mapping[str, Any] | None = None) -> dict[str, Any]:
  """What ``config.json`` holds: ``{"config_file", "overrides", "config", "written"}``."""
  origin = dict(origin or {})
  return {"config_file": origin.get("config_file"),
          "overrides": list(origin.get("overrides", [])),
          "config": as_dict(config),
          "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write(workdir: str, config, origin: Mapping[str, Any] | None = None) -> None:
  """Writes ``workdir/config.json`` atomically; logs the fields that changed since the last
  start (a resume with new ``num_steps``, say)."""
  path = os.path.join(workdir, FILE)
  previous = read(workdir)
  new = record(config, origin)
  if previous is not None:
    changed = differences(previous.get("config", {}), new["config"])
    if changed:
      log.info("Config changed since the last start in %s: %s", workdir, "; ".join(changed))
  files.write_json(path, new, indent=1, sort_keys=True)


def read(workdir: str) -> dict[str, Any] | None:
  """``workdir/config.json`` as written by ``write``, or None (absent or unreadable)."""
  path = os.path.join(workdir, FILE)
  if not os.path.exists(path):
    return None
  try:
    data = files.read_json(path, "the run's config")
  except (OSError, ValueError) as e:
    log.warning("%s", e)
    return None
  return data if isinstance(data, dict) and isinstance(data.get("config"), dict) else None


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
  return {prefix: tree}


def differences(run: Mapping[str, Any], given: Mapping[str, Any],
                sections: tuple[str, ...] = ()) -> list[str]:
  """``"model.width 16 (run) vs 8"`` for each field whose value differs (only under
  ``sections`` when given)."""
  a, b = _flat(dict(run)), _flat(dict(given))
  keep = lambda k: not sections or any(k == s or k.startswith(s + ".") for s in sections)
  out = []
  for k in sorted(set(a) | set(b)):
    if not keep(k):
      continue
    if k not in a:
      out.append(f"{k} absent (run) vs {b[k]!r}")
    elif k not in b:
      out.append(f"{k} {a[k]!r} (run) vs absent")
    elif a[k] != b[k] and not (isinstance(a[k], list) and isinstance(b[k], list)
                               and [str(x) for x in a[k]] == [str(x) for x in b[k]]):
      out.append(f"{k} {a[k]!r} (run) vs {b[k]!r}")
  return out


def describe(stored: Mapping[str, Any] | None) -> str:
  """How to name the run's config in a message: its file and overrides, when known."""
  if not stored:
    return "an unknown config (no config.json: a workdir of an earlier version)"
  name = stored.get("config_file") or "a config given from Python"
  overrides = " ".join(stored.get("overrides") or [])
  return f"{name}{' ' + overrides if overrides else ''}"


def mismatch_line(what: str, stored: Mapping[str, Any] | None, config,
                  shape_differences: list[str]) -> str:
  """One line: ``what`` (a workdir or checkpoint folder) was made by another config."""
  fields = []
  if stored and isinstance(stored.get("config"), dict):
    given = as_dict(config)
    fields = (differences(stored["config"], given, ("model",))
              or differences(stored["config"], given, ("train", "data")))
  detail = ("; it differs in " + ", ".join(fields[:4]) + (f" and {len(fields) - 4} more"
                                                          if len(fields) > 4 else "")
            if fields else "")
  first = shape_differences[0] if shape_differences else ""
  return (f"{what} holds checkpoints of another config: {describe(stored)}{detail} "
          f"({len(shape_differences)} arrays do not fit, e.g. {first}). Nothing was changed: "
          f"rerun with that config, or use another --workdir.")


def stored_for(checkpoint_dir: str, extra: Mapping[str, Any] | None,
               workdir: str | None = None) -> dict[str, Any] | None:
  """The run's config record for a checkpoint: ``workdir/config.json`` when the checkpoint
  is the workdir's, else the ``config`` of its ``extra`` JSON (no file name then)."""
  if workdir:
    stored = read(workdir)
    if stored is not None:
      return stored
  if extra and isinstance(extra.get(CONFIG_KEY), dict):
    return {"config_file": extra.get("config_file") or f"the config saved in {checkpoint_dir}",
            "overrides": extra.get("overrides") or [], "config": extra[CONFIG_KEY]}
  parent = os.path.dirname(os.path.abspath(checkpoint_dir))
  return read(parent)


def _tuples(value: Any) -> Any:
  """JSON data with every list a tuple (the config files' sequences are tuples)."""
  if isinstance(value, Mapping):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def upgrade(data: Mapping[str, Any]) -> dict[str, Any]:
  """A saved config's JSON data completed with the fields it lacks (``UPGRADES``); the fields
  it has are kept as they are. A field that neither it nor ``UPGRADES`` has is left missing
  (``rules.validate`` then names it)."""
  data = copy.deepcopy(dict(data))
  for path, value in UPGRADES.items():
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
      if key not in node and node is not data:  # a section added since (e.g. data.spec)
        node[key] = {}
      if not isinstance(node.get(key), dict):
        break
      node = node[key]
    else:
      node.setdefault(leaf, copy.deepcopy(value))
  return data


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as JSON (``as_dict``, by this or an earlier version) as a ``ConfigDict``,
  completed by ``upgrade``, its sequences tuples as in the config files."""
  return ml_collections.ConfigDict(_tuples(upgrade(data)))


def saved_config(path: str | os.PathLike, step: int | None = None, *,
                 steps_of: Callable[[str], list[int]] = checkpoint.saved_steps
                 ) -> tuple[ml_collections.ConfigDict, str, int]:
  """(config, checkpoint directory, step) of ``path`` (``checkpoint.find_step``: a training
  workdir, a checkpoint directory or one step's folder; the latest step unless ``step``): the
  config the run saved with that checkpoint (its ``extra`` record, else the workdir's
  ``config.json``: ``stored_for``), upgraded.

  Raises:
    checkpoint.NoCheckpoint: no such folder, checkpoint or step.
    NoSavedConfig: the checkpoint was saved without its config (a run of an earlier version).
  """
  directory, step = checkpoint.find_step(path, step, steps_of=steps_of)
  stored = stored_for(directory, checkpoint.read_extra(directory, step))
  if stored is None:
    raise NoSavedConfig(f"checkpoint step {step} in {directory} has no saved config (a run of "
                        f"an earlier version): pass the config it was trained with")
  return config_from_json(stored["config"]), directory, step
