"""The training loop: data, model, mesh, schedule, checkpoints, logging, NaN guard.

``train(config, workdir)`` trains from the latest checkpoint in ``workdir/checkpoints`` (or
from scratch) to ``config.train`` 's last step and returns the final train state. TensorFlow is
imported only through the input pipeline, inside this function.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import transforms
from df2_jax import checkpoint as ckpt_lib
from df2_jax import files, initialization, parallel, progress, schedules, train_step
from df2_jax.config import rules, run_config
from df2_jax.errors import ConfigError, Df2Error
from df2_jax.evaluation import evaluator, summary
from df2_jax.models.match_rcnn import LOSS_TERMS, init_variables, model_from_config

log = logging.getLogger(__name__)


def with_items(source):
  """The training split without its images that have no item to train on (every item dropped
  by the reader, or only crowd regions), as detectron2 (``filter_empty_annotations``) and
  Detectron filter them; their number in one log line. The evaluation keeps such images (their
  pixels still hold clothing)."""
  kept = [i for i, r in enumerate(source.records) if any(not it.iscrowd for it in r.items)]
  if len(kept) == len(source.records):
    return source
  log.warning("%d training images with no item left out (every item dropped as invalid, or "
              "crowd regions only); %d images train.", len(source.records) - len(kept),
              len(kept))
  return source.subset(kept)


def train_pair_index(config, records):
  """The training records' partner graph with ``config.data.pair_sampling``. Its
  ``epoch_size`` sets the steps per epoch, hence the total steps and the learning-rate decay
  steps, as well as the input stream's epochs."""
  from data_pipeline import pairs
  return pairs.build_pair_index(records, str(config.data.pair_sampling))


