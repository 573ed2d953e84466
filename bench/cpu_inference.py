r"""One photo on a CPU: df2-jax's Predictor against torchvision's Mask R-CNN with a 294-landmark
keypoint head, in one process, alternating.

  python bench/cpu_inference.py                               # 512x512 and 800x1344, 100 and 5
  python bench/cpu_inference.py --canvas 512x512 --detections 100 --dtype float32 --profile

Both models have random weights and the 1x recipe's settings (configs/match_rcnn_r50_fpn_1x_df2.py:
ResNet-50-FPN, 1000 RPN proposals, a box head on every proposal, class-aware NMS, 28x28 masks,
a keypoint head of 8 convs of 512 and a 4x4 transposed conv to 294 channels), score threshold 0
so that every kept detection reaches the heads, and ``detections_per_image`` (torchvision's
``box_detections_per_img``) D = each of ``--detections``: 100 (the recipe's) and 5 (what a
trained model keeps on a photo of a few garments). One image of batch 1: 512x512 on a 512x512
canvas, or 800x1333 (the recipe's shorter side 800, longer side <= 1333) on the recipe's
800x1344 canvas; torchvision resizes it to the same size (min_size, max_size).

Timed end to end, as a user calls them: ``Predictor(image)`` (resize, the two detection stages,
masks pasted into the image, landmarks and embeddings per detection) against
``model([image])`` under ``torch.no_grad()`` (its transform, the same stages, masks pasted,
keypoints decoded). Each repeat times df2-jax then torchvision; the medians and their ratio
(torchvision's seconds / df2-jax's: above 1 means df2-jax is faster) are printed.
torchvision's OpenMP threads are made passive (``OMP_WAIT_POLICY=PASSIVE``, set before torch is
imported) so that they do not spin on the cores while jax runs. ``--profile`` also times the
pieces of df2-jax's detection (jitted one by one). No TensorFlow is imported.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from absl import app, flags  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import match_rcnn_r50_fpn_1x_df2  # pylint: disable=wrong-import-position
from data_pipeline import transforms  # pylint: disable=wrong-import-position
from df2_jax import inference  # pylint: disable=wrong-import-position
from df2_jax.models.match_rcnn import (  # pylint: disable=wrong-import-position
    MatchRCNN, init_variables, model_from_config)

FLAGS = flags.FLAGS
flags.DEFINE_list("canvas", ["512x512", "800x1344"], "Canvases HxW: 512x512 holds a 512x512 "
                  "image, 800x1344 an 800x1333 one.")
flags.DEFINE_list("detections", ["100", "5"], "detections_per_image values (D).")
flags.DEFINE_list("dtype", ["float32", "bfloat16"], "df2-jax compute dtypes.")
flags.DEFINE_integer("repeats", 3, "Timed repeats per side (after one warm-up call each).")
flags.DEFINE_boolean("peer", True, "Time torchvision as well.")
flags.DEFINE_boolean("profile", False, "Also time the pieces of df2-jax's detection.")

CONTENT = {(512, 512): (512, 512), (800, 1344): (800, 1333)}


def df2_config(canvas, content, dtype: str, detections: int):
  config = match_rcnn_r50_fpn_1x_df2.get_config()
  config.model.dtype = dtype
  config.model.score_threshold = 0.0
  config.model.detections_per_image = detections
  config.data.canvas = tuple(canvas)
  config.data.bucket_canvases = ()
  config.data.short_side = min(content)
  config.data.max_size = max(content)
  config.eval.batch_size = 1
  return config


def random_variables():
  """Params of the recipe's model (their shapes do not depend on the canvas or dtype)."""
  config = df2_config((64, 64), (64, 64), "float32", 100)
  model = model_from_config(config)
  geometry = transforms.geometry_from_config(config.data)
  return init_variables(model, jax.random.key(0), transforms.zero_train_batch(geometry, 1))


def df2_predictor(variables, canvas, content, dtype, detections):
  config = df2_config(canvas, content, dtype, detections)
  run = inference.Run(config=config, model=model_from_config(config),
                      variables={k: variables[k] for k in ("params", "constants")}, step=0,
                      checkpoint_dir="")
  return inference.Predictor(run, devices=jax.local_devices()[:1])


def torchvision_model(content, detections):
  import torch  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection import MaskRCNN  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone  # pylint: disable=g-import-not-at-top
  from torchvision.models.detection.keypoint_rcnn import (  # pylint: disable=g-import-not-at-top
      KeypointRCNNHeads, KeypointRCNNPredictor)
  from torchvision.ops import MultiScaleRoIAlign  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
  model = MaskRCNN(backbone, num_classes=14, min_size=min(content), max_size=max(content),
                   box_score_thresh=0.0, box_detections_per_img=detections)
  model.roi_heads.keypoint_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
  model.roi_heads.keypoint_head = KeypointRCNNHeads(256, tuple([512] * 8))
  model.roi_heads.keypoint_predictor = KeypointRCNNPredictor(512, 294)
  return model.eval()


