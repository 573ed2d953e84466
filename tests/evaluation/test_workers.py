"""The evaluation's host work: importable without jax or TensorFlow, the same in worker
processes as in this one, and its settings checked at start."""

import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from data_pipeline import deepfashion2 as df2
from data_pipeline.spec import DEEPFASHION2
from df2_jax.config import rules
from df2_jax.evaluation import workers


def test_host_module_imports_neither_jax_nor_tensorflow():
  code = ("import sys; import df2_jax.evaluation.workers; "
          "print(sorted(m for m in ('jax', 'tensorflow', 'flax') if m in sys.modules))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"


def _image_outputs(seed: int, n: int = 12, h: int = 90, w: int = 120):
  """detect-like outputs of one image (on a canvas of h x w; the original is twice as big)."""
  rng = np.random.default_rng(seed)
  xy = rng.uniform(0, [w - 30, h - 30], (n, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(10, 30, (n, 2))], 1).astype(np.float32)
  classes = rng.integers(1, 14, n).astype(np.int32)
  landmarks = np.zeros((n, df2.NUM_LANDMARKS, 3), np.float32)
  for d, cat in enumerate(classes):
    sl = df2.landmark_slice(int(cat))
    count = sl.stop - sl.start
    landmarks[d, sl, :2] = rng.uniform(boxes[d, :2], boxes[d, 2:], (count, 2))
    landmarks[d, sl, 2] = rng.uniform(0, 1, count)
  valid = np.ones(n, bool)
  valid[-3:] = False
  return dict(boxes=boxes, scores=rng.uniform(0, 1, n).astype(np.float32), classes=classes,
              valid=valid, masks=rng.uniform(0, 1, (n, 28, 28)).astype(np.float32),
              landmarks=landmarks, embeddings=rng.normal(size=(n, 8)).astype(np.float32))


@pytest.mark.parametrize("source", ["user", "shop"])
def test_worker_processes_give_what_this_process_gives(source):
  hw, orig = np.float32([90, 120]), np.float32([180, 240])
  args = [(image_id, source, _image_outputs(image_id), hw, orig, None, None, None, 0.5, 0.2,
           0.0 if image_id == 1 else None) for image_id in (1, 2, 3)]
  expected = [workers.process_image(*a, spec=DEEPFASHION2) for a in args]
  with workers.host_pool(2, "process") as pool:
    got = [f.result() for f in [pool.submit(workers.process_image, *a,
                                            spec=DEEPFASHION2) for a in args]]
  for e, g in zip(expected, got):
    assert len(e.results.scores) == 9
    for name in ("boxes", "scores", "classes", "keypoint_rows", "keypoints"):
      np.testing.assert_array_equal(getattr(g.results, name), getattr(e.results, name))
    assert g.results.rles == e.results.rles and len(g.results.rles) == 9
    assert [(r["bbox"], r["score"]) for r in g.retrieval] == [
        (r["bbox"], r["score"]) for r in e.retrieval]
    assert (g.drawn is None) == (e.drawn is None)
  assert got[0].drawn["masks"].shape[1:] == (180, 240)
  np.testing.assert_array_equal(got[0].drawn["masks"], expected[0].drawn["masks"])


@pytest.mark.parametrize("field,value,message", [
    ("host_pool", "processes",
     "config.eval.host_pool must be one of 'process', 'thread', got 'processes'"),
    ("host_workers", -1, "config.eval.host_workers must be >= 0, got -1"),
])
def test_host_settings_fail_at_start(field, value, message):
  config = tiny.get_config()
  config.eval[field] = value
  with pytest.raises(ValueError, match=message):
    rules.validate(config)
