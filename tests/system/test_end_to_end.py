"""The whole system on the tiny config: train, checkpoint, evaluate, resume."""

import json
import logging
import os
import re
import shutil

import cv2
import jax
import numpy as np

from configs import tiny
from df2_jax import checkpoint, inference, train
from df2_jax.models.match_rcnn import init_variables, model_from_config


def tensorboard_tags(workdir: str) -> set[str]:
  """Every summary tag in the TensorBoard event files of ``workdir``."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(workdir, size_guidance={"tensors": 0, "images": 0})
  acc.Reload()
  tags = acc.Tags()
  return set(tags["tensors"]) | set(tags["scalars"]) | set(tags["images"])


def _compiled_shapes(text: str, name: str) -> list[str]:
  """The image shape of each compilation of the jitted ``name`` in a jax_log_compiles log."""
  return re.findall(rf"Compiling jit\({name}\) with global shapes and types .*?uint8"
                    rf"\[([\d,]+)\]", text)


def test_train_checkpoint_evaluate_and_resume(tmp_path, caplog):
  config = tiny.get_config()
  config.data.synthetic_dir = str(tmp_path / "data")
  # Orientation buckets: the tiny data's landscape images (96x128 once resized), portrait ones
  # (128x96) and square ones (96x96, either) go onto those canvases, batches mixing
  # orientations onto the 128x128 one.
  config.data.bucket_canvases = ((96, 128), (128, 96))
  config.train.num_steps = 10
  config.train.checkpoint_every_steps = 5
  # Evaluation during training at steps 5 and 10 (the final one is not repeated), best/ by
  # retrieval with GT boxes (box AP of 10 tiny steps is 0.0 at both steps).
  config.train.eval_every_steps = 5
  config.train.best_metric = "retrieval_gt_boxes/top20"
  workdir = str(tmp_path / "run")

  with jax.log_compiles(True), caplog.at_level(logging.WARNING):
    metrics = train.train_and_evaluate(config, workdir)
  # One train-step program per canvas, each compiled once; the buckets were used.
  shapes = _compiled_shapes(caplog.text, "train_step")
  assert len(shapes) == len(set(shapes)) >= 2, shapes
  assert set(shapes) <= {"2,2,96,128,3", "2,2,128,96,3", "2,2,128,128,3"}, shapes
  manager = checkpoint.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert manager.all_steps() == [5, 10]
  manager.close()
  assert sorted(p for p in os.listdir(workdir) if p.startswith("eval_")) == ["eval_10", "eval_5"]
  # Evaluation files of step 10, every metric a number in [0, 1].
  outdir = os.path.join(workdir, "eval_10")
  for name in ("detections-00000.npz", "retrieval_submission.json", "metrics.json"):
    assert os.path.exists(os.path.join(outdir, name)), name
  # The official result files, on request, from the compact chunks.
  from df2_jax.evaluation import results
  assert results.main(["--eval_dir", outdir]) == 0
  with open(os.path.join(outdir, "bbox_results.json")) as f:
    assert len(json.load(f)) == sum(1 for _ in results.load(outdir).scores)
  # metrics.json names the ground truth it was scored against: the scorers rerun on it.
  from df2_jax.evaluation import coco
  from df2_jax.evaluation import retrieval_protocol
  gt = metrics["ground_truth"]
  assert coco.evaluate(gt["coco"], os.path.join(outdir, "bbox_results.json"), "bbox")["AP"] == (
      metrics["bbox"]["AP"])
  rerun = retrieval_protocol.evaluate_retrieval(
      os.path.join(outdir, "retrieval_submission.json"), gt["query_gt"], gt["gallery_gt"])
  assert [rerun[f"top{k}"] for k in (1, 5, 10, 15, 20)] == [
      metrics["retrieval"][f"top{k}"] for k in (1, 5, 10, 15, 20)]
  for kind in ("bbox", "segm", "keypoints", "keypoints_visible"):
    assert 0.0 <= metrics[kind]["AP"] <= 1.0
  for kind in ("retrieval", "retrieval_gt_boxes"):
    assert 0.0 <= metrics[kind]["top1"] <= metrics[kind]["top20"] <= 1.0
  # Pictures: drawn detections of the first images, retrieval strips of the first queries.
  for name in ("detections.png", "retrieval.png"):
    picture = cv2.imread(os.path.join(outdir, name))
    assert picture is not None and picture.shape[0] > 64 and picture.shape[1] > 64, name
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train_lines = [m for m in logged if "loss" in m]
  eval_lines = [m for m in logged if "eval/bbox/AP" in m]
  assert [m["step"] for m in train_lines] == [5, 10]
  assert all(np.isfinite(m["loss"]) for m in train_lines)
  assert [m["step"] for m in eval_lines] == [5, 10]
  assert eval_lines[1]["eval/bbox/AP"] == metrics["bbox"]["AP"]
  assert eval_lines[1]["eval/retrieval/top20"] == metrics["retrieval"]["top20"]
  # best/ holds the params of the first step with the highest metric, nothing else.
  values = [m["eval/retrieval_gt_boxes/top20"] for m in eval_lines]
  best_step = [5, 10][int(np.argmax(values))]
  with checkpoint.CheckpointManager(os.path.join(workdir, "best")) as best:
    assert best.all_steps() == [best_step]
    extra = best.read_extra()
  assert extra["step"] == best_step and extra["value"] == max(values)
  best_vars, step = inference.load_variables(workdir, checkpoint_dir=os.path.join(workdir, "best"))
  step_vars, _ = inference.load_variables(workdir, step=best_step)
  assert step == best_step
  jax.tree_util.tree_map(np.testing.assert_array_equal, best_vars, step_vars)
  other_vars, _ = inference.load_variables(workdir, step=15 - best_step)
  assert not all(np.array_equal(a, b) for a, b in zip(
      jax.tree_util.tree_leaves(best_vars["params"]),
      jax.tree_util.tree_leaves(other_vars["params"])))
  # TensorBoard: training scalars, evaluation scalars and the two pictures.
  tags = tensorboard_tags(workdir)
  assert {"loss", "learning_rate", "grad_norm", "steps_per_second", "landmark"} <= tags
  assert {"eval/bbox/AP", "eval/keypoints/AP", "eval/retrieval/top1",
          "eval/detections", "eval/retrieval"} <= tags

  # The same command again with more steps resumes at step 10 and stops at 15.
  config.train.num_steps = 15
  config.train.eval_every_steps = 0
  state = train.train(config, workdir)
  assert int(state.step) == 15
  logged = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [m["step"] for m in logged if "loss" in m] == [5, 10, 15]

  # Params-only restore of a chosen step (what --mode eval and --mode predict read).
  variables, step = inference.load_variables(workdir, step=10)
  assert step == 10
  assert set(variables) == {"params", "constants"}


def test_predict_on_a_folder_of_images(tmp_path):
  """--mode predict: drawn PNGs and a predictions JSON for each readable image of a folder
  (two real DeepFashion2 photos and one corrupt file, which is skipped)."""
  from conftest import fixtures_dir
  from data_pipeline import transforms
  from df2_jax import predict
  config = tiny.get_config()
  photos = tmp_path / "photos"
  photos.mkdir()
  for name in ("002092.jpg", "151674.jpg"):
    shutil.copy(fixtures_dir() / "image" / name, photos / name)
  (photos / "000001.jpg").write_bytes(b"not a jpeg")
  geometry = transforms.geometry_from_config(config.data)
  variables = init_variables(model_from_config(config), jax.random.key(config.seed),
                             transforms.zero_train_batch(geometry, config.train.global_batch_pairs))
  out = predict.predict(config, variables, str(photos), str(tmp_path / "pred"))
  assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
      "002092.png", "151674.png", "predictions.json"]
  assert set(out["embeddings"]) == {"2092", "151674"}
  assert {r["image_id"] for r in out["bbox"]} <= {2092, 151674}
  assert [(i["id"], i["file_name"]) for i in out["images"]] == [(2092, "002092.jpg"),
                                                                (151674, "151674.jpg")]
  # With orientation buckets the batch (a portrait photo, 85x128 once resized, and a square
  # one) goes onto the portrait canvas; the boxes stay in each photo's own pixels.
  bucketed = tiny.get_config()
  bucketed.data.bucket_canvases = ((96, 128), (128, 96))
  assert transforms.batch_canvas(transforms.geometry_from_config(bucketed.data),
                                 [(702, 468), (468, 468)]) == (128, 96)
  out_b = predict.predict(bucketed, variables, str(photos), str(tmp_path / "pred_buckets"))
  assert out_b["images"] == out["images"] and set(out_b["embeddings"]) == {"2092", "151674"}
  sizes = {i["id"]: (i["width"], i["height"]) for i in out_b["images"]}
  for r in out_b["bbox"]:
    x, y, w, h = r["bbox"]
    assert 0 <= x and x + w <= sizes[r["image_id"]][0] + 1e-3
    assert 0 <= y and y + h <= sizes[r["image_id"]][1] + 1e-3
  # Names that are not all distinct numbers: ids 1..N in name order, one per file, and the
  # drawings named after the whole file name when two files share a stem.
  mixed = tmp_path / "mixed"
  mixed.mkdir()
  shutil.copy(fixtures_dir() / "image" / "002092.jpg", mixed / "1.jpg")
  shutil.copy(fixtures_dir() / "image" / "151674.jpg", mixed / "a.jpg")
  cv2.imwrite(str(mixed / "a.png"), cv2.imread(str(fixtures_dir() / "image" / "002092.jpg")))
  out = predict.predict(config, variables, str(mixed), str(tmp_path / "pred_mixed"))
  assert [(i["id"], i["file_name"]) for i in out["images"]] == [(1, "1.jpg"), (2, "a.jpg"),
                                                                (3, "a.png")]
  assert set(out["embeddings"]) == {"1", "2", "3"}
  assert sorted(p.name for p in (tmp_path / "pred_mixed").iterdir()) == [
      "1.jpg.png", "a.jpg.png", "a.png.png", "predictions.json"]
  with open(tmp_path / "pred_mixed" / "predictions.json") as f:
    assert json.load(f)["images"] == out["images"]