def timed(fn):
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def profile(predictor, image):
  """Seconds of each piece of detection, jitted alone (the Detector's canvas and batch)."""
  model, variables = predictor.model, predictor.detector.variables
  batch = predictor.detector.encode([image], predictor.detector.canvas_for([image.shape]))
  x, hw = batch["image"], batch["image_hw"]
  apply = lambda fn: jax.jit(lambda v, *a: model.apply(v, *a, method=fn))

  def best(name, fn, *args):
    jax.block_until_ready(fn(*args))
    times = [timed(lambda: jax.block_until_ready(fn(*args)))[0] for _ in range(3)]
    print(f"    {name:34s} {1000 * min(times):8.1f} ms", flush=True)

  first = apply(MatchRCNN.detect_boxes)(variables, x, hw)
  feats, boxes, classes = first.pop("features"), first["boxes"], first["classes"]
  valid = int(np.asarray(first["valid"]).sum())
  canvas = x.shape[1:3]
  best("detect_boxes (stage 1)", apply(MatchRCNN.detect_boxes), variables, x, hw)
  best("  backbone + FPN", apply(lambda m, a, b: m._features(a, b)), variables, x, hw)
  pyramid = apply(lambda m, a, b: m._features(a, b))(variables, x, hw)  # P2..P6
  best("  RPN head + proposals",
       apply(lambda m, f, b: m._proposals(f, b, False, canvas)[2:]), variables, pyramid, hw)
  props = apply(lambda m, f, b: m._proposals(f, b, False, canvas)[2])(variables, pyramid, hw)
  best("  box head (RoIAlign 7x7 + FCs)",
       apply(lambda m, f, p: m.box_head(m._pool(f, p, 7, inference=True))), variables, feats,
       props)
  k = inference.head_slots_for(valid, predictor.detector.detections_per_image)
  boxes, classes = boxes[:, :k], classes[:, :k]
  print(f"    ({valid} valid detections: the heads on {k})")
  best("detect_heads (stage 2)", apply(MatchRCNN.detect_heads), variables, feats, boxes,
       classes)
  pooled = apply(lambda m, f, b: m._pool(f, b, 14, inference=True))(variables, feats, boxes)
  best("  RoIAlign 14x14", apply(lambda m, f, b: m._pool(f, b, 14, inference=True)),
       variables, feats, boxes)
  best("  mask head", apply(lambda m, p: m.mask_head(p)), variables, pooled)
  best("  landmark head (convs + deconv)", apply(lambda m, p: m.landmark_head(p)), variables,
       pooled)
  best("  landmarks (pool, head, decode)",
       apply(lambda m, f, b, c: m._landmarks(f, b, c, canvas)), variables, feats, boxes,
       classes)
  best("  matching head (pool 7x7 + head)", apply(lambda m, f, b: m._embed(f, b)), variables,
       feats, boxes)


def main(argv):
  del argv
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} CPUs")
  if FLAGS.peer:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
  variables = random_variables()
  rng = np.random.default_rng(0)
  for canvas_name in FLAGS.canvas:
    canvas = tuple(int(v) for v in canvas_name.split("x"))
    content = CONTENT.get(canvas, canvas)
    image = rng.integers(0, 256, content + (3,), np.uint8)
    for detections in (int(v) for v in FLAGS.detections):
      peer = None
      if FLAGS.peer:
        import torch  # pylint: disable=g-import-not-at-top
        tv = torchvision_model(content, detections)
        tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255.0

        def run_peer(model=tv, x=tensor):
          with torch.no_grad():
            return model([x])[0]
        peer = run_peer
      for dtype in FLAGS.dtype:
        predictor = df2_predictor(variables, canvas, content, dtype, detections)
        first, out = timed(lambda: predictor(image))
        if peer is not None:
          peer_first, _ = timed(peer)
        ours, theirs = [], []
        for _ in range(FLAGS.repeats):
          t, out = timed(lambda: predictor(image))
          ours.append(t)
          if peer is not None:
            t, peer_out = timed(peer)
            theirs.append(t)
        line = (f"{content[0]}x{content[1]} on {canvas[0]}x{canvas[1]}, D={detections}, "
                f"df2-jax {dtype}: {statistics.median(ours):.2f} s "
                f"(runs {', '.join(f'{t:.2f}' for t in ours)}; first call {first:.1f} s; "
                f"{len(out['boxes'])} detections)")
        if peer is not None:
          ratio = statistics.median(theirs) / statistics.median(ours)
          line += (f"; torchvision float32: {statistics.median(theirs):.2f} s (runs "
                   f"{', '.join(f'{t:.2f}' for t in theirs)}; first {peer_first:.1f} s; "
                   f"{len(peer_out['boxes'])} detections); ratio {ratio:.2f}x")
        print(line, flush=True)
        if FLAGS.profile:
          profile(predictor, image)


if __name__ == "__main__":
  app.run(main)
