"""Training targets of Match R-CNN: anchors, RoIs, masks, landmarks, pairs.

detectron2 semantics with static shapes. Every function here acts on ONE
image (pair targets: one user/shop image pair); the caller vmaps over the
batch, with one PRNG key per image where a key is taken. Ground truth comes
padded to a fixed instance count M with a validity mask (data_pipeline
`image_spec`); padded instances never match, are never sampled and produce no
targets. Targets carry no gradient (inputs are wrapped in stop_gradient).

Conventions: boxes are (x1, y1, x2, y2) in continuous canvas coordinates
(pixel (i, j) covers [j, j + 1) x [i, i + 1)); classes are 1..C (the spec's) with
0 = background / padding; GT masks are [M, S, S] crops of each mask to its
box (crop pixel (i, j) covers [x1 + j * w / S, x1 + (j + 1) * w / S) x
[y1 + i * h / S, y1 + (i + 1) * h / S)).
"""

from typing import Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from df2_jax.ops import boxes as box_ops
from df2_jax.ops import roi_align as roi_align_ops
from df2_jax.ops import sampling

Array = jnp.ndarray
Size = Union[int, Tuple[int, int]]

# detectron2 defaults (MODEL.RPN.* and MODEL.ROI_HEADS.*).
RPN_IOU_THRESHOLDS = (0.3, 0.7)
RPN_IOU_LABELS = (0, -1, 1)
ROI_IOU_THRESHOLDS = (0.5,)
ROI_IOU_LABELS = (0, 1)


def match(iou: Array, gt_valid: Array, thresholds: Sequence[float],
          labels: Sequence[int],
          allow_low_quality: bool) -> Tuple[Array, Array]:
  """detectron2 `Matcher`: the best GT of every prediction and its label.

  With thresholds t_1 < ... < t_k and labels l_0..l_k, a prediction whose
  best IoU v lies in [t_i, t_{i+1}) (t_0 = -inf, t_{k+1} = +inf) gets l_i.
  With allow_low_quality, every prediction that attains some valid GT's
  highest IoU (ties included) is relabelled 1; its matched index stays the
  argmax over GTs, as in detectron2. Unlike detectron2, a GT whose highest
  IoU is 0 promotes nothing (detectron2 would promote every prediction with
  IoU 0 to it; that only happens for degenerate GT boxes).

  Invalid (padded) GT rows never match. Without any valid GT every prediction
  gets labels[0] and index 0 (detectron2's empty-GT behaviour). Ties between
  GTs go to the lowest index. Per image; vmap over a batch.

  Args:
    iou: [M, N] match quality of M GTs against N predictions.
    gt_valid: [M] bool.
    thresholds: static ascending IoU thresholds, length k.
    labels: static labels in {-1, 0, 1}, length k + 1.
    allow_low_quality: static; detectron2 uses True for the RPN, False for
      the RoI heads.

  Returns:
    matched [N] int32 GT index in [0, M); labels [N] int32 in {-1, 0, 1}.
  """
  thresholds = [float(t) for t in thresholds]
  labels = [int(l) for l in labels]
  if len(labels) != len(thresholds) + 1:
    raise ValueError(f'need len(labels) == len(thresholds) + 1, got '
                     f'{labels} and {thresholds}')
  if any(b < a for a, b in zip(thresholds[:-1], thresholds[1:])):
    raise ValueError(f'thresholds must be ascending, got {thresholds}')
  if any(l not in (-1, 0, 1) for l in labels):
    raise ValueError(f'labels must be in {{-1, 0, 1}}, got {labels}')
  iou = jnp.asarray(iou, jnp.float32)
  m, n = iou.shape
  if m == 0:
    return (jnp.zeros((n,), jnp.int32), jnp.full((n,), labels[0], jnp.int32))
  gt_valid = jnp.asarray(gt_valid, bool)
  # Padded rows sit below any real IoU (>= 0) and below every threshold a
  # matcher would use, so they neither win the argmax nor raise a label.
  q = jnp.where(gt_valid[:, None], iou, -1.0)
  best = jnp.max(q, axis=0)
  matched = jnp.argmax(q, axis=0).astype(jnp.int32)
  out = jnp.full((n,), labels[0], jnp.int32)
  for low, lab in zip(thresholds, labels[1:]):
    out = jnp.where(best >= low, lab, out)
  if allow_low_quality:
    highest = jnp.max(q, axis=1, keepdims=True)  # [M, 1]
    is_best = (q == highest) & gt_valid[:, None] & (highest > 0)
    out = jnp.where(jnp.any(is_best, axis=0), 1, out)
  return matched, out


