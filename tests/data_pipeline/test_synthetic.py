"""Tests of the synthetic DeepFashion2 generator (data_pipeline/synthetic.py)."""

import collections
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from data_pipeline import annotations
from data_pipeline import deepfashion2 as df2
from data_pipeline import synthetic

SIZE = 128


def _files(root: Path) -> dict[str, bytes]:
  return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _items(anno: dict) -> list[dict]:
  return [anno[f"item{i}"] for i in range(1, len(anno)) if f"item{i}" in anno]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("synthetic") / "a"
  counts = synthetic.generate(out, train_pairs=12, val_pairs=4, image_size=SIZE, seed=3)
  assert counts["train"]["images"] == 24 and counts["validation"]["images"] == 8
  return out


@pytest.fixture(scope="module")
def rendered() -> list[synthetic.Rendered]:
  return [synthetic.render_example(5, 0, i, SIZE) for i in range(60)]


def test_layout_and_ids(dataset):
  for split, n in (("train", 24), ("validation", 8)):
    stems = [f"{i:06d}" for i in range(1, n + 1)]
    assert sorted(p.stem for p in (dataset / split / "image").iterdir()) == stems
    assert sorted(p.stem for p in (dataset / split / "annos").iterdir()) == stems
    assert all(p.suffix == ".jpg" for p in (dataset / split / "image").iterdir())


def test_deterministic_and_independent_of_workers(dataset, tmp_path):
  again = tmp_path / "b"
  synthetic.generate(again, train_pairs=12, val_pairs=4, image_size=SIZE, seed=3, workers=2)
  first, second = _files(dataset), _files(again)
  assert len(first) == 2 * (24 + 8)
  assert first == second
  other = tmp_path / "c"
  synthetic.generate(other, train_pairs=2, val_pairs=0, image_size=SIZE, seed=4)
  assert _files(other)["train/annos/000001.json"] != first["train/annos/000001.json"]


def test_scan_raw_root_accepts_everything(dataset):
  for split in ("train", "validation"):
    result = annotations.scan_raw_root(dataset / split, num_workers=1)
    assert result.num_skipped == 0
    assert len(result.records) == len(list((dataset / split / "annos").iterdir()))
    for record in result.records:
      anno = json.loads(Path(record.anno_path).read_text())
      assert len(record.items) == len(_items(anno))
      assert record.source == anno["source"] and record.pair_id == anno["pair_id"]
      assert max(record.width, record.height) == SIZE
      assert min(abs(record.height / record.width - a) for a in synthetic.ASPECTS) < 0.02


def test_json_fields(dataset):
  for path in sorted((dataset / "train" / "annos").glob("*.json")):
    anno = json.loads(path.read_text())
    items = _items(anno)
    assert len(anno) == len(items) + 2
    assert anno["source"] in ("user", "shop") and anno["pair_id"] >= 1
    assert 1 <= len(items) <= (2 if anno["source"] == "shop" else 3)
    for item in items:
      cid = item["category_id"]
      assert item["category_name"] == df2.RAW_NAMES[cid]
      assert len(item["landmarks"]) == 3 * df2.LANDMARK_COUNTS[cid]
      for key in df2.ATTRIBUTES:
        assert item[key] in (1, 2, 3)
      assert item["viewpoint"] in ((1,) if anno["source"] == "shop" else (2, 3))
      assert all(isinstance(v, int) for v in item["bounding_box"] + item["landmarks"])
      for poly in item["segmentation"]:
        assert len(poly) >= 6 and len(poly) % 2 == 0 and all(isinstance(v, int) for v in poly)


def test_pairs_share_a_styled_item(dataset):
  for split, pairs in (("train", 12), ("validation", 4)):
    by_pair = collections.defaultdict(dict)
    for path in sorted((dataset / split / "annos").glob("*.json")):
      anno = json.loads(path.read_text())
      assert anno["source"] not in by_pair[anno["pair_id"]]
      by_pair[anno["pair_id"]][anno["source"]] = {
          (it["category_id"], it["style"]) for it in _items(anno) if it["style"] > 0}
    assert sorted(by_pair) == list(range(1, pairs + 1))
    for sides in by_pair.values():
      assert set(sides) == {"user", "shop"}
      assert sides["user"] & sides["shop"]


def test_all_categories_render():
  for cid in df2.CATEGORY_IDS:
    spec = synthetic.make_pair_spec(0, 0, cid, key_category=cid)
    for source in ("shop", "user"):
      r = synthetic.render_image(np.random.default_rng([cid, len(source)]), spec, source, SIZE)
      cats = [(it["category_id"], it["style"]) for it in _items(r.annotation)]
      assert (cid, 1) in cats
      h, w = r.image.shape[:2]
      assert r.image.dtype == np.uint8 and r.image.shape[2] == 3 and max(h, w) == SIZE


