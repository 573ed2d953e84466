"""The headline of an evaluation: metric names, flat scalars and the one-table summary.

What the training loop logs and what ``config.train.best_metric`` may name, without the
evaluator (and so without its imports): ``metrics.json`` holds a dict per COCO type
(``COCO_TYPES``: AP, AP50, AP75, ...) and per retrieval kind (``RETRIEVAL_KINDS``: top1 ..
top20).
"""

from __future__ import annotations

from typing import Any

COCO_TYPES = ("bbox", "segm", "keypoints_visible", "keypoints")
RETRIEVAL_KINDS = ("retrieval", "retrieval_gt_boxes")
TOP_K = (1, 5, 10, 15, 20)
_AP_KEYS = ("AP", "AP50", "AP75")


def metric_names() -> list[str]:
  """The names ``config.train.best_metric`` may take: the keys of ``summary_scalars`` without
  their "eval/" prefix (e.g. "bbox/AP", "keypoints/AP", "retrieval/top20")."""
  names = [f"{kind}/{key}" for kind in COCO_TYPES for key in _AP_KEYS]
  return names + [f"{kind}/top{k}" for kind in RETRIEVAL_KINDS for k in TOP_K]


def summary_scalars(metrics: dict[str, Any]) -> dict[str, float]:
  """The headline numbers as flat "eval/..." scalars (for TensorBoard and metrics.jsonl)."""
  out = {}
  for kind in COCO_TYPES:
    for key in _AP_KEYS:
      if kind in metrics and key in metrics[kind]:
        out[f"eval/{kind}/{key}"] = float(metrics[kind][key])
  for kind in RETRIEVAL_KINDS:
    for k in TOP_K:
      if kind in metrics:
        out[f"eval/{kind}/top{k}"] = float(metrics[kind][f"top{k}"])
  return out


def headline(metrics: dict[str, Any], step: int) -> str:
  """One table of the headline numbers (the README's results table has these columns)."""
  named = [("AP_box", "bbox", "AP"), ("AP_mask", "segm", "AP"), ("AP_pt", "keypoints", "AP"),
           ("top-1", "retrieval", "top1"), ("top-20", "retrieval", "top20"),
           ("top-20 (GT boxes)", "retrieval_gt_boxes", "top20")]
  # A dataset without masks, landmarks or pairs has no such metrics: no column.
  cols = [(c, metrics[kind][key]) for c, kind, key in named if kind in metrics]
  head = " | ".join(["step"] + [c for c, _ in cols])
  row = " | ".join([str(step)] + [f"{v:.3f}".rjust(len(c)) for c, v in cols])
  return f"Results at step {step}:\n| {head} |\n| {row} |"


def topk_line(retrieval: dict[str, Any]) -> str:
  """"top-1 0.250  top-5 ..." of one retrieval kind's metrics."""
  return "  ".join(f"top-{k} {retrieval[f'top{k}']:.3f}" for k in TOP_K)
