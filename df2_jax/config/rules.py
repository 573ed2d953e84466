"""Every rule a config must satisfy, checked before any data is read or anything is compiled.

``validate(config)`` checks that the config has every field of ``defaults.get_config()`` and
no other, and each field's type and range (``RULES``: the canvas a pair of multiples of 32,
positive sizes and intervals, known enum values, thresholds in [0, 1], the best metric an
evaluation metric), plus the rules between fields, and raises one ``ConfigError`` that lists
every problem, one line each. ``run.py`` runs it before anything else and prints the lines
without a traceback; training, evaluation and the tools run it too, so the library fails the
same way.

Every field of the defaults has its rule here (a test checks it); the enum values come from the
code that reads them.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Any, Callable, Sequence

from data_pipeline.annotations import CHECK_IMAGE_MODES
from data_pipeline.pairs import PAIR_SAMPLINGS
from data_pipeline.sources import FORMATS
from df2_jax.config import defaults
from df2_jax.errors import ConfigError
from df2_jax.evaluation.summary import metric_names
from df2_jax.evaluation.workers import HOST_POOLS
from df2_jax.models import match_rcnn
from df2_jax.models.matching import SCORER_INITS
from df2_jax.models.resnet import NORMS
from df2_jax.ops.roi_align import METHODS as ROI_ALIGN_METHODS
from df2_jax.train_step import OPTIMIZERS

CANVAS_MULTIPLE = 32  # the FPN's coarsest C level (stride 32) must tile the canvas exactly


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


def text(v) -> str | None:
  return None if isinstance(v, str) else f"must be a string, got {v!r}"


def metric(v) -> str | None:
  if v in metric_names():
    return None
  return f"{v!r} is not an evaluation metric{_suggest(str(v), metric_names())}"


def spec_categories(v) -> str | None:
  """The spec's categories, checked as ``data_pipeline.spec.from_dict`` checks them."""
  from data_pipeline import spec
  from data_pipeline.records import DataError
  try:
    spec.from_dict({"name": "config", "categories": spec._to_plain(v)})
  except DataError as e:
    return f"field '{e.field}': {e.message}"
  return None


def name(v) -> str | None:
  return None if isinstance(v, str) and v else f"must be a non-empty string, got {v!r}"


POSITIVE = integer(1)
NON_NEGATIVE = integer(0)
FRACTION = number(0.0, 1.0)
IOU = number(0.0, 1.0, lo_open=True)

