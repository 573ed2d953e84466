"""One bad field drops only its part (issue 26): a landmark, a polygon, an item or, for
image-level problems, the image; the counts travel with the split to the evaluation, which
refuses a split that lost images, items, polygons or landmarks unless
``config.eval.allow_skipped``.

The faults are injected into copies of the real fixtures (16 images, 29 items), the same ones
into the raw layout and into the COCO file, so both readers must agree number for number:
  image 2092, item 1 (ann 3446, trousers): labelled landmark 1 moved 5 px right of the image
  image 176771, item 2 (ann 287061, 6 polygons): polygon 4 cut to 2 points
  image 60097, item 2 (ann 97977, shorts): a box of zero width
  image 45585 (2 items): its file overwritten with bytes that are no JPEG
"""

import copy
import json
import logging
import os
from pathlib import Path
import shutil
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import fixtures_dir
from data_pipeline import annotations, convert, records, sources, transforms
from data_pipeline import deepfashion2 as df2
from data_pipeline.records import DropCounts
from data_pipeline.spec import DEEPFASHION2

LANDMARK_IMAGE, LANDMARK_ANN = 2092, 3446
POLYGON_IMAGE, POLYGON_ANN, BAD_POLYGON = 176771, 287061, 3
BOX_IMAGE, BOX_ANN = 60097, 97977
CORRUPT_IMAGE = 45585
ONE_OF_EACH = DropCounts(images=1, items=1, polygons=1, landmarks=1)
KEPT_IDS = [2092, 57421, 60097, 66216, 79952, 102538, 107133, 114084, 126586, 137450, 151674,
            171642, 176771, 177881, 187453]


def _faulty_coco(clean: dict) -> dict:
  data = copy.deepcopy(clean)
  anns = {a["id"]: a for a in data["annotations"]}
  start = 3 * df2.LANDMARK_START[anns[LANDMARK_ANN]["category_id"]]
  keypoints = anns[LANDMARK_ANN]["keypoints"]
  assert keypoints[start:start + 3] == [102, 426, 1]
  keypoints[start:start + 3] = [468 + 5, 426, 2]  # 002092.jpg is 468 wide
  segmentation = anns[POLYGON_ANN]["segmentation"]
  assert len(segmentation) == 6
  segmentation[BAD_POLYGON] = segmentation[BAD_POLYGON][:4]
  anns[BOX_ANN]["bbox"][2] = 0
  return data


def _raw_annotation(anns: list[dict]) -> dict:
  """The raw per-image annotation of COCO annotations (the converter's inverse)."""
  raw = {"source": "user", "pair_id": anns[0]["pair_id"]}
  for k, ann in enumerate(anns, 1):
    cat = ann["category_id"]
    x, y, w, h = ann["bbox"]
    start = 3 * df2.LANDMARK_START[cat]
    raw[f"item{k}"] = {"category_id": cat, "style": ann["style"],
                       "bounding_box": [x, y, x + w, y + h],
                       "landmarks": ann["keypoints"][start:start + 3 * df2.LANDMARK_COUNTS[cat]],
                       "segmentation": ann["segmentation"]}
  return raw


