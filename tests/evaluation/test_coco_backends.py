"""df2_jax.evaluation.coco's backends: faster-coco-eval must give pycocotools' numbers.

pycocotools is the reference (the official protocol); faster-coco-eval is the default for speed.
The synthetic detections below come from the real DeepFashion2 fixture's GT: jittered copies of
GT items (box, polygon mask, landmarks in the category's slice) with random and tied scores,
wrong-category copies, random false positives, more than 20 detections of one category in an
image (keypoints' maxDets) and more than 100 in an image (bbox/segm maxDets), images without
detections, a GT category without detections; objects scaled to every area range.
"""

import copy
import gc
import json
import logging
import sys

import numpy as np
from pycocotools import mask as mask_utils
import pytest

from conftest import fixtures_dir
from data_pipeline import deepfashion2 as df2
from df2_jax.evaluation import coco as ev

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# The only difference seen: where the top-scored detection is a true positive, pycocotools'
# precision tp / (tp + fp + eps) is 1 / (1 + 2^-52) = 1 - 2.2e-16 and faster-coco-eval's is 1.
# Recall and scores are bit-identical.
TOL = 1e-12


def replicate_gt(gt: dict, num_images: int, rng: np.random.Generator,
                 scale_range: tuple[float, float] = (0.12, 1.0)) -> dict:
  """``num_images`` images cycled from ``gt`` with new ids, each scaled by a random factor.

  Scaling (boxes, areas, polygons, labelled landmarks, image size) spreads items over COCO's
  small / medium / large area ranges; the real fixture's items are all large.
  """
  by_image: dict[int, list[dict]] = {}
  for ann in gt["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)
  images, anns = [], []
  for i in range(num_images):
    src = gt["images"][i % len(gt["images"])]
    s = float(rng.uniform(*scale_range))
    image_id = i + 1
    images.append(dict(src, id=image_id, width=max(1, round(src["width"] * s)),
                       height=max(1, round(src["height"] * s))))
    for a in by_image.get(src["id"], []):
      kps = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
      kps[:, :2] *= s * (kps[:, 2:] > 0)
      anns.append(dict(a, id=len(anns) + 1, image_id=image_id,
                       bbox=[v * s for v in a["bbox"]], area=a["area"] * s * s,
                       segmentation=[[v * s for v in p] for p in a["segmentation"]],
                       keypoints=kps.reshape(-1).tolist()))
  return dict(gt, images=images, annotations=anns)


def _rle(polygons: list[np.ndarray], h: int, w: int) -> dict:
  rle = mask_utils.merge(mask_utils.frPyObjects([p.reshape(-1).tolist() for p in polygons], h, w))
  return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("utf-8")}


def _keypoints(cat: int, xy: np.ndarray) -> list[float]:
  """882 numbers: ``xy`` [n, 2] in category ``cat``'s slice with v = 2, zeros elsewhere."""
  kps = np.zeros((df2.NUM_LANDMARKS, 3))
  kps[df2.landmark_slice(cat), :2] = xy
  kps[df2.landmark_slice(cat), 2] = 2.0
  return kps.reshape(-1).tolist()


