"""Data sources: validated records plus random access to their pixels.

The pipeline reads every input the same way: ``source.records[i]`` (metadata, small) and
``source.load_image(i)`` (uint8 [H, W, 3]). Three kinds exist: a DeepFashion2 root in the raw
layout, a COCO-format JSON with its image folder, and the TFDS builder's prepared data
(``tfds_deepfashion2``).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Callable

import numpy as np

from data_pipeline import annotations, images
from data_pipeline.records import ImageRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass
class DataSource:
  """Attributes:
    records: the validated records, in file order.
    loader: record index -> decoded image, uint8 [H, W, 3]; raises DataError on bad pixels.
    name: where the data comes from (for logs).
    num_skipped: files skipped while scanning.
  """
  records: list[ImageRecord]
  loader: Callable[[int], np.ndarray]
  name: str
  num_skipped: int = 0

  def load_image(self, index: int) -> np.ndarray:
    return self.loader(index)

  def __len__(self) -> int:
    return len(self.records)


def _path_loader(records: list[ImageRecord]) -> Callable[[int], np.ndarray]:
  return lambda i: images.load_image(records[i].image_path)


def raw_source(root: str, *, strict: bool = False, check_image: str = "decode",
               num_workers: int | None = None) -> DataSource:
  """A split directory in the raw layout (``root/image``, ``root/annos``)."""
  scan = annotations.scan_raw_root(root, strict=strict, check_image=check_image,
                                   num_workers=num_workers)
  return DataSource(scan.records, _path_loader(scan.records), str(root), scan.num_skipped)


def coco_source(json_path: str, image_dir: str, *, strict: bool = False,
                check_image: str = "decode", num_workers: int | None = None) -> DataSource:
  """A DeepFashion2 COCO-format JSON (the official conversion) and its image folder."""
  scan = annotations.read_coco(json_path, image_dir, strict=strict, check_image=check_image,
                               num_workers=num_workers)
  return DataSource(scan.records, _path_loader(scan.records), str(json_path), scan.num_skipped)
