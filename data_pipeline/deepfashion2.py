"""The facts of DeepFashion2: categories, the 294-landmark layout, flip pairs, OKS sigmas.

Everything here comes from ../shared/reference/deepfashion2.md (sections 2 and 4), which
follows the DeepFashion2 paper and the official repository. Every other module reads these
tables; none repeats them.

Indexing conventions:
  * category ids are 1..13 (0 is padding everywhere in this project);
  * a landmark's global index (0-based) is ``LANDMARK_START[cat] + local`` where ``local`` is
    the 0-based category-local index;
  * flip pairs in the spec are 1-based and category-local; ``FLIP_PAIRS`` keeps that form and
    ``FLIP_PERM`` is the global permutation derived from it.
"""

from __future__ import annotations

import numpy as np

NUM_CATEGORIES = 13
NUM_LANDMARKS = 294

# id -> (raw name used in the per-image JSON, name used by the official COCO converter)
CATEGORIES: dict[int, tuple[str, str]] = {
    1: ("short sleeve top", "short_sleeved_shirt"),
    2: ("long sleeve top", "long_sleeved_shirt"),
    3: ("short sleeve outwear", "short_sleeved_outwear"),
    4: ("long sleeve outwear", "long_sleeved_outwear"),
    5: ("vest", "vest"),
    6: ("sling", "sling"),
    7: ("shorts", "shorts"),
    8: ("trousers", "trousers"),
    9: ("skirt", "skirt"),
    10: ("short sleeve dress", "short_sleeved_dress"),
    11: ("long sleeve dress", "long_sleeved_dress"),
    12: ("vest dress", "vest_dress"),
    13: ("sling dress", "sling_dress"),
}
CATEGORY_IDS = tuple(range(1, NUM_CATEGORIES + 1))
RAW_NAMES = {cid: names[0] for cid, names in CATEGORIES.items()}
COCO_NAMES = {cid: names[1] for cid, names in CATEGORIES.items()}

LANDMARK_COUNTS: dict[int, int] = {
    1: 25, 2: 33, 3: 31, 4: 39, 5: 15, 6: 15, 7: 10, 8: 14, 9: 8, 10: 29, 11: 37, 12: 19, 13: 19,
}
LANDMARK_START: dict[int, int] = {}
_offset = 0
for _cid in CATEGORY_IDS:
  LANDMARK_START[_cid] = _offset
  _offset += LANDMARK_COUNTS[_cid]
assert _offset == NUM_LANDMARKS


def landmark_slice(category_id: int) -> slice:
  """The global landmark indices that belong to ``category_id``."""
  start = LANDMARK_START[category_id]
  return slice(start, start + LANDMARK_COUNTS[category_id])


# Category of every global landmark index, [294] int32 with values 1..13.
LANDMARK_CATEGORY = np.concatenate(
    [np.full(LANDMARK_COUNTS[c], c, np.int32) for c in CATEGORY_IDS])

# Per-category mask over the 294 channels, [14, 294] bool; row 0 (padding) is all False.
CATEGORY_LANDMARK_MASK = np.zeros((NUM_CATEGORIES + 1, NUM_LANDMARKS), bool)
for _cid in CATEGORY_IDS:
  CATEGORY_LANDMARK_MASK[_cid, landmark_slice(_cid)] = True


# The most landmarks any category has (39, long sleeve outwear).
MAX_CATEGORY_LANDMARKS = max(LANDMARK_COUNTS.values())
# [14, 39] int32: row c lists category c's global landmark channels, padded with 0;
# CATEGORY_CHANNEL_VALID [14, 39] bool marks the real entries (row 0, padding: none).
CATEGORY_CHANNELS = np.zeros((NUM_CATEGORIES + 1, MAX_CATEGORY_LANDMARKS), np.int32)
CATEGORY_CHANNEL_VALID = np.zeros((NUM_CATEGORIES + 1, MAX_CATEGORY_LANDMARKS), bool)
for _cid in CATEGORY_IDS:
  CATEGORY_CHANNELS[_cid, :LANDMARK_COUNTS[_cid]] = (LANDMARK_START[_cid]
                                                    + np.arange(LANDMARK_COUNTS[_cid]))
  CATEGORY_CHANNEL_VALID[_cid, :LANDMARK_COUNTS[_cid]] = True


def _pairs(text: str) -> tuple[tuple[int, int], ...]:
  return tuple(tuple(int(v) for v in p.split("-")) for p in text.split(", "))


_TOP_SHORT = "2-6, 3-5, 7-25, 8-24, 9-23, 10-22, 11-21, 12-20, 13-19, 14-18, 15-17"
_VEST = "2-6, 3-5, 7-15, 8-14, 9-13, 10-12"
_VEST_DRESS = "2-6, 3-5, 7-19, 8-18, 9-17, 10-16, 11-15, 12-14"

# Horizontal-flip pairs, 1-based and category-local (spec section 2).
FLIP_PAIRS: dict[int, tuple[tuple[int, int], ...]] = {
    1: _pairs(_TOP_SHORT),
    2: _pairs("2-6, 3-5, 7-33, 8-32, 9-31, 10-30, 11-29, 12-28, 13-27, 14-26, 15-25, 16-24, "
              "17-23, 18-22, 19-21"),
    3: _pairs("2-6, 3-5, 4-26, 7-25, 8-24, 9-23, 10-22, 11-21, 12-20, 13-19, 14-18, 15-17, "
              "16-29, 27-30, 28-31"),
    4: _pairs("2-6, 3-5, 4-34, 7-33, 8-32, 9-31, 10-30, 11-29, 12-28, 13-27, 14-26, 15-25, "
              "16-24, 17-23, 18-22, 19-21, 20-37, 35-38, 36-39"),
    5: _pairs(_VEST),
    6: _pairs(_VEST),
    7: _pairs("1-3, 4-10, 5-9, 6-8"),
    8: _pairs("1-3, 4-14, 5-13, 6-12, 7-11, 8-10"),
    9: _pairs("1-3, 4-8, 5-7"),
    10: _pairs("2-6, 3-5, 7-29, 8-28, 9-27, 10-26, 11-25, 12-24, 13-23, 14-22, 15-21, 16-20, "
               "17-19"),
    11: _pairs("2-6, 3-5, 7-37, 8-36, 9-35, 10-34, 11-33, 12-32, 13-31, 14-30, 15-29, 16-28, "
               "17-27, 18-26, 19-25, 20-24, 21-23"),
    12: _pairs(_VEST_DRESS),
    13: _pairs(_VEST_DRESS),
}


