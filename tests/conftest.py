"""Shared test helpers: fixture locations and tiny in-memory records; the ``slow`` marker.

The tests mirror the packages (``tests/data_pipeline``, ``tests/ops``, ``tests/models``,
``tests/evaluation``, ``tests/config``; ``tests/`` itself for ``df2_jax``'s own modules), and
``tests/system`` holds the runs of whole commands, subprocesses and several processes. Every
test there is marked ``slow`` (``pytest_collection_modifyitems``), as are the few elsewhere
that compile and run whole training steps or a whole evaluation (about 10 s or more each on 2
cores): ``-m "not slow"`` is the fast lane.
"""

import os
import shutil
import tempfile
from pathlib import Path

# LLVM's cheapest code generation for every XLA program of the tests (set before the first
# computation starts the backend, inherited by the tests' subprocesses): the suite compiles
# hundreds of programs and runs most only a few times, so compiling fast beats running fast
# (docs/PERFORMANCE.md, "Test suite"). Every comparison inside the suite is between programs
# built alike.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_backend_optimization_level=0").strip()

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position

from data_pipeline import deepfashion2 as df2
from data_pipeline.records import ImageRecord, Item


_XLA_CACHE = None


def pytest_configure(config):
  """One persistent XLA compilation cache per test session, in a temporary folder that the
  test processes share (``-n 2``: the workers start after this and inherit its variable): a
  program that two tests, or two test processes, build is compiled once (the end-to-end
  test's resumed run compiles the train step again). JAX_COMPILATION_CACHE_DIR, when set, is
  used instead."""
  del config
  global _XLA_CACHE
  if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    _XLA_CACHE = tempfile.mkdtemp(prefix="df2_jax_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
  jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def pytest_unconfigure(config):
  del config
  if _XLA_CACHE:  # the process that made it
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    shutil.rmtree(_XLA_CACHE, ignore_errors=True)


SYSTEM = Path(__file__).resolve().parent / "system"


def pytest_collection_modifyitems(config, items):
  """Every test under tests/system is ``slow``, and runs first: the long files start while the
  short ones fill in around them (``-n 2 --dist loadfile`` hands files out in this order)."""
  del config
  system = {id(item) for item in items if SYSTEM in Path(str(item.fspath)).resolve().parents}
  for item in items:
    if id(item) in system:
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: id(item) not in system)  # stable: each file's order is kept


def subprocess_env() -> dict[str, str]:
  """The environment for a command a test runs: CPU only, and the test session's compilation
  cache (so that a subprocess does not compile again what the session already has)."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "1"
  return env


def fixtures_dir() -> Path:
  """The real DeepFashion2 fixtures (../shared beside the checkout; DF2_FIXTURES overrides)."""
  env = os.environ.get("DF2_FIXTURES")
  if env:
    return Path(env)
  return Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "deepfashion2_real"


@pytest.fixture
def real_fixture() -> Path:
  path = fixtures_dir()
  if not (path / "coco.json").exists():
    pytest.fail(f"Real DeepFashion2 fixtures not found at {path}; set DF2_FIXTURES.")
  return path


def make_item(category_id=1, style=1, box=(10, 20, 50, 80), landmarks=None, polygons=None):
  n = df2.LANDMARK_COUNTS[category_id]
  if landmarks is None:
    landmarks = np.zeros((n, 3), np.float32)
  if polygons is None:
    x1, y1, x2, y2 = box
    polygons = (np.array([[x1, y1], [x2, y1], [x2, y2], [x1, y2]], np.float32),)
  return Item(category_id, style, np.asarray(box, np.float32),
              np.asarray(landmarks, np.float32), tuple(polygons))


def make_record(image_id=1, items=None, width=100, height=120, source="user", pair_id=1):
  items = items if items is not None else [make_item()]
  return ImageRecord(image_id, f"/nonexistent/{image_id:06d}.jpg", width, height, source,
                     pair_id, tuple(items), f"/nonexistent/{image_id:06d}.json")


def save_matching_checkpoint(config, checkpoint_dir: Path, step: int, *,
                             with_config: bool) -> dict:
  """Saves the initial params of ``config``'s model at ``step``, without training, its matching
  weights made negative so that an identical embedding scores highest (a retrieval that can be
  reasoned about); with ``with_config`` the checkpoint carries its config, as a training run's
  does. Returns the variables."""
  import optax
  from data_pipeline import synthetic_batches
  from data_pipeline.transforms import geometry_from_config
  from df2_jax import checkpoint, train_step
  from df2_jax.config import run_config
  from df2_jax.models.match_rcnn import init_variables, model_from_config
  model = model_from_config(config)
  batch = synthetic_batches.synthetic_pair_batch(2, geometry_from_config(config.data),
                                                 image_size=128)
  variables = jax.device_get(init_variables(model, jax.random.key(0), batch))
  scorer = variables["params"]["scorer"]
  scorer["kernel"] = -np.abs(np.asarray(scorer["kernel"])) - 0.05
  state = train_step.create_train_state(variables, optax.sgd(0.1))
  extra = {run_config.CONFIG_KEY: run_config.as_dict(config)} if with_config else None
  with checkpoint.CheckpointManager(checkpoint_dir) as mgr:
    mgr.save(step, state, extra=extra, force=True)
  return variables


def make_app_world(root: Path) -> dict:
  """A run for the web app's tests (``df2_jax.app``), without training: the tiny model's
  ``save_matching_checkpoint`` with its config, three synthetic image pairs at 128 px, and a
  shop index of the three shop images. {workdir, images, index, config}."""
  from configs import tiny
  from data_pipeline import synthetic
  from df2_jax import retrieval
  config = tiny.get_config()
  config.data.update(dict(synthetic_dir=str(root / "data"), synthetic_train_pairs=1,
                          synthetic_val_pairs=3, synthetic_image_size=128, synthetic_seed=0))
  data = Path(synthetic.cache_root(str(root / "data"), 1, 3, 128, 0))  # where runs find it
  synthetic.generate(data, train_pairs=1, val_pairs=3, image_size=128, seed=0)
  workdir = root / "run"
  variables = save_matching_checkpoint(config, workdir / "checkpoints", 3, with_config=True)
  images = data / "validation" / "image"
  index = root / "index"
  retrieval.build_index(config, variables, str(images), str(index),
                        checkpoint_dir=str(workdir / "checkpoints"), step=3, min_score=0.0,
                        source="shop")
  return dict(workdir=workdir, images=images, index=index, config=config)


def write_huge_png(path: Path, width: int, height: int) -> None:
  """A valid grey PNG of width x height, written row by row (a few hundred KB on disk)."""
  import struct
  import zlib

  def chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
  squeeze = zlib.compressobj(9)
  row = b"\x00" * (width + 1)  # filter byte 0, then the row's samples
  data = b"".join(squeeze.compress(row) for _ in range(height)) + squeeze.flush()
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                                 0, 0, 0))
            + chunk(b"IDAT", data) + chunk(b"IEND", b""))
