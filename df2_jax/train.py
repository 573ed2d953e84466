"""The training loop: data, model, mesh, schedule, checkpoints, logging, NaN guard.

``train(config, workdir)`` trains from the latest checkpoint in ``workdir/checkpoints`` (or
from scratch) to ``config.train`` 's last step and returns the final train state. TensorFlow is
imported only through the input pipeline, inside this function.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import numpy as np

from data_pipeline import transforms
from df2_jax import checkpoint as ckpt_lib
from df2_jax import parallel, schedules
from df2_jax import train_step as ts
from df2_jax.models.match_rcnn import LOSS_TERMS, MatchRCNN, MatchRCNNConfig, init_variables

log = logging.getLogger(__name__)


def model_from_config(config) -> MatchRCNN:
  canvas = tuple(int(v) for v in config.data.canvas)
  fields = dict(config.model.to_dict())
  fields["stage_sizes"] = tuple(fields["stage_sizes"])
  fields["anchor_sizes"] = tuple(fields["anchor_sizes"])
  return MatchRCNN(MatchRCNNConfig(**fields), canvas)


def zero_train_batch(geometry: transforms.ImageGeometry, pairs: int) -> dict[str, np.ndarray]:
  """A batch of the training contract's shapes (for initialisation and shape checks)."""
  batch = {k: np.zeros((pairs, 2) + shape, dtype)
           for k, (shape, dtype) in transforms.image_spec(geometry).items()}
  batch["match_valid"] = np.zeros((pairs,), bool)
  return batch


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

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    if self.enabled and self._tb is not None:
      self._tb.image(name, image, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.close()


def _fmt_time(seconds: float) -> str:
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def train(config, workdir: str, *, train_source=None) -> ts.TrainState:
  """Trains ``config`` in ``workdir``; resumes from the latest checkpoint there."""
  from data_pipeline import pairs, pipeline, sources  # TensorFlow is loaded here only.

  mesh = parallel.make_mesh()
  tc = config.train
  parallel.check_batch_divisible(tc.global_batch_pairs, mesh)
  geometry = sources.geometry_from_config(config.data)
  if train_source is None:
    train_source = sources.source_from_config(config.data, config.data.train_split)
  pair_index = pairs.build_pair_index(train_source.records)
  steps_per_epoch = schedules.steps_per_epoch(pair_index.epoch_size, tc.global_batch_pairs)
  total_steps = tc.num_steps if tc.num_steps > 0 else tc.epochs * steps_per_epoch
  schedule = schedules.step_decay_schedule(tc.base_lr, steps_per_epoch, tuple(tc.decay_epochs),
                                           0.1, tc.warmup_steps, tc.warmup_factor)
  log.info("%d image pairs per epoch, %d steps per epoch, %d steps in all (%d pairs per step).",
           pair_index.epoch_size, steps_per_epoch, total_steps, tc.global_batch_pairs)

  model = model_from_config(config)
  variables = init_variables(model, jax.random.key(config.seed),
                             zero_train_batch(geometry, tc.global_batch_pairs))
  tx = ts.make_optimizer(schedule, variables["params"], momentum=tc.momentum,
                         weight_decay=tc.weight_decay, freeze_at=config.model.freeze_at,
                         optimizer=tc.optimizer)
  state = parallel.replicate(ts.create_train_state(variables, tx), mesh)
  del variables

  manager = ckpt_lib.CheckpointManager(os.path.join(workdir, "checkpoints"),
                                       tc.checkpoint_every_steps, tc.keep_checkpoints)
  start_step = 0
  if manager.latest_step() is not None:
    state, extra = manager.restore(target_state=state)
    start_step = int(state.step)
    log.info("Resumed from %s at step %d.", manager.directory, start_step)
  if start_step >= total_steps:
    log.info("Nothing to train: the checkpoint is at step %d of %d.", start_step, total_steps)
    manager.close()
    return state

  dataset = pipeline.train_dataset(train_source, pair_index, geometry,
                                   global_batch_pairs=tc.global_batch_pairs, seed=config.seed,
                                   start_step=start_step, flip_prob=config.data.flip_prob)
  batches = dataset.as_numpy_iterator()
  step_fn = parallel.shard_train_step(ts.make_train_step, mesh, model, tx,
                                      dict(tc.loss_weights))
  base_key = jax.random.key(config.seed + 1)
  writer = MetricsWriter(workdir, enabled=jax.process_index() == 0)
  started, last_log, last_step = time.time(), time.time(), start_step
  for step in range(start_step, total_steps):
    batch = parallel.host_local_to_global(next(batches), mesh)
    state, metrics = step_fn(state, batch, base_key)
    done = step + 1
    if done % tc.log_every_steps == 0 or done == total_steps:
      values = {k: float(v) for k, v in jax.device_get(metrics).items()}
      if not all(math.isfinite(v) for v in values.values()):
        manager.close()
        raise FloatingPointError(
            f"Non-finite loss at step {done}: "
            + ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())))
      now = time.time()
      steps_per_s = (done - last_step) / max(now - last_log, 1e-9)
      values["learning_rate"] = float(schedule(step))
      values["steps_per_second"] = steps_per_s
      writer.scalars(done, values)
      eta = (total_steps - done) / max(steps_per_s, 1e-9)
      log.info("step %d/%d  loss %.3f (%s)  %.2f steps/s  elapsed %s  eta %s", done,
               total_steps, values["loss"],
               " ".join(f"{k} {values[k]:.3f}" for k in LOSS_TERMS),
               steps_per_s, _fmt_time(now - started), _fmt_time(eta))
      last_log, last_step = now, done
    manager.save(done, state, extra={"step": done}, force=done == total_steps)
  skipped = len(dataset.stream.skips.skipped)
  if skipped:
    log.warning("%d images failed to load during training and were skipped.", skipped)
  manager.wait_until_finished()
  manager.close()
  writer.close()
  return state


