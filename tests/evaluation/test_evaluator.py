"""Evaluation folders are whole or absent: ``evaluator.evaluate`` builds eval_<step>/ in a
staging folder and swaps it in whole once metrics.json is written, a failed evaluation leaves
the previous folder byte for byte, a killed one's staging folder is removed by the next, the
multi-process merge reads numbers only (no pickle), and metrics.json names the checkpoint."""

import json
import os
import pickle  # only to plant malicious files the evaluator must refuse
import re
from pathlib import Path
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from conftest import make_record
from data_pipeline import transforms
from df2_jax import files
from df2_jax.evaluation import evaluator
from df2_jax.evaluation import results as results_lib

NEW_FILES = ["detections-00000.npz", "detections.png", "metrics.json", "retrieval.png",
             "retrieval_submission.json"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """The tiny config on its synthetic data (host work on one thread) and random-init
  variables."""
  from configs import tiny as tiny_config
  from data_pipeline import sources
  from df2_jax.models.match_rcnn import init_variables, model_from_config
  config = tiny_config.get_config()
  config.data.synthetic_dir = str(tmp_path_factory.mktemp("eval_data"))
  config.eval.host_pool = "thread"
  config.eval.host_workers = 1
  sources.ensure_synthetic(config.data)
  variables = init_variables(model_from_config(config), jax.random.key(0),
                             transforms.zero_train_batch(
                                 transforms.geometry_from_config(config.data), 2))
  return SimpleNamespace(config=config, variables=variables)


def _tree(folder) -> dict[str, bytes]:
  """Every file under ``folder``: relative path -> bytes."""
  folder = Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes()
          for p in sorted(folder.rglob("*")) if p.is_file()}


def _old_evaluation(outdir: Path) -> dict[str, bytes]:
  """An earlier evaluation's folder, with a result JSON file written after it."""
  outdir.mkdir(parents=True)
  (outdir / "metrics.json").write_text(json.dumps({"bbox": {"AP": 0.5}, "old": True}))
  (outdir / "detections-00000.npz").write_bytes(b"old chunk")
  (outdir / "detections-00001.npz").write_bytes(b"old second chunk")
  (outdir / "bbox_results.json").write_text("[]")
  (outdir / "retrieval_submission.json").write_text("[]")
  return _tree(outdir)


def test_reevaluation_replaces_the_folder_whole_and_records_the_checkpoint(tiny, tmp_path):
  """Re-evaluating into an eval folder holding an older evaluation (with a stale extra
  bbox_results.json and more chunks) leaves exactly the new files; the staging folders a
  killed evaluation of it left are gone, those of another folder stay; metrics.json is what
  evaluate returned, with "checkpoint"."""
  run = tmp_path / "run"
  outdir = run / "eval_3"
  _old_evaluation(outdir)
  for stale in (".eval_3.partial.eval", ".eval_3.partial.x1y2", ".eval_3.old.abcd",
                ".eval_30.partial.eval"):  # the last is another folder's: kept
    (run / stale).mkdir()
    (run / stale / "detections-00000.npz").write_bytes(b"killed")
  (run / "eval_30").mkdir()
  checkpoint = str(tmp_path / "other" / "checkpoints" / "3")

  metrics = evaluator.evaluate(tiny.config, tiny.variables, str(outdir), checkpoint=checkpoint)

  assert sorted(os.listdir(outdir)) == NEW_FILES
  assert sorted(os.listdir(run)) == [".eval_30.partial.eval", "eval_3", "eval_30",
                                     "ground_truth"]
  saved = files.read_json(outdir / "metrics.json")
  assert saved == json.loads(json.dumps(metrics, default=float))
  assert saved["checkpoint"] == checkpoint
  assert set(saved) == {"bbox", "segm", "keypoints_visible", "keypoints", "ground_truth",
                        "retrieval", "retrieval_gt_boxes", "timing", "checkpoint",
                        "dropped_ground_truth"}
  # The synthetic split is valid: nothing dropped.
  assert saved["dropped_ground_truth"] == {"images": 0, "items": 0, "polygons": 0,
                                           "landmarks": 0}
  assert len(results_lib.load(str(outdir))) == 8 * 10  # 8 images, 10 detections each
  for path in saved["ground_truth"].values():  # beside the eval folders, whole
    assert files.read_json(path) is not None
  assert json.loads((outdir / "retrieval_submission.json").read_text())


