r"""Full Match R-CNN train-step throughput (forward + backward + SGD), images per second.

  # The paper's resolution on a GPU, bf16, 4 image pairs = 8 images, plus the torchvision peer:
  python bench/train_step.py --canvas 800x1344 --pairs 4 --dtype bfloat16 --peer --infer 1,8
  # The 1x recipe's orientation buckets (landscape and portrait canvases, one compiled program
  # each), 8 pairs = 16 images per step, steps alternating between them as in a run:
  python bench/train_step.py --canvas 800x1344,1344x800 --pairs 8 --dtype bfloat16
  # A tiny CPU run:
  python bench/train_step.py --model tiny --canvas 96x128,128x96 --pairs 2 --steps 5
  # What a setting costs, e.g. the 1x recipe's 128 landmark RoIs per image against 32:
  python bench/train_step.py --model tiny --canvas 320x320 --pairs 2 --steps 5 \
      --set landmark_rois_per_image=128,roi_batch_size_per_image=512

Batches are random but valid (boxes inside the canvas, 3 items per image, masks and landmarks
of each item's category) and built with numpy only: no TensorFlow, no OpenCV. The step is the
real one (df2_jax.train_step) with donated state. Prints img/s after warm-up, the compile time,
and peak device memory where the backend reports it. ``--peer`` times torchvision's Mask R-CNN
with a 294-landmark keypoint head (bf16 autocast) at the same batch and size in the same process.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

from absl import app, flags
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs import match_rcnn_r50_fpn_1x_df2, tiny  # pylint: disable=wrong-import-position
from data_pipeline import deepfashion2 as df2  # pylint: disable=wrong-import-position
from data_pipeline import transforms  # pylint: disable=wrong-import-position
from data_pipeline.spec import DEEPFASHION2  # pylint: disable=wrong-import-position
from df2_jax import train_step  # pylint: disable=wrong-import-position
from df2_jax.models.match_rcnn import (  # pylint: disable=wrong-import-position
    MatchRCNN, MatchRCNNConfig, init_variables, model_from_config)

FLAGS = flags.FLAGS
flags.DEFINE_list("canvas", ["800x1344"], "Canvases HxW (multiples of 32), comma-separated: "
                  "each is compiled once and timed alone, then (several) all in turn.")
flags.DEFINE_integer("pairs", 4, "Image pairs per step (2 images each).")
flags.DEFINE_enum("dtype", "bfloat16", ["float32", "bfloat16"], "Compute dtype.")
flags.DEFINE_enum("model", "full", ["full", "tiny"], "The 1x recipe's model "
                  "(configs/match_rcnn_r50_fpn_1x_df2.py) or the tiny one (configs/tiny.py).")
flags.DEFINE_integer("items", 3, "Items per image.")
flags.DEFINE_integer("max_instances", 8, "M.")
flags.DEFINE_integer("mask_size", 112, "GT mask crop size.")
flags.DEFINE_integer("warmup", 3, "Untimed steps after compilation.")
flags.DEFINE_integer("steps", 20, "Timed steps.")
flags.DEFINE_boolean("peer", False, "Also time torchvision Mask R-CNN + 294-landmark head.")
flags.DEFINE_boolean("peer_only", False, "Time only the torchvision peer.")
flags.DEFINE_string("profile", None, "Also trace 5 steps of the first canvas with jax.profiler "
                    "into this folder and print the 15 costliest device ops.")
flags.DEFINE_list("set", [], "MatchRCNNConfig fields to override, name=value (Python "
                  "literals), e.g. landmark_rois_per_image=128,box_loss_beta=1.0.")
flags.DEFINE_list("infer", [], "Also time jitted inference (detect: boxes, masks, 294 "
                  "landmarks, embeddings) at these batch sizes, e.g. 1,8.")

def random_batch(rng: np.random.Generator, pairs: int, geometry: transforms.ImageGeometry,
                 items: int) -> dict[str, np.ndarray]:
  """A valid random training batch (the pipeline's contract) in numpy."""
  h, w = geometry.canvas_hw
  s = geometry.mask_size
  lead = (pairs, 2)
  spec = transforms.image_spec(geometry)
  b = {k: np.zeros(lead + shape, dtype) for k, (shape, dtype) in spec.items()}
  b["image"] = rng.integers(0, 255, lead + (h, w, 3), dtype=np.uint8)
  b["image_hw"][:] = (h, w)
  b["scale"][:] = 1.0
  b["orig_hw"][:] = (h, w)
  b["image_id"][:] = np.arange(2 * pairs).reshape(lead)
  wh = rng.uniform(0.15, 0.6, lead + (items, 2)) * (w, h)
  xy = rng.uniform(0, 1, lead + (items, 2)) * ((w, h) - wh)
  b["boxes"][..., :items, :] = np.concatenate([xy, xy + wh], -1)
  cls = rng.integers(1, 14, lead + (items,))
  b["classes"][..., :items] = cls
  b["instance_valid"][..., :items] = True
  b["masks"][..., :items, s // 8:-s // 8, s // 8:-s // 8] = 1
  pts = rng.uniform(0, 1, lead + (items, df2.NUM_LANDMARKS, 2)) * wh[..., None, :] + xy[..., None, :]
  vis = rng.integers(1, 3, lead + (items, df2.NUM_LANDMARKS))
  own = df2.CATEGORY_LANDMARK_MASK[cls]
  b["landmarks"][..., :items, :, :2] = np.where(own[..., None], pts, 0)
  b["landmarks"][..., :items, :, 2] = np.where(own, vis, 0)
  b["pair_id"][..., :items] = np.arange(pairs)[:, None, None] + 1
  b["style"][..., :items] = np.arange(1, items + 1)
  b["match_valid"] = np.ones(pairs, bool)
  return b


def overrides(items: list[str]) -> dict[str, object]:
  """``--set name=value`` entries as MatchRCNNConfig fields (values as Python literals)."""
  import ast
  known = {f.name for f in dataclasses.fields(MatchRCNNConfig)}
  out = {}
  for item in items:
    name, sep, value = item.partition("=")
    if not sep or name not in known:
      raise app.UsageError(f"--set {item!r}: expected name=value with a MatchRCNNConfig field")
    try:
      out[name] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      out[name] = value  # a bare string, e.g. roi_align_method=matmul
  return out


def peak_memory_gib() -> float | None:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return None if peak is None else peak / 2**30


def bench_jax(canvases) -> None:
  recipe = (tiny if FLAGS.model == "tiny" else match_rcnn_r50_fpn_1x_df2).get_config()
  recipe.model.update(overrides(FLAGS.set))
  recipe.model.dtype = FLAGS.dtype
  # The largest canvas: the model's anchors cover it, every smaller one is a program of its own.
  recipe.data.canvas = (max(c[0] for c in canvases), max(c[1] for c in canvases))
  model = model_from_config(recipe)
  config = model.config
  rng = np.random.default_rng(0)
  batches = {c: [jax.device_put(random_batch(rng, FLAGS.pairs, _geometry(c), FLAGS.items))
                 for _ in range(2)] for c in canvases}
  variables = init_variables(model, jax.random.key(0), batches[canvases[0]][0])
  for n in FLAGS.infer:
    for canvas in canvases:
      bench_inference(model, variables, canvas, int(n))
  # The first learning rate of the 1x recipe's linear warm-up (0.02 x 0.001): from random
  # init, the full 0.02 diverges within steps on random data, and a timing needs finite losses.
  tx = train_step.make_optimizer(0.02 * 0.001, variables["params"], freeze_at=config.freeze_at)
  state = train_step.create_train_state(variables, tx)
  step = train_step.make_train_step(model, tx, {})
  key = jax.random.key(1)
  images = FLAGS.steps * FLAGS.pairs * 2
  order = [c for c in canvases] if len(canvases) > 1 else []
  for canvas in canvases + ([None] if order else []):
    # One canvas alone, then (several) every canvas in turn, as a run's steps alternate.
    pick = (lambda i: batches[canvas][i % 2]) if canvas else (
        lambda i: batches[order[i % len(order)]][i // len(order) % 2])
    compile_s = None
    if canvas:
      start = time.perf_counter()
      state, metrics = step(state, pick(0), key)
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - start
    for i in range(FLAGS.warmup):
      state, metrics = step(state, pick(i), key)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for i in range(FLAGS.steps):
      state, metrics = step(state, pick(i), key)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    peak = peak_memory_gib()
    name = f"{canvas[0]}x{canvas[1]}" if canvas else "all canvases in turn (" + ", ".join(
        f"{c[0]}x{c[1]}" for c in order) + ")"
    settings = "".join(f", {item}" for item in FLAGS.set)
    print(f"df2-jax Match R-CNN ({FLAGS.model}, {FLAGS.dtype}{settings}) {name}, "
          f"{2 * FLAGS.pairs} images/step: {images / elapsed:.1f} img/s "
          f"({1000 * elapsed / FLAGS.steps:.1f} ms/step"
          + (f", compile+first step {compile_s:.1f} s" if compile_s is not None else "")
          + (f", peak {peak:.1f} GiB" if peak is not None else "") + f"); loss "
          f"{float(metrics['loss']):.3f}; {jax.devices()[0].device_kind}, jax {jax.__version__}",
          flush=True)
  print(f"train step programs compiled: {step._cache_size()} for {len(canvases)} canvases")
  if FLAGS.profile:
    jax.profiler.start_trace(FLAGS.profile)
    for i in range(5):
      state, metrics = step(state, batches[canvases[0]][i % 2], key)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    print_top_ops(FLAGS.profile, 5)


def print_top_ops(trace_dir: str, steps: int, top: int = 15) -> None:
  """The device ops (GPU kernels; XLA ops on a CPU) with the most time in a trace."""
  import collections
  import glob
  import os
  path = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True),
             key=os.path.getmtime)
  data = jax.profiler.ProfileData.from_file(path)
  planes = [p for p in data.planes if p.name.startswith("/device:")] or [
      p for p in data.planes if p.name.startswith("/host:")]
  totals, lines = collections.Counter(), set()
  for plane in planes:
    for line in plane.lines:
      lines.add(f"{plane.name}:{line.name}")
      # GPU: kernels on the stream lines; CPU: XLA's thunks on its worker threads.
      if "Stream" in line.name or line.name == "XLA Ops" or line.name.startswith("tf_XLA"):
        for event in line.events:
          if not event.name.startswith("ThunkExecutor"):
            totals[event.name] += event.duration_ns
  print(f"profile {path}; lines: {sorted(lines)[:12]}")
  all_ns = sum(totals.values())
  for name, ns in totals.most_common(top):
    print(f"  {ns / steps / 1e6:8.2f} ms/step {100 * ns / max(all_ns, 1):5.1f}%  {name[:120]}")


def _geometry(canvas) -> transforms.ImageGeometry:
  return transforms.ImageGeometry(canvas, min(canvas), max(canvas), FLAGS.max_instances,
                                  FLAGS.mask_size, spec=DEEPFASHION2)


def bench_inference(model, variables, canvas, n: int) -> None:
  """Images/s of the jitted detect() at batch n, untrained weights, random images."""
  detect = jax.jit(lambda v, im, hw: model.apply(v, im, hw, method=MatchRCNN.detect))
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 255, (n,) + canvas + (3,), dtype=np.uint8))
  hw = jax.device_put(np.tile(np.array(canvas, np.int32), (n, 1)))
  start = time.perf_counter()
  jax.block_until_ready(detect(variables, images, hw))
  compile_s = time.perf_counter() - start
  for _ in range(FLAGS.warmup):
    out = detect(variables, images, hw)
  jax.block_until_ready(out)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    out = detect(variables, images, hw)
  jax.block_until_ready(out)
  elapsed = time.perf_counter() - start
  print(f"df2-jax inference ({FLAGS.model}, {FLAGS.dtype}) {canvas[0]}x{canvas[1]}, batch {n}: "
        f"{FLAGS.steps * n / elapsed:.1f} img/s ({1000 * elapsed / FLAGS.steps:.1f} ms/batch, "
        f"compile+first {compile_s:.1f} s, {int(np.asarray(out['valid']).sum())} detections "
        f"in the last batch)")