def synthetic_results(gt: dict, rng: np.random.Generator, *, per_image: int = 40,
                      skip_image_prob: float = 0.1, skip_categories: tuple[int, ...] = (),
                      crowded: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
  """(bbox, segm, keypoint) results for ``gt``: same detections, one entry of each per detection.

  Per image (unless skipped, probability ``skip_image_prob``): 1-3 jittered copies of each GT
  item (jitter from near-perfect to poor), a wrong-category copy now and then, then random
  false positives up to ``per_image`` detections. In the first ``crowded`` images the first
  item gets 25 extra copies (> keypoints' maxDets 20 per category) and 110 extra false
  positives (> maxDets 100). Scores are uniform (copies in [0.3, 1] less their jitter, false
  positives in [0.01, 0.7]), a third rounded to 0.05 (ties).
  ``skip_categories`` never get a detection.
  """
  cats = [c for c in range(1, 14) if c not in skip_categories]
  by_image: dict[int, list[dict]] = {}
  for ann in gt["annotations"]:
    by_image.setdefault(ann["image_id"], []).append(ann)
  out = ([], [], [])

  def add(image_id, cat, box, polygons, xy, h, w, low, high):
    score = float(rng.uniform(low, high))
    if rng.uniform() < 1 / 3:
      score = round(score * 20) / 20 or 0.05
    base = {"image_id": image_id, "category_id": int(cat), "score": score}
    out[0].append(dict(base, bbox=[float(v) for v in box]))
    out[1].append(dict(base, segmentation=_rle(polygons, h, w)))
    out[2].append(dict(base, keypoints=_keypoints(cat, xy)))

  def random_fp(image_id, h, w):
    cat = int(rng.choice(cats))
    x, y = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
    bw, bh = rng.uniform(2, w - x), rng.uniform(2, h - y)
    poly = np.array([[x, y], [x + bw, y], [x + bw * rng.uniform(0.3, 1), y + bh], [x, y + bh]])
    n = df2.LANDMARK_COUNTS[cat]
    xy = np.stack([rng.uniform(x, x + bw, n), rng.uniform(y, y + bh, n)], axis=1)
    add(image_id, cat, [x, y, bw, bh], [poly], xy, h, w, 0.01, 0.7)

  def copy_of(image_id, a, cat, jitter, h, w):
    x, y, bw, bh = a["bbox"]
    size = np.array([bw, bh])
    box = np.array(a["bbox"]) + rng.normal(0, jitter, 4) * np.r_[size, size]
    box[2:] = np.maximum(box[2:], 1.0)
    polys = [np.asarray(p, np.float64).reshape(-1, 2) + rng.normal(0, jitter, (len(p) // 2, 2))
             * size for p in a["segmentation"]]
    kps = np.asarray(a["keypoints"], np.float64).reshape(-1, 3)
    n = df2.LANDMARK_COUNTS[cat]
    if cat == a["category_id"]:
      xy = kps[df2.landmark_slice(cat), :2] + rng.normal(0, jitter, (n, 2)) * size
    else:
      xy = np.stack([rng.uniform(x, x + bw, n), rng.uniform(y, y + bh, n)], axis=1)
    add(image_id, cat, box, polys, xy, h, w, 0.3 - jitter, 1.0 - jitter)

  for k, image in enumerate(gt["images"]):
    if k >= crowded and rng.uniform() < skip_image_prob:
      continue
    image_id, h, w = image["id"], image["height"], image["width"]
    start = len(out[0])
    anns = [a for a in by_image.get(image_id, []) if a["category_id"] in cats]
    for a in anns:
      for _ in range(int(rng.integers(1, 4))):
        copy_of(image_id, a, a["category_id"], float(rng.choice([0.005, 0.03, 0.1, 0.3])), h, w)
      if rng.uniform() < 0.2:
        copy_of(image_id, a, int(rng.choice(cats)), 0.02, h, w)
    if k < crowded and anns:
      for _ in range(25):
        copy_of(image_id, anns[0], anns[0]["category_id"], float(rng.uniform(0.005, 0.2)), h, w)
      for _ in range(110):
        random_fp(image_id, h, w)
    while len(out[0]) - start < per_image:
      random_fp(image_id, h, w)
  return out


def real_case(seed: int, num_images: int = 48, crowd: bool = False, **kwargs):
  """(GT, bbox, segm, keypoint results) from the real fixture; ``crowd`` marks every 7th GT
  item iscrowd (DeepFashion2 has none; COCOeval's crowd rules are checked all the same)."""
  rng = np.random.default_rng(seed)
  with open(fixtures_dir() / "coco.json") as f:
    gt = replicate_gt(json.load(f), num_images, rng)
  if crowd:
    for a in gt["annotations"][::7]:
      a["iscrowd"] = 1
  return (gt, *synthetic_results(gt, rng, **kwargs))


def max_differences(ref: dict, other: dict) -> dict[str, float]:
  """{evaluate_all key: max |difference|} over every stat and per-category AP.

  Raises AssertionError when the two do not report the same names (or -1 for the same ones).
  """
  out = {}
  assert set(ref) == set(other)
  for key in ref:
    a, b = ref[key], other[key]
    assert set(a) == set(b), key
    assert set(a["per_category"]) == set(b["per_category"]), key
    pairs = [(a[n], b[n]) for n in a if n not in ("per_category", "num_results")]
    pairs += [(a["per_category"][n], b["per_category"][n]) for n in a["per_category"]]
    assert a["num_results"] == b["num_results"]
    assert all((x == -1.0) == (y == -1.0) for x, y in pairs), key
    out[key] = max(abs(x - y) for x, y in pairs)
  return out


def test_faster_backend_does_not_patch_pycocotools(real_fixture):
  import faster_coco_eval  # noqa: F401 (imported for its side effects, if any)
  from pycocotools import cocoeval
  gt, bbox, _, _ = real_case(0, num_images=4)
  ev.evaluate(gt, bbox, "bbox", backend="faster")
  assert sys.modules["pycocotools.cocoeval"] is cocoeval
  assert cocoeval.COCOeval.__module__ == "pycocotools.cocoeval"
  assert sys.modules["pycocotools.mask"].__name__ == "pycocotools.mask"


@pytest.mark.parametrize("crowd", [False, True])
def test_backends_equal_on_real_fixture_case(real_fixture, crowd):
  gt, bbox, segm, kps = real_case(1 + crowd, num_images=48, crowd=crowd, per_image=40,
                                  skip_categories=(13,), crowded=3)
  kp_counts = {}
  for r in kps:
    key = (r["image_id"], r["category_id"])
    kp_counts[key] = kp_counts.get(key, 0) + 1
  assert max(kp_counts.values()) > 20
  assert max(sum(1 for r in bbox if r["image_id"] == i) for i in (1, 2, 3)) > 100
  gt_before, results_before = copy.deepcopy(gt), copy.deepcopy((bbox, segm, kps))
  ref = ev.evaluate_all(gt, bbox, segm, kps, backend="pycocotools")
  fast = ev.evaluate_all(gt, bbox, segm, kps, backend="faster")
  assert gt == gt_before and (bbox, segm, kps) == results_before
  diffs = max_differences(ref, fast)
  assert all(d <= TOL for d in diffs.values()), diffs
  if crowd:
    return
  # The case is not trivial: APs strictly between 0 and 1, every area range used, visible-only
  # differs from visible + occluded, the category without detections scores 0.
  for key in ("bbox", "segm", "keypoints", "keypoints_visible"):
    assert 0.05 < ref[key]["AP"] < 0.95, (key, ref[key]["AP"])
    assert ref[key]["per_category"][df2.COCO_NAMES[13]] == 0.0
    assert ref[key]["per_category"][df2.COCO_NAMES[3]] == -1.0  # no GT
  for key in ("bbox", "segm"):
    assert min(ref[key][n] for n in ("APs", "APm", "APl")) > 0.0
  assert ref["keypoints"]["AP"] != ref["keypoints_visible"]["AP"]


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_backends_equal_on_empty_and_tiny_cases(iou_type):
  import test_coco as t  # the existing tests' GT and perfect results
  gt = t._simple_gt()
  res = dict(zip(("bbox", "segm", "keypoints"), t._perfect_results(gt)))[iou_type]
  for results in ([], res, res[:1]):
    for visible_only in ((False, True) if iou_type == "keypoints" else (False,)):
      ref = ev.evaluate(gt, results, iou_type, visible_only=visible_only, backend="pycocotools")
      fast = ev.evaluate(gt, results, iou_type, visible_only=visible_only, backend="faster")
      # Perfect results: 1 - 2.2e-16 against 1 (see TOL).
      assert max_differences({"x": ref}, {"x": fast})["x"] <= TOL


def test_stages_are_logged(real_fixture, caplog):
  gt, bbox, _, kps = real_case(3, num_images=4)
  with caplog.at_level(logging.INFO, logger=ev.__name__):
    for backend in ev.BACKENDS:
      ev.evaluate(gt, bbox, "bbox", backend=backend)
      ev.evaluate(gt, kps, "keypoints", visible_only=True, backend=backend)
  lines = [r.getMessage() for r in caplog.records if r.name == ev.__name__]
  for backend in ev.BACKENDS:
    for what, n in (("bbox", len(bbox)), ("keypoints visible", len(kps))):
      mine = [l for l in lines if l.startswith(f"COCO {what} [{backend}]: ")]
      assert [l.split(": ")[1].split()[0] for l in mine] == [
          "loadRes", "evaluate", "accumulate", "summarize"], mine
      assert all(l.endswith(f" s ({n} detections)") for l in mine), mine


def test_unknown_backend_rejected():
  with pytest.raises(ValueError, match="backend"):
    ev.evaluate({"images": [], "annotations": [], "categories": []}, [], "bbox", backend="x")


@pytest.mark.parametrize("backend", ev.BACKENDS)
def test_results_for_unknown_images_rejected(real_fixture, backend):
  gt, bbox, _, _ = real_case(4, num_images=2)
  with pytest.raises(ValueError, match="not in the GT"):
    ev.evaluate(gt, bbox + [dict(bbox[0], image_id=999)], "bbox", backend=backend)


def test_garbage_collector_state_restored(real_fixture):
  gt, bbox, _, _ = real_case(5, num_images=2)
  assert gc.isenabled()
  ev.evaluate(gt, bbox, "bbox")
  assert gc.isenabled()
  gc.disable()
  try:
    ev.evaluate(gt, bbox, "bbox")
    assert not gc.isenabled()
  finally:
    gc.enable()


def test_keypoint_extents_computed_in_blocks_equal_the_reference(real_fixture, monkeypatch):
  """The faster backend's keypoint loadRes works in blocks of results; blocks of 7 (many block
  boundaries, a partial last block) give pycocotools' numbers."""
  gt, _, _, kps = real_case(3, num_images=12, per_image=30, crowded=2)
  monkeypatch.setattr(ev, "_KEYPOINT_BLOCK", 7)
  assert len(kps) % 7 and len(kps) > 50
  ref = ev.evaluate(gt, kps, "keypoints", backend="pycocotools")
  fast = ev.evaluate(gt, kps, "keypoints", backend="faster")
  assert 0.05 < ref["AP"] < 0.95
  diffs = max_differences({"k": ref}, {"k": fast})
  assert all(d <= TOL for d in diffs.values()), diffs
