"""Every config field with its one default: the paper's 1x recipe.

``configs/match_rcnn_r50_fpn_1x_df2.py`` is these defaults as they are.

``get_config()`` is the base every config file starts from and overrides; a field exists only
here (``rules.RULES`` holds its rule, ``models.match_rcnn.MatchRCNNConfig`` reads the model
section as it is). Configs saved by earlier runs are completed by ``run_config.upgrade``, not by
defaults in the code that reads them.
"""

from __future__ import annotations

import ml_collections

from data_pipeline import spec


def get_config() -> ml_collections.ConfigDict:
  """The 1x recipe: Match R-CNN, ResNet-50-FPN, on the DeepFashion2 release."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict(dict(
      # raw: a DeepFashion2 root with train/ and validation/ ({image,annos}/);
      # coco: COCO-format JSONs + image folders; tfds: the prepared TFDS builder;
      # synthetic: generated on first use under synthetic_dir (cached).
      format="raw",
      root="",
      train_split="train",
      eval_split="validation",
      coco_json_train="", coco_images_train="", coco_json_eval="", coco_images_eval="",
      tfds_data_dir="",
      synthetic_dir="data/synthetic",
      synthetic_train_pairs=200, synthetic_val_pairs=50, synthetic_image_size=256,
      synthetic_seed=0,
      # Shorter side resized to short_side, longer side at most max_size; every image fits
      # `canvas` (each side a multiple of 32).
      short_side=800, max_size=1333, canvas=(1344, 1344),
      # Orientation buckets: a batch whose images all fit one of these smaller canvases is
      # padded onto it instead of `canvas`; the pipeline groups each step's image pairs by
      # orientation. Each canvas is one compiled program. (): every batch on `canvas`.
      bucket_canvases=((800, 1344), (1344, 800)),
      max_instances=8, mask_size=112, flip_prob=0.5,
      # strict: a bad field fails the scan instead of dropping its part (see
      # data_pipeline.annotations); check_images: what the scan checks of each image file.
      strict=False, check_images="decode",
      num_workers=0,  # annotation scan processes (0: every core)
      # Images decoded and encoded at once by the training input pipeline (0: one per core).
      input_workers=0,
      # Each step's image pairs share the user image's category where possible (the pair loss
      # then ranks same-category shop items as negatives; see data_pipeline.pairs).
      category_batches=False,
      # Which user-shop image pairs an epoch trains the matching loss on: "matching" (one
      # maximum matching of the partner graph per epoch, every image once) or "all_pairs"
      # (every partner pair once, images may repeat). See data_pipeline.pairs.
      pair_sampling="matching",
      # The dataset's taxonomy (data_pipeline/spec.py): categories, each one's landmarks, flip
      # pairs and OKS sigmas, whether the set has masks and user/shop pairs. DeepFashion2's by
      # default; format "coco" reads it from coco_json_train (+ spec_file, a small JSON with
      # flip pairs and sigmas) when training starts, and the run's config keeps it.
      spec=spec.DEEPFASHION2.to_dict(),
      spec_file="",
  ))

  config.model = ml_collections.ConfigDict(dict(
      # Backbone: ResNet stage sizes and width (64: ResNet-50), stages frozen below freeze_at,
      # "FrozenBN" (the ImageNet statistics as constants) or "GN" (trainable, from scratch).
      stage_sizes=(3, 4, 6, 3), width=64, freeze_at=2, norm="FrozenBN", fpn_channels=256,
      anchor_sizes=(32, 64, 128, 256, 512),  # one per level P2..P6
      rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=1000,
      rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000, rpn_nms_threshold=0.7,
      rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
      # RoIAlign in training: "gather", "window" (2x2 slices) or "matmul" (faster for small
      # feature maps on a CPU); inference pools a "gather" model with "window" (ops/roi_align).
      roi_align_method="gather",
      roi_batch_size_per_image=512, roi_positive_fraction=0.25,
      # cls_agnostic_bbox_reg: one box regressor for every class.
      box_fc_dim=1024, cls_agnostic_bbox_reg=False, mask_conv_dim=256, landmark_conv_dim=512,
      landmark_num_convs=8,
      # Foreground RoIs per image that train the landmark head, the first of the box head's
      # sample (at most its foreground share, 512 x 0.25 = 128; Detectron: up to 128,
      # detectron2: every foreground proposal).
      landmark_rois_per_image=128,
      landmark_visible_only=False,  # the landmark loss on visible landmarks only
      # Compute only each RoI's category channels (<= 39 of 294) in the landmark head's last
      # layer: the same values, fewer multiply-adds (pays off for narrow heads).
      landmark_select_channels=False,
      # Box regression: smooth-L1 with these betas (Detectron: 1 in the box head, 1/9 in the
      # RPN; 0 is L1). Mask targets: the GT mask's RoIAlign thresholded at 0.5 (detectron2), or
      # the soft fractions themselves (False).
      box_loss_beta=1.0, rpn_box_loss_beta=1.0 / 9.0, mask_binary_targets=True,
      match_conv_dim=256, match_proj_dim=1024, embed_dim=256,
      # The pair loss: each user item against every shop item of the batch ("batch"; "pair":
      # within its own image pair, the paper), match_rois_per_image foreground RoIs per image
      # embedded besides the GT boxes (detected boxes are what retrieval sees; 0: GT boxes
      # only), positives and negatives weighing half each (match_balanced), the similarity fc
      # starting as minus the mean squared distance ("distance"; or "normal").
      match_negatives="batch", match_rois_per_image=8, match_balanced=True,
      match_scorer_init="distance",
      # The GT items of the last match_memory_steps steps (at most match_memory_items per step,
      # 0: every GT slot), kept as pooled RoI features, add a pair-loss term of their own,
      # embedded by the current matching head; match_memory_draw of the stored steps, drawn at
      # random, form it each step (0: all). match_memory_steps=0: off.
      match_memory_steps=0, match_memory_items=0, match_memory_draw=0,
      # Inference: class scores below score_threshold dropped, class-wise NMS, the best
      # detections_per_image of the detection_candidates top-scoring (box, class) pairs.
      score_threshold=0.05, detection_nms_threshold=0.5, detections_per_image=100,
      detection_candidates=2000,
      dtype="bfloat16",  # compute dtype; params and losses stay float32
      # A fresh run starts from these (a resumed run reads its checkpoint instead):
      # torchvision ResNet-50 ImageNet weights (.pth, or .safetensors with the same names),
      # required by a recipe with frozen BN and frozen stages;
      backbone_weights="",
      # then, optionally, another run's checkpoint directory (its params and constants, where
      # names and shapes match) at init_from_step (-1: the latest).
      init_from="", init_from_step=-1,
  ))

  config.train = ml_collections.ConfigDict(dict(
      global_batch_pairs=8,          # 16 images
      epochs=12,
      decay_epochs=(8, 11),
      optimizer="sgd",               # or "adamw"
      base_lr=0.02,                  # for 16 images; scale linearly for other batch sizes
      warmup_steps=1000,
      warmup_factor=0.001,
      momentum=0.9,
      weight_decay=1e-4,
      num_steps=-1,                  # > 0 overrides epochs
      # Top-level modules whose learning rate is not decayed (e.g. ("matching_head", "scorer")).
      undecayed_modules=(),
      # The paper's l1..l5 were never published: 1 each (and 1 for the RPN terms).
      loss_weights=ml_collections.ConfigDict(dict(
          rpn_cls=1.0, rpn_box=1.0, cls=1.0, box=1.0, landmark=1.0, mask=1.0, pair=1.0)),
      log_every_steps=20,
      checkpoint_every_steps=5000,
      keep_checkpoints=3,
      # Evaluate every N steps into workdir/eval_<step>/ (0: only after the last step), and
      # keep the checkpoint with the best eval metric (a metrics.json scalar without "eval/",
      # e.g. bbox/AP, segm/AP, keypoints/AP, retrieval/top20) under workdir/best/.
      eval_every_steps=24000,
      best_metric="bbox/AP",
  ))

  config.eval = ml_collections.ConfigDict(dict(
      batch_size=8,  # images per device (evaluation and prediction use every device)
      # 0: the whole split; N: a fixed subset of N images (whole pair_ids drawn with a fixed
      # seed, so retrieval queries keep their shop images), the same in every evaluation.
      max_images=0,
      retrieval_topk=20,
      gallery_nms_threshold=0.5,  # class-agnostic NMS of each shop image's gallery boxes
      gallery_score_threshold=0.0,  # gallery boxes scoring less are left out
      num_drawn_images=8,        # drawn into eval_<step>/detections.png and TensorBoard
      draw_score_threshold=0.3,  # detections drawn there score at least this
      num_retrieval_strips=4,    # consumer images whose top-5 shop items are drawn
      host_workers=0,            # processes pasting masks, encoding results; 0: cores - 1
      host_pool="process",       # or "thread" (the GIL serialises them)
      # Evaluate even when validation images, items, polygons or landmarks were dropped as
      # unreadable or invalid (the ground truth then altered or missing); False refuses in one
      # line.
      allow_skipped=False,
  ))
  return config
