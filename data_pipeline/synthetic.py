r"""Synthetic DeepFashion2: the project's embedded default dataset.

  python -m data_pipeline.synthetic --train_pairs 1800 --val_pairs 50 --image_size 128 \
      --seed 0 --workers 2

writes ``data/synthetic/s0_t1800_v50_px128_g2/`` (``cache_root``: where ``run.py`` with the demo
config, whose numbers these are and the defaults, generates and reads the same data;
``--synthetic_dir`` changes the parent, ``--out ROOT`` writes to exactly ROOT), with
``train/{image,annos}`` and ``validation/{image,annos}`` in the raw
DeepFashion2 layout (``image/NNNNNN.jpg`` + ``annos/NNNNNN.json``, six digits, 1-based), so every
reader of the real data reads it unchanged (``annotations.scan_raw_root`` accepts it).

What is in it:
  * all 13 categories as garment silhouettes following the dataset's landmark figure. Each
    category is a template in a unit frame (x right, y down, the garment's axis at x = 0): the
    landmarks of one side and of the axis are written by hand in ``_TEMPLATES``, the other side
    is derived by mirroring through ``local_flip_perm``, and the silhouette is a union of
    polygons through the landmarks (body, sleeves, straps, the two panels of an open jacket), so
    every landmark lies on the outline or inside (collar points). A per-item deformation (width,
    length, flare, neck, sleeve angle and length, jacket opening) keeps the mirror structure; a
    similarity transform places the garment in the image.
  * image pairs: every pair_id has one shop image (plain light background, garment large,
    upright and centred, viewpoint 1) and one user image (textured background with clutter,
    scaled, rotated, sometimes cropped by the border, occluded by other garments and by
    occluder blobs; viewpoint 2 or 3) sharing a style > 0 item of the same category. Items with
    equal (pair_id, style > 0) share shape and appearance (base colour and a plain / stripes /
    dots / checks pattern, derived from (seed, split, pair_id, style)); style-0 distractors look
    random. Tops are drawn above bottoms on the same person, overlapping at the waist.
  * annotations computed from the rendering: the segmentation is traced from each item's
    visible mask (after occlusion and the image border), the box is that mask's bounds, the
    landmark visibility is 2 where the landmark lies on the visible mask (within 1 px), 1 where
    it lies on the hidden part of the garment, 0 outside the image (or, for ~5%, unlabelled);
    scale, occlusion and zoom_in are measured from the masks.

Coordinates are continuous pixel coordinates (pixel (i, j) covers [j, j+1) x [i, i+1)), except
landmarks: like the real annotations they are written as the integer index of the pixel that
holds them, (floor(x), floor(y)), which the loader maps back to that pixel's centre
(``transforms.landmarks_to_continuous``: + 0.5), within half a pixel of the rendered point and
without bias (rounding to the nearest integer would put the training target 0.5 px right of and
below the point on average). Everything is deterministic: image ``index`` of a split draws
from ``np.random.default_rng([seed, split_code, index])`` and shared pair properties from
generators keyed by (seed, split_code, pair_id), so the output does not depend on ``--workers``.
"""

from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import math
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any

from absl import logging
import cv2
import numpy as np

from data_pipeline import deepfashion2 as df2

SPLITS = {"train": 0, "validation": 1}
JPEG_QUALITY = 90
ASPECTS = (0.75, 1.0, 4.0 / 3.0)  # Image height / width.
UNLABELLED_RATE = 0.05
_SHIFT = 4  # cv2.fillPoly sub-pixel bits.
_ONE = 1 << _SHIFT
_APPROX_EPS = 0.7  # approxPolyDP tolerance, pixels.
_OPEN_KERNEL = np.ones((3, 3), np.uint8)
_MIN_CONTOUR_AREA = 6.0  # Contours of a smaller area (through pixel centres) are dropped.

# ---------------------------------------------------------------------------------------------
# Garment templates.
#
# ``pts``: "i:x,y" for the 1-based landmarks of the image-left side (x < 0) and of the axis
# (x = 0); the image-right side is their mirror image through local_flip_perm.
# ``polys``: silhouette polygons (1-based landmark indices) given in full.
# ``side``: polygons of the left side, mirrored to the right (sleeves, jacket panels).
# ``straps``: (a, b) segments drawn as thin bands (sling straps), mirrored.
# ``sleeve``: (pivot, indices): left-sleeve landmarks that rotate about the pivot.
# ``opening``: landmarks of the front opening of a jacket (moved outwards to open it).
# ``neck``: the neck-hole polygon (shaded darker, the inside of the garment), if any.
# ``kind``: "top", "bottom" or "dress" (for outfits: tops go above bottoms).

_COLLAR = "1:0,.03 2:-.12,0 3:-.08,.06 4:0,.1"
_SHORT_SLEEVE = "7:-.26,.04 8:-.33,.1 9:-.4,.18 10:-.33,.25 11:-.29,.22 12:-.24,.19"
_LONG_SLEEVE = ("7:-.26,.04 8:-.31,.16 9:-.35,.3 10:-.38,.44 11:-.4,.58 12:-.32,.6 13:-.3,.46 "
                "14:-.28,.34 15:-.26,.24 16:-.23,.18")
_NECK = "2,3,4,5,6,1"
_OPEN_COLLAR = "1:0,.03 2:-.12,0 3:-.08,.06 4:-.03,.11"


def _seq(a: int, b: int) -> str:
  return ",".join(str(i) for i in range(a, b + 1))