class MetricsWriter:
  """Scalars to ``workdir/metrics.jsonl`` and, when TensorFlow is present, TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    try:
      from flax.metrics import tensorboard  # Needs TensorFlow.
      self._tb = tensorboard.SummaryWriter(workdir)
    except ImportError:
      log.info("TensorFlow is not installed: metrics go to metrics.jsonl only.")

  def scalars(self, step: int, values: dict[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **values}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for k, v in values.items():
        self._tb.scalar(k, v, step)
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops the lines of steps after ``step`` (logged by a run that stopped before saving
    them; the resumed run logs those steps again), so each step has its lines once."""
    if not self.enabled:
      return
    path = self._jsonl.name
    self._jsonl.close()
    with open(path) as f:
      lines = f.readlines()
    kept, torn = [], 0
    for line in lines:
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError:  # a write cut by a kill or a full disk
        torn += 1
        continue
      if isinstance(record, dict) and record.get("step", 0) <= step:
        kept.append(line if line.endswith("\n") else line + "\n")
    if torn:
      log.warning("%s: dropped %d torn line(s) (a write cut short by a kill or a full disk); "
                  "the complete lines are kept.", path, torn)
    if kept != lines:
      files.write_text(path, "".join(kept))
    self._jsonl = open(path, "a")

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.image(name, image, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


class Evaluations:
  """Evaluations of the training state into ``workdir/eval_<step>/`` (metrics also to
  metrics.jsonl and TensorBoard), and the best one's params under ``workdir/best/``.

  The evaluation split is scanned once, when this is built (at the start of training: a
  missing or broken split fails before any step, and so does one whose reader dropped images,
  items, polygons or landmarks, ``evaluator.SkippedGroundTruth``, unless
  ``config.eval.allow_skipped``).
  ``workdir/best/`` holds one checkpoint, {"params", "constants"} of the first step that
  reached the best value of ``config.train.best_metric`` (a ``metrics.json`` scalar name
  without "eval/", e.g. "bbox/AP"); its ``extra`` JSON has the step, the metric and every
  headline number. It is replaced only by a strictly better value, also across resumes, and
  reads like any checkpoint directory: ``--mode eval --checkpoint_dir WORKDIR/best``.
  """

  def __init__(self, config, workdir: str, writer: MetricsWriter, *, eval_source=None,
               track_best: bool = True, run_extra: dict[str, Any] | None = None):
    from data_pipeline import sources  # TensorFlow is loaded here only.
    self.config = config
    self.workdir = workdir
    self.writer = writer
    self.metric = str(config.train.best_metric)
    self.run_extra = dict(run_extra or {})
    self.source = (eval_source if eval_source is not None
                   else sources.source_from_config(config.data, config.data.eval_split))
    # A split that lost any ground truth is refused now, not at the first evaluation.
    evaluator.check_ground_truth(config, self.source)
    self.best = (ckpt_lib.CheckpointManager(os.path.join(workdir, "best"), 1, max_to_keep=1)
                 if track_best else None)
    self.best_value, self.best_step = -math.inf, None
    if self.best is not None and self.best.latest_step() is not None:
      extra = self.best.read_extra()
      self.best_value, self.best_step = float(extra["value"]), int(extra["step"])
    self.last_step: int | None = None

  def __call__(self, step: int, state: train_step.TrainState) -> dict[str, Any]:
    """Evaluates ``state`` at ``step``; saves it to best/ if it is the best so far.

    Every process calls it (``evaluator.evaluate`` splits the images over them and returns
    the same metrics on each, so that they agree on saving best/, which they write together).
    """
    started = time.time()
    variables = {"params": state.params, "constants": state.constants}
    metrics = evaluator.evaluate(self.config, variables,
                                       os.path.join(self.workdir, f"eval_{step}"),
                                       eval_source=self.source, writer=self.writer, step=step)
    self.last_step = step
    scalars = summary.summary_scalars(metrics)
    value = scalars[f"eval/{self.metric}"]
    if self.best is not None and math.isfinite(value) and value > self.best_value:
      self.best.save(step, variables, force=True, extra={
          "step": step, "metric": self.metric, "value": value, "metrics": scalars,
          **self.run_extra})
      self.best.wait_until_finished()
      self.best_value, self.best_step = value, step
    best = (f"; best {self.best_value:.4f} at step {self.best_step} "
            f"({self.best.directory})" if self.best_step is not None else "")
    log.info("%s\n%s %.4f at step %d%s; evaluation took %.0f s.",
             summary.headline(metrics, step),
             self.metric, value, step, best, time.time() - started)
    return metrics

  def completed(self, step: int) -> dict[str, Any] | None:
    """The metrics of a finished evaluation of ``step`` (its ``metrics.json``, written last
    and atomically), or None when it never finished."""
    path = os.path.join(self.workdir, f"eval_{step}", "metrics.json")
    if not os.path.exists(path):
      return None
    try:
      return files.read_json(path, "metrics of an evaluation")
    except (OSError, ValueError) as e:
      log.warning("%s: the evaluation of step %d is redone.", e, step)
      return None

  def close(self) -> None:
    if self.best is not None:
      self.best.close()


def train(config, workdir: str, *, train_source=None, eval_source=None,
          origin: dict[str, Any] | None = None) -> train_step.TrainState:
  """Trains ``config`` in ``workdir``; resumes from the latest checkpoint there.

  A fresh run starts from ``initialization.initial_variables`` (random, then the ImageNet
  backbone and a warm start when the config names them). With ``config.train.eval_every_steps``
  > 0 the state is evaluated every that many steps (``Evaluations``, on ``eval_source`` or
  the config's evaluation split). ``origin`` (``{"config_file", "overrides"}``) names the
  config in ``workdir/config.json``.
  """
  return _train(config, workdir, train_source=train_source, eval_source=eval_source,
                evaluate_at_end=False, origin=origin)[0]


def train_and_evaluate(config, workdir: str, *, train_source=None, eval_source=None,
                       origin: dict[str, Any] | None = None) -> dict[str, Any]:
  """Trains (resuming from ``workdir``, evaluating every ``config.train.eval_every_steps``),
  then evaluates the final state into eval_<step>/ unless that step was just evaluated.
  Returns the final metrics (on every process of a multi-process run)."""
  return _train(config, workdir, train_source=train_source, eval_source=eval_source,
                evaluate_at_end=True, origin=origin)[1]


# Metric kinds (best_metric's first part) and the spec property that must hold for them.
_METRIC_NEEDS = {"segm": "has_masks", "keypoints": "has_landmarks",
                 "keypoints_visible": "has_landmarks", "retrieval": "has_pairs",
                 "retrieval_gt_boxes": "has_pairs"}


def _train(config, workdir: str, *, train_source, eval_source, evaluate_at_end: bool,
           origin: dict[str, Any] | None = None) -> tuple[train_step.TrainState, dict[str, Any]]:
  """``train`` and ``train_and_evaluate``: everything is checked (config, the workdir's
  lock and its checkpoints' fit, weight files, then the data) before the first compilation
  of a step."""
  from data_pipeline import pipeline, sources  # TensorFlow is loaded here only.

  tc = config.train
  rules.validate(config)
  spec = sources.resolve_spec(config.data)  # format "coco": the set's own taxonomy, kept
  kind = str(tc.best_metric).split("/")[0]
  if kind in _METRIC_NEEDS and not getattr(spec, _METRIC_NEEDS[kind]):
    raise ConfigError(f"config.train.best_metric={tc.best_metric!r}: dataset {spec.name!r} "
                      f"has no {_METRIC_NEEDS[kind][4:]}, so no such metric (try 'bbox/AP')")
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(tc.global_batch_pairs, mesh)
  geometry = transforms.geometry_from_config(config.data)
  model = model_from_config(config)
  with contextlib.ExitStack() as stack:  # closes the files and managers on any exit
    if jax.process_index() == 0:  # one training per workdir (the processes of one run share it)
      stack.enter_context(files.FolderLock(workdir, "training"))
    manager = stack.enter_context(ckpt_lib.CheckpointManager(
        os.path.join(workdir, "checkpoints"), tc.checkpoint_every_steps, tc.keep_checkpoints))
    resuming = manager.latest_step() is not None
    init = functools.partial(init_variables, model, jax.random.key(config.seed),
                             transforms.zero_train_batch(geometry, tc.global_batch_pairs))
    stored = run_config.read(workdir)
    if resuming:  # another config's checkpoints are refused before any data is touched
      _check_fits(manager, manager.latest_step(), jax.eval_shape(init), config, workdir, stored)
    run_extra = {run_config.CONFIG_KEY: run_config.as_dict(config),
                 "config_file": (origin or {}).get("config_file"),
                 "overrides": list((origin or {}).get("overrides", []))}
    if jax.process_index() == 0 and not resuming:
      run_config.write(workdir, config, origin)
    if not resuming:  # Weight files are read and checked before anything is compiled.
      initialization.check_weight_files(config)
      loaded = initialization.initial_variables(config, jax.eval_shape(init))
    if train_source is None:
      parallel.on_process_zero(lambda: sources.prepare(config.data), "synthetic_data",
                               timeout_s=4 * 3600)
    variables = init()
    if not resuming:
      variables = initialization.fill(loaded, variables)

    if train_source is None:
      train_source = sources.source_from_config(config.data, config.data.train_split)
    train_source = with_items(train_source)
    pair_index = train_pair_index(config, train_source.records)
    steps_per_epoch = schedules.steps_per_epoch(pair_index.epoch_size, tc.global_batch_pairs)
    total_steps = tc.num_steps if tc.num_steps > 0 else tc.epochs * steps_per_epoch
    schedule = schedules.step_decay_schedule(tc.base_lr, steps_per_epoch, tuple(tc.decay_epochs),
                                             0.1, tc.warmup_steps, tc.warmup_factor)
    log.info("%d elements of two images per epoch, %d steps per epoch, %d steps in all (%d "
             "elements per step); learning rate x0.1 at steps %s.", pair_index.epoch_size,
             steps_per_epoch, total_steps, tc.global_batch_pairs,
             [int(e) * steps_per_epoch for e in tc.decay_epochs])

    undecayed = tuple(tc.undecayed_modules)
    if undecayed:
      log.info("Modules %s keep the base learning rate after the warm-up (no decay).",
               list(undecayed))
    tx = train_step.make_optimizer(schedule, variables["params"], momentum=tc.momentum,
                           weight_decay=tc.weight_decay, freeze_at=config.model.freeze_at,
                           optimizer=tc.optimizer, undecayed=undecayed,
                           undecayed_learning_rate=schedules.step_decay_schedule(
                               tc.base_lr, steps_per_epoch, (), 0.1, tc.warmup_steps,
                               tc.warmup_factor))
    state = parallel.replicate(train_step.create_train_state(variables, tx), mesh)
    del variables

    start_step = 0
    if resuming:
      try:
        state, extra, start_step = manager.restore_latest_intact(state)
      except ckpt_lib.ConfigMismatch as e:  # e.g. another optimizer's state
        raise run_config.RunMismatch(run_config.mismatch_line(
            workdir, stored, config, e.differences)) from None
      if jax.process_index() == 0:
        run_config.write(workdir, config, origin)
      start_step = int(state.step)
      log.info("Resumed from %s at step %d.", manager.directory, start_step)
    # Written only once the checkpoints are known to fit: a refused run leaves no trace.
    # One writer for the losses and the evaluations (two TensorBoard writers on one folder
    # would each write an event file, and TensorBoard may skip one of them).
    writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
    stack.callback(writer.close)
    evaluations = None
    if int(tc.eval_every_steps) > 0 or evaluate_at_end:
      evaluations = Evaluations(config, workdir, writer, eval_source=eval_source,
                                run_extra=run_extra)
      stack.callback(evaluations.close)
    signals = stack.enter_context(StopSignals())

    def evaluate(step, state):
      """An evaluation that a signal stops: the step is saved already, and the next run
      redoes the evaluation (it has no complete metrics.json)."""
      with signals.interrupting(step, manager):
        metrics = evaluations(step, state)
      stop = signals.requested(agree=True)
      if stop is not None:
        raise signals.interrupted(stop, step, manager)
      return metrics

    def finish(state):
      if not evaluate_at_end:
        return state, {}
      step = int(state.step)
      done = evaluations.completed(step)
      if done is not None:
        return state, done
      return state, evaluate(step, state)

    writer.truncate_after(start_step)  # a crashed run may have logged steps past it
    if (resuming and evaluations is not None and int(tc.eval_every_steps) > 0
        and start_step % int(tc.eval_every_steps) == 0 and start_step < total_steps
        and evaluations.completed(start_step) is None):
      log.info("The evaluation of step %d did not finish in the last run: evaluating it now.",
               start_step)
      evaluate(start_step, state)
    if start_step >= total_steps:
      log.info("Nothing to train: the checkpoint is at step %d of %d.", start_step, total_steps)
      return finish(state)

    dataset = pipeline.train_dataset(train_source, pair_index, geometry,
                                     global_batch_pairs=tc.global_batch_pairs, seed=config.seed,
                                     start_step=start_step, flip_prob=config.data.flip_prob,
                                     category_batches=bool(config.data.category_batches),
                                     num_parallel_calls=int(config.data.input_workers))
    log.info("Input pipeline: %d images decoded at once; canvases %s.",
             int(config.data.input_workers) or pipeline.host_cores(),
             ", ".join(f"{h}x{w}" for h, w in geometry.canvases))
    batches = dataset.as_numpy_iterator()
    step_fn = parallel.shard_train_step(train_step.make_train_step, mesh, model, tx,
                                        dict(tc.loss_weights))
    base_key = jax.random.key(config.seed + 1)
    guard = FiniteGuard()
    started, last_log, last_step = time.time(), time.time(), start_step
    canvases_seen = set()
    for step in range(start_step, total_steps):
      batch = parallel.host_local_to_global(next(batches), mesh)
      canvas = tuple(batch["image"].shape[2:4])
      if canvas not in canvases_seen:  # a new program: its failure is reported as the step's
        canvases_seen.add(canvas)
        state, metrics = _first_step(step_fn, state, batch, base_key, done=step + 1,
                                     first=step == start_step)
      else:
        state, metrics = step_fn(state, batch, base_key)
      done = step + 1
      guard.update(metrics, done)
      log_step = done % tc.log_every_steps == 0 or done == total_steps
      eval_step = (evaluations is not None and tc.eval_every_steps > 0
                   and done % tc.eval_every_steps == 0)
      stop = signals.requested(agree=log_step)
      if log_step:
        guard.check(done, manager)
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.time()
        steps_per_s = (done - last_step) / max(now - last_log, 1e-9)
        values["learning_rate"] = float(schedule(step))
        values["steps_per_second"] = steps_per_s
        writer.scalars(done, values)
        eta = (total_steps - done) / max(steps_per_s, 1e-9)
        log.info("step %d/%d  loss %.3f (%s)  %.2f steps/s  elapsed %s  eta %s", done,
                 total_steps, values["loss"],
                 " ".join(f"{k} {values[k]:.3f}" for k in LOSS_TERMS),
                 steps_per_s, progress.duration(now - started), progress.duration(eta))
        last_log, last_step = now, done
      # An evaluated or interrupted step is always saved (an evaluation can outlast the grace
      # period of a preemption); a non-finite state never is.
      force = done == total_steps or eval_step or stop is not None
      if force or manager.will_save(done):
        guard.check(done, manager)
        manager.save(done, state, extra={"step": done, **run_extra}, force=force)
      if stop is not None:
        manager.wait_until_finished()
        log.warning("Stopped by %s after step %d of %d: checkpoint %d saved in %s; run the same "
                    "command again to resume.", signal.Signals(stop).name, done, total_steps,
                    done, manager.directory)
        raise Interrupted(stop, done, manager.directory)
      if eval_step:
        evaluate(done, state)
        last_log = time.time()  # steps/s counts training time only
    skipped = len(dataset.stream.skips.skipped)
    if skipped:
      log.warning("%d images failed to load during training and were skipped.", skipped)
    manager.wait_until_finished()
    return finish(state)


class Interrupted(Df2Error):
  """Training stopped on SIGTERM or SIGINT after saving a checkpoint at ``step``; a command
  exits with 128 + the signal's number, the shell's status for it."""

  def __init__(self, signum: int, step: int, directory: str):
    super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; "
                     f"checkpoint saved in {directory}")
    self.signum, self.step, self.directory = int(signum), int(step), directory
    self.exit_code = 128 + self.signum


