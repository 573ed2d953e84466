"""The assembled Match R-CNN: loss terms, inference outputs, the compiled train step."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import tiny
from data_pipeline import deepfashion2 as df2
from data_pipeline import synthetic_batches, transforms
from data_pipeline.spec import DEEPFASHION2
from df2_jax.models import losses
from df2_jax import train_step
from df2_jax.models import match_rcnn, matching
from df2_jax.models.match_rcnn import LOSS_TERMS, MatchRCNN, init_variables, model_from_config
from df2_jax.ops import boxes as box_ops
from df2_jax.ops import targets

# The tiny model of configs/tiny.py with the pair loss the formulas below compute: the GT
# items' embeddings only (no RoIs, no memory) and the similarity fc drawn near zero (uninformed
# first logits). A test that needs another setting replaces it in place.
CONFIG = tiny.get_config()
TINY = dataclasses.replace(model_from_config(CONFIG).config, match_rois_per_image=0,
                           match_memory_steps=0, match_scorer_init="normal")
GEOMETRY = transforms.geometry_from_config(CONFIG.data)
SIZE = GEOMETRY.canvas_hw[0]


@functools.lru_cache(maxsize=None)
def _batch(first_pair=0):
  return synthetic_batches.synthetic_pair_batch(2, GEOMETRY, image_size=SIZE, first_pair=first_pair)


@functools.lru_cache(maxsize=None)
def _model_and_variables():
  model = MatchRCNN(TINY, (SIZE, SIZE), DEEPFASHION2)
  return model, init_variables(model, jax.random.key(0), _batch())


def _state(variables, tx):
  """A train state on copies: the step donates its state, the cached variables must survive."""
  return train_step.create_train_state(jax.tree_util.tree_map(jnp.copy, variables), tx)


def _flat(x):
  return x.reshape((-1,) + x.shape[2:])


def test_initial_loss_terms_are_the_uninformed_values():
  model, variables = _model_and_variables()
  assert set(variables) == {"params", "constants"}
  assert set(variables["params"]) == set(match_rcnn.PARAM_MODULES)  # undecayed_modules' choices
  terms = jax.jit(lambda v, b, k: model.apply(v, b, rngs={"sampling": k},
                                              method=MatchRCNN.losses))(
                                                  variables, _batch(), jax.random.key(1))
  assert set(terms) == set(LOSS_TERMS)
  assert all(np.isfinite(float(v)) for v in terms.values())
  # Near-zero initial logits: BCE = ln 2 (mask, pair), softmax over 56 x 56 = ln 3136.
  np.testing.assert_allclose(float(terms["mask"]), np.log(2), atol=0.01)
  np.testing.assert_allclose(float(terms["pair"]), np.log(2), atol=0.01)
  np.testing.assert_allclose(float(terms["landmark"]), np.log(56 * 56), atol=0.3)
  np.testing.assert_allclose(float(terms["cls"]), np.log(14), atol=0.5)


def test_box_loss_betas_and_binary_mask_targets_reach_the_losses(monkeypatch):
  """config.box_loss_beta / rpn_box_loss_beta are the smooth-L1 betas of the box terms: with
  betas above every error, smooth-L1 is 0.5 d^2 / beta, so doubling them halves both terms and
  leaves the others; mask_binary_targets makes the mask loss see 0/1 targets (the soft ones
  thresholded at 0.5)."""
  model, variables = _model_and_variables()
  seen = {}
  real_mask_loss = losses.mask_loss

  real_landmark_loss = losses.landmark_loss

  def spy(logits, classes, targets, fg):
    seen["targets"], seen["fg"] = targets, fg
    return real_mask_loss(logits, classes, targets, fg)

  def landmark_spy(logits, indices, valid, classes, **kwargs):
    seen["landmark_classes"] = classes
    return real_landmark_loss(logits, indices, valid, classes, **kwargs)

  monkeypatch.setattr(losses, "mask_loss", spy)
  monkeypatch.setattr(losses, "landmark_loss", landmark_spy)

  def terms(**fields):
    m = MatchRCNN(dataclasses.replace(TINY, **fields), (SIZE, SIZE), DEEPFASHION2)

    def run(v, b, k):  # the spy's values are this trace's: returned with the terms
      out = m.apply(v, b, rngs={"sampling": k}, method=MatchRCNN.losses)
      return out, seen["targets"], seen["fg"], seen["landmark_classes"]

    out, targets, fg, lm_classes = jax.jit(run)(variables, _batch(), jax.random.key(1))
    return out, np.asarray(targets), np.asarray(fg), np.asarray(lm_classes)

  one, soft, fg, lm_8 = terms(box_loss_beta=1e4, rpn_box_loss_beta=1e4,
                              mask_binary_targets=False, landmark_rois_per_image=8)
  # The 1x recipe's landmark RoIs (128 >= the 64 x 0.25 = 16 foreground rows): every one.
  two, hard, fg_hard, lm_all = terms(box_loss_beta=2e4, rpn_box_loss_beta=2e4,
                                     mask_binary_targets=True, landmark_rois_per_image=128)
  for term in ("box", "rpn_box"):
    assert float(one[term]) > 0
    np.testing.assert_allclose(float(one[term]) / float(two[term]), 2.0, rtol=1e-4)
  for term in ("rpn_cls", "cls", "pair"):
    np.testing.assert_allclose(float(one[term]), float(two[term]), rtol=1e-6)
  # Landmark RoIs: the first 8 foreground rows, then all 16 (background rows: class 0).
  assert lm_8.shape == (4, 8) and lm_all.shape == (4, 16) == fg.shape
  np.testing.assert_array_equal(lm_all > 0, fg)
  np.testing.assert_array_equal(lm_8, lm_all[:, :8])
  assert fg[:, 8:].any()  # foreground rows that only the 1x setting trains
  np.testing.assert_array_equal(fg, fg_hard)
  soft, hard = soft[fg], hard[fg]
  assert fg.sum() > 0 and ((soft > 0) & (soft < 1)).mean() > 0.01  # soft edges
  assert set(np.unique(hard)) <= {0.0, 1.0}
  np.testing.assert_array_equal(hard, (soft >= 0.5).astype(np.float32))


def test_detect_outputs():
  model, variables = _model_and_variables()
  b = _batch()
  out = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))(
      variables, _flat(b["image"]), _flat(b["image_hw"]))
  d = TINY.detections_per_image
  shapes = {k: v.shape for k, v in out.items()}
  assert shapes == {"boxes": (4, d, 4), "scores": (4, d), "classes": (4, d), "valid": (4, d),
                    "masks": (4, d, 28, 28), "landmarks": (4, d, 294, 3),
                    "embeddings": (4, d, 16)}
  classes, valid = np.asarray(out["classes"]), np.asarray(out["valid"])
  assert ((classes > 0) == valid).all()
  lms = np.asarray(out["landmarks"])
  for i, j in zip(*np.nonzero(valid)):
    outside = ~df2.CATEGORY_LANDMARK_MASK[classes[i, j]]
    assert (lms[i, j][outside] == 0).all()
  masks = np.asarray(out["masks"])
  assert ((masks >= 0) & (masks <= 1)).all()


def test_gallery_scores_are_the_pairwise_formula():
  model, variables = _model_and_variables()
  b = _batch()
  emb = model.apply(variables, _flat(b["image"]), _flat(b["image_hw"]), _flat(b["boxes"]),
                    method=MatchRCNN.embed)
  assert emb.shape == (4, 4, 16)
  query, gallery = emb[0], emb.reshape(-1, 16)
  got = model.apply(variables, query, gallery, method=MatchRCNN.match_logits)
  scorer = variables["params"]["scorer"]
  want = matching.pairwise_logits_reference(scorer["kernel"], scorer["bias"], query, gallery)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_batch_negatives_pair_term_is_the_formula():
  # Every user item of the batch against every shop item, positives and negatives balanced:
  # the pair term equals the formula on the embeddings of the GT boxes.
  model, variables = _model_and_variables()
  batch_model = MatchRCNN(dataclasses.replace(TINY, match_negatives="batch",
                                              match_balanced=True), (SIZE, SIZE), DEEPFASHION2)
  b = _batch()
  terms = jax.jit(lambda v, x, k: batch_model.apply(v, x, rngs={"sampling": k},
                                                    method=MatchRCNN.losses))(
                                                        variables, b, jax.random.key(1))
  emb = np.asarray(model.apply(variables, _flat(b["image"]), _flat(b["image_hw"]),
                               _flat(b["boxes"]), method=MatchRCNN.embed)).reshape(2, 2, 4, 16)
  scorer = variables["params"]["scorer"]
  logits = matching.pairwise_logits_reference(scorer["kernel"], scorer["bias"],
                                              emb[:, 0].reshape(8, 16), emb[:, 1].reshape(8, 16))
  ok = np.asarray(b["instance_valid"]) & np.asarray(b["match_valid"])[:, None, None]
  labels, valid = targets.pair_targets(
      b["pair_id"][:, 0].reshape(-1), b["style"][:, 0].reshape(-1), ok[:, 0].reshape(-1),
      b["pair_id"][:, 1].reshape(-1), b["style"][:, 1].reshape(-1), ok[:, 1].reshape(-1))
  # The two image pairs' items are negatives of each other now: more valid pairs than within
  # each image pair, and the positives are the same.
  assert int(np.sum(valid)) > int(np.sum(ok[:, 0].sum(1) * ok[:, 1].sum(1)))
  want = losses.pair_loss(logits, labels, valid, balanced=True)
  np.testing.assert_allclose(float(terms["pair"]), float(want), rtol=2e-5)
  assert abs(float(terms["pair"]) - float(losses.pair_loss(logits, labels, valid))) > 1e-4



@pytest.mark.parametrize("negatives,steps,draw", [("pair", 1, 0), ("batch", 2, 1)])
def test_memory_items_add_their_own_pair_term(negatives, steps, draw):
  """The second step's pair term is the formula over its own GT items plus the formula over the
  first step's, stored in the memory and embedded by the current head (user x shop items within
  each image pair for "pair", across the image pairs for "batch"; a draw of one stored step
  takes the filled one); the memory then holds the second step's items."""
  model, variables = _model_and_variables()
  cfg = dataclasses.replace(TINY, match_memory_steps=steps, match_memory_draw=draw,
                            match_negatives=negatives, match_balanced=True)
  mem_model = MatchRCNN(cfg, (SIZE, SIZE), DEEPFASHION2)
  first, second = _batch(), _batch(2)
  m = first["boxes"].shape[2]
  zeros = lambda shape, dtype: jnp.zeros((steps, 4 * m) + shape, dtype)
  memory = {"pair_memory": dict({k: zeros((), jnp.int32) for k in
                                 ("pair_id", "style", "side", "group", "cursor")},
                                features=zeros((7, 7, TINY.fpn_channels), jnp.float32),
                                valid=zeros((), bool), cursor=jnp.zeros((), jnp.int32))}
  run = jax.jit(lambda mem, x: mem_model.apply(dict(variables, memory=mem), x,
                                               rngs={"sampling": jax.random.key(1)},
                                               method=MatchRCNN.losses, mutable=["memory"]))
  scorer = variables["params"]["scorer"]

  def term(b):  # the balanced pair loss of one batch's GT items, by the formula
    emb = np.asarray(model.apply(variables, _flat(b["image"]), _flat(b["image_hw"]),
                                 _flat(b["boxes"]), method=MatchRCNN.embed)).reshape(2, 2, m, -1)
    ok = np.asarray(b["instance_valid"]) & np.asarray(b["match_valid"])[:, None, None]
    pid, sty = np.asarray(b["pair_id"]), np.asarray(b["style"])
    if negatives == "batch":
      flat = lambda x: x.reshape((-1,) + x.shape[2:])
      logits = matching.pairwise_logits_reference(scorer["kernel"], scorer["bias"],
                                                  flat(emb[:, 0]), flat(emb[:, 1]))
      labels, valid = targets.pair_targets(flat(pid[:, 0]), flat(sty[:, 0]), flat(ok[:, 0]),
                                           flat(pid[:, 1]), flat(sty[:, 1]), flat(ok[:, 1]))
    else:
      logits = matching.pairwise_logits_reference(scorer["kernel"], scorer["bias"],
                                                  emb[:, 0], emb[:, 1])
      labels, valid = jax.vmap(targets.pair_targets)(pid[:, 0], sty[:, 0], ok[:, 0],
                                                     pid[:, 1], sty[:, 1], ok[:, 1])
    assert int(np.sum(np.asarray(labels) * np.asarray(valid))) >= 2  # positives in each
    return float(losses.pair_loss(logits, labels, valid, balanced=True))

  terms, mutated = run(memory, first)  # the memory is empty: this step's term alone
  np.testing.assert_allclose(float(terms["pair"]), term(first), rtol=2e-5)
  terms, mutated = run(mutated["memory"], second)
  np.testing.assert_allclose(float(terms["pair"]), term(second) + term(first), rtol=2e-5)
  # The memory holds the second step's valid items first, in batch order (pair, side, item).
  stored = mutated["memory"]["pair_memory"]
  ok = np.asarray(second["instance_valid"]).reshape(-1)
  n = int(ok.sum())
  slot = 1 % steps
  np.testing.assert_array_equal(stored["valid"][slot], np.arange(ok.size) < n)
  np.testing.assert_array_equal(stored["pair_id"][slot][:n],
                                np.asarray(second["pair_id"]).reshape(-1)[ok])
  np.testing.assert_array_equal(stored["side"][slot][:n], np.tile(np.repeat([0, 1], m), 2)[ok])
  assert int(stored["cursor"]) == 2 % steps