_TEMPLATES: dict[int, dict[str, Any]] = {
    1: dict(kind="top",
            pts=f"{_COLLAR} {_SHORT_SLEEVE} 13:-.24,.32 14:-.245,.5 15:-.25,.7 16:0,.72",
            polys=[f"2,7,{_seq(12, 20)},25,6,1"], side=["7,8,9,10,11,12"],
            sleeve=(7, (8, 9, 10, 11)), neck=_NECK),
    2: dict(kind="top",
            pts=f"{_COLLAR} {_LONG_SLEEVE} 17:-.235,.32 18:-.24,.5 19:-.25,.7 20:0,.72",
            polys=[f"2,7,{_seq(16, 24)},33,6,1"], side=[_seq(7, 16)],
            sleeve=(7, tuple(range(8, 16))), neck=_NECK),
    3: dict(kind="top",
            pts=(f"{_OPEN_COLLAR} {_SHORT_SLEEVE} 13:-.24,.32 14:-.245,.5 15:-.25,.7 "
                 "16:-.03,.72 30:-.03,.3 31:-.03,.5"),
            polys=["2,1,6,5,26,4,3"], side=["2,7,12,13,14,15,16,31,30,4,3", "7,8,9,10,11,12"],
            sleeve=(7, (8, 9, 10, 11)), opening=(4, 16, 30, 31, 26, 29, 27, 28),
            neck="2,3,4,26,5,6,1"),
    4: dict(kind="top",
            pts=(f"{_OPEN_COLLAR} {_LONG_SLEEVE} 17:-.235,.32 18:-.24,.5 19:-.25,.7 "
                 "20:-.03,.72 38:-.03,.3 39:-.03,.5"),
            polys=["2,1,6,5,34,4,3"], side=["2,7,16,17,18,19,20,39,38,4,3", _seq(7, 16)],
            sleeve=(7, tuple(range(8, 16))), opening=(4, 20, 38, 39, 34, 37, 35, 36),
            neck="2,3,4,34,5,6,1"),
    5: dict(kind="top",
            pts="1:0,.03 2:-.12,0 3:-.09,.08 4:0,.14 7:-.19,0 8:-.25,.22 9:-.25,.42 "
                "10:-.26,.68 11:0,.7",
            polys=[f"2,{_seq(7, 15)},6,1"], neck=_NECK),
    6: dict(kind="top",
            pts="1:0,.06 2:-.12,.02 3:-.07,.07 4:0,.1 7:-.14,-.14 8:-.23,.16 9:-.22,.36 "
                "10:-.25,.62 11:0,.63",
            polys=[f"2,{_seq(8, 14)},6,1"], straps=[(7, 2)], neck=_NECK),
    7: dict(kind="bottom",
            pts="1:-.25,0 2:0,.01 4:-.27,.22 5:-.3,.45 6:-.03,.47 7:0,.25",
            polys=[f"1,{_seq(4, 10)},3,2"]),
    8: dict(kind="bottom",
            pts="1:-.25,0 2:0,.01 4:-.27,.25 5:-.26,.6 6:-.25,1 7:-.06,1 8:-.04,.6 9:0,.28",
            polys=[f"1,{_seq(4, 14)},3,2"]),
    9: dict(kind="bottom",
            pts="1:-.22,0 2:0,.01 4:-.28,.25 5:-.36,.55 6:0,.58",
            polys=[f"1,{_seq(4, 8)},3,2"]),
    10: dict(kind="dress",
             pts=(f"{_COLLAR} 7:-.24,.04 8:-.3,.1 9:-.36,.17 10:-.3,.23 11:-.26,.2 12:-.22,.17 "
                  "13:-.21,.3 14:-.19,.42 15:-.22,.6 16:-.28,.85 17:-.34,1.1 18:0,1.12"),
             polys=[f"2,7,{_seq(12, 24)},29,6,1"], side=["7,8,9,10,11,12"],
             sleeve=(7, (8, 9, 10, 11)), neck=_NECK),
    11: dict(kind="dress",
             pts=(f"{_COLLAR} 7:-.24,.04 8:-.29,.16 9:-.33,.3 10:-.36,.44 11:-.38,.58 "
                  "12:-.3,.6 13:-.28,.46 14:-.26,.34 15:-.24,.24 16:-.21,.18 17:-.2,.3 "
                  "18:-.19,.42 19:-.21,.58 20:-.27,.85 21:-.34,1.12 22:0,1.14"),
             polys=[f"2,7,{_seq(16, 28)},37,6,1"], side=[_seq(7, 16)],
             sleeve=(7, tuple(range(8, 16))), neck=_NECK),
    12: dict(kind="dress",
             pts="1:0,.03 2:-.12,0 3:-.09,.08 4:0,.14 7:-.19,0 8:-.23,.2 9:-.21,.32 "
                 "10:-.2,.44 11:-.25,.7 12:-.34,1.05 13:0,1.07",
             polys=[f"2,{_seq(7, 19)},6,1"], neck=_NECK),
    13: dict(kind="dress",
             pts="1:0,.06 2:-.12,.02 3:-.07,.07 4:0,.1 7:-.14,-.14 8:-.22,.16 9:-.2,.3 "
                 "10:-.2,.44 11:-.25,.7 12:-.34,1.02 13:0,1.04",
             polys=[f"2,{_seq(8, 18)},6,1"], straps=[(7, 2)], neck=_NECK),
}

TOPS = tuple(c for c, t in _TEMPLATES.items() if t["kind"] == "top")
BOTTOMS = tuple(c for c, t in _TEMPLATES.items() if t["kind"] == "bottom")
DRESSES = tuple(c for c, t in _TEMPLATES.items() if t["kind"] == "dress")


def _indices(text: str) -> np.ndarray:
  return np.array([int(v) - 1 for v in text.split(",")], np.int64)


@dataclasses.dataclass(frozen=True)
class Template:
  """A category's garment in the unit frame (0-based landmark indices)."""
  category_id: int
  kind: str
  points: np.ndarray  # [n, 2] float64, landmark positions.
  polygons: tuple[np.ndarray, ...]  # Silhouette = union of these (landmark index arrays).
  straps: tuple[tuple[int, int], ...]
  sleeves: tuple[tuple[int, np.ndarray], ...]  # (pivot, sleeve indices), left then right.
  opening: np.ndarray
  neck: np.ndarray | None
  side: np.ndarray  # [n] -1 left, 0 axis, +1 right.


