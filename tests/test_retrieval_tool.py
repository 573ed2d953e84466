"""The retrieval tool (df2_jax.retrieval): exact gallery scoring, an index of a folder of shop
images, queries by photo, appending, unreadable images."""

import hashlib
import json
import logging
import os
import shutil

import cv2
import jax
import numpy as np
import optax
import pytest

from configs import tiny
from data_pipeline import memory, synthetic
from data_pipeline.sources import geometry_from_config
from df2_jax import checkpoint, retrieval
from df2_jax import train_step as ts
from df2_jax.models import matching
from df2_jax.models.match_rcnn import init_variables, model_from_config


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
  config = tiny.get_config()
  model = model_from_config(config)
  batch = memory.synthetic_pair_batch(2, geometry_from_config(config.data), image_size=128)
  variables = jax.device_get(init_variables(model, jax.random.key(0), batch))
  scorer = variables["params"]["scorer"]
  scorer["kernel"] = -np.abs(np.asarray(scorer["kernel"])) - 0.05
  state = ts.create_train_state(variables, optax.sgd(0.1))
  with checkpoint.CheckpointManager(root / "run" / "checkpoints") as mgr:
    mgr.save(7, state, force=True)
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

  # Another checkpoint cannot append: its embeddings are not comparable.
  assert _index(world, world["shop"], "--config.model.embed_dim=8") == 1


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
