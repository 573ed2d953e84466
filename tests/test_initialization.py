"""A fresh run's variables: ImageNet backbone weights through the config, warm starts from
another run's checkpoint, and the settings that must fail at start."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from configs import match_rcnn_r50_fpn_1x_df2, tiny
from data_pipeline import transforms
from df2_jax import checkpoint, initialization, train
from df2_jax.config import rules
from df2_jax.models import pretrained
from df2_jax.models.match_rcnn import init_variables, model_from_config


def _tiny_config(tmp_path, **model):
  config = tiny.get_config()
  config.data.synthetic_dir = str(tmp_path / "data")
  config.model.update(model)
  return config


def _abstract_variables(config):
  """The tiny model's variables as ShapeDtypeStructs (traced, nothing compiled)."""
  batch = transforms.zero_train_batch(transforms.geometry_from_config(config.data), 1)
  return jax.eval_shape(lambda: init_variables(model_from_config(config),
                                               jax.random.key(0), batch))


def _torchvision_file(path, abstract, rename=None):
  """A .safetensors file with torchvision's names for the model's ResNet, random values
  (conv weights OIHW, positive running_var), plus the classifier and a counter to ignore."""
  rng = np.random.default_rng(0)
  tensors = {}
  for collection in ("params", "constants"):
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract[collection]["backbone"])
    for keys, leaf in flat:
      name = pretrained.torch_name(tuple(k.key for k in keys))
      shape = leaf.shape
      if len(shape) == 4:  # HWIO -> OIHW
        shape = (shape[3], shape[2], shape[0], shape[1])
      value = rng.normal(size=shape).astype(np.float32)
      tensors[name] = np.abs(value) + 0.5 if name.endswith("running_var") else value
  tensors["fc.weight"] = np.zeros((10, 4), np.float32)
  tensors["bn1.num_batches_tracked"] = np.zeros((), np.int64)
  if rename:
    tensors[rename[1]] = tensors.pop(rename[0])
  save_file(tensors, str(path))
  return tensors


def test_the_1x_recipe_without_weights_fails_at_start(tmp_path):
  config = match_rcnn_r50_fpn_1x_df2.get_config()
  config.data.root = str(tmp_path / "no_data")  # never reached
  with pytest.raises(ValueError, match="backbone_weights is empty") as error:
    train.train(config, str(tmp_path / "run"))
  assert "resnet50-0676ba61.pth" in str(error.value)
  assert "--config.model.backbone_weights=" in str(error.value)
  config.model.backbone_weights = str(tmp_path / "missing.pth")
  with pytest.raises(rules.ConfigError, match="missing.pth"):
    train.train(config, str(tmp_path / "run"))


def test_training_from_scratch_configs_need_no_weights():
  for config in (tiny.get_config(),):
    initialization.check_weight_files(config)  # freeze_at=0: a random backbone can learn
  config = tiny.get_config()
  config.model.freeze_at = 2
  with pytest.raises(ValueError, match="freeze_at=2"):
    initialization.check_weight_files(config)
  config.model.norm = "GN"
  initialization.check_weight_files(config)


def test_backbone_weights_load_through_the_config(tmp_path):
  """The 1x recipe's ResNet-50 (torchvision's 265 tensors + fc + a counter) on a small canvas."""
  config = match_rcnn_r50_fpn_1x_df2.get_config()
  config.data.update(dict(canvas=(128, 128), short_side=96, max_size=128, max_instances=2,
                          mask_size=28))
  config.model.backbone_weights = str(tmp_path / "r.safetensors")
  abstract = _abstract_variables(config)
  tensors = _torchvision_file(tmp_path / "r.safetensors", abstract)
  loaded = initialization.initial_variables(config, abstract)
  backbone = {"params": loaded["params"]["backbone"], "constants": loaded["constants"]["backbone"]}
  checked = 0
  for collection, tree in backbone.items():
    for keys, value in jax.tree_util.tree_flatten_with_path(tree)[0]:
      want = tensors[pretrained.torch_name(tuple(k.key for k in keys))]
      if want.ndim == 4:
        want = want.transpose(2, 3, 1, 0)
      np.testing.assert_array_equal(value, want)
      checked += 1
  assert checked == len(tensors) - 2 == 265  # every tensor but fc.weight and the counter
  assert tensors["layer4.2.conv3.weight"].shape == (2048, 512, 1, 1)
  # Everything outside the ResNet is still to be initialised; fill() takes it from the init.
  assert isinstance(loaded["params"]["fpn"]["lateral_2"]["kernel"], jax.ShapeDtypeStruct)
  ones = jax.tree_util.tree_map(lambda s: np.ones(s.shape, s.dtype), abstract)
  merged = initialization.fill(loaded, ones)
  np.testing.assert_array_equal(merged["params"]["fpn"]["lateral_2"]["kernel"], 1.0)
  assert merged["params"]["backbone"]["conv1"]["kernel"] is loaded["params"]["backbone"]["conv1"][
      "kernel"]
  np.testing.assert_array_equal(merged["constants"]["backbone"]["bn1"]["running_var"],
                                tensors["bn1.running_var"])


