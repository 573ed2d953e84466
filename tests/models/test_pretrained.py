"""Tests for df2_jax.models.pretrained: torchvision ResNet state dicts -> the Flax ResNet.

The files are written from numpy with torchvision's names and shapes, so no torch is needed;
the comparison against torchvision's own forward pass runs only where torch and torchvision
are installed.
"""

import logging
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from df2_jax.models import pretrained
from df2_jax.models import resnet

TINY = dict(stage_sizes=(1, 2, 1, 1), width=4)  # has a layer2.1; 1 + 5 * 3 + 4 = 20 convs


def _template(**kw):
  """(params, constants) ShapeDtypeStructs of a ResNet (no real init: nothing is compiled)."""
  shapes = jax.eval_shape(resnet.ResNet(**kw).init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 64, 64, 3), jnp.float32))
  return shapes['params'], shapes.get('constants', {})  # GN has no constants


def _tv_name(path):
  """The test's own Flax path -> torchvision name (independent of pretrained.torch_name)."""
  s = '.'.join(path)
  s = re.sub(r'layer(\d+)_(\d+)', r'layer\1.\2', s)
  s = s.replace('downsample_conv', 'downsample.0').replace('downsample_bn', 'downsample.1')
  return re.sub(r'\.kernel$', '.weight', s)


