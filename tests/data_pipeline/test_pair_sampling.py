"""data.pair_sampling: an epoch of one maximum matching ("matching") or of every partner pair
("all_pairs"), on hand-built graphs whose counts are known, the real fixtures and the config."""

import collections
import importlib
import json
import logging

import numpy as np
import pytest

from data_pipeline import pairs, transforms
from data_pipeline.records import DataSource
from data_pipeline.spec import DEEPFASHION2
from conftest import make_item, make_record


def _graph_records():
  """12 images, 6 partner pairs, 5 images without a partner.

  pair 10: users 0, 1 and shops 2, 3, all style 1: 4 pairs (a complete 2 x 2).
  pair 20: user 4 (styles 1, 2), shop 5 (style 1), shop 6 (style 2), shop 7 (style 0 only):
    pairs (4, 5), (4, 6); shop 7 shares no style > 0.
  partnerless: 7, user 8 (pair 30, no shop), shop 9 (pair 40, no user), user 10 (pair 10, style
    0 only), shop 11 (pair 50).
  A maximum matching has 3 pairs (2 in pair 10, 1 in pair 20).
  """
  return [
      make_record(1, [make_item(style=1)], source="user", pair_id=10),
      make_record(2, [make_item(style=1)], source="user", pair_id=10),
      make_record(3, [make_item(style=1)], source="shop", pair_id=10),
      make_record(4, [make_item(style=1)], source="shop", pair_id=10),
      make_record(5, [make_item(style=1), make_item(style=2)], source="user", pair_id=20),
      make_record(6, [make_item(style=1)], source="shop", pair_id=20),
      make_record(7, [make_item(style=2)], source="shop", pair_id=20),
      make_record(8, [make_item(style=0)], source="shop", pair_id=20),
      make_record(9, [make_item(style=1)], source="user", pair_id=30),
      make_record(10, [make_item(style=1)], source="shop", pair_id=40),
      make_record(11, [make_item(style=0)], source="user", pair_id=10),
      make_record(12, [make_item(style=1)], source="shop", pair_id=50),
  ]


PAIRS = [(0, 2), (0, 3), (1, 2), (1, 3), (4, 5), (4, 6)]
PARTNERLESS = [7, 8, 9, 10, 11]
DEGREE = collections.Counter(i for p in PAIRS for i in p)


def test_pair_samplings_are_exported_and_validated():
  from df2_jax.config import rules
  assert pairs.PAIR_SAMPLINGS == ("matching", "all_pairs") == rules.PAIR_SAMPLINGS
  with pytest.raises(ValueError, match="not one of"):
    pairs.PairIndex(np.array([[0, 1]]), 2, sampling="every_pair")


def test_epoch_sizes_of_both_samplings(caplog):
  records = _graph_records()
  matching = pairs.build_pair_index(records)
  assert matching.sampling == "matching"
  with caplog.at_level(logging.INFO):
    everything = pairs.build_pair_index(records, "all_pairs")
  assert ("Pair index: 12 images, 7 with a partner (6 image pairs); each epoch (all_pairs): 9 "
          "elements, every image pair trains the matching loss once (an image in several pairs "
          "repeats), the 5 images without a partner are paired at random with the matching "
          "targets masked.") in caplog.text
  for index in (matching, everything):
    assert sorted(map(tuple, index.pairs.tolist())) == PAIRS
    assert (index.num_images, index.num_images_with_partner,
            index.num_images_without_partner) == (12, 7, 5)
  # matching: ceil(12 / 2) = 6 elements, 3 of them matched.
  assert (matching.epoch_size, matching.pairs_per_epoch) == (6, 3)
  # all_pairs: 6 pairs + ceil(5 / 2) = 9 elements, the 6 pairs matched.
  assert (everything.epoch_size, everything.pairs_per_epoch) == (9, 6)


def test_an_all_pairs_epoch_holds_every_pair_once_and_the_partnerless_images():
  index = pairs.build_pair_index(_graph_records(), "all_pairs")
  for epoch in range(6):
    elements, match_valid = index.epoch_elements(epoch, seed=3)
    assert elements.shape == (9, 2) and match_valid.sum() == 6
    # Every pair exactly once, (user, shop), flagged; nothing else flagged.
    assert sorted(map(tuple, elements[match_valid].tolist())) == PAIRS
    rest = elements[~match_valid]
    assert (rest[:, 0] != rest[:, 1]).all()
    # The 5 partnerless images once each in the 3 masked elements, with one extra image (any
    # other image) completing the odd one.
    counts = collections.Counter(rest.ravel().tolist())
    assert set(PARTNERLESS) <= set(counts) and sum(counts.values()) == 6
    (extra,) = (collections.Counter(rest.ravel().tolist()) - collections.Counter(PARTNERLESS))
    # Each image visits as often as its pairs (user 0 and 4 twice, ...), the extra once more.
    visits = collections.Counter(elements.ravel().tolist())
    expected = DEGREE + collections.Counter(PARTNERLESS) + collections.Counter([extra])
    assert visits == expected


