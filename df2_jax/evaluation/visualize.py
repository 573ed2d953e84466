"""Pictures of an evaluation: drawn detections and retrieval strips (PNG files and TensorBoard).

``retrieval_strip`` puts a query detection's crop beside the crops of its top-k retrieved
gallery items, each framed green when it is a hit under the official rule (same image as a
correct gallery item, IoU >= 0.5 with it; see ``retrieval``) and red otherwise, so a person
sees at a glance what the matching network ranks first.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from df2_jax.evaluation import retrieval_protocol

GREEN = (40, 200, 60)
RED = (220, 40, 40)
GREY = (128, 128, 128)
BLUE = (40, 90, 220)


def crop_thumbnail(pixels: np.ndarray, box: Sequence[float], height: int) -> np.ndarray:
  """The box's crop of an RGB image, resized to ``height`` rows (aspect kept, width >= 8)."""
  h, w = pixels.shape[:2]
  x1, y1, x2, y2 = (float(v) for v in box)
  x1, x2 = int(np.clip(np.floor(x1), 0, w - 1)), int(np.clip(np.ceil(x2), 1, w))
  y1, y2 = int(np.clip(np.floor(y1), 0, h - 1)), int(np.clip(np.ceil(y2), 1, h))
  crop = pixels[y1:max(y2, y1 + 1), x1:max(x2, x1 + 1)]
  width = max(8, int(round(crop.shape[1] * height / crop.shape[0])))
  return cv2.resize(crop, (width, height), interpolation=cv2.INTER_AREA)


def framed(thumb: np.ndarray, color: tuple[int, int, int], text: str, border: int = 3
           ) -> np.ndarray:
  """A thumbnail in a coloured frame with a line of text under it."""
  out = cv2.copyMakeBorder(thumb, border, border + 14, border, border, cv2.BORDER_CONSTANT,
                           value=color)
  cv2.putText(out, text, (2, out.shape[0] - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.35,
              (255, 255, 255), 1, cv2.LINE_AA)
  return out


def hits_of_entry(entry: dict, query_gt: list[dict], gallery_gt: list[dict], k: int
                  ) -> tuple[list[bool], str]:
  """Which of an entry's first k retrieved items are hits, and the query's status.

  The entry's query detection is assigned to the ground-truth item of its image with the
  highest IoU (the official rule, no minimum); it can hit only when that item has style > 0
  and the detection's class is the item's.
  """
  image_id = int(entry["query_image_id"])
  items = [q for q in query_gt if int(q["query_image_id"]) == image_id]
  if not items:
    return [False] * k, "no GT item"
  ious = retrieval_protocol.box_iou(np.asarray(entry["query_bbox"])[None],
                                    [q["bbox"] for q in items])
  q = items[int(np.argmax(ious[0]))]
  if int(q["style"]) <= 0:
    return [False] * k, "distractor (style 0)"
  if int(q["cls"]) != int(entry["query_cls"]):
    return [False] * k, "wrong class"
  correct = [g for g in gallery_gt
             if (int(g["pair_id"]), int(g["style"])) == (int(q["pair_id"]), int(q["style"]))]
  cids = np.array([int(g["gallery_image_id"]) for g in correct], np.int64)
  cboxes = np.array([g["bbox"] for g in correct], np.float64).reshape(-1, 4)
  hits = []
  for gid, gbox in zip(entry["gallery_image_id"][:k], entry["gallery_bbox"][:k]):
    rank = retrieval_protocol._first_hit_rank(  # pylint: disable=protected-access
        np.array([int(gid)]), np.asarray(gbox, np.float64)[None], cids, cboxes)
    hits.append(rank == 0)
  return hits, f"pair {int(q['pair_id'])} style {int(q['style'])}"


def retrieval_strip(query_pixels: np.ndarray, entry: dict, gallery_pixels: dict[int, np.ndarray],
                    hits: Sequence[bool], status: str, *, k: int = 5, height: int = 96,
                    names: dict[int, str]) -> np.ndarray:
  """[H, W, 3] uint8: the query crop (grey frame), then the top-k gallery crops (green = hit);
  ``names``: the classes' names (``DatasetSpec.names``)."""
  name = names.get(int(entry["query_cls"]), "?")
  tiles = [framed(crop_thumbnail(query_pixels, entry["query_bbox"], height), GREY,
                   f"query {name} {entry['query_score']:.2f}")]
  for r, (gid, gbox) in enumerate(zip(entry["gallery_image_id"][:k],
                                      entry["gallery_bbox"][:k])):
    tiles.append(framed(crop_thumbnail(gallery_pixels[int(gid)], gbox, height),
                         GREEN if hits[r] else RED, f"#{r + 1} shop {int(gid)}"))
  strip = np.concatenate([np.pad(t, ((0, 0), (0, 6), (0, 0))) for t in tiles], axis=1)
  banner = np.zeros((16, strip.shape[1], 3), np.uint8)
  cv2.putText(banner, f"image {int(entry['query_image_id'])}: {status}", (2, 12),
              cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
  return np.concatenate([banner, strip], axis=0)


def stack_rows(rows: Sequence[np.ndarray], pad: int = 4) -> np.ndarray:
  """Stacks RGB images vertically, left-aligned, padded to the widest."""
  width = max(r.shape[1] for r in rows)
  return np.concatenate([np.pad(r, ((0, pad), (0, width - r.shape[1]), (0, 0)))
                         for r in rows], axis=0)


def tile_grid(images: Sequence[np.ndarray], columns: int = 4, pad: int = 4) -> np.ndarray:
  """Images in a grid of ``columns``, each cell the size of the largest image."""
  ch = max(i.shape[0] for i in images) + pad
  cw = max(i.shape[1] for i in images) + pad
  rows = -(-len(images) // columns)
  grid = np.zeros((rows * ch, min(columns, len(images)) * cw, 3), np.uint8)
  for n, img in enumerate(images):
    r, c = divmod(n, columns)
    grid[r * ch:r * ch + img.shape[0], c * cw:c * cw + img.shape[1]] = img
  return grid