def _build_template(cid: int) -> Template:
  spec = _TEMPLATES[cid]
  perm = df2.local_flip_perm(cid)
  n = df2.LANDMARK_COUNTS[cid]
  points = np.full((n, 2), np.nan)
  for entry in spec["pts"].split():
    index, xy = entry.split(":")
    x, y = (float(v) for v in xy.split(","))
    i = int(index) - 1
    if perm[i] == i and x != 0.0:
      raise ValueError(f"category {cid}: unpaired landmark {i + 1} off the axis")
    if perm[i] != i and x >= 0.0:
      raise ValueError(f"category {cid}: paired landmark {i + 1} must be given on the left")
    points[i] = (x, y)
  defined = ~np.isnan(points[:, 0])
  for i in np.flatnonzero(defined):
    j = perm[i]
    if j != i:
      if defined[j]:
        raise ValueError(f"category {cid}: landmarks {i + 1} and {j + 1} both given")
      points[j] = (-points[i, 0], points[i, 1])
  if np.isnan(points).any():
    missing = np.flatnonzero(np.isnan(points[:, 0])) + 1
    raise ValueError(f"category {cid}: landmarks {missing.tolist()} undefined")

  polygons = [_indices(p) for p in spec.get("polys", ())]
  for p in spec.get("side", ()):
    left = _indices(p)
    polygons += [left, perm[left][::-1]]
  straps = []
  for a, b in spec.get("straps", ()):
    straps += [(a - 1, b - 1), (int(perm[a - 1]), int(perm[b - 1]))]
  sleeves = []
  if "sleeve" in spec:
    pivot, idx = spec["sleeve"]
    idx = np.array(idx, np.int64) - 1
    sleeves = [(pivot - 1, idx), (int(perm[pivot - 1]), perm[idx])]
  opening = np.array(spec.get("opening", ()), np.int64) - 1
  neck = _indices(spec["neck"]) if "neck" in spec else None
  side = np.sign(np.round(points[:, 0], 9)).astype(np.int64)
  return Template(cid, spec["kind"], points, tuple(polygons), tuple(straps), tuple(sleeves),
                  opening, neck, side)


TEMPLATES: dict[int, Template] = {cid: _build_template(cid) for cid in df2.CATEGORY_IDS}


def template_polygons(cid: int, points: np.ndarray | None = None,
                      strap_width: float = 0.03) -> list[np.ndarray]:
  """The silhouette polygons ([m, 2] arrays) of category ``cid`` for ``points`` (default: the
  undeformed template). Their union is the garment."""
  t = TEMPLATES[cid]
  points = t.points if points is None else points
  polys = [points[p] for p in t.polygons]
  for a, b in t.straps:
    polys.append(_band(points[a], points[b], strap_width))
  return polys


def mirror_points(cid: int, points: np.ndarray) -> np.ndarray:
  """Mirrors a garment about x = 0 and relabels it: landmark i of the result is the mirror
  image of landmark local_flip_perm(cid)[i]. A symmetric template is its own mirror image."""
  perm = df2.local_flip_perm(cid)
  mirrored = points * np.array([-1.0, 1.0])
  return mirrored[perm]


def _band(a: np.ndarray, b: np.ndarray, width: float) -> np.ndarray:
  """A rectangle of ``width`` around segment a-b, extended by width/2 past both ends."""
  d = b - a
  d = d / max(np.hypot(d[0], d[1]), 1e-9)
  nrm = np.array([-d[1], d[0]]) * (width / 2)
  a2, b2 = a - d * (width / 2), b + d * (width / 2)
  return np.stack([a2 + nrm, b2 + nrm, b2 - nrm, a2 - nrm])


# ---------------------------------------------------------------------------------------------
# Shape, appearance and pairs.


@dataclasses.dataclass(frozen=True)
class Appearance:
  color: tuple[float, float, float]  # BGR 0..255.
  pattern: str  # "plain", "stripes", "dots", "checks".
  color2: tuple[float, float, float]
  period: float  # Garment units.
  angle: float  # Radians.
  duty: float


@dataclasses.dataclass(frozen=True)
class Shape:
  width: float
  length: float
  flare: float
  neck: float
  sleeve_angle: float  # Radians, outwards.
  sleeve_length: float
  opening: float
  strap_width: float


@dataclasses.dataclass(frozen=True)
class ItemStyle:
  """What identifies a product: category, style, shape and appearance."""
  category_id: int
  style: int
  shape: Shape
  appearance: Appearance


@dataclasses.dataclass(frozen=True)
class PairSpec:
  """What the shop and the user image of one pair_id share."""
  pair_id: int
  key: ItemStyle  # Style 1, in both images.
  partner: ItemStyle | None  # Style 2, always in the shop image, sometimes in the user image.


def _bgr(h: float, s: float, v: float) -> tuple[float, float, float]:
  r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
  return (b * 255.0, g * 255.0, r * 255.0)


def random_appearance(rng: np.random.Generator) -> Appearance:
  h, s, v = rng.random(), rng.uniform(0.25, 0.95), rng.uniform(0.3, 0.95)
  pattern = ("plain", "stripes", "dots", "checks")[int(rng.choice(4, p=(0.3, 0.3, 0.2, 0.2)))]
  h2 = h + rng.uniform(0.15, 0.85)
  v2 = v + rng.choice((-1.0, 1.0)) * rng.uniform(0.25, 0.5)
  if not 0.1 <= v2 <= 1.0:
    v2 = v - math.copysign(rng.uniform(0.25, 0.5), v2 - v)
  color2 = _bgr(h2, rng.uniform(0.0, 0.9), float(np.clip(v2, 0.05, 1.0)))
  return Appearance(_bgr(h, s, v), pattern, color2, float(rng.uniform(0.04, 0.14)),
                    float(rng.uniform(0.0, math.pi)), float(rng.uniform(0.3, 0.6)))


def random_shape(rng: np.random.Generator, cid: int) -> Shape:
  kind = TEMPLATES[cid].kind
  flare_hi = {"top": 0.1, "bottom": 0.35, "dress": 0.35}[kind]
  return Shape(width=float(rng.uniform(0.85, 1.15)), length=float(rng.uniform(0.85, 1.2)),
               flare=float(rng.uniform(-0.08, flare_hi)), neck=float(rng.uniform(0.8, 1.2)),
               sleeve_angle=float(np.deg2rad(rng.uniform(-4.0, 25.0))),
               sleeve_length=float(rng.uniform(0.85, 1.15)), opening=float(rng.uniform(0, 0.07)),
               strap_width=float(rng.uniform(0.025, 0.04)))