class _StopNow(BaseException):
  """Raised by the signal handler inside an evaluation; a BaseException so that no
  ``except Exception`` of the evaluation (an unreadable image is skipped, say) swallows it."""

  def __init__(self, signum: int):
    super().__init__(signum)
    self.signum = int(signum)


class StopSignals:
  """While entered, SIGTERM and SIGINT ask the training loop to stop after the current step
  (which is then saved); a second signal ends the process at once (the default action).

  ``requested(agree)`` returns the signal number once one has arrived (None before). With
  several processes the processes must stop at the same step: they compare their flags (a
  small collective and host sync) only when ``agree`` is true (at log steps), so a signal is
  acted on at the next log step there. Outside the main thread nothing is installed.
  """

  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self._received: int | None = None
    self._previous: dict[int, Any] = {}
    self._interrupt: tuple[int, str] | None = None

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous.clear()

  def _handle(self, signum, frame) -> None:
    del frame
    if self._received is not None:  # the second signal: the default action, now
      signal.signal(signum, signal.SIG_DFL)
      os.kill(os.getpid(), signum)
      return
    self._received = int(signum)
    if self._interrupt is not None:  # inside an evaluation of a saved step: stop now
      self._interrupt = None
      raise _StopNow(signum)
    log.warning("%s received: saving a checkpoint after this step, then stopping (send it again "
                "to stop at once).", signal.Signals(signum).name)

  @contextlib.contextmanager
  def interrupting(self, step: int, manager):
    """While inside (an evaluation of saved step ``step``), a signal in a one-process run
    stops at once by raising ``Interrupted`` (the evaluation is redone by the next run); with
    several processes it is acted on when the block ends (they must stop together)."""
    self._interrupt = (step, manager.directory) if jax.process_count() == 1 else None
    try:
      if self._interrupt is not None and self._received is not None:
        raise _StopNow(self._received)
      yield
    except _StopNow as e:
      raise self.interrupted(e.signum, step, manager) from None
    finally:
      self._interrupt = None

  def interrupted(self, signum: int, step: int, manager) -> "Interrupted":
    manager.wait_until_finished()
    log.warning("Stopped by %s during the evaluation of step %d: checkpoint %d is saved in %s; "
                "run the same command again to evaluate it and go on.",
                signal.Signals(signum).name, step, step, manager.directory)
    return Interrupted(signum, step, manager.directory)

  def requested(self, agree: bool = True) -> int | None:
    if jax.process_count() == 1:
      return self._received
    if not agree:
      return None
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self._received or 0))
    flags = np.asarray(flags).reshape(-1)
    return int(flags.max()) if flags.max() > 0 else None


