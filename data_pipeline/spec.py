"""The dataset spec: a run's categories, their landmarks, flip pairs and OKS sigmas, as data.

Every part of the system that depends on the taxonomy (the heads' sizes, the landmark targets
and loss, the horizontal flip, the evaluation's sigmas and result files, predictions, drawing,
the export manifest, retrieval) reads the run's ``DatasetSpec``; none reads module constants.
``DEEPFASHION2`` is the DeepFashion2 release's spec, built from the tables of
``data_pipeline/deepfashion2.py`` (and equal to them, tested); a COCO-format set gives its own
with ``from_coco`` (its ``categories[*].keypoints``, plus an optional small JSON for flip pairs
and sigmas, as mmpose's dataset info). The spec is saved in the run's config
(``config.data.spec``, ``to_dict``), so every checkpoint and export carries it.

Layout (DeepFashion2's): categories are numbered 1..C internally in the spec's order (0 is
padding everywhere); their landmarks form one global list, one slice per category in category
order, so landmark ``j`` (0-based) of internal category ``c`` is global channel
``landmark_start[c] + j``. A category keeps the dataset's own id (``Category.id``, any positive
integers) for every file the run writes. Flip pairs are 1-based and category-local.

The spec file (``config.data.spec_file``), all keys optional::

  {"name": "my_set",
   "categories": {"<id or name>": {"flip_pairs": [["left_cuff", "right_cuff"], [3, 4]],
                                   "sigmas": [0.03, 0.05, ...]}},
   "has_masks": true, "has_pairs": false}

A flip pair names two landmarks of the category (by name or 1-based index); a category without
flip pairs keeps every landmark in place when flipped; one without sigmas gets
``DEFAULT_SIGMA`` for each landmark (each said once in the log).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from data_pipeline import deepfashion2 as df2
from data_pipeline.records import DataError

log = logging.getLogger(__name__)

# OKS sigma of a landmark whose spec gives none: DeepFashion2's median (0.04; its mean is 0.039).
DEFAULT_SIGMA = 0.04


@dataclasses.dataclass(frozen=True)
class Category:
  """One category: the dataset's own ``id`` (kept in result files), its name, its landmarks'
  names (category-local order), flip pairs (1-based local indices) and OKS sigmas (one per
  landmark)."""
  id: int
  name: str
  landmarks: tuple[str, ...] = ()
  flip_pairs: tuple[tuple[int, int], ...] = ()
  sigmas: tuple[float, ...] = ()
  supercategory: str = ""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """A dataset's taxonomy (see the module docstring). Hashable: it is a static attribute of
  the model. Build it with ``from_dict``/``from_coco`` (validated) or ``DEEPFASHION2``."""
  name: str
  categories: tuple[Category, ...]
  has_masks: bool = True
  has_pairs: bool = True

  # Sizes and lookups.
  @property
  def num_categories(self) -> int:
    return len(self.categories)

  @functools.cached_property
  def num_landmarks(self) -> int:
    return int(sum(len(c.landmarks) for c in self.categories))

  @property
  def has_landmarks(self) -> bool:
    return self.num_landmarks > 0

  @functools.cached_property
  def class_ids(self) -> tuple[int, ...]:
    """The internal category ids, 1..C."""
    return tuple(range(1, self.num_categories + 1))

  @functools.cached_property
  def original_ids(self) -> np.ndarray:
    """[C + 1] int64: the dataset's id of each internal class (index 0, padding: 0)."""
    return np.array([0] + [c.id for c in self.categories], np.int64)

  @functools.cached_property
  def _class_of(self) -> dict[int, int]:
    return {c.id: k + 1 for k, c in enumerate(self.categories)}

  def class_of(self, original_id: int) -> int | None:
    """The internal class (1..C) of a dataset category id; None when the spec has none."""
    return self._class_of.get(int(original_id))

  def category(self, cls: int) -> Category:
    """The ``Category`` of internal class ``cls`` (1..C)."""
    return self.categories[int(cls) - 1]

  @functools.cached_property
  def names(self) -> dict[int, str]:
    """Internal class -> name."""
    return {k + 1: c.name for k, c in enumerate(self.categories)}

  def raw_name(self, cls: int) -> str | None:
    """DeepFashion2's raw name (its per-image JSON's) of a class that is DeepFashion2's
    category (same id and name); None for another set's."""
    cid = int(self.original_ids[int(cls)])
    return df2.RAW_NAMES[cid] if df2.COCO_NAMES.get(cid) == self.class_name(cls) else None

  def accepted_names(self, cls: int) -> set[str]:
    """The names an annotation may give class ``cls``: its name, and DeepFashion2's raw one."""
    return {self.class_name(cls)} | ({self.raw_name(cls)} if self.raw_name(cls) else set())

  def class_name(self, cls: int, default: str = "?") -> str:
    return self.names.get(int(cls), default)

  # The landmark layout.
  @functools.cached_property
  def landmark_counts(self) -> np.ndarray:
    """[C + 1] int: landmarks of each internal class (index 0: 0)."""
    return np.array([0] + [len(c.landmarks) for c in self.categories], np.int64)

  @functools.cached_property
  def landmark_start(self) -> np.ndarray:
    """[C + 1] int: each class's first global channel."""
    return np.concatenate([[0], np.cumsum(self.landmark_counts)[:-1]]).astype(np.int64)

  def landmark_slice(self, cls: int) -> slice:
    start = int(self.landmark_start[int(cls)])
    return slice(start, start + int(self.landmark_counts[int(cls)]))

  @functools.cached_property
  def landmark_names(self) -> tuple[str, ...]:
    """The global landmark list: every category's names, one slice per category."""
    return tuple(n for c in self.categories for n in c.landmarks)

  @functools.cached_property
  def landmark_category(self) -> np.ndarray:
    """[L] int32: the internal class of every global landmark channel."""
    return np.concatenate([np.full(len(c.landmarks), k + 1, np.int32)
                           for k, c in enumerate(self.categories)] + [np.zeros(0, np.int32)])

  @functools.cached_property
  def category_landmark_mask(self) -> np.ndarray:
    """[C + 1, L] bool: row c marks class c's channels (row 0, padding: none)."""
    out = np.zeros((self.num_categories + 1, self.num_landmarks), bool)
    for cls in self.class_ids:
      out[cls, self.landmark_slice(cls)] = True
    return out

  @functools.cached_property
  def max_category_landmarks(self) -> int:
    """The most landmarks any category has (K; 0 for a set without landmarks)."""
    return int(self.landmark_counts.max())

  @functools.cached_property
  def category_channels(self) -> np.ndarray:
    """[C + 1, K] int32: row c lists class c's global channels, padded with 0."""
    out = np.zeros((self.num_categories + 1, self.max_category_landmarks), np.int32)
    for cls in self.class_ids:
      n = int(self.landmark_counts[cls])
      out[cls, :n] = self.landmark_start[cls] + np.arange(n)
    return out

  @functools.cached_property
  def category_channel_valid(self) -> np.ndarray:
    """[C + 1, K] bool: the real entries of ``category_channels``."""
    return np.arange(self.max_category_landmarks)[None, :] < self.landmark_counts[:, None]

  @functools.cached_property
  def flip_perm(self) -> np.ndarray:
    """[L] int32: after a horizontal flip, landmark ``i`` of the flipped image is landmark
    ``flip_perm[i]`` of the original (mirrored in x). An involution."""
    perm = np.arange(self.num_landmarks, dtype=np.int32)
    for cls in self.class_ids:
      start = int(self.landmark_start[cls])
      for a, b in self.category(cls).flip_pairs:
        perm[start + a - 1], perm[start + b - 1] = start + b - 1, start + a - 1
    return perm

  def local_flip_perm(self, cls: int) -> np.ndarray:
    """The flip permutation of one class, 0-based category-local indices."""
    sl = self.landmark_slice(cls)
    return self.flip_perm[sl] - sl.start

  @functools.cached_property
  def oks_sigmas(self) -> np.ndarray:
    """[L] float64: the OKS sigma of every global landmark (pycocotools' kpt_oks_sigmas)."""
    return np.array([s for c in self.categories for s in c.sigmas], np.float64)

  def coco_categories(self) -> list[dict]:
    """The ``categories`` of the evaluation's ground truth: the dataset's ids and names, each
    listing the whole global landmark list (DeepFashion2's COCO layout)."""
    names = list(self.landmark_names)
    return [{"id": c.id, "name": c.name, "supercategory": c.supercategory,
             "keypoints": list(names), "skeleton": []} for c in self.categories]

  # Serialisation (the config's data.spec).
  def to_dict(self) -> dict[str, Any]:
    """The config's form (sequences as tuples, as the config files write them)."""
    return {"name": self.name,
            "categories": tuple({"id": c.id, "name": c.name, "supercategory": c.supercategory,
                                 "landmarks": tuple(c.landmarks),
                                 "flip_pairs": tuple(tuple(p) for p in c.flip_pairs),
                                 "sigmas": tuple(c.sigmas)} for c in self.categories),
            "has_masks": self.has_masks, "has_pairs": self.has_pairs}

  def describe(self) -> str:
    """One line for the log."""
    parts = [f"{self.num_categories} categories", f"{self.num_landmarks} landmarks"]
    parts += [] if self.has_masks else ["no masks"]
    parts += [] if self.has_pairs else ["no pairs"]
    return f"dataset {self.name!r}: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# Building and checking.


