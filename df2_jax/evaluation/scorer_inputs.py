"""What a JSON file given to a scorer is, so that a wrong file gets a message naming both kinds.

The scorers read five kinds of file: COCO ground truth (``data_pipeline.convert --out``), the
three DeepFashion2 result lists (bbox, segm, keypoints), and for retrieval a submission plus the
query and gallery ground truth (``convert --query_gt/--gallery_gt``). ``kind_of`` tells them
apart by their keys; ``expect`` raises ``WrongFile`` when a file is not the kind a scorer's
argument needs, and ``load`` when it cannot be read as JSON.
"""

from __future__ import annotations

import json
from typing import Any

from df2_jax.errors import Df2Error

DESCRIPTIONS = {
    "coco_gt": "COCO ground truth (a dict with 'images', 'annotations' and 'categories', as "
               "python -m data_pipeline.convert --out writes)",
    "bbox": "bbox results (a list of {image_id, category_id, bbox, score})",
    "segm": "segm results (a list of {image_id, category_id, segmentation, score})",
    "keypoints": "keypoints results (a list of {image_id, category_id, keypoints, score})",
    "submission": "a retrieval submission (a list of {query_image_id, query_bbox, query_cls, "
                  "query_score, gallery_image_id, gallery_bbox})",
    "query_gt": "retrieval query ground truth (a list of {query_image_id, bbox, cls, style, "
                "pair_id}, as convert --query_gt writes)",
    "gallery_gt": "retrieval gallery ground truth (a list of {gallery_image_id, bbox, style, "
                  "pair_id}, as convert --gallery_gt writes)",
}


class WrongFile(Df2Error, ValueError):
  """A file given to a scorer that is missing, not JSON, or another kind (one line)."""


def _is_path(obj_or_path: Any) -> bool:
  return isinstance(obj_or_path, (str, bytes)) or hasattr(obj_or_path, "__fspath__")


def load(obj_or_path: Any) -> Any:
  """A JSON file's content, or the object itself when it is not a path."""
  if _is_path(obj_or_path):
    try:
      with open(obj_or_path) as f:
        return json.load(f)
    except OSError as e:
      raise WrongFile(f"{obj_or_path}: cannot be read ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
      raise WrongFile(f"{obj_or_path}: not valid JSON ({e})") from None
  return obj_or_path


def name_of(obj_or_path: Any) -> str:
  """A path as given, or "the given object" (for messages)."""
  return str(obj_or_path) if _is_path(obj_or_path) else "the given object"


def kind_of(obj: Any) -> str:
  """One of ``DESCRIPTIONS``' keys, "empty list", or a short description of anything else."""
  if isinstance(obj, dict):
    if {"images", "annotations"} <= set(obj):
      return "coco_gt"
    return f"a dict with keys {sorted(obj)[:6]}"
  if isinstance(obj, list):
    if not obj:
      return "empty list"
    first = obj[0]
    if not isinstance(first, dict):
      return f"a list of {type(first).__name__}"
    keys = set(first)
    if "gallery_bbox" in keys or "query_score" in keys:
      return "submission"
    if "query_image_id" in keys:
      return "query_gt"
    if "gallery_image_id" in keys:
      return "gallery_gt"
    for kind in ("segmentation", "keypoints", "bbox"):
      if kind in keys and "score" in keys:
        return "segm" if kind == "segmentation" else kind
    return f"a list of dicts with keys {sorted(keys)[:6]}"
  return f"a JSON {type(obj).__name__}"


def expect(obj: Any, expected: str, source: str, role: str) -> None:
  """Raises ``WrongFile`` unless ``obj`` is of kind ``expected`` (an empty list passes for the
  list kinds: no results is a valid answer)."""
  kind = kind_of(obj)
  if kind == expected or (kind == "empty list" and expected != "coco_gt"):
    return
  found = DESCRIPTIONS.get(kind, kind)
  raise WrongFile(f"{source}: {role} must be {DESCRIPTIONS[expected]}, but it is {found}.")