def test_landmarks_visibility_on_masks(rendered):
  counts = collections.Counter()
  for r in rendered:
    h, w = r.image.shape[:2]
    for item, vis, full, points in zip(_items(r.annotation), r.visible_masks, r.full_masks,
                                       r.landmarks):
      marks = np.array(item["landmarks"]).reshape(-1, 3)
      assert marks.shape[0] == df2.LANDMARK_COUNTS[item["category_id"]]
      for (x, y, v), point in zip(marks, points):
        counts[v] += 1
        if v == 0:
          assert x == 0 and y == 0
          continue
        # The index of the pixel holding the rendered point, like the real annotations (the
        # loader's + 0.5 puts it back within half a pixel of the point).
        assert (x, y) == tuple(np.floor(point).astype(int)), (point, x, y)
        assert 0 <= x < w and 0 <= y < h
        win = (slice(max(y - 1, 0), y + 2), slice(max(x - 1, 0), x + 2))
        if v == 2:
          assert vis[win].any()
        else:
          assert full[win].any() and not vis[win].any()
  assert counts[2] > counts[1] > 0 and counts[0] > 0


def test_boxes_match_masks_and_polygons(rendered):
  occluded = 0
  for r in rendered:
    h, w = r.image.shape[:2]
    for item, vis in zip(_items(r.annotation), r.visible_masks):
      x1, y1, x2, y2 = item["bounding_box"]
      assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
      ys, xs = np.nonzero(vis)
      assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == [x1, y1, x2, y2]
      pts = np.concatenate([np.array(p).reshape(-1, 2) for p in item["segmentation"]])
      lo, hi = pts.min(0), pts.max(0)
      assert np.all(np.abs(np.array([lo[0], lo[1], hi[0], hi[1]]) - [x1, y1, x2, y2]) <= 1)
      occluded += item["occlusion"] > 1
  assert occluded > 0


def test_visible_masks_are_disjoint_and_respect_occluders(rendered):
  for r in rendered:
    total = np.zeros(r.image.shape[:2], np.int32)
    for vis, full in zip(r.visible_masks, r.full_masks):
      assert not (vis & ~full).any()
      assert not (vis & r.occluder_mask).any()
      total += vis
    assert total.max() <= 1


def test_template_mirror_consistency():
  for cid in df2.CATEGORY_IDS:
    t = synthetic.TEMPLATES[cid]
    perm = df2.local_flip_perm(cid)
    assert t.points.shape == (df2.LANDMARK_COUNTS[cid], 2)
    mirrored = t.points * np.array([-1.0, 1.0])
    np.testing.assert_allclose(mirrored[perm], t.points, atol=1e-6)
    assert np.all(np.abs(t.points[perm == np.arange(len(perm)), 0]) < 1e-6)
    # The per-item deformation keeps the mirror structure.
    shape = synthetic.random_shape(np.random.default_rng(cid), cid)
    g = synthetic.deform(cid, shape)
    np.testing.assert_allclose(synthetic.mirror_points(cid, g), g, atol=1e-6)
    # Every landmark is in the template's silhouette (outline or inside).
    scale = 200.0
    canvas = np.zeros((500, 500), np.uint8)
    offset = np.array([250.0, 100.0])
    for poly in synthetic.template_polygons(cid):
      cv2.fillPoly(canvas, [np.round(poly * scale + offset).astype(np.int32)], 1)
    for x, y in np.round(t.points * scale + offset).astype(int):
      assert canvas[y - 1:y + 2, x - 1:x + 2].any(), (cid, x, y)


def test_styled_items_share_appearance_across_images():
  spec = synthetic.make_pair_spec(1, 0, 7)
  again = synthetic.make_pair_spec(1, 0, 7)
  assert spec == again
  other = synthetic.make_pair_spec(1, 0, 8)
  assert spec.key.appearance != other.key.appearance
  assert spec.key.style == 1


def test_the_cli_writes_where_run_py_reads(tmp_path):
  """The CLI's defaults are the demo config's, and it writes the folder (with the completion
  mark) that run.py's ensure_synthetic would generate, so the demo reuses it."""
  from configs import demo_synthetic
  from data_pipeline import sources
  from data_pipeline import synthetic as syn
  data = demo_synthetic.get_config().data
  args = syn._parse_args([])  # pylint: disable=protected-access
  assert (args.train_pairs, args.val_pairs, args.image_size, args.seed) == (
      data.synthetic_train_pairs, data.synthetic_val_pairs, data.synthetic_image_size,
      data.synthetic_seed)
  assert syn.main(["--synthetic_dir", str(tmp_path), "--train_pairs", "2", "--val_pairs", "1",
                   "--image_size", "64"]) == 0
  data.update(dict(synthetic_dir=str(tmp_path), synthetic_train_pairs=2, synthetic_val_pairs=1,
                   synthetic_image_size=64))
  root = tmp_path / "s0_t2_v1_px64_g2"
  assert (root / syn.COMPLETE).exists() and len(list((root / "train" / "image").iterdir())) == 4
  stamp = (root / "train" / "annos" / "000001.json").stat().st_mtime_ns
  assert sources.ensure_synthetic(data) == str(root)  # found, not generated again
  assert (root / "train" / "annos" / "000001.json").stat().st_mtime_ns == stamp