def rpn_targets(key: Array, anchors: Array, gt_boxes: Array, gt_valid: Array,
                num_samples: int = 256, positive_fraction: float = 0.5,
                fg_iou: float = 0.7, bg_iou: float = 0.3,
                image_hw: Optional[Array] = None) -> Dict[str, Array]:
  """RPN objectness labels and deltas (detectron2 label_and_sample_anchors).

  Anchors are matched with IoU >= fg_iou fg, < bg_iou bg, in between ignored,
  plus low-quality matches (each GT's best anchors are fg); then at most
  num_samples * positive_fraction fg and the rest bg are sampled. Anchors
  crossing the image border are kept (anchor_boundary_thresh = -1), but with
  image_hw an anchor whose centre lies in the canvas's zero padding (x >= w or
  y >= h) is neither fg nor bg: it is never sampled, so the RPN does not learn
  "padding is background" from anchors no image content can reach. An image
  without valid GT samples num_samples bg anchors. Per image; vmap over a
  batch with one key per image.

  Args:
    key: PRNG key.
    anchors: [A, 4] all anchors of the image (all levels concatenated).
    gt_boxes: [M, 4].
    gt_valid: [M] bool.
    num_samples: static anchors sampled per image (RPN.BATCH_SIZE_PER_IMAGE).
    positive_fraction: static RPN.POSITIVE_FRACTION.
    fg_iou, bg_iou: static RPN.IOU_THRESHOLDS (bg_iou, fg_iou).
    image_hw: [2] the image's content height and width on the canvas; None:
      every anchor may be sampled.

  Returns:
    labels: [A] int32; 1 sampled fg, 0 sampled bg, -1 not sampled.
    deltas: [A, 4] float32 anchor -> matched GT deltas, weights (1, 1, 1, 1);
      zero where labels != 1.
  """
  anchors = jax.lax.stop_gradient(jnp.asarray(anchors, jnp.float32))
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  iou = box_ops.pairwise_iou(gt_boxes, anchors)  # [M, A]
  matched, labels = match(iou, gt_valid, (bg_iou, fg_iou), RPN_IOU_LABELS,
                          allow_low_quality=True)
  if image_hw is not None:
    hw = jnp.asarray(image_hw, jnp.float32)
    cx = 0.5 * (anchors[:, 0] + anchors[:, 2])
    cy = 0.5 * (anchors[:, 1] + anchors[:, 3])
    labels = jnp.where((cx < hw[1]) & (cy < hw[0]), labels, -1)
  fg, bg = sampling.subsample_labels(key, labels, num_samples,
                                     positive_fraction)
  out_labels = jnp.where(fg, 1, jnp.where(bg, 0, -1)).astype(jnp.int32)
  deltas = box_ops.encode(gt_boxes[matched], anchors, box_ops.RPN_BOX_WEIGHTS)
  deltas = jnp.where(fg[:, None], deltas, 0.0)
  return {'labels': out_labels, 'deltas': deltas}