def bench_peer(canvas) -> None:
  import torch
  import torchvision
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.models.detection.keypoint_rcnn import KeypointRCNNHeads, KeypointRCNNPredictor
  from torchvision.ops import MultiScaleRoIAlign
  device = torch.device("cuda")
  backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=3)
  model = MaskRCNN(backbone, num_classes=14, min_size=min(canvas), max_size=max(canvas))
  model.roi_heads.keypoint_roi_pool = MultiScaleRoIAlign(["0", "1", "2", "3"], 14, 2)
  model.roi_heads.keypoint_head = KeypointRCNNHeads(256, tuple([512] * 8))
  model.roi_heads.keypoint_predictor = KeypointRCNNPredictor(512, df2.NUM_LANDMARKS)
  model.to(device).train()
  opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=1e-4)
  n = 2 * FLAGS.pairs
  rng = np.random.default_rng(0)
  geometry = transforms.ImageGeometry(canvas, canvas[0], canvas[1], FLAGS.items, 28,
                                      spec=DEEPFASHION2)
  b = random_batch(rng, FLAGS.pairs, geometry, FLAGS.items)
  images = [torch.rand(3, canvas[0], canvas[1], device=device) for _ in range(n)]
  targets = []
  for i in range(n):
    p, j = divmod(i, 2)
    boxes = torch.tensor(b["boxes"][p, j, :FLAGS.items], device=device)
    masks = torch.zeros(FLAGS.items, canvas[0], canvas[1], dtype=torch.uint8, device=device)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
      masks[k, y1:y2, x1:x2] = 1
    kp = torch.tensor(b["landmarks"][p, j, :FLAGS.items], device=device)
    targets.append(dict(boxes=boxes, labels=torch.tensor(b["classes"][p, j, :FLAGS.items],
                                                          device=device, dtype=torch.int64),
                        masks=masks, keypoints=kp))

  # Inference first, on the untrained weights (as for df2-jax): after a few SGD steps on random
  # data the scores collapse and no detection reaches the mask and landmark heads.
  model.eval()
  for bs in (int(v) for v in FLAGS.infer):
    batch = images[:bs] if bs <= n else [images[0]] * bs

    def infer():
      with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return model(batch)

    for _ in range(FLAGS.warmup + 1):
      out = infer()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(FLAGS.steps):
      out = infer()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    print(f"torchvision inference (same model, bf16 autocast), batch {bs}: "
          f"{FLAGS.steps * bs / elapsed:.1f} img/s ({len(out[-1]['boxes'])} detections in the "
          f"last image)")
  model.train()

  def one_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
      losses = model(images, targets)
    loss = sum(losses.values())
    opt.zero_grad()
    loss.backward()
    opt.step()

  for _ in range(FLAGS.warmup + 1):
    one_step()
  torch.cuda.synchronize()
  torch.cuda.reset_peak_memory_stats()
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    one_step()
  torch.cuda.synchronize()
  elapsed = time.perf_counter() - start
  print(f"torchvision {torchvision.__version__} Mask R-CNN + keypoint head (294, 8 conv 512), "
        f"bf16 autocast, batch {n} at {canvas[0]}x{canvas[1]}: "
        f"{FLAGS.steps * n / elapsed:.1f} img/s, peak "
        f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")



def main(argv):
  del argv
  canvases = [tuple(int(v) for v in c.split("x")) for c in FLAGS.canvas]
  if not FLAGS.peer_only:
    bench_jax(canvases)
  if FLAGS.peer or FLAGS.peer_only:
    for canvas in canvases:
      bench_peer(canvas)


if __name__ == "__main__":
  app.run(main)
