"""DeepFashion2 detection, segmentation and landmark evaluation (COCOeval).

The protocol is stock COCO evaluation with the official DeepFashion2 change (spec section 4 of
reference/deepfashion2.md): keypoint OKS uses the 294 DeepFashion2 sigmas (another dataset:
its spec's, ``DatasetSpec.oks_sigmas``; result and GT files carry its own category ids).
bbox/segm use IoU .50:.05:.95 with maxDets 1/10/100 and areas all/small/medium/large;
keypoints use OKS .50:.05:.95 with maxDets 20 and areas all/medium/large; GT with
``num_keypoints`` 0 is ignored for keypoints. Landmark AP comes in two flavours:

  * "visible + occluded" (``visible_only=False``): the GT as converted, v in {1, 2} labelled;
  * "visible" (``visible_only=True``): in a copy of the GT every occluded landmark (v == 1)
    becomes unlabelled (x = y = v = 0) and ``num_keypoints`` is recounted, so items with only
    occluded landmarks drop out (ignored, as COCOeval does for num_keypoints 0).

A quirk of the official protocol, kept: for a GT item without labelled landmarks COCOeval's OKS
measures how far *all* 294 predicted points lie outside the doubled GT box, including the
(0, 0) points outside the prediction's category slice. A detection of such an item therefore
usually fails to match it (a false positive instead of an ignored detection), so even perfect
predictions can score "visible" AP slightly below 1 when some items have only occluded
landmarks (0.981 on the 16-image real fixture).

Backends (``backend=``): "faster" (default) runs faster-coco-eval's COCOeval_faster (C++ matching
and accumulation, threaded mask IoU), "pycocotools" runs pycocotools' COCOeval, the reference.
tests/test_coco_backends.py checks that both give equal numbers on the project's cases (294 sigmas,
visible-only GT, several categories, images and categories without detections); pycocotools'
pure-Python per-image matching would otherwise dominate evaluating the 32,153 validation images.
Each stage (loadRes, evaluate, accumulate, summarize) logs its time at INFO.

Result formats (spec section 4): bbox ``{image_id, category_id, bbox [x, y, w, h], score}``;
segm ``{image_id, category_id, segmentation: RLE with utf-8 counts, score}``; keypoints
``{image_id, category_id, keypoints: 882 numbers (294 x [x, y, v]), score}``.

  python -m df2_jax.evaluation.coco --gt GT.json --results R.json --type keypoints \
      [--visible_only] [--verbose]
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
import contextlib
import copy
import gc
import io
import logging
import sys
import time
from typing import Any

import numpy as np
from pycocotools import coco as coco_api
from pycocotools import cocoeval
from pycocotools import mask as mask_utils

from data_pipeline import spec as spec_lib
from df2_jax import errors
from df2_jax.evaluation import scorer_inputs

log = logging.getLogger(__name__)

IOU_TYPES = ("bbox", "segm", "keypoints")

# COCOeval implementations: "faster" (faster-coco-eval, the default for speed) and "pycocotools"
# (the reference the tests compare it with).
BACKENDS = ("faster", "pycocotools")
DEFAULT_BACKEND = "faster"

# Names of COCOeval.stats entries, by iou type (COCOeval.summarize's order).
STAT_NAMES = {
    "bbox": ("AP", "AP50", "AP75", "APs", "APm", "APl",
             "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"),
    "keypoints": ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"),
}
STAT_NAMES["segm"] = STAT_NAMES["bbox"]

# Rows of format_table: key in metrics_by_type -> row label.
TABLE_ROWS = (
    ("bbox", "bbox"),
    ("segm", "segm"),
    ("keypoints_visible", "landmarks visible"),
    ("keypoints", "landmarks vis+occ"),
)

# Keys a result entry keeps for each iou type (anything else is dropped before loadRes, whose
# branch choice depends on which keys the first entry has).
_RESULT_KEYS = {
    "bbox": ("image_id", "category_id", "bbox", "score"),
    "segm": ("image_id", "category_id", "segmentation", "score"),
    "keypoints": ("image_id", "category_id", "keypoints", "score"),
}


@contextlib.contextmanager
def _quiet(verbose: bool):
  """Swallows pycocotools' prints unless ``verbose``."""
  if verbose:
    yield
  else:
    with contextlib.redirect_stdout(io.StringIO()):
      yield


