"""Tests for df2_jax.evaluation.retrieval_protocol: the official top-k protocol, one rule per test."""

import json

import numpy as np
import pytest

from df2_jax.evaluation import retrieval_protocol as rv

# Shop image 100 holds the correct item of (pair 1, style 1); shop image 200 an item of another
# pair; shop image 300 the correct item of (pair 2, style 1).
GALLERY = [
    {"gallery_image_id": 100, "style": 1, "pair_id": 1, "bbox": [0, 0, 10, 10]},
    {"gallery_image_id": 100, "style": 2, "pair_id": 1, "bbox": [20, 20, 40, 40]},
    {"gallery_image_id": 200, "style": 1, "pair_id": 9, "bbox": [0, 0, 10, 10]},
    {"gallery_image_id": 300, "style": 1, "pair_id": 2, "bbox": [50, 50, 90, 90]},
]
HIT = (100, [0, 0, 10, 10])  # a retrieved item that hits (pair 1, style 1)
MISS = (200, [0, 0, 10, 10])  # right box, wrong image


def _query(image_id=1, style=1, cls=1, pair_id=1, bbox=(0, 0, 50, 50)):
  return {"query_image_id": image_id, "style": style, "cls": cls, "pair_id": pair_id,
          "bbox": list(bbox)}


def _entry(image_id=1, bbox=(0, 0, 50, 50), cls=1, score=0.9, retrieved=None):
  retrieved = retrieved if retrieved is not None else [HIT] + [MISS] * 19
  return {"query_image_id": image_id, "query_bbox": list(bbox), "query_cls": cls,
          "query_score": score, "gallery_image_id": [r[0] for r in retrieved],
          "gallery_bbox": [list(r[1]) for r in retrieved]}


def _top(m):
  return [m[f"top{k}"] for k in rv.DEFAULT_KS]


def test_box_iou_convention():
  # area = (x2 - x1) * (y2 - y1), no +1.
  iou = rv.box_iou(np.array([[0, 0, 10, 10]]), np.array([[0, 0, 10, 5], [5, 0, 15, 10],
                                                            [20, 20, 30, 30]]))
  np.testing.assert_allclose(iou, [[0.5, 50 / 150, 0.0]])


def test_perfect_submission():
  queries = [_query(1, 1, 1, 1, (0, 0, 50, 50)), _query(2, 1, 7, 2, (10, 10, 60, 90))]
  sub = [_entry(1, (0, 0, 50, 50), 1),
         _entry(2, (10, 10, 60, 90), 7, retrieved=[(300, [50, 50, 90, 90])] * 20)]
  m = rv.evaluate_retrieval(sub, queries, GALLERY)
  assert _top(m) == [1.0] * 5
  assert m["num_queries"] == 2


def test_assignment_has_no_minimum_iou():
  # The only detection overlaps the GT item with IoU 0.1 (5 x 50 of a 50 x 50 box): still its.
  queries = [_query(bbox=(0, 0, 50, 50))]
  det_box = (0, 0, 5, 50)
  assert rv.box_iou(np.array([det_box]), np.array([[0, 0, 50, 50]]))[0, 0] == pytest.approx(0.1)
  m = rv.evaluate_retrieval([_entry(bbox=det_box)], queries, GALLERY)
  assert m["top1"] == 1.0


def test_assignment_is_argmax_over_items():
  # Two items in the image; the detection overlaps item B more, so it cannot serve item A.
  queries = [_query(style=1, bbox=(0, 0, 50, 50)), _query(style=2, bbox=(40, 0, 100, 50))]
  sub = [_entry(bbox=(30, 0, 100, 50))]  # IoU A 20*50/(2500+3500-1000)=0.2, B 3000/3500
  m = rv.evaluate_retrieval(sub, queries, GALLERY)
  assert m["num_queries"] == 2
  # Item B (style 2) got the detection; its retrieved list has no (pair 1, style 2) hit.
  assert m["top20"] == 0.0
  sub_b = [_entry(bbox=(30, 0, 100, 50), retrieved=[(100, [20, 20, 40, 40])] * 20)]
  assert rv.evaluate_retrieval(sub_b, queries, GALLERY)["top1"] == 0.5


