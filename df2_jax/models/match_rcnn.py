"""Match R-CNN: ResNet-FPN, RPN, box / mask / landmark heads and the matching network.

One Linen module with three entry points, each a static-shape program:
  * ``losses(batch)``: the training forward pass on a batch of image pairs (the batch contract
    of data_pipeline.transforms.image_spec with a leading [P, 2] axis); returns the named loss
    terms. Needs the PRNG stream "sampling" (anchor and RoI sampling).
  * ``detect(images, image_hw)``: inference; per image a fixed number of detections with
    boxes, scores, classes, 28x28 masks, landmarks (DeepFashion2: 294) and an embedding each.
    Also in two stages, ``detect_boxes`` (backbone to NMS, with the FPN features) and
    ``detect_heads`` (the mask, landmark and matching heads on the first K detections), so
    that the heads run on the detections that exist (inference.Detector).
  * ``embed(images, image_hw, boxes)``: embeddings of given boxes (retrieval with ground-truth
    boxes).
Images sit top-left on their canvas with content size ``image_hw``; every entry point sets the
rest of the canvas to the pixel mean (0 after normalisation), whatever the canvas holds there,
and never proposes anchors centred there (ops/proposals).

Shapes: P image pairs, B = 2P images (user at even, shop at odd positions after flattening),
M ground-truth instances per image, R sampled RoIs, F = R * positive_fraction RoIs for the
mask branch (the sampler puts foreground first), L <= F RoIs for the landmark branch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from data_pipeline.spec import DatasetSpec
from data_pipeline.spec import from_config as spec_from_config
from df2_jax.models import losses as loss_lib
from df2_jax.models.box_head import BoxHead
from df2_jax.models.fpn import FPN
from df2_jax.models.landmark_head import LandmarkHead, heatmaps_to_landmarks, upsample_heatmaps
from df2_jax.models.mask_head import MaskHead
from df2_jax.models.matching import MatchingHead, PairMemory, PairScorer
from df2_jax.models.resnet import ResNet, normalize_image
from df2_jax.models.rpn import RPNHead
from df2_jax.ops import anchors as anchor_ops
from df2_jax.ops import boxes as box_ops
from df2_jax.ops import nms as nms_ops
from df2_jax.ops import proposals as proposal_ops
from df2_jax.ops import roi_align as roi_ops
from df2_jax.ops import targets as target_ops

Array = jax.Array
LOSS_TERMS = ("rpn_cls", "rpn_box", "cls", "box", "mask", "landmark", "pair")
# MatchRCNN's top-level parameter modules (config.train.undecayed_modules names some of them).
PARAM_MODULES = ("backbone", "fpn", "rpn", "box_head", "mask_head", "landmark_head",
                 "matching_head", "scorer")
MATCH_NEGATIVES = ("pair", "batch")  # MatchRCNNConfig.match_negatives
DTYPES = ("float32", "bfloat16")  # MatchRCNNConfig.dtype


@dataclasses.dataclass(frozen=True, kw_only=True)
class MatchRCNNConfig:
  """Architecture and the static sizes of every stage: ``config.model`` (less ``INIT_FIELDS``),
  every field required. Each field's default and meaning: ``df2_jax/config/defaults.py``
  (``model_from_config`` builds this from a config)."""
  # Backbone.
  stage_sizes: tuple[int, ...]
  width: int
  freeze_at: int
  norm: str
  fpn_channels: int
  # RPN.
  anchor_sizes: tuple[int, ...]
  rpn_pre_nms_topk_train: int
  rpn_post_nms_topk_train: int
  rpn_pre_nms_topk_test: int
  rpn_post_nms_topk_test: int
  rpn_nms_threshold: float
  rpn_batch_size_per_image: int
  rpn_positive_fraction: float
  # RoI heads.
  roi_align_method: str
  roi_batch_size_per_image: int
  roi_positive_fraction: float
  box_fc_dim: int
  cls_agnostic_bbox_reg: bool
  mask_conv_dim: int
  landmark_conv_dim: int
  landmark_num_convs: int
  landmark_rois_per_image: int
  landmark_visible_only: bool
  landmark_select_channels: bool
  # Losses.
  box_loss_beta: float
  rpn_box_loss_beta: float
  mask_binary_targets: bool
  # Matching network and the pair loss.
  match_conv_dim: int
  match_proj_dim: int
  embed_dim: int
  match_negatives: str
  match_rois_per_image: int
  match_balanced: bool
  match_scorer_init: str
  match_memory_steps: int
  match_memory_items: int
  match_memory_draw: int
  # Inference.
  score_threshold: float
  detection_nms_threshold: float
  detections_per_image: int
  detection_candidates: int
  dtype: str  # compute dtype name ("float32" or "bfloat16"); params and losses stay float32

  @property
  def mask_rois_per_image(self) -> int:
    return int(self.roi_batch_size_per_image * self.roi_positive_fraction)


def _flatten_pairs(x: Array) -> Array:
  """[P, 2, ...] -> [2P, ...] (user, shop, user, shop, ...)."""
  return x.reshape((x.shape[0] * 2,) + x.shape[2:])


def _split_keys(key: Array, n: int) -> Array:
  return jax.random.split(key, n)


class MatchRCNN(nn.Module):
  """Attributes:
    config: the architecture and static sizes.
    canvas_hw: (H, W) of the largest input canvas (multiples of 32), the one initialisation
      uses. Any input canvas whose sides are multiples of 32 works (orientation buckets: each
      canvas shape is its own compiled program); the anchors are constants of that program,
      computed from the input's shape.
    spec: the dataset's taxonomy: the box and mask heads' class count, the landmark head's
      channels and each category's share of them (a spec without landmarks has no landmark
      head), whether the mask loss trains (``has_masks``).
  """
  config: MatchRCNNConfig
  canvas_hw: tuple[int, int]
  spec: DatasetSpec

  def setup(self):
    c = self.config
    if len(c.anchor_sizes) != len(anchor_ops.DEFAULT_STRIDES):
      raise ValueError(f"anchor_sizes {c.anchor_sizes} needs one size per level P2..P6")
    if self.canvas_hw[0] % 32 or self.canvas_hw[1] % 32:
      raise ValueError(f"canvas_hw {self.canvas_hw} must be multiples of 32")
    dtype = jnp.dtype(c.dtype)
    self.backbone = ResNet(stage_sizes=tuple(c.stage_sizes), width=c.width,
                           freeze_at=c.freeze_at, norm=c.norm, dtype=dtype)
    self.fpn = FPN(channels=c.fpn_channels, dtype=dtype)
    self.rpn = RPNHead(channels=c.fpn_channels, dtype=dtype)
    spec = self.spec
    self.box_head = BoxHead(num_classes=spec.num_categories, fc_dim=c.box_fc_dim,
                           cls_agnostic_bbox_reg=c.cls_agnostic_bbox_reg, dtype=dtype)
    self.mask_head = MaskHead(num_classes=spec.num_categories, conv_dim=c.mask_conv_dim,
                              dtype=dtype)
    if spec.has_landmarks:
      self.landmark_head = LandmarkHead(num_landmarks=spec.num_landmarks,
                                        conv_dim=c.landmark_conv_dim,
                                        num_convs=c.landmark_num_convs, dtype=dtype)
    self.matching_head = MatchingHead(embed_dim=c.embed_dim, conv_dim=c.match_conv_dim,
                                      proj_dim=c.match_proj_dim, dtype=dtype)
    self.scorer = PairScorer(embed_dim=c.embed_dim, weight_init=c.match_scorer_init)
    if c.match_memory_steps > 0:
      self.pair_memory = PairMemory(steps=c.match_memory_steps, items=c.match_memory_items)

  # ------------------------------------------------------------------------------------------
  # Shared pieces.

  def _anchors(self, canvas_hw: tuple[int, int]) -> list[np.ndarray]:
    return anchor_ops.fpn_anchors(tuple(canvas_hw),
                                  sizes=tuple(float(v) for v in self.config.anchor_sizes))

  def _features(self, images: Array, image_hw: Array) -> dict[str, Array]:
    """FPN features of [B, H, W, 3] canvases whose content is the top-left image_hw [B, 2].

    The padding is the pixel mean (0 after normalisation) whatever the canvas holds there, as
    Detectron pads: every entry point sees the same input for the same content.
    """
    if images.shape[-3] % 32 or images.shape[-2] % 32:
      raise ValueError(f"input canvas {images.shape[-3:-1]} must be multiples of 32")
    x = normalize_image(images, jnp.dtype(self.config.dtype), image_hw)
    return self.fpn(self.backbone(x))

  def _pool(self, feats: dict[str, Array], boxes: Array, size: int, *,
            inference: bool = False) -> Array:
    """[B, N, 4] boxes -> [B * N, size, size, C] features from each box's FPN level.

    ``inference``: no gradient is taken, so a "gather" model pools with the windowed gather
    (the same values, much faster on a CPU: ops/roi_align)."""
    levels = [feats[f"P{k}"] for k in (2, 3, 4, 5)]
    method = self.config.roi_align_method
    if inference and method == "gather":
      method = "window"
    pooled = roi_ops.multilevel_roi_align(levels, boxes, size, sampling_ratio=2,
                                          method=method)
    return pooled.reshape((-1,) + pooled.shape[2:])

  def _proposals(self, feats, image_hw, train: bool, canvas_hw: tuple[int, int]):
    c = self.config
    logits, deltas = self.rpn(feats)
    pre = c.rpn_pre_nms_topk_train if train else c.rpn_pre_nms_topk_test
    post = c.rpn_post_nms_topk_train if train else c.rpn_post_nms_topk_test
    boxes, _, valid = proposal_ops.generate_proposals(
        logits, deltas, self._anchors(canvas_hw), image_hw, pre, post, c.rpn_nms_threshold)
    return logits, deltas, boxes, valid

  def _embed(self, feats: dict[str, Array], boxes: Array) -> Array:
    """[B, N, 4] -> [B, N, D] float32 embeddings (inference)."""
    b, n = boxes.shape[:2]
    return self.matching_head(self._pool(feats, boxes, 7, inference=True)).reshape(b, n, -1)

  # ------------------------------------------------------------------------------------------
  # Training.

  def losses(self, batch: dict[str, Array]) -> dict[str, Array]:
    """The seven unweighted loss terms (LOSS_TERMS) of one batch of image pairs."""
    c = self.config
    num_pairs = batch["image"].shape[0]
    b = 2 * num_pairs
    images = _flatten_pairs(batch["image"])
    image_hw = _flatten_pairs(batch["image_hw"])
    gt_boxes = _flatten_pairs(batch["boxes"]).astype(jnp.float32)
    gt_classes = _flatten_pairs(batch["classes"]).astype(jnp.int32)
    gt_valid = _flatten_pairs(batch["instance_valid"])
    key_rpn, key_roi = jax.random.split(self.make_rng("sampling"))

    canvas_hw = images.shape[1:3]
    feats = self._features(images, image_hw)
    rpn_logits, rpn_deltas, proposals, proposal_valid = self._proposals(feats, image_hw, True,
                                                                        canvas_hw)

    # RPN (anchors centred in the canvas's padding are not sampled).
    anchors = jnp.asarray(np.concatenate(self._anchors(canvas_hw)))
    rpn_t = jax.vmap(
        lambda k, g, v, hw: target_ops.rpn_targets(
            k, anchors, g, v, c.rpn_batch_size_per_image, c.rpn_positive_fraction,
            image_hw=hw)
    )(_split_keys(key_rpn, b), gt_boxes, gt_valid, image_hw)
    rpn_cls, rpn_box = loss_lib.rpn_losses(rpn_logits, rpn_deltas, rpn_t["labels"],
                                           rpn_t["deltas"], c.rpn_batch_size_per_image,
                                           smooth_l1_beta=c.rpn_box_loss_beta)

    # Box head on R sampled RoIs per image (foreground first).
    roi_t = jax.vmap(
        lambda k, p, pv, g, gc, gv: target_ops.roi_targets(
            k, p, pv, g, gc, gv, c.roi_batch_size_per_image, c.roi_positive_fraction)
    )(_split_keys(key_roi, b), proposals, proposal_valid, gt_boxes, gt_classes, gt_valid)
    rois = roi_t["rois"]
    r = rois.shape[1]
    class_logits, box_deltas = self.box_head(self._pool(feats, rois, 7))
    cls, box = loss_lib.box_head_losses(class_logits.reshape(b, r, -1),
                                        box_deltas.reshape(b, r, -1), roi_t["classes"],
                                        roi_t["box_deltas"], roi_t["roi_valid"],
                                        smooth_l1_beta=c.box_loss_beta)

    # Mask head on the first F rows (all foreground candidates).
    f = c.mask_rois_per_image
    fg_rois, fg = rois[:, :f], roi_t["is_fg"][:, :f] & roi_t["roi_valid"][:, :f]
    fg_classes = jnp.where(fg, roi_t["classes"][:, :f], 0)
    matched = roi_t["matched_gt"][:, :f]
    mask_logits = self.mask_head(self._pool(feats, fg_rois, 14))
    mask_logits = mask_logits.reshape((b, f) + mask_logits.shape[1:])
    mask_t = jax.vmap(functools.partial(
        target_ops.mask_targets, method=c.roi_align_method,
        threshold=0.5 if c.mask_binary_targets else None))(
        _flatten_pairs(batch["masks"]), gt_boxes, fg_rois, matched)
    mask = loss_lib.mask_loss(mask_logits, jnp.maximum(fg_classes, 1), mask_t, fg)
    if not self.spec.has_masks:  # no mask annotations: the head is kept, untrained
      mask = jnp.zeros_like(mask)

    # Landmark head on the first L foreground rows (a random subset: sampling is random).
    landmark = jnp.zeros((), jnp.float32)
    if self.spec.has_landmarks:
      spec = self.spec
      n_lm = min(c.landmark_rois_per_image, f)
      lm_rois, lm_classes = fg_rois[:, :n_lm], fg_classes[:, :n_lm]
      select = (jnp.asarray(spec.category_channels)[lm_classes.reshape(-1)]
                if c.landmark_select_channels else None)
      lm_logits = self.landmark_head(self._pool(feats, lm_rois, 14), select)
      lm_logits = lm_logits.reshape((b, n_lm) + lm_logits.shape[1:])
      lm_index, lm_valid = jax.vmap(
          lambda g, rr, m, cc: target_ops.landmark_targets(
              g, rr, m, cc, 2 * lm_logits.shape[2], visible_only=c.landmark_visible_only,
              own_channels=spec.category_landmark_mask)
      )(_flatten_pairs(batch["landmarks"]).astype(jnp.float32), lm_rois, matched[:, :n_lm],
        lm_classes)
      landmark = loss_lib.landmark_loss(
          lm_logits, lm_index, lm_valid, lm_classes, gathered=c.landmark_select_channels,
          category_channels=spec.category_channels,
          category_channel_valid=spec.category_channel_valid)

    # Matching: embeddings of the ground-truth items (and of foreground RoIs labelled with
    # their item), scored user item x shop item within each image pair or across the batch.
    n_roi = min(c.match_rois_per_image, f)
    items = matching_items(gt_boxes, _flatten_pairs(batch["pair_id"]),
                           _flatten_pairs(batch["style"]), gt_valid, fg_rois[:, :n_roi],
                           fg[:, :n_roi], matched[:, :n_roi])
    n = items["boxes"].shape[1]
    pooled = self._pool(feats, items["boxes"], 7)  # [B * n, 7, 7, C]
    split = lambda x: x.reshape((num_pairs, 2) + x.shape[1:])
    ok = split(items["valid"]) & batch["match_valid"][:, None, None]
    emb = self.matching_head(pooled)
    pair = self._pair_loss(emb.reshape((num_pairs, 2, n, -1)), split(items["pair_id"]),
                           split(items["style"]), ok)
    if c.match_memory_steps > 0:
      pair = pair + self._memory_pair_loss(
          pooled.reshape((b, n) + pooled.shape[1:])[:, :gt_boxes.shape[1]],
          {k: split(items[k])[..., :gt_boxes.shape[1]] for k in ("pair_id", "style")},
          ok[..., :gt_boxes.shape[1]])

    return dict(rpn_cls=rpn_cls, rpn_box=rpn_box, cls=cls, box=box, mask=mask,
                landmark=landmark, pair=pair)

  def _pair_loss(self, emb: Array, pair_id: Array, style: Array, valid: Array) -> Array:
    """The pair loss of items [P, 2, N, D] (user, shop) with labels and validity [P, 2, N]:
    user x shop items within each image pair ("pair") or across all P ("batch")."""
    c = self.config
    labels, valid = pair_labels(pair_id, style, valid, c.match_negatives)
    if c.match_negatives == "batch":  # every user item x every shop item
      flat = lambda x: x.reshape(-1, x.shape[-1])
      logits = self.scorer(flat(emb[:, 0]), flat(emb[:, 1]))
    else:
      logits = self.scorer(emb[:, 0], emb[:, 1])
    return loss_lib.pair_loss(logits, labels, valid, balanced=c.match_balanced)

  def _memory_pair_loss(self, pooled: Array, labels: dict[str, Array], valid: Array) -> Array:
    """Stores this step's GT items (pooled [B, M, h, w, C], labels and valid [P, 2, M]) and
    returns the pair loss of the items stored by the previous steps among themselves, embedded
    by the current head: every stored user item x every stored shop item ("batch") or those of
    the same image pair ("pair"). Their features are constants: the head learns from them,
    the backbone does not."""
    c = self.config
    p = valid.shape[0]
    flat = lambda x: x.reshape(-1)
    side = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32)[None, :, None], valid.shape)
    group = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32)[:, None, None], valid.shape)
    stored = self.pair_memory(pooled.reshape((-1,) + pooled.shape[2:]), flat(labels["pair_id"]),
                              flat(labels["style"]), flat(side), flat(group), flat(valid))
    # Image pairs of different steps are different image pairs.
    stored["group"] = stored["group"] + p * jnp.arange(c.match_memory_steps)[:, None]
    if 0 < c.match_memory_draw < c.match_memory_steps:
      # A random draw of the stored steps (filled ones first; Gumbel top-k), so that a long
      # memory costs the head only the drawn steps' items.
      filled = jnp.any(stored["valid"], axis=1)
      noise = jax.random.gumbel(self.make_rng("sampling"), filled.shape)
      _, drawn = jax.lax.top_k(jnp.where(filled, noise, noise - 1e9), c.match_memory_draw)
      stored = {k: v[drawn] for k, v in stored.items()}
    group = stored["group"].reshape(-1)
    pid, sty, side, ok = (stored[k].reshape(-1) for k in ("pair_id", "style", "side", "valid"))
    emb = self.matching_head(stored["features"].reshape((-1,) + pooled.shape[2:]))
    labels, valid = target_ops.pair_targets(pid, sty, ok & (side == 0), pid, sty,
                                            ok & (side == 1))
    if c.match_negatives == "pair":
      valid = valid & (group[:, None] == group[None, :])
    return loss_lib.pair_loss(self.scorer(emb, emb), labels, valid, balanced=c.match_balanced)

  # ------------------------------------------------------------------------------------------
  # Inference.

  def detect(self, images: Array, image_hw: Array) -> dict[str, Array]:
    """Detections of a batch of single images: ``detect_boxes`` then ``detect_heads`` in one
    program.

    Args:
      images: [B, H, W, 3] uint8 canvases.
      image_hw: [B, 2] content height, width on the canvas.

    Returns (D = detections_per_image):
      boxes [B, D, 4] canvas coordinates, scores [B, D], classes [B, D] (1..C, the spec's
      order), valid [B, D] (the valid rows first), masks [B, D, 28, 28] probabilities in the
      box frame, landmarks [B, D, L, 3]
      (x, y, score; only the detection's category slice is filled, zeros elsewhere),
      embeddings [B, D, embed_dim]. All float32 except classes (int32) and valid.
    """
    out = self.detect_boxes(images, image_hw)
    feats = out.pop("features")
    return dict(out, **self.detect_heads(feats, out["boxes"], out["classes"]))

  def detect_boxes(self, images: Array, image_hw: Array) -> dict[str, Array]:
    """The first stage of ``detect``: backbone, RPN, box head and class-aware NMS.

    Returns boxes [B, D, 4], scores [B, D], classes [B, D], valid [B, D] (the valid rows
    first, in decreasing score; invalid rows zero) as ``detect`` returns them, and
    ``features``: the FPN levels {"P2": ..., "P5": ...} that ``detect_heads`` pools from.
    """
    c = self.config
    b = images.shape[0]
    canvas_hw = images.shape[1:3]
    feats = self._features(images, image_hw)
    _, _, proposals, proposal_valid = self._proposals(feats, image_hw, False, canvas_hw)
    k = proposals.shape[1]
    class_logits, box_deltas = self.box_head(self._pool(feats, proposals, 7, inference=True))
    probs = jax.nn.softmax(class_logits.reshape(b, k, -1), axis=-1)[..., 1:]  # [B, K, C]
    nc = probs.shape[-1]
    boxes = box_ops.decode(box_deltas.reshape(b, k, nc, 4), proposals[:, :, None, :],
                           box_ops.ROI_BOX_WEIGHTS)
    boxes = box_ops.clip_boxes(boxes.reshape(b, k * nc, 4), image_hw)
    scores = probs.reshape(b, k * nc)
    classes = jnp.broadcast_to(jnp.arange(1, nc + 1, dtype=jnp.int32), (b, k, nc))
    classes = classes.reshape(b, k * nc)
    ok = (jnp.repeat(proposal_valid, nc, axis=1) & (scores > c.score_threshold)
          & box_ops.nonempty(boxes))
    # A fixed candidate budget before NMS (the highest scores), then class-aware NMS.
    cand = min(c.detection_candidates, k * nc)
    top_scores, top = jax.lax.top_k(jnp.where(ok, scores, -jnp.inf), cand)
    take = lambda x: jnp.take_along_axis(x, top[..., None] if x.ndim == 3 else top, axis=1)
    cand_boxes, cand_classes, cand_ok = take(boxes), take(classes), take(ok)
    keep, keep_valid = nms_ops.batched_nms(cand_boxes, top_scores, cand_classes, cand_ok,
                                           c.detection_nms_threshold, c.detections_per_image)
    det_boxes = jnp.take_along_axis(cand_boxes, keep[..., None], axis=1)
    det_scores = jnp.where(keep_valid, jnp.take_along_axis(top_scores, keep, axis=1), 0.0)
    det_classes = jnp.where(keep_valid, jnp.take_along_axis(cand_classes, keep, axis=1), 0)
    det_boxes = jnp.where(keep_valid[..., None], det_boxes, 0.0)
    return dict(boxes=det_boxes, scores=det_scores, classes=det_classes, valid=keep_valid,
                features={f"P{i}": feats[f"P{i}"] for i in (2, 3, 4, 5)})

  def detect_heads(self, features: dict[str, Array], boxes: Array, classes: Array
                   ) -> dict[str, Array]:
    """The second stage of ``detect``: the mask, landmark and matching heads on boxes
    [B, K, 4] (canvas coordinates) of classes [B, K] (0: no detection) from
    ``detect_boxes``' features. Returns masks [B, K, 28, 28], landmarks [B, K, L, 3] and
    embeddings [B, K, embed_dim], each row computed from its own box alone."""
    b, d = boxes.shape[:2]
    canvas_hw = tuple(4 * v for v in features["P2"].shape[1:3])
    channel = jnp.maximum(classes, 1) - 1
    mask_logits = self.mask_head(self._pool(features, boxes, 14, inference=True))
    mask_logits = mask_logits.reshape(b, d, 28, 28, -1)
    masks = jax.nn.sigmoid(jnp.take_along_axis(
        mask_logits, channel[:, :, None, None, None], axis=-1)[..., 0])
    landmarks = self._landmarks(features, boxes, classes, canvas_hw)
    embeddings = self._embed(features, boxes)
    return dict(masks=masks, landmarks=landmarks, embeddings=embeddings)

  def _landmarks(self, feats, boxes: Array, classes: Array, canvas_hw: tuple[int, int]
                 ) -> Array:
    """[B, D, L, 3] landmarks of each box's category (others zero; L = 0 without any).

    Decoded as detectron2's heatmaps_to_keypoints (the argmax of each 56x56 heatmap resized
    bicubically to the box), within windows sized for boxes up to the canvas.
    """
    b, d = boxes.shape[:2]
    spec = self.spec
    if not spec.has_landmarks:
      return jnp.zeros((b, d, 0, 3), jnp.float32)
    cls = jnp.maximum(classes, 1).reshape(-1)
    channels = jnp.asarray(spec.category_channels)[cls]  # [B*D, K]
    own = jnp.asarray(spec.category_channel_valid)[cls]
    pooled = self._pool(feats, boxes, 14, inference=True)
    if self.config.landmark_select_channels:
      gathered = self.landmark_head(pooled, channels)  # [B*D, 28, 28, K]
    else:
      logits = self.landmark_head(pooled)  # [B*D, 28, 28, L]
      gathered = jnp.take_along_axis(logits, channels[:, None, None, :], axis=-1)
    points = heatmaps_to_landmarks(upsample_heatmaps(gathered), boxes.reshape(-1, 4),
                                   tuple(canvas_hw))
    points = jnp.where(own[..., None], points, 0.0)  # [B*D, K, 3]
    out = jnp.zeros((b * d, spec.num_landmarks, 3), jnp.float32)
    rows = jnp.arange(b * d)[:, None]
    # Padded slots of a category all point at its first channel with zeros: add, not set.
    out = out.at[rows, channels].add(points)
    valid = (classes > 0).reshape(-1)[:, None, None]
    return jnp.where(valid, out, 0.0).reshape(b, d, spec.num_landmarks, 3)

  def embed(self, images: Array, image_hw: Array, boxes: Array) -> Array:
    """Embeddings [B, N, D] of given boxes [B, N, 4] (canvas coordinates) in canvases
    [B, H, W, 3] with content image_hw [B, 2] (needed: the padding is set as ``detect`` sets
    it, so a box embeds to what ``detect`` would give it)."""
    return self._embed(self._features(images, image_hw), boxes.astype(jnp.float32))

  def match_logits(self, query: Array, gallery: Array) -> Array:
    """Match logits [..., Q, G] of query embeddings [..., Q, D] against a gallery [..., G, D]."""
    return self.scorer(query, gallery)


def matching_items(gt_boxes: Array, pair_id: Array, style: Array, gt_valid: Array,
                   rois: Array, roi_fg: Array, roi_item: Array) -> dict[str, Array]:
  """The items the pair loss embeds: every GT item, then the given foreground RoIs, each RoI
  labelled with the pair_id and style of the GT item it matched (IoU >= 0.5).

  Args:
    gt_boxes: [B, M, 4]; pair_id, style: [B, M] int; gt_valid: [B, M] bool.
    rois: [B, K, 4] (K may be 0); roi_fg: [B, K] bool; roi_item: [B, K] int GT index.

  Returns:
    {"boxes" [B, M + K, 4], "pair_id", "style" [B, M + K] int32, "valid" [B, M + K] bool}.
  """
  pair_id, style = pair_id.astype(jnp.int32), style.astype(jnp.int32)
  take = lambda x: jnp.take_along_axis(x, roi_item.astype(jnp.int32), axis=1)
  return {"boxes": jnp.concatenate([gt_boxes, rois.astype(gt_boxes.dtype)], axis=1),
          "pair_id": jnp.concatenate([pair_id, take(pair_id)], axis=1),
          "style": jnp.concatenate([style, take(style)], axis=1),
          "valid": jnp.concatenate([gt_valid, roi_fg], axis=1)}


def pair_labels(pair_id: Array, style: Array, valid: Array, negatives: str
                ) -> tuple[Array, Array]:
  """Labels and validity of the pair loss's logits.

  Args:
    pair_id, style, valid: [P, 2, N] per image pair, user items (index 0) and shop items (1);
      valid already False for pairs whose matching is masked.
    negatives: "pair": user items x shop items of the same image pair, [P, N, N]; "batch":
      every user item of the batch x every shop item of the batch, [P * N, P * N] (rows and
      columns in pair-major order), positive wherever pair_id and style > 0 agree.

  Returns:
    (labels float32 in {0, 1}, valid bool), shaped as the logits.
  """
  if negatives == "pair":
    return jax.vmap(target_ops.pair_targets)(pair_id[:, 0], style[:, 0], valid[:, 0],
                                             pair_id[:, 1], style[:, 1], valid[:, 1])
  if negatives == "batch":
    flat = lambda x, side: x[:, side].reshape(-1)
    return target_ops.pair_targets(flat(pair_id, 0), flat(style, 0), flat(valid, 0),
                                   flat(pair_id, 1), flat(style, 1), flat(valid, 1))
  raise ValueError(f"match_negatives must be one of {MATCH_NEGATIVES}, got {negatives!r}")


# config.model fields that say how to initialise a fresh run, not what the network is.
INIT_FIELDS = ("backbone_weights", "init_from", "init_from_step")


def model_from_config(config) -> MatchRCNN:
  """The ``MatchRCNN`` of an ml_collections config (``config.model``, ``config.data.canvas`` and
  the dataset spec ``config.data.spec``).

  Every ``config.model`` field but ``INIT_FIELDS`` must be a ``MatchRCNNConfig`` field: an
  unknown or misspelt one raises TypeError naming it.
  """
  canvas = tuple(int(v) for v in config.data.canvas)
  fields = {k: v for k, v in config.model.to_dict().items() if k not in INIT_FIELDS}
  fields["stage_sizes"] = tuple(fields["stage_sizes"])
  fields["anchor_sizes"] = tuple(fields["anchor_sizes"])
  known = {f.name for f in dataclasses.fields(MatchRCNNConfig)}
  unknown = sorted(set(fields) - known)
  if unknown:
    raise TypeError(f"unknown config.model field(s) {unknown}; known: {sorted(known)} and "
                    f"{list(INIT_FIELDS)}")
  return MatchRCNN(MatchRCNNConfig(**fields), canvas, spec_from_config(config))


def init_variables(model: MatchRCNN, rng: Array, batch: dict[str, Any]) -> dict[str, Any]:
  """Parameters ("params") and frozen constants ("constants") from a training batch's shapes."""
  params_rng, sampling_rng = jax.random.split(rng)
  init = jax.jit(lambda r1, r2, b: model.init({"params": r1, "sampling": r2}, b,
                                                method=MatchRCNN.losses))
  return init(params_rng, sampling_rng, batch)