RULES: dict[str, Callable[[Any], str | None]] = {
    "seed": NON_NEGATIVE,
    "data.format": choice(FORMATS),
    "data.root": text,
    "data.train_split": text,
    "data.eval_split": text,
    "data.coco_json_train": text,
    "data.coco_images_train": text,
    "data.coco_json_eval": text,
    "data.coco_images_eval": text,
    "data.tfds_data_dir": text,
    "data.synthetic_dir": text,
    "data.short_side": POSITIVE,
    "data.max_size": POSITIVE,
    "data.canvas": canvas,
    "data.bucket_canvases": sequence(None, canvas),
    "data.max_instances": POSITIVE,
    "data.mask_size": POSITIVE,
    "data.flip_prob": FRACTION,
    "data.category_batches": boolean,
    "data.pair_sampling": choice(PAIR_SAMPLINGS),
    "data.strict": boolean,
    "data.check_images": choice(CHECK_IMAGE_MODES),
    "data.num_workers": NON_NEGATIVE,
    "data.input_workers": NON_NEGATIVE,
    "data.synthetic_train_pairs": POSITIVE,
    "data.synthetic_val_pairs": POSITIVE,
    "data.synthetic_image_size": integer(32),
    "data.synthetic_seed": NON_NEGATIVE,
    "data.spec.name": name,
    "data.spec.categories": spec_categories,
    "data.spec.has_masks": boolean,
    "data.spec.has_pairs": boolean,
    "data.spec_file": text,
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
    "model.match_negatives": choice(match_rcnn.MATCH_NEGATIVES),
    "model.match_rois_per_image": NON_NEGATIVE,
    "model.match_balanced": boolean,
    "model.match_scorer_init": choice(SCORER_INITS),
    "model.match_memory_steps": NON_NEGATIVE,
    "model.match_memory_items": NON_NEGATIVE,
    "model.match_memory_draw": NON_NEGATIVE,
    "model.score_threshold": FRACTION,
    "model.detection_nms_threshold": IOU,
    "model.detections_per_image": POSITIVE,
    "model.detection_candidates": POSITIVE,
    "model.dtype": choice(match_rcnn.DTYPES),
    "model.backbone_weights": text,
    "model.init_from": text,
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
    "train.undecayed_modules": sequence(None, choice(match_rcnn.PARAM_MODULES)),
    **{f"train.loss_weights.{term}": number(0.0) for term in match_rcnn.LOSS_TERMS},
    "train.log_every_steps": POSITIVE,
    "train.checkpoint_every_steps": POSITIVE,
    "train.keep_checkpoints": POSITIVE,
    "train.eval_every_steps": NON_NEGATIVE,
    "train.best_metric": metric,
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


# What an unknown field under a section is called in its line.
_UNKNOWN = {"model": "a model field", "train.loss_weights": "a loss term"}


def _sections(node, prefix: str = "") -> dict[str, Any]:
  """``{dotted path: value}`` of every field of a config (ConfigDicts and dicts entered,
  sequences are values), and of every section with the value None."""
  out = {}
  for key, value in node.items():
    path = f"{prefix}{key}"
    if hasattr(value, "items") and callable(value.items):
      out[path] = None
      out.update(_sections(value, path + "."))
    else:
      out[path] = value
  return out


def _is_section(node) -> bool:
  return hasattr(node, "items") and callable(node.items)


def problems(config) -> list[str]:
  """Every rule ``config`` breaks, one line each (empty when it is fine): a field of the
  defaults that it lacks, a field the defaults do not have, a field's rule, a rule between
  fields."""
  expected = _sections(defaults.get_config())
  given = _sections(config)
  found, failed = [], set()
  for path in sorted(set(given) - set(expected), key=list(given).index):
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if parent and parent not in expected:
      continue  # inside an unknown section: that section's line says it
    siblings = [p.rsplit(".", 1)[-1] for p in expected
                if (p.rsplit(".", 1)[0] if "." in p else "") == parent]
    name = path.rsplit(".", 1)[-1]
    found.append(f"config.{path} is not {_UNKNOWN.get(parent, 'a config field')}"
                 f"{_suggest(name, siblings)}")
  for path in expected:
    if path not in given and (path.rsplit(".", 1)[0] if "." in path else "") in given | {"": 0}:
      found.append(f"config.{path} is missing (df2_jax/config/defaults.py has every field; a "
                   f"config saved by an earlier run is completed by config.run_config.upgrade)")
      failed.add(path)
  for path, rule in RULES.items():
    if path not in given or _is_section(given[path]):
      continue
    problem = rule(given[path])
    if problem:
      found.append(f"config.{path} {problem}")
      failed.add(path)
  ok = lambda *paths: not failed.intersection(paths) and all(p in given for p in paths)
  if ok("data.short_side", "data.max_size"):
    data = config.data
    if data.short_side > data.max_size:
      found.append(f"config.data.short_side ({data.short_side}) must be <= config.data.max_size "
                   f"({data.max_size})")
  if ok("data.canvas", "data.bucket_canvases"):
    data = config.data
    ch, cw = (int(v) for v in data.canvas)
    for c in data.bucket_canvases:
      if int(c[0]) > ch or int(c[1]) > cw:
        found.append(f"config.data.bucket_canvases entry {tuple(c)} must fit within "
                     f"config.data.canvas {tuple(data.canvas)} (the canvas that holds any image)")
  if ok("data.format"):
    fmt = config.data.format
    needs = {"raw": ["root"], "coco": ["coco_json_train", "coco_images_train",
                                        "coco_json_eval", "coco_images_eval"],
             "tfds": ["tfds_data_dir"], "synthetic": ["synthetic_dir"]}.get(fmt, [])
    for field in needs:
      if ok(f"data.{field}") and not config.data[field]:
        found.append(f"config.data.{field} must be set for config.data.format={fmt!r}")
  if ok("data.format", "data.spec_file") and config.data.spec_file and (
      config.data.format != "coco"):
    found.append(f"config.data.spec_file is read for config.data.format='coco' only (got "
                 f"{config.data.format!r})")
  if ok("model.detection_candidates", "model.detections_per_image"):
    model = config.model
    if model.detection_candidates < model.detections_per_image:
      found.append(f"config.model.detection_candidates ({model.detection_candidates}) must be "
                   f">= config.model.detections_per_image ({model.detections_per_image})")
  if ok("train.decay_epochs"):
    decay = config.train.decay_epochs
    if list(decay) != sorted(decay):
      found.append(f"config.train.decay_epochs must be in increasing order, got {tuple(decay)}")
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