def test_detection_overlapping_nothing_goes_to_first_item():
  # IoU 0 with both items: np.argmax picks the first GT item of the image (official behaviour).
  queries = [_query(style=1, bbox=(0, 0, 50, 50)), _query(style=2, bbox=(60, 0, 100, 50))]
  sub = [_entry(bbox=(200, 200, 250, 250))]
  m = rv.evaluate_retrieval(sub, queries, GALLERY)
  assert m["top1"] == 0.5
  np.testing.assert_array_equal(rv.first_hit_ranks(sub, queries, GALLERY), [0, rv.NO_HIT])


def test_wrong_class_does_not_count():
  queries = [_query(cls=1)]
  m = rv.evaluate_retrieval([_entry(cls=2)], queries, GALLERY)
  assert _top(m) == [0.0] * 5
  # A right-class detection beside it (lower score) is used instead.
  m = rv.evaluate_retrieval([_entry(cls=2, score=0.99), _entry(cls=1, score=0.1)], queries,
                            GALLERY)
  assert _top(m) == [1.0] * 5


def test_highest_score_detection_is_chosen():
  queries = [_query()]
  good = _entry(score=0.8)  # hits at rank 1
  bad = _entry(score=0.3, retrieved=[MISS] * 20)
  assert rv.evaluate_retrieval([bad, good], queries, GALLERY)["top20"] == 1.0
  assert rv.evaluate_retrieval([_entry(score=0.3), _entry(score=0.8, retrieved=[MISS] * 20)],
                               queries, GALLERY)["top20"] == 0.0


def test_gallery_hit_needs_iou_half():
  queries = [_query()]
  # Correct item box [0, 0, 10, 10] (area 100): [0, 0, 10, 5] has IoU 0.5, [0, 0, 10, 4.9] 0.49.
  hit = _entry(retrieved=[(100, [0, 0, 10, 5])] * 20)
  miss = _entry(retrieved=[(100, [0, 0, 10, 4.9])] * 20)
  assert rv.evaluate_retrieval([hit], queries, GALLERY)["top1"] == 1.0
  assert rv.evaluate_retrieval([miss], queries, GALLERY)["top20"] == 0.0


def test_gallery_hit_needs_same_pair_and_style():
  queries = [_query(style=1)]
  # Image 100 holds the (pair 1, style 2) item at [20, 20, 40, 40]: right image, wrong style.
  wrong_style = _entry(retrieved=[(100, [20, 20, 40, 40])] * 20)
  assert rv.evaluate_retrieval([wrong_style], queries, GALLERY)["top20"] == 0.0


def test_style_zero_items_are_not_queries():
  queries = [_query(style=1, bbox=(0, 0, 50, 50)), _query(style=0, bbox=(60, 60, 100, 100))]
  sub = [_entry(bbox=(0, 0, 50, 50)), _entry(bbox=(60, 60, 100, 100))]
  m = rv.evaluate_retrieval(sub, queries, GALLERY)
  assert m["num_queries"] == 1
  assert m["top1"] == 1.0


def test_undetected_items_are_misses():
  queries = [_query(1), _query(2, pair_id=2)]
  m = rv.evaluate_retrieval([_entry(1)], queries, GALLERY)
  assert m["num_queries"] == 2
  assert _top(m) == [0.5] * 5
  # Detections in an image without GT query items are ignored.
  m = rv.evaluate_retrieval([_entry(1), _entry(77)], queries, GALLERY)
  assert m["top1"] == 0.5


def test_hit_at_rank_three():
  queries = [_query()]
  retrieved = [MISS, MISS, HIT] + [MISS] * 17
  m = rv.evaluate_retrieval([_entry(retrieved=retrieved)], queries, GALLERY)
  assert _top(m) == [0.0, 1.0, 1.0, 1.0, 1.0]
  np.testing.assert_array_equal(
      rv.first_hit_ranks([_entry(retrieved=retrieved)], queries, GALLERY), [2])


def test_hit_at_rank_twelve_and_short_lists():
  queries = [_query()]
  retrieved = [MISS] * 11 + [HIT] + [MISS] * 8
  m = rv.evaluate_retrieval([_entry(retrieved=retrieved)], queries, GALLERY)
  assert _top(m) == [0.0, 0.0, 0.0, 1.0, 1.0]
  m = rv.evaluate_retrieval([_entry(retrieved=[MISS, HIT])], queries, GALLERY)
  assert _top(m) == [0.0, 1.0, 1.0, 1.0, 1.0]