def _copy_dataset(gt: dict) -> dict:
  """A copy of a COCO dataset dict safe to hand to COCOeval.

  COCOeval replaces keys of the annotation dicts (``ignore``, ``segmentation`` -> RLE, and
  faster-coco-eval adds ``rle``; its index also turns non-int image ids into ints) but never
  mutates nested values, so copying the top level, every image and every annotation dict
  suffices (a deep copy of the 882 keypoint numbers per annotation would dominate the run time).
  """
  out = dict(gt)
  out["images"] = [dict(i) for i in gt.get("images", [])]
  out["annotations"] = [dict(a) for a in gt.get("annotations", [])]
  return out


def visible_only_gt(gt: dict) -> dict:
  """A copy of a COCO GT dict with occluded landmarks (v == 1) made unlabelled.

  Args:
    gt: COCO dataset dict whose annotations hold ``keypoints`` (882 numbers).

  Returns:
    The copy: v == 1 landmarks become (0, 0, 0) and ``num_keypoints`` = count of v > 0.
    Annotations without ``keypoints`` are copied unchanged. ``gt`` is not modified (changed
    keypoint lists are new lists; unchanged ones are shared, read-only).
  """
  out = _copy_dataset(gt)
  for ann in out["annotations"]:
    if "keypoints" not in ann:
      continue
    kps = np.asarray(ann["keypoints"], np.float64).reshape(-1, 3)
    occluded = kps[:, 2] == 1
    if occluded.any():
      kps[occluded] = 0.0
      ann["keypoints"] = kps.reshape(-1).tolist()
    ann["num_keypoints"] = int((kps[:, 2] > 0).sum())
  return out


def _coco_from_dict(dataset: dict, verbose: bool) -> coco_api.COCO:
  coco = coco_api.COCO()
  coco.dataset = dataset
  with _quiet(verbose):
    coco.createIndex()
  return coco


def _empty_results(gt: coco_api.COCO, verbose: bool) -> coco_api.COCO:
  """A result object with no detections (loadRes cannot take an empty list)."""
  dataset = {"info": copy.deepcopy(gt.dataset.get("info", {})),
             "images": list(gt.dataset["images"]),
             "categories": copy.deepcopy(gt.dataset.get("categories", [])),
             "annotations": []}
  return _coco_from_dict(dataset, verbose)


def _category_name(gt: Any, cat_id: int) -> str:
  return str(gt.cats.get(cat_id, {}).get("name", cat_id))


class MissingSigmas(errors.Df2Error, ValueError):
  """A keypoint evaluation of another dataset than DeepFashion2 without its OKS sigmas."""
  exit_code = 2


def _sigmas(gt_dict: dict, sigmas: np.ndarray | None) -> np.ndarray:
  """The OKS sigmas of a keypoint evaluation: ``sigmas`` (the run's spec's), or for a
  DeepFashion2 ground truth its 294; one per keypoint of the GT's categories."""
  if sigmas is None:
    if not spec_lib.is_deepfashion2(gt_dict.get("categories", [])):
      raise MissingSigmas("the keypoint evaluation of a ground truth that is not "
                          "DeepFashion2's needs its OKS sigmas (the run's dataset spec: "
                          "--workdir WORKDIR)")
    sigmas = spec_lib.DEEPFASHION2.oks_sigmas
  sigmas = np.asarray(sigmas, np.float64)
  for cat in gt_dict.get("categories", []):
    if len(cat.get("keypoints", [])) != len(sigmas):
      raise MissingSigmas(f"category {cat.get('name')!r} of the ground truth has "
                       f"{len(cat.get('keypoints', []))} keypoints, the sigmas {len(sigmas)}")
  return sigmas


