"""Checkpoints of the training state: a thin wrapper over orbax's ``CheckpointManager``.

Each saved step is a directory ``<directory>/<step>/`` with two items:

* ``state``: the ``TrainState`` pytree (step, params, constants, opt_state, memory), written with
  orbax's PyTree handler (tensorstore, one file set per array; sharded arrays are written by
  the processes that own them).
* ``extra``: a small JSON dict for everything that is not an array: the step and the run's
  config (``config_file``, ``overrides`` and the resolved ``config``: ``config.run_config``).

orbax writes each step into a temporary directory and renames it when complete, saves
asynchronously (training continues while the arrays are written), saves only every
``save_interval_steps`` and keeps the ``max_to_keep`` newest steps. Rerunning with the same
directory resumes from ``latest_step()``.

Once a step is on disk, ``<step>/checksums.json`` records the CRC-32 and size of each of its
files (process 0 writes it, atomically); restoring verifies them, and a step whose bytes
changed counts as damaged (``ChecksumError``) instead of loading silently. Steps without the
file (an earlier version's, or a run killed between the save and the checksums) are restored
unverified with a warning.

A state whose shapes or structure differ from the target's (another config's run) is not
damage: ``ConfigMismatch`` is raised before anything is restored or moved.
"""

from __future__ import annotations

import logging
import os
import zlib
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from df2_jax import files, parallel
from df2_jax.errors import Df2Error

log = logging.getLogger(__name__)

STATE = "state"
EXTRA = "extra"
_ITEMS = (STATE, EXTRA)
# TrainState fields that checkpoints of earlier versions lack: restored as the target gives them
# (a fresh value) instead of failing, so that a run resumes across the upgrade.
FRESH_IF_ABSENT = ("memory",)
CHECKSUMS = "checksums.json"
# Files orbax may rewrite after a step is final (timestamps): not checksummed.
_UNCHECKED = (CHECKSUMS, "_CHECKPOINT_METADATA")


class NoCheckpoint(Df2Error, FileNotFoundError):
  """No checkpoint where one was asked for: no such folder, no step in it, not that step."""


class ChecksumError(Df2Error, IOError):
  """A checkpoint file's bytes differ from those recorded when it was saved."""


class ConfigMismatch(Df2Error, ValueError):
  """A checkpoint's arrays do not have the shapes or structure the config makes: a checkpoint
  of another config, not a damaged one. ``differences`` lists them (``path: saved vs
  expected``)."""

  exit_code = 2

  def __init__(self, directory: str, step: int, differences: list[str]):
    self.directory, self.step, self.differences = directory, int(step), list(differences)
    shown = "; ".join(differences[:3]) + (f"; and {len(differences) - 3} more"
                                          if len(differences) > 3 else "")
    super().__init__(f"checkpoint step {step} in {directory} does not fit this config "
                     f"({len(differences)} differences: {shown})")


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def _step_files(step_dir: str) -> list[str]:
  """The files of a step directory, relative to it, sorted (checksums and orbax's
  checkpoint metadata excepted)."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel not in _UNCHECKED and not name.endswith(".tmp"):
        out.append(rel)
  return sorted(out)


def write_checksums(step_dir: str) -> None:
  """Records the CRC-32 and size of every file of a saved step (``checksums.json``)."""
  sums = {rel: {"crc32": _crc32(os.path.join(step_dir, rel)),
                "bytes": os.path.getsize(os.path.join(step_dir, rel))}
          for rel in _step_files(step_dir)}
  files.write_json(os.path.join(step_dir, CHECKSUMS), {"algorithm": "crc32", "files": sums},
                   indent=0)


def verify_checksums(step_dir: str) -> bool:
  """Checks a step's files against its ``checksums.json``.

  Returns False when the step has no checksums (nothing to verify).

  Raises:
    ChecksumError: a recorded file is missing, has another size or another CRC-32.
  """
  path = os.path.join(step_dir, CHECKSUMS)
  if "://" in step_dir or not os.path.exists(path):
    return False
  try:
    recorded = files.read_json(path, "checkpoint checksums")["files"]
  except (ValueError, KeyError, TypeError) as e:
    raise ChecksumError(f"{path} is unreadable: {e}") from None
  for rel, want in sorted(recorded.items()):
    full = os.path.join(step_dir, rel)
    if not os.path.exists(full):
      raise ChecksumError(f"{full} is missing (recorded at save time)")
    size = os.path.getsize(full)
    if size != want["bytes"]:
      raise ChecksumError(f"{full} has {size} bytes, {want['bytes']} when saved")
    if _crc32(full) != want["crc32"]:
      raise ChecksumError(f"{full} has changed since it was saved (CRC-32 mismatch)")
  return True


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def array_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{orbax parameter name ("params.backbone.conv1.kernel"): shape}`` of a state's array
  leaves (arrays, ShapeDtypeStructs or orbax ArrayMetadata)."""
  is_leaf = lambda x: hasattr(x, "shape") and not isinstance(x, dict)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
    if hasattr(leaf, "shape"):
      out[".".join(_key_name(k) for k in path)] = tuple(int(d) for d in leaf.shape)
  return out


