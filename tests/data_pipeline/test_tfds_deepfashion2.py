"""The TFDS builder: prepared from a raw root, read back as a pipeline source."""

import json
import logging
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
import tensorflow_datasets as tfds

from data_pipeline import deepfashion2 as df2
from data_pipeline import pairs, pipeline, sources, tfds_deepfashion2, transforms
from data_pipeline.spec import DEEPFASHION2


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
                        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True,
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
  geometry = transforms.ImageGeometry((128, 128), 96, 128, 3, 8, spec=DEEPFASHION2)
  index = pairs.build_pair_index(tf_source.records)
  np.testing.assert_array_equal(index.pairs, [[1, 0]])
  kwargs = dict(global_batch_pairs=2, seed=0, process_index=0, process_count=1)
  a = next(pipeline.train_dataset(raw, pairs.build_pair_index(raw.records), geometry,
                                  **kwargs).as_numpy_iterator())
  b = next(pipeline.train_dataset(tf_source, index, geometry, **kwargs).as_numpy_iterator())
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(b["image_id"][0], [2, 1])


# --------------------------------------------------------------------------------------------
# Folders without records, and which builds are reused.

_REPO = Path(__file__).resolve().parents[2]


def _prepare_command(manual_dir, data_dir) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "data_pipeline.tfds_deepfashion2", "--manual_dir",
                         str(manual_dir), "--data_dir", str(data_dir)], cwd=_REPO,
                        capture_output=True, text=True, timeout=600, check=False)


def _error_lines(proc) -> list[str]:
  return [line for line in proc.stderr.splitlines() if line.startswith("E")]


def _fixture_release(real_fixture, root: Path, drop: int = 0) -> Path:
  """The 16 real fixture images as a release folder (train/{image,annos}): coco.json written
  back as raw annotations; ``drop`` leaves out that many images (a changed folder)."""
  coco = json.loads((real_fixture / "coco.json").read_text())
  split = root / "train"
  (split / "annos").mkdir(parents=True)
  (split / "image").mkdir()
  for image in sorted(coco["images"], key=lambda i: i["id"])[drop:]:
    anns = sorted((a for a in coco["annotations"] if a["image_id"] == image["id"]),
                  key=lambda a: a["id"])
    raw = {"source": "user", "pair_id": anns[0]["pair_id"]}
    for k, ann in enumerate(anns, 1):
      cat = ann["category_id"]
      x, y, w, h = ann["bbox"]
      start = 3 * df2.LANDMARK_START[cat]
      raw[f"item{k}"] = {"category_id": cat, "style": ann["style"],
                         "bounding_box": [x, y, x + w, y + h],
                         "landmarks": ann["keypoints"][start:start + 3 * df2.LANDMARK_COUNTS[cat]],
                         "segmentation": ann["segmentation"]}
    stem = Path(image["file_name"]).stem
    (split / "annos" / f"{stem}.json").write_text(json.dumps(raw))
    shutil.copy(real_fixture / "image" / image["file_name"], split / "image")
  return root