def _per_category_ap(evaluator: Any, gt: Any) -> dict[str, float]:
  """Per-category AP: mean of precision[:, :, k, area all, last maxDet] over entries > -1.

  -1.0 for a category with no (non-ignored) GT, COCOeval's convention for "undefined".
  ``evaluator`` is either backend's COCOeval (same ``params`` and ``eval["precision"]``).
  """
  precision = evaluator.eval["precision"]  # [T, R, K, A, M]
  area_all = evaluator.params.areaRngLbl.index("all")
  out = {}
  for k, cat_id in enumerate(evaluator.params.catIds):
    p = precision[:, :, k, area_all, -1]
    p = p[p > -1]
    out[_category_name(gt, cat_id)] = float(np.mean(p)) if p.size else -1.0
  return out


@contextlib.contextmanager
def _gc_paused():
  """Pauses Python's cyclic garbage collector (restored on exit if it was on).

  Loading and matching millions of result entries allocates many containers, which triggers
  full collections that walk every live list, the 882 keypoint numbers of each result included:
  about a quarter of the evaluation time at 100 detections per image. COCOeval frees its
  objects by reference counting, so nothing piles up meanwhile.
  """
  was_enabled = gc.isenabled()
  gc.disable()
  try:
    yield
  finally:
    if was_enabled:
      gc.enable()


class _StageTimer:
  """Logs one INFO line per COCOeval stage: its wall time and the number of detections.

  Evaluating the 32,153 validation images takes minutes per type; these lines show where.
  """

  def __init__(self, what: str, num_results: int):
    self.what = what
    self.num_results = num_results

  @contextlib.contextmanager
  def __call__(self, stage: str):
    start = time.perf_counter()
    yield
    log.info("COCO %s: %s %.2f s (%d detections)", self.what, stage,
             time.perf_counter() - start, self.num_results)


def _silent(*args, **kwargs) -> None:
  del args, kwargs


def _cocoeval_pycocotools(gt_dict: dict, res_list: list[dict], iou_type: str,
                          timer: _StageTimer, verbose: bool, sigmas: np.ndarray | None
                          ) -> tuple[Any, Any]:
  """pycocotools' COCOeval on a GT dict (owned by the caller's copy) and result entries.

  Returns (evaluator after summarize, the GT COCO object). The "loadRes" stage includes
  indexing the GT.
  """
  with timer("loadRes"):
    coco_gt = _coco_from_dict(gt_dict, verbose)
    with _quiet(verbose):
      coco_dt = coco_gt.loadRes(res_list) if res_list else _empty_results(coco_gt, verbose)
  with _quiet(verbose):
    evaluator = cocoeval.COCOeval(coco_gt, coco_dt, iou_type)
    if iou_type == "keypoints":
      evaluator.params.kpt_oks_sigmas = sigmas
    for stage in ("evaluate", "accumulate", "summarize"):
      with timer(stage):
        getattr(evaluator, stage)()
  return evaluator, coco_gt


_KEYPOINT_BLOCK = 8192  # results per block of _load_results_faster's keypoint extents


