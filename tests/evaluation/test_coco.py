"""Tests for df2_jax.evaluation.coco: COCOeval wiring, visible-only landmarks, result formats."""

import copy
import json

import numpy as np
from pycocotools import coco as coco_api
from pycocotools import mask as mask_utils
import pytest

from conftest import make_item, make_record
from data_pipeline import convert
from data_pipeline import deepfashion2 as df2
from data_pipeline.spec import DEEPFASHION2
from df2_jax.evaluation import coco as ev

THRESHOLDS = np.linspace(0.5, 0.95, 10)

# pycocotools' mask.decode (used by annToMask) trips a NumPy 2 copy-keyword deprecation.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _landmarks(category_id, box, visibility=2):
  """Landmarks spread over the box interior, [n, 3], v = ``visibility`` (scalar or [n])."""
  n = df2.LANDMARK_COUNTS[category_id]
  x1, y1, x2, y2 = box
  t = (np.arange(n) + 1) / (n + 1)
  lm = np.stack([x1 + t * (x2 - x1), y1 + (1 - t) * (y2 - y1), np.zeros(n)], axis=1)
  lm[:, 2] = visibility
  return lm.astype(np.float32)


def _gt(records):
  return convert.to_coco(records, DEEPFASHION2)


def _simple_gt():
  """Two images: image 1 holds a shorts (cat 7) and a skirt (cat 9), image 2 a long top."""
  items1 = [
      make_item(7, box=(10, 10, 130, 140), landmarks=_landmarks(7, (10, 10, 130, 140)),
                polygons=[np.array([[10, 10], [130, 10], [130, 140], [70, 120], [10, 140]],
                                   np.float32)]),
      make_item(9, box=(60, 100, 190, 230), landmarks=_landmarks(9, (60, 100, 190, 230))),
  ]
  box3 = (20, 30, 180, 220)
  items2 = [make_item(2, box=box3, landmarks=_landmarks(2, box3),
                      polygons=[np.array([[20, 30], [180, 30], [100, 220]], np.float32),
                                np.array([[20, 200], [60, 200], [60, 220], [20, 220]],
                                         np.float32)])]
  return _gt([make_record(1, items1, width=200, height=240),
              make_record(2, items2, width=200, height=240)])


def _perfect_results(gt):
  """Results built from the GT itself (score 1) through detections_to_results."""
  api = coco_api.COCO()
  api.dataset = copy.deepcopy(gt)
  api.createIndex()
  out = ([], [], [])
  for image in gt["images"]:
    anns = [a for a in gt["annotations"] if a["image_id"] == image["id"]]
    boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                       a["bbox"][1] + a["bbox"][3]] for a in anns])
    masks = np.stack([api.annToMask(a).astype(bool) for a in anns])
    lms = np.stack([np.array(a["keypoints"], np.float64).reshape(-1, 3) for a in anns])
    res = ev.detections_to_results(
        image["id"], boxes, np.ones(len(anns)), np.array([a["category_id"] for a in anns]),
        np.ones(len(anns), bool), masks, lms, spec=DEEPFASHION2)
    for acc, r in zip(out, res):
      acc.extend(r)
  return out


def test_perfect_predictions_score_one():
  gt = _simple_gt()
  gt_before = copy.deepcopy(gt)
  bbox_res, segm_res, kp_res = _perfect_results(gt)
  results_before = copy.deepcopy((bbox_res, segm_res, kp_res))
  assert len(bbox_res) == len(segm_res) == len(kp_res) == 3
  for iou_type, res in (("bbox", bbox_res), ("segm", segm_res), ("keypoints", kp_res)):
    m = ev.evaluate(gt, res, iou_type)
    assert m["AP"] == pytest.approx(1.0), iou_type
    assert m["AP50"] == pytest.approx(1.0)
    assert m["AP75"] == pytest.approx(1.0)
    assert m["num_results"] == 3
    pc = m["per_category"]
    assert set(pc) == set(df2.COCO_NAMES.values())
    for cat in (2, 7, 9):
      assert pc[df2.COCO_NAMES[cat]] == pytest.approx(1.0)
    assert pc[df2.COCO_NAMES[1]] == -1.0
  m = ev.evaluate(gt, kp_res, "keypoints", visible_only=True)
  assert m["AP"] == pytest.approx(1.0)
  assert gt == gt_before
  assert (bbox_res, segm_res, kp_res) == results_before