@pytest.mark.parametrize("dropped, named", [
    (dict(polygons=3), "3 polygons"),
    (dict(landmarks=2), "2 landmarks"),
    (dict(polygons=3, landmarks=2), "3 polygons, 2 landmarks"),
])
def test_dropped_polygons_or_landmarks_alone_refuse_the_evaluation(tiny, dropped, named):
  """Every item still there with its box, but AP_mask / AP_pt would be scored against altered
  ground truth: refused in one line naming what was dropped and the override, unless
  config.eval.allow_skipped."""
  import copy
  from data_pipeline.records import DropCounts
  source = SimpleNamespace(name="synthetic/validation", dropped=DropCounts(**dropped))
  assert tiny.config.eval.allow_skipped is False
  with pytest.raises(evaluator.SkippedGroundTruth) as info:
    evaluator.check_ground_truth(tiny.config, source)
  line = str(info.value)
  assert "\n" not in line
  assert f"its reader dropped {named} as invalid" in line
  assert "images" not in line.split(" as invalid")[0]  # only what was dropped is named
  assert "--config.eval.allow_skipped=True" in line
  allowed = copy.deepcopy(tiny.config)
  allowed.eval.allow_skipped = True
  evaluator.check_ground_truth(allowed, source)  # evaluated, with a warning
  evaluator.check_ground_truth(tiny.config, SimpleNamespace(name="x", dropped=DropCounts()))


@pytest.mark.slow  # a whole evaluation
def test_allow_skipped_evaluates_a_split_that_lost_polygons_and_landmarks(tiny, tmp_path):
  import copy
  from data_pipeline import records, sources
  config = copy.deepcopy(tiny.config)
  full = sources.source_from_config(config.data, config.data.eval_split)
  source = records.DataSource(full.records, full.loader, full.name,
                              records.DropCounts(polygons=3, landmarks=2))
  with pytest.raises(evaluator.SkippedGroundTruth, match="3 polygons, 2 landmarks"):
    evaluator.evaluate(config, tiny.variables, str(tmp_path / "refused"), eval_source=source)
  assert not (tmp_path / "refused").exists()
  config.eval.allow_skipped = True
  metrics = evaluator.evaluate(config, tiny.variables, str(tmp_path / "eval_1"),
                               eval_source=source)
  want = {"images": 0, "items": 0, "polygons": 3, "landmarks": 2}
  assert metrics[evaluator.DROPPED_KEY] == want
  assert files.read_json(tmp_path / "eval_1" / "metrics.json")[evaluator.DROPPED_KEY] == want


@pytest.mark.parametrize("stage", ["coco_metrics", "draw_pictures"])
def test_a_failed_evaluation_leaves_the_previous_folder_byte_identical(tiny, tmp_path,
                                                                       monkeypatch, stage):
  """An evaluation raising mid-way (in COCO scoring, after the result chunks; or drawing the
  pictures, after the retrieval submission) leaves the previous folder byte for byte and no
  staging folder; the next evaluation after a kill (its staging folder left behind) replaces
  the folder and removes the staging folder. Without ``checkpoint`` metrics.json has none."""
  run = tmp_path / "run"
  outdir = run / "eval_2"
  before = _old_evaluation(outdir)
  real = getattr(evaluator, stage)
  staged = {}

  def fail(*args, **kwargs):
    staging = evaluator.staging_path(str(outdir))
    staged["files"] = sorted(os.listdir(staging))
    if stage == "draw_pictures":
      real(*args, **kwargs)
    raise RuntimeError(f"{stage} failed")

  monkeypatch.setattr(evaluator, stage, fail)
  with pytest.raises(RuntimeError, match=f"{stage} failed"):
    evaluator.evaluate(tiny.config, tiny.variables, str(outdir))
  # It failed mid-way: the new files were being written, beside the old folder.
  assert "detections-00000.npz" in staged["files"] and "metrics.json" not in staged["files"]
  if stage == "draw_pictures":
    assert "retrieval_submission.json" in staged["files"]
  assert _tree(outdir) == before
  assert "eval_2" in os.listdir(run) and set(os.listdir(run)) <= {"eval_2", "ground_truth"}

  if stage == "draw_pictures":
    return
  # A killed evaluation leaves its staging folder (partial chunks, no metrics.json).
  monkeypatch.setattr(evaluator, stage, real)
  staging = Path(evaluator.staging_path(str(outdir)))
  staging.mkdir()
  (staging / "detections-00000.npz").write_bytes(b"killed mid-way")
  assert _tree(outdir) == before
  evaluator.evaluate(tiny.config, tiny.variables, str(outdir))
  assert sorted(os.listdir(outdir)) == NEW_FILES
  assert not staging.exists() and not [n for n in os.listdir(run) if n.startswith(".")]
  saved = files.read_json(outdir / "metrics.json")
  assert "checkpoint" not in saved and "old" not in saved