def random_item(rng: np.random.Generator, cid: int, style: int) -> ItemStyle:
  return ItemStyle(cid, style, random_shape(rng, cid), random_appearance(rng))


def make_pair_spec(seed: int, split_code: int, pair_id: int,
                   key_category: int | None = None) -> PairSpec:
  """The shared part of one pair_id, derived from (seed, split_code, pair_id) alone."""
  rng = np.random.default_rng([seed, split_code, pair_id, 1])
  cid = int(rng.integers(1, 14)) if key_category is None else int(key_category)
  with_partner = rng.random() < 0.4
  partner_cid = int(rng.choice(BOTTOMS if cid in TOPS else TOPS))
  kind = TEMPLATES[cid].kind
  # Shape and appearance of (pair_id, style) come from their own generator.
  key = random_item(np.random.default_rng([seed, split_code, pair_id, 2, 1]), cid, 1)
  partner = None
  if with_partner and kind != "dress":
    partner = random_item(np.random.default_rng([seed, split_code, pair_id, 2, 2]),
                          partner_cid, 2)
  return PairSpec(pair_id, key, partner)


def deform(cid: int, shape: Shape, *, sleeve_jitter: tuple[float, float] = (0.0, 0.0),
           squeeze: float = 1.0) -> np.ndarray:
  """The landmarks of category ``cid`` deformed by ``shape`` (mirror-symmetric unless the
  left/right ``sleeve_jitter`` angles differ), in garment units."""
  t = TEMPLATES[cid]
  pts = t.points.copy()
  collar = np.zeros(0, np.int64)
  if t.neck is not None:  # Landmarks 1-6 and their mirror images (4 <-> 26 on a jacket).
    collar = np.union1d(np.arange(6), df2.local_flip_perm(cid)[:6])
  pts[collar, 0] *= shape.neck
  if t.opening.size:
    pts[t.opening, 0] += np.sign(pts[t.opening, 0]) * shape.opening
  in_sleeve = np.zeros(len(pts), bool)
  for k, (pivot, idx) in enumerate(t.sleeves):
    in_sleeve[idx] = True
    sign = -1.0 if k == 0 else 1.0  # Work in the left frame: mirror the right sleeve there.
    flip = np.array([-sign, 1.0])
    p0 = pts[pivot] * flip
    v = (pts[idx] * flip - p0) * shape.sleeve_length
    a = shape.sleeve_angle + sleeve_jitter[k]
    c, s = math.cos(a), math.sin(a)
    v = v @ np.array([[c, s], [-s, c]])
    pts[idx] = (p0 + v) * flip
  y0 = 0.3 if t.kind != "bottom" else 0.05
  body = ~in_sleeve
  pts[body, 0] *= 1.0 + shape.flare * np.clip(pts[body, 1] - y0, 0.0, None)
  pts[:, 0] *= shape.width * squeeze
  pts[:, 1] *= shape.length
  return pts


# ---------------------------------------------------------------------------------------------
# Rasterisation.


def _fill(canvas: np.ndarray, polys: Sequence[np.ndarray], value, offset=(0.0, 0.0)) -> None:
  """Fills continuous-coordinate polygons (pixel centres at +0.5) with sub-pixel accuracy."""
  pts = [np.round((np.asarray(p, np.float64) - 0.5 - np.asarray(offset)) * _ONE).astype(np.int32)
         for p in polys]
  for p in pts:  # One call per polygon: the union, whatever their orientation.
    cv2.fillPoly(canvas, [p], value, lineType=cv2.LINE_8, shift=_SHIFT)


@dataclasses.dataclass
class _Placed:
  item: ItemStyle
  points: np.ndarray  # Landmarks in image coordinates.
  polys: list[np.ndarray]  # Silhouette polygons in image coordinates.
  neck: np.ndarray | None
  matrix: np.ndarray  # [2, 3]: image = matrix @ [garment, 1].
  viewpoint: int
  brightness: float
  # Filled by _rasterise.
  origin: tuple[int, int] = (0, 0)  # (x0, y0) of the local canvas.
  local: np.ndarray | None = None  # Full silhouette on the local canvas, uint8.
  full_area: int = 0
  full: np.ndarray | None = None  # Silhouette within the image, bool [H, W].


def _place(item: ItemStyle, matrix: np.ndarray, viewpoint: int, rng: np.random.Generator,
           jitter: float, brightness: float) -> _Placed:
  cid = item.category_id
  squeeze = float(rng.uniform(0.72, 0.88)) if viewpoint == 3 else 1.0
  sj = (float(rng.normal(0, jitter)), float(rng.normal(0, jitter))) if jitter else (0.0, 0.0)
  g = deform(cid, item.shape, sleeve_jitter=sj, squeeze=squeeze)
  polys = template_polygons(cid, g, item.shape.strap_width)
  t = TEMPLATES[cid]
  a, b = matrix[:, :2], matrix[:, 2]
  to_image = lambda p: p @ a.T + b
  neck = to_image(g[t.neck]) if t.neck is not None and viewpoint != 3 else None
  return _Placed(item, to_image(g), [to_image(p) for p in polys], neck, matrix, viewpoint,
                 brightness)


def _extent(item: ItemStyle) -> np.ndarray:
  """[x0, y0, x1, y1] of the item's undeformed-pose silhouette in garment units."""
  g = deform(item.category_id, item.shape)
  allp = np.concatenate(template_polygons(item.category_id, g, item.shape.strap_width))
  return np.concatenate([allp.min(0), allp.max(0)])


def _similarity(scale: float, angle: float, src_center: np.ndarray,
                dst_center: np.ndarray) -> np.ndarray:
  c, s = math.cos(angle) * scale, math.sin(angle) * scale
  a = np.array([[c, -s], [s, c]])
  return np.concatenate([a, (dst_center - a @ src_center)[:, None]], axis=1)