def test_a_misnamed_tensor_fails_at_start_naming_it(tmp_path):
  config = _tiny_config(tmp_path, freeze_at=2, backbone_weights=str(tmp_path / "r.safetensors"))
  _torchvision_file(tmp_path / "r.safetensors", _abstract_variables(config),
                    rename=("layer2.0.conv2.weight", "layer2.0.conv2.weigth"))
  with pytest.raises(ValueError) as error:
    train.train(config, str(tmp_path / "run"))  # before the data is generated or read
  assert "'layer2.0.conv2.weigth'" in str(error.value)  # unexpected
  assert "'layer2.0.conv2.weight'" in str(error.value)  # missing
  assert not (tmp_path / "data").exists()


def _save(directory, step, params, constants):
  with checkpoint.CheckpointManager(directory) as manager:
    manager.save(step, {"params": params, "constants": constants}, force=True)


def test_warm_start_loads_matching_names_and_shapes(tmp_path, caplog):
  ours = {"params": {"head": {"kernel": np.zeros((2, 3), np.float32)},
                     "new": {"kernel": np.zeros((4,), np.float32)},
                     "cls": {"kernel": np.zeros((5,), np.float32)}},
          "constants": {"bn": {"mean": np.zeros((3,), np.float32)}}}
  theirs = {"head": {"kernel": np.full((2, 3), 7.0, np.float32)},
            "cls": {"kernel": np.ones((14,), np.float32)},  # another class count
            "old": {"kernel": np.ones((2,), np.float32)}}
  _save(str(tmp_path / "run" / "checkpoints"), 30,
        theirs, {"bn": {"mean": np.array([1.0, 2.0, 3.0], np.float32)}})
  _save(str(tmp_path / "run" / "checkpoints"), 40,
        jax.tree_util.tree_map(lambda x: x * 2, theirs), {"bn": {"mean": np.zeros(3)}})
  config = tiny.get_config()
  config.model.init_from = str(tmp_path / "run")  # a workdir: its checkpoints/ are read
  config.model.init_from_step = 30
  with caplog.at_level(logging.INFO):
    out = initialization.initial_variables(config, ours)
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], 7.0)
  np.testing.assert_array_equal(out["constants"]["bn"]["mean"], [1.0, 2.0, 3.0])
  assert out["params"]["new"]["kernel"] is ours["params"]["new"]["kernel"]  # not in theirs
  assert out["params"]["cls"]["kernel"] is ours["params"]["cls"]["kernel"]  # shape differs
  assert "loaded 2 of our 4 arrays" in caplog.text
  assert "params/new/kernel" in caplog.text and "params/cls/kernel (14,)" in caplog.text
  assert "params/old/kernel" in caplog.text  # unused
  # The latest step by default, and a checkpoint directory works as well as a workdir.
  config.model.init_from = str(tmp_path / "run" / "checkpoints")
  config.model.init_from_step = -1
  out = initialization.initial_variables(config, ours)
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], 14.0)
  # A checkpoint of another model altogether fails.
  with pytest.raises(ValueError, match="none of its 4 arrays"):
    initialization.warm_start({"params": {"x": jnp.zeros((1,))}, "constants": {}},
                              str(tmp_path / "run"))
