"""Validated DeepFashion2 records: what every reader produces and every consumer reads.

Coordinates are continuous pixel coordinates of the original image, as stored by DeepFashion2
(x to the right, y down; a horizontal flip maps x to ``width - x``).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import numpy as np

from df2_jax.errors import Df2Error


class DataError(Df2Error, ValueError):
  """Bad input: names the file and the field (``path``, ``field``) and says what is wrong."""

  def __init__(self, path: str, field: str, message: str):
    self.path = str(path)
    self.field = field
    self.message = message
    super().__init__(f"{self.path}: field '{field}': {message}")

  def __reduce__(self):  # Survives pickling (multiprocessing, tf.data workers).
    return DataError, (self.path, self.field, self.message)


class Geometry(NamedTuple):
  """An item's box, landmarks and polygons exactly as its annotation gives them (``Item``'s
  layout and dtypes), kept where clipping to the image changed any of them."""
  box: np.ndarray
  landmarks: np.ndarray
  polygons: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class Item:
  """One clothing item of one image.

  Two views of the geometry: ``box``, ``landmarks``, ``polygons`` are clipped to the image
  (points the annotation puts up to the readers' tolerance outside it are moved onto the
  border); training targets are built from them. ``raw_box``, ``raw_landmarks``,
  ``raw_polygons`` are the values as annotated, unclipped; the COCO conversion and the
  evaluation ground truth (``convert``) are built from them, so that they equal the official
  converter's output number for number.

  Attributes:
    category_id: the internal class 1..C of the run's ``DatasetSpec`` (DeepFashion2: 1..13, its
      own ids); readers map a dataset's own ids to it.
    style: >= 0; positive pairs need equal pair_id and equal style > 0.
    box: [4] float32 (x1, y1, x2, y2), clipped to the image.
    landmarks: [n, 3] float32 category-local (x, y, v), n = the spec's landmark count of the
      category (0 for a set without landmarks),
      v in {0, 1, 2} (0: not labelled, x = y = 0); labelled ones clipped to the image.
    polygons: tuple of [k, 2] float32 arrays (k >= 3), the item's segmentation, clipped to
      the image; at least one (a reader drops an item whose polygons were all bad), unless the
      mask is ``rle`` or the set has no masks (``DatasetSpec.has_masks``).
    scale, occlusion, zoom_in, viewpoint: 1..3, 0 where the source does not give them.
    unclipped: the annotated geometry where clipping changed any of it; None where the clipped
      values are the annotated ones (most items: this costs nothing for them).
    rle: the mask as a COCO RLE of the image ({"size": [h, w], "counts": str}) where the
      annotation gives one instead of polygons; None otherwise.
    iscrowd: a COCO crowd region: ignored by the evaluation's matching, left out of training.
  """
  category_id: int
  style: int
  box: np.ndarray
  landmarks: np.ndarray
  polygons: tuple[np.ndarray, ...]
  scale: int = 0
  occlusion: int = 0
  zoom_in: int = 0
  viewpoint: int = 0
  unclipped: Geometry | None = None
  rle: dict | None = None
  iscrowd: bool = False

  @property
  def raw_box(self) -> np.ndarray:
    """[4] float32 (x1, y1, x2, y2) as annotated (not clipped)."""
    return self.box if self.unclipped is None else self.unclipped.box

  @property
  def raw_landmarks(self) -> np.ndarray:
    """[n, 3] float32 landmarks as annotated (not clipped)."""
    return self.landmarks if self.unclipped is None else self.unclipped.landmarks

  @property
  def raw_polygons(self) -> tuple[np.ndarray, ...]:
    """The polygons as annotated (not clipped)."""
    return self.polygons if self.unclipped is None else self.unclipped.polygons


@dataclasses.dataclass(frozen=True)
class ImageRecord:
  """One image and its items.

  Attributes:
    image_id: int(stem) for the raw layout, the COCO ``id`` for COCO input.
    image_path: path of the image file ('' when the bytes come from elsewhere, e.g. TFDS).
    width, height: size of the image in pixels.
    source: 'user', 'shop', or '' when unknown (the COCO conversion drops it).
    pair_id: the image's pair id, -1 when unknown.
    items: the image's items, in annotation order (item1, item2, ...); empty only where a
      non-strict reader dropped every item of the image (the image stays: its pixels hold
      clothing, so it still belongs to the evaluation, see ``DropCounts``).
    anno_path: the file the annotation came from (for error messages).
  """
  image_id: int
  image_path: str
  width: int
  height: int
  source: str
  pair_id: int
  items: tuple[Item, ...]
  anno_path: str = ""


# What a non-strict reader drops, from the coarsest: a whole image (its file unreadable, its
# size or image-level fields bad), one item (bad box, category, style, landmark array, attribute,
# or no polygon left), one polygon of an item, one labelled landmark (made unlabelled).
DROP_KINDS = ("image", "item", "polygon", "landmark")


class Drop(NamedTuple):
  """One thing a reader dropped: its kind (``DROP_KINDS``) and the DataError that dropped it.
  A plain tuple, so it travels back from the readers' worker processes."""
  kind: str
  path: str
  field: str
  message: str

  def error(self) -> DataError:
    return DataError(self.path, self.field, self.message)

  def __str__(self) -> str:
    return str(self.error())