def test_matching_items_label_rois_with_their_item():
  gt = np.array([[[0, 0, 10, 10], [20, 20, 40, 40]]], np.float32)
  items = match_rcnn.matching_items(
      jnp.asarray(gt), jnp.array([[7, 7]]), jnp.array([[1, 2]]), jnp.array([[True, True]]),
      jnp.array([[[1, 1, 11, 11], [21, 19, 41, 40], [0, 0, 0, 0]]], jnp.float32),
      jnp.array([[True, True, False]]), jnp.array([[0, 1, 0]]))
  np.testing.assert_array_equal(items["boxes"][0, 2:4], [[1, 1, 11, 11], [21, 19, 41, 40]])
  np.testing.assert_array_equal(items["pair_id"], [[7, 7, 7, 7, 7]])
  np.testing.assert_array_equal(items["style"], [[1, 2, 1, 2, 1]])
  np.testing.assert_array_equal(items["valid"], [[True, True, True, True, False]])


def test_pair_labels_within_pairs_and_across_the_batch():
  # Two image pairs; pair 1's shop image holds pair 0's item too (the same pair_id and style),
  # as DeepFashion2 pair_ids do when several image pairs share one.
  pid = np.array([[[3, 3], [3, 9]], [[4, 4], [3, 4]]])
  sty = np.array([[[1, 0], [1, 1]], [[1, 1], [1, 1]]])
  ok = np.ones((2, 2, 2), bool)
  ok[1, 0, 1] = False  # a padded user item
  labels, valid = match_rcnn.pair_labels(pid, sty, ok, "pair")
  np.testing.assert_array_equal(labels, [[[1, 0], [0, 0]], [[0, 1], [0, 0]]])
  np.testing.assert_array_equal(valid, [[[1, 1], [1, 1]], [[1, 1], [0, 0]]])
  labels, valid = match_rcnn.pair_labels(pid, sty, ok, "batch")
  # Rows: user items (pair 0: 3/1, 3/0; pair 1: 4/1, pad); columns: shop items (3/1, 9/1,
  # 3/1, 4/1).
  np.testing.assert_array_equal(labels, [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1],
                                         [0, 0, 0, 0]])
  np.testing.assert_array_equal(valid.sum(1), [4, 4, 4, 0])