def _fail(path: str, field: str, message: str):
  raise DataError(path, field, message)


def _check_category(cat: Category, path: str, prefix: str) -> None:
  if isinstance(cat.id, bool) or not isinstance(cat.id, int) or cat.id < 1:
    _fail(path, f"{prefix}.id", f"expected a positive integer, got {cat.id!r}")
  if not isinstance(cat.name, str) or not cat.name.strip():
    _fail(path, f"{prefix}.name", f"the category has no name (got {cat.name!r})")
  n = len(cat.landmarks)
  for j, name in enumerate(cat.landmarks):
    if not isinstance(name, str) or not name:
      _fail(path, f"{prefix}.landmarks[{j}]", f"expected a landmark name, got {name!r}")
  seen: set[int] = set()
  for j, pair in enumerate(cat.flip_pairs):
    field = f"{prefix}.flip_pairs[{j}]"
    if len(pair) != 2:
      _fail(path, field, f"expected two landmarks, got {list(pair)!r}")
    for v in pair:
      if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= n:
        _fail(path, field, f"landmark {v!r} out of range 1..{n} (category {cat.name!r} has "
                           f"{n} landmarks)")
    if pair[0] == pair[1] or seen.intersection(pair):
      _fail(path, field, f"landmark {pair[0] if pair[0] in seen or pair[0] == pair[1] else pair[1]}"
                         f" is in more than one flip pair")
    seen.update(pair)
  if len(cat.sigmas) != n:
    _fail(path, f"{prefix}.sigmas", f"expected {n} sigmas (one per landmark), got "
                                    f"{len(cat.sigmas)}")
  for j, s in enumerate(cat.sigmas):
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s <= 0:
      _fail(path, f"{prefix}.sigmas[{j}]", f"a sigma must be a number > 0, got {s!r}")


