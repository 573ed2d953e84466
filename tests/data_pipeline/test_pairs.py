import collections
import logging

import numpy as np
import pytest

from data_pipeline import pairs
from conftest import make_item, make_record


def _records():
  # pair 10: user 1 (styles 1, 0), user 2 (style 2), shop 3 (styles 1, 2), shop 4 (style 0)
  # pair 20: user 5 (style 1), no shop; pair 30: shop 6 only.
  return [
      make_record(1, [make_item(style=1), make_item(style=0)], source="user", pair_id=10),
      make_record(2, [make_item(style=2)], source="user", pair_id=10),
      make_record(3, [make_item(style=1), make_item(style=2)], source="shop", pair_id=10),
      make_record(4, [make_item(style=0)], source="shop", pair_id=10),
      make_record(5, [make_item(style=1)], source="user", pair_id=20),
      make_record(6, [make_item(style=1)], source="shop", pair_id=30),
  ]


def _more_records():
  """_records() plus pair 40, whose only maximum matching a greedy pass can miss.

  pair 40: user 7 (styles 1, 2), user 8 (style 1), shop 9 (style 1), shop 10 (style 2). Partner
  edges (record indices): (6, 8), (6, 9), (7, 8). Taking (6, 8) first would leave 7 and 9
  unmatched; the maximum matching is {(6, 9), (7, 8)}, unique. With pair 10 (users 0 and 1
  both want shop 2: one of them is left over), the maximum matching has 3 pairs out of 10
  images; records 3, 4, 5 and the loser of pair 10 are left over.
  """
  return _records() + [
      make_record(7, [make_item(style=1), make_item(style=2)], source="user", pair_id=40),
      make_record(8, [make_item(style=1)], source="user", pair_id=40),
      make_record(9, [make_item(style=1)], source="shop", pair_id=40),
      make_record(10, [make_item(style=2)], source="shop", pair_id=40),
  ]


def _check_epoch(index, epoch, seed):
  """The invariants of every epoch; returns (matched pairs as tuples, image visit counts)."""
  elements, match_valid = index.epoch_elements(epoch, seed)
  assert elements.shape == (index.epoch_size, 2) and match_valid.shape == (index.epoch_size,)
  assert match_valid.sum() == index.pairs_per_epoch
  edges = set(map(tuple, index.pairs.tolist()))
  matched = [tuple(e) for e in elements[match_valid].tolist()]
  assert set(matched) <= edges  # partners, user first
  # Maximal: no two images left over by this epoch's matching are partners.
  rest = set(elements[~match_valid].ravel().tolist()) - set(elements[match_valid].ravel().tolist())
  assert not any(u in rest and s in rest for u, s in edges)
  assert (elements[:, 0] != elements[:, 1]).all()
  counts = collections.Counter(elements.ravel().tolist())
  assert set(counts) == set(range(index.num_images))
  return matched, counts


def test_pairs_need_same_pair_id_and_a_shared_positive_style():
  index = pairs.build_pair_index(_records())
  assert index.match_valid
  # (user 1, shop 3) share style 1; (user 2, shop 3) share style 2; shop 4 has only style 0.
  np.testing.assert_array_equal(index.pairs, [[0, 2], [1, 2]])
  np.testing.assert_array_equal(index.users, [0, 1])
  np.testing.assert_array_equal(index.shops, [2])
  assert index.num_images_with_partner == 3
  assert index.pairs_per_epoch == 1  # users 0 and 1 compete for shop 2
  assert index.epoch_size == 3  # 6 images


def test_an_epoch_visits_every_image_once_with_a_maximum_matching():
  index = pairs.build_pair_index(_more_records())
  np.testing.assert_array_equal(index.pairs, [[0, 2], [1, 2], [6, 8], [6, 9], [7, 8]])
  assert (index.num_images, index.num_images_with_partner) == (10, 7)
  assert (index.pairs_per_epoch, index.epoch_size) == (3, 5)
  winners = collections.Counter()
  for epoch in range(16):
    matched, counts = _check_epoch(index, epoch, seed=3)
    assert set(counts.values()) == {1}  # 10 images: each exactly once
    assert {(6, 9), (7, 8)} <= set(matched)  # the only maximum matching of pair 40
    (pair10,) = set(matched) - {(6, 9), (7, 8)}
    winners[pair10] += 1
    elements, match_valid = index.epoch_elements(epoch, seed=3)
    left = sorted(elements[~match_valid].ravel().tolist())
    assert left == sorted([3, 4, 5, 1 - pair10[0]])  # pair 10's loser is left over, flag False
  # Either user of pair 10 wins, depending on the epoch.
  assert set(winners) == {(0, 2), (1, 2)}


def test_epochs_are_fixed_by_seed_and_epoch_and_differ_between_epochs():
  index = pairs.build_pair_index(_more_records())
  a, b = index.epoch_elements(0, seed=3), index.epoch_elements(0, seed=3)
  np.testing.assert_array_equal(a.elements, b.elements)
  np.testing.assert_array_equal(a.match_valid, b.match_valid)
  epochs = [index.epoch_elements(e, seed=3) for e in range(8)]
  assert len({e.elements.tobytes() for e in epochs}) == 8
  assert len({e.match_valid.tobytes() for e in epochs}) > 1  # matched elements move around
  assert index.epoch_elements(0, seed=4).elements.tobytes() != a.elements.tobytes()


