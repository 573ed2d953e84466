"""DeepFashion2 relabelled into another taxonomy: the test data of one's own sets."""

import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from data_pipeline import annotations, relabel, synthetic
from data_pipeline import deepfashion2 as df2
from data_pipeline import spec as spec_lib


@pytest.fixture(scope="module")
def relabelled(tmp_path_factory):
  from conftest import fixtures_dir
  fixtures = fixtures_dir()
  source = json.loads((fixtures / "coco.json").read_text())
  out = tmp_path_factory.mktemp("coarse3")
  json_path, spec_path = relabel.write(source, str(out))
  return source, json.loads(open(json_path).read()), json_path, spec_path, fixtures


def test_the_relabelled_fixtures(relabelled):
  source, coco, json_path, spec_path, fixtures = relabelled
  assert [(c["id"], c["name"], len(c["keypoints"])) for c in coco["categories"]] == [
      (3, "top", 5), (7, "bottom", 3), (12, "dress", 0)]
  assert len(coco["annotations"]) == len(source["annotations"]) == 29
  for ann in coco["annotations"]:
    assert not {"pair_id", "style", "source"} & set(ann)
  # By hand: the first annotation is a pair of trousers (DeepFashion2 8, local landmarks 1..3
  # at global 151..153): its waistband, as annotated.
  old, new = source["annotations"][0], coco["annotations"][0]
  assert (old["category_id"], new["category_id"]) == (8, 7)
  start = 3 * df2.LANDMARK_START[8]
  assert new["keypoints"] == old["keypoints"][start:start + 9]
  assert new["num_keypoints"] == sum(1 for v in new["keypoints"][2::3] if v > 0)
  # Every third mask is an RLE of the same pixels as its polygons.
  rles = [(o, n) for o, n in zip(source["annotations"], coco["annotations"])
          if isinstance(n["segmentation"], dict)]
  assert len(rles) == 9
  for o, n in rles:
    image = next(im for im in source["images"] if im["id"] == o["image_id"])
    h, w = image["height"], image["width"]
    poly = mask_utils.merge(mask_utils.frPyObjects(o["segmentation"], h, w))
    assert mask_utils.area(poly) == mask_utils.area({"size": [h, w],
                                                     "counts": n["segmentation"]["counts"]})
  # The spec: flip pairs as DeepFashion2's among the kept landmarks, sigmas the merged means.
  spec = spec_lib.from_coco(json_path, spec_path)
  assert (spec.name, spec.has_pairs, spec.has_masks) == ("coarse3", False, True)
  np.testing.assert_array_equal(spec.original_ids, [0, 3, 7, 12])
  np.testing.assert_array_equal(spec.flip_perm, [0, 4, 3, 2, 1, 7, 6, 5])
  top_neck_left = np.mean([df2.OKS_SIGMAS[df2.LANDMARK_START[c] + 1] for c in range(1, 7)])
  assert spec.category(1).sigmas[1] == round(top_neck_left, 4)
  # Read back: every image and item, the crowd-free, pair-free set.
  scan = annotations.read_coco(json_path, fixtures / "image", spec=spec, strict=True,
                               num_workers=1)
  assert (len(scan.records), sum(len(r.items) for r in scan.records)) == (16, 29)


def test_flip_pairs_must_agree_across_merged_categories():
  # Landmark 4 is the front centre of a top (1) but one side of an open jacket (3).
  bad = (relabel.NewCategory(1, "outer", (1, 3), (("a", 4),)),)
  with pytest.raises(ValueError, match="outer"):
    relabel.spec_file(bad, "bad")


def test_the_synthetic_generator_writes_another_taxonomy(tmp_path):
  """A synthetic split relabelled (``python -m data_pipeline.relabel --root``)."""
  synthetic.generate(str(tmp_path / "syn"), 2, 2, 64, 0, workers=1)
  split = tmp_path / "syn" / "validation"
  assert relabel.main(["--root", str(split), "--out", str(tmp_path / "coarse")]) == 0
  json_path, spec_path = tmp_path / "coarse" / "coco.json", tmp_path / "coarse" / "spec.json"
  spec = spec_lib.from_coco(json_path, spec_path)
  scan = annotations.read_coco(json_path, split / "image", spec=spec, strict=True,
                               num_workers=1)
  items = [i for r in scan.records for i in r.items]
  assert len(scan.records) == 4 and items
  assert {spec.original_ids[i.category_id] for i in items} <= {3, 7, 12}
