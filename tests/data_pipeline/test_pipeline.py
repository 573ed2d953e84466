"""The tf.data pipeline on in-memory sources, the real fixture and synthetic data."""

import logging

import numpy as np
import pytest

from data_pipeline import pairs, pipeline, transforms
from data_pipeline.records import DataError
from data_pipeline.records import DataSource
from data_pipeline.spec import DEEPFASHION2
from conftest import make_item, make_record

GEOM = transforms.ImageGeometry(canvas_hw=(48, 48), short_side=32, max_size=48,
                                max_instances=3, mask_size=8, spec=DEEPFASHION2)


def _memory_source(num_pairs=6, bad=(), rival_users=0, lone_users=0, lone_shops=0):
  """Images whose pixels all equal their image id; the records ``bad`` fail to load.

  First num_pairs pair_ids (100, 101, ...), each a user and a shop image sharing style 1 (ids
  2p + 1 and 2p + 2); then ``rival_users`` second user images for pair_ids 100, 101, ... (their
  shop can be matched to one of its two users per epoch), ``lone_users`` user images whose
  pair_id (200, ...) has no shop and ``lone_shops`` shop images whose pair_id (300, ...) has no
  user.
  """
  records, pixels = [], []

  def add(source, pair_id, category):
    image_id = len(records) + 1
    h, w = (30, 40) if source == "shop" else (40, 30)
    records.append(make_record(image_id, [make_item(category, 1, (2, 3, 20, 25)),
                                          make_item(9, 0, (5, 5, 15, 15))],
                               width=w, height=h, source=source, pair_id=pair_id))
    pixels.append(np.full((h, w, 3), image_id, np.uint8))

  for p in range(num_pairs):
    add("user", 100 + p, 1 + p % 13)
    add("shop", 100 + p, 1 + p % 13)
  for p in range(rival_users):
    add("user", 100 + p, 1 + p % 13)
  for p in range(lone_users):
    add("user", 200 + p, 1)
  for p in range(lone_shops):
    add("shop", 300 + p, 1)

  def loader(i):
    if i in bad:
      raise DataError(records[i].image_path, "image", "truncated JPEG")
    return pixels[i]

  return DataSource(records, loader, "memory")


def _take(ds, n):
  it = ds.as_numpy_iterator()
  return [next(it) for _ in range(n)]


def test_train_batch_shapes_and_pair_contents():
  source = _memory_source()
  ds = pipeline.train_dataset(source, pairs.build_pair_index(source.records), GEOM,
                              global_batch_pairs=4, seed=0, process_index=0, process_count=1)
  batch = _take(ds, 1)[0]
  assert batch["image"].shape == (4, 2, 48, 48, 3) and batch["image"].dtype == np.uint8
  assert batch["boxes"].shape == (4, 2, 3, 4)
  assert batch["masks"].shape == (4, 2, 3, 8, 8)
  assert batch["landmarks"].shape == (4, 2, 3, 294, 3)
  assert batch["match_valid"].all()
  np.testing.assert_array_equal(batch["element"], [0, 1, 2, 3])
  # Axis 1 is (user, shop): user ids are odd, shop ids even, same pair_id.
  assert (batch["image_id"][:, 0] % 2 == 1).all() and (batch["image_id"][:, 1] % 2 == 0).all()
  np.testing.assert_array_equal(batch["pair_id"][:, 0, 0], batch["pair_id"][:, 1, 0])
  np.testing.assert_array_equal(batch["classes"][:, :, 2], 0)
  # Each image's pixels carry its id: the canvas content is that image, resized.
  for p in range(4):
    for j in range(2):
      h, w = batch["image_hw"][p, j]
      assert (batch["image"][p, j, :h, :w] == batch["image_id"][p, j]).all()