def roi_targets(key: Array, proposals: Array, proposal_valid: Array,
                gt_boxes: Array, gt_classes: Array, gt_valid: Array,
                num_samples: int = 512, positive_fraction: float = 0.25,
                fg_iou: float = 0.5) -> Dict[str, Array]:
  """Sampled RoIs for the box head (detectron2 label_and_sample_proposals).

  The GT boxes are appended to the proposals (proposal_append_gt), every
  candidate is matched to its best valid GT (IoU >= fg_iou fg, else bg, no
  low-quality matches), and up to num_samples * positive_fraction fg plus bg
  up to num_samples are sampled uniformly. The output always has num_samples
  rows: fg first, then bg, then padding (roi_valid False, zero box, class 0)
  when the image has fewer candidates. Invalid proposals and padded GT are
  never sampled; an image without valid GT gets only bg. Per image; vmap over
  a batch with one key per image.

  Args:
    key: PRNG key.
    proposals: [K, 4] RPN proposals.
    proposal_valid: [K] bool.
    gt_boxes: [M, 4].
    gt_classes: [M] int32 in 1..C (anything for padding).
    gt_valid: [M] bool.
    num_samples: static ROI_HEADS.BATCH_SIZE_PER_IMAGE.
    positive_fraction: static ROI_HEADS.POSITIVE_FRACTION.
    fg_iou: static ROI_HEADS.IOU_THRESHOLDS[0].

  Returns:
    rois: [num_samples, 4] float32 sampled boxes.
    roi_valid: [num_samples] bool.
    classes: [num_samples] int32 matched GT class for fg, 0 for bg / padding.
    matched_gt: [num_samples] int32 GT index (meaningful where is_fg; 0 on
      padding).
    is_fg: [num_samples] bool (a prefix of the rows).
    box_deltas: [num_samples, 4] float32 RoI -> matched GT deltas with
      weights (10, 10, 5, 5); zero where not fg.
  """
  proposals = jax.lax.stop_gradient(jnp.asarray(proposals, jnp.float32))
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  gt_valid = jnp.asarray(gt_valid, bool)
  cand = jnp.concatenate([proposals, gt_boxes], axis=0)  # [K + M, 4]
  cand_valid = jnp.concatenate([jnp.asarray(proposal_valid, bool), gt_valid])
  iou = box_ops.pairwise_iou(gt_boxes, cand)  # [M, K + M]
  matched, labels = match(iou, gt_valid, (fg_iou,), ROI_IOU_LABELS,
                          allow_low_quality=False)
  labels = jnp.where(cand_valid, labels, -1)
  idx, valid, is_fg = sampling.sample_indices(key, labels, num_samples,
                                              positive_fraction)
  rois = jnp.where(valid[:, None], cand[idx], 0.0)
  matched_gt = jnp.where(valid, matched[idx], 0)
  classes = jnp.where(is_fg, jnp.asarray(gt_classes, jnp.int32)[matched_gt], 0)
  deltas = box_ops.encode(gt_boxes[matched_gt], rois, box_ops.ROI_BOX_WEIGHTS)
  deltas = jnp.where(is_fg[:, None], deltas, 0.0)
  return {
      'rois': rois,
      'roi_valid': valid,
      'classes': classes,
      'matched_gt': matched_gt,
      'is_fg': is_fg,
      'box_deltas': deltas,
  }


def mask_targets(gt_masks: Array, gt_boxes: Array, rois: Array,
                 matched_gt: Array, output_size: Size = 28,
                 sampling_ratio: int = 2,
                 threshold: Optional[float] = None, method: str = "gather") -> Array:
  """Each RoI's matched GT mask resampled into the RoI's output grid.

  RoI coordinates map into the matched GT's crop grid by
  u = (x - gx1) * S / gw, v = (y - gy1) * S / gh, and `roi_align.roi_align`
  (aligned, bilinear, sampling_ratio^2 samples per bin) samples the crop,
  which is padded with a one-pixel zero border: the mask is 0 outside its
  GT box and falls off bilinearly across the box's edge. This stands in for
  detectron2's RoIAlign of the full-image mask (BitMasks.crop_and_resize);
  detectron2 then thresholds at 0.5, available here via `threshold`.

  Per image; vmap over a batch. Rows of background or padded RoIs hold
  meaningless values; the mask loss uses fg rows only.

  Args:
    gt_masks: [M, S, S] uint8 0/1 (or float) crops of the GT masks to their
      boxes (non-square [M, Sh, Sw] works too).
    gt_boxes: [M, 4] the boxes the crops cover.
    rois: [R, 4].
    matched_gt: [R] int32 GT index of every RoI.
    output_size: static int or (oh, ow).
    sampling_ratio: static samples per bin and axis.
    threshold: static; None keeps soft targets, a float returns
      (value >= threshold) as 0/1.
    method: static; RoIAlign's "gather" or "matmul" (same values).

  Returns:
    [R, oh, ow] float32 in [0, 1].
  """
  gt_boxes = jax.lax.stop_gradient(jnp.asarray(gt_boxes, jnp.float32))
  rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
  sh, sw = gt_masks.shape[-2:]
  crops = jnp.asarray(gt_masks)[matched_gt]  # [R, Sh, Sw]
  crops = jnp.pad(crops.astype(jnp.float32), ((0, 0), (1, 1), (1, 1)))
  g = gt_boxes[matched_gt]  # [R, 4]
  gw = jnp.maximum(g[:, 2] - g[:, 0], 1e-6)
  gh = jnp.maximum(g[:, 3] - g[:, 1], 1e-6)
  # +1: the zero border shifts the crop grid by one pixel.
  u1 = (rois[:, 0] - g[:, 0]) * (sw / gw) + 1.0
  u2 = (rois[:, 2] - g[:, 0]) * (sw / gw) + 1.0
  v1 = (rois[:, 1] - g[:, 1]) * (sh / gh) + 1.0
  v2 = (rois[:, 3] - g[:, 1]) * (sh / gh) + 1.0
  crop_boxes = jnp.stack([u1, v1, u2, v2], axis=-1)[:, None, :]  # [R, 1, 4]
  out = roi_align_ops.roi_align(crops[..., None], crop_boxes, output_size,
                                1.0, sampling_ratio, aligned=True, method=method)
  out = jnp.clip(out[:, 0, :, :, 0], 0.0, 1.0)  # [R, oh, ow]
  if threshold is not None:
    out = (out >= threshold).astype(jnp.float32)
  return out


