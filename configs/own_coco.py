r"""Match R-CNN, ResNet-50-FPN, the 1x recipe on one's own COCO-format fashion set.

  python run.py --config configs/own_coco.py --workdir runs/mine \
      --config.data.coco_json_train=/data/mine/train.json \
      --config.data.coco_images_train=/data/mine/images \
      --config.data.coco_json_eval=/data/mine/val.json \
      --config.data.coco_images_eval=/data/mine/images \
      --config.model.backbone_weights=/path/to/resnet50-0676ba61.pth
  # optional: --config.data.spec_file=/data/mine/spec.json (flip pairs, OKS sigmas)
  # optional: --config.model.init_from=runs/r50_1x (fine-tune a DeepFashion2 run)

The taxonomy is the set's own (data_pipeline/spec.py): its ``categories`` (any ids; each its
own ``keypoints`` list, or none) become the heads' classes and landmark channels, the optional
spec file adds flip pairs (by landmark name or 1-based index) and OKS sigmas (default 0.04
each), and the run's config.json keeps the whole spec, so evaluation, prediction, the Python
API, export and retrieval all read it. Annotations: ``bbox``, ``segmentation`` (polygons or RLE;
optional in a set without masks), ``keypoints`` (3 x the category's count; optional),
``iscrowd`` (crowds are left out of training and ignored by the evaluation), ``style`` and
``pair_id`` only where the set has user/shop pairs (``source`` "user"/"shop" per image).

The log says at start what was read, e.g. "dataset 'coarse3': 3 categories, 8 landmarks, no
pairs (from train.json and spec.json)" and, for a set without pairs, that the matching loss and
the retrieval metrics are off. metrics.json then holds bbox, segm, keypoints and
keypoints_visible (COCO AP with the spec's sigmas), without retrieval keys; the result files
(``python -m df2_jax.evaluation.results --eval_dir``) carry the set's own category ids.
``init_from`` a run of another taxonomy loads every layer whose shape fits and logs the
re-initialised class- and landmark-sized ones (box scores and deltas, mask predictor, landmark
logits).

Expected runtime: as the 1x recipe per image (docs/PERFORMANCE.md: one H100 trains the
DeepFashion2 1x schedule's 2.3M image visits in about 5 hours, an estimate): 12 epochs of the
set's training images, 16 images per step. Results depend on the set; none of a real own set
was measured here (tests/system/test_own_taxonomy.py overfits 16 relabelled real images).

Why: the DeepFashion2 recipe, unchanged but for where the data and its taxonomy come from, so
that a user's numbers compare with the paper's setup.
"""

from df2_jax.config import defaults


def get_config():
  config = defaults.get_config()
  config.data.format = "coco"
  return config
