"""The training loop's data rules (the loop itself runs in tests/system)."""

import dataclasses
import logging

from configs import tiny
from conftest import make_item, make_record
from data_pipeline.records import DataSource
from df2_jax import train


def test_images_without_an_item_to_train_on_are_left_out(caplog):
  crowd = dataclasses.replace(make_item(), iscrowd=True)
  records = [make_record(1), make_record(2, items=[]), make_record(3, items=[crowd]),
             make_record(4, items=[crowd, make_item()]), make_record(5)]
  source = DataSource(records, lambda i: i, "train")
  with caplog.at_level(logging.WARNING):
    kept = train.with_items(source)
  assert [r.image_id for r in kept.records] == [1, 4, 5]
  assert [kept.load_image(j) for j in range(3)] == [0, 3, 4]  # the same pixels
  assert "2 training images with no item left out" in caplog.text
  assert train.with_items(kept) is kept  # nothing to leave out: the source as it is


def test_images_left_with_no_item_never_reach_an_epoch(caplog):
  """The training split through ``with_items`` and ``train_pair_index`` (as ``train`` builds
  them): the epochs' record indices point into the kept source, the images whose items were
  all dropped appear in no element of any epoch, and every other image does."""
  config = tiny.get_config()
  records = [make_record(1, source="user", pair_id=1), make_record(2, source="user", pair_id=2),
             make_record(3, items=[], source="user", pair_id=1),  # its items all dropped
             make_record(11, source="shop", pair_id=1), make_record(12, source="shop", pair_id=2),
             make_record(13, items=[], source="shop", pair_id=2),  # its items all dropped
             make_record(5, source="user", pair_id=5)]  # no partner
  source = DataSource(records, lambda i: records[i].image_id, "train")
  for sampling in ("matching", "all_pairs"):
    config.data.pair_sampling = sampling
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      kept = train.with_items(source)
    assert "2 training images with no item left out" in caplog.text
    index = train.train_pair_index(config, kept.records)
    assert index.num_images == len(kept.records) == 5
    seen = set()
    for epoch in range(4):
      elements = index.epoch_elements(epoch, seed=0).elements
      assert elements.min() >= 0 and elements.max() < len(kept.records)
      ids = {kept.records[i].image_id for i in elements.ravel()}
      assert ids.isdisjoint({3, 13})
      assert {kept.load_image(int(i)) for i in elements.ravel()} == ids  # the same pixels
      seen |= ids
    assert seen == {1, 2, 5, 11, 12}