def test_no_correct_gallery_item_is_a_miss():
  queries = [_query(pair_id=5)]  # no gallery item of pair 5
  assert rv.evaluate_retrieval([_entry()], queries, GALLERY)["top20"] == 0.0


def test_no_queries():
  m = rv.evaluate_retrieval([], [_query(style=0)], GALLERY)
  assert m["num_queries"] == 0 and m["top1"] == 0.0


def _dets(image_ids, embeddings, boxes=None):
  boxes = boxes if boxes is not None else [[i, i, i + 10, i + 10] for i in range(len(image_ids))]
  return [{"image_id": int(i), "bbox": list(b), "cls": 1, "score": 0.5,
           "embedding": np.asarray(e, np.float32)}
          for i, e, b in zip(image_ids, embeddings, boxes)]


def _dot(q, g):
  return q @ g.T


def test_build_submission_ranks_by_score_fn():
  rng = np.random.default_rng(0)
  q_emb = rng.normal(size=(7, 8))
  g_emb = rng.normal(size=(45, 8))
  queries = _dets(range(1, 8), q_emb)
  gallery = _dets(range(100, 145), g_emb)
  calls = []

  def score_fn(q, g):
    calls.append(q.shape)
    return q @ g.T

  sub = rv.build_submission(queries, gallery, score_fn, k=20)
  assert calls == [(7, 8)]  # one matrix call
  assert len(sub) == 7
  scores = q_emb.astype(np.float32) @ g_emb.astype(np.float32).T
  for i, entry in enumerate(sub):
    assert entry["query_image_id"] == i + 1
    assert entry["query_cls"] == 1 and entry["query_score"] == 0.5
    assert len(entry["gallery_image_id"]) == 20 and len(entry["gallery_bbox"]) == 20
    expected = np.argsort(-scores[i], kind="stable")[:20]
    assert entry["gallery_image_id"] == [100 + int(j) for j in expected]
    assert entry["gallery_bbox"][0] == [float(expected[0])] * 2 + [float(expected[0] + 10)] * 2
  json.dumps(sub)
  # Chunking gives the same answer.
  assert rv.build_submission(queries, gallery, _dot, k=20, chunk_size=3) == sub


def test_build_submission_ties_keep_gallery_order():
  queries = _dets([1], [[1.0]])
  gallery = _dets(range(100, 130), [[1.0]] * 10 + [[2.0]] * 5 + [[1.0]] * 15)
  sub = rv.build_submission(queries, gallery, _dot, k=20)
  ids = sub[0]["gallery_image_id"]
  assert ids[:5] == list(range(110, 115))
  assert ids[5:] == list(range(100, 110)) + list(range(115, 120))


def test_build_submission_nan_scores_rank_last():
  queries = _dets([1], [[1.0]])
  gallery = _dets([100, 101, 102], [[np.nan], [1.0], [2.0]])
  sub = rv.build_submission(queries, gallery, _dot, k=2)
  assert sub[0]["gallery_image_id"] == [102, 101]


def test_build_submission_small_gallery_pads_with_last():
  queries = _dets([1, 2], [[1.0], [-1.0]])
  gallery = _dets([100, 101, 102], [[1.0], [3.0], [2.0]])
  sub = rv.build_submission(queries, gallery, _dot, k=20)
  assert sub[0]["gallery_image_id"] == [101, 102, 100] + [100] * 17
  assert sub[1]["gallery_image_id"] == [100, 102, 101] + [101] * 17
  assert len(sub[0]["gallery_bbox"]) == 20
  empty = rv.build_submission(queries, [], _dot, k=20)
  assert empty[0]["gallery_image_id"] == [] and empty[0]["gallery_bbox"] == []
  assert rv.build_submission([], gallery, _dot) == []