def test_prepare_fails_without_records_then_builds_the_right_folder(tmp_path, real_fixture):
  data_dir = tmp_path / "tfds"
  builder = tfds_deepfashion2.Deepfashion2(data_dir=str(data_dir))

  # A split's own folder given as the root (image/ and annos/, no train/): no split at all.
  split_only = tmp_path / "split_only"
  (split_only / "image").mkdir(parents=True)
  shutil.copy(real_fixture / "image" / "002092.jpg", split_only / "image")
  proc = _prepare_command(split_only, data_dir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert _error_lines(proc) and len(_error_lines(proc)) == 1, proc.stderr[-3000:]
  assert f"{split_only}: no train/ or validation/ folder, 0 records" in _error_lines(proc)[0]
  assert "Traceback" not in proc.stderr and "Prepared" not in proc.stderr
  assert not builder.is_prepared()

  # train/ without annos/.
  no_annos = tmp_path / "no_annos"
  shutil.copytree(split_only, no_annos / "train")
  proc = _prepare_command(no_annos, data_dir)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert len(_error_lines(proc)) == 1, proc.stderr[-3000:]
  assert f"{no_annos / 'train'}: no annos/ folder, 0 records" in _error_lines(proc)[0]
  assert not builder.is_prepared()

  # annos/ there but empty: the scan finds 0 records (in process: the same code path).
  (no_annos / "train" / "annos").mkdir()
  with pytest.raises(tfds_deepfashion2.PrepareError,
                     match=r"no_annos/train: 0 records: annos/ holds no \.json file"):
    tfds_deepfashion2.prepare(str(no_annos), str(data_dir))
  assert not builder.is_prepared()

  # The rerun with the right folder builds the real records.
  release = _fixture_release(real_fixture, tmp_path / "release")
  proc = _prepare_command(release, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Prepared" in proc.stderr and not _error_lines(proc)
  built = tfds_deepfashion2.Deepfashion2(data_dir=str(data_dir))
  assert built.info.splits["train"].num_examples == 16
  assert "validation" not in built.info.splits
  marker, why = tfds_deepfashion2.read_marker(built)
  assert why == ""
  assert marker["source"] == os.path.realpath(release)
  assert marker["splits"]["train"]["records"] == 16
  assert marker["splits"]["train"]["files"] == {"annos": 16, "image": 16}
  source = tfds_deepfashion2.tfds_source(str(data_dir), "train")
  assert sorted(r.image_id for r in source.records) == sorted(
      i["id"] for i in json.loads((real_fixture / "coco.json").read_text())["images"])
  assert sum(len(r.items) for r in source.records) == 29

  # Run again: reused, not rebuilt.
  proc = _prepare_command(release, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Reusing" in proc.stderr and "Rebuilding" not in proc.stderr


class _EmptyBuild(tfds_deepfashion2.Deepfashion2, skip_registration=True):
  """What the builder wrote before the fix for a folder without train/ or validation/: a
  prepared dataset with no split and no marker."""
  name = "deepfashion2"
  # TFDS finds a builder's metadata through its class's package: this test module is none.
  pkg_dir_path = tfds_deepfashion2.Deepfashion2._get_pkg_dir_path()  # pylint: disable=protected-access

  def _split_generators(self, dl_manager):
    return {}

  def _download_and_prepare(self, dl_manager, download_config):
    tfds.core.GeneratorBasedBuilder._download_and_prepare(self, dl_manager, download_config)


def test_prepare_never_reuses_an_empty_partial_or_foreign_build(tmp_path, real_fixture, caplog):
  caplog.set_level(logging.INFO)
  data_dir = str(tmp_path / "tfds")
  release = _fixture_release(real_fixture, tmp_path / "release")
  empty = _EmptyBuild(data_dir=data_dir)
  empty.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path)),
      file_format="array_record")
  assert empty.is_prepared() and not empty.info.splits
  # Reading it says what to run; preparing rebuilds it from the right folder.
  with pytest.raises(FileNotFoundError, match="not a complete build .*no deepfashion2_build.json"
                                              ".*python -m data_pipeline.tfds_deepfashion2"):
    tfds_deepfashion2.tfds_source(data_dir, "train")
  builder = tfds_deepfashion2.prepare(str(release), data_dir)
  assert builder.info.splits["train"].num_examples == 16
  assert any("Rebuilding" in r.getMessage() and "no deepfashion2_build.json" in r.getMessage()
             for r in caplog.records)
  assert len(tfds_deepfashion2.tfds_source(data_dir, "train")) == 16

  # An interrupted build (data without the marker, written last) is rebuilt too.
  marker = Path(builder.data_path) / tfds_deepfashion2.MARKER
  marker.unlink()
  caplog.clear()
  assert tfds_deepfashion2.prepare(str(release), data_dir).info.splits["train"].num_examples == 16
  assert any("Rebuilding" in r.getMessage() for r in caplog.records)
  assert marker.exists()

  # A marker that disagrees with the data (record counts) is an incomplete build.
  data = json.loads(marker.read_text())
  data["splits"]["train"]["records"] = 17
  marker.write_text(json.dumps(data))
  _, why = tfds_deepfashion2.read_marker(tfds_deepfashion2.Deepfashion2(data_dir=data_dir))
  assert "is incomplete" in why
  caplog.clear()
  tfds_deepfashion2.prepare(str(release), data_dir)
  assert any("Rebuilding" in r.getMessage() and "incomplete" in r.getMessage()
             for r in caplog.records)

  # The same folder, changed since the build: rebuilt with the folder's records.
  shutil.rmtree(release)
  _fixture_release(real_fixture, release, drop=1)
  caplog.clear()
  builder = tfds_deepfashion2.prepare(str(release), data_dir)
  assert builder.info.splits["train"].num_examples == 15
  assert any("changed since the build" in r.getMessage() for r in caplog.records)

  # A complete build of another folder is refused, and left as it was.
  other = _fixture_release(real_fixture, tmp_path / "other")
  with pytest.raises(tfds_deepfashion2.PrepareError,
                     match=f"was built from {release}, not {other}: delete it"):
    tfds_deepfashion2.prepare(str(other), data_dir)
  assert len(tfds_deepfashion2.tfds_source(data_dir, "train")) == 15