def _load_results_faster(faster_coco_eval: Any, coco_gt: Any, res_list: list[dict],
                         iou_type: str, printer: Any) -> Any:
  """``coco_gt.loadRes(res_list)`` for the faster backend, with the per-entry work batched.

  Stock loadRes (pycocotools' and faster-coco-eval's alike) spends most of a keypoint
  evaluation in four np.min/np.max calls on 294-element Python lists per result, and
  faster-coco-eval's per-mask area/toBbox calls are about 2x slower than pycocotools'. This sets the
  same fields to the same values: ``id`` = position + 1; bbox: ``area`` = w * h, ``iscrowd`` 0;
  segm: ``area`` and ``bbox`` of the RLE (pycocotools.mask), ``iscrowd`` 0; keypoints: ``bbox``
  and ``area`` of the extent of all 294 points (the (0, 0) ones outside the category slice
  included, as stock loadRes does), no ``iscrowd``. Left out: the box polygon stock loadRes
  adds as a bbox result's ``segmentation``, which bbox evaluation never reads. The entries
  (the caller's own copies) are modified in place, as loadRes does; ``evaluate`` has checked
  their image ids (stock loadRes asserts them).
  """
  if iou_type == "bbox":
    for i, ann in enumerate(res_list, 1):
      bb = ann["bbox"]
      ann["area"] = bb[2] * bb[3]
      ann["id"] = i
      ann["iscrowd"] = 0
  elif iou_type == "segm":
    for i, ann in enumerate(res_list, 1):
      ann["area"] = mask_utils.area(ann["segmentation"])
      ann["bbox"] = mask_utils.toBbox(ann["segmentation"])
      ann["id"] = i
      ann["iscrowd"] = 0
  elif res_list:  # keypoints
    # In blocks: one float64 matrix of every result's 882 numbers would be the evaluation's
    # largest allocation (7 KB per result, 1.4 GB for 200k results).
    block = _KEYPOINT_BLOCK
    kps = np.empty((block, len(res_list[0]["keypoints"])), np.float64)
    for start in range(0, len(res_list), block):
      part = res_list[start:start + block]
      for i, ann in enumerate(part):  # 2x faster than np.asarray on the list of lists
        kps[i] = ann["keypoints"]
      x, y = kps[:len(part), 0::3], kps[:len(part), 1::3]
      x0, x1, y0, y1 = x.min(axis=1), x.max(axis=1), y.min(axis=1), y.max(axis=1)
      areas = ((x1 - x0) * (y1 - y0)).tolist()
      boxes = np.stack([x0, y0, x1 - x0, y1 - y0], axis=1).tolist()
      for i, (ann, area, box) in enumerate(zip(part, areas, boxes), start + 1):
        ann["area"] = area
        ann["bbox"] = box
        ann["id"] = i
  coco_dt = faster_coco_eval.COCO(print_function=printer)
  coco_dt.dataset = {"info": copy.deepcopy(coco_gt.dataset.get("info", {})),
                     "images": list(coco_gt.dataset["images"]),
                     "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
                     "annotations": res_list}
  coco_dt.createIndex()
  return coco_dt


def _cocoeval_faster(gt_dict: dict, res_list: list[dict], iou_type: str,
                     timer: _StageTimer, verbose: bool, sigmas: np.ndarray | None
                     ) -> tuple[Any, Any]:
  """faster-coco-eval's COCOeval_faster, set up to reproduce pycocotools' COCOeval.

  Results are loaded by ``_load_results_faster`` (stock loadRes's fields, batched). Differences
  from its defaults, each to match pycocotools: the 294 DeepFashion2 sigmas; every
  GT category in ``params.catIds`` also for keypoints (faster-coco-eval keeps only categories
  with GT annotations there, which would drop them from ``per_category``); no LVIS rules, no
  extra match statistics. ``separate_eval`` runs evaluate and accumulate as two C++ steps (same
  numbers as the fused step) so that each stage's time is logged apart. Only its own classes are
  used: pycocotools is never patched (``init_as_pycocotools`` is not called).

  Returns (evaluator after summarize, the GT COCO object).
  """
  import faster_coco_eval  # only this backend needs it

  printer = print if verbose else _silent
  with timer("loadRes"):
    coco_gt = faster_coco_eval.COCO(print_function=printer)
    coco_gt.dataset = gt_dict
    coco_gt.createIndex()
    coco_dt = _load_results_faster(faster_coco_eval, coco_gt, res_list, iou_type, printer)
  evaluator = faster_coco_eval.COCOeval_faster(
      coco_gt, coco_dt, iou_type, print_function=printer, extra_calc=False,
      kpt_oks_sigmas=sigmas, lvis_style=False, separate_eval=True)
  evaluator.params.catIds = sorted(coco_gt.getCatIds())
  for stage in ("evaluate", "accumulate", "summarize"):
    with timer(stage):
      getattr(evaluator, stage)()
  return evaluator, coco_gt


_BACKEND_FNS = {"faster": _cocoeval_faster, "pycocotools": _cocoeval_pycocotools}