def shape_differences(saved: Mapping[str, tuple], expected: Mapping[str, tuple],
                      ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
  """What separates two ``{name: shape}`` maps, one line each."""
  keep = lambda k: not any(k == p or k.startswith(p + ".") for p in ignore_prefixes)
  out = []
  for k in sorted(set(saved) | set(expected)):
    if not keep(k):
      continue
    if k not in expected:
      out.append(f"{k} {saved[k]} saved, not in this config's model")
    elif k not in saved:
      out.append(f"{k} {expected[k]} in this config's model, not saved")
    elif saved[k] != expected[k]:
      out.append(f"{k} saved {saved[k]}, this config makes {expected[k]}")
  return out


def _resolve(directory: str | os.PathLike) -> str:
  """An absolute path for a local directory (orbax's array writer rejects relative ones, so
  ``--workdir runs/demo`` would fail at the first save); URLs such as ``gs://`` unchanged."""
  directory = os.fspath(directory)
  return directory if "://" in directory else os.path.abspath(directory)


def _handlers() -> dict[str, Any]:
  return {STATE: ocp.PyTreeCheckpointHandler(), EXTRA: ocp.JsonCheckpointHandler()}


def _field_names(state: Any) -> tuple[str, ...]:
  """The field names of a dataclass state (``TrainState``); () for other pytrees."""
  fields = getattr(state, "__dataclass_fields__", None)
  return tuple(fields) if fields else ()


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs (with the shardings of jax.Arrays) describing ``tree``."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)


class CheckpointManager:
  """Saves and restores ``(TrainState, extra JSON)`` under one directory.

  Args:
    directory: where the step directories live (created if missing; a local path, relative
      ones resolved against the working directory, or any URL orbax/etils accepts, e.g.
      ``gs://``).
    save_interval_steps: ``save`` writes only steps that are multiples of this (``force=True``
      writes any step).
    max_to_keep: how many of the newest steps to keep; None keeps all.
    async_save: write in a background thread; call ``wait_until_finished`` before reading the
      files and ``close`` at the end.
  """

  def __init__(self, directory: str | os.PathLike, save_interval_steps: int = 1,
               max_to_keep: int | None = None, async_save: bool = True):
    self.directory = _resolve(directory)
    options = ocp.CheckpointManagerOptions(save_interval_steps=save_interval_steps,
                                           max_to_keep=max_to_keep,
                                           enable_async_checkpointing=async_save,
                                           create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=_ITEMS,
                                          item_handlers=_handlers())
    self._unsummed: list[int] = []  # saved steps whose checksums are not written yet

  def _write_pending_checksums(self) -> None:
    """Checksums of the steps saved since the last call (their writes have finished)."""
    pending, self._unsummed = self._unsummed, []
    if jax.process_index() != 0 or "://" in self.directory:
      return
    steps = set(self._manager.all_steps())
    for step in pending:
      step_dir = os.path.join(self.directory, str(step))
      if step in steps and os.path.isdir(step_dir):
        write_checksums(step_dir)

  def save(self, step: int, state: Any, extra: Mapping[str, Any] | None = None, *,
           force: bool = False) -> bool:
    """Saves ``state`` (any pytree of arrays) and ``extra`` (JSON-serialisable) at ``step``.

    Returns whether a checkpoint was started (False when ``step`` is not on the interval or
    already saved). With async saving, the write finishes in the background.
    """
    args = ocp.args.Composite(**{STATE: ocp.args.PyTreeSave(state),
                                 EXTRA: ocp.args.JsonSave(dict(extra or {}))})
    if self._unsummed and (force or self._manager.should_save(int(step))):
      self._manager.wait_until_finished()  # the previous save's files are final now
      self._write_pending_checksums()
    started = bool(self._manager.save(int(step), args=args, force=force))
    if started:
      self._unsummed.append(int(step))
    return started

  def latest_step(self) -> int | None:
    """The newest saved step, or None when the directory holds no checkpoint."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """The saved steps, oldest first."""
    return sorted(self._manager.all_steps())

  def restore(self, step: int | None = None, target_state: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Reads ``(state, extra)`` of ``step`` (default: the latest).

    Args:
      step: which step; None for ``latest_step()``.
      target_state: a pytree with the structure of the saved state (e.g. a freshly created
        ``TrainState``, real or ``jax.ShapeDtypeStruct`` leaves). Leaves are restored with its
        dtypes and shardings (jax.Array leaves keep theirs; numpy leaves come back as numpy),
        and the result has its tree type. Without it the state comes back as nested dicts and
        lists of arrays placed as they were saved, which needs the same devices.

    Raises:
      NoCheckpoint: when there is no checkpoint (at ``step``).
    """
    self.wait_until_finished()
    step = self._resolve_step(step)
    self._verify(step)
    absent = []
    if target_state is None:
      state_args = ocp.args.PyTreeRestore()
    else:
      absent = self._absent_fields(step, target_state)
      self.check_fits(step, target_state, absent)
      if absent:
        log.warning("Checkpoint step %d in %s has no %s (an earlier version's checkpoint); "
                    "they start as initialised.", step, self.directory, absent)
        item = {k: getattr(target_state, k) for k in _field_names(target_state)
                if k not in absent}
      else:
        item = target_state
      abstract = _abstract(item)
      state_args = ocp.args.PyTreeRestore(
          item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract))
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{STATE: state_args, EXTRA: ocp.args.JsonRestore()}))
    state = restored[STATE]
    if target_state is not None and absent:
      state = target_state.replace(**state)
    return state, dict(restored[EXTRA] or {})

  def _verify(self, step: int) -> None:
    step_dir = os.path.join(self.directory, str(step))
    if not verify_checksums(step_dir) and "://" not in step_dir:
      log.warning("Checkpoint step %d in %s has no checksums (saved by an earlier version, or "
                  "the run stopped right after saving it): restored unverified.", step,
                  self.directory)

  def saved_shapes(self, step: int) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of the arrays saved at ``step`` (from orbax's metadata)."""
    metadata = self._manager.item_metadata(step)[STATE]
    return array_shapes(getattr(metadata, "tree", metadata))

  def check_fits(self, step: int, target_state: Any, absent: list[str] = ()) -> None:
    """Raises ``ConfigMismatch`` when step's arrays differ in name or shape from
    ``target_state``'s (the ``absent`` fields, restored fresh, are left out).

    Metadata that cannot be read is left for the restore to report as damage."""
    try:
      saved = self.saved_shapes(step)
    except Exception:  # pylint: disable=broad-except  (unreadable metadata: damage, not config)
      return
    if not saved:
      return
    differences = shape_differences(saved, array_shapes(target_state), tuple(absent))
    if differences:
      raise ConfigMismatch(self.directory, step, differences)

  def _absent_fields(self, step: int, target_state: Any) -> list[str]:
    """The ``FRESH_IF_ABSENT`` fields of ``target_state`` (a dataclass) that step lacks."""
    names = _field_names(target_state)
    if not any(k in names for k in FRESH_IF_ABSENT):
      return []
    metadata = self._manager.item_metadata(step)[STATE]
    tree = getattr(metadata, "tree", metadata)
    if not hasattr(tree, "keys"):
      return []
    return [k for k in FRESH_IF_ABSENT if k in names and k not in tree]

  def restore_latest_intact(self, target_state: Any) -> tuple[Any, dict[str, Any], int] | None:
    """``(state, extra, step)`` of the newest step that restores completely, or None when the
    directory holds no step.

    A step that fails to restore (a truncated array file or metadata, an empty or partial step
    directory) is moved aside, ``<step>`` -> ``<step>.damaged`` (renamed, never deleted; orbax
    no longer sees it), with a warning that names it and the error, and the next older step is
    tried. In a multi-process run every process tries the same steps; process 0 renames.

    Raises:
      RuntimeError: every saved step failed (they are all kept aside).
    """
    self.wait_until_finished()
    failures = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state, extra = self.restore(step, target_state)
        return state, extra, int(step)
      except ConfigMismatch:
        raise  # another config's checkpoint: refused, nothing moved
      except Exception as e:  # pylint: disable=broad-except  (any damage: tensorstore, JSON, IO)
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        aside = self._move_aside(step)
        log.warning("Checkpoint step %d in %s does not restore (%s); moved it to %s and trying "
                    "the step before.", step, self.directory, reason, aside)
        failures.append(f"{step} ({reason})")
    if failures:
      raise RuntimeError(f"No checkpoint in {self.directory} restores: {'; '.join(failures)}. "
                         f"They are kept as <step>.damaged; move them away to start afresh.")
    return None

  def _move_aside(self, step: int) -> str:
    """Renames step directory ``step`` to ``<step>.damaged`` (``.damaged.N`` if taken)."""
    source = os.path.join(self.directory, str(step))
    target = source + ".damaged"
    n = 1
    while os.path.exists(target):
      target, n = f"{source}.damaged.{n}", n + 1
    parallel.barrier(f"checkpoint_aside_name_{step}")  # every process has named it
    if jax.process_index() == 0 and os.path.exists(source):
      os.rename(source, target)
    parallel.barrier(f"checkpoint_aside_{step}")
    self._manager.reload()
    return target

  def will_save(self, step: int) -> bool:
    """Whether ``save(step)`` (without force) would write a checkpoint."""
    return bool(self._manager.should_save(int(step)))

  def read_extra(self, step: int | None = None) -> dict[str, Any]:
    """The ``extra`` JSON of ``step`` (default: the latest) without reading any array."""
    self.wait_until_finished()
    step = self._resolve_step(step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        **{EXTRA: ocp.args.JsonRestore()}))
    return dict(restored[EXTRA] or {})

  def _resolve_step(self, step: int | None) -> int:
    steps = self._manager.all_steps()
    if step is None:
      step = self._manager.latest_step()
      if step is None:
        raise NoCheckpoint(f"no checkpoint in {self.directory}")
    elif int(step) not in steps:
      raise NoCheckpoint(f"no checkpoint of step {step} in {self.directory} "
                              f"(saved steps: {sorted(steps)})")
    return int(step)

  def wait_until_finished(self) -> None:
    """Blocks until pending asynchronous saves are on disk (and their checksums)."""
    self._manager.wait_until_finished()
    self._write_pending_checksums()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    try:
      self.wait_until_finished()
    finally:
      self._manager.close()

  def __enter__(self) -> "CheckpointManager":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def latest_step(directory: str | os.PathLike) -> int | None:
  """The newest saved step of ``directory`` without creating or changing anything (None when
  it holds no checkpoint or does not exist)."""
  directory = _resolve(directory)
  if "://" not in directory and not os.path.isdir(directory):
    return None
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=_ITEMS,
                                  item_handlers=_handlers())
  try:
    return manager.latest_step()
  finally:
    manager.close()