@pytest.mark.slow  # compiles the whole train step
def test_train_step_compiles_once_and_has_no_host_callbacks():
  model, variables = _model_and_variables()
  tx = train_step.make_optimizer(0.01, variables["params"], freeze_at=0)
  state = _state(variables, tx)
  step = train_step.make_train_step(model, tx, {})
  key = jax.random.key(0)
  hlo = step.lower(state, _batch(), key).as_text()
  assert "callback" not in hlo.lower()
  for first in (0, 2, 4):
    state, metrics = step(state, _batch(first), key)
  assert int(state.step) == 3
  assert step._cache_size() == 1
  assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0


@pytest.mark.slow  # compiles and runs the whole train step
def test_frozen_stages_do_not_move():
  model = MatchRCNN(TINY, (SIZE, SIZE), DEEPFASHION2)
  variables = _model_and_variables()[1]
  tx = train_step.make_optimizer(0.01, variables["params"], freeze_at=2)
  state = _state(variables, tx)
  before = jax.tree_util.tree_map(np.asarray, state.params)
  state, _ = train_step.make_train_step(model, tx, {})(state, _batch(), jax.random.key(0))
  after = state.params
  np.testing.assert_array_equal(after["backbone"]["conv1"]["kernel"],
                                before["backbone"]["conv1"]["kernel"])
  np.testing.assert_array_equal(after["backbone"]["layer1_0"]["conv1"]["kernel"],
                                before["backbone"]["layer1_0"]["conv1"]["kernel"])
  assert not np.array_equal(after["backbone"]["layer2_0"]["conv1"]["kernel"],
                            before["backbone"]["layer2_0"]["conv1"]["kernel"])