def _rasterise(p: _Placed, height: int, width: int) -> None:
  allp = np.concatenate(p.polys)
  x0, y0 = (int(math.floor(v)) - 1 for v in allp.min(0))
  x1, y1 = (int(math.ceil(v)) + 1 for v in allp.max(0))
  local = np.zeros((y1 - y0, x1 - x0), np.uint8)
  _fill(local, p.polys, 1, offset=(x0, y0))
  p.origin, p.local, p.full_area = (x0, y0), local, int(local.sum())
  full = np.zeros((height, width), bool)
  cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)
  if cx1 > cx0 and cy1 > cy0:
    full[cy0:cy1, cx0:cx1] = local[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0] > 0
  p.full = full


# ---------------------------------------------------------------------------------------------
# Painting.


def _texture(p: _Placed, x0: int, y0: int, x1: int, y1: int, rng: np.random.Generator,
             user: bool) -> np.ndarray:
  """The item's pixels over image window [y0:y1, x0:x1], float32 BGR."""
  app = p.item.appearance
  a, b = p.matrix[:, :2], p.matrix[:, 2]
  inv = np.linalg.inv(a)
  xs = np.arange(x0, x1, dtype=np.float32) + 0.5 - b[0]
  ys = np.arange(y0, y1, dtype=np.float32) + 0.5 - b[1]
  # Garment coordinates of the pixel centres.
  gu = inv[0, 0] * xs[None, :] + inv[0, 1] * ys[:, None]
  gv = inv[1, 0] * xs[None, :] + inv[1, 1] * ys[:, None]
  c1 = np.array(app.color, np.float32)
  c2 = np.array(app.color2, np.float32)
  ca, sa = math.cos(app.angle), math.sin(app.angle)
  t1 = (gu * ca + gv * sa) / app.period
  if app.pattern == "plain":
    out = np.broadcast_to(c1, gu.shape + (3,)).copy()
  else:
    if app.pattern == "stripes":
      on = (t1 - np.floor(t1)) < app.duty
    else:
      t2 = (-gu * sa + gv * ca) / app.period
      if app.pattern == "checks":
        on = ((np.floor(t1) + np.floor(t2)) % 2) == 0
      else:  # dots
        d1, d2 = t1 - np.floor(t1) - 0.5, t2 - np.floor(t2) - 0.5
        on = d1 * d1 + d2 * d2 < (0.5 * app.duty) ** 2
    out = np.where(on[..., None], c2, c1)
  # Soft lighting across the garment (a fold-like gradient) and the image's light.
  light = 1.0 + 0.12 * np.sin(gu * 9.0 + gv * 3.0) - 0.1 * gv
  out *= (light * p.brightness)[..., None].astype(np.float32)
  canvas = out
  if p.neck is not None:  # The inside of the garment seen through the neck hole.
    hole = np.zeros(gu.shape, np.uint8)
    _fill(hole, [p.neck], 1, offset=(x0, y0))
    canvas = np.where(hole[..., None] > 0, canvas * 0.55, canvas)
  edge = np.zeros(gu.shape, np.uint8)
  for poly in p.polys:
    q = np.round((poly - 0.5 - np.array([x0, y0])) * _ONE).astype(np.int32)
    cv2.polylines(edge, [q], True, 1, 1, cv2.LINE_8, _SHIFT)
  canvas = np.where(edge[..., None] > 0, canvas * 0.7, canvas)
  if user:
    canvas = canvas + rng.normal(0, 4.0, size=3).astype(np.float32)
  return canvas


