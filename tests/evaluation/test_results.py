"""Compact evaluation results: what is kept loses nothing the protocol reads, and the chunks
round-trip to the official result entries."""

import json
import os

import numpy as np
import pytest

from conftest import make_item, make_record
from data_pipeline import convert
from data_pipeline import deepfashion2 as df2
from data_pipeline.spec import DEEPFASHION2
from df2_jax import masks
from df2_jax.evaluation import coco, results


def _landmarks(cat, rng, box):
  n = df2.LANDMARK_COUNTS[cat]
  x1, y1, x2, y2 = box
  pts = np.stack([rng.uniform(x1, x2, n), rng.uniform(y1, y2, n), np.full(n, 2.0)], 1)
  pts[rng.random(n) < 0.3, 2] = 1.0  # some occluded
  return pts.astype(np.float32)


def _scene(seed=0):
  """Two 200x160 images: GT garments of categories 1 and 2 (image 1) and 1 (image 2);
  detections: 30 of category 1 and 6 of category 2 in image 1, 25 of category 1 in image 2,
  perturbed copies of the GT points with random scores (ties included)."""
  rng = np.random.default_rng(seed)
  gt_items = {1: [(1, (20, 30, 120, 140)), (2, (100, 20, 180, 100))], 2: [(1, (40, 40, 150, 150))]}
  records, dets = [], {}
  for image_id, items in gt_items.items():
    made = []
    for cat, box in items:
      made.append(make_item(cat, 1, box, _landmarks(cat, rng, box)))
    records.append(make_record(image_id, made, width=200, height=160))
    counts = {1: 30, 2: 6} if image_id == 1 else {1: 25}
    boxes, scores, classes, lms = [], [], [], []
    for cat, n in counts.items():
      item = next(m for m in made if m.category_id == cat)
      for _ in range(n):
        boxes.append(np.asarray(item.box) + rng.normal(0, 6, 4))
        scores.append(round(float(rng.random()), 1))  # coarse: many ties
        classes.append(cat)
        full = np.zeros((df2.NUM_LANDMARKS, 3), np.float32)
        full[df2.landmark_slice(cat), :2] = item.landmarks[:, :2] + rng.normal(0, 3, (
            len(item.landmarks), 2))
        lms.append(full)
    order = rng.permutation(len(scores))
    dets[image_id] = dict(boxes=np.float32(boxes)[order], scores=np.float32(scores)[order],
                          classes=np.int32(classes)[order], landmarks=np.float32(lms)[order])
  return records, dets


def test_keeping_20_landmark_results_per_image_and_category_gives_the_same_ap():
  records, dets = _scene()
  gt = convert.to_coco(records, DEEPFASHION2)
  every, kept = [], []
  for image_id, d in dets.items():
    n = len(d["scores"])
    _, _, all_kps = coco.detections_to_results(image_id, d["boxes"], d["scores"], d["classes"],
                                               np.ones(n, bool), None, d["landmarks"],
                                               spec=DEEPFASHION2)
    every += all_kps
    # image_results reads the model's continuous coordinates (pixel index + 0.5).
    continuous = d["landmarks"] + np.float32([0.5, 0.5, 0])
    res = results.image_results(image_id, d["boxes"], d["scores"], d["classes"],
                                np.ones(n, bool), (160, 200), (160, 200), None, continuous,
                                spec=DEEPFASHION2)
    kept += results.Results(**_arrays([res])).coco("keypoints", DEEPFASHION2)
  assert len(every) == 61 and len(kept) == 20 + 6 + 20
  metrics = lambda gt, res, backend: {k: v for k, v in coco.evaluate(
      gt, res, "keypoints", backend=backend).items() if k != "num_results"}
  for backend in ("pycocotools", "faster"):
    a, b = metrics(gt, every, backend), metrics(gt, kept, backend)
    assert 0.0 < a["AP"] < 1.0
    assert a == b, backend  # every stat and the per-category APs
    gt_visible = coco.visible_only_gt(gt)
    assert metrics(gt_visible, every, backend) == metrics(gt_visible, kept, backend)


def _arrays(image_results):
  """Results arrays of in-memory ImageResults (as ResultWriter + load would give)."""
  return dict(
      image_id=np.concatenate([np.full(len(r.scores), r.image_id) for r in image_results]),
      boxes=np.concatenate([r.boxes for r in image_results]),
      scores=np.concatenate([r.scores for r in image_results]),
      classes=np.concatenate([r.classes for r in image_results]),
      image_hw=np.concatenate([np.tile(r.image_hw, (len(r.scores), 1)) for r in image_results]),
      rle_offsets=np.zeros(1, np.int64), rle_bytes=np.zeros(0, np.uint8),
      keypoint_rows=np.concatenate([r.keypoint_rows + sum(len(q.scores) for q in
                                                          image_results[:i])
                                    for i, r in enumerate(image_results)]),
      keypoints=np.concatenate([r.keypoints for r in image_results]))


