"""Every shipped config loads, builds its model config, and derives a positive step count."""

import importlib

import pytest

from df2_jax import schedules
from df2_jax.models.match_rcnn import model_from_config


@pytest.mark.parametrize("name", ["match_rcnn_r50_fpn_1x_df2", "demo_synthetic", "tiny",
                                  "own_coco"])
def test_config_builds(name):
  config = importlib.import_module(f"configs.{name}").get_config()
  model = model_from_config(config)  # an unknown or misspelt model field raises here
  assert len(model.config.anchor_sizes) == 5
  assert config.train.optimizer in ("sgd", "adamw")
  assert all(0 <= e < config.train.epochs for e in config.train.decay_epochs)
  assert 0.0 < config.eval.gallery_nms_threshold <= 1.0


def test_demo_schedule():
  """The demo: 3600 images (1800 pairs) -> 1800 elements, 2 per step -> 900 steps per epoch,
  5 epochs, x0.1 at step 3600."""
  from configs import demo_synthetic
  config = demo_synthetic.get_config()
  tc = config.train
  elements = 2 * config.data.synthetic_train_pairs // 2  # two images per element
  spe = schedules.steps_per_epoch(elements, tc.global_batch_pairs)
  assert spe == 900 and tc.epochs * spe == 4500
  lr = schedules.step_decay_schedule(tc.base_lr, spe, tuple(tc.decay_epochs), 0.1,
                                     tc.warmup_steps, tc.warmup_factor)
  assert float(lr(3599)) == pytest.approx(1e-3)
  assert float(lr(3600)) == pytest.approx(1e-4)
  assert float(lr(4499)) == pytest.approx(1e-4)
