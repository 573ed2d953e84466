r"""run.py end to end: the training loop fed by tf.data from real-size JPEGs, images/s from its log.

  # The 1x recipe (random backbone) on a synthetic DeepFashion2 of 1333 px images, 300 steps:
  python bench/end_to_end.py --workdir /tmp/e2e --steps 300
  # A CPU smoke run of the same path with the tiny model:
  python bench/end_to_end.py --workdir /tmp/e2e_tiny --config configs/tiny.py --steps 20 \
      --image_size 640 --train_pairs 40 --log_every 5

1. Generates (once) a synthetic DeepFashion2 in the raw layout under WORKDIR/data, images of
   --image_size px on their longer side (the generator's three aspects: landscape, square,
   portrait), so that decoding, resizing and mask rasterisation cost what real images cost.
2. Saves a random initialisation of the config's model as a checkpoint (WORKDIR/init) and
   passes it as ``config.model.init_from``: the recipe refuses to start from a random frozen
   backbone, and the speed does not depend on the weights.
3. Runs ``run.py --mode train`` on it (a subprocess; --steps steps, a log line every
   --log_every, the evaluation at the end on a few validation images) and reads
   WORKDIR/run/metrics.jsonl: images/s of each log interval after the first (which holds the
   first compilation), their median, and the whole span's.

Compare with ``bench/train_step.py`` at the same canvases and batch: the loop reaches the step's
speed when the input pipeline keeps up (``config.data.input_workers``, default: one decoding
call per core). Needs TensorFlow (the input pipeline).
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import subprocess
import sys
import time

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Scratch folder (data, init checkpoint, run).")
flags.DEFINE_string("config", "configs/match_rcnn_r50_fpn_1x_df2.py", "Config file.")
flags.DEFINE_integer("image_size", 1333, "Longer side of the synthetic images, pixels.")
flags.DEFINE_integer("train_pairs", 200, "Synthetic training pair ids (2 images each).")
flags.DEFINE_integer("val_pairs", 2, "Synthetic validation pair ids (the final evaluation).")
flags.DEFINE_integer("steps", 300, "Training steps.")
flags.DEFINE_integer("log_every", 20, "Steps per log line (one images/s figure each).")
flags.DEFINE_integer("gen_workers", 0, "Generator processes (0: every core).")
flags.DEFINE_multi_string("override", [], "More --config.* overrides (repeat the flag), e.g. "
                          "train.global_batch_pairs=4.")
flags.mark_flag_as_required("workdir")


def _data(path: str) -> None:
  from data_pipeline import synthetic
  if os.path.exists(os.path.join(path, synthetic.COMPLETE)):
    return
  started = time.perf_counter()
  synthetic.generate(path, FLAGS.train_pairs, FLAGS.val_pairs, FLAGS.image_size, 0,
                     workers=FLAGS.gen_workers or os.cpu_count() or 1)
  synthetic.mark_complete(path)
  print(f"generated {2 * (FLAGS.train_pairs + FLAGS.val_pairs)} images of {FLAGS.image_size} "
        f"px in {time.perf_counter() - started:.0f} s", flush=True)


def _init_checkpoint(config, path: str) -> None:
  import jax
  from data_pipeline import transforms
  from df2_jax import checkpoint
  from df2_jax.models.match_rcnn import init_variables, model_from_config
  if checkpoint.latest_step(path) is not None:
    return
  geometry = transforms.geometry_from_config(config.data)
  variables = init_variables(model_from_config(config), jax.random.key(config.seed),
                             transforms.zero_train_batch(geometry, 1))
  with checkpoint.CheckpointManager(path, 1, max_to_keep=1) as manager:
    manager.save(0, dict(variables), force=True)
    manager.wait_until_finished()


def main(argv):
  del argv
  logging.basicConfig(level=logging.WARNING)
  import importlib.util
  spec = importlib.util.spec_from_file_location("bench_config", os.path.join(ROOT, FLAGS.config))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  work = os.path.abspath(FLAGS.workdir)
  data, init, run = (os.path.join(work, n) for n in ("data", "init", "run"))
  _data(data)
  _init_checkpoint(config, init)
  overrides = [f"data.format=raw", f"data.root={data}", f"model.init_from={init}",
               "model.backbone_weights=", f"train.num_steps={FLAGS.steps}",
               f"train.log_every_steps={FLAGS.log_every}", "train.eval_every_steps=0",
               f"train.checkpoint_every_steps={10 * FLAGS.steps}"] + list(FLAGS.override)
  cmd = [sys.executable, os.path.join(ROOT, "run.py"), "--config",
         os.path.join(ROOT, FLAGS.config), "--workdir", run, "--mode", "train"] + [
             f"--config.{o}" for o in overrides]
  started = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  wall = time.perf_counter() - started
  if proc.returncode:
    print(proc.stderr[-5000:])
    raise SystemExit(f"run.py failed with {proc.returncode}")
  lines = [json.loads(l) for l in open(os.path.join(run, "metrics.jsonl")) if l.strip()]
  logged = [l for l in lines if "steps_per_second" in l]
  pairs = int(dict(o.split("=", 1) for o in overrides).get(
      "train.global_batch_pairs", config.train.global_batch_pairs))
  rates = [2 * pairs * l["steps_per_second"] for l in logged[1:]]
  span = [l["step"] for l in logged[1:]]
  canvases = sorted({l.split("ran the first batch on a ")[1].split(" ")[0]
                     for l in proc.stderr.splitlines() if "ran the first batch on a" in l})
  each = ", ".join(f"{r:.1f}" for r in rates)
  print(f"run.py end to end, {FLAGS.config}, {2 * pairs} images/step, {FLAGS.image_size} px "
        f"JPEGs: median {statistics.median(rates):.1f} img/s over {len(rates)} log intervals "
        f"(steps {span[0] - FLAGS.log_every}-{span[-1]}: {each}); later canvases compiled: "
        f"{canvases or 'none'}; wall {wall:.0f} s for {FLAGS.steps} steps and the final "
        f"evaluation", flush=True)


if __name__ == "__main__":
  app.run(main)