def check(spec: DatasetSpec, path: str = "config.data.spec") -> DatasetSpec:
  """``spec`` when it is consistent; else ``DataError`` naming ``path`` and the field."""
  if not isinstance(spec.name, str) or not spec.name:
    _fail(path, "name", f"expected a name, got {spec.name!r}")
  if not spec.categories:
    _fail(path, "categories", "no categories")
  ids: dict[int, int] = {}
  for k, cat in enumerate(spec.categories):
    _check_category(cat, path, f"categories[{k}]")
    if cat.id in ids:
      _fail(path, f"categories[{k}].id", f"id {cat.id} repeats categories[{ids[cat.id]}]")
    ids[cat.id] = k
  for key in ("has_masks", "has_pairs"):
    if not isinstance(getattr(spec, key), bool):
      _fail(path, key, f"must be True or False, got {getattr(spec, key)!r}")
  return spec


def _tuple_pairs(pairs: Any, path: str, field: str) -> tuple[tuple[int, int], ...]:
  if not isinstance(pairs, (list, tuple)):
    _fail(path, field, f"expected a list of pairs, got {pairs!r}")
  out = []
  for j, p in enumerate(pairs):
    if not isinstance(p, (list, tuple)):
      _fail(path, f"{field}[{j}]", f"expected two landmarks, got {p!r}")
    out.append(tuple(p))
  return tuple(out)