def train_and_evaluate(config, workdir: str) -> dict[str, Any]:
  """Trains (resuming from ``workdir``), then evaluates the final state into eval_<step>/."""
  from df2_jax.evaluation import evaluator
  state = train(config, workdir)
  step = int(state.step)
  variables = {"params": state.params, "constants": state.constants}
  if jax.process_index() != 0:
    return {}
  writer = MetricsWriter(workdir)
  try:
    metrics = evaluator.evaluate(config, variables, os.path.join(workdir, f"eval_{step}"),
                                 writer=writer, step=step)
  finally:
    writer.close()
  log.info("%s", headline(metrics, step))
  return metrics


def headline(metrics: dict[str, Any], step: int) -> str:
  """One table of the headline numbers (the README's results table has these columns)."""
  cols = [("AP_box", metrics["bbox"]["AP"]), ("AP_mask", metrics["segm"]["AP"]),
          ("AP_pt", metrics["keypoints"]["AP"]),
          ("top-1", metrics["retrieval"]["top1"]), ("top-20", metrics["retrieval"]["top20"]),
          ("top-20 (GT boxes)", metrics["retrieval_gt_boxes"]["top20"])]
  head = " | ".join(["step"] + [c for c, _ in cols])
  row = " | ".join([str(step)] + [f"{v:.3f}".rjust(len(c)) for c, v in cols])
  return f"Results at step {step}:\n| {head} |\n| {row} |"


def load_variables(workdir: str, *, checkpoint_dir: str | None = None,
                   step: int | None = None) -> tuple[dict[str, Any], int]:
  """``({"params", "constants"}, step)`` of a checkpoint (the latest by default), params only:
  no optimizer state is read, so a directory copied to another machine works."""
  directory = checkpoint_dir or os.path.join(workdir, "checkpoints")
  if step is None:
    with ckpt_lib.CheckpointManager(directory) as manager:
      step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {directory}")
  params, constants = ckpt_lib.restore_params(directory, step)
  return jax.device_put({"params": params, "constants": constants}), int(step)


def evaluate_checkpoint(config, workdir: str, *, checkpoint_dir: str | None = None,
                        step: int | None = None) -> dict[str, Any]:
  """Evaluates a checkpoint's params into workdir/eval_<step>/."""
  from df2_jax.evaluation import evaluator
  variables, step = load_variables(workdir, checkpoint_dir=checkpoint_dir, step=step)
  metrics = evaluator.evaluate(config, variables, os.path.join(workdir, f"eval_{step}"))
  log.info("%s", headline(metrics, step))
  return metrics
