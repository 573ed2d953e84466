"""Config rules: every broken rule is one line, reported before any data is read."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from configs import demo_synthetic, match_rcnn_r50_fpn_1x_df2, tiny
from df2_jax import validate

ROOT = Path(__file__).resolve().parents[1]
# Values no rule accepts: a wrong type, below any minimum, outside [0, 1], an unknown name.
BAD_VALUES = ("nope", -7, 2.5, (1,), None, float("nan"), float("inf"))


@pytest.mark.parametrize("module", [tiny, demo_synthetic, match_rcnn_r50_fpn_1x_df2])
def test_the_shipped_configs_pass(module):
  config = module.get_config()
  if config.data.format == "raw":
    config.data.root = "/data/deepfashion2"
  assert validate.problems(config) == []


@pytest.mark.parametrize("path", sorted(validate.RULES))
def test_each_rule_rejects_a_bad_value_in_one_line_naming_the_field(path):
  rejected = 0
  for bad in BAD_VALUES:
    config = tiny.get_config()
    *parents, leaf = path.split(".")
    node = config
    for p in parents:
      node = node[p]
    with node.ignore_type():
      node[leaf] = bad
    found = validate.problems(config)
    mine = [line for line in found if line.startswith(f"config.{path} ")]
    if mine:
      rejected += 1
      assert len(mine) == 1 and "\n" not in mine[0], mine
  assert rejected >= 2, path


def test_nan_and_inf_fail_in_every_number_field():
  config = tiny.get_config()
  config.train.base_lr = float("nan")
  config.train.momentum = float("inf")
  config.train.weight_decay = float("-inf")
  config.train.loss_weights.box = float("nan")
  config.eval.gallery_score_threshold = float("nan")
  config.model.anchor_sizes = (32.0, 64.0, float("inf"), 256.0, 512.0)
  found = validate.problems(config)
  assert sorted(found) == sorted([
      "config.train.base_lr must be a finite number, got nan",
      "config.train.momentum must be a finite number, got inf",
      "config.train.weight_decay must be a finite number, got -inf",
      "config.train.loss_weights.box must be a finite number >= 0, got nan",
      "config.eval.gallery_score_threshold must be a finite number, got nan",
      "config.model.anchor_sizes entry inf must be a finite number",
  ]), found
  # A number field without a rule of its own is caught too.
  config = tiny.get_config()
  with config.ignore_type():
    config.eval.some_float = float("nan")
  assert validate.problems(config) == ["config.eval.some_float must be a finite number, got nan"]


def test_cross_field_rules_and_suggestions():
  config = tiny.get_config()
  config.data.short_side = 200  # > max_size 128
  config.data.bucket_canvases = ((96, 128), (96, 160))  # wider than the canvas (128, 128)
  config.model.detection_candidates = 5  # < detections_per_image 10
  config.train.decay_epochs = (11, 8)
  config.train.best_metric = "bbox/ap"
  config.train.loss_weights.lanmark = 1.0
  config.data.format = "raw"
  config.data.root = ""
  config.model.widht = 3
  found = validate.problems(config)
  expected = [
      "config.data.short_side (200) must be <= config.data.max_size (128)",
      "config.data.bucket_canvases entry (96, 160) must fit within config.data.canvas "
      "(128, 128) (the canvas that holds any image)",
      "config.data.root must be set for config.data.format='raw'",
      "config.model.widht is not a model field (did you mean 'width'?)",
      "config.model.detection_candidates (5) must be >= config.model.detections_per_image (10)",
      "config.train.decay_epochs must be in increasing order, got (11, 8)",
      "config.train.best_metric='bbox/ap' is not an evaluation metric (did you mean 'bbox/AP'?)",
      "config.train.loss_weights.lanmark is not a loss term (did you mean 'landmark'?)"]
  assert found == expected
  with pytest.raises(validate.ConfigError) as error:
    validate.validate(config)
  assert str(error.value).splitlines() == expected


def test_workdir_checks(tmp_path):
  validate.check_workdir(str(tmp_path / "new" / "run"), create=False)
  assert not (tmp_path / "new").exists()  # a read-only check creates nothing
  validate.check_workdir(str(tmp_path / "new" / "run"), create=True)
  assert (tmp_path / "new" / "run").is_dir() and not os.listdir(tmp_path / "new" / "run")
  (tmp_path / "file").write_text("x")
  with pytest.raises(validate.ConfigError, match="is a file, not a folder"):
    validate.check_workdir(str(tmp_path / "file"), create=True)
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):
      pytest.skip("running as a user who can write anywhere")
    with pytest.raises(validate.ConfigError, match="cannot be created or written"):
      validate.check_workdir(str(locked / "run"), create=True)
  finally:
    locked.chmod(0o700)


@pytest.mark.parametrize("args,line", [
    (["--config.data.canvas=128"],
     "Config error: config.data.canvas must be (height, width), each a positive multiple of 32"),
    (["--config.train.log_every_steps=0"],
     "Config error: config.train.log_every_steps must be >= 1, got 0"),
    (["--config.data.max_instances=0"],
     "Config error: config.data.max_instances must be >= 1, got 0"),
    (["--config.train.base_lr=nan"],
     "Config error: config.train.base_lr must be a finite number, got nan"),
    (["--config.train.nums_steps=3"],
     "FATAL Flags parsing error: --config.train.nums_steps: no such config field (did you "
     "mean 'num_steps'?)"),
    (["--workdir=/proc/df2_jax_test/run"],
     "Config error: --workdir /proc/df2_jax_test/run cannot be created or written"),
])
def test_run_py_fails_in_one_line_before_reading_data(tmp_path, args, line):
  data = tmp_path / "data"
  cmd = [sys.executable, "run.py", "--config", "configs/tiny.py", "--workdir",
         str(tmp_path / "run"), f"--config.data.synthetic_dir={data}"] + args
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                        check=False)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  lines = [l for l in proc.stderr.splitlines()
           if l.startswith(("Config error", "FATAL"))]
  assert len(lines) == 1 and lines[0].startswith(line), proc.stderr[-3000:]
  assert not data.exists()  # nothing generated or read