def test_build_submission_scores_end_to_end():
  # Query in user image 1 (pair 1, style 1); its embedding matches the correct shop item.
  queries = _dets([1], [[0.0, 1.0]], boxes=[[0, 0, 50, 50]])
  gallery = _dets([200, 100, 300], [[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]],
                  boxes=[[0, 0, 10, 10], [0, 0, 10, 10], [50, 50, 90, 90]])
  sub = rv.build_submission(queries, gallery, _dot, k=20)
  assert sub[0]["gallery_image_id"][:3] == [100, 300, 200]
  assert _top(rv.evaluate_retrieval(sub, [_query()], GALLERY)) == [1.0] * 5


def test_cli(tmp_path, capsys):
  (tmp_path / "r.json").write_text(json.dumps([_entry(retrieved=[MISS, MISS, HIT] + [MISS] * 17)]))
  (tmp_path / "q.json").write_text(json.dumps([_query()]))
  (tmp_path / "g.json").write_text(json.dumps(GALLERY))
  assert rv.main(["--results", str(tmp_path / "r.json"), "--query_gt", str(tmp_path / "q.json"),
                  "--gallery_gt", str(tmp_path / "g.json")]) == 0
  out = capsys.readouterr().out
  assert "top-1: 0.0000" in out and "top-5: 1.0000" in out and "top-20: 1.0000" in out


def test_dedupe_gallery_keeps_the_best_of_overlapping_boxes_per_image():
  dets = [
      dict(image_id=1, bbox=[0, 0, 10, 10], score=0.5, cls=1),
      dict(image_id=1, bbox=[1, 0, 11, 10], score=0.9, cls=2),   # IoU 0.82 with the first
      dict(image_id=1, bbox=[20, 20, 30, 30], score=0.1, cls=3),  # apart
      dict(image_id=2, bbox=[0, 0, 10, 10], score=0.2, cls=1),    # same box, other image
      dict(image_id=1, bbox=[5, 0, 15, 10], score=0.3, cls=4),    # IoU 0.43 with the best
  ]
  kept = rv.dedupe_gallery(dets, 0.5)
  assert [d["cls"] for d in kept] == [2, 3, 1, 4]  # input order, the 0.5 box dropped
  assert [d["image_id"] for d in kept] == [1, 1, 2, 1]
  assert len(rv.dedupe_gallery(dets, 0.3)) == 3  # 0.43 > 0.3: the last box goes too
  assert rv.dedupe_gallery(dets, 1.0) == dets
  # With a score threshold of 0.25 the 0.1 and 0.2 boxes go first; NMS as before among the rest.
  assert [d["cls"] for d in rv.dedupe_gallery(dets, 0.5, min_score=0.25)] == [2, 4]
  assert [d["cls"] for d in rv.dedupe_gallery(dets, 1.0, min_score=0.25)] == [1, 2, 4]
  assert rv.dedupe_gallery(dets, 0.5, min_score=0.95) == []


def test_evaluation_subset_keeps_whole_pair_ids_in_file_order():
  """config.eval.max_images: whole pair_ids drawn with a fixed seed, the last one cut, returned
  in file order; the same subset every time; 0 or a size >= the split means every image."""
  from conftest import make_record
  from df2_jax.evaluation import evaluator
  # pair_ids 1..6 with 3, 2, 2, 1, 2, 2 images, interleaved in file order.
  pair_ids = [1, 2, 1, 3, 2, 1, 3, 4, 5, 5, 6, 6]
  records = [make_record(i + 1, pair_id=p) for i, p in enumerate(pair_ids)]
  np.testing.assert_array_equal(evaluator.subset_indices(records, 0), np.arange(12))
  np.testing.assert_array_equal(evaluator.subset_indices(records, 12), np.arange(12))
  subset = evaluator.subset_indices(records, 5)
  assert len(subset) == 5 and list(subset) == sorted(subset)
  np.testing.assert_array_equal(subset, evaluator.subset_indices(records, 5))
  # Every pair_id but the last one drawn is whole.
  chosen = [pair_ids[i] for i in subset]
  order = np.random.default_rng(0).permutation(6) + 1  # the draw, pair_ids 1..6 sorted
  complete = [p for p in order if sum(1 for c in chosen if c == p)]
  for p in complete[:-1]:
    assert chosen.count(p) == pair_ids.count(p), (p, chosen)
  assert complete == [p for p in order[:len(complete)]]