def from_dict(data: Mapping[str, Any], path: str = "config.data.spec") -> DatasetSpec:
  """The spec of ``to_dict``'s form (the config's ``data.spec``), checked."""
  if not isinstance(data, Mapping):
    _fail(path, "spec", f"expected a mapping, got {type(data).__name__}")
  cats = data.get("categories")
  if not isinstance(cats, (list, tuple)):
    _fail(path, "categories", f"expected a list of categories, got {cats!r}")
  categories = []
  for k, c in enumerate(cats):
    prefix = f"categories[{k}]"
    if not isinstance(c, Mapping):
      _fail(path, prefix, f"expected a mapping, got {c!r}")
    unknown = sorted(set(c) - {f.name for f in dataclasses.fields(Category)})
    if unknown:
      _fail(path, f"{prefix}.{unknown[0]}", "not a category field (id, name, supercategory, "
                                           "landmarks, flip_pairs, sigmas)")
    landmarks = c.get("landmarks", ())
    sigmas = c.get("sigmas", ())
    if not isinstance(landmarks, (list, tuple)):
      _fail(path, f"{prefix}.landmarks", f"expected a list of names, got {landmarks!r}")
    if not isinstance(sigmas, (list, tuple)):
      _fail(path, f"{prefix}.sigmas", f"expected a list of numbers, got {sigmas!r}")
    categories.append(Category(
        id=c.get("id"), name=c.get("name"), landmarks=tuple(landmarks),
        flip_pairs=_tuple_pairs(c.get("flip_pairs", ()), path, f"{prefix}.flip_pairs"),
        sigmas=tuple(sigmas), supercategory=c.get("supercategory", "")))
  unknown = sorted(set(data) - {"name", "categories", "has_masks", "has_pairs"})
  if unknown:
    _fail(path, unknown[0], "not a spec field (name, categories, has_masks, has_pairs)")
  return check(DatasetSpec(name=data.get("name"), categories=tuple(categories),
                           has_masks=data.get("has_masks", True),
                           has_pairs=data.get("has_pairs", True)), path)


def _to_plain(node: Any) -> Any:
  """A ConfigDict / tuple tree as plain dicts and lists."""
  if hasattr(node, "to_dict"):
    node = node.to_dict()
  if isinstance(node, Mapping):
    return {k: _to_plain(v) for k, v in node.items()}
  if isinstance(node, (list, tuple)):
    return [_to_plain(v) for v in node]
  return node


@functools.lru_cache(maxsize=16)
def _from_json_text(text: str) -> DatasetSpec:
  return from_dict(json.loads(text))


def from_config(config) -> DatasetSpec:
  """The run's spec: ``config.data.spec`` (``config``: the whole config or its ``data``)."""
  data = config.data if hasattr(config, "data") else config
  return _from_json_text(json.dumps(_to_plain(data.spec), sort_keys=True))