def test_an_odd_image_count_duplicates_exactly_one_image():
  records = _more_records() + [make_record(11, [make_item(style=1)], source="shop", pair_id=50)]
  index = pairs.build_pair_index(records)
  assert (index.num_images, index.pairs_per_epoch, index.epoch_size) == (11, 3, 6)
  for epoch in range(8):
    _, counts = _check_epoch(index, epoch, seed=0)
    assert sorted(counts.values()) == [1] * 10 + [2]


def test_the_log_line_gives_the_epoch_composition(caplog):
  with caplog.at_level(logging.INFO):
    pairs.build_pair_index(_more_records())
  assert ("Pair index: 10 images, 7 with a partner (5 image pairs); each epoch: 5 elements, "
          "3 matched pairs train the matching loss, the other 4 images are paired at random "
          "with the matching targets masked.") in caplog.text


def _kuhn_matching_size(pairs_array):
  """A reference maximum matching (augmenting paths, Kuhn's algorithm)."""
  adjacency = collections.defaultdict(list)
  for u, s in pairs_array.tolist():
    adjacency[u].append(s)
  owner = {}

  def augment(u, seen):
    for s in adjacency[u]:
      if s not in seen:
        seen.add(s)
        if s not in owner or augment(owner[s], seen):
          owner[s] = u
          return True
    return False

  return sum(augment(u, set()) for u in list(adjacency))


def test_random_graphs_match_a_reference_maximum_matching():
  rng = np.random.default_rng(0)
  for n in (300, 301):
    records = []
    for i in range(n):
      styles = rng.choice(4, size=int(rng.integers(1, 3)), replace=False)  # style 0: no match
      records.append(make_record(i + 1, [make_item(style=int(s)) for s in styles],
                                 source="shop" if rng.random() < 1 / 3 else "user",
                                 pair_id=int(rng.integers(0, 30))))
    index = pairs.build_pair_index(records)
    assert len(index.pairs) > 200
    assert index.pairs_per_epoch == _kuhn_matching_size(index.pairs)
    for epoch in range(3):
      _, counts = _check_epoch(index, epoch, seed=1)
      assert sorted(counts.values()) == [1] * (n - n % 2) + [2] * (n % 2)


def test_singles_fallback_is_logged_and_masks_matching(caplog):
  records = [make_record(i, [make_item(style=1)], source="", pair_id=i) for i in range(1, 6)]
  with caplog.at_level(logging.WARNING):
    index = pairs.build_pair_index(records)
  assert not index.match_valid
  assert "matching targets masked" in caplog.text
  assert (index.pairs.shape, index.pairs_per_epoch, index.num_images_with_partner) == ((0, 2), 0, 0)
  assert index.epoch_size == 3
  elements, match_valid = index.epoch_elements(0, seed=0)
  assert elements.shape == (3, 2) and not match_valid.any()
  assert (elements[:, 0] != elements[:, 1]).all()
  # Five images in three elements: all of them, one twice.
  assert sorted(collections.Counter(elements.ravel().tolist()).values()) == [1, 1, 1, 1, 2]


def test_an_image_cannot_be_both_user_and_shop():
  with pytest.raises(ValueError, match="user image in one pair"):
    pairs.PairIndex(np.array([[0, 1], [1, 2]]), 3)


def _category_pairs(categories, seed=0):
  """One user/shop partner pair per entry of ``categories`` (the shared item's category) and a
  user image without a partner."""
  records = []
  for p, cid in enumerate(categories):
    records.append(make_record(2 * p + 1, [make_item(category_id=cid, style=1)],
                               source="user", pair_id=p + 1))
    records.append(make_record(2 * p + 2, [make_item(category_id=cid, style=1),
                                           make_item(category_id=7, style=0)],
                               source="shop", pair_id=p + 1))
  records.append(make_record(999, [make_item(category_id=3, style=1)], source="user",
                             pair_id=500))
  return records


