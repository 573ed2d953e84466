"""The canvas padding: anchors centred in it are never proposals, and the network sees it as the
pixel mean (0 after normalisation) whatever the canvas holds there (issue 26, point 5)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from data_pipeline import synthetic_batches, transforms
from data_pipeline.spec import DEEPFASHION2
from df2_jax.models import resnet
from df2_jax.models.match_rcnn import LOSS_TERMS, MatchRCNN, init_variables, model_from_config
from df2_jax.ops import anchors as anchor_ops
from df2_jax.ops import proposals
from df2_jax.ops import targets

# ------------------------------------------------------------------------------------------------
# Proposals.

# One level, stride 8 on a 32 x 32 canvas: 4 x 4 anchors of size 16, centres (8 x, 8 y).
# Image 0 has content 20 (h) x 12 (w): centres x in {0, 8}, y in {0, 8, 16} are inside, 6 anchors;
# image 1 fills the canvas. Zero deltas: a proposal is its anchor clipped to the content.
HAND_ANCHORS = anchor_ops.grid_anchors((4, 4), 8, anchor_ops.cell_anchors([16], [1.0]))
HAND_HW = np.array([[20, 12], [32, 32]], np.float32)


def _hand_logits():
  """Padding anchors of image 0 score 10 + index, content anchors 0.1 * index (all distinct):
  without the padding rule image 0's top-6 would be padding anchors only."""
  cx = 0.5 * (HAND_ANCHORS[:, 0] + HAND_ANCHORS[:, 2])
  cy = 0.5 * (HAND_ANCHORS[:, 1] + HAND_ANCHORS[:, 3])
  inside = (cx < 12) & (cy < 20)
  idx = np.arange(16, dtype=np.float32)
  logits = np.where(inside, 0.1 * idx, 10.0 + idx).astype(np.float32)
  return np.stack([logits, logits]), inside


def _sources(scores, valid, logits):
  """Anchor index of every valid proposal (its score is its anchor's unique logit)."""
  return np.array([int(np.nonzero(logits == s)[0][0]) for s in np.asarray(scores)[valid]])


def test_centre_rule_on_the_hand_case():
  _, inside = _hand_logits()
  assert inside.sum() == 6
  np.testing.assert_array_equal(anchor_ops.centre_in_image(HAND_ANCHORS, HAND_HW[0]), inside)
  both = anchor_ops.centre_in_image(HAND_ANCHORS, HAND_HW)
  assert both.shape == (2, 16)
  np.testing.assert_array_equal(both, np.stack([inside, np.ones(16, bool)]))


@pytest.mark.parametrize("pre_nms_topk", [6, 16])
def test_padding_anchors_are_never_proposals(pre_nms_topk):
  logits, inside = _hand_logits()
  fn = jax.jit(functools.partial(proposals.generate_proposals, anchors_by_level=[HAND_ANCHORS],
                                 pre_nms_topk=pre_nms_topk, post_nms_topk=16,
                                 nms_threshold=1.0))  # IoU > 1: nothing is suppressed
  boxes, scores, valid = fn(logits, np.zeros((2, 16, 4), np.float32), image_hw=HAND_HW)
  boxes, scores, valid = map(np.asarray, (boxes, scores, valid))
  # Image 0: the 6 content anchors, best first, clipped; no proposal from the padding, and the
  # rows the padding anchors would have filled are empty.
  src = _sources(scores[0], valid[0], logits[0])
  assert valid[0].sum() == 6 and valid[0, :6].all()
  assert np.sum(~inside[src]) == 0
  np.testing.assert_array_equal(src, np.nonzero(inside)[0][::-1])
  np.testing.assert_array_equal(scores[0, 6:], -np.inf)
  np.testing.assert_array_equal(boxes[0, 6:], 0.0)
  want = np.clip(HAND_ANCHORS[src], 0, [12, 20, 12, 20])
  np.testing.assert_array_equal(boxes[0, :6], want)
  # Image 1 fills the canvas: every anchor counts, the best pre_nms_topk are kept.
  src = _sources(scores[1], valid[1], logits[1])
  assert valid[1].sum() == pre_nms_topk
  np.testing.assert_array_equal(src, np.argsort(-logits[1])[:pre_nms_topk])


def test_rpn_targets_ignore_exactly_the_anchors_proposals_drop():
  # Without GT and with a sample as large as the anchors, every anchor rpn_targets may sample
  # is a sampled background: the sampled ones are exactly those of the shared centre rule.
  anchors = np.concatenate(anchor_ops.fpn_anchors((64, 96)))
  hw = np.array([50, 70], np.int32)
  out = targets.rpn_targets(jax.random.key(0), anchors, np.zeros((1, 4), np.float32),
                            np.zeros((1,), bool), num_samples=len(anchors), image_hw=hw)
  inside = np.asarray(anchor_ops.centre_in_image(anchors, hw))
  assert 0 < inside.sum() < len(anchors)
  np.testing.assert_array_equal(np.asarray(out["labels"]) == 0, inside)