def _background(rng: np.random.Generator, height: int, width: int, user: bool) -> np.ndarray:
  if not user:
    base = rng.uniform(215, 250)
    tint = rng.uniform(-8, 8, size=3)
    grad = np.linspace(-6, 6, height, dtype=np.float32)[:, None, None]
    return (np.full((height, width, 3), base, np.float32) + tint.astype(np.float32) + grad)
  grid = rng.uniform(30, 230, size=(int(rng.integers(2, 6)), int(rng.integers(2, 6)), 3))
  img = cv2.resize(grid.astype(np.float32), (width, height), interpolation=cv2.INTER_CUBIC)
  s = max(height, width)
  for _ in range(int(rng.integers(3, 9))):
    color = tuple(float(v) for v in rng.uniform(0, 255, size=3))
    kind = int(rng.integers(0, 3))
    cx, cy = int(rng.integers(0, width)), int(rng.integers(0, height))
    r = int(rng.uniform(0.04, 0.25) * s)
    if kind == 0:
      cv2.rectangle(img, (cx - r, cy - r // 2), (cx + r, cy + r), color, -1)
    elif kind == 1:
      cv2.circle(img, (cx, cy), r, color, -1)
    else:
      ex, ey = int(rng.integers(0, width)), int(rng.integers(0, height))
      cv2.line(img, (cx, cy), (ex, ey), color, max(1, r // 6))
  return img


def _occluders(rng: np.random.Generator, placed: list[_Placed], height: int, width: int
               ) -> list[tuple[np.ndarray, tuple[float, float, float]]]:
  """Blobs (hands, bags, hair) in front of the garments: (polygon, colour) each."""
  out = []
  s = max(height, width)
  for _ in range(int(rng.choice(3, p=(0.45, 0.4, 0.15)))):
    target = placed[int(rng.integers(len(placed)))]
    allp = np.concatenate(target.polys)
    lo, hi = allp.min(0), allp.max(0)
    centre = lo + rng.uniform(0.0, 1.0, size=2) * (hi - lo)
    n = int(rng.integers(5, 10))
    ang = np.sort(rng.uniform(0, 2 * math.pi, size=n))
    r = rng.uniform(0.05, 0.14) * s * rng.uniform(0.6, 1.0, size=n)
    elong = rng.uniform(0.5, 1.0)
    rot = rng.uniform(0, math.pi)
    ex, ey = np.cos(ang) * r, np.sin(ang) * r * elong
    poly = np.stack([ex * math.cos(rot) - ey * math.sin(rot) + centre[0],
                     ex * math.sin(rot) + ey * math.cos(rot) + centre[1]], axis=1)
    if rng.random() < 0.5:
      color = _bgr(rng.uniform(0.02, 0.1), rng.uniform(0.3, 0.6), rng.uniform(0.5, 0.95))
    else:
      color = tuple(float(v) for v in rng.uniform(0, 255, size=3))
    out.append((poly, color))
  return out


# ---------------------------------------------------------------------------------------------
# Layout.


def _outfit(items: list[ItemStyle], rng: np.random.Generator
            ) -> tuple[list[ItemStyle], list[np.ndarray], np.ndarray]:
  """Stacks a top over a bottom (one person). Returns items in draw order, their offsets in
  garment units and the outfit's extent [x0, y0, x1, y1]."""
  tops = [it for it in items if TEMPLATES[it.category_id].kind != "bottom"]
  bottoms = [it for it in items if TEMPLATES[it.category_id].kind == "bottom"]
  offsets, extents = {}, []
  y = 0.0
  if tops:
    top = tops[0]
    e = _extent(top)
    offsets[id(top)] = np.zeros(2)
    extents.append(e)
    hem = float(deform(top.category_id, top.shape)[:, 1].max())
    y = hem - rng.uniform(0.08, 0.16)
  if bottoms:
    bottom = bottoms[0]
    off = np.array([0.0, y])
    offsets[id(bottom)] = off
    e = _extent(bottom)
    extents.append(e + np.concatenate([off, off]))
  ext = np.stack(extents)
  extent = np.concatenate([ext[:, :2].min(0), ext[:, 2:].max(0)])
  ordered = bottoms[:1] + tops[:1]
  if len(ordered) == 2 and rng.random() < 0.25:  # Tucked in.
    ordered = ordered[::-1]
  return ordered, [offsets[id(it)] for it in ordered], extent


def _layout(rng: np.random.Generator, spec: PairSpec, source: str, height: int, width: int,
            with_occluders: bool, with_distractors: bool) -> tuple[list[_Placed], list]:
  """Places the items of one image (draw order, back to front) and its occluders."""
  user = source == "user"
  outfit = [spec.key]
  if spec.partner is not None and (not user or rng.random() < 0.6):
    outfit.append(spec.partner)
  elif user and with_distractors and TEMPLATES[spec.key.category_id].kind != "dress" \
      and rng.random() < 0.35:
    other = BOTTOMS if spec.key.category_id in TOPS else TOPS
    outfit.append(random_item(rng, int(rng.choice(other)), 0))
  ordered, offsets, ext = _outfit(outfit, rng)
  size = ext[2:] - ext[:2]
  centre = (ext[:2] + ext[2:]) / 2
  placed = []
  if not user:
    scale = rng.uniform(0.78, 0.92) * min(height / size[1], width / size[0])
    dst = np.array([width / 2, height / 2]) + rng.uniform(-0.02, 0.02, size=2) * width
    for it, off in zip(ordered, offsets):
      m = _similarity(scale, 0.0, centre - off, dst)
      placed.append(_place(it, m, 1, rng, 0.0, 1.0))
    return placed, []

  cropped = rng.random() < 0.25
  frac = rng.uniform(0.7, 1.25) if cropped else rng.uniform(0.4, 0.9)
  scale = frac * min(height / size[1], 1.15 * width / size[0])
  angle = float(np.deg2rad(np.clip(rng.normal(0, 8), -20, 20)))
  half = size * scale / 2
  spread = 0.45 if cropped else 0.15
  lo = np.minimum(half, [width / 2, height / 2]) - spread * np.array([width, height])
  hi = np.array([width, height]) - lo
  dst = np.array([rng.uniform(lo[0], max(lo[0], hi[0])), rng.uniform(lo[1], max(lo[1], hi[1]))])
  viewpoint = 3 if rng.random() < 0.25 else 2
  brightness = rng.uniform(0.75, 1.15)
  person = []
  for it, off in zip(ordered, offsets):
    m = _similarity(scale, angle, centre - off, dst)
    person.append(_place(it, m, viewpoint, rng, np.deg2rad(6), brightness))
  placed = person
  n_free = int(rng.choice(3, p=(0.4, 0.4, 0.2))) if with_distractors else 0
  for _ in range(min(n_free, 3 - len(person))):
    it = random_item(rng, int(rng.integers(1, 14)), 0)
    e = _extent(it)
    sz = e[2:] - e[:2]
    sc = rng.uniform(0.3, 0.7) * min(height / sz[1], width / sz[0])
    ang = float(np.deg2rad(rng.uniform(-20, 20)))
    d = np.array([rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height])
    m = _similarity(sc, ang, (e[:2] + e[2:]) / 2, d)
    p = _place(it, m, 3 if rng.random() < 0.3 else 2, rng, np.deg2rad(6),
               rng.uniform(0.75, 1.15))
    if rng.random() < 0.5:
      placed = [p] + placed
    else:
      placed = placed + [p]
  occ = _occluders(rng, person, height, width) if with_occluders and rng.random() < 0.5 else []
  return placed, occ


# ---------------------------------------------------------------------------------------------
# One image.


@dataclasses.dataclass
class Rendered:
  """One synthetic image with its raw annotation and the masks it was measured from."""
  image: np.ndarray  # uint8 [H, W, 3], BGR (as written to the JPEG).
  annotation: dict[str, Any]  # The raw DeepFashion2 JSON object.
  full_masks: list[np.ndarray]  # Per annotated item (item1, item2, ...): silhouette in image.
  visible_masks: list[np.ndarray]  # Per annotated item: the visible part.
  occluder_mask: np.ndarray  # bool [H, W]: the occluder blobs.
  landmarks: list[np.ndarray]  # Per item: [n, 2] float64 continuous landmark positions.


def _level(frac: float, lo: float, hi: float) -> int:
  return 1 if frac < lo else (2 if frac < hi else 3)


def _trace(visible: np.ndarray) -> list[np.ndarray]:
  """Polygons ([m, 2] int) of a visible mask; removes dropped fragments from the mask.

  The mask is first opened with a 3 x 3 kernel: parts thinner than 3 px (a far-away strap)
  would become zero-area slivers as integer polygons, so the mask, the polygons and the
  landmark visibility measured from the mask would disagree.
  """
  u8 = cv2.morphologyEx(visible.astype(np.uint8), cv2.MORPH_OPEN, _OPEN_KERNEL)
  visible[:] = u8 > 0
  contours, _ = cv2.findContours(u8, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
  kept, dropped = [], []
  for c in contours:
    approx = cv2.approxPolyDP(c, _APPROX_EPS, True)
    if len(approx) >= 3 and cv2.contourArea(c) >= _MIN_CONTOUR_AREA:
      kept.append(approx.reshape(-1, 2))
    else:
      dropped.append(c)
  if dropped:
    cv2.drawContours(u8, dropped, -1, 0, thickness=-1)
    visible[:] = u8 > 0
  return kept


def _measure(placed: list[_Placed], occ_mask: np.ndarray, height: int, width: int,
             min_pixels: int) -> tuple[list[np.ndarray], list[int]]:
  """Visible masks (front to back occlusion) and the indices of items too hidden to keep."""
  covered = occ_mask.copy()
  visible = [None] * len(placed)
  for k in range(len(placed) - 1, -1, -1):
    visible[k] = placed[k].full & ~covered
    covered |= placed[k].full
  bad = [k for k, p in enumerate(placed)
         if visible[k].sum() < max(min_pixels, 0.12 * p.full_area)]
  return visible, bad


def render_image(rng: np.random.Generator, spec: PairSpec, source: str,
                 image_size: int) -> Rendered:
  """Renders one shop or user image of pair ``spec``.

  Args:
    rng: the image's own generator (layout, pose, background, distractors, visibility).
    spec: the pair's shared items (make_pair_spec).
    source: "shop" or "user".
    image_size: the longer side in pixels.

  Returns:
    The image, its raw annotation (items in draw order, back to front) and masks.
  """
  if source not in df2.SOURCES:
    raise ValueError(f"source must be one of {df2.SOURCES}, got {source!r}")
  user = source == "user"
  aspect = ASPECTS[int(rng.integers(len(ASPECTS)))]
  if aspect >= 1.0:
    height, width = image_size, max(8, int(round(image_size / aspect)))
  else:
    height, width = max(8, int(round(image_size * aspect))), image_size
  min_pixels = max(16, int(40 * (image_size / 256) ** 2))
  for attempt in range(8):
    last = attempt == 7
    placed, occ = _layout(rng, spec, source, height, width, with_occluders=not last,
                          with_distractors=not last)
    occ_mask = np.zeros((height, width), np.uint8)
    for poly, _ in occ:
      _fill(occ_mask, [poly], 1)
    occ_mask = occ_mask > 0
    for p in placed:
      _rasterise(p, height, width)
    visible, bad = _measure(placed, occ_mask, height, width, min_pixels)
    while bad and not any(placed[k].item is spec.key for k in bad):
      placed = [p for k, p in enumerate(placed) if k not in bad]
      visible, bad = _measure(placed, occ_mask, height, width, min_pixels)
    if not bad:
      break
  else:
    raise RuntimeError(f"could not lay out pair {spec.pair_id} ({source})")

  # Paint: background, items back to front, occluders, sensor noise.
  img = _background(rng, height, width, user)
  for p in placed:
    x0, y0 = p.origin
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + p.local.shape[1], width), min(y0 + p.local.shape[0], height)
    if cx1 <= cx0 or cy1 <= cy0:
      continue
    tex = _texture(p, cx0, cy0, cx1, cy1, rng, user)
    m = p.full[cy0:cy1, cx0:cx1]
    region = img[cy0:cy1, cx0:cx1]
    region[m] = tex[m]
  for poly, color in occ:
    _fill(img, [poly], color)
  if user:
    img += rng.normal(0.0, 5.0, size=(height, width, 1)).astype(np.float32)
    img = cv2.GaussianBlur(img, (3, 3), 0.6)
  image = np.clip(img + 0.5, 0, 255).astype(np.uint8)

  # Annotate.
  anno: dict[str, Any] = {"source": source, "pair_id": int(spec.pair_id)}
  full_masks, visible_masks, marks = [], [], []
  n_item = 0
  for k, p in enumerate(placed):
    vis = visible[k]
    polys = _trace(vis)
    if not polys:
      continue
    ys, xs = np.nonzero(vis)
    box = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    in_image = int(p.full.sum())
    hidden = 1.0 - vis.sum() / max(in_image, 1)
    cut = 1.0 - in_image / max(p.full_area, 1)
    cid = p.item.category_id
    lm = []
    for x, y in p.points:
      xi, yi = int(math.floor(x)), int(math.floor(y))  # the pixel holding it (module doc)
      v = 0
      if 0 <= xi < width and 0 <= yi < height and rng.random() >= UNLABELLED_RATE:
        win = (slice(max(yi - 1, 0), yi + 2), slice(max(xi - 1, 0), xi + 2))
        if vis[win].any():
          v = 2
        elif p.full[win].any():
          v = 1
      lm += [xi, yi, v] if v else [0, 0, 0]
    n_item += 1
    anno[f"item{n_item}"] = {
        "category_id": cid,
        "category_name": df2.RAW_NAMES[cid],
        "style": int(p.item.style),
        "bounding_box": box,
        "landmarks": lm,
        "segmentation": [[int(v) for v in poly.reshape(-1)] for poly in polys],
        "scale": _level((box[2] - box[0]) * (box[3] - box[1]) / (height * width), 0.10, 0.35),
        "occlusion": _level(hidden, 0.10, 0.40),
        "zoom_in": _level(cut, 0.10, 0.40),
        "viewpoint": int(p.viewpoint),
    }
    full_masks.append(p.full)
    visible_masks.append(vis)
    marks.append(p.points)
  return Rendered(image, anno, full_masks, visible_masks, occ_mask, marks)


def image_rng(seed: int, split_code: int, index: int) -> np.random.Generator:
  """The generator of image ``index`` (0-based) of a split."""
  return np.random.default_rng([seed, split_code, index])


def render_example(seed: int, split_code: int, index: int, image_size: int) -> Rendered:
  """Image ``index`` (0-based) of a split: pair_id = index // 2 + 1; even = shop, odd = user."""
  pair_id = index // 2 + 1
  spec = make_pair_spec(seed, split_code, pair_id)
  return render_image(image_rng(seed, split_code, index), spec,
                      "shop" if index % 2 == 0 else "user", image_size)


# ---------------------------------------------------------------------------------------------
# Writing a dataset.


def _write(path: str, data: bytes) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def _write_example(task: tuple[str, int, int, int, int]) -> int:
  split_dir, seed, split_code, index, image_size = task
  r = render_example(seed, split_code, index, image_size)
  stem = f"{index + 1:06d}"
  ok, jpg = cv2.imencode(".jpg", r.image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
  if not ok:
    raise RuntimeError(f"JPEG encoding failed for {stem}")
  _write(os.path.join(split_dir, "image", stem + ".jpg"), jpg.tobytes())
  _write(os.path.join(split_dir, "annos", stem + ".json"),
         json.dumps(r.annotation, separators=(",", ":")).encode())
  return sum(1 for k in r.annotation if k.startswith("item"))


_STEM = re.compile(r"^(\d{6})\.(jpg|json)$")


def _clear_stale(split_dir: str, num_images: int) -> None:
  """Removes generated files beyond ``num_images`` left by an earlier, larger run."""
  for sub in ("image", "annos"):
    directory = os.path.join(split_dir, sub)
    for name in os.listdir(directory):
      m = _STEM.match(name)
      if m and int(m.group(1)) > num_images:
        os.remove(os.path.join(directory, name))


def generate(out_dir: str | os.PathLike, train_pairs: int, val_pairs: int, image_size: int,
             seed: int, workers: int = 1) -> dict[str, dict[str, int]]:
  """Writes the synthetic dataset; returns {split: {"images", "items", "pairs"}}.

  Every pair_id (1..pairs) gives two images: image 2p-1 (shop) and 2p (user).
  """
  if image_size < 32:
    raise ValueError(f"image_size must be >= 32, got {image_size}")
  if train_pairs < 0 or val_pairs < 0:
    raise ValueError("pair counts must be >= 0")
  out_dir = os.fspath(out_dir)
  counts = {}
  pool = None
  try:
    if workers > 1:
      pool = multiprocessing.get_context("spawn").Pool(workers)
    for split, pairs in (("train", train_pairs), ("validation", val_pairs)):
      split_dir = os.path.join(out_dir, split)
      for sub in ("image", "annos"):
        os.makedirs(os.path.join(split_dir, sub), exist_ok=True)
      n = 2 * pairs
      _clear_stale(split_dir, n)
      tasks = [(split_dir, seed, SPLITS[split], i, image_size) for i in range(n)]
      start = time.perf_counter()
      if pool is not None:
        chunk = max(1, min(32, n // (4 * workers)))
        items = sum(pool.imap(_write_example, tasks, chunksize=chunk))
      else:
        items = sum(_write_example(t) for t in tasks)
      elapsed = time.perf_counter() - start
      counts[split] = {"images": n, "items": items, "pairs": pairs}
      logging.info("%s: %d images, %d items, %d image pairs (%.1f images/s)", split_dir, n,
                   items, pairs, n / max(elapsed, 1e-9))
  finally:
    if pool is not None:
      pool.close()
      pool.join()
  return counts


COMPLETE = "COMPLETE"  # written last into a finished dataset folder


def mark_complete(root: str) -> None:
  """Writes ``root/COMPLETE``: the dataset there is whole (``sources.ensure_synthetic`` reuses
  only such a folder)."""
  with open(os.path.join(root, COMPLETE), "w") as f:
    f.write("ok\n")


# The generator's version, in the cache folder's name: a dataset written by an earlier
# generator (2: landmarks as the pixel holding the point, as DeepFashion2 stores them; 1
# rounded them to the nearest pixel corner) is never reused as if current.
GENERATOR_VERSION = 2


def cache_root(synthetic_dir: str, train_pairs: int, val_pairs: int, image_size: int,
               seed: int) -> str:
  """Where a synthetic dataset of these settings lives under ``synthetic_dir``
  (``config.data.synthetic_dir``): ``s{seed}_t{train}_v{val}_px{size}_g{GENERATOR_VERSION}``.
  ``run.py`` generates it there on first use, and this module's CLI writes it there by
  default, so both share one copy."""
  return os.path.join(synthetic_dir, f"s{seed}_t{train_pairs}_v{val_pairs}_px{image_size}"
                      f"_g{GENERATOR_VERSION}")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      prog="python -m data_pipeline.synthetic",
      description="Write a synthetic DeepFashion2 dataset in the raw layout.")
  parser.add_argument("--synthetic_dir", default="data/synthetic",
                      help="the folder of synthetic datasets (config.data.synthetic_dir); the "
                           "dataset goes to SYNTHETIC_DIR/s{seed}_t{train}_v{val}_px{size}_g{version}/, "
                           "where run.py looks for it")
  parser.add_argument("--out", default=None,
                      help="write the dataset to exactly this root instead (gets train/ and "
                           "validation/; train on it with --config.data.format=raw "
                           "--config.data.root=OUT)")
  # The defaults are configs/demo_synthetic.py's (tests/test_synthetic.py checks it).
  parser.add_argument("--train_pairs", type=int, default=1800,
                      help="pair_ids in train (2 images each)")
  parser.add_argument("--val_pairs", type=int, default=50,
                      help="pair_ids in validation (2 images each)")
  parser.add_argument("--image_size", type=int, default=128, help="longer image side, pixels")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workers", type=int, default=1, help="processes")
  return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
  args = _parse_args(argv)
  logging.set_verbosity(logging.INFO)
  out = args.out or cache_root(args.synthetic_dir, args.train_pairs, args.val_pairs,
                               args.image_size, args.seed)
  generate(out, args.train_pairs, args.val_pairs, args.image_size, args.seed,
           workers=args.workers)
  mark_complete(out)
  if args.out:
    logging.info("Train on it: python run.py ... --config.data.format=raw "
                 "--config.data.root=%s", out)
  else:
    logging.info("run.py reads it with --config.data.synthetic_dir=%s "
                 "--config.data.synthetic_train_pairs=%d --config.data.synthetic_val_pairs=%d "
                 "--config.data.synthetic_image_size=%d --config.data.synthetic_seed=%d (the "
                 "demo config's values are this command's defaults)", args.synthetic_dir,
                 args.train_pairs, args.val_pairs, args.image_size, args.seed)
  return 0


if __name__ == "__main__":
  sys.exit(main())