@pytest.fixture(scope="module")
def split(tmp_path_factory):
  """The faulty split as a raw folder (``root``) and as a COCO file (``coco``) over the same
  images; ``clean``: the records of the untouched fixture."""
  fixture = fixtures_dir()
  if not (fixture / "coco.json").exists():
    pytest.fail(f"Real DeepFashion2 fixtures not found at {fixture}; set DF2_FIXTURES.")
  base = tmp_path_factory.mktemp("field_drops")
  clean = json.loads((fixture / "coco.json").read_text())
  data = _faulty_coco(clean)
  root = base / "validation"
  (root / "annos").mkdir(parents=True)
  (root / "image").mkdir()
  for image in data["images"]:
    anns = sorted((a for a in data["annotations"] if a["image_id"] == image["id"]),
                  key=lambda a: a["id"])
    stem = Path(image["file_name"]).stem
    (root / "annos" / f"{stem}.json").write_text(json.dumps(_raw_annotation(anns)))
    shutil.copy(fixture / "image" / image["file_name"], root / "image")
  (root / "image" / f"{CORRUPT_IMAGE:06d}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
  coco = base / "coco.json"
  coco.write_text(json.dumps(data))
  clean_scan = annotations.read_coco(fixture / "coco.json", fixture / "image", num_workers=1,
                                     check_image="header", strict=True, spec=DEEPFASHION2)
  return SimpleNamespace(root=root, coco=coco, images=root / "image",
                         clean={r.image_id: r for r in clean_scan.records})


def _by_id(scan) -> dict[int, records.ImageRecord]:
  return {r.image_id: r for r in scan.records}


def _assert_rest_survives(got: dict[int, records.ImageRecord], clean) -> None:
  """Everything but the four faults is as in the clean fixture."""
  assert sorted(got) == KEPT_IDS
  assert sum(len(r.items) for r in got.values()) == 29 - 2 - 1  # the corrupt image's 2, 1 item
  # The landmark's item keeps its box and its other landmarks; the bad one is unlabelled.
  item, want = got[LANDMARK_IMAGE].items[0], clean[LANDMARK_IMAGE].items[0]
  np.testing.assert_array_equal(item.box, want.box)
  np.testing.assert_array_equal(item.landmarks[0], [0, 0, 0])
  np.testing.assert_array_equal(item.landmarks[1:], want.landmarks[1:])
  assert int((item.landmarks[:, 2] > 0).sum()) == 2  # of 3 labelled
  assert len(item.polygons) == 3
  # The polygon's item keeps its other 5 polygons.
  item, want = got[POLYGON_IMAGE].items[1], clean[POLYGON_IMAGE].items[1]
  assert len(item.polygons) == 5
  kept = [p for i, p in enumerate(want.polygons) if i != BAD_POLYGON]
  for a, b in zip(item.polygons, kept, strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(item.landmarks, want.landmarks)
  # The box's image keeps its other item.
  kept_item, = got[BOX_IMAGE].items
  np.testing.assert_array_equal(kept_item.box, clean[BOX_IMAGE].items[0].box)
  assert kept_item.category_id == clean[BOX_IMAGE].items[0].category_id == 4
  # Every other image and item as it was.
  for image_id, record in got.items():
    if image_id in (LANDMARK_IMAGE, POLYGON_IMAGE, BOX_IMAGE):
      continue
    assert len(record.items) == len(clean[image_id].items)
    for a, b in zip(record.items, clean[image_id].items):
      np.testing.assert_array_equal(a.landmarks, b.landmarks)
      assert len(a.polygons) == len(b.polygons)


def test_raw_scan_drops_only_the_bad_parts_and_logs_each(split, caplog):
  caplog.set_level(logging.INFO)
  scan = annotations.scan_raw_root(split.root, num_workers=1)
  assert scan.counts == ONE_OF_EACH
  _assert_rest_survives(_by_id(scan), split.clean)
  assert [(d.kind, Path(d.path).name, d.field) for d in scan.drops] == [
      ("landmark", "002092.json", "item1.landmarks"),
      ("image", "045585.jpg", "image"),
      ("item", "060097.json", "item2.bounding_box"),
      ("polygon", "176771.json", "item2.segmentation[3]"),
  ]
  landmark, image, item, polygon = scan.drops
  assert landmark.message == "landmark 1 at (473, 426) outside the 468x702 image (tolerance 1 px)"
  assert item.message == "degenerate box (x1, y1, x2, y2) = (136.0, 355.0, 136.0, 494.0)"
  assert polygon.message == "a polygon needs at least 3 points, got 2"
  assert scan.skipped == [(image.path, str(image))]

  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [
      f"Dropping a landmark (made unlabelled): {landmark}",
      f"Dropping the image: {image}",
      f"Dropping an item: {item}",
      f"Dropping a polygon: {polygon}",
      f"{split.root}: 15 records; dropped 1 images, 1 items, 1 polygons, 1 landmarks (see the "
      f"warnings above)",
  ]
  assert f"{split.root}/annos/002092.json: field 'item1.landmarks': landmark 1" in warnings[0]


def test_coco_path_gives_the_same_counts_and_records(split):
  scan = annotations.read_coco(split.coco, split.images, num_workers=1, spec=DEEPFASHION2)
  assert scan.counts == ONE_OF_EACH
  assert [(d.kind, d.field) for d in scan.drops] == [
      ("landmark", f"annotations[id={LANDMARK_ANN}].keypoints"),
      ("image", "image"),
      ("item", f"annotations[id={BOX_ANN}].bbox"),
      ("polygon", f"annotations[id={POLYGON_ANN}].segmentation[3]"),
  ]
  got = _by_id(scan)
  _assert_rest_survives(got, split.clean)
  raw = _by_id(annotations.scan_raw_root(split.root, num_workers=1))
  for image_id, record in got.items():
    for a, b in zip(record.items, raw[image_id].items, strict=True):
      np.testing.assert_array_equal(a.box, b.box)
      np.testing.assert_array_equal(a.landmarks, b.landmarks)
      for pa, pb in zip(a.polygons, b.polygons, strict=True):
        np.testing.assert_array_equal(pa, pb)


def test_strict_raises_the_first_problem_naming_file_and_field(split):
  with pytest.raises(records.DataError) as info:
    annotations.scan_raw_root(split.root, strict=True, num_workers=1)
  assert info.value.path == str(split.root / "annos" / "002092.json")
  assert info.value.field == "item1.landmarks"
  assert str(info.value) == (f"{split.root}/annos/002092.json: field 'item1.landmarks': landmark "
                             f"1 at (473, 426) outside the 468x702 image (tolerance 1 px)")
  with pytest.raises(records.DataError) as info:
    annotations.read_coco(split.coco, split.images, strict=True, num_workers=1, spec=DEEPFASHION2)
  assert (info.value.path, info.value.field) == (str(split.coco),
                                                 f"annotations[id={LANDMARK_ANN}].keypoints")


def test_the_counts_travel_with_the_source(split):
  from configs import tiny as tiny_config
  data = tiny_config.get_config().data
  data.update(dict(format="raw", root=str(split.root.parent), eval_split="validation",
                   check_images="decode", num_workers=1))
  source = sources.source_from_config(data, "validation")
  assert source.dropped == ONE_OF_EACH and len(source) == 15
  assert source.subset([0, 1]).dropped == ONE_OF_EACH  # the split's, whatever the subset
  data.update(dict(format="coco", coco_json_eval=str(split.coco),
                   coco_images_eval=str(split.images)))
  coco = sources.source_from_config(data, "validation")
  assert coco.dropped == ONE_OF_EACH and len(coco) == 15
  assert ONE_OF_EACH.as_dict() == {"images": 1, "items": 1, "polygons": 1, "landmarks": 1}
  assert DropCounts.from_dict(ONE_OF_EACH.as_dict()) == ONE_OF_EACH
  assert not DropCounts() and DropCounts(images=1) + DropCounts(landmarks=2) == DropCounts(
      images=1, landmarks=2)
  data.strict = True  # config.data.strict: the first problem raises, in either format
  with pytest.raises(records.DataError, match=r"annotations\[id=3446\]\.keypoints"):
    sources.source_from_config(data, "validation")


def test_an_image_whose_items_all_fail_stays_without_items(split):
  """Kept for the evaluation (its detections are false positives, not unscored) and harmless
  for training (no GT: all-background targets, no matching pair)."""
  from data_pipeline import pairs, transforms
  anno = _raw_annotation(sorted((a for a in json.loads(split.coco.read_text())["annotations"]
                                 if a["image_id"] == BOX_IMAGE), key=lambda a: a["id"]))
  anno["item1"]["category_id"] = 14
  drops = annotations.Drops()
  record = annotations.parse_raw_annotation(anno, "annos/060097.json", BOX_IMAGE,
                                            "image/060097.jpg", 468, 702, drops=drops)
  assert record.items == () and drops.counts == DropCounts(items=2)
  coco = convert.to_coco([record], DEEPFASHION2)
  assert [i["id"] for i in coco["images"]] == [BOX_IMAGE] and coco["annotations"] == []
  assert convert.retrieval_gt([record]) == ([], [])
  geometry = transforms.ImageGeometry((128, 128), 96, 128, 3, 8, spec=DEEPFASHION2)
  out = transforms.encode_image(record, np.zeros((702, 468, 3), np.uint8), geometry, flip=False)
  assert not out["instance_valid"].any()
  index = pairs.build_pair_index([record, record])
  assert len(index.pairs) == 0


# --------------------------------------------------------------------------------------------
# The evaluation.


def _random_variables(config) -> dict:
  """{"params", "constants"} of the tiny model: small random params, identity batch norms.
  Built from the shapes alone (traced, not compiled: ``init_variables`` compiles the whole
  training graph, 8 s of this file's 30); the numbers only have to be finite."""
  import functools
  import jax
  from df2_jax.models.match_rcnn import init_variables, model_from_config
  shapes = jax.eval_shape(functools.partial(
      init_variables, model_from_config(config), jax.random.key(0),
      transforms.zero_train_batch(transforms.geometry_from_config(config.data), 2)))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda s: (0.05 * rng.standard_normal(s.shape)).astype(s.dtype), shapes["params"])
  ones = ("weight']", "running_var']")
  constants = jax.tree_util.tree_map_with_path(
      lambda path, s: (np.ones if jax.tree_util.keystr(path).endswith(ones) else np.zeros)(
          s.shape, s.dtype), shapes["constants"])
  return {"params": params, "constants": constants}


@pytest.fixture(scope="module")
def tiny(split):
  """The tiny config (host work on one thread), random variables, the faulty split."""
  from configs import tiny as tiny_config
  config = tiny_config.get_config()
  config.eval.host_pool = "thread"
  config.eval.host_workers = 1
  source = sources.raw_source(str(split.root), num_workers=1)
  return SimpleNamespace(config=config, variables=_random_variables(config), source=source)


def test_evaluation_and_training_refuse_in_one_line(tiny, tmp_path):
  from df2_jax import train
  from df2_jax.evaluation import evaluator
  assert tiny.config.eval.allow_skipped is False
  outdir = tmp_path / "run" / "eval_1"
  with pytest.raises(evaluator.SkippedGroundTruth) as info:
    evaluator.evaluate(tiny.config, tiny.variables, str(outdir), eval_source=tiny.source)
  line = str(info.value)
  assert "\n" not in line
  assert line == (f"Refusing to evaluate on {tiny.source.name}: its reader dropped 1 images, 1 "
                  f"items, 1 polygons, 1 landmarks as invalid (the warnings of its scan name "
                  f"them), whose ground truth every metric and the retrieval denominator would "
                  f"miss. Fix the data, or pass --config.eval.allow_skipped=True to evaluate "
                  f"without them.")
  assert not (tmp_path / "run").exists()  # nothing written
  # Training builds its evaluations at start: refused there, before best/ or any step.
  workdir = tmp_path / "train"
  with pytest.raises(evaluator.SkippedGroundTruth, match="allow_skipped=True"):
    train.Evaluations(tiny.config, str(workdir), train.MetricsWriter(str(workdir), False),
                      eval_source=tiny.source)
  assert not workdir.exists()
  # Polygons or landmarks only: the ground truth of AP_mask and AP_pt is altered: refused
  # too, naming what was dropped (an audit against detectron2, issue 34).
  for counts, named in ((DropCounts(polygons=3), "3 polygons"),
                        (DropCounts(landmarks=2), "2 landmarks"),
                        (DropCounts(polygons=3, landmarks=2), "3 polygons, 2 landmarks")):
    altered = records.DataSource(tiny.source.records, tiny.source.loader, "altered", counts)
    with pytest.raises(evaluator.SkippedGroundTruth) as info:
      evaluator.check_ground_truth(tiny.config, altered)
    assert f"its reader dropped {named} as invalid" in str(info.value)
    allowed = copy.deepcopy(tiny.config)
    allowed.eval.allow_skipped = True
    evaluator.check_ground_truth(allowed, altered)  # allowed: evaluated


@pytest.mark.slow  # a whole evaluation
def test_allow_skipped_evaluates_and_records_the_counts(tiny, tmp_path):
  from df2_jax.evaluation import evaluator, summary
  config = copy.deepcopy(tiny.config)
  config.eval.allow_skipped = True
  ids = [r.image_id for r in tiny.source.records]
  subset = tiny.source.subset([ids.index(i) for i in (LANDMARK_IMAGE, BOX_IMAGE)])
  outdir = tmp_path / "eval_1"
  metrics = evaluator.evaluate(config, tiny.variables, str(outdir), eval_source=subset)
  want = {"images": 1, "items": 1, "polygons": 1, "landmarks": 1}
  assert metrics[evaluator.DROPPED_KEY] == want
  written = json.loads((outdir / "metrics.json").read_text())
  assert written["dropped_ground_truth"] == want
  # The best-metric machinery reads the same scalars as before.
  assert set(summary.summary_scalars(written)) == {f"eval/{n}"
                                                     for n in summary.metric_names()}
  assert written["ground_truth"]["coco"].endswith("coco.json")
  gt = json.loads(Path(written["ground_truth"]["coco"]).read_text())
  assert [i["id"] for i in gt["images"]] == [LANDMARK_IMAGE, BOX_IMAGE]
  assert len(gt["annotations"]) == 3  # 2 + 1: the degenerate box's item is not there


def test_tfds_build_records_the_counts_and_its_source_gives_them(split, tmp_path):
  from data_pipeline import tfds_deepfashion2
  data_dir = str(tmp_path / "tfds")
  builder = tfds_deepfashion2.prepare(str(split.root.parent), data_dir)
  marker, why = tfds_deepfashion2.read_marker(builder)
  assert why == ""
  built = marker["splits"]["validation"]
  assert (built["records"], built["skipped"]) == (15, 1)
  assert built["dropped"] == {"images": 1, "items": 1, "polygons": 1, "landmarks": 1}
  source = tfds_deepfashion2.tfds_source(data_dir, "validation")
  assert source.dropped == ONE_OF_EACH
  _assert_rest_survives({r.image_id: r for r in source.records}, split.clean)
  # A build from before the counts (its marker says only "skipped"): its images counted.
  del built["dropped"]
  path = os.path.join(builder.data_path, tfds_deepfashion2.MARKER)
  with open(path, "w") as f:
    json.dump(marker, f)
  assert tfds_deepfashion2.tfds_source(data_dir, "validation").dropped == ONE_OF_EACH