def _flip_perm() -> np.ndarray:
  perm = np.arange(NUM_LANDMARKS, dtype=np.int32)
  for cid, pairs in FLIP_PAIRS.items():
    start = LANDMARK_START[cid]
    for a, b in pairs:
      perm[start + a - 1], perm[start + b - 1] = start + b - 1, start + a - 1
  return perm


# Global flip permutation [294]: after a horizontal flip, landmark ``i`` of the flipped image is
# landmark ``FLIP_PERM[i]`` of the original (mirrored in x). An involution.
FLIP_PERM = _flip_perm()


def local_flip_perm(category_id: int) -> np.ndarray:
  """The flip permutation restricted to one category, 0-based category-local indices."""
  sl = landmark_slice(category_id)
  return FLIP_PERM[sl] - sl.start


_SIGMAS_TEXT = """
.012 .0158 .0169 .0165 .0169 .0158 .0298 .0329 .0321 .0323 .034 .0388 .0452 .0574 .0492 .0352 .0492 .0574 .0452 .0388 .034 .0323 .0321 .0329 .0298
.0194 .017 .0185 .0193 .0185 .017 .0286 .0471 .0547 .0526 .043 .0392 .0513 .0566 .0509 .0564 .0542 .0604 .0599 .052 .0599 .0604 .0542 .0564 .0509 .0566 .0513 .0392 .043 .0526 .0547 .0471 .0286
.0074 .0085 .0165 .0248 .0165 .0085 .0156 .0231 .0296 .0137 .0195 .025 .0347 .038 .0257 .037 .0257 .038 .0347 .025 .0195 .0137 .0296 .0231 .0156 .0248 .0469 .0632 .037 .0469 .0632
.0137 .0153 .0243 .0377 .0243 .0153 .0203 .0366 .0467 .0433 .0393 .0329 .0418 .0477 .0399 .0331 .042 .0492 .0436 .0478 .0436 .0492 .042 .0331 .0399 .0477 .0418 .0329 .0393 .0433 .0467 .0366 .0203 .0377 .0645 .0573 .0478 .0645 .0573
.0352 .0158 .021 .0214 .021 .0158 .0196 .05 .0489 .0404 .0401 .0404 .0489 .05 .0196
.0276 .0548 .0283 .0204 .0283 .0548 .0369 .0726 .0677 .064 .0251 .064 .0677 .0726 .0369
.0308 .0216 .0308 .0506 .0494 .0463 .0477 .0463 .0494 .0506
.0275 .0202 .0275 .0651 .0451 .035 .028 .0392 .0362 .0392 .028 .035 .0451 .0651
.0253 .0195 .0253 .0513 .0543 .0415 .0543 .0513
.0153 .023 .0167 .0145 .0167 .023 .0332 .0391 .0391 .0396 .044 .0452 .0498 .0514 .0585 .0655 .0635 .0602 .0635 .0655 .0585 .0514 .0498 .0452 .044 .0396 .0391 .0391 .0332
.0121 .0134 .0158 .0162 .0158 .0134 .0246 .0406 .047 .0404 .0463 .0466 .0435 .0499 .0455 .044 .0411 .049 .0576 .0685 .0618 .0483 .0618 .0685 .0576 .049 .0411 .044 .0486 .0499 .0435 .0466 .0463 .0404 .047 .0406 .0246
.0116 .0167 .016 .018 .016 .0167 .0196 .0385 .0421 .0497 .0562 .0528 .0428 .0528 .0562 .0497 .0421 .0385 .0196
.0244 .0297 .0244 .0208 .0244 .0297 .0173 .0616 .0659 .0712 .0707 .0685 .0339 .0685 .0707 .0712 .0659 .0616 .0173
"""

# The 294 OKS sigmas of the official evaluation, global order, float64 (pycocotools uses them
# as ``params.kpt_oks_sigmas``).
OKS_SIGMAS = np.array([float(v) for v in _SIGMAS_TEXT.split()], np.float64)
assert OKS_SIGMAS.shape == (NUM_LANDMARKS,)
_rows = [line.split() for line in _SIGMAS_TEXT.strip().splitlines()]
assert [len(r) for r in _rows] == [LANDMARK_COUNTS[c] for c in CATEGORY_IDS]

# Item attributes (each 1..3 in the raw annotation).
ATTRIBUTES = ("scale", "occlusion", "zoom_in", "viewpoint")
SOURCES = ("user", "shop")


def coco_categories() -> list[dict]:
  """The 13 ``categories`` entries of the official COCO conversion."""
  names = [str(i) for i in range(1, NUM_LANDMARKS + 1)]
  return [{"id": cid, "name": COCO_NAMES[cid], "supercategory": "clothes",
           "keypoints": list(names), "skeleton": []} for cid in CATEGORY_IDS]


def category_from_raw_name(name: str) -> int | None:
  """1..13 for a raw category name, None when unknown."""
  for cid, raw in RAW_NAMES.items():
    if raw == name:
      return cid
  return None