def test_category_batches_group_matched_elements_by_category():
  categories = [1] * 7 + [2] * 4 + [5] * 3 + [9]
  index = pairs.build_pair_index(_category_pairs(categories))
  np.testing.assert_array_equal(index.keys[:4], [1, 1, 1, 1])
  assert index.keys[-1] == 3
  for epoch in range(3):
    plain = index.epoch_elements(epoch, 0)
    grouped = index.epoch_elements(epoch, 0, group_size=3)
    # The same elements (the same matching), in another order.
    as_set = lambda e: sorted(zip(map(tuple, e.elements.tolist()), e.match_valid.tolist()))
    assert as_set(grouped) == as_set(plain)
    keys = np.where(grouped.match_valid, index.keys[grouped.elements[:, 0]], -1)
    runs = [keys[i:i + 3] for i in range(0, len(keys), 3)]
    # 15 matched pairs + 1 leftover element (the unpartnered user and the extra image): 16
    # elements, 5 full runs and a short last one. Category 1 gives 2 runs (7 = 2 x 3 + 1),
    # 2 gives one (4 = 3 + 1), 5 one: 4 runs of one category, the leftovers mixed.
    assert len(keys) == 16 and len(runs[-1]) == 1
    pure = [r for r in runs if len(r) == 3 and len(set(r.tolist())) == 1 and r[0] >= 0]
    assert sorted(int(r[0]) for r in pure) == [1, 1, 2, 5]
    again = index.epoch_elements(epoch, 0, group_size=3)
    np.testing.assert_array_equal(again.elements, grouped.elements)
  assert not np.array_equal(index.epoch_elements(0, 0, 3).elements,
                            index.epoch_elements(1, 0, 3).elements)


L, P, S = 0b101, 0b110, 0b111  # fit masks: landscape canvas (bit 0), portrait (1), square (2)


def _oriented_pairs():
  """9 landscape partner pairs, 5 portrait ones, 2 with a landscape user and a portrait shop,
  and 10 images without a partner (6 landscape, 4 portrait): 21 elements in every epoch, 12 on
  the landscape canvas, 7 on the portrait one, 2 only on the square."""
  records, fit = [], []
  for p, (u, s) in enumerate([(L, L)] * 9 + [(P, P)] * 5 + [(L, P)] * 2):
    records += [make_record(2 * p + 1, [make_item(style=1)], source="user", pair_id=p + 1),
                make_record(2 * p + 2, [make_item(style=1)], source="shop", pair_id=p + 1)]
    fit += [u, s]
  for k, f in enumerate([L] * 6 + [P] * 4):
    records.append(make_record(100 + k, [make_item(style=1)], source="user", pair_id=100 + k))
    fit.append(f)
  return pairs.build_pair_index(records), np.array(fit, np.int64)


def _batch_canvases(epoch, fit, start, size):
  """The canvas bit of each whole batch of ``size`` elements from ``start``."""
  out = []
  for i in range(start, len(epoch.elements) - size + 1, size):
    mask = np.bitwise_and.reduce(fit[epoch.elements[i:i + size]].ravel())
    out.append(int(mask & -mask).bit_length() - 1)
  return out


@pytest.mark.parametrize("offset", [0, 3])
def test_orientation_buckets_lay_one_canvas_on_each_batch(offset):
  index, fit = _oriented_pairs()
  for epoch in range(3):
    plain = index.epoch_elements(epoch, 0)
    bucketed = index.epoch_elements(epoch, 0, 4, fit=fit, batch_offset=offset)
    # The same matched elements (the matching is drawn first); every image once.
    matched = lambda e: sorted(map(tuple, e.elements[e.match_valid].tolist()))
    assert matched(bucketed) == matched(plain) and bucketed.match_valid.sum() == 16
    assert sorted(bucketed.elements.ravel().tolist()) == list(range(index.num_images))
    # The leftovers pair within an orientation: 3 landscape and 2 portrait elements.
    rest = bucketed.elements[~bucketed.match_valid]
    assert sorted(fit[rest[:, 0]] & fit[rest[:, 1]]) == [L, L, L, P, P]
    # 12 landscape elements: 3 whole batches; 7 portrait: 1, and 3 left; 2 mixed: what is left
    # (5 elements) fills one batch and the epoch's tail (offset 0: the 21st element) or head
    # (offset 3: the first element completes the previous epoch's batch).
    head = (4 - offset) % 4
    assert sorted(_batch_canvases(bucketed, fit, head, 4)) == [0, 0, 0, 1, 2]
    again = index.epoch_elements(epoch, 0, 4, fit=fit, batch_offset=offset)
    np.testing.assert_array_equal(again.elements, bucketed.elements)


def test_bucketed_order_is_a_permutation_for_any_offset():
  rng = np.random.default_rng(0)
  for n, size in [(8, 4), (21, 4), (3, 8), (50, 7), (200, 8)]:
    canvas = rng.integers(0, 3, n)
    keys = rng.integers(-1, 4, n)  # with category keys too (category_batches)
    for offset in range(size):
      for k in (np.full(n, -1), keys):
        order = pairs._bucketed_order(np.random.default_rng(1), canvas, k, size, offset)
        assert sorted(order.tolist()) == list(range(n)), (n, size, offset)
        # Whole batches after the head are on one canvas, but for what is left of the three
        # canvases (fewer than a batch of each) beyond the epoch's two ends: at most 2 batches.
        head = (size - offset % size) % size
        runs = [canvas[order[i:i + size]] for i in range(head, n - size + 1, size)]
        assert sum(len(set(r.tolist())) > 1 for r in runs) <= 2, (n, size, offset)
  # All on one canvas, the ends need 4 elements: one whole run is broken up for them.
  order = pairs._bucketed_order(np.random.default_rng(1), np.zeros(8, np.int64),
                                np.full(8, -1), 4, 2)
  assert sorted(order.tolist()) == list(range(8))