def _deepfashion2() -> DatasetSpec:
  categories = []
  for cid in df2.CATEGORY_IDS:
    start, count = df2.LANDMARK_START[cid], df2.LANDMARK_COUNTS[cid]
    sl = df2.landmark_slice(cid)
    categories.append(Category(
        id=cid, name=df2.COCO_NAMES[cid], supercategory="clothes",
        landmarks=tuple(str(i) for i in range(start + 1, start + count + 1)),
        flip_pairs=df2.FLIP_PAIRS[cid],
        sigmas=tuple(float(s) for s in df2.OKS_SIGMAS[sl])))
  return check(DatasetSpec("deepfashion2", tuple(categories), has_masks=True, has_pairs=True),
               "data_pipeline/deepfashion2.py")


DEEPFASHION2 = _deepfashion2()


# --------------------------------------------------------------------------------------------
# A COCO file's spec.


def _read_json(path: str) -> Any:
  try:
    with open(path, "rb") as f:
      return json.loads(f.read())
  except OSError as e:
    raise DataError(path, "json", f"cannot read file: {e}") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DataError(path, "json", f"invalid JSON: {e}") from e


def is_deepfashion2(categories: list) -> bool:
  """Whether a COCO file's categories are the official DeepFashion2 conversion's (ids and names;
  keypoints, where given, the 294 shared names)."""
  official = df2.coco_categories()
  if len(categories) != len(official) or not all(isinstance(c, dict) for c in categories):
    return False
  return all(c.get("id") == o["id"] and c.get("name") == o["name"]
             and c.get("keypoints", o["keypoints"]) == o["keypoints"]
             for c, o in zip(categories, official))


def _has_pairs(data: Mapping[str, Any]) -> bool:
  """Whether some user image and some shop image share a pair_id (sources from the image
  entries or their annotations)."""
  source = {im.get("id"): im.get("source") for im in data.get("images", [])
            if isinstance(im, dict)}
  pair = {}
  for ann in data.get("annotations", []):
    if not isinstance(ann, dict):
      continue
    iid = ann.get("image_id")
    source[iid] = source.get(iid) or ann.get("source")
    if isinstance(ann.get("pair_id"), int) and ann["pair_id"] >= 0:
      pair[iid] = ann["pair_id"]
  users = {pair[i] for i in pair if source.get(i) == "user"}
  shops = {pair[i] for i in pair if source.get(i) == "shop"}
  return bool(users & shops)


def _has_masks(data: Mapping[str, Any]) -> bool:
  return any(isinstance(a, dict) and a.get("segmentation") for a in data.get("annotations", []))


