"""Config rules: every broken rule is one line, reported before any data is read."""

import dataclasses
import re
from pathlib import Path
import os

import pytest

from configs import demo_synthetic, match_rcnn_r50_fpn_1x_df2, tiny
from df2_jax import files
from df2_jax.config import defaults, rules
from df2_jax.models import match_rcnn

# Values no rule accepts: a wrong type, below any minimum, outside [0, 1], an unknown name.
BAD_VALUES = ("nope", -7, 2.5, (1,), None, float("nan"), float("inf"))


@pytest.mark.parametrize("module", [tiny, demo_synthetic, match_rcnn_r50_fpn_1x_df2])
def test_the_shipped_configs_pass(module):
  config = module.get_config()
  if config.data.format == "raw":
    config.data.root = "/data/deepfashion2"
  assert rules.problems(config) == []


@pytest.mark.parametrize("path", sorted(rules.RULES))
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
    found = rules.problems(config)
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
  found = rules.problems(config)
  assert sorted(found) == sorted([
      "config.train.base_lr must be a finite number, got nan",
      "config.train.momentum must be a finite number, got inf",
      "config.train.weight_decay must be a finite number, got -inf",
      "config.train.loss_weights.box must be a finite number, got nan",
      "config.eval.gallery_score_threshold must be a finite number, got nan",
      "config.model.anchor_sizes entry inf must be a finite number",
  ]), found
  # A field the defaults do not have is refused whatever its value.
  config = tiny.get_config()
  with config.ignore_type():
    config.eval.some_float = float("nan")
  assert rules.problems(config) == ["config.eval.some_float is not a config field"]


def _fields(node, prefix=""):
  """Dotted paths of every field of a config (sections entered, sequences are values)."""
  for key, value in node.items():
    if hasattr(value, "items"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_every_field_of_the_defaults_has_a_rule_and_every_rule_a_field():
  """A new config field fails here until it gets its rule (and a rule of a removed field)."""
  fields = set(_fields(defaults.get_config()))
  assert sorted(fields - set(rules.RULES)) == []
  assert sorted(set(rules.RULES) - fields) == []


def test_every_model_field_is_in_the_defaults_and_nothing_else_is_under_model():
  """``MatchRCNNConfig`` takes its every value from config.model (no defaults of its own):
  each of its fields is a field of the defaults, and config.model holds nothing else but the
  initialisation fields."""
  model_fields = {f.name for f in dataclasses.fields(match_rcnn.MatchRCNNConfig)}
  given = set(defaults.get_config().model.keys())
  assert sorted(model_fields - given) == []
  assert sorted(given - model_fields) == sorted(match_rcnn.INIT_FIELDS)
  assert all(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
             for f in dataclasses.fields(match_rcnn.MatchRCNNConfig))


def test_a_missing_field_is_named():
  config = tiny.get_config()
  del config.model["width"]
  del config.eval["allow_skipped"]
  found = rules.problems(config)
  assert sorted(line.split(" is missing")[0] for line in found) == [
      "config.eval.allow_skipped", "config.model.width"], found


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
  found = rules.problems(config)
  expected = [  # unknown fields, each field's rule, then the rules between fields
      "config.model.widht is not a model field (did you mean 'width'?)",
      "config.train.loss_weights.lanmark is not a loss term (did you mean 'landmark'?)",
      "config.train.best_metric 'bbox/ap' is not an evaluation metric (did you mean 'bbox/AP'?)",
      "config.data.short_side (200) must be <= config.data.max_size (128)",
      "config.data.bucket_canvases entry (96, 160) must fit within config.data.canvas "
      "(128, 128) (the canvas that holds any image)",
      "config.data.root must be set for config.data.format='raw'",
      "config.model.detection_candidates (5) must be >= config.model.detections_per_image (10)",
      "config.train.decay_epochs must be in increasing order, got (11, 8)"]
  assert found == expected
  with pytest.raises(rules.ConfigError) as error:
    rules.validate(config)
  assert str(error.value).splitlines() == expected


def test_workdir_checks(tmp_path):
  files.check_writable(str(tmp_path / "new" / "run"), create=False)
  assert not (tmp_path / "new").exists()  # a read-only check creates nothing
  files.check_writable(str(tmp_path / "new" / "run"), create=True)
  assert (tmp_path / "new" / "run").is_dir() and not os.listdir(tmp_path / "new" / "run")
  (tmp_path / "file").write_text("x")
  with pytest.raises(files.NotWritable, match="is a file, not a folder"):
    files.check_writable(str(tmp_path / "file"), create=True)
  locked = tmp_path / "locked"
  locked.mkdir()
  locked.chmod(0o500)
  try:
    if os.access(locked, os.W_OK):
      pytest.skip("running as a user who can write anywhere")
    with pytest.raises(files.NotWritable, match="cannot be created or written"):
      files.check_writable(str(locked / "run"), create=True)
  finally:
    locked.chmod(0o700)


def test_the_code_reads_config_fields_directly():
  """One default per field: no ``config.<section>.get(field, default)`` in the packages (a
  config saved by an earlier version is completed by ``run_config.upgrade`` instead)."""
  root = Path(__file__).resolve().parents[2]
  pattern = re.compile(r"config\.(data|model|train|eval)\.get\(")
  found = [f"{p.relative_to(root)}:{n}" for package in ("df2_jax", "data_pipeline")
           for p in sorted((root / package).rglob("*.py"))
           for n, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
  assert found == []
