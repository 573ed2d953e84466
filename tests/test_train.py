"""The training loop's data rules (the loop itself runs in tests/system)."""

import dataclasses
import logging

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