def test_a_submission_of_the_protocol_queries_scores_like_every_detection():
  """retrieval.protocol_queries: keeping only the detections the protocol picks (what the
  evaluator ranks) gives the same ranks as submitting every detection of every image."""
  rng = np.random.default_rng(3)
  query_gt, gallery_gt, submission, pruned = [], [], [], []
  for g in range(30):
    gallery_gt.append({"gallery_image_id": 1000 + g, "style": 1 + g % 2, "pair_id": g % 10,
                       "bbox": [10.0, 10.0, 60.0, 80.0]})
  for image_id in range(1, 16):
    items = []
    for m in range(rng.integers(1, 4)):
      x, y = rng.uniform(0, 100, 2)
      items.append({"query_image_id": image_id, "style": int(rng.integers(0, 3)),
                    "cls": int(rng.integers(1, 4)), "pair_id": int(rng.integers(0, 10)),
                    "bbox": [x, y, x + rng.uniform(20, 60), y + rng.uniform(20, 60)]})
    query_gt += items
    entries = []
    for _ in range(rng.integers(0, 12)):
      item = items[rng.integers(len(items))]
      box = (np.asarray(item["bbox"]) + rng.normal(0, 15, 4)).tolist()
      ranked = rng.integers(0, 30, 20)
      entries.append({"query_image_id": image_id, "query_bbox": box,
                      "query_cls": int(rng.integers(1, 4)),
                      "query_score": round(float(rng.random()), 1),
                      "gallery_image_id": [1000 + int(r) for r in ranked],
                      "gallery_bbox": [[10.0, 10.0, 60.0, 80.0]] * 20})
    submission += entries
    if entries:
      chosen = rv.protocol_queries(
          np.array([e["query_bbox"] for e in entries]), np.array([e["query_cls"] for e in entries]),
          np.array([e["query_score"] for e in entries]), np.array([q["bbox"] for q in items]),
          np.array([q["cls"] for q in items]), np.array([q["style"] for q in items]))
      pruned += [entries[j] for j in sorted(set(chosen[chosen >= 0].tolist()))]
  full_ranks = rv.first_hit_ranks(submission, query_gt, gallery_gt)
  assert len(pruned) < len(submission)
  assert (full_ranks < rv.NO_HIT).sum() >= 3  # some hits, some misses
  np.testing.assert_array_equal(rv.first_hit_ranks(pruned, query_gt, gallery_gt), full_ranks)


def test_scorers_name_a_wrong_file_and_its_kind(tmp_path):
  """The issue's mix-ups: a COCO GT given as results, a query GT given as the submission."""
  import json
  from df2_jax.evaluation import coco
  gt = {"images": [{"id": 1, "width": 10, "height": 10}], "annotations": [],
        "categories": [{"id": 1, "name": "short_sleeved_shirt"}]}
  query_gt = [{"query_image_id": 1, "bbox": [0, 0, 5, 5], "cls": 1, "style": 1, "pair_id": 1}]
  gallery_gt = [{"gallery_image_id": 2, "bbox": [0, 0, 5, 5], "style": 1, "pair_id": 1}]
  paths = {}
  for name, obj in (("gt", gt), ("query", query_gt), ("gallery", gallery_gt)):
    paths[name] = tmp_path / f"{name}.json"
    paths[name].write_text(json.dumps(obj))
  with pytest.raises(ValueError, match=rf"{paths['gt']}: the results \(--results\) for --type "
                                       r"bbox must be bbox results .* but it is COCO ground "
                                       r"truth"):
    coco.evaluate(str(paths["gt"]), str(paths["gt"]), "bbox")
  with pytest.raises(ValueError, match=rf"{paths['query']}: the ground truth \(--gt\) must be "
                                       r"COCO ground truth .* but it is retrieval query"):
    coco.evaluate(str(paths["query"]), [], "bbox")
  with pytest.raises(ValueError, match=rf"{paths['query']}: the submission \(--results\) must "
                                       r"be a retrieval submission .* but it is retrieval query"):
    rv.evaluate_retrieval(str(paths["query"]), str(paths["query"]),
                                 str(paths["gallery"]))
  with pytest.raises(ValueError, match=r"the gallery ground truth \(--gallery_gt\) must be "
                                       r"retrieval gallery ground truth .* but it is retrieval "
                                       r"query"):
    rv.evaluate_retrieval([], str(paths["query"]), str(paths["query"]))