def evaluate(gt: dict | str,
             results: list[dict] | str,
             iou_type: str,
             *,
             visible_only: bool = False,
             per_category: bool = True,
             verbose: bool = False,
             backend: str = DEFAULT_BACKEND,
             sigmas: np.ndarray | None = None) -> dict:
  """COCO evaluation of DeepFashion2 results.

  Args:
    gt: COCO GT dataset dict (data_pipeline.convert.to_coco) or a path to its JSON file. Not
      modified.
    results: list of result dicts in the format of ``iou_type`` or a path to a JSON file. Not
      modified (entries are copied; keys other than those of the format are dropped).
    iou_type: "bbox", "segm" or "keypoints".
    visible_only: keypoints only: the paper's "visible" landmark AP (occluded GT landmarks
      unlabelled). False gives "visible + occluded".
    per_category: add "per_category" {category name: AP} to the output.
    verbose: let the backend print its progress and summary.
    backend: "faster" (faster-coco-eval, default) or "pycocotools" (the reference); both give
      the same numbers (tests/test_coco_backends.py).
    sigmas: keypoints: the OKS sigma of every keypoint (``DatasetSpec.oks_sigmas``); None: the
      294 DeepFashion2 sigmas, for a DeepFashion2 ground truth only.

  Returns:
    {stat name: float} from COCOeval.stats (names in STAT_NAMES[iou_type]: bbox/segm "AP",
    "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl"; keypoints
    "AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl"); -1.0 marks a stat
    with no GT in its range (COCO's convention). Plus "num_results" and, when per_category,
    "per_category" {name: AP} (-1.0 for categories without GT). Empty results give AP 0 (not a
    crash) wherever GT exists.

  Raises:
    ValueError: unknown iou_type or backend, visible_only with an iou_type other than
      keypoints, a result without the keys of its format or for an image not in the GT.
  """
  if iou_type not in IOU_TYPES:
    raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
  if visible_only and iou_type != "keypoints":
    raise ValueError("visible_only applies to iou_type='keypoints' only")
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
  gt_dict, results_list = scorer_inputs.load(gt), scorer_inputs.load(results)
  scorer_inputs.expect(gt_dict, "coco_gt", scorer_inputs.name_of(gt), "the ground truth (--gt)")
  scorer_inputs.expect(results_list, iou_type, scorer_inputs.name_of(results),
                    f"the results (--results) for --type {iou_type}")
  results = results_list
  keys = _RESULT_KEYS[iou_type]
  with _gc_paused():
    gt_dict = visible_only_gt(gt_dict) if visible_only else _copy_dataset(gt_dict)
    res_list = []
    for r in results:
      missing = [k for k in keys if k not in r]
      if missing:
        raise ValueError(f"{iou_type} result lacks {missing}: keys {sorted(r)}")
      res_list.append({k: r[k] for k in keys})  # loadRes/COCOeval only set keys
    unknown = {r["image_id"] for r in res_list} - {im["id"] for im in gt_dict["images"]}
    if unknown:
      raise ValueError(f"results for image ids not in the GT: {sorted(unknown)[:10]}")
    what = f"{iou_type}{' visible' if visible_only else ''} [{backend}]"
    timer = _StageTimer(what, len(res_list))
    kpt_sigmas = _sigmas(gt_dict, sigmas) if iou_type == "keypoints" else None
    evaluator, coco_gt = _BACKEND_FNS[backend](gt_dict, res_list, iou_type, timer, verbose,
                                               kpt_sigmas)
  out: dict[str, Any] = {name: float(v) for name, v in zip(STAT_NAMES[iou_type], evaluator.stats)}
  out["num_results"] = len(res_list)
  if per_category:
    out["per_category"] = _per_category_ap(evaluator, coco_gt)
  return out


def evaluate_all(gt: dict | str,
                 bbox_results: list[dict] | str | None = None,
                 segm_results: list[dict] | str | None = None,
                 keypoint_results: list[dict] | str | None = None,
                 *,
                 verbose: bool = False,
                 backend: str = DEFAULT_BACKEND,
                 sigmas: np.ndarray | None = None) -> dict[str, dict]:
  """Every evaluation the paper reports, keyed as format_table expects.

  ``backend`` and ``sigmas`` as in ``evaluate`` ("faster" by default, "pycocotools" the
  reference).

  Returns:
    {"bbox": ..., "segm": ..., "keypoints_visible": ..., "keypoints": ...} (each an
    ``evaluate`` output), leaving out the types whose results are None.
  """
  gt = scorer_inputs.load(gt)
  out = {}
  kw = dict(verbose=verbose, backend=backend, sigmas=sigmas)
  if bbox_results is not None:
    out["bbox"] = evaluate(gt, bbox_results, "bbox", **kw)
  if segm_results is not None:
    out["segm"] = evaluate(gt, segm_results, "segm", **kw)
  if keypoint_results is not None:
    out["keypoints_visible"] = evaluate(gt, keypoint_results, "keypoints", visible_only=True,
                                        **kw)
    out["keypoints"] = evaluate(gt, keypoint_results, "keypoints", **kw)
  return out