# The multi-process merge: process 0 reads every process's shard file from the shared folder.

class _Plant:
  """Unpickling it creates the folder ``path`` (what a planted pickle could do)."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (os.mkdir, (self.path,))


def _found(seed: int, image_ids) -> dict:
  """What ``run_detection`` returns on one process's shard."""
  rng = np.random.default_rng(seed)
  entry = lambda i: dict(image_id=int(i), bbox=rng.random(4).astype(np.float32).tolist(),
                         cls=int(rng.integers(1, 14)),
                         score=float(np.float32(rng.random())),
                         embedding=rng.normal(size=16).astype(np.float32))
  drawn = lambda n: dict(boxes=rng.random((n, 4)).astype(np.float32),
                         scores=rng.random(n).astype(np.float32),
                         classes=rng.integers(1, 14, n).astype(np.int16),
                         valid=np.ones(n, bool), masks=rng.random((n, 12, 9)) < 0.5,
                         landmarks=rng.random((n, 294, 3)).astype(np.float32))
  return dict(query=[entry(i) for i in image_ids], gallery=[entry(i) for i in image_ids[:1]],
              gt_query=[entry(i) for i in image_ids], gt_gallery=[],
              outputs={int(image_ids[0]): drawn(3), int(image_ids[-1]): drawn(0)},
              seconds=1.5 + seed, images=len(image_ids), bytes=1000 * (seed + 1))


