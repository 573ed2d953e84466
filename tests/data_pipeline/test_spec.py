"""The dataset spec: DeepFashion2's equals its tables; another set's is read from its COCO file
and spec file, checked with one line naming the file and the field."""

import json

import numpy as np
import pytest

from data_pipeline import deepfashion2 as df2
from data_pipeline import spec as spec_lib
from data_pipeline.records import DataError

DF2 = spec_lib.DEEPFASHION2


def test_deepfashion2_spec_reproduces_the_tables():
  assert (DF2.num_categories, DF2.num_landmarks, DF2.max_category_landmarks) == (13, 294, 39)
  np.testing.assert_array_equal(DF2.original_ids, [0] + list(range(1, 14)))
  assert [DF2.landmark_slice(c) for c in DF2.class_ids] == [df2.landmark_slice(c)
                                                           for c in df2.CATEGORY_IDS]
  np.testing.assert_array_equal(DF2.flip_perm, df2.FLIP_PERM)
  np.testing.assert_array_equal(DF2.oks_sigmas, df2.OKS_SIGMAS)
  np.testing.assert_array_equal(DF2.category_channels, df2.CATEGORY_CHANNELS)
  np.testing.assert_array_equal(DF2.category_channel_valid, df2.CATEGORY_CHANNEL_VALID)
  np.testing.assert_array_equal(DF2.category_landmark_mask, df2.CATEGORY_LANDMARK_MASK)
  np.testing.assert_array_equal(DF2.landmark_category, df2.LANDMARK_CATEGORY)
  assert DF2.coco_categories() == df2.coco_categories()
  assert DF2.names == df2.COCO_NAMES
  for c in DF2.class_ids:
    np.testing.assert_array_equal(DF2.local_flip_perm(c), df2.local_flip_perm(c))
  assert spec_lib.from_dict(DF2.to_dict()) == DF2
  assert spec_lib.from_dict(json.loads(json.dumps(DF2.to_dict()))) == DF2


def test_the_official_conversion_reads_as_deepfashion2(real_fixture):
  assert spec_lib.from_coco(real_fixture / "coco.json") == DF2


def _coco(tmp_path, categories, annotations=(), images=()):
  path = tmp_path / "set.json"
  path.write_text(json.dumps({"images": list(images), "annotations": list(annotations),
                              "categories": categories}))
  return path


CATS = [{"id": 20, "name": "top", "keypoints": ["neck", "l_sleeve", "r_sleeve"]},
        {"id": 5, "name": "skirt", "keypoints": []},
        {"id": 9, "name": "pants", "keypoints": ["waist_l", "waist_r"]}]


def test_a_coco_set_with_its_spec_file(tmp_path):
  extra = tmp_path / "spec.json"
  extra.write_text(json.dumps({"name": "mine", "categories": {
      "top": {"flip_pairs": [["l_sleeve", "r_sleeve"]], "sigmas": [0.02, 0.03, 0.03]},
      "9": {"flip_pairs": [[1, 2]]}}}))
  spec = spec_lib.from_coco(_coco(tmp_path, CATS), extra)
  assert spec.name == "mine" and (spec.has_masks, spec.has_pairs) == (False, False)
  # Classes 1..3 in file order, the file's ids kept.
  np.testing.assert_array_equal(spec.original_ids, [0, 20, 5, 9])
  assert spec.class_of(9) == 3 and spec.class_of(1) is None
  assert spec.names == {1: "top", 2: "skirt", 3: "pants"}
  np.testing.assert_array_equal(spec.landmark_counts, [0, 3, 0, 2])
  assert spec.landmark_names == ("neck", "l_sleeve", "r_sleeve", "waist_l", "waist_r")
  np.testing.assert_array_equal(spec.flip_perm, [0, 2, 1, 4, 3])
  np.testing.assert_array_equal(spec.flip_perm[spec.flip_perm], np.arange(5))
  # Sigmas given, else DEFAULT_SIGMA each.
  np.testing.assert_allclose(spec.oks_sigmas, [0.02, 0.03, 0.03, 0.04, 0.04])
  np.testing.assert_array_equal(spec.category_channels, [[0, 0, 0], [0, 1, 2], [0, 0, 0],
                                                         [3, 4, 0]])
  np.testing.assert_array_equal(spec.category_channel_valid.sum(1), [0, 3, 0, 2])
  assert spec_lib.from_dict(spec.to_dict()) == spec


