"""Tests for the ResNet backbone, the FPN and the RPN head (tiny widths)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from df2_jax.models import fpn as fpn_lib
from df2_jax.models import resnet
from df2_jax.models import rpn
from df2_jax.ops import anchors as anchor_ops

H, W = 64, 96  # a canvas that is a multiple of 32
WIDTH = 8  # tiny ResNet: C2..C5 have 32, 64, 128, 256 channels


def _images(b=2, h=H, w=W, seed=0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))


def _leaves_with_paths(tree):
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(str(k.key) for k in path): leaf for path, leaf in flat}


def _np_variables(module, *inputs, seed=0):
  """Variables of `module` filled with numpy values (no jitted RNG init).

  XLA:CPU takes about a second to compile each jax.random.normal of a
  model's init; the forward tests only need reasonable values: kernels
  N(0, 2 / fan_out), biases and BN shifts 0, BN scales and variances 1.
  """
  shapes = jax.eval_shape(module.init, jax.random.PRNGKey(0), *inputs)
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
      return jnp.asarray(rng.normal(0, np.sqrt(2 / fan_out), leaf.shape),
                         leaf.dtype)
    if name in ('weight', 'running_var'):
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.zeros(leaf.shape, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def resnet50_shapes():
  model = resnet.ResNet()
  return jax.eval_shape(model.init, jax.random.PRNGKey(0),
                        jnp.zeros((1, 64, 64, 3), jnp.float32))


def test_resnet50_parameter_count_matches_torchvision(resnet50_shapes):
  # torchvision resnet50: 25,557,032 parameters in total; minus fc
  # (2048 * 1000 + 1000 = 2,049,000) and the BN weights and biases
  # (2 * 26,560 channels = 53,120) leaves 23,454,912 conv weights.
  params = resnet50_shapes['params']
  assert sum(x.size for x in jax.tree.leaves(params)) == 23_454_912
  assert 25_557_032 - 2_049_000 - 53_120 == 23_454_912
  # Frozen BN: 4 vectors of the 26,560 BN channels, none of them params.
  constants = resnet50_shapes['constants']
  assert sum(x.size for x in jax.tree.leaves(constants)) == 4 * 26_560
  assert all(k.endswith('kernel') for k in _leaves_with_paths(params))


def test_resnet50_names_match_torchvision(resnet50_shapes):
  params = resnet50_shapes['params']
  constants = resnet50_shapes['constants']
  blocks = {f'layer{i}_{j}' for i, n in zip((1, 2, 3, 4), (3, 4, 6, 3))
            for j in range(n)}
  assert set(params) == {'conv1'} | blocks
  assert set(constants) == {'bn1'} | blocks
  assert params['conv1']['kernel'].shape == (7, 7, 3, 64)
  assert params['layer1_0']['conv1']['kernel'].shape == (1, 1, 64, 64)
  assert params['layer1_0']['conv3']['kernel'].shape == (1, 1, 64, 256)
  assert params['layer2_0']['conv2']['kernel'].shape == (3, 3, 128, 128)
  assert params['layer4_0']['downsample_conv']['kernel'].shape == (
      1, 1, 1024, 2048)
  assert set(params['layer1_0']) == {'conv1', 'conv2', 'conv3',
                                     'downsample_conv'}
  assert set(params['layer1_1']) == {'conv1', 'conv2', 'conv3'}
  assert set(constants['layer3_0']['downsample_bn']) == {
      'weight', 'bias', 'running_mean', 'running_var'}
  assert constants['layer4_2']['bn3']['running_var'].shape == (2048,)


def test_resnet_output_shapes_and_v15_stride():
  # Shapes only (eval_shape): no compile, no compute.
  model = resnet.ResNet(width=WIDTH)
  x = jax.ShapeDtypeStruct((2, H, W, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  feats, state = jax.eval_shape(
      functools.partial(model.apply, capture_intermediates=True),
      variables, x)
  assert {k: v.shape for k, v in feats.items()} == {
      'C2': (2, 16, 24, 32), 'C3': (2, 8, 12, 64), 'C4': (2, 4, 6, 128),
      'C5': (2, 2, 3, 256)}
  # v1.5: the first block of layer2 strides in its 3x3 conv, not its 1x1.
  inter = state['intermediates']['layer2_0']
  assert inter['conv1']['__call__'][0].shape == (2, 16, 24, 16)
  assert inter['conv2']['__call__'][0].shape == (2, 8, 12, 16)
  assert inter['downsample_conv']['__call__'][0].shape == (2, 8, 12, 64)


def test_normalize_image():
  img = jnp.asarray([[[[123.675, 116.28, 103.53]]]], jnp.float32)
  np.testing.assert_allclose(resnet.normalize_image(img), 0.0, atol=1e-5)
  white = resnet.normalize_image(jnp.full((1, 1, 1, 3), 255, jnp.uint8))
  np.testing.assert_allclose(
      white[0, 0, 0], [(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                       (1 - 0.406) / 0.225], rtol=1e-5)
  assert resnet.normalize_image(white, jnp.bfloat16).dtype == jnp.bfloat16


def test_frozen_batch_norm_hand_value():
  bn = resnet.FrozenBatchNorm()
  x = jnp.full((1, 1, 1, 2), 5.0)
  variables = bn.init(jax.random.PRNGKey(0), x)
  assert set(variables) == {'constants'}  # nothing trainable
  # Identity at init up to eps: 5 / sqrt(1 + 1e-5).
  np.testing.assert_allclose(bn.apply(variables, x), 5.0 / np.sqrt(1.00001),
                             rtol=1e-6)
  c = {'weight': jnp.asarray([2.0, 1.0]), 'bias': jnp.asarray([1.0, 0.0]),
       'running_mean': jnp.asarray([3.0, 1.0]),
       'running_var': jnp.asarray([4.0, 16.0])}
  y = bn.apply({'constants': c}, x)[0, 0, 0]
  # (5 - 3) * 2 / sqrt(4 + 1e-5) + 1 = 2.9999975; (5 - 1) / sqrt(16) = 1.
  np.testing.assert_allclose(y, [2.0 * 2.0 / np.sqrt(4.00001) + 1.0,
                                 4.0 / np.sqrt(16.00001)], rtol=1e-6)
  np.testing.assert_allclose(y, [3.0, 1.0], rtol=1e-5)


def _full_model_params():
  """{"backbone": ResNet params, "fpn": FPN params} as shapes (eval_shape)."""

  def init(key, x):
    backbone = resnet.ResNet(width=WIDTH)
    bb_vars = backbone.init(key, x)
    feats = backbone.apply(bb_vars, x)
    fpn_params = fpn_lib.FPN(channels=16).init(key, feats)['params']
    return {'backbone': bb_vars['params'], 'fpn': fpn_params}

  return jax.eval_shape(init, jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, H, W, 3), jnp.float32))


def test_group_norm_option():
  """norm="GN": trainable GroupNorm (in "params", nothing in "constants"); each group of a
  block's output is normalised (mean 0, variance 1 before the ReLU and skip)."""
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=8, norm="GN")
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = jax.jit(model.init)(jax.random.key(1), x)
  assert set(variables) == {"params"}
  assert set(variables["params"]["bn1"]["gn"]) == {"scale", "bias"}
  assert variables["params"]["layer2_0"]["bn3"]["gn"]["scale"].shape == (64,)
  # freeze_at still finds the stem and stage blocks by name.
  mask = resnet.frozen_param_mask(variables["params"], 2, backbone=None)
  assert mask["bn1"]["gn"]["scale"] and mask["layer1_0"]["bn2"]["gn"]["bias"]
  assert not mask["layer2_0"]["bn2"]["gn"]["bias"]
  # The stem's norm output: 8 channels in 8 groups, so every channel has mean 0 and variance 1.
  _, state = jax.jit(lambda v, x: model.apply(v, x, capture_intermediates=True,
                                              mutable=["intermediates"]))(variables, x)
  stem = state["intermediates"]["bn1"]["__call__"][0]
  np.testing.assert_allclose(stem.mean(axis=(1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(stem.var(axis=(1, 2)), 1.0, atol=1e-2)
  with pytest.raises(ValueError, match="norm="):
    resnet.make_norm("BN", "x", jnp.float32, jnp.float32)


def test_frozen_param_mask_freeze_at_2_is_stem_and_layer1():
  params = _full_model_params()
  mask = _leaves_with_paths(resnet.frozen_param_mask(params, 2))
  frozen = sorted(k for k, v in mask.items() if v)
  assert frozen == sorted(
      ['backbone/conv1/kernel'] +
      [f'backbone/layer1_{j}/conv{c}/kernel' for j in range(3)
       for c in (1, 2, 3)] + ['backbone/layer1_0/downsample_conv/kernel'])
  assert all(isinstance(v, bool) for v in mask.values())
  # The same rule inside a variables dict and on the ResNet's own tree.
  nested = _leaves_with_paths(
      resnet.frozen_param_mask({'params': params}, 2))
  assert sorted(k for k, v in nested.items() if v) == [
      'params/' + k for k in frozen]
  own = _leaves_with_paths(
      resnet.frozen_param_mask(params['backbone'], 2, backbone=None))
  assert sorted('backbone/' + k for k, v in own.items() if v) == frozen


def test_frozen_param_mask_other_levels():
  params = _full_model_params()
  count = lambda f: sum(jax.tree.leaves(resnet.frozen_param_mask(params, f)))
  assert count(0) == 0
  assert count(1) == 1  # conv1
  assert count(3) == 1 + 10 + 13  # + layer1 (3 * 3 + 1), layer2 (4 * 3 + 1)
  assert count(5) == len(jax.tree.leaves(params['backbone']))  # 53 convs
  assert count(5) == 53
  with pytest.raises(ValueError):
    resnet.frozen_param_mask(params, 6)


def test_resnet_freeze_at_zeroes_frozen_gradients():
  model = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=4, freeze_at=2)
  x = resnet.normalize_image(_images(b=1))
  variables = _np_variables(model, x)

  def loss(params):
    feats = model.apply({**variables, 'params': params}, x)
    return sum(jnp.sum(f ** 2) for f in feats.values())

  grads = jax.jit(jax.grad(loss))(variables['params'])
  mask = resnet.frozen_param_mask(grads, 2, backbone=None)
  for g, frozen in zip(jax.tree.leaves(grads), jax.tree.leaves(mask)):
    assert bool(jnp.all(g == 0)) == frozen


def test_fpn_shapes_and_odd_canvas_error():
  feats = {f'C{k}': jnp.ones((2, H // 2**k, W // 2**k, 4 * 2**k))
           for k in (2, 3, 4, 5)}
  model = fpn_lib.FPN(channels=16)
  variables = _np_variables(model, feats)
  out = model.apply(variables, feats)
  assert {k: v.shape for k, v in out.items()} == {
      'P2': (2, 16, 24, 16), 'P3': (2, 8, 12, 16), 'P4': (2, 4, 6, 16),
      'P5': (2, 2, 3, 16), 'P6': (2, 1, 2, 16)}
  params = variables['params']
  assert params['lateral_2']['kernel'].shape == (1, 1, 16, 16)
  assert params['output_5']['kernel'].shape == (3, 3, 16, 16)
  assert params['output_5']['bias'].shape == (16,)
  # P6 is every other pixel of P5 (max pool, kernel 1, stride 2).
  np.testing.assert_array_equal(out['P6'], out['P5'][:, ::2, ::2])
  bad = dict(feats, C2=jnp.ones((2, 17, 24, 16)))
  with pytest.raises(ValueError, match='multiple of 32'):
    model.apply(variables, bad)


def test_fpn_top_down_hand_value():
  # 1 channel, lateral = identity, output = identity (centre tap only):
  # P4 = C4 + up(C5), P3 = C3 + up(P4), P2 = C2 + up(P3).
  feats = {'C2': jnp.zeros((1, 8, 8, 1)), 'C3': jnp.zeros((1, 4, 4, 1)),
           'C4': jnp.zeros((1, 2, 2, 1)).at[0, 1, 0, 0].set(10.0),
           'C5': jnp.full((1, 1, 1, 1), 1.0)}
  model = fpn_lib.FPN(channels=1)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0), feats)['params']

  def identity(p):
    kh, kw = p['kernel'].shape[:2]
    kernel = jnp.zeros_like(p['kernel']).at[kh // 2, kw // 2, 0, 0].set(1.0)
    return {'kernel': kernel, 'bias': jnp.zeros_like(p['bias'])}

  params = {k: identity(v) for k, v in params.items()}
  out = model.apply({'params': params}, feats)
  np.testing.assert_array_equal(out['P4'][0, :, :, 0], [[1, 1], [11, 1]])
  p2 = np.asarray(out['P2'][0, :, :, 0])
  assert p2[0, 0] == 1 and p2[7, 0] == 11 and p2[4, 3] == 11 and p2[4, 4] == 1


def test_rpn_order_matches_fpn_anchors():
  # Features carry (x * stride, y * stride, level) in channels 0..2; with an
  # identity 3x3 conv the objectness of anchor a is channel 0 and its deltas
  # are (x, y, a, level): every output row must describe its anchor.
  strides = anchor_ops.DEFAULT_STRIDES
  sizes = anchor_ops.feature_sizes((H, W), strides)
  feats = {}
  for level, ((h, w), s) in enumerate(zip(sizes, strides)):
    ys, xs = np.meshgrid(np.arange(h) * s, np.arange(w) * s, indexing='ij')
    feats[f'P{level + 2}'] = jnp.asarray(
        np.stack([xs, ys, np.full_like(xs, level), np.zeros_like(xs)], -1)
        [None], jnp.float32)
  head = rpn.RPNHead(channels=4)
  conv = np.zeros((3, 3, 4, 4), np.float32)
  conv[1, 1] = np.eye(4)
  cls = np.zeros((1, 1, 4, 3), np.float32)
  cls[0, 0, 0, :] = 1.0
  box = np.zeros((1, 1, 4, 12), np.float32)
  box_bias = np.zeros((12,), np.float32)
  for a in range(3):
    box[0, 0, 0, 4 * a] = 1.0  # dx <- x
    box[0, 0, 1, 4 * a + 1] = 1.0  # dy <- y
    box_bias[4 * a + 2] = a  # dw <- anchor index
    box[0, 0, 2, 4 * a + 3] = 1.0  # dh <- level
  params = {'conv': {'kernel': conv, 'bias': np.zeros(4, np.float32)},
            'objectness_logits': {'kernel': cls,
                                  'bias': np.zeros(3, np.float32)},
            'anchor_deltas': {'kernel': box, 'bias': box_bias}}
  logits, deltas = head.apply({'params': params}, feats)
  anchors = anchor_ops.fpn_anchors((H, W))
  n = anchor_ops.num_anchors_per_level((H, W))
  assert n == [1152, 288, 72, 18, 6]
  assert logits.shape == (1, 1536) and deltas.shape == (1, 1536, 4)
  all_anchors = np.concatenate(anchors)
  centre_x = (all_anchors[:, 0] + all_anchors[:, 2]) / 2
  centre_y = (all_anchors[:, 1] + all_anchors[:, 3]) / 2
  ratio = ((all_anchors[:, 3] - all_anchors[:, 1]) /
           (all_anchors[:, 2] - all_anchors[:, 0]))
  size = np.sqrt((all_anchors[:, 3] - all_anchors[:, 1]) *
                 (all_anchors[:, 2] - all_anchors[:, 0]))
  np.testing.assert_allclose(logits[0], centre_x, atol=1e-4)
  np.testing.assert_allclose(deltas[0, :, 0], centre_x, atol=1e-4)
  np.testing.assert_allclose(deltas[0, :, 1], centre_y, atol=1e-4)
  np.testing.assert_allclose(
      ratio, np.asarray(anchor_ops.DEFAULT_ASPECT_RATIOS)[
          deltas[0, :, 2].astype(int)], rtol=1e-4)
  np.testing.assert_allclose(
      size, np.asarray(anchor_ops.DEFAULT_SIZES)[deltas[0, :, 3].astype(int)],
      rtol=1e-4)


def test_rpn_init_is_detectron2():
  feats = {f'P{k}': jnp.ones((1, 64 // 2**k, 64 // 2**k, 32))
           for k in range(2, 7)}
  params = rpn.RPNHead(channels=32).init(jax.random.PRNGKey(0),
                                         feats)['params']
  k = np.asarray(params['conv']['kernel'])
  assert k.shape == (3, 3, 32, 32) and 0.008 < k.std() < 0.012
  assert params['anchor_deltas']['kernel'].shape == (1, 1, 32, 12)
  assert params['objectness_logits']['kernel'].shape == (1, 1, 32, 3)
  assert all(not np.any(params[m]['bias']) for m in params)


def test_bf16_forward_under_jit():
  backbone = resnet.ResNet(stage_sizes=(1, 1, 1, 1), width=WIDTH,
                           dtype=jnp.bfloat16)
  fpn = fpn_lib.FPN(channels=16, dtype=jnp.bfloat16)
  head = rpn.RPNHead(channels=16, dtype=jnp.bfloat16)
  images = _images()
  x = resnet.normalize_image(images, jnp.bfloat16)
  bb_vars = _np_variables(backbone, x)
  feats = jax.eval_shape(backbone.apply, bb_vars, x)
  fpn_params = _np_variables(fpn, feats, seed=1)['params']
  pyramid = jax.eval_shape(fpn.apply, {'params': fpn_params}, feats)
  head_params = _np_variables(head, pyramid, seed=2)['params']
  for tree in (bb_vars, fpn_params, head_params):
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(tree))

  @jax.jit
  def forward(images):
    x = resnet.normalize_image(images, jnp.bfloat16)
    feats = backbone.apply(bb_vars, x)
    pyramid = fpn.apply({'params': fpn_params}, feats)
    return feats, pyramid, head.apply({'params': head_params}, pyramid)

  feats, pyramid, (logits, deltas) = forward(images)
  assert all(f.dtype == jnp.bfloat16 for f in feats.values())
  assert all(p.dtype == jnp.bfloat16 for p in pyramid.values())
  assert logits.dtype == jnp.float32 and deltas.dtype == jnp.float32
  n = sum(anchor_ops.num_anchors_per_level((H, W)))
  assert logits.shape == (2, n) and deltas.shape == (2, n, 4)
  assert np.all(np.isfinite(logits)) and np.all(np.isfinite(deltas))
  # Close to the float32 forward of the same params.
  backbone32 = backbone.clone(dtype=jnp.float32)
  fpn32 = fpn.clone(dtype=jnp.float32)
  head32 = head.clone(dtype=jnp.float32)

  @jax.jit
  def forward32(images):
    feats = backbone32.apply(bb_vars, resnet.normalize_image(images))
    pyramid = fpn32.apply({'params': fpn_params}, feats)
    return head32.apply({'params': head_params}, pyramid)

  logits32, _ = forward32(images)
  scale = float(jnp.max(jnp.abs(logits32)))
  assert float(jnp.max(jnp.abs(logits - logits32))) < 0.05 * scale
