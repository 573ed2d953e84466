r"""The main job: a small Match R-CNN trained and evaluated on synthetic DeepFashion2, on a CPU.

  python run.py --config configs/demo_synthetic.py --workdir runs/demo

Generates the synthetic DeepFashion2 (1800 training and 50 validation image pairs at 128 px,
about 10 s, cached under data/synthetic), trains a narrow ResNet-FPN Match R-CNN with every
head (4500 steps of 2 image pairs, AdamW), evaluates the validation split (COCO AP for boxes,
masks and landmarks, retrieval top-k) and draws predictions and retrieval strips into
runs/demo/eval_4500/.

Expected: about 15 minutes on the project's 2-core CPU machine for the README command in a
fresh clone (pip install and data generation included); AP_box 0.517, AP_mask 0.479, landmark
AP 0.365 (visible + occluded), retrieval top-1 0.250 / top-20 0.857 (detected boxes) with the
default seed, and AP_box 0.508-0.534, top-1 0.250-0.339, top-20 0.857-0.875 over seeds 0-2
(--config.seed=N). Deterministic on one machine.

Why: on a CPU a short run is limited by steps and data, so the heads are wide where it pays (box
head, FPN) and narrow where it costs (mask, landmarks), with 1800 generated pairs against
overfitting; the pair loss takes the 1x recipe's batch negatives, balanced terms and distance
start with 4 foreground RoIs per image, and a memory of one epoch's pooled item features trains
the matching head on a random draw of 16 stored steps every step (five epochs alone show the
head too few pairs). docs/EXPERIMENTS.md has every measurement behind it.
"""

from configs import match_rcnn_r50_fpn_1x_df2 as base


def get_config():
  config = base.get_config()
  config.data.format = "synthetic"
  config.data.update(dict(synthetic_train_pairs=1800, synthetic_val_pairs=50,
                          synthetic_image_size=128, short_side=96, max_size=128,
                          canvas=(128, 128), max_instances=4, mask_size=28,
                          # One square canvas, as in every measured demo run.
                          bucket_canvases=()))
  config.model.update(dict(
      stage_sizes=(1, 1, 1, 1), width=16, freeze_at=0, fpn_channels=64,
      rpn_pre_nms_topk_train=500, rpn_post_nms_topk_train=200, rpn_pre_nms_topk_test=500,
      rpn_post_nms_topk_test=200, roi_align_method="matmul", roi_batch_size_per_image=32,
      roi_positive_fraction=0.5, box_fc_dim=512, cls_agnostic_bbox_reg=True, mask_conv_dim=8,
      landmark_conv_dim=32, landmark_num_convs=2, landmark_rois_per_image=2,
      landmark_select_channels=True,
      match_conv_dim=32, match_proj_dim=64, embed_dim=32, match_rois_per_image=4,
      # A memory of one epoch's GT items (900 steps x at most 10 items, pooled features), of
      # which 16 random steps' items train the matching head each step (a bank of the training
      # set, refreshed once per epoch; its effect: docs/EXPERIMENTS.md, issue 16).
      match_memory_steps=900, match_memory_items=10, match_memory_draw=16,
      # L1 box regression and soft mask targets, as measured (docs/EXPERIMENTS.md, issue 26).
      box_loss_beta=0.0, rpn_box_loss_beta=0.0, mask_binary_targets=False,
      detections_per_image=20,
      detection_candidates=500, dtype="float32"))
  # 5 epochs of 900 steps (3600 images in 1800 pairs, 2 per step); x0.1 at epoch 4 (step 3600).
  config.train.update(dict(global_batch_pairs=2, epochs=5, decay_epochs=(4,),
                           optimizer="adamw", base_lr=0.001, weight_decay=1e-4,
                           warmup_steps=50, log_every_steps=100, checkpoint_every_steps=500,
                           eval_every_steps=0))
  config.train.loss_weights.landmark = 0.5
  config.eval.update(dict(batch_size=8, gallery_nms_threshold=0.3, gallery_score_threshold=0.3))
  return config
