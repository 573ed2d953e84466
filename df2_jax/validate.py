"""Every rule a config must satisfy, checked before any data is read or anything is compiled.

``validate(config)`` checks types and ranges of every field the code reads (the canvas a pair
of multiples of 32, positive sizes and intervals, known enum values, thresholds in [0, 1], the
model fields the architecture knows, the best metric an evaluation metric), and raises one
``ConfigError`` that lists every problem, one line each. ``check_workdir`` checks that a
workdir can be created and written. ``run.py`` runs both before anything else and prints the
lines without a traceback; ``train.train`` and the evaluation run ``validate`` too, so the
library fails the same way.

The rules live here and only here; a new config field that the code reads gets its rule here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import numbers
import os
import tempfile
from typing import Any, Callable, Sequence

from data_pipeline.annotations import CHECK_IMAGE_MODES
from df2_jax.evaluation import evaluator
from df2_jax.evaluation.evaluator import HOST_POOLS
from df2_jax.models import match_rcnn
from df2_jax.models.resnet import NORMS

FORMATS = ("raw", "coco", "tfds", "synthetic")
OPTIMIZERS = ("sgd", "adamw")
DTYPES = ("float32", "bfloat16")
ROI_ALIGN_METHODS = ("gather", "matmul")
MATCH_NEGATIVES = ("pair", "batch")
PAIR_SAMPLINGS = ("matching", "all_pairs")  # data_pipeline.pairs.PAIR_SAMPLINGS
# MatchRCNN's top-level parameter modules (train.undecayed_modules names some of them).
PARAM_MODULES = ("backbone", "fpn", "rpn", "box_head", "mask_head", "landmark_head",
                 "matching_head", "scorer")
CANVAS_MULTIPLE = 32  # the FPN's coarsest C level (stride 32) must tile the canvas exactly


class ConfigError(ValueError):
  """A config that cannot work; ``str`` is one line per problem."""


def _is_int(v) -> bool:
  return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any], str | None]:
  def check(v):
    if not _is_int(v):
      return f"must be an integer, got {v!r}"
    if lo is not None and v < lo or hi is not None and v > hi:
      bounds = (f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in [{lo}, {hi}]")
      return f"must be {bounds}, got {v}"
    return None
  return check


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False) -> Callable[[Any], str | None]:
  def check(v):
    if not _is_number(v):
      return f"must be a number, got {v!r}"
    if not math.isfinite(v):
      return f"must be a finite number, got {v!r}"
    if (lo is not None and (v <= lo if lo_open else v < lo)) or (
        hi is not None and (v >= hi if hi_open else v > hi)):
      left = "(" if lo_open else "["
      right = ")" if hi_open else "]"
      return (f"must be in {left}{'-inf' if lo is None else lo}, "
              f"{'inf' if hi is None else hi}{right}, got {v}")
    return None
  return check


def choice(options: Sequence[str]) -> Callable[[Any], str | None]:
  def check(v):
    if v not in options:
      return f"must be one of {', '.join(map(repr, options))}, got {v!r}"
    return None
  return check


def sequence(length: int | None, item: Callable[[Any], str | None]
             ) -> Callable[[Any], str | None]:
  def check(v):
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
      return f"must be a sequence{f' of {length}' if length else ''}, got {v!r}"
    if length is not None and len(v) != length:
      return f"must have {length} entries, got {len(v)}: {tuple(v)!r}"
    for x in v:
      problem = item(x)
      if problem:
        return f"entry {x!r} {problem.split(', got')[0]}"
    return None
  return check


def boolean(v) -> str | None:
  return None if isinstance(v, bool) else f"must be True or False, got {v!r}"


def canvas(v) -> str | None:
  problem = sequence(2, integer(CANVAS_MULTIPLE))(v)
  if problem is None and any(int(x) % CANVAS_MULTIPLE for x in v):
    problem = f"entry not a multiple of {CANVAS_MULTIPLE}"
  if problem:
    return (f"must be (height, width), each a positive multiple of {CANVAS_MULTIPLE}, e.g. "
            f"(1344, 1344); got {v!r}")
  return None


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
FRACTION = number(0.0, 1.0)
IOU = number(0.0, 1.0, lo_open=True)

RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": NON_NEGATIVE,
    "data.format": choice(FORMATS),
    "data.short_side": POSITIVE,
    "data.max_size": POSITIVE,
    "data.canvas": canvas,
    "data.bucket_canvases": sequence(None, canvas),
    "data.max_instances": POSITIVE,
    "data.mask_size": POSITIVE,
    "data.flip_prob": FRACTION,
    "data.category_batches": boolean,
    "data.pair_sampling": choice(PAIR_SAMPLINGS),
    "data.check_images": choice(CHECK_IMAGE_MODES),
    "data.num_workers": NON_NEGATIVE,
    "data.input_workers": NON_NEGATIVE,
    "data.synthetic_train_pairs": POSITIVE,
    "data.synthetic_val_pairs": POSITIVE,
    "data.synthetic_image_size": integer(32),
    "data.synthetic_seed": NON_NEGATIVE,
    "model.stage_sizes": sequence(4, POSITIVE),
    "model.width": POSITIVE,
    "model.freeze_at": integer(0, 5),
    "model.norm": choice(NORMS),
    "model.fpn_channels": POSITIVE,
    "model.anchor_sizes": sequence(5, number(0.0, lo_open=True)),
    "model.rpn_pre_nms_topk_train": POSITIVE,
    "model.rpn_post_nms_topk_train": POSITIVE,
    "model.rpn_pre_nms_topk_test": POSITIVE,
    "model.rpn_post_nms_topk_test": POSITIVE,
    "model.rpn_nms_threshold": IOU,
    "model.rpn_batch_size_per_image": POSITIVE,
    "model.rpn_positive_fraction": number(0.0, 1.0, lo_open=True),
    "model.roi_align_method": choice(ROI_ALIGN_METHODS),
    "model.roi_batch_size_per_image": POSITIVE,
    "model.roi_positive_fraction": number(0.0, 1.0, lo_open=True),
    "model.box_fc_dim": POSITIVE,
    "model.cls_agnostic_bbox_reg": boolean,
    "model.mask_conv_dim": POSITIVE,
    "model.landmark_conv_dim": POSITIVE,
    "model.landmark_num_convs": POSITIVE,
    "model.landmark_rois_per_image": POSITIVE,
    "model.landmark_visible_only": boolean,
    "model.box_loss_beta": number(0.0),
    "model.rpn_box_loss_beta": number(0.0),
    "model.mask_binary_targets": boolean,
    "model.landmark_select_channels": boolean,
    "model.match_conv_dim": POSITIVE,
    "model.match_proj_dim": POSITIVE,
    "model.embed_dim": POSITIVE,
    "model.match_negatives": choice(MATCH_NEGATIVES),
    "model.match_rois_per_image": NON_NEGATIVE,
    "model.match_balanced": boolean,
    "model.match_scorer_init": choice(("normal", "distance")),
    "model.match_memory_steps": NON_NEGATIVE,
    "model.match_memory_items": NON_NEGATIVE,
    "model.match_memory_draw": NON_NEGATIVE,
    "model.score_threshold": FRACTION,
    "model.detection_nms_threshold": IOU,
    "model.detections_per_image": POSITIVE,
    "model.detection_candidates": POSITIVE,
    "model.dtype": choice(DTYPES),
    "model.init_from_step": integer(-1),
    "train.global_batch_pairs": POSITIVE,
    "train.epochs": POSITIVE,
    "train.decay_epochs": sequence(None, NON_NEGATIVE),
    "train.optimizer": choice(OPTIMIZERS),
    "train.base_lr": number(0.0, lo_open=True),
    "train.warmup_steps": NON_NEGATIVE,
    "train.warmup_factor": number(0.0, 1.0, lo_open=True),
    "train.momentum": number(0.0, 1.0, hi_open=True),
    "train.weight_decay": number(0.0),
    "train.num_steps": integer(-1),
    "train.undecayed_modules": sequence(None, choice(PARAM_MODULES)),
    "train.log_every_steps": POSITIVE,
    "train.checkpoint_every_steps": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.eval_every_steps": NON_NEGATIVE,
    "eval.batch_size": POSITIVE,
    "eval.max_images": NON_NEGATIVE,
    "eval.retrieval_topk": POSITIVE,
    "eval.gallery_nms_threshold": IOU,
    "eval.gallery_score_threshold": FRACTION,
    "eval.num_drawn_images": NON_NEGATIVE,
    "eval.draw_score_threshold": FRACTION,
    "eval.num_retrieval_strips": NON_NEGATIVE,
    "eval.host_workers": NON_NEGATIVE,
    "eval.host_pool": choice(HOST_POOLS),
    "eval.allow_skipped": boolean,
}


def _get(config, dotted: str) -> tuple[bool, Any]:
  node = config
  for part in dotted.split("."):
    if part not in node:
      return False, None
    node = node[part]
  return True, node


def problems(config) -> list[str]:
  """Every rule ``config`` breaks, one line each (empty when it is fine)."""
  found, failed = [], set()
  for path, rule in RULES.items():
    present, value = _get(config, path)
    if not present:
      continue  # a config without the field uses the code's default
    problem = rule(value)
    if problem:
      found.append(f"config.{path} {problem}")
      failed.add(path)
  ok = lambda *paths: not failed.intersection(paths)  # cross-field rules need sane fields
  data, model, tc = config.get("data"), config.get("model"), config.get("train")
  if data is not None and ok("data.short_side", "data.max_size") and _is_int(
      data.get("short_side")) and _is_int(data.get("max_size")):
    if data.short_side > data.max_size:
      found.append(f"config.data.short_side ({data.short_side}) must be <= config.data.max_size "
                   f"({data.max_size})")
  if data is not None and ok("data.canvas", "data.bucket_canvases") and data.get(
      "bucket_canvases"):
    ch, cw = (int(v) for v in data.canvas)
    for c in data.bucket_canvases:
      if int(c[0]) > ch or int(c[1]) > cw:
        found.append(f"config.data.bucket_canvases entry {tuple(c)} must fit within "
                     f"config.data.canvas {tuple(data.canvas)} (the canvas that holds any image)")
  if data is not None:
    fmt = data.get("format")
    needs = {"raw": ["root"], "coco": ["coco_json_train", "coco_images_train",
                                        "coco_json_eval", "coco_images_eval"],
             "tfds": ["tfds_data_dir"], "synthetic": ["synthetic_dir"]}.get(fmt, [])
    for field in needs:
      if not str(data.get(field, "")):
        found.append(f"config.data.{field} must be set for config.data.format={fmt!r}")
  if model is not None:
    known = {f.name for f in dataclasses.fields(match_rcnn.MatchRCNNConfig)}
    known |= set(match_rcnn.INIT_FIELDS)
    for field in sorted(set(model.keys()) - known):
      found.append(f"config.model.{field} is not a model field{_suggest(field, known)}")
    if ok("model.detection_candidates", "model.detections_per_image") and _is_int(
        model.get("detection_candidates")) and _is_int(
        model.get("detections_per_image")) and (
            model.detection_candidates < model.detections_per_image):
      found.append(f"config.model.detection_candidates ({model.detection_candidates}) must be "
                   f">= config.model.detections_per_image ({model.detections_per_image})")
  if tc is not None:
    decay = tc.get("decay_epochs")
    if decay is not None and ok("train.decay_epochs") and (
        list(decay) != sorted(decay)):
      found.append(f"config.train.decay_epochs must be in increasing order, got {tuple(decay)}")
    if "best_metric" in tc and str(tc.best_metric) not in evaluator.metric_names():
      found.append(f"config.train.best_metric={tc.best_metric!r} is not an evaluation metric"
                   f"{_suggest(str(tc.best_metric), evaluator.metric_names())}")
    weights = tc.get("loss_weights")
    if weights is not None:
      for term in sorted(set(weights.keys()) - set(match_rcnn.LOSS_TERMS)):
        found.append(f"config.train.loss_weights.{term} is not a loss term"
                     f"{_suggest(term, match_rcnn.LOSS_TERMS)}")
      for term, w in weights.items():
        if term in match_rcnn.LOSS_TERMS and (not _is_number(w) or not math.isfinite(w)
                                              or w < 0):
          found.append(f"config.train.loss_weights.{term} must be a finite number >= 0, "
                       f"got {w!r}")
  reported = {line.split()[0] for line in found}
  for path, value in _leaves(config):  # NaN/inf anywhere else (fields without a rule)
    field = "config." + path.split("[")[0]  # a sequence's entry: its field's rule
    if (_is_number(value) and not math.isfinite(value)
        and not any(r == field or r.startswith(field + ".") for r in reported)):
      found.append(f"config.{path} must be a finite number, got {value!r}")
  return found


def _leaves(node, prefix: str = ""):
  """``(dotted path, value)`` of every leaf of a config (lists and tuples entered)."""
  if hasattr(node, "items") and callable(node.items):
    for key, value in node.items():
      yield from _leaves(value, f"{prefix}{key}" if not prefix else f"{prefix}.{key}")
  elif isinstance(node, (list, tuple)):
    for i, value in enumerate(node):
      yield from _leaves(value, f"{prefix}[{i}]")
  else:
    yield prefix, node


def _suggest(word: str, options) -> str:
  close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
  return f" (did you mean {close[0]!r}?)" if close else ""


def validate(config) -> None:
  """Raises ``ConfigError`` listing every broken rule (see ``problems``)."""
  found = problems(config)
  if found:
    raise ConfigError("\n".join(found))


def check_workdir(workdir: str, *, create: bool) -> None:
  """Raises ``ConfigError`` unless ``workdir`` can be written: with ``create`` it is created
  (as training does) and a file is written and removed in it; without, nothing is created and
  the folder (or its nearest existing parent) must be writable."""
  if "://" in workdir:
    return  # a remote path (gs://...): checked by the first write
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"--workdir {workdir} is a file, not a folder")
  if create:
    try:
      os.makedirs(path, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
        pass
    except OSError as e:
      raise ConfigError(f"--workdir {workdir} cannot be created or written: "
                        f"{e.strerror or e}") from None
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"--workdir {workdir} cannot be written ({parent} is not writable)")
