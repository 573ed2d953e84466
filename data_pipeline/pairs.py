"""The image-pair index: which (user image, shop image) combinations are training elements.

DeepFashion2 gives no pairs, only ``pair_id`` per image and ``style`` per item. An image pair is
a user image and a shop image with the same pair_id that share at least one item style > 0
(spec section 1). Inside a pair, items with equal style > 0 are positive instance pairs.

A dataset without image pairs (no ``source`` field, e.g. the COCO conversion; or a
detection-only subset) still trains: elements are then two different images treated as
singles, with the matching targets masked (``match_valid`` False).
"""

from __future__ import annotations

import collections
import dataclasses
import logging

import numpy as np

from data_pipeline.records import ImageRecord

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PairIndex:
  """Attributes:
    pairs: [N, 2] int64 record indices (user, shop), sorted by (pair_id, user id, shop id);
      empty in singles mode.
    num_images: number of records.
    match_valid: False in singles mode (no matching targets).
  """
  pairs: np.ndarray
  num_images: int
  match_valid: bool

  @property
  def epoch_size(self) -> int:
    """Elements per epoch: image pairs, or ceil(num_images / 2) in singles mode."""
    return len(self.pairs) if self.match_valid else (self.num_images + 1) // 2

  def epoch_elements(self, epoch: int, seed: int, shuffle: bool = True) -> np.ndarray:
    """The [epoch_size, 2] record indices of one epoch, in its (shuffled) order.

    The order depends only on (seed, epoch), so any step can be reached without replaying
    the steps before it.
    """
    rng = np.random.default_rng([seed, epoch])
    if self.match_valid:
      order = rng.permutation(len(self.pairs)) if shuffle else np.arange(len(self.pairs))
      return self.pairs[order]
    order = rng.permutation(self.num_images) if shuffle else np.arange(self.num_images)
    if len(order) % 2:  # An odd image count: the last image pairs with the first.
      order = np.append(order, order[0])
    return order.reshape(-1, 2)


def positive_styles(record: ImageRecord) -> set[int]:
  return {item.style for item in record.items if item.style > 0}


def build_pair_index(records: list[ImageRecord]) -> PairIndex:
  """All image pairs of ``records``; falls back to singles when there are none."""
  by_pair: dict[int, tuple[list[int], list[int]]] = collections.defaultdict(lambda: ([], []))
  for idx, rec in enumerate(records):
    if rec.source == "user":
      by_pair[rec.pair_id][0].append(idx)
    elif rec.source == "shop":
      by_pair[rec.pair_id][1].append(idx)
  pairs = []
  for pair_id in sorted(by_pair):
    users, shops = by_pair[pair_id]
    users = sorted(users, key=lambda i: records[i].image_id)
    shops = sorted(shops, key=lambda i: records[i].image_id)
    shop_styles = [positive_styles(records[s]) for s in shops]
    for u in users:
      styles_u = positive_styles(records[u])
      for s, styles_s in zip(shops, shop_styles):
        if styles_u & styles_s:
          pairs.append((u, s))
  if pairs:
    index = PairIndex(np.asarray(pairs, np.int64), len(records), True)
    log.info("Pair index: %d image pairs over %d images.", len(pairs), len(records))
    return index
  log.warning(
      "No user/shop image pairs in %d images (no 'source' field, or no shared style > 0): "
      "training on single images, two per element, with the matching targets masked.",
      len(records))
  return PairIndex(np.zeros((0, 2), np.int64), len(records), False)