@pytest.mark.slow  # trains for many steps
def test_overfits_two_synthetic_pairs():
  """A narrow model on 2 image pairs: every loss term falls below half its start (the box
  regression below 0.6 of it), and every ground-truth item of the training images is detected
  with IoU > 0.5.

  The model computes as the tiny config's does (RoIAlign by matmul, the landmark head's own
  category channels only): 0.14 s a step on 2 CPU cores against 0.45 s with the gathers. Its box
  term swings between 0.43 and 0.54 of its start from step 150 to 200 (measured), so the
  detections' IoU is the evidence on the boxes; every other term ends below 0.35 of its start.
  """
  model = MatchRCNN(dataclasses.replace(TINY, roi_align_method="matmul",
                                        landmark_select_channels=True), (SIZE, SIZE), DEEPFASHION2)
  variables = init_variables(model, jax.random.key(0), _batch())
  tx = optax.adam(2e-3)
  state = _state(variables, tx)
  batch, key = _batch(), jax.random.key(3)
  # It runs 150 times: compiled with LLVM's optimisations (conftest turns them off for the
  # suite's other programs, built to run a few times).
  step = train_step.make_train_step(model, tx, {}).lower(state, batch, key).compile(
      {"xla_backend_optimization_level": 2})
  history = []
  for _ in range(150):
    state, metrics = step(state, batch, key)
    history.append({k: float(v) for k, v in metrics.items()})
  first = history[0]
  last = {k: np.mean([h[k] for h in history[-10:]]) for k in first}
  for term in ("cls", "box", "landmark", "mask", "pair", "rpn_cls"):
    assert last[term] < (0.6 if term == "box" else 0.5) * first[term], (term, first[term],
                                                                        last[term])
  detect = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))
  out = detect({"params": state.params, "constants": state.constants},
               _flat(batch["image"]), _flat(batch["image_hw"]))
  gt_boxes, gt_valid = _flat(batch["boxes"]), _flat(batch["instance_valid"])
  for i in range(4):
    iou = np.asarray(box_ops.pairwise_iou(jnp.asarray(gt_boxes[i][gt_valid[i]]),
                                          out["boxes"][i]))
    iou = np.where(np.asarray(out["valid"][i])[None], iou, 0)
    assert (iou.max(axis=1) > 0.5).all(), (i, iou.max(axis=1))


