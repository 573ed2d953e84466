r"""Match R-CNN for DeepFashion2: train, or evaluate a checkpoint.

  python run.py --config configs/demo_synthetic.py --workdir runs/demo
  python run.py --config configs/match_rcnn_r50_fpn_1x_df2.py --workdir runs/r50 \
      --config.data.root=/data/deepfashion2
  python run.py --config configs/tiny.py --workdir runs/tiny --mode eval [--step N] \
      [--checkpoint_dir DIR]
  python run.py --config configs/tiny.py --workdir runs/tiny --mode predict \
      --input_dir my_photos/ [--output_dir DIR]
  python run.py --workdir runs/tiny --mode eval     # the config saved with the checkpoint

Configs are ml_collections files with ``get_config()``; any field can be overridden as
``--config.a.b=value`` and an unknown field fails at start. The logic lives in the library:
``df2_jax.train.train_and_evaluate``, ``df2_jax.evaluation.evaluator.evaluate_checkpoint`` and
``df2_jax.predict.predict``. Every known failure (``df2_jax.errors.Df2Error``) is one line and
the exit status of its class.
"""

import logging
import os
import re
import sys
import threading

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Checkpoints, metrics and evaluations go here.")
flags.DEFINE_enum("mode", "train", ["train", "eval", "predict"],
                  "train: train (resuming from workdir) then evaluate; eval: evaluate a "
                  "checkpoint; predict: draw and save predictions for a folder of images.")
flags.DEFINE_string("input_dir", None, "--mode predict: a folder of images.")
flags.DEFINE_string("output_dir", None,
                    "--mode predict: where PNGs and predictions.json go "
                    "(default: WORKDIR/predictions).")
flags.DEFINE_integer("step", None, "--mode eval/predict: the checkpoint step (default: the latest).")
flags.DEFINE_string("checkpoint_dir", None,
                    "--mode eval/predict: a checkpoint directory (default: WORKDIR/checkpoints).")
flags.DEFINE_string("coordinator_address", None,
                    "Many processes: host:port of process 0, which hosts the coordinator (the "
                    "same on every process). Without it, a cluster the environment describes "
                    "(SLURM, Open MPI, Cloud TPU, JAX_COORDINATOR_ADDRESS) is joined.")
flags.DEFINE_integer("num_processes", None, "Many processes: how many take part.")
flags.DEFINE_integer("process_id", None, "Many processes: this process's index, 0..N-1.")
flags.DEFINE_integer("distributed_timeout_s", 300,
                     "Many processes: seconds to wait for the coordinator and for every "
                     "process to join.")
flags.mark_flags_as_required(["workdir"])
CONFIG_HELP = "Config file (get_config())."
SAVED_CONFIG: list[str] = []  # the line main logs when the config is the checkpoint's


def define_config_flag(argv) -> None:
  """Defines ``--config``: a config file (``get_config()``), required to train. ``--mode eval``
  and ``--mode predict`` without it use the config the run saved with the checkpoint
  (``config.run_config.saved_config``: the checkpoint's own record, else WORKDIR/config.json), which
  ``--config.a.b=v`` overrides as it would a file's (e.g. ``--config.data.root=`` where the
  data lives on this machine). A checkpoint without a saved config, or no checkpoint, is one
  line (exit 2, 1)."""
  args = argv[1:]
  given = any(a == "--config" or a.startswith("--config=") for a in args)

  def value(name: str) -> str | None:
    found = None
    for i, a in enumerate(args):
      if a.startswith(f"--{name}="):
        found = a.split("=", 1)[1]
      elif a == f"--{name}" and i + 1 < len(args):
        found = args[i + 1]
    return found

  mode, workdir = value("mode") or "train", value("workdir")
  if given or mode not in ("eval", "predict") or not workdir:
    config_flags.DEFINE_config_file("config", None, CONFIG_HELP, lock_config=True)
    flags.mark_flag_as_required("config")
    return
  from df2_jax import checkpoint, errors
  from df2_jax.config import run_config
  step = value("step")
  try:  # no jax backend may start before jax.distributed.initialize: step_folders
    config, directory, step = run_config.saved_config(
        value("checkpoint_dir") or workdir, int(step) if step and step.isdigit() else None,
        steps_of=checkpoint.step_folders)
  except errors.Df2Error as e:
    no_config = isinstance(e, run_config.NoSavedConfig)
    sys.stderr.write(f"FATAL {e}{' (--config FILE)' if no_config else ''}\n")
    sys.exit(e.exit_code)
  SAVED_CONFIG.append(f"No --config: the config saved with checkpoint {step} of {directory}.")
  config_flags.DEFINE_config_dict("config", config, CONFIG_HELP, lock_config=True)