def _as_process_0_of_2(monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(evaluator.parallel, "barrier", lambda *args, **kwargs: None)


def _assert_same_found(a: dict, b: dict) -> None:
  assert set(a) == set(b)
  for key in ("seconds", "images", "bytes"):
    assert a[key] == b[key] and type(a[key]) is type(b[key]), key
  for key in ("query", "gallery", "gt_query", "gt_gallery"):
    assert len(a[key]) == len(b[key]), key
    for x, y in zip(a[key], b[key]):
      assert set(x) == set(y)
      for k in ("image_id", "bbox", "cls", "score"):
        assert x[k] == y[k] and type(x[k]) is type(y[k]), k
      assert all(type(v) is float for v in x["bbox"])
      np.testing.assert_array_equal(x["embedding"], y["embedding"])
      assert x["embedding"].dtype == y["embedding"].dtype
  assert list(a["outputs"]) == list(b["outputs"])
  for image_id, drawn in a["outputs"].items():
    assert set(drawn) == set(b["outputs"][image_id])
    for k, v in drawn.items():
      np.testing.assert_array_equal(v, b["outputs"][image_id][k])
      assert v.dtype == b["outputs"][image_id][k].dtype, k


def test_the_multi_process_merge_reads_npz_and_never_a_pickle(tmp_path, monkeypatch):
  """Process 0 joins its own and process 1's shard files (npz: numbers only) in process order,
  exactly; planted pickles beside them are never read and the shard files are removed."""
  first, second = _found(0, [1, 2, 3]), _found(1, [4, 5])
  _write(str(tmp_path / "shard-00001.npz"), second)  # process 1's
  marker = tmp_path / "pickle_ran"
  for name in ("shard-00000.pkl", "shard-00001.pkl"):  # the old format, planted
    (tmp_path / name).write_bytes(pickle.dumps(_Plant(marker)))
  _as_process_0_of_2(monkeypatch)

  joined = evaluator._gather_found(first, str(tmp_path))

  expected = dict(first, query=first["query"] + second["query"],
                  gallery=first["gallery"] + second["gallery"],
                  gt_query=first["gt_query"] + second["gt_query"], gt_gallery=[],
                  outputs={**first["outputs"], **second["outputs"]}, seconds=2.5, images=5,
                  bytes=3000)
  _assert_same_found(joined, expected)
  assert not marker.exists()
  assert sorted(os.listdir(tmp_path)) == ["shard-00000.pkl", "shard-00001.pkl"]


@pytest.mark.parametrize("planted", ["object_array", "pickle_bytes", "string_array"])
def test_the_multi_process_merge_refuses_a_shard_file_holding_objects(tmp_path, monkeypatch,
                                                                      planted):
  """A shard file swapped for an npz with an object array (a pickle inside), or for a plain
  pickle under the npz name, is refused with ValueError and nothing in it runs."""
  marker = tmp_path / "pickle_ran"
  path = tmp_path / "shard-00001.npz"
  arrays = {k: v for k, v in np.load(_written(tmp_path, _found(1, [4]))).items()}
  if planted == "object_array":
    arrays["query.embedding"] = np.array([_Plant(marker)], dtype=object)
    np.savez(path, **arrays)
  elif planted == "string_array":
    arrays["seconds"] = np.array("1.5")
    np.savez(path, **arrays)
  else:
    path.write_bytes(pickle.dumps(_Plant(marker)))
  _as_process_0_of_2(monkeypatch)
  with pytest.raises(ValueError, match="pickle|expected numbers"):
    evaluator._gather_found(_found(0, [1, 2]), str(tmp_path))
  assert not marker.exists()


def _write(path: str, found: dict) -> None:
  """What a process of the evaluation leaves for process 0 (``parallel.gather_on_process_zero``
  of ``evaluator.found_arrays``)."""
  files.save_npz(path, compressed=False, **evaluator.found_arrays(found))


def _written(folder: Path, found: dict) -> str:
  path = str(folder / "written.npz")
  _write(path, found)
  return path


def test_nothing_in_df2_jax_uses_pickle():
  root = Path(evaluator.__file__).resolve().parents[1]
  offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle)\b|allow_pickle=True",
                            p.read_text(), re.M)]
  assert offenders == []


def test_ground_truth_files_are_whole_or_absent(tmp_path, monkeypatch):
  """A ground-truth write cut short leaves no file (which later evaluations would reuse as
  is), and no temporary file; the next evaluation writes them whole."""
  source = SimpleNamespace(name="synthetic/validation", records=[make_record(1), make_record(2)])
  gt = {"images": [{"id": 1}, {"id": 2}], "annotations": [], "categories": []}
  outdir = str(tmp_path / "eval_1")
  real_dump = json.dump

  def torn(obj, f, **kwargs):
    f.write('{"images": [{"id"')
    raise OSError(28, "No space left on device")

  monkeypatch.setattr(json, "dump", torn)
  with pytest.raises(OSError, match="No space"):
    evaluator.write_ground_truth(outdir, source, gt, [], [])
  folder = tmp_path / "ground_truth" / "synthetic_validation_2"
  assert os.listdir(folder) == []
  monkeypatch.setattr(json, "dump", real_dump)
  paths = evaluator.write_ground_truth(outdir, source, gt, [{"a": 1}], [])
  assert sorted(os.listdir(folder)) == ["coco.json", "gallery_gt.json", "query_gt.json"]
  assert files.read_json(paths["coco"]) == gt and files.read_json(paths["query_gt"]) == [{"a": 1}]
