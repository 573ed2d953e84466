"""DeepFashion2 consumer-to-shop retrieval: the official scoring protocol and submission building.

Scoring follows spec section 5 of reference/deepfashion2.md (the official
deepfashion2_retrieval_test.py, in Python 3 and without its crashes):

  1. denominator = number of GT query items with style > 0;
  2. in each query image every submitted detection is assigned to the GT query item it overlaps
     most (IoU argmax, no minimum IoU; ties, including a detection that overlaps nothing, go to
     the first GT item of the image in GT file order, as np.argmax does in the official script);
     images without any submitted detection: their items are misses;
  3. for each GT query item with style > 0, among the detections assigned to it whose
     ``query_cls`` equals the GT ``cls`` the one with the highest ``query_score`` is its query
     (ties: the first in submission order); none = miss;
  4. correct gallery items = GT gallery items with the same pair_id and style;
  5. retrieved result t is a hit when its gallery image holds a correct item whose box has
     IoU >= 0.5 with the retrieved box; top-k = fraction of queries with a hit among the first k.

Box convention: every box is corners [x1, y1, x2, y2] and area = (x2 - x1) * (y2 - y1), without
the +1 of old Detectron code: the official script converts to [x, y, w = x2 - x1, h = y2 - y1]
and calls pycocotools' mask.iou, which uses w * h.

Differences from the official script, all where it would crash: a query item whose pair_id and
style have no gallery item counts as a miss (the script asserts); a submission with fewer than
20 retrieved items is scored on what it has (the script indexes 20).

  python -m df2_jax.evaluation.retrieval_protocol --results R.json --query_gt Q.json \
      --gallery_gt G.json
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from collections.abc import Callable, Sequence
import sys
from typing import Any

import numpy as np

from df2_jax import errors
from df2_jax.evaluation import scorer_inputs

DEFAULT_KS = (1, 5, 10, 15, 20)
HIT_IOU = 0.5
NO_HIT = np.iinfo(np.int64).max  # first-hit rank of a query with no hit


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
  """Pairwise IoU of corner boxes, area = (x2 - x1) * (y2 - y1) (pycocotools' convention).

  Args:
    boxes_a: [N, 4] [x1, y1, x2, y2].
    boxes_b: [M, 4] [x1, y1, x2, y2].

  Returns:
    [N, M] float64 IoU; 0 where the union is empty.
  """
  a = np.asarray(boxes_a, np.float64).reshape(-1, 4)
  b = np.asarray(boxes_b, np.float64).reshape(-1, 4)
  area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
  area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
  iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
  ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
  inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
  union = area_a[:, None] + area_b[None, :] - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def _first_hit_rank(gallery_ids: np.ndarray, gallery_boxes: np.ndarray,
                    correct_ids: np.ndarray, correct_boxes: np.ndarray) -> int:
  """0-based rank of the first retrieved item that hits a correct gallery item, else NO_HIT.

  Args:
    gallery_ids: [T] retrieved gallery image ids, best first.
    gallery_boxes: [T, 4] retrieved boxes.
    correct_ids: [C] image ids of the correct gallery items.
    correct_boxes: [C, 4] their boxes.
  """
  if gallery_ids.size == 0 or correct_ids.size == 0:
    return NO_HIT
  same_image = gallery_ids[:, None] == correct_ids[None, :]
  hit = (same_image & (box_iou(gallery_boxes, correct_boxes) >= HIT_IOU)).any(axis=1)
  return int(np.argmax(hit)) if hit.any() else NO_HIT


def first_hit_ranks(submission: list[dict] | str,
                    query_gt: list[dict] | str,
                    gallery_gt: list[dict] | str) -> np.ndarray:
  """The 0-based rank of the first hit for every GT query item with style > 0.

  Args:
    submission: entries {query_image_id, query_bbox [x1, y1, x2, y2], query_cls, query_score,
      gallery_image_id [T], gallery_bbox [T x 4]} (T is 20 in the official format), or a path.
    query_gt: [{query_image_id, style, cls, pair_id, bbox [x1, y1, x2, y2]}] (style 0 included),
      or a path (data_pipeline.convert.retrieval_gt).
    gallery_gt: [{gallery_image_id, style, pair_id, bbox [x1, y1, x2, y2]}], or a path.

  Returns:
    [Q] int64, Q = number of GT query items with style > 0 (in GT file order); NO_HIT for a miss
    (undetected, wrong class, or no retrieved item hits).
  """
  loaded = []
  for arg, kind, role in ((submission, "submission", "the submission (--results)"),
                          (query_gt, "query_gt", "the query ground truth (--query_gt)"),
                          (gallery_gt, "gallery_gt", "the gallery ground truth (--gallery_gt)")):
    loaded.append(scorer_inputs.load(arg))
    scorer_inputs.expect(loaded[-1], kind, scorer_inputs.name_of(arg), role)
  submission, query_gt, gallery_gt = loaded

  # Correct gallery items by (pair_id, style).
  by_pair_style: dict[tuple[int, int], list[int]] = defaultdict(list)
  for j, g in enumerate(gallery_gt):
    by_pair_style[(int(g["pair_id"]), int(g["style"]))].append(j)
  gallery_ids = np.array([int(g["gallery_image_id"]) for g in gallery_gt], np.int64)
  gallery_boxes = np.array([g["bbox"] for g in gallery_gt], np.float64).reshape(-1, 4)
  correct = {key: (gallery_ids[idx], gallery_boxes[idx]) for key, idx in by_pair_style.items()}
  empty = (np.zeros((0,), np.int64), np.zeros((0, 4), np.float64))

  gt_by_image: dict[int, list[int]] = defaultdict(list)
  for i, q in enumerate(query_gt):
    gt_by_image[int(q["query_image_id"])].append(i)
  sub_by_image: dict[int, list[int]] = defaultdict(list)
  for i, s in enumerate(submission):
    sub_by_image[int(s["query_image_id"])].append(i)

  ranks = np.full(len(query_gt), NO_HIT, np.int64)
  for image_id, gt_idx in gt_by_image.items():
    det_idx = sub_by_image.get(image_id)
    if not det_idx:
      continue  # nothing detected in this image: its items stay misses
    dets = [submission[i] for i in det_idx]
    gts = [query_gt[i] for i in gt_idx]
    chosen_idx = protocol_queries(
        np.array([d["query_bbox"] for d in dets], np.float64).reshape(-1, 4),
        np.array([int(d["query_cls"]) for d in dets], np.int64),
        np.array([float(d["query_score"]) for d in dets], np.float64),
        np.array([q["bbox"] for q in gts], np.float64).reshape(-1, 4),
        np.array([int(q["cls"]) for q in gts], np.int64),
        np.array([int(q["style"]) for q in gts], np.int64))
    for local, gi in enumerate(gt_idx):
      q = query_gt[gi]
      style = int(q["style"])
      if chosen_idx[local] < 0:
        continue
      chosen = dets[int(chosen_idx[local])]
      ret_ids = np.asarray(chosen["gallery_image_id"], np.int64).reshape(-1)
      ret_boxes = np.asarray(chosen["gallery_bbox"], np.float64).reshape(-1, 4)
      if ret_ids.shape[0] != ret_boxes.shape[0]:
        raise ValueError(f"submission for image {image_id}: {ret_ids.shape[0]} gallery ids but "
                         f"{ret_boxes.shape[0]} gallery boxes")
      cids, cboxes = correct.get((int(q["pair_id"]), style), empty)
      ranks[gi] = _first_hit_rank(ret_ids, ret_boxes, cids, cboxes)
  styles = np.array([int(q["style"]) for q in query_gt], np.int64)
  return ranks[styles > 0]


def protocol_queries(det_boxes: np.ndarray, det_cls: np.ndarray, det_score: np.ndarray,
                     gt_boxes: np.ndarray, gt_cls: np.ndarray, gt_style: np.ndarray
                     ) -> np.ndarray:
  """Which detection of one consumer image is the query of each of its GT items (rules 2-3).

  Every detection goes to the GT item it overlaps most (IoU argmax, no minimum; ties to the
  first item); a GT item with style > 0 takes, among its detections of its class, the one with
  the highest score (ties: the first). Only these detections are ever scored, so a submission
  holding just them scores exactly as one holding every detection of the image.

  Args:
    det_boxes [N, 4], det_cls [N], det_score [N]: the image's detections, in submission order.
    gt_boxes [M, 4], gt_cls [M], gt_style [M]: its GT query items, in GT file order.

  Returns:
    [M] int64: the chosen detection's index, -1 for none (style 0, or no detection of the
    item's class assigned to it).
  """
  chosen = np.full(len(gt_boxes), -1, np.int64)
  if not len(det_boxes) or not len(gt_boxes):
    return chosen
  assigned = np.argmax(box_iou(det_boxes, gt_boxes), axis=1)  # [N], no minimum IoU
  for local in range(len(gt_boxes)):
    if gt_style[local] <= 0:
      continue
    candidates = np.nonzero((assigned == local) & (det_cls == gt_cls[local]))[0]
    if candidates.size:
      chosen[local] = candidates[np.argmax(det_score[candidates])]
  return chosen


def evaluate_retrieval(submission: list[dict] | str,
                       query_gt: list[dict] | str,
                       gallery_gt: list[dict] | str,
                       ks: Sequence[int] = DEFAULT_KS) -> dict:
  """Official consumer-to-shop top-k accuracy (spec section 5; see the module docstring).

  Args:
    submission: submission entries or a path (see first_hit_ranks).
    query_gt: query GT list or a path.
    gallery_gt: gallery GT list or a path.
    ks: the k values to report.

  Returns:
    {"top1": float, "top5": ..., ..., "num_queries": number of GT query items with style > 0,
    "num_hits_at": {k: hits}}; top-k is 0.0 when there are no queries.
  """
  ranks = first_hit_ranks(submission, query_gt, gallery_gt)
  n = int(ranks.shape[0])
  out: dict[str, Any] = {}
  hits_at = {}
  for k in ks:
    hits = int((ranks < k).sum())
    hits_at[int(k)] = hits
    out[f"top{int(k)}"] = hits / n if n else 0.0
  out["num_queries"] = n
  out["num_hits_at"] = hits_at
  return out


def _stack(dets: Sequence[dict], key: str, dtype, width: int | None = None) -> np.ndarray:
  arr = np.array([d[key] for d in dets], dtype)
  if width is not None:
    arr = arr.reshape(-1, width)
  return arr


def _top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """Per row, the indices of the k best scores, best first, ties broken by column order.

  Args:
    scores: [Q, G] float, higher = better; NaN counts as -inf.
    k: 1 <= k <= G.

  Returns:
    [Q, k] int64 column indices.
  """
  s = np.where(np.isnan(scores), -np.inf, scores)
  num_rows, num_cols = s.shape
  if k < num_cols:
    kth = -np.partition(-s, k - 1, axis=1)[:, k - 1]  # [Q] k-th best value
    above = s > kth[:, None]
    at = s == kth[:, None]
    room = k - above.sum(axis=1, keepdims=True)  # how many ties at the k-th value fit
    selected = above | (at & (np.cumsum(at, axis=1) <= room))
    _, cols = np.nonzero(selected)  # row-major: columns ascending within a row
    cols = cols.reshape(num_rows, k)
  else:
    cols = np.broadcast_to(np.arange(num_cols), (num_rows, num_cols))
  picked = np.take_along_axis(s, cols, axis=1)
  order = np.argsort(-picked, axis=1, kind="stable")  # stable: ties keep column order
  return np.take_along_axis(cols, order, axis=1).astype(np.int64)


def dedupe_gallery(dets: Sequence[dict], iou_threshold: float = 0.5,
                   min_score: float = 0.0) -> list[dict]:
  """Class-agnostic NMS of gallery detections within each shop image, after a score threshold.

  Class-aware detection keeps one box per class on the same garment; as gallery entries these
  near-copies fill a query's top-k with one item. Keeping, per image, only the highest-scoring
  detection among those overlapping at IoU > ``iou_threshold`` builds the gallery from distinct
  items. The evaluation rules are unchanged (a submission may rank any boxes of shop images).

  Args:
    dets: detections {image_id, bbox [x1, y1, x2, y2], score, ...}.
    iou_threshold: boxes overlapping a kept, higher-scoring box of the same image by more than
      this are dropped; 1.0 keeps everything.
    min_score: detections scoring below this are dropped first (low-confidence boxes
      otherwise compete with the confident ones for a query's top-k).

  Returns:
    The kept detections, in their input order.
  """
  by_image: dict[int, list[int]] = defaultdict(list)
  for i, d in enumerate(dets):
    if float(d["score"]) >= min_score:
      by_image[int(d["image_id"])].append(i)
  keep = np.zeros(len(dets), bool)
  for idx in by_image.values():
    order = sorted(idx, key=lambda i: (-float(dets[i]["score"]), i))
    boxes = np.array([dets[i]["bbox"] for i in order], np.float64).reshape(-1, 4)
    iou = box_iou(boxes, boxes)
    alive = np.ones(len(order), bool)
    for a in range(len(order)):
      if alive[a]:
        keep[order[a]] = True
        alive[a + 1:] &= iou[a, a + 1:] <= iou_threshold
  return [d for d, k in zip(dets, keep) if k]


def build_submission(query_dets: Sequence[dict],
                     gallery_dets: Sequence[dict],
                     score_fn: Callable[[np.ndarray, np.ndarray], np.ndarray],
                     k: int = 20,
                     *,
                     chunk_size: int = 1024) -> list[dict]:
  """Ranks the gallery for every query detection: the official submission entries.

  Args:
    query_dets: detections in consumer images, dicts {image_id, bbox [x1, y1, x2, y2], cls,
      score, embedding (array [D])}.
    gallery_dets: detections in shop images, same keys (cls and score unused).
    score_fn: (q [Q', D], g [G, D]) -> [Q', G] similarity, higher = better (e.g. the model's
      matching logits). Called once per chunk of ``chunk_size`` queries (once when
      Q <= chunk_size), never per pair; chunking bounds the [Q', G] matrix's memory.
    k: entries per query (20 in the official format).
    chunk_size: queries per score_fn call.

  Returns:
    One entry per query detection, in query_dets order: {query_image_id, query_bbox,
    query_cls, query_score, gallery_image_id [k], gallery_bbox [k x 4]}, gallery sorted by
    score_fn descending, ties broken by gallery_dets order. When the gallery has fewer than k
    detections the ranked list is padded to length k by repeating its last (lowest-ranked)
    item: the official format (and script) expects k entries, and a repeat of an item already
    ranked cannot change any top-k outcome. With an empty gallery the lists are empty.
  """
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}")
  if chunk_size < 1:
    raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
  num_q, num_g = len(query_dets), len(gallery_dets)
  if num_q == 0:
    return []
  g_ids = _stack(gallery_dets, "image_id", np.int64) if num_g else np.zeros((0,), np.int64)
  g_boxes = (_stack(gallery_dets, "bbox", np.float64, 4) if num_g
             else np.zeros((0, 4), np.float64))
  if num_g:
    g_emb = np.stack([np.asarray(d["embedding"]) for d in gallery_dets])
    q_emb = np.stack([np.asarray(d["embedding"]) for d in query_dets])
    kk = min(k, num_g)
    top = np.empty((num_q, kk), np.int64)
    for start in range(0, num_q, chunk_size):
      scores = np.asarray(score_fn(q_emb[start:start + chunk_size], g_emb))
      expected = (min(chunk_size, num_q - start), num_g)
      if scores.shape != expected:
        raise ValueError(f"score_fn returned shape {scores.shape}, expected {expected}")
      top[start:start + expected[0]] = _top_k_indices(scores, kk)
    if kk < k:  # pad by repeating the lowest-ranked item
      top = np.concatenate([top, np.repeat(top[:, -1:], k - kk, axis=1)], axis=1)
  else:
    top = np.zeros((num_q, 0), np.int64)
  ranked_ids = g_ids[top]  # [Q, k]
  ranked_boxes = g_boxes[top]  # [Q, k, 4]
  out = []
  for i, q in enumerate(query_dets):
    out.append({
        "query_image_id": int(q["image_id"]),
        "query_bbox": [float(v) for v in np.asarray(q["bbox"], np.float64).reshape(4)],
        "query_cls": int(q["cls"]),
        "query_score": float(q["score"]),
        "gallery_image_id": ranked_ids[i].tolist(),
        "gallery_bbox": ranked_boxes[i].tolist(),
    })
  return out


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m df2_jax.evaluation.retrieval_protocol",
      description="DeepFashion2 consumer-to-shop retrieval top-k accuracy (official protocol).")
  parser.add_argument("--results", required=True, help="submission JSON (a list of entries)")
  parser.add_argument("--query_gt", required=True, help="query GT JSON")
  parser.add_argument("--gallery_gt", required=True, help="gallery GT JSON")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  try:
    metrics = evaluate_retrieval(args.results, args.query_gt, args.gallery_gt)
  except errors.Df2Error as e:
    return errors.report(e)
  print(f"queries (style > 0): {metrics['num_queries']}")
  for k in DEFAULT_KS:
    print(f"top-{k}: {metrics[f'top{k}']:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