def test_resume_at_step_k_equals_the_straight_run():
  source = _memory_source()
  index = pairs.build_pair_index(source.records)
  kwargs = dict(global_batch_pairs=4, seed=5, process_index=0, process_count=1)
  straight = _take(pipeline.train_dataset(source, index, GEOM, **kwargs), 5)
  resumed = _take(pipeline.train_dataset(source, index, GEOM, start_step=3, **kwargs), 2)
  for a, b in zip(straight[3:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # 12 images, each with one partner: 6 matched elements per epoch, 4 per step; step 1 crosses
  # into epoch 1; every epoch visits the 12 images once, user first.
  elements = np.concatenate([b["element"] for b in straight])
  np.testing.assert_array_equal(elements, np.arange(20))
  assert all(b["match_valid"].all() for b in straight)
  ids = np.concatenate([b["image_id"] for b in straight])
  for epoch in (ids[:6], ids[6:12]):
    assert sorted(epoch[:, 0]) == [1, 3, 5, 7, 9, 11]
    assert sorted(epoch[:, 1]) == [2, 4, 6, 8, 10, 12]
  assert (ids[:6] != ids[6:12]).any()  # a new order each epoch
  # Flips are random but deterministic per element: some flipped, some not.
  flips = np.concatenate([b["flipped"].ravel() for b in straight])
  assert 0 < flips.sum() < len(flips)


def test_an_epoch_visits_every_image_once_and_masks_non_partners():
  # 4 user-shop pairs, a rival user for pair_id 100, 2 users and 1 shop without a partner:
  # 12 images, 6 elements per epoch, of which 4 matched (pair_id 100: one of its two users).
  source = _memory_source(num_pairs=4, rival_users=1, lone_users=2, lone_shops=1)
  index = pairs.build_pair_index(source.records)
  assert (index.num_images, index.num_images_with_partner) == (12, 9)
  assert (len(index.pairs), index.pairs_per_epoch, index.epoch_size) == (5, 4, 6)
  by_id = {r.image_id: r for r in source.records}

  def partners(a, b):
    ra, rb = by_id[a], by_id[b]
    return (ra.source, rb.source) == ("user", "shop") and ra.pair_id == rb.pair_id and bool(
        pairs.positive_styles(ra) & pairs.positive_styles(rb))

  kwargs = dict(global_batch_pairs=2, seed=2, process_index=0, process_count=1)
  straight = _take(pipeline.train_dataset(source, index, GEOM, **kwargs), 6)  # two epochs
  ids = np.concatenate([b["image_id"] for b in straight])
  valid = np.concatenate([b["match_valid"] for b in straight])
  for epoch in range(2):
    e_ids, e_valid = ids[6 * epoch:6 * epoch + 6], valid[6 * epoch:6 * epoch + 6]
    assert sorted(e_ids.ravel()) == list(range(1, 13))  # every image once, unpaired included
    assert e_valid.sum() == 4
    for (a, b), v in zip(e_ids.tolist(), e_valid):
      # Matched: user in slot 0, its partner in slot 1. Masked: no partners, in either order
      # (the matching is maximum, so two leftover images are never partners).
      assert partners(a, b) == bool(v) and not partners(b, a), (epoch, a, b, v)
    # pair_id 100's shop (id 2) goes to one of its users (ids 1, 9); the other is left over.
    assert len({a for (a, b), v in zip(e_ids.tolist(), e_valid) if v and b == 2} & {1, 9}) == 1
    # The images without a partner (ids 10, 11, 12) are always in masked elements.
    assert not e_valid[np.isin(e_ids, [10, 11, 12]).any(axis=1)].any()
  assert valid.any() and not valid.all() and (ids[:6] != ids[6:]).any()
  # The batches of a run resumed at step 2 (step 3 crosses into epoch 1), with one worker,
  # equal the straight ones.
  resumed = _take(pipeline.train_dataset(source, index, GEOM, start_step=2, num_parallel_calls=1,
                                         **kwargs), 4)
  for a, b in zip(straight[2:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_processes_read_disjoint_slices_of_the_global_batch():
  source = _memory_source()
  index = pairs.build_pair_index(source.records)
  full = _take(pipeline.train_dataset(source, index, GEOM, global_batch_pairs=4, seed=1,
                                      process_index=0, process_count=1), 2)
  parts = [_take(pipeline.train_dataset(source, index, GEOM, global_batch_pairs=4, seed=1,
                                        process_index=p, process_count=2), 2) for p in (0, 1)]
  for step in range(2):
    for k in full[step]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), full[step][k], err_msg=k)
  with pytest.raises(ValueError, match="not divisible"):
    pipeline.train_dataset(source, index, GEOM, global_batch_pairs=3, seed=1, process_index=0,
                           process_count=2)


def test_a_failing_image_is_skipped_counted_and_logged(caplog):
  source = _memory_source(bad=(2,))  # record 2 = the user image of pair_id 101
  index = pairs.build_pair_index(source.records)
  ds = pipeline.train_dataset(source, index, GEOM, global_batch_pairs=6, seed=0,
                              process_index=0, process_count=1, num_parallel_calls=1)
  with caplog.at_level(logging.WARNING):
    batch = _take(ds, 1)[0]
  assert 3 not in batch["image_id"][:, 0]  # image id 3 is record 2
  assert ds.stream.skips.skipped.keys() == {2}
  assert "truncated JPEG" in caplog.text and "field 'image'" in caplog.text


def test_a_substituted_element_keeps_its_own_match_flag():
  # Ids 1-4: two user-shop pairs; ids 5, 6: lone users, 6 fails. Its element is replaced by the
  # next one of the epoch, whose match_valid comes along.
  source = _memory_source(num_pairs=2, lone_users=2, bad=(5,))
  index = pairs.build_pair_index(source.records)
  ds = pipeline.train_dataset(source, index, GEOM, global_batch_pairs=3, seed=0,
                              process_index=0, process_count=1, num_parallel_calls=1)
  for batch in _take(ds, 4):
    for (a, b), v in zip(batch["image_id"].tolist(), batch["match_valid"]):
      assert 6 not in (a, b)
      assert bool(v) == (b == a + 1 and a in (1, 3)), (a, b, v)
  assert ds.stream.skips.skipped.keys() == {5}


def test_eval_is_file_order_padded_and_complete():
  source = _memory_source(num_pairs=3)  # 6 images
  ds = pipeline.eval_dataset(source, GEOM, batch_size=4, process_index=0, process_count=1)
  batches = list(ds.as_numpy_iterator())
  assert len(batches) == 2
  ids = np.concatenate([b["image_id"] for b in batches])
  valid = np.concatenate([b["valid"] for b in batches])
  np.testing.assert_array_equal(ids[valid], [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(valid, [1, 1, 1, 1, 1, 1, 0, 0])
  assert not np.concatenate([b["flipped"] for b in batches]).any()
  # Two processes: disjoint, complete, same number of batches.
  per = [list(pipeline.eval_dataset(source, GEOM, batch_size=2, process_index=p,
                                    process_count=2).as_numpy_iterator()) for p in (0, 1)]
  assert len(per[0]) == len(per[1]) == 2
  got = sorted(int(i) for b in per[0] + per[1] for i, v in zip(b["image_id"], b["valid"]) if v)
  assert got == [1, 2, 3, 4, 5, 6]


def test_eval_indices_padding():
  np.testing.assert_array_equal(pipeline.eval_indices(5, 2, 0, 2)[0], [0, 1, 2, -1])
  np.testing.assert_array_equal(pipeline.eval_indices(5, 2, 1, 2)[0], [3, 4, -1, -1])
  # By canvas: images 0-2 on process 0 (canvases 1, 0, 1), 3-5 on process 1 (0, 0, 0). Each
  # process gets 2 batches of canvas 0 and 1 of canvas 1.
  canvas = np.array([1, 0, 1, 0, 0, 0])
  indices, canvases = pipeline.eval_indices(6, 2, 0, 2, canvas)
  np.testing.assert_array_equal(indices, [1, -1, -1, -1, 0, 2])
  np.testing.assert_array_equal(canvases, [0, 0, 0, 0, 1, 1])
  indices, canvases = pipeline.eval_indices(6, 2, 1, 2, canvas)
  np.testing.assert_array_equal(indices, [3, 4, 5, -1, -1, -1])
  np.testing.assert_array_equal(canvases, [0, 0, 0, 0, 1, 1])


# Landscape images (30x40, resized to 32x43) fit the 32x64 canvas, portrait ones the 64x32.
BUCKETS = transforms.ImageGeometry(canvas_hw=(64, 64), short_side=32, max_size=48,
                                   max_instances=3, mask_size=8, buckets=((32, 64), (64, 32)),
                                   spec=DEEPFASHION2)


def _oriented_source(orientations):
  """One user-shop partner pair per entry ("LL", "PP", "LP": the user's and the shop's
  orientation), pixels equal to the image id."""
  records, pixels = [], []
  for p, pair in enumerate(orientations):
    for side, o in zip(("user", "shop"), pair):
      image_id = len(records) + 1
      h, w = (30, 40) if o == "L" else (40, 30)
      records.append(make_record(image_id, [make_item(1 + p % 13, 1, (2, 3, 20, 25))],
                                 width=w, height=h, source=side, pair_id=100 + p))
      pixels.append(np.full((h, w, 3), image_id, np.uint8))
  return DataSource(records, lambda i: pixels[i], "memory")


def _smallest_canvas(image_hw):
  """The smallest of BUCKETS.canvases holding every content size of a batch."""
  for ch, cw in BUCKETS.canvases:
    if (image_hw[..., 0] <= ch).all() and (image_hw[..., 1] <= cw).all():
      return ch, cw


def test_orientation_buckets_put_each_batch_on_one_canvas():
  assert BUCKETS.canvases == ((32, 64), (64, 32), (64, 64))
  # A square image fits both buckets; a single image always fits one (short side <= 32).
  assert [BUCKETS.fit_mask(30, 40), BUCKETS.fit_mask(40, 30), BUCKETS.fit_mask(40, 40)] == [
      0b101, 0b110, 0b111]
  # 5 landscape pairs, 3 portrait, 1 mixed: 9 elements per epoch, 2 per step.
  source = _oriented_source(["LL"] * 5 + ["PP"] * 3 + ["LP"])
  index = pairs.build_pair_index(source.records)
  kwargs = dict(global_batch_pairs=2, seed=3, process_index=0, process_count=1)
  straight = _take(pipeline.train_dataset(source, index, BUCKETS, **kwargs), 9)  # two epochs
  shapes = [b["image"].shape[2:4] for b in straight]
  for b, shape in zip(straight, shapes):
    # The batch's canvas is the smallest that holds its images; their pixels are intact.
    assert shape == _smallest_canvas(b["image_hw"])
    for p in range(2):
      for j in range(2):
        h, w = b["image_hw"][p, j]
        assert (b["image"][p, j, :h, :w] == b["image_id"][p, j]).all()
        assert not b["image"][p, j, h:].any() and not b["image"][p, j, :, w:].any()
  # Per epoch: 2 landscape and 1 portrait batch, the rest (a landscape, a portrait and the
  # mixed element, with the epochs' ends) on the square canvas.
  assert shapes.count((32, 64)) >= 4 and shapes.count((64, 32)) >= 2
  assert shapes.count((64, 64)) <= 3
  ids = np.concatenate([b["image_id"] for b in straight])
  for epoch in (ids[:9], ids[9:18]):  # every image once per epoch, matched as partners
    assert sorted(epoch.ravel()) == list(range(1, 19))
    assert (epoch[:, 1] == epoch[:, 0] + 1).all()
  # Resumed at step 3 (in epoch 0) and at step 5 (the batch that straddles the epochs).
  for start in (3, 4):
    resumed = _take(pipeline.train_dataset(source, index, BUCKETS, start_step=start,
                                           num_parallel_calls=1, **kwargs), 2)
    for a, b in zip(straight[start:], resumed):
      for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Two processes read halves of the same global batches, on the same canvases.
  parts = [_take(pipeline.train_dataset(source, index, BUCKETS, global_batch_pairs=2, seed=3,
                                        process_index=p, process_count=2), 9) for p in (0, 1)]
  for step in range(9):
    for k in straight[step]:
      np.testing.assert_array_equal(
          np.concatenate([parts[0][step][k], parts[1][step][k]]), straight[step][k], err_msg=k)


def test_evaluation_with_buckets_groups_images_by_canvas():
  source = _oriented_source(["LL", "LP", "PL", "LL"])  # 5 landscape, 3 portrait images
  for count in (1, 2):
    batches = [list(pipeline.eval_dataset(source, BUCKETS, batch_size=2, process_index=p,
                                          process_count=count).as_numpy_iterator())
               for p in range(count)]
    assert len({len(b) for b in batches}) == 1  # the same number of batches on each process
    seen = []
    for per_process in zip(*batches):
      assert len({b["image"].shape for b in per_process}) == 1  # processes agree on the canvas
      for b in per_process:
        valid = b["valid"]
        shape = b["image"].shape[1:3]
        assert shape == _smallest_canvas(b["image_hw"][valid]) or not valid.any()
        assert shape != (64, 64)  # every image fits a bucket
        seen += b["image_id"][valid].tolist()
    assert sorted(seen) == list(range(1, 9))
  one = [b for b in pipeline.eval_dataset(source, BUCKETS, batch_size=2, process_index=0,
                                          process_count=1).as_numpy_iterator()]
  order = np.concatenate([b["image_id"][b["valid"]] for b in one])
  np.testing.assert_array_equal(order, [1, 2, 3, 6, 7, 8, 4, 5])  # by canvas, file order within


def test_real_fixture_trains_as_singles_and_evaluates_in_file_order(real_fixture, caplog):
  from data_pipeline import sources
  source = sources.coco_source(str(real_fixture / "coco.json"), str(real_fixture / "image"),
                               spec=DEEPFASHION2)
  assert len(source) == 16 and sum(len(r.items) for r in source.records) == 29
  geometry = transforms.ImageGeometry((320, 320), 200, 320, 4, 16, spec=DEEPFASHION2)
  with caplog.at_level(logging.WARNING):
    index = pairs.build_pair_index(source.records)
  assert not index.match_valid and "matching targets masked" in caplog.text
  ds = pipeline.train_dataset(source, index, geometry, global_batch_pairs=4, seed=0,
                              process_index=0, process_count=1)
  batch = _take(ds, 1)[0]
  assert batch["image"].shape == (4, 2, 320, 320, 3) and not batch["match_valid"].any()
  ids = batch["image_id"].ravel()
  assert len(set(ids)) == 8  # two different images per element
  valid = batch["instance_valid"]
  assert valid.sum() >= 8 and (batch["classes"][valid] > 0).all()
  # Landmarks of each valid instance sit in its category's slice only.
  from data_pipeline import deepfashion2 as df2
  for p, j, m in zip(*np.nonzero(valid)):
    labelled = batch["landmarks"][p, j, m, :, 2] > 0
    assert not (labelled & ~df2.CATEGORY_LANDMARK_MASK[batch["classes"][p, j, m]]).any()
  # Evaluation: all 16 images once, in file (image_id) order.
  ev = list(pipeline.eval_dataset(source, geometry, batch_size=5, process_index=0,
                                  process_count=1).as_numpy_iterator())
  got = np.concatenate([b["image_id"][b["valid"]] for b in ev])
  np.testing.assert_array_equal(got, sorted(r.image_id for r in source.records))
  # The 702 x 468 image 2092: scale = min(200 / 468, 320 / 702) -> 200 / 468.
  first = ev[0]
  k = int(np.nonzero(first["image_id"] == 2092)[0][0])
  np.testing.assert_allclose(first["scale"][k], 200 / 468, rtol=1e-6)
  np.testing.assert_array_equal(first["image_hw"][k], [300, 200])


def test_flipped_synthetic_landmarks_stay_on_their_garment():
  """Pixel check: after encode_image(flip=True), every visible landmark lies on its item's
  mask pasted back from the flipped crop, and on the mirror of the rendered visible mask."""
  from data_pipeline import annotations, synthetic
  checked = 0
  for index in range(8):
    r = synthetic.render_example(11, 0, index, 160)
    h, w = r.image.shape[:2]
    record = annotations.parse_raw_annotation(r.annotation, "synthetic", index + 1, "", w, h)
    # No resize (scale 1), and mask crops at least as fine as the image pixels.
    geometry = transforms.ImageGeometry((160, 160), min(h, w), max(h, w), 6, 160, spec=DEEPFASHION2)
    out = transforms.encode_image(record, r.image[:, :, ::-1].copy(), geometry, flip=True)
    assert out["scale"] == 1.0
    np.testing.assert_array_equal(out["image"][:h, :w], r.image[:, ::-1, ::-1])
    for k in range(len(record.items)):
      pasted = transforms.paste_mask(out["masks"][k], out["boxes"][k], (h, w)).astype(bool)
      mirrored = r.visible_masks[k][:, ::-1].astype(bool)
      for x, y, v in out["landmarks"][k]:
        if v != 2:
          continue
        # The landmark's pixel index x loads as x + 0.5 and flips to W - x - 0.5, whose pixel
        # is the mirror pixel W - 1 - x: v = 2 says the visible mask is within 1 px of the
        # annotated pixel, so the mirrored mask is within 1 px of this one, exactly (3 x 3).
        # The pasted crop needs 2 px: integer polygons traced through boundary pixels lose up
        # to 1 px at right/bottom edges.
        i, j = int(np.clip(np.floor(y), 1, h - 2)), int(np.clip(np.floor(x), 1, w - 2))
        assert mirrored[i - 1:i + 2, j - 1:j + 2].any(), (index, k, x, y)
        i, j = int(np.clip(np.floor(y), 2, h - 3)), int(np.clip(np.floor(x), 2, w - 3))
        assert pasted[i - 2:i + 3, j - 2:j + 3].any(), (index, k, x, y)
        checked += 1
  assert checked > 100
