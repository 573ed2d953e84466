r"""A tiny Match R-CNN on a tiny synthetic DeepFashion2: the end-to-end test's config.

  python run.py --config configs/tiny.py --workdir /tmp/tiny

20 steps of 2 image pairs at 128x128 with a 1-1-1-1 ResNet of width 8, then evaluation on 8
validation images; about a minute on 2 CPU cores. It exercises every part of the system; its
metrics mean nothing.
"""

from configs import match_rcnn_r50_fpn_1x_df2 as base


def get_config():
  config = base.get_config()
  config.data.format = "synthetic"
  config.data.synthetic_dir = "data/synthetic"
  config.data.synthetic_train_pairs = 6
  config.data.synthetic_val_pairs = 4
  config.data.synthetic_image_size = 128
  config.data.update(dict(short_side=96, max_size=128, canvas=(128, 128), max_instances=4,
                          mask_size=28, num_workers=1, bucket_canvases=()))
  config.model.update(dict(
      stage_sizes=(1, 1, 1, 1), width=8, freeze_at=0, fpn_channels=32,
      rpn_pre_nms_topk_train=300, rpn_post_nms_topk_train=100, rpn_pre_nms_topk_test=300,
      rpn_post_nms_topk_test=100, roi_align_method="matmul", roi_batch_size_per_image=64,
      box_fc_dim=64, mask_conv_dim=16, landmark_conv_dim=32, landmark_num_convs=2,
      landmark_rois_per_image=8, landmark_select_channels=True,
      match_conv_dim=16, match_proj_dim=32, embed_dim=16, match_rois_per_image=2,
      # Within image pairs: the tests compare runs across device and process layouts exactly,
      # and the batch-wide pair loss's sums cross devices in layout-dependent order (what that
      # does: docs/EXPERIMENTS.md); "batch" is tested on its own.
      match_negatives="pair",
      # The GT items of the last 2 steps join the pair loss: resume, process-layout and
      # device-count tests then cover the memory in the train state.
      match_memory_steps=2,
      # Every image keeps its 10 best detections (no score threshold), so that every image,
      # query or gallery, has detections after a few steps (why: docs/EXPERIMENTS.md).
      score_threshold=0.0, detections_per_image=10,
      detection_candidates=200, dtype="float32"))
  config.train.update(dict(global_batch_pairs=2, num_steps=20, base_lr=0.01, warmup_steps=5,
                           log_every_steps=5, checkpoint_every_steps=10, keep_checkpoints=2,
                           eval_every_steps=0))
  config.eval.batch_size = 4
  return config
