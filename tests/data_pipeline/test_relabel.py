"""DeepFashion2 relabelled into another taxonomy (``data_pipeline.relabel``): the test data of
one's own sets, from the real fixtures (tests/data/relabel_fixtures.py) and the synthetic
generator."""

import json
from pathlib import Path
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipeline import annotations, relabel, synthetic
from data_pipeline import deepfashion2 as df2
from data_pipeline import spec as spec_lib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "data"))
import relabel_fixtures  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  """(DeepFashion2 source dict, relabelled dict, spec-file dict, json path, spec path, images)."""
  json_path, spec_path, images = relabel_fixtures.make(tmp_path_factory.mktemp("coarse3"))
  source = json.loads((relabel_fixtures.fixtures_dir() / "coco.json").read_text())
  return dict(source=source, coco=json.loads(Path(json_path).read_text()),
              spec=json.loads(Path(spec_path).read_text()), json_path=json_path,
              spec_path=spec_path, images=images)


def _pairs_by_source(fx):
  return list(zip(fx["source"]["annotations"], fx["coco"]["annotations"]))


def test_categories_ids_and_landmark_counts(fixtures):
  coco = fixtures["coco"]
  assert [(c["id"], c["name"], len(c["keypoints"])) for c in coco["categories"]] == [
      (3, "top", 5), (7, "bottom", 3), (12, "dress", 0)]
  assert coco["categories"][0]["keypoints"] == [
      "neck_back", "neck_left", "collar_left", "collar_right", "neck_right"]
  assert coco["images"] == fixtures["source"]["images"]
  # Every DeepFashion2 category is merged: all 29 items stay, in order, with their ids, boxes,
  # areas and iscrowd; 14 tops (1, 2, 4, 5), 12 bottoms (7, 8, 9), 3 dresses (10, 13).
  assert len(coco["annotations"]) == 29
  new_id = {1: 3, 2: 3, 3: 3, 4: 3, 5: 3, 6: 3, 7: 7, 8: 7, 9: 7, 10: 12, 11: 12, 12: 12, 13: 12}
  for old, new in _pairs_by_source(fixtures):
    assert new["category_id"] == new_id[old["category_id"]]
    assert [new[k] for k in ("id", "image_id", "bbox", "area", "iscrowd")] == [
        old[k] for k in ("id", "image_id", "bbox", "area", "iscrowd")]
    assert not {"pair_id", "style", "source"} & set(new)
    count = {3: 5, 7: 3, 12: 0}[new["category_id"]]
    assert len(new["keypoints"]) == 3 * count
    assert new["num_keypoints"] == sum(v > 0 for v in new["keypoints"][2::3])
  assert [sum(a["category_id"] == c for a in coco["annotations"]) for c in (3, 7, 12)] == [
      14, 12, 3]


def test_keypoints_by_hand(fixtures):
  pairs = _pairs_by_source(fixtures)
  # Annotation 97976, a long sleeve outwear (DeepFashion2 4, global landmarks 89..127): its
  # local landmarks 1..6 are (242,192,1) (212,189,2) (205,213,2) (196,236,2) (265,219,1)
  # (278,200,1); the top keeps 1, 2, 3, 5 and 6.
  old, new = pairs[5]
  assert (old["id"], old["category_id"], new["category_id"]) == (97976, 4, 3)
  assert old["keypoints"][3 * 89:3 * 95] == [242, 192, 1, 212, 189, 2, 205, 213, 2, 196, 236, 2,
                                             265, 219, 1, 278, 200, 1]
  assert new["keypoints"] == [242, 192, 1, 212, 189, 2, 205, 213, 2, 265, 219, 1, 278, 200, 1]
  assert new["num_keypoints"] == 5
  # Annotation 3447, a short sleeve top (1, global 0..24) with its back neck unlabelled.
  old, new = pairs[1]
  assert (old["id"], new["category_id"]) == (3447, 3)
  assert new["keypoints"] == [0, 0, 0, 164, 3, 2, 175, 22, 2, 262, 19, 2, 0, 0, 0]
  assert new["num_keypoints"] == 3
  # Annotation 3446, trousers (8, global 168..181): the waistband, local 1..3.
  old, new = pairs[0]
  assert (old["id"], new["category_id"]) == (3446, 7)
  assert new["keypoints"] == old["keypoints"][3 * 168:3 * 171] == [
      102, 426, 1, 226, 443, 1, 363, 453, 1]
  # A sling dress (13): no landmarks at all.
  old, new = pairs[28]
  assert (old["category_id"], new["category_id"], new["keypoints"], new["num_keypoints"]) == (
      13, 12, [], 0)