def landmark_targets(gt_landmarks: Array, rois: Array, matched_gt: Array,
                     classes: Array, heatmap_size: int = 56,
                     visible_only: bool = False, *, own_channels: Array
                     ) -> Tuple[Array, Array]:
  """Heatmap bin of every landmark of every RoI (keypoints_to_heatmap).

  x_bin = floor((x - x1) * heatmap_size / (x2 - x1)), likewise y; a point
  exactly on the RoI's right (bottom) edge goes to the last bin. A landmark
  is valid when it is labelled (v > 0, or v == 2 with visible_only), its bin
  lies inside the RoI, and its channel belongs to the RoI's class
  (own_channels[class]; class 0 has no channels). Degenerate RoIs
  have no valid landmarks. Per image; vmap over a batch.

  Args:
    gt_landmarks: [M, L, 3] (x, y, v) in canvas coordinates, v in {0,1,2}.
    rois: [R, 4].
    matched_gt: [R] int32.
    classes: [R] int32 in 0..C (0 = background).
    own_channels: [C + 1, L] bool, the dataset spec's ``category_landmark_mask``.
    heatmap_size: static side of the square heatmap.
    visible_only: static; count only v == 2 as labelled.

  Returns:
    indices [R, L] int32 flat bins y * heatmap_size + x in
    [0, heatmap_size^2) (0 where invalid); valid [R, L] bool.
  """
  rois = jax.lax.stop_gradient(jnp.asarray(rois, jnp.float32))
  kp = jax.lax.stop_gradient(
      jnp.asarray(gt_landmarks, jnp.float32))[matched_gt]  # [R, L, 3]
  x1, y1, x2, y2 = (rois[:, i:i + 1] for i in range(4))  # [R, 1] each
  w, h = x2 - x1, y2 - y1
  nonempty = (w > 0) & (h > 0)
  scale_x = heatmap_size / jnp.where(w > 0, w, 1.0)
  scale_y = heatmap_size / jnp.where(h > 0, h, 1.0)
  x, y, v = kp[..., 0], kp[..., 1], kp[..., 2]
  last = float(heatmap_size - 1)
  xf = jnp.where(x == x2, last, jnp.floor((x - x1) * scale_x))
  yf = jnp.where(y == y2, last, jnp.floor((y - y1) * scale_y))
  inside = (xf >= 0) & (yf >= 0) & (xf < heatmap_size) & (yf < heatmap_size)
  labelled = (v == 2) if visible_only else (v > 0)
  table = jnp.asarray(own_channels)  # [C + 1, L]
  own = table[jnp.clip(jnp.asarray(classes, jnp.int32), 0,
                       table.shape[0] - 1)]
  valid = inside & labelled & own & nonempty
  # Clip before the cast: the float -> int conversion of far-away points is
  # undefined otherwise.
  xi = jnp.clip(xf, 0, last).astype(jnp.int32)
  yi = jnp.clip(yf, 0, last).astype(jnp.int32)
  indices = jnp.where(valid, yi * heatmap_size + xi, 0)
  return indices, valid


def pair_targets(user_pair_id: Array, user_style: Array, user_valid: Array,
                 shop_pair_id: Array, shop_style: Array,
                 shop_valid: Array) -> Tuple[Array, Array]:
  """Match labels between the items of a user image and a shop image.

  An item pair is positive iff both share pair_id and style, with style > 0
  (style 0 marks items not meant for retrieval). One image pair; vmap over
  pairs.

  Args:
    user_pair_id, user_style: [Mu] int32.
    user_valid: [Mu] bool.
    shop_pair_id, shop_style: [Ms] int32.
    shop_valid: [Ms] bool.

  Returns:
    labels [Mu, Ms] float32 in {0, 1}; valid [Mu, Ms] bool (both items valid).
  """
  up, us = jnp.asarray(user_pair_id), jnp.asarray(user_style)
  sp, ss = jnp.asarray(shop_pair_id), jnp.asarray(shop_style)
  valid = jnp.asarray(user_valid, bool)[:, None] & jnp.asarray(
      shop_valid, bool)[None, :]
  same = (up[:, None] == sp[None, :]) & (us[:, None] == ss[None, :])
  labels = (same & (us[:, None] > 0) & valid).astype(jnp.float32)
  return labels, valid