@dataclasses.dataclass(frozen=True)
class DropCounts:
  """How many images, items, polygons and labelled landmarks of a split its reader dropped.

  They travel with the split's records (``ScanResult.counts``, ``DataSource.dropped``,
  the TFDS build's marker) so that an evaluation knows which ground truth it is missing: a
  dropped validation image or item is absent from every metric and from the retrieval
  denominator, a dropped polygon or landmark alters AP_mask's or AP_pt's ground truth
  (``evaluator`` refuses to evaluate then, unless told to).
  """
  images: int = 0
  items: int = 0
  polygons: int = 0
  landmarks: int = 0

  @classmethod
  def of(cls, drops) -> "DropCounts":
    """The counts of an iterable of ``Drop``."""
    counts = dict.fromkeys(DROP_KINDS, 0)
    for drop in drops:
      counts[drop.kind] += 1
    return cls(*(counts[kind] for kind in DROP_KINDS))

  @classmethod
  def from_dict(cls, values: dict) -> "DropCounts":
    """The inverse of ``as_dict`` (missing kinds are 0)."""
    return cls(**{f"{kind}s": int(values.get(f"{kind}s", 0)) for kind in DROP_KINDS})

  def as_dict(self) -> dict[str, int]:
    """{"images", "items", "polygons", "landmarks"} (metrics.json, the TFDS marker)."""
    return dataclasses.asdict(self)

  def __add__(self, other: "DropCounts") -> "DropCounts":
    return DropCounts(*(a + b for a, b in zip(dataclasses.astuple(self),
                                              dataclasses.astuple(other))))

  def __bool__(self) -> bool:
    return any(dataclasses.astuple(self))

  def __str__(self) -> str:
    return (f"{self.images} images, {self.items} items, {self.polygons} polygons, "
            f"{self.landmarks} landmarks")


@dataclasses.dataclass
class ScanResult:
  """Records that passed validation (with the parts that failed it removed) and what was
  dropped, in the order the reader met it."""
  records: list[ImageRecord]
  drops: list[Drop]

  @property
  def skipped(self) -> list[tuple[str, str]]:
    """(path, reason naming the field) of every dropped image."""
    return [(d.path, str(d)) for d in self.drops if d.kind == "image"]

  @property
  def num_skipped(self) -> int:
    """Images dropped."""
    return self.counts.images

  @property
  def counts(self) -> DropCounts:
    return DropCounts.of(self.drops)


@dataclasses.dataclass
class DataSource:
  """Attributes:
    records: the validated records, in file order.
    loader: record index -> decoded image, uint8 [H, W, 3]; raises DataError on bad pixels.
    name: where the data comes from (for logs).
    dropped: what the reader dropped from the split as invalid (images, items, polygons,
      landmarks): ground truth the records lack, which an evaluation must know about.
  """
  records: list[ImageRecord]
  loader: Callable[[int], np.ndarray]
  name: str
  dropped: DropCounts = DropCounts()

  def load_image(self, index: int) -> np.ndarray:
    return self.loader(index)

  def __len__(self) -> int:
    return len(self.records)

  def subset(self, indices) -> "DataSource":
    """The records at ``indices`` (in that order), loading the same pixels. ``dropped`` stays
    the split's: which subset a dropped image would have fallen into is unknown."""
    indices = [int(i) for i in indices]
    return DataSource([self.records[i] for i in indices],
                      lambda j: self.loader(indices[j]),
                      f"{self.name} ({len(indices)} of {len(self.records)} images)",
                      self.dropped)
