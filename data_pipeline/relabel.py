"""A DeepFashion2 COCO file relabelled into another taxonomy: test data for one's own sets.

``relabel_coco`` turns the official COCO conversion (or ``convert.to_coco``'s output: each
annotation's ``keypoints`` the 882 numbers of the shared 294-landmark layout) into a set of
another taxonomy, as a user's own COCO file would be (``data_pipeline/spec.py``, ``from_coco``):

  * ``categories``: the relabelling's, ``{id, name, supercategory, keypoints}``, with their own
    ids (any positive integers) and names, each merging some DeepFashion2 categories and
    listing its own landmark names (none at all is allowed);
  * each annotation of a merged category: ``category_id`` the new id, ``keypoints`` 3 numbers
    per landmark of the new category (copied from the DeepFashion2 landmark each one maps to in
    the annotation's own DeepFashion2 category), ``num_keypoints`` recounted, and no
    ``pair_id``, ``style`` or ``source`` (a set without pairs); ``bbox``, ``area``, ``iscrowd``
    and ``id`` as they were; every ``rle_every``-th one's polygons as one COCO RLE (their union,
    ``counts`` a string). Annotations of a DeepFashion2 category that no new one merges are
    left out; ``images`` stay (``file_name`` names the same image folder).

The spec file that goes with it (``spec_file``): per category, flip pairs by landmark name
(DeepFashion2's ``FLIP_PAIRS`` among the kept landmarks, required to agree in every merged
category) and OKS sigmas (the mean of the merged DeepFashion2 landmarks' sigmas, 4 decimals);
``has_pairs`` false.

  python -m data_pipeline.relabel --coco ROOT/validation_coco.json --out DIR
  python -m data_pipeline.relabel --root data/synthetic/... --split validation [--out DIR]

write ``coco.json`` and ``spec.json`` (``--root``: a raw split, e.g. the synthetic generator's,
read and converted first, written to ``ROOT/validation_coarse3`` unless ``--out`` says; its images
stay in ``ROOT/validation/image``); then train with ``--config.data.format=coco
--config.data.coco_json_train=DIR/coco.json --config.data.spec_file=DIR/spec.json``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import json
import os
import sys
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from data_pipeline import annotations
from data_pipeline import convert
from data_pipeline import deepfashion2 as df2
from data_pipeline import spec as spec_lib


@dataclasses.dataclass(frozen=True)
class NewCategory:
  """One category of the new taxonomy.

  Attributes:
    id: its id in the new COCO file (any positive integer).
    name: its name.
    merges: the DeepFashion2 categories (1..13) it merges.
    landmarks: its landmarks in order, each (new name, source): the source is the landmark's
      category-local 1-based DeepFashion2 index, either one int (the same index in every merged
      category) or a tuple of one index per category of ``merges`` (in that order). Empty: the
      category has no landmarks.
  """
  id: int
  name: str
  merges: tuple[int, ...]
  landmarks: tuple[tuple[str, int | tuple[int, ...]], ...] = ()

  @property
  def landmark_names(self) -> list[str]:
    return [name for name, _ in self.landmarks]

  def sources(self, df2_category: int) -> list[int]:
    """The 1-based local DeepFashion2 index of each landmark in merged category
    ``df2_category``."""
    k = self.merges.index(df2_category)
    return [src if isinstance(src, int) else src[k] for _, src in self.landmarks]


@dataclasses.dataclass(frozen=True)
class Relabelling:
  """A taxonomy made of DeepFashion2's: its name (the spec's) and its categories, in the order of
  the new file's ``categories``."""
  name: str
  categories: tuple[NewCategory, ...]


# Three coarse categories with non-contiguous ids (reference/deepfashion2.md, section 2, and its
# landmarks.jpg). Tops (DeepFashion2 1-6) keep the neckline points numbered alike in all six:
# 1 the back of the neck, 2/6 where the neckline meets the shoulders (the strap in a sling),
# 3/5 the front neckline's sides; 4 is left out: the front centre of a top or a vest, but one
# side of an open jacket's front in 3 and 4 (flip partner 26 or 34, not kept). Bottoms (7-9)
# keep their waistband's left, middle and right (1, 2, 3 in all three); dresses none.
COARSE3 = Relabelling("coarse3", (
    NewCategory(3, "top", (1, 2, 3, 4, 5, 6),
                (("neck_back", 1), ("neck_left", 2), ("collar_left", 3), ("collar_right", 5),
                 ("neck_right", 6))),
    NewCategory(7, "bottom", (7, 8, 9),
                (("waist_left", 1), ("waist_middle", 2), ("waist_right", 3))),
    NewCategory(12, "dress", (10, 11, 12, 13)),
))