def test_all_pairs_epochs_are_fixed_by_seed_and_epoch_and_differ_between_epochs():
  index = pairs.build_pair_index(_graph_records(), "all_pairs")
  a, b = index.epoch_elements(2, seed=5), index.epoch_elements(2, seed=5)
  np.testing.assert_array_equal(a.elements, b.elements)
  np.testing.assert_array_equal(a.match_valid, b.match_valid)
  epochs = [index.epoch_elements(e, seed=5) for e in range(8)]
  assert len({e.elements.tobytes() for e in epochs}) == 8
  assert index.epoch_elements(2, seed=6).elements.tobytes() != a.elements.tobytes()


def test_matching_is_unchanged_by_the_option():
  """The default and an explicit "matching" draw the same epochs; a maximum matching of 3."""
  records = _graph_records()
  default = pairs.build_pair_index(records)
  explicit = pairs.build_pair_index(records, "matching")
  for epoch in range(4):
    a, b = default.epoch_elements(epoch, 1), explicit.epoch_elements(epoch, 1)
    np.testing.assert_array_equal(a.elements, b.elements)
    np.testing.assert_array_equal(a.match_valid, b.match_valid)
    assert a.match_valid.sum() == 3
    assert sorted(a.elements.ravel().tolist()) == list(range(12))  # every image once


def _category_records():
  """Category 1: pair 1 with 2 users x 2 shops (4 pairs); category 2: pair 2 with 1 user x 3
  shops (3 pairs; the user repeats 3 times); 2 users without a partner: 7 + 1 = 8 elements."""
  records = []
  for source, n, pair_id, cid in [("user", 2, 1, 1), ("shop", 2, 1, 1), ("user", 1, 2, 2),
                                  ("shop", 3, 2, 2), ("user", 2, 0, 3)]:
    for _ in range(n):
      records.append(make_record(len(records) + 1, [make_item(category_id=cid, style=1)],
                                 source=source, pair_id=pair_id or 100 + len(records)))
  return records


def test_all_pairs_category_batches_group_the_pairs():
  index = pairs.build_pair_index(_category_records(), "all_pairs")
  assert (len(index.pairs), index.num_images_without_partner, index.epoch_size) == (7, 2, 8)
  as_set = lambda e: sorted(zip(map(tuple, e.elements.tolist()), e.match_valid.tolist()))
  for epoch in range(3):
    plain = index.epoch_elements(epoch, 0)
    grouped = index.epoch_elements(epoch, 0, group_size=3)
    assert as_set(grouped) == as_set(plain)  # the same elements, another order
    keys = np.where(grouped.match_valid, index.keys[grouped.elements[:, 0]], -1)
    runs = [keys[i:i + 3] for i in range(0, 8, 3)]
    # Category 1 gives one run of 3 (4 = 3 + 1), category 2 one (3); the leftover pair of
    # category 1 and the masked element fill the short run last.
    assert [len(r) for r in runs] == [3, 3, 2]
    assert sorted(int(r[0]) for r in runs[:2] if len(set(r.tolist())) == 1) == [1, 2]
    assert sorted(runs[2].tolist()) == [-1, 1]


L, P = 0b101, 0b110  # fit masks: landscape canvas (bit 0), portrait (bit 1), both fit square


def test_all_pairs_orientation_buckets():
  """Landscape: users 0, 1 x shops 2, 3 (4 pairs) and 4 partnerless images; portrait: user 4 x
  shops 5, 6 (2 pairs) and 2 partnerless: 6 landscape elements and 3 portrait ones."""
  records, fit = [], []
  for source, n, pair_id, f in [("user", 2, 1, L), ("shop", 2, 1, L), ("user", 1, 2, P),
                                ("shop", 2, 2, P), ("user", 4, 0, L), ("shop", 2, 0, P)]:
    for _ in range(n):
      records.append(make_record(len(records) + 1, [make_item(style=1)], source=source,
                                 pair_id=pair_id or 100 + len(records)))
      fit.append(f)
  fit = np.array(fit, np.int64)
  index = pairs.build_pair_index(records, "all_pairs")
  assert (len(index.pairs), index.num_images_without_partner, index.epoch_size) == (6, 6, 9)
  for epoch in range(3):
    plain = index.epoch_elements(epoch, 0)
    for offset in (0, 1):
      bucketed = index.epoch_elements(epoch, 0, 3, fit=fit, batch_offset=offset)
      matched = lambda e: sorted(map(tuple, e.elements[e.match_valid].tolist()))
      assert matched(bucketed) == matched(plain) == sorted(map(tuple, index.pairs.tolist()))
      rest = bucketed.elements[~bucketed.match_valid]
      assert sorted((fit[rest[:, 0]] & fit[rest[:, 1]]).tolist()) == [L, L, P]  # within a canvas
      if offset == 0:  # 6 landscape elements: 2 batches, 3 portrait: 1, nothing left over
        masks = [np.bitwise_and.reduce(fit[bucketed.elements[i:i + 3]].ravel())
                 for i in range(0, 9, 3)]
        canvases = [int(m & -m).bit_length() - 1 for m in masks]  # the lowest canvas bit
        assert sorted(canvases) == [0, 0, 1]