# ------------------------------------------------------------------------------------------------
# The network's input.

def test_normalize_image_sets_the_padding_to_the_mean():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
  hw = np.array([[3, 5], [4, 6]], np.int32)
  full = np.asarray(resnet.normalize_image(images))
  got = np.asarray(resnet.normalize_image(images, jnp.float32, hw))
  np.testing.assert_array_equal(got[0, :3, :5], full[0, :3, :5])
  np.testing.assert_array_equal(got[0, 3:], 0.0)
  np.testing.assert_array_equal(got[0, :, 5:], 0.0)
  np.testing.assert_array_equal(got[1], full[1])
  with pytest.raises(ValueError, match="image_hw"):
    resnet.normalize_image(images, jnp.float32, hw[:1])


# The tiny model of configs/tiny.py on a 64 x 64 canvas, whose images leave padding.
CONFIG = tiny.get_config()
CONFIG.data.update(dict(canvas=(64, 64), short_side=40, max_size=56, max_instances=3,
                        mask_size=14))
TINY = model_from_config(CONFIG).config
GEOMETRY = transforms.geometry_from_config(CONFIG.data)
SIZE = GEOMETRY.canvas_hw[0]


@functools.lru_cache(maxsize=None)
def _setup():
  """The tiny model, its variables and one synthetic image pair whose 53 x 40 content leaves
  padding on both sides of the 64 x 64 canvas: as the pipeline pads it (zeros) and with noise."""
  batch = synthetic_batches.synthetic_pair_batch(1, GEOMETRY, image_size=SIZE)
  hw = batch["image_hw"].reshape(-1, 2)
  assert (hw < SIZE).all()
  noisy = batch["image"].copy().reshape((-1, SIZE, SIZE, 3))
  rng = np.random.default_rng(1)
  for img, (h, w) in zip(noisy, hw):
    inside = np.zeros((SIZE, SIZE), bool)
    inside[:h, :w] = True
    img[~inside] = rng.integers(0, 256, ((~inside).sum(), 3), dtype=np.uint8)
  noisy = noisy.reshape(batch["image"].shape)
  assert (noisy != batch["image"]).any()
  model = MatchRCNN(TINY, (SIZE, SIZE), DEEPFASHION2)
  return model, init_variables(model, jax.random.key(0), batch), batch, noisy


@pytest.mark.slow  # compiles detect and embed
def test_detect_and_embed_do_not_see_the_padding_values():
  model, variables, batch, noisy = _setup()
  hw = batch["image_hw"].reshape(-1, 2)
  boxes = batch["boxes"].reshape(-1, 3, 4)
  run = jax.jit(lambda v, x, hw, b: (model.apply(v, x, hw, method=MatchRCNN.detect),
                                     model.apply(v, x, hw, b, method=MatchRCNN.embed)))
  flat = lambda x: x.reshape((-1, SIZE, SIZE, 3))
  det0, emb0 = jax.device_get(run(variables, flat(batch["image"]), hw, boxes))
  det1, emb1 = jax.device_get(run(variables, flat(noisy), hw, boxes))
  assert det0["valid"].any()  # something to compare
  for k in det0:
    np.testing.assert_array_equal(det1[k], det0[k], err_msg=k)
  assert emb0.shape == (2, 3, TINY.embed_dim) and np.abs(emb0).sum() > 0
  np.testing.assert_array_equal(emb1, emb0)
  # The detections' embeddings are what embed gives their boxes.
  emb_det = jax.jit(lambda v, x, hw, b: model.apply(v, x, hw, b, method=MatchRCNN.embed))(
      variables, flat(noisy), hw, det0["boxes"])
  np.testing.assert_allclose(emb_det, det0["embeddings"], rtol=1e-5, atol=1e-6)


def test_losses_do_not_see_the_padding_values():
  model, variables, batch, noisy = _setup()
  run = jax.jit(lambda v, b: model.apply(v, b, rngs={"sampling": jax.random.key(2)},
                                         method=MatchRCNN.losses))
  clean = jax.device_get(run(variables, batch))
  padded = jax.device_get(run(variables, dict(batch, image=noisy)))
  assert set(clean) == set(LOSS_TERMS)
  for k in LOSS_TERMS:
    assert np.isfinite(clean[k]), k
    assert padded[k] == clean[k], (k, padded[k], clean[k])
