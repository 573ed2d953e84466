"""The TFDS builder: prepared from a raw root, read back as a pipeline source."""

import json
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_pipeline import pairs, pipeline, sources, tfds_deepfashion2, transforms


def _raw_root(tmp_path, real_fixture):
  """train/ and validation/ with the issue-4 shop image and a user copy of it (pair 1811)."""
  example = json.loads((real_fixture / "annos_example_issue4.json").read_text())
  rng = np.random.default_rng(0)
  for split in ("train", "validation"):
    (tmp_path / split / "image").mkdir(parents=True)
    (tmp_path / split / "annos").mkdir()
    for stem, source in ((1, "shop"), (2, "user")):
      anno = dict(example, source=source)
      (tmp_path / split / "annos" / f"{stem:06d}.json").write_text(json.dumps(anno))
      pixels = rng.integers(0, 255, (500, 600, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(tmp_path / split / "image" / f"{stem:06d}.jpg", quality=95)
  # A corrupt file in validation: skipped by the builder, as by the raw reader.
  (tmp_path / "validation" / "image" / "000003.jpg").write_bytes(b"\xff\xd8 not a jpeg")
  shutil.copy(tmp_path / "validation" / "annos" / "000001.json",
              tmp_path / "validation" / "annos" / "000003.json")
  return tmp_path


def test_tfds_builder_round_trip(tmp_path, real_fixture):
  root = _raw_root(tmp_path / "raw", real_fixture)
  # format=tfds on a folder nobody prepared says what to run.
  with pytest.raises(FileNotFoundError, match="python -m data_pipeline.tfds_deepfashion2 "
                                              "--manual_dir"):
    tfds_deepfashion2.tfds_source(str(tmp_path / "tfds"), "train")
  # The module docstring's command, exactly as documented.
  proc = subprocess.run([sys.executable, "-m", "data_pipeline.tfds_deepfashion2", "--manual_dir",
                         str(root), "--data_dir", str(tmp_path / "tfds")],
                        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Prepared" in proc.stderr
  builder = tfds_deepfashion2.Deepfashion2(data_dir=str(tmp_path / "tfds"))
  assert builder.is_prepared()
  assert builder.info.splits["train"].num_examples == 2
  assert builder.info.splits["validation"].num_examples == 2  # the corrupt image is skipped
  raw = sources.raw_source(str(root / "train"))
  tf_source = tfds_deepfashion2.tfds_source(str(tmp_path / "tfds"), "train")
  assert [r.image_id for r in tf_source.records] == [1, 2]
  for a, b in zip(raw.records, tf_source.records):
    assert (a.image_id, a.source, a.pair_id, a.width, a.height) == (
        b.image_id, b.source, b.pair_id, b.width, b.height)
    assert len(a.items) == len(b.items) == 2
    for ia, ib in zip(a.items, b.items):
      assert ia.category_id == ib.category_id and ia.style == ib.style
      np.testing.assert_array_equal(ia.box, ib.box)
      np.testing.assert_array_equal(ia.landmarks, ib.landmarks)
  np.testing.assert_array_equal(raw.load_image(1), tf_source.load_image(1))
  # The pipeline reads the TFDS source like any other: one image pair (user 2, shop 1).
  geometry = transforms.ImageGeometry((128, 128), 96, 128, 3, 8)
  index = pairs.build_pair_index(tf_source.records)
  np.testing.assert_array_equal(index.pairs, [[1, 0]])
  kwargs = dict(global_batch_pairs=2, seed=0, process_index=0, process_count=1)
  a = next(pipeline.train_dataset(raw, pairs.build_pair_index(raw.records), geometry,
                                  **kwargs).as_numpy_iterator())
  b = next(pipeline.train_dataset(tf_source, index, geometry, **kwargs).as_numpy_iterator())
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(b["image_id"][0], [2, 1])