def test_stat_names_per_type():
  gt = _simple_gt()
  bbox_res, _, kp_res = _perfect_results(gt)
  m = ev.evaluate(gt, bbox_res, "bbox", per_category=False)
  assert "per_category" not in m
  assert {"AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"} <= set(m)
  m = ev.evaluate(gt, kp_res, "keypoints")
  assert {"AP", "AP50", "AP75", "APm", "APl", "AR"} <= set(m)
  assert "APs" not in m


def test_one_of_two_boxes_found():
  box_a, box_b = (0, 0, 100, 100), (100, 100, 200, 200)
  gt = _gt([make_record(1, [make_item(1, box=box_a), make_item(1, box=box_b)],
                        width=300, height=300)])
  res = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 1.0}]
  m = ev.evaluate(gt, res, "bbox")
  # Precision 1 at recall thresholds 0.00 .. 0.50 (51 of 101), 0 beyond (recall caps at 0.5).
  assert m["AP"] == pytest.approx(51 / 101, abs=1e-12)
  assert m["AP50"] == pytest.approx(51 / 101, abs=1e-12)
  assert m["AR100"] == pytest.approx(0.5)


def test_iou_062_counts_at_50_not_75():
  gt = _gt([make_record(1, [make_item(1, box=(0, 0, 100, 100))], width=200, height=200)])
  # IoU = 100 * 62 / (100 * 100) = 0.62: matched at thresholds .50, .55, .60 only.
  res = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 62], "score": 0.9}]
  m = ev.evaluate(gt, res, "bbox")
  assert m["AP50"] == pytest.approx(1.0)
  assert m["AP75"] == pytest.approx(0.0)
  assert m["AP"] == pytest.approx(0.3)


def test_wrong_category_is_a_false_positive():
  gt = _gt([make_record(1, [make_item(1, box=(0, 0, 100, 100))], width=200, height=200)])
  res = [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 100, 100], "score": 0.9}]
  m = ev.evaluate(gt, res, "bbox")
  assert m["AP"] == pytest.approx(0.0)
  assert m["per_category"][df2.COCO_NAMES[2]] == -1.0  # no GT of category 2


def test_per_category_ap_and_mean():
  box_a, box_b = (0, 0, 100, 100), (100, 100, 200, 200)
  gt = _gt([make_record(1, [make_item(1, box=box_a), make_item(8, box=box_b)],
                        width=300, height=300)])
  res = [{"image_id": 1, "category_id": 1, "bbox": [0, 0, 100, 100], "score": 1.0}]
  m = ev.evaluate(gt, res, "bbox")
  assert m["per_category"][df2.COCO_NAMES[1]] == pytest.approx(1.0)
  assert m["per_category"][df2.COCO_NAMES[8]] == pytest.approx(0.0)
  assert m["AP"] == pytest.approx(0.5)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "keypoints"])
def test_empty_results_give_zero(iou_type):
  gt = _simple_gt()
  m = ev.evaluate(gt, [], iou_type)
  assert m["AP"] == 0.0
  assert m["num_results"] == 0
  assert m["per_category"][df2.COCO_NAMES[7]] == 0.0
  if iou_type == "keypoints":
    assert ev.evaluate(gt, [], iou_type, visible_only=True)["AP"] == 0.0


def _expected_oks(category_id, shift, area):
  sigmas = df2.OKS_SIGMAS[df2.landmark_slice(category_id)]
  e = (shift[0] ** 2 + shift[1] ** 2) / (2 * sigmas) ** 2 / (area + np.spacing(1)) / 2
  return float(np.mean(np.exp(-e)))