def test_keypoint_keep_is_top_20_per_category_with_stable_ties():
  scores = np.array([0.5] * 25 + [0.9, 0.1], np.float32)
  classes = np.array([1] * 25 + [2, 2])
  valid = np.ones(27, bool)
  valid[3] = False
  keep = results.keypoint_keep(scores, classes, valid)
  # Category 1: 24 valid ties at 0.5 -> the first 20 valid in order; category 2: both.
  assert keep[:25].sum() == 20 and not keep[3]
  np.testing.assert_array_equal(np.nonzero(keep[:25])[0], [0, 1, 2] + list(range(4, 21)))
  assert keep[25] and keep[26]


def test_chunks_round_trip_to_the_official_entries(tmp_path):
  """Canvas outputs -> image_results -> 3 chunks -> load: the bbox entries equal
  coco.detections_to_results', the RLEs equal masks.paste_masks_rle's, the keypoints equal the
  official 882-number entries of the kept rows (scaled to the original image, then half a
  pixel less: pixel indices); write_official_json writes the same."""
  rng = np.random.default_rng(1)
  writer = results.ResultWriter(str(tmp_path), images_per_chunk=2)
  expected = {"bbox": [], "segm": [], "keypoints": []}
  for image_id in (7, 8, 9, 10, 11):
    d = 12
    canvas = rng.uniform(0, 100, (d, 2))
    boxes = np.concatenate([canvas, canvas + rng.uniform(5, 28, (d, 2))], 1).astype(np.float32)
    scores = rng.random(d).astype(np.float32)
    classes = rng.integers(1, 14, d).astype(np.int32)
    valid = rng.random(d) < 0.8
    soft = rng.random((d, 28, 28)).astype(np.float32)
    lms = rng.uniform(0, 128, (d, df2.NUM_LANDMARKS, 3)).astype(np.float32)
    hw, orig = np.float32([128, 96]), np.float32([300, 225])
    res = results.image_results(image_id, boxes, scores, classes, valid, hw, orig, soft, lms,
                                spec=DEEPFASHION2)
    writer.add(res)
    scale = np.float32([225 / 96, 300 / 128])
    full_boxes = boxes * np.tile(scale, 2)
    full_lms = lms.copy()
    full_lms[..., :2] = full_lms[..., :2] * scale - 0.5
    b, _, k = coco.detections_to_results(image_id, full_boxes, scores, classes, valid, None,
                                         full_lms, spec=DEEPFASHION2)
    expected["bbox"] += b
    keep = results.keypoint_keep(scores[valid], classes[valid], np.ones(valid.sum(), bool))
    expected["keypoints"] += [k[j] for j in np.nonzero(keep)[0]]
    rles = masks.paste_masks_rle(soft[valid], full_boxes[valid], (300, 225))
    expected["segm"] += [dict(image_id=image_id, category_id=int(c), segmentation=r,
                              score=float(s))
                         for c, s, r in zip(classes[valid], scores[valid], rles)]
  writer.close()
  assert writer.num_chunks == 3 and writer.num_images == 5
  loaded = results.load(str(tmp_path))
  got = {kind: loaded.coco(kind, DEEPFASHION2) for kind in expected}
  assert [len(v) for v in got.values()] == [len(v) for v in expected.values()]
  for a, b in zip(got["bbox"], expected["bbox"]):
    assert a["image_id"] == b["image_id"] and a["category_id"] == b["category_id"]
    np.testing.assert_allclose(a["bbox"], b["bbox"], rtol=1e-6, atol=1e-4)
    assert a["score"] == pytest.approx(b["score"], abs=1e-7)
  for a, b in zip(got["segm"], expected["segm"]):
    assert a["segmentation"] == b["segmentation"] and a["category_id"] == b["category_id"]
  for a, b in zip(got["keypoints"], expected["keypoints"]):
    assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
    np.testing.assert_allclose(a["keypoints"], b["keypoints"], rtol=1e-6, atol=1e-3)
  paths = results.write_official_json(str(tmp_path), DEEPFASHION2)
  with open(paths[1]) as f:
    segm = json.load(f)
  assert [s["segmentation"] for s in segm] == [s["segmentation"] for s in expected["segm"]]
  with open(paths[2]) as f:
    kps = json.load(f)
  assert len(kps) == len(expected["keypoints"]) and len(kps[0]["keypoints"]) == 882
  # A new writer in the same directory replaces the old chunks.
  results.ResultWriter(str(tmp_path)).close()
  assert len(results.load(str(tmp_path))) == 0


