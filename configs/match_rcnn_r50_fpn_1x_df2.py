r"""Match R-CNN, ResNet-50-FPN, the paper's 1x recipe on DeepFashion2.

  python run.py --config configs/match_rcnn_r50_fpn_1x_df2.py --workdir runs/r50_1x \
      --config.data.root=/path/to/deepfashion2 \
      --config.model.backbone_weights=/path/to/resnet50-0676ba61.pth

The backbone starts from torchvision's ImageNet ResNet-50 (IMAGENET1K_V1,
https://download.pytorch.org/models/resnet50-0676ba61.pth, or a .safetensors copy; the run
refuses to start without it). 16 images (8 image pairs) per step, SGD momentum 0.9, LR 0.02
with a 1000-step linear warm-up, x0.1 after epochs 8 and 11 of 12; shorter side 800, longer
<= 1333, each step's images on an 800x1344 (landscape) or 1344x800 (portrait) canvas, or
1344x1344 for the steps whose image pairs mix orientations (orientation buckets). An epoch
visits each of the release's 191,961 training images once (95,981 elements of two images:
user/shop partners where the epoch's matching pairs them, others paired at random with the
matching loss masked): 11,998 steps per epoch, 143,976 steps in all (2.3M image visits),
decays at steps 95,984 and 131,978. Evaluates the 32,153 validation images every 24,000 steps
and at the end (eval_<step>/, best box AP kept in best/).

The losses are Detectron's (the paper's code): smooth-L1 box regression (beta 1 in the box
head, 1/9 in the RPN), binary mask targets (the GT mask's RoIAlign thresholded at 0.5), and
every foreground RoI of the box head's 512-RoI sample (up to 128 per image) trains the landmark
head. Landmarks are continuous coordinates in training (annotated pixel index + 0.5, so a flip
maps index x to W - 1 - x) and pixel indices again in the results (-0.5), as in detectron2.
Validation images or items that fail validation refuse the evaluation (eval.allow_skipped);
training drops only the bad landmark, polygon or item.

Pair sampling (data.pair_sampling): the default "matching" keeps a 1x schedule's epochs in
images, as Detectron counts them: each epoch one maximum matching of the user-shop partner
graph trains the matching loss (every image once per epoch; 12 times the matching's size,
which is at most 95,980, pair visits in all). The paper's text implies "all_pairs": it builds every user/shop
image combination sharing a style > 0 item as an image pair (337,293 in the train split) and
fills each batch with 8 of them, though it never says what an epoch counts. With "all_pairs"
an epoch is every pair once, plus the Z images without a partner paired at random with the
matching loss masked: ceil((337,293 + ceil(Z / 2)) / 8) >= 42,162 steps per epoch, >= 505,944
steps in 12 epochs (decays at >= 337,296 and 463,782), 4.05M pair visits: 3.5x the steps,
about 18 hours on one H100 at the benchmark's rate (an estimate, not a measured run).

Expected: the paper's validation numbers are box AP .667, landmark AP .641 (visible) / .563
(visible + occluded), mask AP .674; the official baseline retrained on the release: box .638,
landmarks .605 / .529, mask .640, retrieval top-1 .192 / top-20 .524. No run of this recipe has
been made with this code yet. Runtime, an estimate from the train-step benchmark (126 img/s on
one H100, bf16, 800x1344; docs/PERFORMANCE.md), not a measured run: about 5 hours of steps on
one H100, under an hour on 8 if the step scales and the input keeps up; each full evaluation
adds its own time.

Why: the paper's setup (Detectron's 1x schedule, batch 16, ResNet-50-FPN from ImageNet), with
epochs counted in images as a 1x schedule is.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
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
      short_side=800, max_size=1333, canvas=(1344, 1344),
      # Orientation buckets: a batch whose images all fit one of these smaller canvases is
      # padded onto it instead of `canvas` (landscape and portrait images fill 81% of these,
      # 48% of the square, on the real fixtures); the pipeline groups each step's image pairs
      # by orientation. Each canvas is one compiled program. (): every batch on `canvas`.
      bucket_canvases=((800, 1344), (1344, 800)),
      max_instances=8, mask_size=112, flip_prob=0.5,
      strict=False, check_images="decode", num_workers=0,
      # Images decoded and encoded at once by the training input pipeline (0: one per core this
      # process may use; the GPU machine's 16 cores: see docs/PERFORMANCE.md).
      input_workers=0,
      # Each step's image pairs share the user image's category where possible (the pair loss
      # then ranks same-category shop items as negatives; see data_pipeline.pairs).
      category_batches=False,
      # Which user-shop image pairs an epoch trains the matching loss on: "matching" (one
      # maximum matching of the partner graph per epoch, every image once) or "all_pairs"
      # (every partner pair once, images may repeat). See data_pipeline.pairs.
      pair_sampling="matching",
  ))

  config.model = ml_collections.ConfigDict(dict(
      stage_sizes=(3, 4, 6, 3), width=64, freeze_at=2, norm="FrozenBN", fpn_channels=256,
      anchor_sizes=(32, 64, 128, 256, 512),  # one per level P2..P6
      rpn_pre_nms_topk_train=2000, rpn_post_nms_topk_train=1000,
      rpn_pre_nms_topk_test=1000, rpn_post_nms_topk_test=1000, rpn_nms_threshold=0.7,
      rpn_batch_size_per_image=256, rpn_positive_fraction=0.5,
      roi_align_method="gather",  # or "matmul": faster for small feature maps on a CPU
      roi_batch_size_per_image=512, roi_positive_fraction=0.25,
      box_fc_dim=1024, cls_agnostic_bbox_reg=False, mask_conv_dim=256, landmark_conv_dim=512,
      landmark_num_convs=8,
      # Every foreground RoI of the box head's sample (<= 512 x 0.25 = 128; Detectron: up to
      # 128, detectron2: every foreground proposal) trains the landmark head.
      landmark_rois_per_image=128, landmark_visible_only=False,
      landmark_select_channels=False,  # True: only each RoI's category channels (narrow heads)
      # Detectron's smooth-L1 (beta 1 in the box head, 1/9 in the RPN; 0 would be L1) and
      # binary mask targets (the RoIAlign of the GT mask thresholded at 0.5, as detectron2).
      box_loss_beta=1.0, rpn_box_loss_beta=1.0 / 9.0, mask_binary_targets=True,
      match_conv_dim=256, match_proj_dim=1024, embed_dim=256,
      # The pair loss: every user item of the batch against every shop item ("batch"; "pair":
      # within each image pair only), 8 foreground RoIs per image embedded besides the GT boxes
      # (the author's layer log: 8 RoIs per image; detected boxes are what retrieval sees),
      # positives and negatives weighing half each, the similarity fc starting as minus the
      # mean squared distance. Each measured on the demo: docs/EXPERIMENTS.md.
      match_negatives="batch", match_rois_per_image=8, match_balanced=True,
      match_scorer_init="distance",
      # The GT items of the last N steps (at most match_memory_items per step, 0: all GT
      # slots), kept as pooled RoI features, add a pair-loss term of their own, embedded by the
      # current matching head (0: off). Off here: the recipe sees 8 image pairs per step for 12
      # epochs, and the memory's benefit at this scale is unmeasured.
      match_memory_steps=0, match_memory_items=0, match_memory_draw=0,
      score_threshold=0.05, detection_nms_threshold=0.5, detections_per_image=100,
      detection_candidates=2000, dtype="bfloat16",
      # A fresh run starts from these (a resumed run reads its checkpoint instead):
      # torchvision ResNet-50 ImageNet weights (.pth, or .safetensors with the same names),
      # required by this recipe (its frozen BN and frozen stages cannot learn from random);
      backbone_weights="",
      # then, optionally, another run's checkpoint directory (its params and constants,
      # where names and shapes match) at init_from_step (-1: the latest).
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
      # Top-level modules whose learning rate is not decayed (e.g. ("matching_head", "scorer"):
      # the matching network keeps learning on the settled features of the last epochs).
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
      host_pool="process",       # or "thread" (the GIL serialises them: evaluation.host)
      # Evaluate even when validation images or items were dropped as unreadable or invalid
      # (their ground truth then missing from every metric); False refuses in one line.
      allow_skipped=False,
  ))
  return config