def saved_steps(directory: str | os.PathLike) -> list[int]:
  """The saved steps of ``directory``, oldest first, read-only ([] when it holds no checkpoint
  or does not exist)."""
  directory = _resolve(directory)
  if "://" not in directory and not os.path.isdir(directory):
    return []
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=_ITEMS,
                                  item_handlers=_handlers())
  try:
    return sorted(int(s) for s in manager.all_steps())
  finally:
    manager.close()


def step_folders(directory: str | os.PathLike) -> list[int]:
  """The steps of ``directory`` as its file system shows them: its folders named by a number
  (orbax writes a step under a temporary name and renames it when finished, so these are the
  finished steps that ``saved_steps`` lists on a local disk), oldest first. Unlike
  ``saved_steps`` it starts no jax backend: run.py reads the saved config with it before
  ``jax.distributed.initialize``."""
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory)
                if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


def restore_params(directory: str | os.PathLike, step: int | None = None, *,
                   expected: Mapping[str, Any] | None = None) -> tuple[Any, Any]:
  """``(params, constants)`` of a saved TrainState as numpy arrays, nothing else.

  For evaluation or prediction anywhere (another machine, another device count): no target
  state or optimizer is needed, the optimizer state is not read, and the arrays are host numpy
  arrays to place as the caller likes (``jax.device_put``, ``parallel.replicate``).

  Args:
    directory: a ``CheckpointManager`` directory.
    step: which step; None for the latest.
    expected: ``{"params": ..., "constants": ...}`` of the model to load into (arrays or
      ShapeDtypeStructs): checked against the saved shapes before anything is read.

  Raises:
    NoCheckpoint: when there is no checkpoint (at ``step``).
    ConfigMismatch: the saved params differ from ``expected``.
    ChecksumError: a file of the step changed since it was saved.
  """
  directory = _resolve(directory)
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=_ITEMS,
                                  item_handlers=_handlers())
  try:
    steps = manager.all_steps()
    if step is None:
      step = manager.latest_step()
    if step is None or int(step) not in steps:
      raise NoCheckpoint(f"no checkpoint{'' if step is None else f' of step {step}'} in "
                              f"{directory} (saved steps: {sorted(steps)})")
    step_dir = os.path.join(directory, str(int(step)))
    if not verify_checksums(step_dir) and "://" not in directory:
      log.warning("Checkpoint step %d in %s has no checksums: restored unverified.", step,
                  directory)
    metadata = manager.item_metadata(int(step))[STATE]
    tree = getattr(metadata, "tree", metadata)
    if expected is not None:
      differences = shape_differences(array_shapes({k: tree[k] for k in expected if k in tree}),
                                      array_shapes(expected))
      if differences:
        raise ConfigMismatch(directory, int(step), differences)
    wanted = {k: tree[k] for k in ("params", "constants") if k in tree}
    if "params" not in wanted:
      raise KeyError(f"checkpoint step {step} in {directory} has no 'params' "
                     f"(top-level keys: {sorted(tree)})")
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                                          wanted)
    state_args = ocp.args.PyTreeRestore(item=wanted, restore_args=restore_args,
                                        partial_restore=True)
    restored = manager.restore(int(step), args=ocp.args.Composite(**{STATE: state_args}))
  finally:
    manager.close()
  state = restored[STATE]
  return state["params"], state.get("constants", {})