def test_shifted_landmarks_oks():
  box = (0, 0, 100, 100)
  lm = _landmarks(7, box)
  gt = _gt([make_record(1, [make_item(7, box=box, landmarks=lm)], width=200, height=200)])
  shift = (4.2, 5.6)  # 7 px: OKS about 0.67
  oks = _expected_oks(7, shift, 100 * 100)
  assert 0.5 < oks < 0.75
  pred = np.zeros((1, df2.NUM_LANDMARKS, 3))
  pred[0, df2.landmark_slice(7), :2] = lm[:, :2] + np.array(shift)
  _, _, kp = ev.detections_to_results(1, np.array([box]), [0.8], [7], [True], None, pred,
                                      spec=DEEPFASHION2)
  m = ev.evaluate(gt, kp, "keypoints")
  assert m["AP50"] == pytest.approx(1.0)
  assert m["AP75"] == pytest.approx(0.0)
  assert m["AP"] == pytest.approx(np.mean(THRESHOLDS <= oks))
  # The right landmarks in another category's slice do not count: all GT points unmatched.
  pred_wrong = np.zeros((1, df2.NUM_LANDMARKS, 3))
  pred_wrong[0, df2.landmark_slice(8).start:df2.landmark_slice(8).start + 10, :2] = lm[:, :2]
  _, _, kp = ev.detections_to_results(1, np.array([box]), [0.8], [8], [True], None, pred_wrong,
                                      spec=DEEPFASHION2)
  assert ev.evaluate(gt, kp, "keypoints")["AP"] == pytest.approx(0.0)


def test_visible_only_drops_occluded_landmarks():
  box = (0, 0, 100, 100)
  vis = np.array([2, 2, 2, 2, 1, 1, 1, 1, 1, 1])
  lm = _landmarks(7, box, visibility=vis)
  gt = _gt([make_record(1, [make_item(7, box=box, landmarks=lm)], width=200, height=200)])
  # Exact on the 4 visible points, 1000 px off on the 6 occluded ones.
  pred = np.zeros((1, df2.NUM_LANDMARKS, 3))
  local = lm[:, :2].astype(np.float64)
  local[vis == 1] += 1000.0
  pred[0, df2.landmark_slice(7), :2] = local
  _, _, kp = ev.detections_to_results(1, np.array([box]), [0.9], [7], None, None, pred,
                                      spec=DEEPFASHION2)
  visible = ev.evaluate(gt, kp, "keypoints", visible_only=True)
  vis_occ = ev.evaluate(gt, kp, "keypoints")
  assert visible["AP"] == pytest.approx(1.0)  # OKS over the 4 visible points = 1
  assert vis_occ["AP"] == pytest.approx(0.0)  # OKS = 4 / 10 < 0.5
  assert visible["AP"] > vis_occ["AP"]


def test_visible_only_ignores_items_with_only_occluded_landmarks():
  box = (0, 0, 100, 100)
  gt = _gt([make_record(1, [make_item(7, box=box, landmarks=_landmarks(7, box, 1))],
                        width=200, height=200)])
  gt_before = copy.deepcopy(gt)
  vis_gt = ev.visible_only_gt(gt)
  ann = vis_gt["annotations"][0]
  assert ann["num_keypoints"] == 0
  assert not any(ann["keypoints"])
  assert gt == gt_before
  assert gt["annotations"][0]["num_keypoints"] == 10
  m_vis = ev.evaluate(gt, [], "keypoints", visible_only=True)
  assert m_vis["AP"] == -1.0  # no GT left
  assert m_vis["per_category"][df2.COCO_NAMES[7]] == -1.0
  assert ev.evaluate(gt, [], "keypoints")["AP"] == 0.0


def test_visible_only_rejected_for_boxes():
  with pytest.raises(ValueError):
    ev.evaluate(_simple_gt(), [], "bbox", visible_only=True)
  with pytest.raises(ValueError):
    ev.evaluate(_simple_gt(), [], "boxes")


