"""A DeepFashion2 COCO file relabelled into another taxonomy: test data for one's own sets.

``relabel_coco`` turns the official COCO conversion (or ``convert.to_coco``'s output) into a
set of another taxonomy, as a user's own COCO file would be: new categories merging
DeepFashion2's, with new ids (any positive integers) and names, each keeping some of its
landmarks under new names (its own ``keypoints`` list, 3 numbers per landmark in each
annotation) or none; every ``rle_every``-th annotation's polygons as one COCO RLE; no pairs
(``pair_id``, ``style`` and ``source`` removed). It also gives the spec file
(``data_pipeline/spec.py``): flip pairs by landmark name and OKS sigmas (the mean of the merged
DeepFashion2 landmarks' sigmas).

  python -m data_pipeline.relabel --coco ROOT/validation_coco.json --out DIR
  python -m data_pipeline.relabel --root data/synthetic/.../validation --out DIR

write ``DIR/coco.json`` and ``DIR/spec.json`` (the images stay where they are: ``--root`` reads a
raw split, e.g. the synthetic generator's, whose images are ``ROOT/image``); then
``--config.data.format=coco --config.data.coco_json_train=DIR/coco.json
--config.data.spec_file=DIR/spec.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Sequence

import numpy as np

from data_pipeline import deepfashion2 as df2


@dataclasses.dataclass(frozen=True)
class NewCategory:
  """One category of the new taxonomy: its id and name, the DeepFashion2 categories it merges,
  and its landmarks: (new name, category-local 1-based DeepFashion2 index) pairs, the index the
  same in every merged category (empty: no landmarks)."""
  id: int
  name: str
  merges: tuple[int, ...]
  landmarks: tuple[tuple[str, int], ...] = ()


# Three coarse categories with non-contiguous ids. Tops (DeepFashion2 1-6) keep their neckline
# points, numbered alike in all six (1 the back of the neck, 2/6 and 3/5 its left/right pairs;
# 4 is left out: the front centre of a top, but one side of an open jacket's collar in 3 and 4);
# bottoms (7-9) their waistband's left, middle and right; dresses none.
COARSE3 = (
    NewCategory(3, "top", (1, 2, 3, 4, 5, 6),
                (("neck_back", 1), ("neck_left", 2), ("collar_left", 3), ("collar_right", 5),
                 ("neck_right", 6))),
    NewCategory(7, "bottom", (7, 8, 9),
                (("waist_left", 1), ("waist_middle", 2), ("waist_right", 3))),
    NewCategory(12, "dress", (10, 11, 12, 13)),
)


def _new_of(relabelling: Sequence[NewCategory]) -> dict[int, NewCategory]:
  out = {}
  for cat in relabelling:
    for old in cat.merges:
      if old in out:
        raise ValueError(f"DeepFashion2 category {old} is merged into {out[old].name!r} and "
                         f"{cat.name!r}")
      out[old] = cat
  return out


def spec_file(relabelling: Sequence[NewCategory], name: str) -> dict[str, Any]:
  """The spec file of a relabelling: flip pairs by name (DeepFashion2's pairs among the kept
  landmarks, the same in every merged category, else ValueError) and sigmas (means of the
  merged landmarks' DeepFashion2 sigmas, 4 decimals); no pairs."""
  categories = {}
  for cat in relabelling:
    if not cat.landmarks:
      continue
    index_of = {old: new for new, old in cat.landmarks}
    found = None
    for old_cat in cat.merges:
      perm = df2.local_flip_perm(old_cat) + 1  # 1-based partner of each local landmark
      lost = [j for j in index_of if int(perm[j - 1]) not in index_of]
      if lost:
        raise ValueError(f"{cat.name}: the flip partner of DeepFashion2 category {old_cat}'s "
                         f"landmark {lost[0]} is not kept")
      pairs = sorted({tuple(sorted((index_of[j], index_of[int(perm[j - 1])])))
                      for j in index_of if int(perm[j - 1]) != j})
      if found is not None and pairs != found:
        raise ValueError(f"{cat.name}: DeepFashion2 category {old_cat} pairs its landmarks "
                         f"{pairs}, another merged one {found}")
      found = pairs
    sigmas = [round(float(np.mean([df2.OKS_SIGMAS[df2.LANDMARK_START[c] + old - 1]
                                   for c in cat.merges])), 4) for _, old in cat.landmarks]
    categories[cat.name] = {"flip_pairs": [list(p) for p in found], "sigmas": sigmas}
  return {"name": name, "categories": categories, "has_pairs": False}


def _rle(segmentation: list, height: int, width: int) -> dict[str, Any]:
  from pycocotools import mask as mask_utils
  rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
  return {"size": [height, width], "counts": rle["counts"].decode()}


def relabel_coco(coco: dict[str, Any], relabelling: Sequence[NewCategory] = COARSE3, *,
                 rle_every: int = 3, name: str = "coarse3") -> tuple[dict, dict]:
  """(COCO dict, spec-file dict) of ``coco`` (DeepFashion2's layout) in ``relabelling``'s
  taxonomy; see the module docstring. Annotations of a DeepFashion2 category no new one merges
  are left out."""
  new_of = _new_of(relabelling)
  sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
  annotations = []
  for n, ann in enumerate(a for a in coco["annotations"] if a["category_id"] in new_of):
    old = int(ann["category_id"])
    cat = new_of[old]
    out = {k: v for k, v in ann.items() if k not in ("pair_id", "style", "source",
                                                      "keypoints", "num_keypoints")}
    out["category_id"] = cat.id
    if cat.landmarks:
      start = 3 * df2.LANDMARK_START[old]
      kps = []
      for _, j in cat.landmarks:
        kps += list(ann["keypoints"][start + 3 * (j - 1):start + 3 * j])
      out["keypoints"] = kps
      out["num_keypoints"] = int(sum(1 for v in kps[2::3] if v > 0))
    if rle_every and n % rle_every == rle_every - 1:
      out["segmentation"] = _rle(ann["segmentation"], *sizes[ann["image_id"]])
    annotations.append(out)
  categories = [{"id": c.id, "name": c.name, "supercategory": "clothes",
                 "keypoints": [new for new, _ in c.landmarks]} for c in relabelling]
  images = [{k: v for k, v in im.items() if k != "source"} for im in coco["images"]]
  return ({"info": coco.get("info", {}), "licenses": coco.get("licenses", []),
           "images": images, "annotations": annotations, "categories": categories},
          spec_file(relabelling, name))


def write(coco: dict[str, Any], out_dir: str, relabelling: Sequence[NewCategory] = COARSE3,
          **kw) -> tuple[str, str]:
  """``relabel_coco`` written as ``out_dir/coco.json`` and ``out_dir/spec.json``; their paths."""
  new, spec = relabel_coco(coco, relabelling, **kw)
  os.makedirs(out_dir, exist_ok=True)
  paths = os.path.join(out_dir, "coco.json"), os.path.join(out_dir, "spec.json")
  for path, obj in zip(paths, (new, spec)):
    with open(path, "w") as f:
      json.dump(obj, f)
  return paths


def raw_split_coco(root: str) -> dict[str, Any]:
  """A raw split (``root/{image,annos}``, e.g. the synthetic generator's) as DeepFashion2 COCO,
  its ``file_name`` relative to ``root/image``."""
  from data_pipeline import annotations, convert, spec
  scan = annotations.scan_raw_root(root, strict=True, check_image="header", num_workers=1)
  return convert.to_coco(scan.records, spec.DEEPFASHION2)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipeline.relabel",
                                   description="DeepFashion2 COCO relabelled into 3 coarse "
                                               "categories (test data for one's own sets).")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--coco", help="a DeepFashion2 COCO file (the official conversion)")
  source.add_argument("--root", help="a raw split directory (image/, annos/)")
  parser.add_argument("--out", required=True, help="folder for coco.json and spec.json")
  args = parser.parse_args(argv)
  if args.coco:
    with open(args.coco) as f:
      coco = json.load(f)
  else:
    coco = raw_split_coco(args.root)
  for path in write(coco, args.out):
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