def check(relabelling: Relabelling) -> dict[int, NewCategory]:
  """{DeepFashion2 category: the new category merging it} of a consistent relabelling; else
  ValueError (a repeated id, name or landmark name, a DeepFashion2 category merged twice or
  unknown, a landmark source out of range or used twice)."""
  new_of: dict[int, NewCategory] = {}
  ids, names = set(), set()
  for cat in relabelling.categories:
    if isinstance(cat.id, bool) or not isinstance(cat.id, int) or cat.id < 1 or cat.id in ids:
      raise ValueError(f"{cat.name!r}: id {cat.id!r} is not a new positive integer")
    if not cat.name or cat.name in names:
      raise ValueError(f"category name {cat.name!r} is empty or repeated")
    ids.add(cat.id)
    names.add(cat.name)
    if len(set(cat.landmark_names)) != len(cat.landmarks) or not all(cat.landmark_names):
      raise ValueError(f"{cat.name!r}: landmark names {cat.landmark_names} are empty or repeat")
    for old in cat.merges:
      if old not in df2.CATEGORIES:
        raise ValueError(f"{cat.name!r}: {old} is not a DeepFashion2 category")
      if old in new_of:
        raise ValueError(f"DeepFashion2 category {old} is merged into {new_of[old].name!r} "
                         f"and {cat.name!r}")
      new_of[old] = cat
    for name, src in cat.landmarks:
      if not isinstance(src, int) and len(src) != len(cat.merges):
        raise ValueError(f"{cat.name!r}: landmark {name!r} has {len(src)} sources for "
                         f"{len(cat.merges)} merged categories")
    for old in cat.merges:
      sources = cat.sources(old)
      if len(set(sources)) != len(sources):
        raise ValueError(f"{cat.name!r}: DeepFashion2 category {old}'s landmarks {sources} "
                         f"repeat")
      bad = [j for j in sources if not 1 <= j <= df2.LANDMARK_COUNTS[old]]
      if bad:
        raise ValueError(f"{cat.name!r}: DeepFashion2 category {old} has no landmark {bad[0]} "
                         f"(1..{df2.LANDMARK_COUNTS[old]})")
  return new_of


def _flip_pairs(cat: NewCategory) -> list[list[str]]:
  """The new category's flip pairs by name, in landmark order: DeepFashion2's pairs of every
  merged category, which must agree (else ValueError)."""
  names = cat.landmark_names
  found = None
  for old in cat.merges:
    partner = {a: b for a, b in df2.FLIP_PAIRS[old]} | {b: a for a, b in df2.FLIP_PAIRS[old]}
    new_of_old = {src: j for j, src in enumerate(cat.sources(old))}
    pairs = []
    for j, src in enumerate(cat.sources(old)):
      other = partner.get(src, src)
      if other not in new_of_old:
        raise ValueError(f"{cat.name!r}: landmark {names[j]!r} is DeepFashion2 category "
                         f"{old}'s {src}, whose flip partner {other} is not kept")
      if new_of_old[other] > j:
        pairs.append((j, new_of_old[other]))
    if found is not None and pairs != found:
      raise ValueError(f"{cat.name!r}: DeepFashion2 category {old} pairs the landmarks as "
                       f"{[[names[a], names[b]] for a, b in pairs]}, category {cat.merges[0]} "
                       f"as {[[names[a], names[b]] for a, b in found]}")
    found = pairs
  return [[names[a], names[b]] for a, b in found or []]


def _sigmas(cat: NewCategory) -> list[float]:
  """Each landmark's OKS sigma: the mean of its merged DeepFashion2 landmarks', 4 decimals."""
  per_old = np.array([[df2.OKS_SIGMAS[df2.LANDMARK_START[old] + j - 1] for j in cat.sources(old)]
                      for old in cat.merges], np.float64)
  return [round(float(s), 4) for s in per_old.mean(axis=0)] if cat.landmarks else []


def spec_file(relabelling: Relabelling, *, has_masks: bool = True) -> dict[str, Any]:
  """The spec file of a relabelling (``spec.from_coco``'s ``spec_file``): per category with
  landmarks, flip pairs by name and sigmas; ``has_pairs`` false. ValueError when a kept
  landmark's flip partner is not kept or the merged categories pair differently."""
  check(relabelling)
  categories = {cat.name: {"flip_pairs": _flip_pairs(cat), "sigmas": _sigmas(cat)}
                for cat in relabelling.categories if cat.landmarks}
  return {"name": relabelling.name, "categories": categories, "has_masks": has_masks,
          "has_pairs": False}