def _fmt(value: Any) -> str:
  if value is None:
    return "-"
  value = float(value)
  return "-" if value < 0 else f"{value:.3f}"


def format_table(metrics_by_type: Mapping[str, Mapping]) -> str:
  """Plain-text summary tables.

  Args:
    metrics_by_type: {"bbox" | "segm" | "keypoints_visible" | "keypoints": evaluate output}
      (evaluate_all's output); missing keys are left out of the table.

  Returns:
    A table with rows bbox / segm / landmarks visible / landmarks vis+occ and columns AP, AP50,
    AP75, then a per-category AP table (one column per evaluated type) when any entry has
    "per_category". "-" marks undefined values (-1).
  """
  rows = [(label, metrics_by_type[key]) for key, label in TABLE_ROWS if key in metrics_by_type]
  width = max([len(label) for label, _ in rows] + [len("type")])
  lines = [f"{'type':<{width}}  {'AP':>6}  {'AP50':>6}  {'AP75':>6}"]
  lines.append("-" * len(lines[0]))
  for label, m in rows:
    lines.append(f"{label:<{width}}  {_fmt(m.get('AP')):>6}  {_fmt(m.get('AP50')):>6}  "
                 f"{_fmt(m.get('AP75')):>6}")
  per_cat = [(label, m["per_category"]) for label, m in rows if m.get("per_category")]
  if per_cat:
    names: list[str] = []
    for _, pc in per_cat:
      names.extend(n for n in pc if n not in names)
    name_w = max([len(n) for n in names] + [len("category")])
    col_w = [max(len(label), 6) for label, _ in per_cat]
    header = f"{'category':<{name_w}}" + "".join(
        f"  {label:>{w}}" for (label, _), w in zip(per_cat, col_w))
    lines += ["", "per-category AP", header, "-" * len(header)]
    for n in names:
      lines.append(f"{n:<{name_w}}" + "".join(
          f"  {_fmt(pc.get(n)):>{w}}" for (_, pc), w in zip(per_cat, col_w)))
  return "\n".join(lines)


def _encode_mask(mask: np.ndarray) -> dict:
  rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
  counts = rle["counts"]
  return {"size": [int(s) for s in rle["size"]],
          "counts": counts.decode("utf-8") if isinstance(counts, bytes) else counts}