def _shoelace(poly):
  x, y = np.asarray(poly, np.float64).reshape(-1, 2).T
  return abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2


def test_every_third_mask_is_an_rle_of_the_same_pixels(fixtures):
  sizes = {im["id"]: (im["height"], im["width"]) for im in fixtures["coco"]["images"]}
  rles = []
  for k, (old, new) in enumerate(_pairs_by_source(fixtures)):
    if k % 3 != 2:
      assert new["segmentation"] == old["segmentation"]
      continue
    rles.append(new)
    h, w = sizes[old["image_id"]]
    seg = new["segmentation"]
    assert isinstance(seg, dict) and seg["size"] == [h, w] and isinstance(seg["counts"], str)
    decoded = mask_utils.decode({"size": seg["size"], "counts": seg["counts"].encode()})
    # The union of the polygons, each rasterised on its own (DeepFashion2's bottoms overlay
    # leg polygons on the outline).
    polys = mask_utils.decode(mask_utils.frPyObjects(old["segmentation"], h, w)).any(axis=-1)
    assert abs(int(decoded.sum()) - int(polys.sum())) <= 0.01 * polys.sum()
    assert (decoded.astype(bool) == polys).mean() > 0.999
    if len(old["segmentation"]) == 1:  # a single polygon: its geometric area
      assert decoded.sum() == pytest.approx(_shoelace(old["segmentation"][0]), rel=0.01)
  assert len(rles) == 9 and sum(len(s) == 1 for s in (
      o["segmentation"] for o, n in _pairs_by_source(fixtures) if n in rles)) == 5
  assert all(a["iscrowd"] == 0 for a in rles)


def test_spec_file_flip_pairs_and_sigmas(fixtures):
  spec, coco = fixtures["spec"], fixtures["coco"]
  assert (spec["name"], spec["has_pairs"], spec["has_masks"]) == ("coarse3", False, True)
  assert spec["categories"] == {
      "top": {"flip_pairs": [["neck_left", "neck_right"], ["collar_left", "collar_right"]],
              "sigmas": [0.0192, 0.0212, 0.0209, 0.0209, 0.0212]},
      "bottom": {"flip_pairs": [["waist_left", "waist_right"]],
                 "sigmas": [0.0279, 0.0204, 0.0279]}}
  # By hand: the back of the neck and the neckline's left end, DeepFashion2 1-6's landmarks
  # 1 and 2; the waistband's left end, 7-9's landmark 1.
  assert round((.012 + .0194 + .0074 + .0137 + .0352 + .0276) / 6, 4) == 0.0192
  assert round((.0158 + .017 + .0085 + .0153 + .0158 + .0548) / 6, 4) == 0.0212
  assert round((.0308 + .0275 + .0253) / 3, 4) == 0.0279
  for new_cat in relabel.COARSE3.categories:
    if not new_cat.landmarks:
      assert new_cat.name not in spec["categories"]
      continue
    names = next(c["keypoints"] for c in coco["categories"] if c["id"] == new_cat.id)
    entry = spec["categories"][new_cat.name]
    for old in new_cat.merges:
      src = dict(zip(names, new_cat.sources(old)))
      df2_pairs = {frozenset(p) for p in df2.FLIP_PAIRS[old]}
      for a, b in entry["flip_pairs"]:
        assert a in names and b in names
        assert frozenset((src[a], src[b])) in df2_pairs, (new_cat.name, old, a, b)
      paired = {n for p in entry["flip_pairs"] for n in p}
      for name in set(names) - paired:  # a landmark on the axis: DeepFashion2's too
        assert not any(src[name] in p for p in df2_pairs), (new_cat.name, old, name)
    means = [np.mean([df2.OKS_SIGMAS[df2.LANDMARK_START[old] + src - 1]
                      for old, src in zip(new_cat.merges, sources)])
             for sources in zip(*(new_cat.sources(old) for old in new_cat.merges))]
    assert entry["sigmas"] == [round(float(m), 4) for m in means]
    assert all(s > 0 for s in entry["sigmas"])


