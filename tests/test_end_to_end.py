"""The whole system on the tiny config: train, checkpoint, evaluate, resume."""

import json
import os

import numpy as np

from configs import tiny
from df2_jax import checkpoint, train


def test_train_checkpoint_evaluate_and_resume(tmp_path):
  config = tiny.get_config()
  config.data.synthetic_dir = str(tmp_path / "data")
  config.train.num_steps = 10
  config.train.checkpoint_every_steps = 5
  workdir = str(tmp_path / "run")

  metrics = train.train_and_evaluate(config, workdir)
  manager = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert manager.all_steps() == [5, 10]
  manager.close()
  # Evaluation files of step 10, every metric a number in [0, 1].
  outdir = os.path.join(workdir, "eval_10")
  for name in ("bbox_results.json", "segm_results.json", "keypoints_results.json",
               "retrieval_submission.json", "metrics.json"):
    assert os.path.exists(os.path.join(outdir, name)), name
  for kind in ("bbox", "segm", "keypoints", "keypoints_visible"):
    assert 0.0 <= metrics[kind]["AP"] <= 1.0
  for kind in ("retrieval", "retrieval_gt_boxes"):
    assert 0.0 <= metrics[kind]["top1"] <= metrics[kind]["top20"] <= 1.0
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["step"] for m in logged] == [5, 10]
  assert all(np.isfinite(m["loss"]) for m in logged)

  # The same command again with more steps resumes at step 10 and stops at 15.
  config.train.num_steps = 15
  state = train.train(config, workdir)
  assert int(state.step) == 15
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["step"] for m in logged] == [5, 10, 15]