def detections_to_results(image_id: int,
                          boxes_xyxy: np.ndarray,
                          scores: np.ndarray,
                          classes: np.ndarray,
                          valid: np.ndarray | None = None,
                          masks: np.ndarray | None = None,
                          landmarks: np.ndarray | None = None, *,
                          spec: spec_lib.DatasetSpec,
                          ) -> tuple[list[dict], list[dict], list[dict]]:
  """One image's detections -> DeepFashion2 result entries.

  Args:
    image_id: the COCO image id.
    boxes_xyxy: [D, 4] boxes [x1, y1, x2, y2] in original image pixels.
    scores: [D] detection scores.
    classes: [D] the spec's classes 1..C (the entries carry the dataset's own ids).
    valid: [D] bool, False for padding rows (None: all valid).
    masks: optional [D, H, W] full-image masks, bool (any nonzero value counts as foreground,
      so threshold soft masks before passing them).
    landmarks: optional [D, L, 3] (x, y, score) in original image pixels, as pixel indices
      like the annotations (a model's continuous coordinates less half a pixel:
      ``transforms.landmarks_to_pixel_indices``); only the detection's own category slice is
      used.
    spec: the run's dataset spec.

  Returns:
    (bbox_results, segm_results, keypoint_results): bbox ``{image_id, category_id, bbox
    [x, y, w, h] with w = x2 - x1, score}``; segm (empty when masks is None) ``{image_id,
    category_id, segmentation: RLE {size [H, W], counts utf-8 str}, score}``; keypoints (empty
    when landmarks is None) ``{image_id, category_id, keypoints: 882 numbers, score}`` where the
    detection's category slice holds (x, y, 2) and every other landmark (0, 0, 0) (COCOeval
    ignores predicted v), score = the detection score.
  """
  boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  scores = np.asarray(scores, np.float64).reshape(-1)
  classes = np.asarray(classes).reshape(-1).astype(np.int64)
  num = boxes.shape[0]
  valid = np.ones(num, bool) if valid is None else np.asarray(valid, bool).reshape(-1)
  if not scores.shape[0] == classes.shape[0] == valid.shape[0] == num:
    raise ValueError(f"inconsistent lengths: boxes {num}, scores {scores.shape[0]}, "
                     f"classes {classes.shape[0]}, valid {valid.shape[0]}")
  if masks is not None:
    masks = np.asarray(masks)
    if masks.ndim != 3 or masks.shape[0] != num:
      raise ValueError(f"masks must be [D, H, W] with D = {num}, got {masks.shape}")
  if landmarks is not None:
    landmarks = np.asarray(landmarks, np.float64)
    total = spec.num_landmarks
    if landmarks.shape != (num, total, 3):
      raise ValueError(f"landmarks must be [{num}, {total}, 3], got {landmarks.shape}")
  bbox_res, segm_res, kp_res = [], [], []
  for i in np.nonzero(valid)[0]:
    cat = int(classes[i])
    score = float(scores[i])
    x1, y1, x2, y2 = (float(v) for v in boxes[i])
    base = {"image_id": int(image_id), "category_id": int(spec.original_ids[cat])}
    bbox_res.append({**base, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score})
    if masks is not None:
      segm_res.append({**base, "segmentation": _encode_mask(masks[i] != 0), "score": score})
    if landmarks is not None:
      kps = np.zeros((spec.num_landmarks, 3), np.float64)
      sl = spec.landmark_slice(cat)
      kps[sl, :2] = landmarks[i, sl, :2]
      kps[sl, 2] = 2.0
      kp_res.append({**base, "keypoints": [float(v) for v in kps.reshape(-1)], "score": score})
  return bbox_res, segm_res, kp_res


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m df2_jax.evaluation.coco",
      description="DeepFashion2 COCO-style evaluation (bbox, segm, keypoints with 294 sigmas).")
  parser.add_argument("--gt", required=True, help="COCO GT JSON (data_pipeline.convert)")
  parser.add_argument("--results", required=True, help="results JSON (a list of entries)")
  parser.add_argument("--type", required=True, choices=IOU_TYPES, dest="iou_type")
  parser.add_argument("--visible_only", action="store_true",
                      help="keypoints: the 'visible' landmark AP (occluded GT unlabelled)")
  parser.add_argument("--verbose", action="store_true", help="show pycocotools' output")
  parser.add_argument("--workdir", default="",
                      help="keypoints of another dataset than DeepFashion2: the run whose "
                           "config.json holds its spec (the OKS sigmas)")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    sigmas = None
    if args.workdir:
      from df2_jax.config import run_config
      saved = run_config.read(args.workdir)
      if saved is None:
        print(f"error: no {run_config.FILE} in {args.workdir}", file=sys.stderr)
        return 1
      sigmas = spec_lib.from_config(
          run_config.config_from_json(saved[run_config.CONFIG_KEY])).oks_sigmas
    metrics = evaluate(args.gt, args.results, args.iou_type, visible_only=args.visible_only,
                       verbose=args.verbose, sigmas=sigmas)
  except errors.Df2Error as e:
    return errors.report(e)
  key = "keypoints_visible" if args.visible_only else args.iou_type
  for name in STAT_NAMES[args.iou_type]:
    print(f"{name:>6}: {_fmt(metrics[name])}")
  print()
  print(format_table({key: metrics}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
