import logging

import numpy as np

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


def test_pairs_need_same_pair_id_and_a_shared_positive_style():
  index = pairs.build_pair_index(_records())
  assert index.match_valid
  # (user 1, shop 3) share style 1; (user 2, shop 3) share style 2; shop 4 has only style 0.
  np.testing.assert_array_equal(index.pairs, [[0, 2], [1, 2]])
  assert index.epoch_size == 2


def test_epochs_are_permutations_fixed_by_seed_and_epoch():
  index = pairs.build_pair_index(_records())
  e0 = index.epoch_elements(0, seed=3)
  assert sorted(map(tuple, e0)) == [(0, 2), (1, 2)]
  np.testing.assert_array_equal(e0, index.epoch_elements(0, seed=3))
  orders = {tuple(map(tuple, index.epoch_elements(e, seed=3))) for e in range(8)}
  assert len(orders) == 2  # both orders occur over epochs


def test_singles_fallback_is_logged_and_masks_matching(caplog):
  records = [make_record(i, [make_item(style=1)], source="", pair_id=i) for i in range(1, 6)]
  with caplog.at_level(logging.WARNING):
    index = pairs.build_pair_index(records)
  assert not index.match_valid
  assert "matching targets masked" in caplog.text
  assert index.epoch_size == 3
  e = index.epoch_elements(0, seed=0)
  assert e.shape == (3, 2)
  assert (e[:, 0] != e[:, 1]).all()
  # The first images of the three elements, plus the second of the last, cover all five.
  assert set(e[:, 0]) | set(e[:, 1]) == set(range(5))