def test_pairs_and_masks_are_read_from_the_annotations(tmp_path):
  images = [{"id": 1, "source": "user"}, {"id": 2, "source": "shop"}]
  anns = [{"image_id": 1, "pair_id": 7, "segmentation": [[0, 0, 1, 0, 1, 1]]},
          {"image_id": 2, "pair_id": 7}]
  spec = spec_lib.from_coco(_coco(tmp_path, CATS, anns, images))
  assert (spec.has_masks, spec.has_pairs) == (True, True)
  anns[1]["pair_id"] = 8
  assert not spec_lib.from_coco(_coco(tmp_path, CATS, anns, images)).has_pairs


@pytest.mark.parametrize("extra, field, message", [
    ({"categories": {"top": {"flip_pairs": [[1, 4]]}}}, "categories.top.flip_pairs[0]",
     "landmark 4 out of range 1..3"),
    ({"categories": {"20": {"sigmas": [0.1, 0.0, 0.1]}}}, "categories.20.sigmas[1]",
     "a sigma must be a number > 0, got 0.0"),
    ({"categories": {"20": {"sigmas": [0.1]}}}, "categories.20.sigmas",
     "expected 3 sigmas (one per landmark), got 1"),
    ({"categories": {"top": {"flip_pairs": [["neck", "knee"]]}}},
     "categories.top.flip_pairs[0]", "'knee' is not a landmark of category 'top'"),
    ({"categories": {"shoes": {}}}, "categories.shoes", "no category with this id or name"),
    ({"colour": 1}, "colour", "not a spec file field"),
])
def test_a_bad_spec_file_is_one_line_naming_the_file_and_field(tmp_path, extra, field,
                                                               message):
  path = tmp_path / "spec.json"
  path.write_text(json.dumps(extra))
  with pytest.raises(DataError) as info:
    spec_lib.from_coco(_coco(tmp_path, CATS), path)
  assert info.value.path == str(path) and info.value.field == field
  assert message in info.value.message and "\n" not in str(info.value)


@pytest.mark.parametrize("cats, field, message", [
    ([{"id": 3, "name": "", "keypoints": []}], "categories[0].name", "has no name"),
    ([{"id": 3}], "categories[0].name", "has no name"),
    ([{"id": 0, "name": "a"}], "categories[0].id", "expected a positive integer"),
    ([{"id": 3, "name": "a"}, {"id": 3, "name": "b"}], "categories[1].id", "repeats"),
    ([{"id": 3, "name": "a", "keypoints": "neck"}], "categories[0].keypoints",
     "expected a list of landmark names"),
    ([], "categories", "expected a non-empty list"),
])
def test_a_bad_coco_category_is_one_line_naming_the_file_and_field(tmp_path, cats, field,
                                                                   message):
  path = _coco(tmp_path, cats)
  with pytest.raises(DataError) as info:
    spec_lib.from_coco(path)
  assert info.value.path == str(path) and info.value.field == field
  assert message in info.value.message


def test_the_config_rules_check_the_spec():
  from configs import tiny
  from df2_jax.config import rules
  config = tiny.get_config()
  cats = [dict(c) for c in config.data.spec.categories]
  cats[2] = dict(cats[2], flip_pairs=((1, 40),))
  config.data.spec.categories = tuple(cats)
  assert rules.problems(config) == [
      "config.data.spec.categories field 'categories[2].flip_pairs[0]': landmark 40 out of "
      "range 1..31 (category 'short_sleeved_outwear' has 31 landmarks)"]
  config = tiny.get_config()
  config.data.spec_file = "spec.json"
  assert rules.problems(config) == [
      "config.data.spec_file is read for config.data.format='coco' only (got 'synthetic')"]