def parse_flags(argv):
  """absl's flag parsing, with a bad ``--config.a.b=v`` (a field that does not exist, a value
  of the wrong type) reported in one line, without a traceback."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f"FATAL Flags parsing error: {e}\nPass --helpshort or --helpfull to see "
                     f"help on flags.\n")
    sys.exit(2)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    text = str(e).strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    key = re.match(r"'?(\w+)'?", text)
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    culprit = next((a for a in overrides if key and f".{key.group(1)}." in a + "."), None)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    if culprit and hint:
      line = f"{culprit}: no such config field (did you mean {hint.group(1)!r}?)"
    elif culprit:
      line = f"{culprit}: no such config field"
    else:
      line = " ".join(text.split())
    sys.stderr.write(f"FATAL Flags parsing error: {line}\n")
    sys.exit(2)


def config_origin(argv) -> dict:
  """The config file and the ``--config.a.b=v`` overrides of this command (kept in
  WORKDIR/config.json and in every checkpoint)."""
  return {"config_file": config_flags.get_config_filename(FLAGS["config"]),
          "overrides": [a for a in argv[1:] if a.startswith("--config.")]}


def fail(line: str, code: int) -> None:
  """Logs one line (no traceback) and exits with ``code``."""
  logging.error("%s", line)
  sys.exit(code)


class DiskFullQuiet(logging.Filter):
  """Drops the log records of a full disk from the writers' threads (orbax logs each failed
  array write with its traceback): the main thread reports it once, in one line."""

  def __init__(self):
    super().__init__()
    self.dropped = 0

  def filter(self, record: logging.LogRecord) -> bool:
    from df2_jax import files
    text = record.getMessage()
    error = record.exc_info[1] if record.exc_info else None
    if (files.is_disk_full(error) or "No space left on device" in text
        or "os_error_code='28'" in text):
      self.dropped += 1
      return False
    return True


def quiet_disk_full() -> None:
  """A full disk is reported once, by the main thread, in one line: the writers' threads'
  records of it are dropped (orbax logs each failed array write with a traceback), and so are
  the checkpoint writer's callbacks that then find orbax's event loop closed (tensorstore prints
  each as an unraisable error)."""
  from df2_jax import files
  quiet = DiskFullQuiet()
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet)

  def writer_noise(value) -> bool:
    return files.is_disk_full(value) or (
        isinstance(value, RuntimeError) and "Event loop is closed" in str(value)
        and (quiet.dropped > 0 or (files.free_bytes(FLAGS.workdir) or 0) < 64 << 20))

  def hook(previous, value_of):
    return lambda *args: None if writer_noise(value_of(*args)) else previous(*args)
  threading.excepthook = hook(threading.excepthook, lambda a: a.exc_value)
  sys.excepthook = hook(sys.excepthook, lambda kind, value, tb: value)
  sys.unraisablehook = hook(sys.unraisablehook, lambda u: u.exc_value)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.getLogger().setLevel(logging.INFO)
  from df2_jax import files
  quiet_disk_full()
  try:
    _main()
  except Exception as e:  # pylint: disable=broad-except  (a full disk in any writer)
    if not files.is_disk_full(e):
      raise
    logging.error("%s", files.disk_full_message(os.path.abspath(FLAGS.workdir),
                                                _needed_bytes(FLAGS.workdir)))
    for handler in logging.getLogger().handlers:
      handler.flush()
    sys.stderr.flush()
    # At once: the interpreter's shutdown would print every unretrieved write future of the
    # checkpoint writer (hundreds of lines). Files are closed; saved checkpoints are intact.
    os._exit(1)  # pylint: disable=protected-access


def _needed_bytes(workdir: str) -> int | None:
  """About what the next write needs: the size of the newest saved checkpoint step."""
  directory = os.path.join(workdir, "checkpoints")
  steps = [d for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []
  if not steps:
    return None
  newest = os.path.join(directory, max(steps, key=int))
  return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(newest) for f in fs)


def _main():
  from df2_jax import errors, files
  from df2_jax.config import rules
  for line in SAVED_CONFIG:
    logging.info("%s", line)
  try:  # every config rule and the workdir, before any data is read or anything is built
    rules.validate(FLAGS.config)
    files.check_writable(FLAGS.workdir, create=FLAGS.mode == "train", what="--workdir")
  except errors.Df2Error as e:
    for line in str(e).splitlines():
      sys.stderr.write(f"Config error: {line}\n")
    sys.exit(e.exit_code)
  # orbax logs every checkpoint step at INFO through absl; keep its warnings only.
  quiet_orbax = lambda r: r.levelno >= logging.WARNING or "/orbax/" not in r.pathname
  for handler in logging.getLogger().handlers:
    handler.addFilter(quiet_orbax)
  # Keep TensorFlow (input pipeline only) off the accelerators.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from df2_jax import parallel
  parallel.initialize_distributed(FLAGS.coordinator_address, FLAGS.num_processes,
                                  FLAGS.process_id, timeout_s=FLAGS.distributed_timeout_s)
  try:
    if FLAGS.mode == "train":
      from df2_jax import train
      train.train_and_evaluate(FLAGS.config, FLAGS.workdir, origin=config_origin(sys.argv))
    elif FLAGS.mode == "eval":
      from df2_jax.evaluation import evaluator
      evaluator.evaluate_checkpoint(FLAGS.config, FLAGS.workdir,
                                    checkpoint_dir=FLAGS.checkpoint_dir, step=FLAGS.step)
    else:
      if not FLAGS.input_dir:
        raise app.UsageError("--mode predict needs --input_dir")
      from df2_jax import inference, predict
      load = lambda: inference.load_variables(FLAGS.workdir, checkpoint_dir=FLAGS.checkpoint_dir,
                                              step=FLAGS.step, config=FLAGS.config)[0]
      # The folders are checked and locked before the checkpoint is read.
      predict.predict(FLAGS.config, load, FLAGS.input_dir,
                      FLAGS.output_dir or os.path.join(FLAGS.workdir, "predictions"))
  except errors.Df2Error as e:  # one line (a stopped training: its checkpoint is saved)
    sys.exit(errors.report(e))


if __name__ == "__main__":
  define_config_flag(sys.argv)
  app.run(main, flags_parser=parse_flags)