def _rle(polygons: list, height: int, width: int) -> dict[str, Any]:
  """The union of polygons as one compressed COCO RLE, ``counts`` a string (JSON)."""
  rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
  return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def relabel_coco(coco: dict[str, Any], relabelling: Relabelling = COARSE3, *,
                 rle_every: int = 3) -> tuple[dict, dict]:
  """(COCO dict, spec-file dict) of ``coco`` (DeepFashion2's layout) in ``relabelling``'s
  taxonomy (see the module docstring); ``rle_every`` 0: polygons kept everywhere.

  Raises:
    ValueError: an inconsistent relabelling (``check``, ``spec_file``) or an annotation whose
      keypoints are not DeepFashion2's 882 numbers.
  """
  new_of = check(relabelling)
  spec = spec_file(relabelling, has_masks=any(a.get("segmentation")
                                              for a in coco["annotations"]))
  sizes = {im["id"]: (im["height"], im["width"]) for im in coco["images"]}
  out_anns = []
  for ann in coco["annotations"]:
    old = int(ann["category_id"])
    if old not in new_of:
      continue
    if len(ann.get("keypoints", ())) != 3 * df2.NUM_LANDMARKS:
      raise ValueError(f"annotation {ann.get('id')}: expected DeepFashion2's "
                       f"{3 * df2.NUM_LANDMARKS} keypoint numbers, got "
                       f"{len(ann.get('keypoints', ()))}")
    cat = new_of[old]
    out = {k: v for k, v in ann.items() if k not in ("pair_id", "style", "source")}
    start = 3 * df2.LANDMARK_START[old]
    keypoints = []
    for j in cat.sources(old):
      keypoints += ann["keypoints"][start + 3 * (j - 1):start + 3 * j]
    out.update(category_id=cat.id, keypoints=keypoints,
               num_keypoints=sum(1 for v in keypoints[2::3] if v > 0))
    if rle_every and len(out_anns) % rle_every == rle_every - 1 and ann.get("segmentation"):
      out["segmentation"] = _rle(ann["segmentation"], *sizes[ann["image_id"]])
    out_anns.append(out)
  categories = [{"id": c.id, "name": c.name, "supercategory": "clothes",
                 "keypoints": c.landmark_names} for c in relabelling.categories]
  images = [{k: v for k, v in im.items() if k != "source"} for im in coco["images"]]
  return ({"info": coco.get("info", {}), "licenses": coco.get("licenses", []),
           "categories": categories, "images": images, "annotations": out_anns}, spec)


def _write(coco: dict[str, Any], out_dir: str | os.PathLike, relabelling: Relabelling,
           rle_every: int) -> tuple[str, str]:
  new, spec = relabel_coco(coco, relabelling, rle_every=rle_every)
  os.makedirs(out_dir, exist_ok=True)
  paths = os.path.join(out_dir, "coco.json"), os.path.join(out_dir, "spec.json")
  for path, obj in zip(paths, (new, spec)):
    with open(path, "w") as f:
      json.dump(obj, f)
  return paths


def write_relabelled(src_json: str | os.PathLike, out_dir: str | os.PathLike,
                     relabelling: Relabelling = COARSE3, *,
                     rle_every: int = 3) -> tuple[str, str]:
  """``relabel_coco`` of the COCO file ``src_json``, written as ``out_dir/coco.json`` and
  ``out_dir/spec.json``; their paths. The images stay in ``src_json``'s image folder."""
  with open(src_json) as f:
    coco = json.load(f)
  return _write(coco, out_dir, relabelling, rle_every)


def write_coco_taxonomy(root: str | os.PathLike, split: str,
                        relabelling: Relabelling = COARSE3, out_dir: str | os.PathLike = "",
                        *, rle_every: int = 3, num_workers: int | None = 1) -> tuple[str, str]:
  """A raw split (``root/split/{image,annos}``, e.g. ``synthetic.generate``'s) in another
  taxonomy: read (``annotations.scan_raw_root``, bad items dropped with a warning), converted
  (``convert.to_coco``) and relabelled into ``out_dir`` (default ``root/<split>_<name>``);
  the paths of ``coco.json`` and ``spec.json``. The images stay in ``root/split/image``.

  Raises:
    ValueError: the split has no readable image.
  """
  split_dir = os.path.join(os.fspath(root), split)
  scan = annotations.scan_raw_root(split_dir, check_image="header", num_workers=num_workers)
  if not scan.records:
    raise ValueError(f"no readable image in {split_dir}")
  coco = convert.to_coco(scan.records, spec_lib.DEEPFASHION2)
  out_dir = out_dir or os.path.join(os.fspath(root), f"{split}_{relabelling.name}")
  return _write(coco, out_dir, relabelling, rle_every)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipeline.relabel",
                                   description="DeepFashion2 COCO relabelled into 3 coarse "
                                               "categories (test data for one's own sets).")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--coco", help="a DeepFashion2 COCO file (the official conversion)")
  source.add_argument("--root", help="a raw dataset root holding SPLIT/{image,annos}")
  parser.add_argument("--split", default="validation", help="the split of --root")
  parser.add_argument("--out", default="", help="folder for coco.json and spec.json (required "
                                                "with --coco)")
  args = parser.parse_args(argv)
  if args.coco:
    if not args.out:
      parser.error("--coco needs --out")
    paths = write_relabelled(args.coco, args.out)
  else:
    paths = write_coco_taxonomy(args.root, args.split, out_dir=args.out, num_workers=None)
  for path in paths:
    print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
