"""Evaluation pictures: which retrieved items are hits, and the strip's layout."""

import numpy as np

from data_pipeline.spec import DEEPFASHION2
from df2_jax.evaluation import visualize

QUERY_GT = [
    dict(query_image_id=1, style=1, cls=1, pair_id=7, bbox=[0, 0, 10, 10]),
    dict(query_image_id=1, style=0, cls=8, pair_id=7, bbox=[20, 20, 40, 40]),
]
GALLERY_GT = [
    dict(gallery_image_id=2, style=1, pair_id=7, bbox=[0, 0, 10, 10]),
    dict(gallery_image_id=3, style=1, pair_id=7, bbox=[5, 5, 15, 15]),
    dict(gallery_image_id=4, style=2, pair_id=7, bbox=[0, 0, 10, 10]),
]


def _entry(query_bbox, cls, ids, boxes):
  return dict(query_image_id=1, query_bbox=query_bbox, query_cls=cls, query_score=0.9,
              gallery_image_id=ids, gallery_bbox=boxes)


def test_hits_follow_the_official_rule():
  # Right class on the style-1 item: image 2 with IoU 1 hits, image 2 with IoU 0.25 does not
  # (needs >= 0.5), image 4 holds only another style, image 3 at IoU 1 hits.
  entry = _entry([1, 1, 10, 10], 1, [2, 2, 4, 3],
                 [[0, 0, 10, 10], [5, 0, 15, 10], [0, 0, 10, 10], [5, 5, 15, 15]])
  hits, status = visualize.hits_of_entry(entry, QUERY_GT, GALLERY_GT, k=4)
  assert hits == [True, False, False, True]
  assert status == "pair 7 style 1"
  # The wrong class never hits; a detection assigned to the style-0 item never hits.
  hits, status = visualize.hits_of_entry(_entry([1, 1, 10, 10], 2, [2], [[0, 0, 10, 10]]),
                                         QUERY_GT, GALLERY_GT, k=1)
  assert hits == [False] and status == "wrong class"
  hits, status = visualize.hits_of_entry(_entry([20, 20, 39, 39], 8, [2], [[0, 0, 10, 10]]),
                                         QUERY_GT, GALLERY_GT, k=1)
  assert hits == [False] and status == "distractor (style 0)"


def test_strip_and_grid_shapes():
  rng = np.random.default_rng(0)
  user = rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)
  shop = {i: rng.integers(0, 255, (50, 50, 3), dtype=np.uint8) for i in (2, 3)}
  thumb = visualize.crop_thumbnail(user, [10, 10, 30, 50], 96)
  assert thumb.shape == (96, 48, 3)  # a 20 x 40 crop scaled to 96 rows
  entry = _entry([10, 10, 30, 50], 1, [2, 3], [[0, 0, 10, 10], [0, 0, 50, 25]])
  strip = visualize.retrieval_strip(user, entry, shop, [True, False], "pair 7 style 1", k=2,
                                    height=96, names=DEEPFASHION2.names)
  # A 16-row banner over tiles of 96 rows + 3 + 17 rows of frame.
  assert strip.shape[0] == 16 + 96 + 20
  # The first gallery tile is framed green (a hit), the second red.
  tile_start = 48 + 6 + 6
  assert tuple(strip[16 + 1, tile_start + 1]) == visualize.GREEN
  grid = visualize.tile_grid([np.ones((10, 20, 3), np.uint8)] * 5, columns=4, pad=2)
  assert grid.shape == (2 * 12, 4 * 22, 3)