def from_coco(json_path: str | os.PathLike, spec_file: str | os.PathLike = "",
              name: str = "") -> DatasetSpec:
  """The spec of a COCO-format set: its ``categories`` (ids, names, each one's ``keypoints``,
  its own landmarks), with flip pairs, sigmas and overrides from ``spec_file`` (see the module
  docstring). The official DeepFashion2 conversion gives ``DEEPFASHION2``. Whether the set has
  masks (any ``segmentation``) and pairs (a user and a shop image sharing a pair_id) is read
  from its annotations unless the spec file says.

  Raises:
    DataError: naming the file and the field (a category without a name or id, a flip pair out
      of range, a sigma <= 0, ...).
  """
  json_path = os.fspath(json_path)
  data = _read_json(json_path)
  if not isinstance(data, dict):
    _fail(json_path, "json", f"expected a JSON object, got {type(data).__name__}")
  cats = data.get("categories")
  if not isinstance(cats, list) or not cats:
    _fail(json_path, "categories", "missing" if cats is None else "expected a non-empty list")
  extra = _read_json(os.fspath(spec_file)) if spec_file else {}
  spec_path = os.fspath(spec_file) if spec_file else json_path
  if not isinstance(extra, dict):
    _fail(spec_path, "json", f"expected a JSON object, got {type(extra).__name__}")
  unknown = sorted(set(extra) - {"name", "categories", "has_masks", "has_pairs"})
  if unknown:
    _fail(spec_path, unknown[0], "not a spec file field (name, categories, has_masks, "
                                 "has_pairs)")
  if is_deepfashion2(cats) and not extra.get("categories"):  # DeepFashion2's, as it is
    return check(dataclasses.replace(
        DEEPFASHION2, **{k: extra[k] for k in ("has_masks", "has_pairs") if k in extra}),
        spec_path)
  has_masks = extra.get("has_masks", _has_masks(data))
  has_pairs = extra.get("has_pairs", _has_pairs(data))

  per_cat = extra.get("categories", {})
  if not isinstance(per_cat, dict):
    _fail(spec_path, "categories", "expected a mapping of category id or name to its flip "
                                   "pairs and sigmas")
  used = set()
  categories = []
  for k, c in enumerate(cats):
    prefix = f"categories[{k}]"
    if not isinstance(c, dict):
      _fail(json_path, prefix, f"expected a JSON object, got {type(c).__name__}")
    cid, cname = c.get("id"), c.get("name")
    if isinstance(cid, bool) or not isinstance(cid, int) or cid < 1:
      _fail(json_path, f"{prefix}.id", f"expected a positive integer, got {cid!r}")
    if not isinstance(cname, str) or not cname.strip():
      _fail(json_path, f"{prefix}.name", f"the category has no name (got {cname!r})")
    keypoints = c.get("keypoints", [])
    if not isinstance(keypoints, list) or not all(isinstance(v, str) and v for v in keypoints):
      _fail(json_path, f"{prefix}.keypoints", "expected a list of landmark names")
    key = str(cid) if str(cid) in per_cat else (cname if cname in per_cat else None)
    more = per_cat.get(key, {}) if key is not None else {}
    used.add(key)
    field = f"categories.{key}"
    if not isinstance(more, dict):
      _fail(spec_path, field, "expected {\"flip_pairs\": [...], \"sigmas\": [...]}")
    bad = sorted(set(more) - {"flip_pairs", "sigmas"})
    if bad:
      _fail(spec_path, f"{field}.{bad[0]}", "not a category field (flip_pairs, sigmas)")
    pairs = []
    for j, pair in enumerate(_tuple_pairs(more.get("flip_pairs", []), spec_path,
                                          f"{field}.flip_pairs")):
      resolved = []
      for v in pair:
        if isinstance(v, str):
          if v not in keypoints:
            _fail(spec_path, f"{field}.flip_pairs[{j}]",
                  f"{v!r} is not a landmark of category {cname!r} ({json_path} "
                  f"categories[{k}].keypoints)")
          v = keypoints.index(v) + 1
        resolved.append(v)
      pairs.append(tuple(resolved))
    sigmas = more.get("sigmas")
    if sigmas is None:
      sigmas = [DEFAULT_SIGMA] * len(keypoints)
      if keypoints:
        log.info("%s: no OKS sigmas for category %r: %g for each of its %d landmarks",
                 spec_path, cname, DEFAULT_SIGMA, len(keypoints))
    if keypoints and not pairs:
      log.info("%s: no flip pairs for category %r: its landmarks keep their index when an "
               "image is flipped", spec_path, cname)
    if not isinstance(sigmas, list):
      _fail(spec_path, f"{field}.sigmas", f"expected a list of numbers, got {sigmas!r}")
    cat = Category(id=cid, name=cname, landmarks=tuple(keypoints), flip_pairs=tuple(pairs),
                   sigmas=tuple(sigmas), supercategory=str(c.get("supercategory", "")))
    _check_category(cat, spec_path if more else json_path,
                    field if more else prefix)
    categories.append(cat)
  stray = sorted(set(per_cat) - used)
  if stray:
    _fail(spec_path, f"categories.{stray[0]}", f"no category with this id or name in "
                                               f"{json_path}")
  spec_name = extra.get("name") or name or os.path.splitext(os.path.basename(json_path))[0]
  spec = DatasetSpec(spec_name, tuple(categories), has_masks=has_masks, has_pairs=has_pairs)
  return check(spec, spec_path)