@jax.jit
def _finite_update(tracker: dict[str, Any], metrics: dict[str, jax.Array], step: jax.Array
                   ) -> dict[str, Any]:
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree_util.tree_leaves(
      metrics)]))
  first_bad = tracker["finite"] & ~finite
  return {"finite": tracker["finite"] & finite,
          "step": jnp.where(first_bad, step, tracker["step"]),
          "metrics": jax.tree_util.tree_map(lambda old, new: jnp.where(first_bad, new, old),
                                            tracker["metrics"], metrics)}


class NonFiniteLoss(Df2Error, FloatingPointError):
  """A loss or the gradient norm turned NaN or inf: training stopped without saving that step."""


class FiniteGuard:
  """Tracks on the device whether every loss and the gradient norm stayed finite, with the
  first step that was not and its values (no host sync per step); ``check`` reads it (before
  every save and at every log line) and stops training on a non-finite state."""

  def __init__(self):
    self._tracker = None

  def update(self, metrics: dict[str, jax.Array], step: int) -> None:
    if self._tracker is None:  # numpy leaves: valid jit inputs in any process layout
      self._tracker = {"finite": np.bool_(True), "step": np.int32(-1),
                       "metrics": jax.tree_util.tree_map(
                           lambda m: np.zeros(m.shape, m.dtype), metrics)}
    self._tracker = _finite_update(self._tracker, metrics, np.int32(step))

  def check(self, step: int, manager=None) -> None:
    """Raises ``NonFiniteLoss`` naming the first non-finite step and its values."""
    if self._tracker is None:
      return
    tracker = jax.device_get(parallel.one_replica(self._tracker))
    if bool(tracker["finite"]):
      return
    values = ", ".join(f"{k}={float(v):.4g}" for k, v in sorted(tracker["metrics"].items()))
    last = manager.latest_step() if manager is not None else None
    where = (f"the last checkpoint (step {last} in {manager.directory}) holds only finite "
             f"values" if last is not None else "no checkpoint was saved")
    raise NonFiniteLoss(
        f"Non-finite loss or gradient at step {int(tracker['step'])}: {values}. Training "
        f"stopped at step {step} without saving it; {where}. Lower config.train.base_lr or "
        f"raise config.train.warmup_steps.")