def test_detections_to_results_formats():
  boxes = np.array([[10, 20, 50, 80], [0, 0, 5, 5], [1, 2, 3, 4]], np.float32)
  masks = np.zeros((3, 30, 40), bool)
  masks[0, 5:10, 6:12] = True
  lms = np.random.default_rng(0).uniform(0, 30, (3, df2.NUM_LANDMARKS, 3))
  bbox, segm, kp = ev.detections_to_results(
      7, boxes, np.array([0.9, 0.5, 0.1]), np.array([3, 1, 5]), np.array([True, False, True]),
      masks, lms, spec=DEEPFASHION2)
  assert [r["category_id"] for r in bbox] == [3, 5]
  assert bbox[0] == {"image_id": 7, "category_id": 3, "bbox": [10.0, 20.0, 40.0, 60.0],
                     "score": pytest.approx(0.9)}
  assert isinstance(segm[0]["segmentation"]["counts"], str)
  assert segm[0]["segmentation"]["size"] == [30, 40]
  rle = dict(segm[0]["segmentation"], counts=segm[0]["segmentation"]["counts"].encode())
  np.testing.assert_array_equal(mask_utils.decode(rle).astype(bool), masks[0])
  json.dumps([bbox, segm, kp])  # JSON-serialisable
  k = np.array(kp[0]["keypoints"]).reshape(-1, 3)
  assert k.shape == (df2.NUM_LANDMARKS, 3)
  sl = df2.landmark_slice(3)
  np.testing.assert_allclose(k[sl, :2], lms[0, sl, :2])
  assert (k[sl, 2] == 2).all()
  inside = np.zeros(df2.NUM_LANDMARKS, bool)
  inside[sl] = True
  assert not k[~inside].any()
  assert kp[1]["score"] == pytest.approx(0.1)
  b, s, p = ev.detections_to_results(1, boxes, [1, 1, 1], [1, 1, 1], spec=DEEPFASHION2)
  assert len(b) == 3 and s == [] and p == []


def test_evaluate_all_and_format_table():
  gt = _simple_gt()
  bbox_res, segm_res, kp_res = _perfect_results(gt)
  metrics = ev.evaluate_all(gt, bbox_res, segm_res, kp_res)
  assert set(metrics) == {"bbox", "segm", "keypoints_visible", "keypoints"}
  table = ev.format_table(metrics)
  for label in ("bbox", "segm", "landmarks visible", "landmarks vis+occ", "AP50", "AP75",
                "per-category AP", "shorts", "skirt", "long_sleeved_shirt"):
    assert label in table
  assert "1.000" in table
  short_line = [l for l in table.splitlines() if l.startswith("short_sleeved_shirt")][0]
  assert "-" in short_line  # undefined (no GT)


def test_cli(tmp_path, capsys):
  gt = _simple_gt()
  bbox_res, _, kp_res = _perfect_results(gt)
  (tmp_path / "gt.json").write_text(json.dumps(gt))
  (tmp_path / "bbox.json").write_text(json.dumps(bbox_res))
  (tmp_path / "kp.json").write_text(json.dumps(kp_res))
  assert ev.main(["--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "bbox.json"),
                  "--type", "bbox"]) == 0
  out = capsys.readouterr().out
  assert "AP50" in out and "1.000" in out and "Average Precision" not in out
  assert ev.main(["--gt", str(tmp_path / "gt.json"), "--results", str(tmp_path / "kp.json"),
                  "--type", "keypoints", "--visible_only"]) == 0
  assert "landmarks visible" in capsys.readouterr().out


def test_another_taxonomy_needs_its_sigmas():
  """Keypoints of a ground truth that is not DeepFashion2's are scored with the given sigmas
  (the run's spec); without them the evaluation refuses in one line."""
  gt = {"images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 30, "name": "top", "keypoints": ["a", "b"]}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 30, "bbox": [10, 10, 50, 50],
                         "area": 2500, "iscrowd": 0, "num_keypoints": 2,
                         "keypoints": [20, 20, 2, 40, 40, 2]}]}
  res = [{"image_id": 1, "category_id": 30, "keypoints": [20, 20, 2, 40, 40, 2], "score": 0.9}]
  with pytest.raises(ev.MissingSigmas, match="--workdir"):
    ev.evaluate(gt, res, "keypoints")
  assert ev.evaluate(gt, res, "keypoints", sigmas=np.array([0.05, 0.05]))["AP"] == 1.0
  # Moved 5 px in x and y on a 2500 px^2 item: OKS = exp(-50 / (2 * 2500 * (2 * s)^2)) per
  # point, 0.37 with s = 0.05 (below every threshold), 0.99 with s = 0.5.
  moved = [dict(res[0], keypoints=[25, 25, 2, 45, 45, 2])]
  assert ev.evaluate(gt, moved, "keypoints", sigmas=np.array([0.05, 0.05]))["AP"] == 0.0
  assert ev.evaluate(gt, moved, "keypoints", sigmas=np.array([0.5, 0.5]))["AP50"] == 1.0
