"""The pair index: which images are partners, and how each epoch groups the images in twos.

DeepFashion2 gives no pairs, only ``pair_id`` per image and ``style`` per item. Two images are
partners when one is a user image and the other a shop image with the same pair_id, and they
share at least one item style > 0 (spec section 1). Inside a partner pair, items with equal
style > 0 are positive instance pairs.

An epoch is a list of elements of two images, in one of two ways (``PAIR_SAMPLINGS``, the
config's ``data.pair_sampling``):

"matching" (the default): an epoch visits every training image once. An epoch over the partner
pairs would not: in the DeepFashion2 train split 337k pairs cover 191,961 images, one image in
many pairs and many images in none, so images would train unevenly and the images without a
partner never. Instead each epoch draws a maximum matching of the bipartite user-shop partner
graph, randomised from (seed, epoch): its pairs are the matched elements, (user, shop), which
train the matching loss. Every other image (no partner, or its partners matched to others this
epoch) is paired at random with another such image, with the matching targets masked
(``match_valid`` False), so it still trains detection, masks and landmarks. The matching being
maximum, its size is the same every epoch, and no two of the leftover images are partners.
An epoch holds ceil(images / 2) elements; the matching loss sees at most one pair per image
per epoch.

"all_pairs": an epoch visits every partner pair once, (user, shop) with ``match_valid`` True,
and the images without any partner, paired at random among themselves with the matching
targets masked (the detection, mask and landmark losses still train on them); an image in k
pairs appears k times. An epoch holds pairs + ceil(partnerless images / 2) elements.

Which the paper implies: "all_pairs". Its text (spec section 1) makes the image pair the unit
of training data: every user/shop combination sharing a style > 0 item is an image pair,
337,293 of them in the train split, and a batch holds 8 image pairs (16 images); the first
author adds that every batch is 8 such image-level pairs (switchablenorms/DeepFashion2 issue
12). Neither says what an epoch counts, so 12 epochs over pairs is a reading, not a quote. It
costs at least 3.5x the steps of 12 epochs over images (8 pairs per step:
ceil((337,293 + ceil(Z / 2)) / 8) >= 42,162 steps per epoch, Z the partnerless images, against
11,998) and visits 12 x 337,293 = 4.05M pairs, against 12 x the matching's size (at most
95,980 pairs, so under 1.16M) with "matching". The default stays "matching": a 1x schedule
counts its epochs in images (Detectron's 90k steps of 16 images are 12 COCO epochs), as the 1x
config does. The paper never mentions images without a partner; here they train everything but
the matching loss under both options.

A dataset without partners (no ``source`` field, e.g. the COCO conversion; or a detection-only
subset) is the case of an empty matching: every element is two images with the matching targets
masked, the same epoch under both options.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import NamedTuple

import numpy as np
from scipy import sparse
from scipy.sparse import csgraph

from data_pipeline import transforms
from data_pipeline.records import ImageRecord

log = logging.getLogger(__name__)

# How an epoch chooses the partner pairs that train the matching loss (module docstring).
PAIR_SAMPLINGS = ("matching", "all_pairs")


class EpochElements(NamedTuple):
  """One epoch, in its order.

  Attributes:
    elements: [E, 2] int64 record indices. Where ``match_valid`` is True, (user, shop) partners;
      elsewhere two images that are not matched this epoch, in no particular slot order.
    match_valid: [E] bool, True for the matched elements (they train the matching loss).
  """
  elements: np.ndarray
  match_valid: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class PairIndex:
  """The partner graph of a training set and its epochs.

  Constructed from ``pairs``, ``num_images`` and optionally ``keys`` and ``sampling``; the
  other attributes are derived.

  Attributes:
    pairs: [N, 2] int64 record indices (user, shop) of all partner pairs (the graph's edges),
      sorted by (pair_id, user id, shop id) when built by ``build_pair_index``; empty in
      singles mode.
    num_images: number of records.
    keys: [num_images] int64 or None: a grouping key of each image (``build_pair_index``: the
      category of its first item with style > 0, -1 without one), for ``epoch_elements``'s
      ``group_size``.
    sampling: one of ``PAIR_SAMPLINGS``: an epoch of one maximum matching ("matching") or of
      every pair ("all_pairs"); it sets ``epoch_size`` and ``epoch_elements``.
    users: sorted record indices of the user images that have a partner (the graph's rows).
    shops: sorted record indices of the shop images that have a partner (its columns).
    pairs_per_epoch: the elements that train the matching loss in every epoch: the size of a
      maximum matching ("matching") or every pair ("all_pairs").
  """
  pairs: np.ndarray
  num_images: int
  keys: np.ndarray | None = None
  sampling: str = "matching"
  users: np.ndarray = dataclasses.field(init=False)
  shops: np.ndarray = dataclasses.field(init=False)
  pairs_per_epoch: int = dataclasses.field(init=False)
  _rows: np.ndarray = dataclasses.field(init=False, repr=False)  # Edge -> position in users.
  _cols: np.ndarray = dataclasses.field(init=False, repr=False)  # Edge -> position in shops.

  def __post_init__(self):
    if self.sampling not in PAIR_SAMPLINGS:
      raise ValueError(f"Pair sampling {self.sampling!r} is not one of {PAIR_SAMPLINGS}.")
    pairs = np.asarray(self.pairs, np.int64).reshape(-1, 2)
    if len(pairs) and (pairs.min() < 0 or pairs.max() >= self.num_images):
      raise ValueError(f"Pair record indices must lie in [0, {self.num_images}).")
    users, rows = np.unique(pairs[:, 0], return_inverse=True)
    shops, cols = np.unique(pairs[:, 1], return_inverse=True)
    if np.intersect1d(users, shops).size:
      raise ValueError("An image is a user image in one pair and a shop image in another.")
    derived = dict(pairs=pairs, users=users, shops=shops, _rows=rows.astype(np.int64).ravel(),
                   _cols=cols.astype(np.int64).ravel())
    for name, value in derived.items():
      object.__setattr__(self, name, value)  # A frozen dataclass sets its fields this way.
    # Every maximum matching has this size, whatever the permutations: computed once.
    object.__setattr__(self, "pairs_per_epoch", len(pairs) if self.sampling == "all_pairs"
                       else len(self._matching(None)[0]))

  @property
  def num_images_with_partner(self) -> int:
    """Images with at least one partner (the matching's candidates)."""
    return len(self.users) + len(self.shops)

  @property
  def num_images_without_partner(self) -> int:
    """Images in no partner pair: with "all_pairs" the only images paired at random."""
    return self.num_images - self.num_images_with_partner

  @property
  def match_valid(self) -> bool:
    """Whether any element trains the matching loss; False in singles mode (no partners)."""
    return self.pairs_per_epoch > 0

  @property
  def epoch_size(self) -> int:
    """Elements per epoch, the same every epoch: ceil(num_images / 2) ("matching"), or every
    pair and ceil(images without a partner / 2) ("all_pairs"). It sets the steps per epoch."""
    if self.sampling == "all_pairs":
      return len(self.pairs) + (self.num_images_without_partner + 1) // 2
    return (self.num_images + 1) // 2

  def _matching(self, rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray]:
    """A maximum matching: (users [K], shops [K]) record indices, matched pairwise.

    Hopcroft-Karp (scipy) on the user x shop biadjacency matrix, with its rows and columns
    permuted by ``rng`` (identity when None), then mapped back. The permutations vary which
    maximum matching is found, though not as a uniform draw among them (on a synthetic graph of
    DeepFashion2's size, 0.5% of the images with a partner were matched in none of 20 epochs).
    About 30 ms for 192k images and 340k edges.
    """
    nu, ns = len(self.users), len(self.shops)
    if not len(self.pairs):
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    row_perm = rng.permutation(nu) if rng is not None else np.arange(nu)
    col_perm = rng.permutation(ns) if rng is not None else np.arange(ns)
    # Row r of the permuted matrix is user row_perm[r]; column c is shop col_perm[c].
    row_at, col_at = np.empty(nu, np.int64), np.empty(ns, np.int64)
    row_at[row_perm] = np.arange(nu)
    col_at[col_perm] = np.arange(ns)
    graph = sparse.csr_array((np.ones(len(self.pairs), np.int8),
                              (row_at[self._rows], col_at[self._cols])), shape=(nu, ns))
    match = csgraph.maximum_bipartite_matching(graph, perm_type="column")
    rows = np.flatnonzero(match >= 0)
    return self.users[row_perm[rows]], self.shops[col_perm[match[rows]]]

  def epoch_elements(self, epoch: int, seed: int, group_size: int = 1, *,
                     categories: bool = True, fit: np.ndarray | None = None,
                     batch_offset: int = 0) -> EpochElements:
    """The ``epoch_size`` elements of one epoch, in their (shuffled) order.

    "matching": every image appears exactly once, with one exception: when the images left over
    by the matching are odd in number, the last of them pairs with one more image drawn at
    random from all the others, which so appears twice in this epoch. "all_pairs": every pair
    once as a matched element, then the images without a partner are the leftovers, paired
    alike. Everything (the matching, the leftover pairing, the order) depends only on
    (seed, epoch) and the arguments, so any step can be reached without replaying the steps
    before it (for a given SciPy version: its matching may change between versions).

    With ``group_size`` > 1 (the elements of one training step), ``categories`` and ``keys``,
    the order puts matched elements of one key (the user image's category) together in runs of
    ``group_size``, so that the matching loss of a step ranks each user item against shop items
    of its own category (hard negatives) besides its partner; the runs are in random order, the
    elements left over (unmatched, or fewer than ``group_size`` of a key) fill runs of mixed
    keys, and a short run comes last. The epoch holds the same elements as without grouping.

    With ``fit`` ([num_images] ``ImageGeometry.fit_mask`` of each image: the canvases it fits)
    the epoch is arranged for orientation buckets: the images left over by the matching pair up
    with images of their own smallest canvas (landscape with landscape; the matched elements
    are the same as without ``fit``), and the runs of ``group_size`` elements (each a training
    step) hold elements of one canvas (within it, of one key as above). What is left of each
    canvas (fewer than ``group_size`` elements each) fills the batches at the epoch's two ends
    and at most one run per canvas besides, whose images take a canvas holding them all.
    ``batch_offset`` is the position within its batch of the epoch's first element
    ((epoch * epoch_size) % group_size in a stream of consecutive epochs): the runs are laid
    on the stream's batches.
    """
    rng = np.random.default_rng([seed, epoch])
    if self.sampling == "all_pairs":  # Every pair; the order below shuffles them.
      users, shops = self.pairs[:, 0], self.pairs[:, 1]
    else:
      users, shops = self._matching(rng)
    taken = np.zeros(self.num_images, bool)
    taken[users] = True
    taken[shops] = True
    rest = rng.permutation(np.flatnonzero(~taken))
    if fit is not None:  # Leftover images pair up within their own smallest canvas.
      fit = np.asarray(fit, np.int64)
      rest = rest[np.argsort(transforms.canvas_index(fit[rest]), kind="stable")]
    if len(rest) % 2:
      if self.num_images > 1:
        extra = int(rng.integers(self.num_images - 1))
        extra += extra >= rest[-1]  # Any image but the last leftover itself.
      else:
        extra = int(rest[-1])
      rest = np.append(rest, extra)
    elements = np.concatenate([np.stack([users, shops], 1), rest.reshape(-1, 2)])
    match_valid = np.arange(len(elements)) < len(users)
    grouped = group_size > 1 and categories and self.keys is not None
    keys = (np.where(match_valid, np.asarray(self.keys)[elements[:, 0]], -1) if grouped
            else np.full(len(elements), -1, np.int64))
    if fit is not None and group_size > 1:
      canvas = transforms.canvas_index(fit[elements[:, 0]] & fit[elements[:, 1]])
      order = _bucketed_order(rng, canvas, keys, group_size, batch_offset)
    elif grouped:
      order = _grouped_order(rng, keys, group_size)
    else:
      order = rng.permutation(len(elements))
    return EpochElements(elements[order], match_valid[order])


def _grouped_order(rng: np.random.Generator, keys: np.ndarray, group_size: int) -> np.ndarray:
  """A random permutation of range(len(keys)) made of runs of ``group_size`` positions of one
  key (key -1: no key), then runs of the leftovers, a short run last."""
  perm = rng.permutation(len(keys))
  runs, mixed = [], []
  for key in np.unique(keys):
    members = perm[keys[perm] == key]  # in random order
    full = 0 if key < 0 else len(members) // group_size * group_size
    runs += [members[i:i + group_size] for i in range(0, full, group_size)]
    mixed.append(members[full:])
  mixed = rng.permutation(np.concatenate(mixed))
  runs += [mixed[i:i + group_size] for i in range(0, len(mixed), group_size)]
  short = [r for r in runs if len(r) < group_size]
  full_runs = [r for r in runs if len(r) == group_size]
  ordered = [full_runs[i] for i in rng.permutation(len(full_runs))] + short
  return np.concatenate(ordered) if ordered else np.zeros(0, np.int64)


def _bucketed_order(rng: np.random.Generator, canvas: np.ndarray, keys: np.ndarray,
                    group_size: int, batch_offset: int) -> np.ndarray:
  """A random permutation of range(n) laid on batches of ``group_size``: ``head`` positions
  that complete the batch the previous epoch started (``batch_offset`` > 0), then whole runs
  in random order, then a short tail. The whole runs hold one canvas each (within a canvas,
  one key where ``keys`` >= 0 allow); what is left of each canvas and key (fewer than
  ``group_size``) fills the head, the tail and a few runs of mixed canvases."""
  n = len(canvas)
  head = min((group_size - batch_offset % group_size) % group_size, n)
  tail = (n - head) % group_size
  perm = rng.permutation(n)
  runs, mixed = [], []
  chunk = lambda x: [x[i:i + group_size] for i in range(0, len(x), group_size)]
  for c in np.unique(canvas):
    in_canvas = perm[canvas[perm] == c]  # in random order
    left = []
    for key in np.unique(keys[in_canvas]):
      members = in_canvas[keys[in_canvas] == key]
      full = 0 if key < 0 else len(members) // group_size * group_size
      runs += chunk(members[:full])
      left.append(members[full:])
    left = np.concatenate(left)
    full = len(left) // group_size * group_size
    runs += chunk(left[:full])
    mixed.append(left[full:])
  mixed = np.concatenate(mixed)  # canvas by canvas, so that mixed runs mix few canvases
  runs = [runs[i] for i in rng.permutation(len(runs))]
  while len(mixed) < head + tail:  # Too few left over for the ends: break up whole runs.
    mixed = np.concatenate([mixed, runs.pop()])
  runs += chunk(mixed[head:len(mixed) - tail])  # whole runs of what is left
  runs = [runs[i] for i in rng.permutation(len(runs))]  # anywhere in the epoch
  ordered = [mixed[:head]] + runs + [mixed[len(mixed) - tail:]]
  return np.concatenate(ordered).astype(np.int64)


def image_keys(records: list[ImageRecord]) -> np.ndarray:
  """[N] int64: the category of each record's item with the smallest style > 0 (-1: none)."""
  keys = np.full(len(records), -1, np.int64)
  for i, rec in enumerate(records):
    styled = sorted((item.style, item.category_id) for item in rec.items if item.style > 0)
    if styled:
      keys[i] = styled[0][1]
  return keys


def positive_styles(record: ImageRecord) -> set[int]:
  return {item.style for item in record.items if item.style > 0}


def build_pair_index(records: list[ImageRecord], sampling: str = "matching") -> PairIndex:
  """The partner graph of ``records``, its epochs drawn by ``sampling`` (``PAIR_SAMPLINGS``);
  logs what an epoch trains (singles mode: a warning)."""
  by_pair: dict[int, tuple[list[int], list[int]]] = collections.defaultdict(lambda: ([], []))
  for idx, rec in enumerate(records):
    if rec.source == "user":
      by_pair[rec.pair_id][0].append(idx)
    elif rec.source == "shop":
      by_pair[rec.pair_id][1].append(idx)
  pairs = []
  for pair_id in sorted(by_pair):
    users, shops = by_pair[pair_id]
    if not users or not shops:
      continue
    users = sorted(users, key=lambda i: records[i].image_id)
    shops = sorted(shops, key=lambda i: records[i].image_id)
    shop_styles = [positive_styles(records[s]) for s in shops]
    for u in users:
      styles_u = positive_styles(records[u])
      for s, styles_s in zip(shops, shop_styles):
        if styles_u & styles_s:
          pairs.append((u, s))
  index = PairIndex(np.asarray(pairs, np.int64).reshape(-1, 2), len(records),
                    image_keys(records), sampling)
  if index.match_valid and sampling == "all_pairs":
    log.info(
        "Pair index: %d images, %d with a partner (%d image pairs); each epoch (all_pairs): %d "
        "elements, every image pair trains the matching loss once (an image in several pairs "
        "repeats), the %d images without a partner are paired at random with the matching "
        "targets masked.", index.num_images, index.num_images_with_partner, len(index.pairs),
        index.epoch_size, index.num_images_without_partner)
  elif index.match_valid:
    log.info(
        "Pair index: %d images, %d with a partner (%d image pairs); each epoch: %d elements, "
        "%d matched pairs train the matching loss, the other %d images are paired at random "
        "with the matching targets masked.", index.num_images, index.num_images_with_partner,
        len(index.pairs), index.epoch_size, index.pairs_per_epoch,
        index.num_images - 2 * index.pairs_per_epoch)
  else:
    log.warning(
        "No user/shop image pairs in %d images (no 'source' field, or no shared style > 0): "
        "training on single images, two per element, with the matching targets masked.",
        len(records))
  return index