def _own_spec(landmarks, has_masks):
  from data_pipeline import spec as spec_lib
  return spec_lib.from_dict({"name": "own", "has_masks": has_masks, "has_pairs": False,
                             "categories": [
                                 {"id": 5, "name": "top", "landmarks": landmarks,
                                  "sigmas": [0.05] * len(landmarks)},
                                 {"id": 9, "name": "skirt"}]})


def _own_batch(spec):
  geometry = dataclasses.replace(GEOMETRY, spec=spec)
  batch = transforms.zero_train_batch(geometry, 2)
  batch["image"] = np.random.default_rng(0).integers(0, 255, batch["image"].shape, np.uint8)
  batch["image_hw"][...] = SIZE
  batch["boxes"][:, :, 0] = [10, 10, 70, 90]
  batch["boxes"][:, :, 1] = [60, 20, 110, 100]
  batch["classes"][:, :, :2] = [1, 2]
  batch["instance_valid"][:, :, :2] = True
  if spec.num_landmarks:
    batch["landmarks"][:, :, 0, :spec.num_landmarks] = [[30, 40, 2], [50, 40, 2], [40, 80, 1]]
  return batch


@pytest.mark.slow  # two models compiled for losses and detect
@pytest.mark.parametrize("landmarks", [("neck", "l_hem", "r_hem"), ()])
def test_a_spec_sizes_the_heads_and_switches_terms_off(landmarks):
  """The heads take their sizes from the run's spec (2 classes here; 3 landmark channels or no
  landmark head at all); a set without masks trains no mask term, one without landmarks no
  landmark term, and ``detect`` gives [B, D, 0, 3] landmarks then."""
  spec = _own_spec(list(landmarks), has_masks=False)
  model = MatchRCNN(TINY, (SIZE, SIZE), spec)
  batch = _own_batch(spec)
  variables = init_variables(model, jax.random.key(0), batch)
  params = variables["params"]
  assert params["box_head"]["cls_score"]["kernel"].shape[-1] == 3  # background + 2
  assert params["mask_head"]["predictor"]["kernel"].shape[-1] == 2
  if landmarks:
    assert params["landmark_head"]["score_lowres"]["kernel"].shape[2] == 3
  else:
    assert "landmark_head" not in params
  # Jitted: one program each (op by op, the first parameter took 97 s on 2 cores).
  terms = jax.jit(lambda v, b, k: model.apply(v, b, rngs={"sampling": k},
                                              method=MatchRCNN.losses))(
                                                  variables, batch, jax.random.key(1))
  assert all(np.isfinite(float(v)) for v in terms.values())
  assert float(terms["mask"]) == 0.0 and float(terms["pair"]) == 0.0
  np.testing.assert_allclose(float(terms["cls"]), np.log(3), atol=0.5)
  if landmarks:  # the top's 3 labelled landmarks: near ln(56 * 56) at the start
    np.testing.assert_allclose(float(terms["landmark"]), np.log(56 * 56), atol=0.3)
  else:
    assert float(terms["landmark"]) == 0.0
  out = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))(
      variables, _flat(batch["image"]), _flat(batch["image_hw"]))
  assert out["landmarks"].shape == (4, TINY.detections_per_image, len(landmarks), 3)
  assert int(out["classes"].max()) <= 2
