import numpy as np

from data_pipeline import deepfashion2 as df2


def test_counts_and_offsets():
  assert sum(df2.LANDMARK_COUNTS.values()) == 294
  assert df2.LANDMARK_START[1] == 0
  assert df2.LANDMARK_START[9] == 182
  assert df2.LANDMARK_START[13] == 275
  assert df2.landmark_slice(13) == slice(275, 294)
  assert len(df2.CATEGORIES) == 13
  assert df2.COCO_NAMES[3] == "short_sleeved_outwear"
  assert df2.category_from_raw_name("sling dress") == 13
  assert df2.category_from_raw_name("hat") is None


def test_sigmas():
  assert df2.OKS_SIGMAS.shape == (294,)
  np.testing.assert_allclose(df2.OKS_SIGMAS.sum(), 11.519, atol=1e-9)
  # First and last of category 4 (global 89 and 127), by hand from the spec's table.
  assert df2.OKS_SIGMAS[89] == 0.0137 and df2.OKS_SIGMAS[127] == 0.0573


def test_flip_perm_is_an_involution_within_categories():
  perm = df2.FLIP_PERM
  np.testing.assert_array_equal(perm[perm], np.arange(294))
  np.testing.assert_array_equal(df2.LANDMARK_CATEGORY[perm], df2.LANDMARK_CATEGORY)
  # Category 3 pairs 2-6 and 4-26 (spec correction): global 58 + 1 <-> 58 + 5, 58 + 3 <-> 58 + 25.
  assert perm[59] == 63 and perm[61] == 83
  # Category 7 (shorts, start 158): 1-3 swap, 2 is the centre.
  assert perm[158] == 160 and perm[159] == 159


def test_flip_pairs_have_equal_sigmas_except_the_known_one():
  unequal = np.nonzero(df2.OKS_SIGMAS != df2.OKS_SIGMAS[df2.FLIP_PERM])[0]
  local = [(int(df2.LANDMARK_CATEGORY[i]), int(i - df2.LANDMARK_START[df2.LANDMARK_CATEGORY[i]]) + 1)
           for i in unequal]
  assert local == [(11, 15), (11, 29)]


def test_category_landmark_mask():
  m = df2.CATEGORY_LANDMARK_MASK
  assert m.shape == (14, 294) and not m[0].any()
  np.testing.assert_array_equal(m.sum(1)[1:], [df2.LANDMARK_COUNTS[c] for c in range(1, 14)])
  assert (m.sum(0) == 1).all()


def test_coco_categories():
  cats = df2.coco_categories()
  assert [c["id"] for c in cats] == list(range(1, 14))
  assert cats[0]["keypoints"][0] == "1" and cats[0]["keypoints"][-1] == "294"
  assert all(c["supercategory"] == "clothes" and c["skeleton"] == [] for c in cats)
