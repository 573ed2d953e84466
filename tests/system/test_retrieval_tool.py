"""The retrieval tool (df2_jax.retrieval): exact gallery scoring, an index of a folder of shop
images, queries by photo, appending, unreadable images."""

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from configs import tiny
from data_pipeline import synthetic
from df2_jax import files, retrieval
from df2_jax.models import matching


def _brute_force(kernel, bias, queries, gallery, k):
  logits = np.asarray(matching.pairwise_logits_reference(kernel, bias, queries, gallery))
  order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(logits, order, axis=1), order


def test_gallery_scorer_is_exact_and_does_not_depend_on_chunks():
  rng = np.random.default_rng(0)
  gallery = rng.normal(size=(300, 8)).astype(np.float32) + 3.0  # a common offset, as trained
  gallery[69] = gallery[5]  # the same row in two chunks of 64: a tie, the lower index first
  kernel = -rng.uniform(0.1, 1.0, 8).astype(np.float32)
  bias = np.float32(2.5)
  queries = np.concatenate([gallery[5:6], rng.normal(size=(2, 8)).astype(np.float32) + 3.0])
  want_v, want_i = _brute_force(kernel, bias, queries, gallery, 20)
  for chunk in (64, 1000):  # 5 chunks with 20 rows of padding; one chunk
    scorer = retrieval.GalleryScorer({"kernel": kernel, "bias": bias}, gallery, chunk=chunk)
    values, rows = scorer.top_k(queries, 20)
    np.testing.assert_array_equal(rows, want_i)
    np.testing.assert_allclose(values, want_v, rtol=1e-5, atol=1e-5)
  assert list(rows[0, :2]) == [5, 69]
  # More asked than the gallery holds: all of it, ranked.
  small = retrieval.GalleryScorer({"kernel": kernel, "bias": bias}, gallery[:7], chunk=4)
  values, rows = small.top_k(queries[1:], 20)
  assert rows.shape == (2, 7) and sorted(rows[0]) == list(range(7))
  np.testing.assert_array_equal(rows, _brute_force(kernel, bias, queries[1:], gallery[:7], 7)[1])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
  """A checkpoint of the tiny model (untrained, its similarity weights made negative so that
  an identical embedding scores highest) and synthetic image pairs at 128 px."""
  root = tmp_path_factory.mktemp("retrieval")
  synthetic.generate(root / "data", train_pairs=1, val_pairs=3, image_size=128, seed=0)
  from conftest import save_matching_checkpoint  # pylint: disable=g-import-not-at-top
  save_matching_checkpoint(tiny.get_config(), root / "run" / "checkpoints", 7, with_config=False)
  images = root / "data" / "validation" / "image"
  # Image 2p - 1 is pair p's shop image, 2p its user image.
  shop = root / "shop"
  shop.mkdir()
  for n in (1, 3):
    shutil.copy(images / f"{n:06d}.jpg", shop)
  (shop / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  return dict(root=root, images=images, shop=shop)


def _index(world, folder, *extra):
  args = ["index", "--config", tiny.__file__, "--workdir", str(world["root"] / "run"),
          "--images", str(folder), "--out", str(world["root"] / "index"), "--min_score", "0",
          *extra]
  return retrieval.main(args)


def _hashes(directory):
  return {n: hashlib.sha256((directory / n).read_bytes()).hexdigest()
          for n in sorted(os.listdir(directory))}


def test_index_query_append(world, caplog, capsys):
  root, index_dir = world["root"], world["root"] / "index"
  with caplog.at_level(logging.WARNING):
    assert _index(world, world["shop"]) == 0
  assert any("broken.jpg" in r.getMessage() and "Skipping" in r.getMessage()
             for r in caplog.records)
  manifest = json.loads((index_dir / "manifest.json").read_text())
  assert manifest["format"] == retrieval.FORMAT and manifest["step"] == 7
  assert manifest["images"] == 2 and manifest["parts"][0]["skipped"] == 1
  assert manifest["embed_dim"] == 16 and len(manifest["scorer"]["kernel"]) == 16
  assert manifest["config"]["model"]["embed_dim"] == 16
  first = retrieval.GalleryIndex(str(index_dir))
  n_first = len(first)
  assert n_first == manifest["items"] > 0
  part0 = json.loads((index_dir / "part-00000" / "images.json").read_text())
  assert [os.path.basename(i["path"]) for i in part0["images"]] == ["000001.jpg", "000003.jpg"]
  assert part0["skipped"][0]["path"].endswith("broken.jpg")
  assert first.array("boxes").shape == (n_first, 4)
  assert set(np.asarray(first.array("image"))) == {0, 1}

  # A shop image queried against the index: each of its garments finds itself first.
  out_json = root / "self.json"
  assert retrieval.main(["query", "--index", str(index_dir), "--image",
                         str(world["shop"] / "000001.jpg"), "--top", "3",
                         "--json", str(out_json)]) == 0
  answer = json.loads(out_json.read_text())
  assert answer["gallery_items"] == n_first and len(answer["queries"]) == 1
  garments = answer["queries"][0]["garments"]
  assert garments
  for g in garments:
    best = g["results"][0]
    assert best["image"].endswith("000001.jpg") and best["rank"] == 1
    np.testing.assert_allclose(best["box"], g["box"], atol=0.01)
    assert set(best) == {"rank", "index", "image", "box", "category_id", "category",
                         "detection_score", "match_score", "logit"}
    assert 0.0 < best["match_score"] <= 1.0
    assert [r["logit"] for r in g["results"]] == sorted((r["logit"] for r in g["results"]),
                                                        reverse=True)
  assert "000001.jpg" in capsys.readouterr().out

  # A user image whose partner (pair 1's shop image, 000001) is in the folder: the partner's
  # garments are ranked; the strip is drawn, one row per garment.
  strip = root / "strips" / "user.png"
  out_json = root / "user.json"
  assert retrieval.main(["query", "--index", str(index_dir), "--image",
                         str(world["images"] / "000002.jpg"), "--top", str(n_first),
                         "--out", str(strip), "--json", str(out_json)]) == 0
  garments = json.loads(out_json.read_text())["queries"][0]["garments"]
  assert garments and all(len(g["results"]) == n_first for g in garments)
  assert any(r["image"].endswith("000001.jpg") for g in garments for r in g["results"])
  picture = cv2.imread(str(strip))
  assert picture is not None and picture.shape[0] >= len(garments) * 112

  # Appending: a new image in the folder is added, the indexed ones (the same paths) and the
  # unreadable one are not indexed again, earlier files are unchanged.
  before = _hashes(index_dir / "part-00000")
  shutil.copy(world["images"] / "000005.jpg", world["shop"])
  assert _index(world, world["shop"]) == 0
  assert _hashes(index_dir / "part-00000") == before
  manifest = json.loads((index_dir / "manifest.json").read_text())
  assert [p["name"] for p in manifest["parts"]] == ["part-00000", "part-00001"]
  assert manifest["images"] == 3 and manifest["parts"][1]["images"] == 1
  both = retrieval.GalleryIndex(str(index_dir))
  np.testing.assert_array_equal(both.array("embeddings")[:n_first], first.array("embeddings"))
  assert both.item(n_first)["image"].endswith("000005.jpg")
  assert len(both) == manifest["items"] > n_first

  # Another model config cannot append (its embeddings are not comparable): the checkpoint
  # does not fit it, refused in one line before anything is read (a config error, status 2).
  assert _index(world, world["shop"], "--config.model.embed_dim=8") == 2
  assert _hashes(index_dir / "part-00000") == before


def test_query_errors_name_the_problem(world, tmp_path, caplog):
  with caplog.at_level(logging.ERROR):
    assert retrieval.main(["query", "--index", str(tmp_path), "--image", "x.jpg"]) == 1
  assert any("no retrieval index here" in r.getMessage() for r in caplog.records)
  (tmp_path / "manifest.json").write_text(json.dumps({"format": "something else"}))
  caplog.clear()
  with caplog.at_level(logging.ERROR):
    assert retrieval.main(["query", "--index", str(tmp_path), "--image", "x.jpg"]) == 1
  assert any("field 'format'" in r.getMessage() for r in caplog.records)


def test_source_keeps_the_images_their_annotations_name(world):
  shop = retrieval.image_files(str(world["images"]), "shop")
  assert [os.path.basename(p) for p in shop] == ["000001.jpg", "000003.jpg", "000005.jpg"]
  user = retrieval.image_files(str(world["images"]), "user")
  assert [os.path.basename(p) for p in user] == ["000002.jpg", "000004.jpg", "000006.jpg"]
  with pytest.raises(FileNotFoundError, match="annos/000001.json"):
    retrieval.image_files(str(world["shop"]), "shop")  # a copied folder: no annotations


# ---------------------------------------------------------------------------------------------
# Safety: one index run per folder, files written whole, errors in one line, pictures of any
# shape, the JSON answers written before the pictures.

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
  from conftest import subprocess_env  # pylint: disable=g-import-not-at-top
  return subprocess_env()


def _tool(*args: str) -> subprocess.CompletedProcess:
  """``python -m df2_jax.retrieval ARGS`` as a user runs it."""
  return subprocess.run([sys.executable, "-m", "df2_jax.retrieval", *args], cwd=ROOT,
                        env=_env(), capture_output=True, text=True, timeout=300)


def _tree_hashes(directory: Path) -> dict:
  return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_index(world):
  """An index of the shop folder's two readable images, built in its own folder."""
  out = world["root"] / "small_index"
  assert retrieval.main(["index", "--config", tiny.__file__, "--workdir",
                         str(world["root"] / "run"), "--images", str(world["shop"]), "--out",
                         str(out), "--min_score", "0"]) == 0
  return out


def test_a_second_index_into_the_same_folder_exits_naming_the_first(world, small_index,
                                                                     tmp_path):
  more = tmp_path / "more"
  more.mkdir()
  shutil.copy(world["images"] / "000005.jpg", more)
  manifest = json.loads((small_index / "manifest.json").read_text())
  before = _tree_hashes(small_index)
  assert ".lock" in before and not [p for p in before if ".partial." in p or ".tmp" in p]
  with files.FolderLock(small_index, "retrieval index"):
    proc = _tool("index", "--config", tiny.__file__, "--workdir", str(world["root"] / "run"),
                 "--images", str(more), "--out", str(small_index), "--min_score", "0")
  assert proc.returncode == 1, proc.stderr
  errors = [l for l in proc.stderr.splitlines() if l.startswith("ERROR")]
  assert "Traceback" not in proc.stderr and len(errors) == 1, proc.stderr
  assert f"{small_index} is in use by another retrieval index (pid {os.getpid()}" in errors[0]
  assert _tree_hashes(small_index) == before
  assert retrieval.GalleryIndex(str(small_index)).manifest == manifest


def test_index_writes_every_file_atomically(world, small_index, tmp_path, monkeypatch):
  """The part's arrays, its images.json and the manifest go through files' atomic writers; a
  run that dies before its manifest leaves the index as it was and its part out of it."""
  written = []
  real_save, real_json = files.save_npy, files.write_json
  monkeypatch.setattr(files, "save_npy", lambda p, a: (written.append(os.path.basename(p)),
                                                       real_save(p, a)))

  def dying_json(path, obj, **kw):
    written.append(os.path.basename(path))
    if os.path.basename(path) == retrieval.MANIFEST:
      raise KeyboardInterrupt("simulated kill before the manifest")
    return real_json(path, obj, **kw)

  monkeypatch.setattr(files, "write_json", dying_json)
  index_dir = tmp_path / "index"
  shutil.copytree(small_index, index_dir)
  manifest = (index_dir / "manifest.json").read_text()
  more = tmp_path / "more"
  more.mkdir()
  shutil.copy(world["images"] / "000005.jpg", more)
  args = ["index", "--images", str(more), "--out", str(index_dir)]
  with pytest.raises(KeyboardInterrupt):
    retrieval.main(args)
  assert sorted(written) == sorted([f"{k}.npy" for k in retrieval.ARRAYS] +
                                   ["images.json", "manifest.json"])
  assert (index_dir / "manifest.json").read_text() == manifest
  assert len(retrieval.GalleryIndex(str(index_dir)).parts) == 1
  monkeypatch.undo()
  # The next run replaces the part that no manifest names, and appends.
  assert retrieval.main(args) == 0
  again = retrieval.GalleryIndex(str(index_dir))
  assert again.parts == ["part-00000", "part-00001"]
  assert again.part_images(1)[0]["path"].endswith("000005.jpg")
  assert not [n for n in os.listdir(index_dir) if n.startswith(".part")]
  assert oct((index_dir / "part-00001").stat().st_mode & 0o777) == oct(
      (index_dir / "part-00000").stat().st_mode & 0o777)


def test_index_of_a_file_is_one_error_line(world, tmp_path):
  image = world["shop"] / "000001.jpg"
  proc = _tool("index", "--config", tiny.__file__, "--workdir", str(world["root"] / "run"),
               "--images", str(image), "--out", str(tmp_path / "index"))
  assert proc.returncode == 1
  assert "Traceback" not in proc.stderr
  assert [l for l in proc.stderr.splitlines() if l.startswith("ERROR")] == [
      f"ERROR --images {image} is a file, not a folder of images"]
  assert not (tmp_path / "index").exists()


def test_query_pictures_of_extreme_aspect_ratios(small_index, tmp_path):
  """A 4000x1 and a 1x4000 photo: the answers in the JSON, a valid picture for each, of a
  sane size."""
  photos = tmp_path / "photos"
  photos.mkdir()
  rng = np.random.default_rng(0)
  cv2.imwrite(str(photos / "wide.png"), rng.integers(0, 255, (1, 4000, 3), np.uint8))
  cv2.imwrite(str(photos / "tall.png"), rng.integers(0, 255, (4000, 1, 3), np.uint8))
  proc = _tool("query", "--index", str(small_index), "--image", str(photos), "--top", "3",
               "--out", str(tmp_path / "strips"), "--json", str(tmp_path / "answers.json"))
  assert proc.returncode == 0, proc.stderr
  assert "Traceback" not in proc.stderr
  answers = json.loads((tmp_path / "answers.json").read_text())
  assert [os.path.basename(q["image"]) for q in answers["queries"]] == ["tall.png", "wide.png"]
  assert [(q["width"], q["height"]) for q in answers["queries"]] == [(1, 4000), (4000, 1)]
  for q in answers["queries"]:
    assert q["garments"]  # crops of a 1-pixel row or column were drawn
    picture = cv2.imread(str(tmp_path / "strips" / (os.path.basename(q["image"])[:-4] +
                                                     ".png")))
    assert picture is not None
    rows = max(1, len(q["garments"]))
    assert picture.shape[0] <= rows * (112 + 20 + 4) + 24
    assert picture.shape[1] <= 9 * (4 * 112 + 12)  # tiles at most 4:1
  assert sorted(os.listdir(tmp_path / "strips")) == ["tall.png", "wide.png"]


def test_query_writes_the_json_when_a_picture_cannot_be_drawn(small_index, world, tmp_path,
                                                              monkeypatch, caplog):
  def broken(*args, **kwargs):
    raise ValueError("the drawing broke\non two lines")

  monkeypatch.setattr(retrieval, "draw_result", broken)
  out_json = tmp_path / "answers.json"
  with caplog.at_level(logging.WARNING):
    assert retrieval.main(["query", "--index", str(small_index), "--image",
                           str(world["shop"] / "000001.jpg"), "--top", "2", "--out",
                           str(tmp_path / "strip.png"), "--json", str(out_json)]) == 1
  answers = json.loads(out_json.read_text())
  assert len(answers["queries"]) == 1 and answers["queries"][0]["garments"]
  assert not (tmp_path / "strip.png").exists()
  warnings = [r.getMessage() for r in caplog.records if "Cannot draw the picture" in
              r.getMessage()]
  assert len(warnings) == 1 and "the drawing broke on two lines" in warnings[0]
  assert sorted(os.listdir(tmp_path)) == ["answers.json"]  # no temporary file left


def test_fitted_thumbnail_takes_any_shape():
  rng = np.random.default_rng(0)
  for shape, box in [((1, 4000, 3), (0, 0, 4000, 1)), ((4000, 1, 3), (0, 0, 1, 4000)),
                     ((50, 60, 3), (10, 10, 30, 40)), ((50, 60, 3), (70, 80, 90, 95)),
                     ((50, 60, 3), (np.nan, 1, np.inf, -np.inf)), ((1, 1, 3), (0, 0, 0, 0))]:
    pixels = rng.integers(0, 255, shape, np.uint8)
    thumb = retrieval.fitted_thumbnail(pixels, box, 112)
    assert thumb.dtype == np.uint8 and thumb.shape[0] == 112 and thumb.shape[2] == 3
    assert 8 <= thumb.shape[1] <= 4 * 112, (shape, box, thumb.shape)
  # An ordinary crop keeps its aspect.
  thumb = retrieval.fitted_thumbnail(np.zeros((100, 100, 3), np.uint8), (0, 0, 50, 100), 112)
  assert thumb.shape == (112, 56, 3)