def _leaves(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {tuple(k.key for k in p): leaf for p, leaf in flat}


def _fake_state_dict(params, constants, seed=0):
  """A torchvision-style state dict for a template: random OIHW conv weights, random BN
  vectors (positive running_var), one int64 num_batches_tracked per BN, and fc [1000, C5]."""
  rng = np.random.default_rng(seed)
  sd = {}
  for path, leaf in _leaves(params).items():
    h, w, i, o = leaf.shape
    sd[_tv_name(path)] = rng.standard_normal((o, i, h, w), dtype=np.float32)
  for path, leaf in _leaves(constants).items():
    if path[-1] == 'running_var':
      sd[_tv_name(path)] = rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
      sd[_tv_name(path[:-1]) + '.num_batches_tracked'] = np.asarray(12345, np.int64)
    else:
      sd[_tv_name(path)] = rng.standard_normal(leaf.shape, dtype=np.float32)
  c5 = max(leaf.shape[-1] for leaf in jax.tree.leaves(params))
  sd['fc.weight'] = rng.standard_normal((1000, c5), dtype=np.float32)
  sd['fc.bias'] = rng.standard_normal((1000,), dtype=np.float32)
  return sd


def _assert_loaded_equal(sd, params, constants, new_params, new_constants):
  """Every loaded leaf equals the file's tensor (kernels OIHW -> HWIO), float32, same trees."""
  assert jax.tree.structure(new_params) == jax.tree.structure(params)
  assert jax.tree.structure(new_constants) == jax.tree.structure(constants)
  n = 0
  for template, loaded in ((params, new_params), (constants, new_constants)):
    want = _leaves(template)
    for path, value in _leaves(loaded).items():
      assert value.dtype == np.float32 and value.shape == want[path].shape, path
      expected = sd[_tv_name(path)]
      if path[-1] == 'kernel':
        expected = expected.transpose(2, 3, 1, 0)
      np.testing.assert_array_equal(np.asarray(value), expected, err_msg=str(path))
      n += 1
  return n


@pytest.fixture(scope='module')
def resnet50_file(tmp_path_factory):
  """A ResNet-50 .safetensors with torchvision's names and shapes (about 100 MB)."""
  params, constants = _template()
  sd = _fake_state_dict(params, constants)
  path = tmp_path_factory.mktemp('weights') / 'resnet50.safetensors'
  save_file(sd, str(path))
  return path, sd, params, constants


def test_resnet50_names_shapes_and_count(resnet50_file):
  _, sd, _, _ = resnet50_file
  # Hand-written torchvision names and shapes.
  assert sd['conv1.weight'].shape == (64, 3, 7, 7)
  assert sd['bn1.running_mean'].shape == (64,)
  assert sd['layer1.0.downsample.0.weight'].shape == (256, 64, 1, 1)
  assert sd['layer1.0.downsample.1.weight'].shape == (256,)
  assert sd['layer2.0.conv2.weight'].shape == (128, 128, 3, 3)
  assert sd['layer3.5.conv3.weight'].shape == (1024, 256, 1, 1)
  assert sd['layer4.2.bn3.running_var'].shape == (2048,)
  assert sd['fc.weight'].shape == (1000, 2048)
  # resnet50: 1 stem conv + 16 blocks * 3 convs + 4 downsample convs = 53 convs, each with a BN
  # of 5 entries (weight, bias, running_mean, running_var, num_batches_tracked), plus fc.
  assert 1 + (3 + 4 + 6 + 3) * 3 + 4 == 53
  assert len(sd) == 53 + 53 * 5 + 2 == 320  # len(torchvision.models.resnet50().state_dict())
  assert sum(k.endswith('.num_batches_tracked') for k in sd) == 53
  assert sum(v.ndim == 4 for v in sd.values()) == 53


def test_resnet50_safetensors_loads_every_tensor(resnet50_file):
  path, sd, params, constants = resnet50_file
  read = pretrained.read_state_dict(path)
  assert set(read) == set(sd)
  assert read['bn1.num_batches_tracked'].dtype == np.int64
  new_params, new_constants = pretrained.resnet_variables_from_state_dict(
      read, params, constants, source=str(path))
  assert _assert_loaded_equal(sd, params, constants, new_params, new_constants) == 320 - 55
  assert new_params['conv1']['kernel'].shape == (7, 7, 3, 64)
  np.testing.assert_array_equal(new_params['layer1_0']['downsample_conv']['kernel'][0, 0],
                                sd['layer1.0.downsample.0.weight'][:, :, 0, 0].T)
  np.testing.assert_array_equal(new_constants['layer4_2']['bn3']['running_var'],
                                sd['layer4.2.bn3.running_var'])


def test_torch_name_mapping():
  assert pretrained.torch_name(('conv1', 'kernel')) == 'conv1.weight'
  assert pretrained.torch_name(('layer3_5', 'bn2', 'running_mean')) == 'layer3.5.bn2.running_mean'
  assert (pretrained.torch_name(('layer1_0', 'downsample_conv', 'kernel'))
          == 'layer1.0.downsample.0.weight')
  assert (pretrained.torch_name(('layer4_0', 'downsample_bn', 'bias'))
          == 'layer4.0.downsample.1.bias')
  with pytest.raises(ValueError, match='scale'):
    pretrained.torch_name(('bn1', 'gn', 'scale'))


@pytest.fixture
def tiny():
  params, constants = _template(**TINY)
  return params, constants, _fake_state_dict(params, constants, seed=1)


def _error(tmp_path, sd, params, constants, name='bad.safetensors'):
  path = tmp_path / name
  save_file(sd, str(path))
  with pytest.raises(ValueError) as e:
    pretrained.resnet_variables_from_state_dict(pretrained.read_state_dict(path), params,
                                                constants, source=str(path))
  assert str(path) in str(e.value)
  return str(e.value)


def test_renamed_tensor_names_unexpected_and_missing(tmp_path, tiny):
  params, constants, sd = tiny
  sd['layer2.1.conv2.weigth'] = sd.pop('layer2.1.conv2.weight')
  msg = _error(tmp_path, sd, params, constants)
  assert '1 unexpected, 1 missing' in msg
  assert "unexpected tensor 'layer2.1.conv2.weigth'" in msg
  assert "missing tensor 'layer2.1.conv2.weight' (model variable params/layer2_1/conv2/kernel)" \
      in msg


def test_misshaped_tensors_name_path_and_shapes(tmp_path, tiny):
  params, constants, sd = tiny
  assert sd['layer1.0.conv1.weight'].shape == (4, 4, 1, 1)
  sd['layer1.0.conv1.weight'] = np.zeros((4, 4, 3, 3), np.float32)
  assert sd['layer3.0.bn2.running_var'].shape == (16,)
  sd['layer3.0.bn2.running_var'] = np.ones((17,), np.float32)
  msg = _error(tmp_path, sd, params, constants)
  assert '2 shape mismatch' in msg
  assert ("shape mismatch for 'layer1.0.conv1.weight': file [4, 4, 3, 3], model "
          "params/layer1_0/conv1/kernel expects [4, 4, 1, 1] (OIHW; HWIO [1, 1, 4, 4])") in msg
  assert ("shape mismatch for 'layer3.0.bn2.running_var': file [17], model "
          "constants/layer3_0/bn2/running_var expects [16]") in msg


def test_all_problems_in_one_message(tmp_path, tiny):
  params, constants, _ = tiny
  # A width-8 file into the width-4 model: all 20 convs and 20 * 4 BN vectors mismatch.
  wide = _fake_state_dict(*_template(stage_sizes=TINY['stage_sizes'], width=8))
  msg = _error(tmp_path, wide, params, constants)
  assert '(100 shape mismatch)' in msg
  assert msg.count('shape mismatch for') == 10
  assert msg.endswith('... and 90 more')


def test_module_prefix_is_stripped(tmp_path, tiny):
  params, constants, sd = tiny
  path = tmp_path / 'dp.safetensors'
  save_file({'module.' + k: v for k, v in sd.items()}, str(path))
  read = pretrained.read_state_dict(path)
  assert set(read) == set(sd)
  loaded = pretrained.resnet_variables_from_state_dict(read, params, constants)
  assert _assert_loaded_equal(sd, params, constants, *loaded) == 20 * 5


def test_unwrap_state_dict_and_model_wrappers():
  x = np.zeros(3, np.float32)
  assert pretrained._unwrap({'state_dict': {'module.conv1.weight': x}}, 'f') == {
      'conv1.weight': x}
  assert pretrained._unwrap({'model': {'conv1.weight': x}}, 'f') == {'conv1.weight': x}
  # A dict with more than the wrapper key is the state dict itself (and then fails the check).
  assert set(pretrained._unwrap({'model': {}, 'epoch': 3}, 'f')) == {'model', 'epoch'}


def test_file_errors(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match='nope.pth'):
    pretrained.read_state_dict(tmp_path / 'nope.pth')
  (tmp_path / 'weights.bin').write_bytes(b'')
  with pytest.raises(ValueError, match=r"weights\.bin: unknown extension '\.bin'"):
    pretrained.read_state_dict(tmp_path / 'weights.bin')
  (tmp_path / 'resnet50.pth').write_bytes(b'')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` raises ImportError
  with pytest.raises(ImportError) as e:
    pretrained.read_state_dict(tmp_path / 'resnet50.pth')
  msg = str(e.value)
  assert str(tmp_path / 'resnet50.pth') in msg and 'needs torch' in msg
  assert 'from safetensors.torch import save_file' in msg and '.safetensors' in msg


def test_group_norm_template_is_rejected(tiny):
  _, _, sd = tiny
  params, constants = _template(norm='GN', **TINY)
  with pytest.raises(ValueError, match=r"norm='FrozenBN'.*norm='GN'"):
    pretrained.resnet_variables_from_state_dict(sd, params, constants, source='x.safetensors')


def test_load_backbone_weights_replaces_only_the_backbone(tmp_path, tiny, caplog):
  params, constants, sd = tiny
  path = tmp_path / 'resnet.safetensors'
  save_file(sd, str(path))
  fpn = {'conv': {'kernel': np.ones((1, 1, 4, 2), np.float32)}}
  fpn_constants = {'anchors': np.zeros((5, 4), np.float32)}
  variables = {'params': {'backbone': params, 'fpn': fpn},
               'constants': {'backbone': constants, 'fpn': fpn_constants},
               'batch_stats': {'x': np.ones(2)}}
  with caplog.at_level(logging.INFO, logger=pretrained.__name__):
    out = pretrained.load_backbone_weights(variables, path)
  assert out is not variables and set(out) == set(variables)
  assert out['params']['fpn'] is fpn and out['constants']['fpn'] is fpn_constants
  assert out['batch_stats'] is variables['batch_stats']
  assert variables['params']['backbone'] is params  # the input is not modified
  assert _assert_loaded_equal(sd, params, constants, out['params']['backbone'],
                              out['constants']['backbone']) == 20 * 5
  assert len(sd) == 20 * 6 + 2
  assert (f"Loaded 100 ResNet tensors from {path} into 'backbone'; ignored 22 "
          "(fc.bias, fc.weight, 20 *.num_batches_tracked)") in caplog.text
  with pytest.raises(ValueError, match="no 'resnet' subtree"):
    pretrained.load_backbone_weights(variables, path, backbone='resnet')


def test_matches_torchvision_resnet50(tmp_path):
  torch = pytest.importorskip('torch')
  torchvision = pytest.importorskip('torchvision')
  torch.manual_seed(0)
  model = torchvision.models.resnet50().eval()
  with torch.no_grad():  # random BN statistics and affine params: BN is not the identity
    for m in model.modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        m.weight.uniform_(0.5, 1.5)
        m.bias.normal_(0.0, 0.2)
        m.running_mean.normal_(0.0, 0.2)
        m.running_var.uniform_(0.5, 2.0)
  sd = model.state_dict()
  assert len(sd) == 320
  path = tmp_path / 'resnet50.pth'
  torch.save({'state_dict': {'module.' + k: v for k, v in sd.items()}}, path)  # wrapped

  params, constants = _template()
  variables = pretrained.load_backbone_weights(
      {'params': {'backbone': params}, 'constants': {'backbone': constants}}, path)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (1, 224, 320, 3), dtype=np.uint8)
  x = resnet.normalize_image(images)
  with jax.default_matmul_precision('float32'):
    feats = jax.jit(resnet.ResNet().apply)(
        {'params': variables['params']['backbone'],
         'constants': variables['constants']['backbone']}, x)

  # torchvision on the same normalised input: 0..1 RGB, mean/std as in its transforms.
  ref = (torch.from_numpy(images).float() / 255 - torch.tensor([0.485, 0.456, 0.406])) \
      / torch.tensor([0.229, 0.224, 0.225])
  np.testing.assert_allclose(np.asarray(x), ref.numpy(), rtol=1e-5, atol=1e-5)
  with torch.no_grad():
    y = model.maxpool(model.relu(model.bn1(model.conv1(ref.permute(0, 3, 1, 2)))))
    errors = {}
    for level, layer in zip(('C2', 'C3', 'C4', 'C5'),
                            (model.layer1, model.layer2, model.layer3, model.layer4)):
      y = layer(y)
      b = y.permute(0, 2, 3, 1).numpy()
      a = np.asarray(feats[level])
      assert a.shape == b.shape
      assert np.mean(b > 0) > 0.1  # not dead
      # Both run in float32 and differ only in summation order: the error relative to the
      # level's scale grows roughly like sqrt(fan_in) * eps32 per conv over up to 53 convs.
      # Measured (torch 2.14.1, CPU): 1.4e-6 (C2), 1.7e-6, 2.5e-6, 2.9e-6 (C5); 1e-4 leaves
      # a 35x margin, while a wrong kernel transpose (H and W swapped) gives 0.5 to 0.6.
      errors[level] = float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
  print('max |jax - torch| / max |torch| per level:', errors)
  assert all(e <= 1e-4 for e in errors.values()), errors
