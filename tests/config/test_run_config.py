"""Configs saved by runs: read back, and completed when an earlier version saved them."""

import json
from pathlib import Path

import pytest

from configs import tiny
from df2_jax.config import defaults, rules, run_config
from df2_jax.models.match_rcnn import model_from_config

# configs/tiny.py as the first version that saved configs with its runs (commit 856d38f,
# 2026-12-05) resolved and saved it: the oldest config a run may hold.
OLDEST = Path(__file__).with_name("tiny_config_saved_2026-12-05.json")


def _fields(node, prefix=""):
  for key, value in node.items():
    if isinstance(value, dict) or hasattr(value, "to_dict"):
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}"


def test_the_oldest_saved_config_is_completed_with_what_its_version_did():
  old = json.loads(OLDEST.read_text())
  added = set(_fields(defaults.get_config())) - set(_fields(old))
  # Every field added since is completed by upgrade (a new field gets its UPGRADES entry).
  assert added and added <= set(run_config.UPGRADES), sorted(added - set(run_config.UPGRADES))
  config = run_config.config_from_json(old)
  rules.validate(config)
  assert set(_fields(config)) == set(_fields(defaults.get_config()))
  for path in added:
    section, leaf = path.rsplit(".", 1)
    assert config[section][leaf] == run_config.UPGRADES[path], path
  # What that version's model was: L1 box regression and soft mask targets.
  model = model_from_config(config).config
  assert (model.box_loss_beta, model.rpn_box_loss_beta, model.mask_binary_targets) == (
      0.0, 0.0, False)
  # The fields it had are kept as they were.
  assert config.model.stage_sizes == tuple(old["model"]["stage_sizes"]) == (1, 1, 1, 1)
  assert config.train.num_steps == old["train"]["num_steps"]


def test_a_current_config_reads_back_as_it_was():
  config = tiny.get_config()
  again = run_config.config_from_json(run_config.as_dict(config))
  assert again.to_dict() == config.to_dict()
  assert isinstance(again.data.bucket_canvases, tuple) and isinstance(again.data.canvas, tuple)


def test_upgrade_keeps_what_a_config_has_and_leaves_unknown_gaps_to_the_rules():
  data = run_config.as_dict(tiny.get_config())
  data["model"]["box_loss_beta"] = 0.5
  del data["model"]["width"]  # no version saved a config without it: not completed
  config = run_config.config_from_json(data)
  assert config.model.box_loss_beta == 0.5
  with pytest.raises(rules.ConfigError, match=r"config.model.width is missing"):
    rules.validate(config)
