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
Validation images, items, polygons or landmarks that fail validation refuse the evaluation
(eval.allow_skipped); training drops only the bad landmark, polygon or item, and leaves out an
image left with no item.

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
been made with this code yet. Runtime, an estimate from the train-step benchmark on one H100
(docs/PERFORMANCE.md), not a measured run: about 5 hours of steps on one H100, under an hour on
8 if the step scales and the input keeps up; each full evaluation adds its own time.

Why: the paper's setup (Detectron's 1x schedule, batch 16, ResNet-50-FPN from ImageNet), with
epochs counted in images as a 1x schedule is.
"""

from df2_jax.config import defaults


def get_config():
  # The defaults are this recipe: each field's value and meaning in df2_jax/config/defaults.py.
  return defaults.get_config()