def _fixture_records(path):
  """The fixture's images as records: pair_id, source and each item's category and style read
  straight from coco.json (what the pair index uses; the scanner is tested elsewhere)."""
  data = json.loads((path / "coco.json").read_text())
  items = collections.defaultdict(list)
  for ann in data["annotations"]:
    items[ann["image_id"]].append(ann)
  records = []
  for image in data["images"]:
    anns = items[image["id"]]
    records.append(make_record(
        image["id"], [make_item(category_id=a["category_id"], style=a["style"]) for a in anns],
        source=image.get("source", ""), pair_id=anns[0]["pair_id"]))
  return records


def test_the_real_fixtures_have_no_pairs_under_either_option(real_fixture):
  """16 images, all pair_ids distinct and no ``source``: no pairs, 16 images without a partner;
  8 elements per epoch either way (1 step of 8 pairs), the same epochs."""
  from df2_jax import schedules
  records = _fixture_records(real_fixture)
  assert len(records) == 16 and sum(len(r.items) for r in records) == 29
  assert len({r.pair_id for r in records}) == 16
  matching = pairs.build_pair_index(records, "matching")
  everything = pairs.build_pair_index(records, "all_pairs")
  for index in (matching, everything):
    assert (index.num_images, len(index.pairs), index.num_images_without_partner) == (16, 0, 16)
    assert (index.epoch_size, index.pairs_per_epoch) == (8, 0)
    assert schedules.steps_per_epoch(index.epoch_size, 8) == 1
  for epoch in range(3):
    np.testing.assert_array_equal(matching.epoch_elements(epoch, 0).elements,
                                  everything.epoch_elements(epoch, 0).elements)


def test_the_config_option_sets_the_epoch_and_the_schedule():
  from df2_jax import schedules, train
  from df2_jax.config import rules, run_config
  config = importlib.import_module("configs.tiny").get_config()
  assert config.data.pair_sampling == "matching"
  records = _graph_records()

  def steps(sampling):
    given = config
    if sampling is None:  # a config saved before the field existed, read back
      data = run_config.as_dict(config)
      del data["data"]["pair_sampling"]
      given = run_config.config_from_json(data)
    else:
      config.data.pair_sampling = sampling
    index = train.train_pair_index(given, records)
    return index.sampling, schedules.steps_per_epoch(index.epoch_size, 2)

  # 6 elements (matching) or 9 (all_pairs) at 2 per step; a config saved without it: matching.
  assert steps("all_pairs") == ("all_pairs", 5)
  assert steps("matching") == ("matching", 3)
  assert steps(None) == ("matching", 3)
  config.data.pair_sampling = "pairs"
  assert any(p.startswith("config.data.pair_sampling") for p in rules.problems(config))


def _memory_source():
  """The images of ``_graph_records``, pixels equal to the image id."""
  records = [make_record(r.image_id, list(r.items), width=30, height=40, source=r.source,
                         pair_id=r.pair_id) for r in _graph_records()]
  pixels = [np.full((40, 30, 3), r.image_id, np.uint8) for r in records]
  return DataSource(records, lambda i: pixels[i], "memory")


def test_all_pairs_stream_resumes_and_shards():
  """The stream walks all_pairs epochs of 9 elements: resuming mid-epoch and two processes'
  slices give the straight run's batches; the first epoch holds every pair once."""
  from data_pipeline import pipeline
  source = _memory_source()
  index = pairs.build_pair_index(source.records, "all_pairs")
  geometry = transforms.ImageGeometry((48, 48), 32, 48, 2, 8, spec=DEEPFASHION2)
  take = lambda ds, n: [b for _, b in zip(range(n), ds.as_numpy_iterator())]
  kwargs = dict(global_batch_pairs=2, seed=4, num_parallel_calls=2)
  straight = take(pipeline.train_dataset(source, index, geometry, process_index=0,
                                         process_count=1, **kwargs), 6)
  ids = np.concatenate([b["image_id"] for b in straight]) - 1  # record indices
  valid = np.concatenate([b["match_valid"] for b in straight])
  np.testing.assert_array_equal(np.concatenate([b["element"] for b in straight]), np.arange(12))
  assert sorted(map(tuple, ids[:9][valid[:9]].tolist())) == PAIRS  # epoch 0: elements 0-8
  assert valid[:9].sum() == 6 and sorted(set(ids[:9][~valid[:9]].ravel()) & set(PARTNERLESS)) \
      == PARTNERLESS
  resumed = take(pipeline.train_dataset(source, index, geometry, start_step=4, process_index=0,
                                        process_count=1, **kwargs), 2)  # from element 8
  halves = [take(pipeline.train_dataset(source, index, geometry, start_step=3, process_index=p,
                                        process_count=2, **kwargs), 3) for p in (0, 1)]
  for a, b in zip(straight[4:], resumed):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["match_valid"], b["match_valid"])
  for k, batch in enumerate(straight[3:]):
    np.testing.assert_array_equal(batch["image_id"], np.concatenate(
        [halves[0][k]["image_id"], halves[1][k]["image_id"]]))
