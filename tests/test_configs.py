"""Every shipped config loads, builds its model config, and derives a positive step count."""

import importlib

import pytest

from df2_jax import schedules
from df2_jax.models.match_rcnn import MatchRCNNConfig


@pytest.mark.parametrize("name", ["match_rcnn_r50_fpn_1x_df2", "demo_synthetic", "tiny"])
def test_config_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  fields = dict(config.model.to_dict())
  fields["stage_sizes"] = tuple(fields["stage_sizes"])
  MatchRCNNConfig(**fields)  # an unknown or misspelt model field raises here
  assert config.train.optimizer in ("sgd", "adamw")
  assert all(0 <= e < config.train.epochs for e in config.train.decay_epochs)
  assert 0.0 < config.eval.gallery_nms_threshold <= 1.0


def test_demo_schedule():
  """The demo: 200 image pairs, 2 per step -> 100 steps per epoch, 20 epochs, x0.1 at steps
  1500 and 1800."""
  from configs import demo_synthetic
  tc = demo_synthetic.get_config().train
  spe = schedules.steps_per_epoch(demo_synthetic.get_config().data.synthetic_train_pairs,
                                  tc.global_batch_pairs)
  assert spe == 100 and tc.epochs * spe == 2000
  lr = schedules.step_decay_schedule(tc.base_lr, spe, tuple(tc.decay_epochs), 0.1,
                                     tc.warmup_steps, tc.warmup_factor)
  assert float(lr(1499)) == pytest.approx(1e-3)
  assert float(lr(1500)) == pytest.approx(1e-4)
  assert float(lr(1800)) == pytest.approx(1e-5)