def test_the_set_reads_back_as_its_own_taxonomy(fixtures):
  spec = spec_lib.from_coco(fixtures["json_path"], fixtures["spec_path"])
  assert spec.describe() == "dataset 'coarse3': 3 categories, 8 landmarks, no pairs"
  np.testing.assert_array_equal(spec.original_ids, [0, 3, 7, 12])
  np.testing.assert_array_equal(spec.flip_perm, [0, 4, 3, 2, 1, 7, 6, 5])
  scan = annotations.read_coco(fixtures["json_path"], fixtures["images"], spec=spec,
                               strict=True, check_image="header", num_workers=1)
  assert (len(scan.records), sum(len(r.items) for r in scan.records)) == (16, 29)


def test_per_category_landmark_sources():
  # Hem corners: a different DeepFashion2 landmark in each merged top, paired in each.
  hems = relabel.Relabelling("hems", (relabel.NewCategory(5, "top", (1, 2, 5), (
      ("hem_left", (15, 19, 10)), ("hem_right", (17, 21, 12)))),))
  assert relabel.spec_file(hems)["categories"]["top"] == {
      "flip_pairs": [["hem_left", "hem_right"]],
      "sigmas": [round((.0492 + .0599 + .0404) / 3, 4), round((.0492 + .0599 + .0404) / 3, 4)]}
  keypoints = [0] * (3 * df2.NUM_LANDMARKS)
  start = 3 * df2.LANDMARK_START[2]
  keypoints[start + 3 * 18:start + 3 * 21] = [10, 20, 2, 0, 0, 0, 30, 40, 1]  # local 19..21
  coco = {"images": [{"id": 1, "file_name": "000001.jpg", "width": 50, "height": 50}],
          "annotations": [{"id": 1, "image_id": 1, "category_id": 2, "bbox": [0, 0, 40, 20],
                           "area": 800, "iscrowd": 0, "keypoints": keypoints,
                           "segmentation": [[0, 0, 40, 0, 40, 20, 0, 20]], "pair_id": 1,
                           "style": 1}]}
  new, _ = relabel.relabel_coco(coco, hems, rle_every=1)
  ann = new["annotations"][0]
  assert (ann["category_id"], ann["keypoints"], ann["num_keypoints"]) == (
      5, [10, 20, 2, 30, 40, 1], 2)
  assert mask_utils.area(ann["segmentation"]) == pytest.approx(800, rel=0.01)


def test_inconsistent_relabellings_are_refused():
  # Landmark 4 is the front centre of a top (1), but one side of an open jacket (3).
  front = relabel.Relabelling("bad", (relabel.NewCategory(1, "outer", (1, 3), (("a", 4),)),))
  with pytest.raises(ValueError, match="flip partner 26 is not kept"):
    relabel.spec_file(front)
  # Hem left of a short sleeve top kept without its partner.
  alone = relabel.Relabelling("bad", (relabel.NewCategory(1, "t", (1,), (("h", 15),)),))
  with pytest.raises(ValueError, match="not kept"):
    relabel.spec_file(alone)
  twice = relabel.Relabelling("bad", (relabel.NewCategory(1, "a", (1, 2)),
                                      relabel.NewCategory(2, "b", (2,))))
  with pytest.raises(ValueError, match="merged into 'a' and 'b'"):
    relabel.check(twice)
  out_of_range = relabel.Relabelling("bad", (relabel.NewCategory(1, "s", (9,), (("x", 9),)),))
  with pytest.raises(ValueError, match="no landmark 9"):
    relabel.check(out_of_range)
  own = {"images": [], "annotations": [{"id": 1, "image_id": 1, "category_id": 1,
                                        "keypoints": [0] * 15}]}
  with pytest.raises(ValueError, match="882"):
    relabel.relabel_coco(own)


def test_a_synthetic_split_in_another_taxonomy(tmp_path):
  synthetic.generate(str(tmp_path), 2, 2, 64, 0, workers=1)
  json_path, spec_path = relabel.write_coco_taxonomy(tmp_path, "validation")
  assert Path(json_path) == tmp_path / "validation_coarse3" / "coco.json"
  spec = spec_lib.from_coco(json_path, spec_path)
  scan = annotations.read_coco(json_path, tmp_path / "validation" / "image", spec=spec,
                               strict=True, check_image="header", num_workers=1)
  items = [i for r in scan.records for i in r.items]
  assert len(scan.records) == 4 and items
  assert {int(spec.original_ids[i.category_id]) for i in items} <= {3, 7, 12}
  coco = json.loads(Path(json_path).read_text())
  assert sum(isinstance(a["segmentation"], dict) for a in coco["annotations"]) == len(items) // 3