def _first_step(step_fn, state, batch, base_key, done: int, first: bool = True):
  """The first step of a run (or the first on a new canvas: another program), awaited: a
  failure (out of memory, most often) is reported as the step's, before anything is saved,
  rather than surfacing in the checkpoint writer."""
  try:
    state, metrics = step_fn(state, batch, base_key)
    jax.block_until_ready((state, metrics))
    if not first:
      log.info("Step %d ran the first batch on a %dx%d canvas (a program of its own).", done,
               *batch["image"].shape[2:4])
    return state, metrics
  except Exception as e:  # pylint: disable=broad-except  (XlaRuntimeError and kin)
    text = str(e)
    memory = any(m in text for m in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory",
                                     "Allocator", "allocat"))
    hint = (" The step does not fit in memory: lower config.train.global_batch_pairs or the "
            "canvases (config.data.canvas, bucket_canvases), or use accelerators with more "
            "memory (the 1x recipe is sized for 8 GPUs or TPU chips; see the README)."
            if memory else "")
    where = ("before any checkpoint of this run was saved" if first else
             f"its first on a {batch['image'].shape[2]}x{batch['image'].shape[3]} canvas")
    raise RuntimeError(f"The training step failed at step {done}, {where}: {type(e).__name__}: "
                       f"{text.strip().splitlines()[0][:500] if text.strip() else ''}.{hint}"
                       ) from e


def _check_fits(manager: ckpt_lib.CheckpointManager, step: int, expected: dict[str, Any],
                config, workdir: str, stored: dict[str, Any] | None) -> None:
  """Raises ``run_config.RunMismatch`` (one line naming the run's config) when the saved
  arrays of ``expected``'s collections (params, constants, memory) differ from the config's."""
  try:
    saved = manager.saved_shapes(step)
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: the restore decides)
    return
  keys = tuple(expected)
  saved = {k: v for k, v in saved.items() if k.split(".")[0] in keys}
  absent = tuple(k for k in ckpt_lib.FRESH_IF_ABSENT
                 if k in keys and not any(n.split(".")[0] == k for n in saved))
  differences = ckpt_lib.shape_differences(saved, ckpt_lib.array_shapes(expected),
                                           absent)
  if differences:
    raise run_config.RunMismatch(run_config.mismatch_line(workdir, stored, config, differences))