def test_shard_writers_load_in_file_order(tmp_path):
  """Several processes' writers (shard = process index, opened and filled in any order) load
  as one evaluation in shard order, keypoint rows renumbered; a one-writer evaluation replaces
  them all."""
  def image(image_id, n):
    boxes = np.tile(np.float32([[1, 2, 30, 40]]), (n, 1))
    return results.image_results(
        image_id, boxes, np.linspace(0.9, 0.5, n).astype(np.float32), np.full(n, 3, np.int32),
        np.ones(n, bool), np.float32([64, 64]), np.float32([64, 64]), None,
        np.zeros((n, df2.NUM_LANDMARKS, 3), np.float32), spec=DEEPFASHION2)
  second = results.ResultWriter(str(tmp_path), images_per_chunk=1, shard=1)
  first = results.ResultWriter(str(tmp_path), images_per_chunk=1, shard=0)
  for image_id, n in ((3, 1), (4, 2)):
    second.add(image(image_id, n))
  second.close()
  for image_id, n in ((1, 3), (2, 2)):
    first.add(image(image_id, n))
  first.close()
  assert [os.path.basename(p) for p in results.chunk_paths(str(tmp_path))] == [
      "detections-00000-00000.npz", "detections-00000-00001.npz",
      "detections-00001-00000.npz", "detections-00001-00001.npz"]
  loaded = results.load(str(tmp_path))
  assert loaded.image_id.tolist() == [1, 1, 1, 2, 2, 3, 4, 4]
  assert loaded.keypoint_rows.tolist() == list(range(8))
  results.ResultWriter(str(tmp_path)).close()
  assert len(results.load(str(tmp_path))) == 0 and len(results.chunk_paths(str(tmp_path))) == 1


def _one_image(image_id: int, n: int = 2) -> results.ImageResults:
  boxes = np.tile(np.float32([[1, 2, 30, 40]]), (n, 1))
  return results.image_results(
      image_id, boxes, np.linspace(0.9, 0.5, n).astype(np.float32), np.full(n, 3, np.int32),
      np.ones(n, bool), np.float32([64, 64]), np.float32([64, 64]), None,
      np.zeros((n, df2.NUM_LANDMARKS, 3), np.float32), spec=DEEPFASHION2)


def _torn_savez(file, **arrays):
  """Stands in for ``np.savez_compressed`` cut short (a kill or a full disk) after some bytes."""
  file.write(b"PK\x03\x04 torn")
  raise OSError(28, "No space left on device")


def test_a_chunk_cut_short_leaves_no_file(tmp_path, monkeypatch):
  """Chunks are written atomically: a write cut short leaves the chunks written before it,
  whole, and neither a torn chunk nor a temporary file."""
  writer = results.ResultWriter(str(tmp_path), images_per_chunk=1)
  writer.add(_one_image(1))
  before = (tmp_path / "detections-00000.npz").read_bytes()
  monkeypatch.setattr(np, "savez_compressed", _torn_savez)
  with pytest.raises(OSError, match="No space"):
    writer.add(_one_image(2))
  assert os.listdir(tmp_path) == ["detections-00000.npz"]
  assert (tmp_path / "detections-00000.npz").read_bytes() == before
  assert results.load(str(tmp_path)).image_id.tolist() == [1, 1]


def test_official_json_cut_short_keeps_the_previous_file(tmp_path, monkeypatch):
  """The DeepFashion2 result files are written atomically: a write cut short leaves the
  previous file byte for byte (or none) and no temporary file."""
  writer = results.ResultWriter(str(tmp_path))
  writer.add(_one_image(1))
  writer.close()
  paths = results.write_official_json(str(tmp_path), DEEPFASHION2)
  before = {p: open(p, "rb").read() for p in paths}
  assert json.loads(before[paths[0]])  # two boxes

  def torn(entries):
    yield "["
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(results, "iter_json_array", torn)
  with pytest.raises(OSError, match="No space"):
    results.write_official_json(str(tmp_path), DEEPFASHION2)
  assert {p: open(p, "rb").read() for p in paths} == before
  assert sorted(os.listdir(tmp_path)) == sorted(
      ["detections-00000.npz", "bbox_results.json", "segm_results.json",
       "keypoints_results.json"])