def _locate(path: str, step: int | None, steps_of: Callable[[str], list[int]]
            ) -> tuple[str, int | None]:
  """(checkpoint directory, step or None) of a workdir, a checkpoint directory or a step
  folder; ``NoCheckpoint`` when ``path`` holds no checkpoint."""
  if not os.path.exists(path):
    raise NoCheckpoint(f"{path}: no such folder")
  if not os.path.isdir(path):
    raise NoCheckpoint(f"{path} is a file, not a training workdir or a checkpoint directory")
  inner = os.path.join(path, "checkpoints")
  if steps_of(inner):
    return inner, step
  if steps_of(path):
    return path, step
  name, parent = os.path.basename(path.rstrip(os.sep)), os.path.dirname(path.rstrip(os.sep))
  if name.isdigit() and int(name) in steps_of(parent or "."):
    if step is not None and int(step) != int(name):
      raise NoCheckpoint(f"{path} is the checkpoint of step {int(name)}, not of step {step}")
    return parent or ".", int(name)
  hint = ""
  if steps_of(os.path.join(path, "best")):
    hint = f" (its best checkpoint is in {os.path.join(path, 'best')})"
  raise NoCheckpoint(f"{path} holds no checkpoints: neither a training workdir with "
                     f"checkpoints/ nor a checkpoint directory of <step>/ folders{hint}")


def find_step(path: str | os.PathLike, step: int | None = None, *,
              steps_of: Callable[[str], list[int]] = saved_steps) -> tuple[str, int]:
  """(checkpoint directory, absolute; step) of a training workdir (its ``checkpoints/``), a
  checkpoint directory (``WORKDIR/best``, a copy elsewhere) or one step's folder of one; the
  latest step unless ``step``. ``NoCheckpoint`` when there is no such folder, checkpoint or
  step. ``steps_of`` lists a directory's saved steps (``step_folders`` starts no jax
  backend)."""
  directory, step = _locate(os.fspath(path), step, steps_of)
  directory = os.path.abspath(directory)
  steps = steps_of(directory)
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise NoCheckpoint(f"{directory} has no checkpoint of step {step} (saved steps: "
                       f"{', '.join(map(str, steps))})")
  return directory, int(step)


def read_extra(directory: str | os.PathLike, step: int) -> dict[str, Any]:
  """The ``extra`` JSON of a saved step, read-only ({} when absent or unreadable)."""
  path = os.path.join(_resolve(directory), str(int(step)), EXTRA, "metadata")
  try:
    data = files.read_json(path, "checkpoint extra")
  except (OSError, ValueError):
    return {}
  return data if isinstance(data, dict) else {}
