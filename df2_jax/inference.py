"""A Python API over a trained run: load it without its config file, detect, match.

  from df2_jax.inference import Predictor
  predictor = Predictor.from_workdir("runs/r50")          # or Predictor.from_checkpoint(DIR)
  result = predictor(image)                               # HxWx3 uint8 RGB, any size
  results = predictor([image1, image2])                   # or predictor.predict_files(paths)
  scores = predictor.match(results[0], results[1])        # [Q, G] match probabilities

``load_run(path, step=None)`` reads what a training run saved: the config (``config.json`` of
the workdir, or the ``config`` entry of the checkpoint's ``extra`` JSON: ``run_config``) and
the checkpoint's params, checked against that config's shapes and against the checkpoint's
checksums (``train.load_variables``). ``path`` is a training workdir (its ``checkpoints/``),
a checkpoint directory (``WORKDIR/best``, ``WORKDIR/checkpoints``, a copy elsewhere) or one
step's folder of one (``WORKDIR/checkpoints/2000``). A checkpoint of an earlier version, saved
without its config, needs the config given: ``load_run(path, config=...)``.

``Predictor`` runs ``MatchRCNN.detect`` on every local device through ``Detector``, the one
inference path that ``--mode predict``, the retrieval tool and the evaluation share
(``config.eval.batch_size`` images per device; a short batch is padded). Each image is resized
as the evaluation resizes it (``config.data.short_side``/``max_size``:
``transforms.encode_image``) and padded onto the smallest canvas of
``config.data.bucket_canvases`` + ``canvas`` that holds it; images are grouped by canvas (one
compiled program per canvas). The detections come back in the original image's pixels
(``image_result``), scaled as ``--mode predict`` writes them and the evaluation scores them
(``transforms.original_scale``): boxes scaled, masks pasted into their boxes as detectron2
pastes them (``evaluation.masks``), landmarks scaled then less half a pixel (the annotations'
pixel indices).

No TensorFlow is imported; images are decoded with Pillow (``data_pipeline.images``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipeline import deepfashion2 as df2
from data_pipeline import images as images_lib
from data_pipeline import transforms
from data_pipeline.records import ImageRecord
from df2_jax import checkpoint as ckpt_lib
from df2_jax import parallel, run_config
from df2_jax.models.match_rcnn import MatchRCNN, model_from_config

MASK_FORMATS = ("bitmap", "rle", None)
# EXIF orientation (tag 0x0112) -> the Pillow transpose that shows the image upright
# (PIL.ImageOps.exif_transpose's table).
_EXIF_ORIENTATION = 0x0112


class LoadRunError(ValueError):
  """A run or checkpoint that cannot be loaded as asked; ``str`` is one line."""


class NoSavedConfig(LoadRunError):
  """A checkpoint saved without its config (a run of an earlier version): the caller must give
  the config it was trained with."""


@dataclasses.dataclass(frozen=True)
class Run:
  """A trained run's checkpoint, ready to use.

  Attributes:
    config: the config the run was trained with (``ml_collections.ConfigDict``; tuples where
      the config files have tuples).
    model: ``model_from_config(config)``.
    variables: ``{"params", "constants"}`` of the checkpoint (jax arrays on the default device).
    step: the checkpoint's step.
    checkpoint_dir: the checkpoint directory (absolute) that holds ``<step>/``.
  """
  config: ml_collections.ConfigDict
  model: MatchRCNN
  variables: dict[str, Any]
  step: int
  checkpoint_dir: str


def _tuples(value: Any) -> Any:
  """JSON data with every list a tuple (the config files' sequences are tuples)."""
  if isinstance(value, Mapping):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return tuple(_tuples(v) for v in value)
  return value


def config_from_json(data: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config saved as JSON (``run_config.as_dict``) as a ``ConfigDict`` again."""
  return ml_collections.ConfigDict(_tuples(dict(data)))


def _locate(path: str, step: int | None, steps_of=ckpt_lib.saved_steps
            ) -> tuple[str, int | None]:
  """(checkpoint directory, step or None) of a workdir, a checkpoint directory or a step
  folder; ``LoadRunError`` when ``path`` holds no checkpoint."""
  if not os.path.exists(path):
    raise LoadRunError(f"{path}: no such folder")
  if not os.path.isdir(path):
    raise LoadRunError(f"{path} is a file, not a training workdir or a checkpoint directory")
  inner = os.path.join(path, "checkpoints")
  if steps_of(inner):
    return inner, step
  if steps_of(path):
    return path, step
  name, parent = os.path.basename(path.rstrip(os.sep)), os.path.dirname(path.rstrip(os.sep))
  if name.isdigit() and int(name) in steps_of(parent or "."):
    if step is not None and int(step) != int(name):
      raise LoadRunError(f"{path} is the checkpoint of step {int(name)}, not of step {step}")
    return parent or ".", int(name)
  hint = ""
  if steps_of(os.path.join(path, "best")):
    hint = f" (its best checkpoint is in {os.path.join(path, 'best')})"
  raise LoadRunError(f"{path} holds no checkpoints: neither a training workdir with "
                     f"checkpoints/ nor a checkpoint directory of <step>/ folders{hint}")


def checkpoint_step(path: str | os.PathLike, step: int | None = None, *,
                    steps_of=ckpt_lib.saved_steps) -> tuple[str, int]:
  """(checkpoint directory, absolute; step) of a training workdir, a checkpoint directory or
  one step's folder (``load_run``'s ``path``); the latest step unless ``step``.
  ``LoadRunError`` when there is no such folder, checkpoint or step. ``steps_of`` lists a
  directory's saved steps (``checkpoint.step_folders`` starts no jax backend)."""
  directory, step = _locate(os.fspath(path), step, steps_of)
  directory = os.path.abspath(directory)
  steps = steps_of(directory)
  if step is None:
    step = steps[-1]
  elif int(step) not in steps:
    raise LoadRunError(f"{directory} has no checkpoint of step {step} (saved steps: "
                       f"{', '.join(map(str, steps))})")
  return directory, int(step)


def saved_config(path: str | os.PathLike, step: int | None = None, *,
                 steps_of=ckpt_lib.saved_steps) -> tuple[ml_collections.ConfigDict, str, int]:
  """(config, checkpoint directory, step) of ``path`` (as ``checkpoint_step``): the config the
  run saved with that checkpoint (its ``extra`` record, else the workdir's ``config.json``:
  ``run_config.stored_for``). ``LoadRunError`` as ``checkpoint_step``; ``NoSavedConfig`` (one)
  for a checkpoint saved without its config (a run of an earlier version)."""
  directory, step = checkpoint_step(path, step, steps_of=steps_of)
  stored = run_config.stored_for(directory, ckpt_lib.read_extra(directory, step))
  if stored is None:
    raise NoSavedConfig(f"checkpoint step {step} in {directory} has no saved config (a run of "
                        f"an earlier version): pass the config it was trained with")
  return config_from_json(stored["config"]), directory, step


def load_run(path: str | os.PathLike, step: int | None = None, *,
             config: Any = None) -> Run:
  """The run saved in ``path``: its config, model and checkpoint params.

  Args:
    path: a training workdir (its ``checkpoints/``), a checkpoint directory (``WORKDIR/best``,
      a copied checkpoints folder) or one step's folder of one.
    step: which step (default: the latest of the directory).
    config: the config to use instead of the saved one (a ``ConfigDict`` or its JSON dict):
      for checkpoints of earlier versions, saved without their config.

  Raises:
    LoadRunError: no such folder, no checkpoint in it, no checkpoint of ``step``, or no saved
      config (and none given).
    run_config.RunMismatch: the checkpoint's arrays do not fit the config's model.
    checkpoint.ChecksumError: a file of the checkpoint changed since it was saved.
  """
  if config is None:
    try:
      config, directory, step = saved_config(path, step)
    except NoSavedConfig as e:
      raise NoSavedConfig(f"{e}: load_run(path, config=...)") from None
  else:
    directory, step = checkpoint_step(path, step)
    if not isinstance(config, ml_collections.ConfigDict):
      config = config_from_json(config)
  model = model_from_config(config)
  from df2_jax import train  # pylint: disable=g-import-not-at-top  (no TensorFlow)
  variables, step = train.load_variables(os.path.dirname(directory), checkpoint_dir=directory,
                                         step=step, config=config)
  return Run(config=config, model=model, variables=variables, step=int(step),
             checkpoint_dir=directory)


def read_image(path: str | os.PathLike, *, exif_transpose: bool = True) -> np.ndarray:
  """An image file as [H, W, 3] uint8 RGB (``data_pipeline.images.load_image``: any mode
  converted, ``records.DataError`` for a missing or broken file), turned upright by its EXIF
  orientation unless ``exif_transpose`` is False (``--mode predict`` and the DeepFashion2
  annotations take the pixels as stored)."""
  pixels = images_lib.load_image(path)
  if not exif_transpose:
    return pixels
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(os.fspath(path)) as image:
      orientation = int(image.getexif().get(_EXIF_ORIENTATION, 1) or 1)
  except Exception:  # pylint: disable=broad-except  (an unreadable EXIF block: as stored)
    return pixels
  method = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
            4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
            6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}.get(orientation)
  if method is None:
    return pixels
  return np.ascontiguousarray(np.asarray(Image.fromarray(pixels).transpose(method)))


def _check_image(image: Any, index: int) -> np.ndarray:
  array = np.asarray(image)
  if array.ndim != 3 or array.shape[2] != 3 or array.shape[0] < 1 or array.shape[1] < 1:
    raise ValueError(f"image {index}: an HxWx3 RGB array is needed, got shape {array.shape}")
  if array.dtype != np.uint8:
    raise ValueError(f"image {index}: uint8 pixels are needed, got {array.dtype}")
  return array


def _embeddings(x: Any, what: str) -> np.ndarray:
  """[N, D] embeddings of a result dict, a list of them (joined in order) or an array."""
  if isinstance(x, Mapping):
    x = x["embeddings"]
  elif isinstance(x, (list, tuple)) and x and all(isinstance(r, Mapping) for r in x):
    x = np.concatenate([np.asarray(r["embeddings"], np.float32).reshape(
        len(r["embeddings"]), -1) for r in x])
  array = np.asarray(x, np.float32)
  if array.ndim != 2:
    raise ValueError(f"{what}: [N, D] embeddings are needed, got shape {array.shape}")
  return array


@functools.lru_cache(maxsize=4)
def jitted_detect(model: MatchRCNN, mesh) -> tuple[Any, Any]:
  """(detect, embed) of ``model`` on every device of ``mesh``, each device on its own images
  (``parallel.per_device``), built once per model and mesh (evaluations during training reuse
  them). ``detect(variables, images, image_hw)``, ``embed(variables, images, image_hw, boxes)``:
  global arrays in (``parallel.host_local_to_global``), global arrays out."""
  detect = parallel.per_device(
      lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect), mesh, 2)
  embed = parallel.per_device(
      lambda v, x, hw, b: model.apply(v, x, hw, b, method=MatchRCNN.embed), mesh, 3)
  return detect, embed


@jax.jit
def _finite_leaves(tree: Any) -> Any:
  return jax.tree_util.tree_map(lambda x: jnp.all(jnp.isfinite(x)), tree)


def check_finite(variables: Any, what: str = "the params") -> None:
  """Raises FloatingPointError naming the tensors of ``variables`` that hold NaN or inf (a
  diverged run's params would evaluate to AP 0 without a word)."""
  floats = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(variables)
            if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jnp.floating)}
  ok = jax.device_get(parallel.one_replica(_finite_leaves(floats)))
  bad = sorted(k for k, v in ok.items() if not bool(v))
  if bad:
    raise FloatingPointError(
        f"{what} hold non-finite values in {len(bad)} of {len(floats)} tensors (e.g. "
        f"{', '.join(bad[:3])}): the run diverged before this checkpoint; evaluate an earlier "
        f"step (--step) instead.")


class Detector:
  """The one inference path: ``MatchRCNN.detect`` of a model's variables on every device of a
  mesh, over decoded images. ``Predictor``, ``--mode predict`` (``predict``), the retrieval tool
  (``retrieval.Detector``) and the evaluation (``evaluator.run_detection``, on the input
  pipeline's encoded batches) all run through it.

  Each image is resized as the evaluation resizes it (``config.data.short_side``/``max_size``:
  ``transforms.encode_image``) and padded onto a canvas of ``config.data.canvas`` and
  ``bucket_canvases`` (``canvas_for``); ``config.eval.batch_size`` images per device of this
  process make a batch, a short one padded with blank images (which detect nothing). ``detect``
  puts each image on the smallest canvas that holds it, the rule of the evaluation's input
  pipeline, so an image's detections depend on the image alone (not on the other images of a
  call) and every path gives the same numbers. The canvas does matter a little: the padding's
  features are not zero after the first layer, and where the canvas ends the convolutions'
  zero padding takes over (measured on the tiny model, a 128x85 image on the 128x96 and the
  128x128 canvas: P2 bit-identical but in the narrower canvas's last column, 0.94 apart
  there); RoIs at the content's right or bottom border sample those features, as in
  detectron2, whose padding to a multiple of 32 does the same.

  Args:
    config: the run's config.
    variables: ``{"params", "constants"}`` (host or device arrays), replicated over ``mesh``
      and checked finite (``check_finite``).
    model: ``model_from_config(config)`` unless given.
    mesh: default ``parallel.make_mesh()`` (every device of every process: every process must
      then make the same calls, on the fixed canvas: ``canvas_for``).
  """

  def __init__(self, config, variables: Any, *, model: MatchRCNN | None = None,
               mesh: Any = None):
    from data_pipeline.sources import geometry_from_config  # pylint: disable=g-import-not-at-top
    self.config = config
    self.geometry = geometry_from_config(config.data)
    self.model = model if model is not None else model_from_config(config)
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    self.variables = parallel.replicate(variables, self.mesh)
    check_finite(self.variables)
    self._detect, self._embed = jitted_detect(self.model, self.mesh)
    processes = {d.process_index for d in self.mesh.devices.flat}
    local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    self.spans_processes = len(processes) > 1
    self.batch_size = int(config.eval.batch_size) * local

  def canvas_for(self, shapes: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The canvas of a batch of images of (H, W) ``shapes``: the smallest that holds them all
    (``transforms.batch_canvas``); on a mesh of several processes the largest,
    ``config.data.canvas`` (every process must run the same program)."""
    if self.spans_processes:
      return tuple(self.geometry.canvas_hw)
    return tuple(transforms.batch_canvas(self.geometry, [tuple(s[:2]) for s in shapes]))

  def encode(self, arrays: Sequence[np.ndarray], canvas: tuple[int, int]
             ) -> dict[str, np.ndarray]:
    """``{"image", "image_hw"}`` of one batch: ``arrays`` ([H, W, 3] uint8, at most
    ``batch_size``) resized onto ``canvas``, the rest of the batch blank."""
    if len(arrays) > self.batch_size:
      raise ValueError(f"{len(arrays)} images for a batch of {self.batch_size}")
    spec = transforms.image_spec(self.geometry, canvas)
    stacked = {k: np.zeros((self.batch_size,) + spec[k][0], spec[k][1])
               for k in ("image", "image_hw")}
    for j, pixels in enumerate(arrays):
      h, w = pixels.shape[:2]
      enc = transforms.encode_image(ImageRecord(j + 1, f"<image {j}>", w, h, "", -1, ()),
                                    pixels, self.geometry, False, canvas)
      for k in stacked:
        stacked[k][j] = enc[k]
    return stacked

  def dispatch(self, batch: Mapping[str, np.ndarray], *, embed_boxes: bool = False
               ) -> tuple[Any, Any]:
    """Starts ``detect`` on one batch (this process's ``image``, ``image_hw`` and, with
    ``embed_boxes``, ``boxes``, whose embeddings ``MatchRCNN.embed`` computes as well) and
    returns (detections, box embeddings or None) as global arrays, not awaited: ``fetch``
    them."""
    keys = ("image", "image_hw") + (("boxes",) if embed_boxes else ())
    x = parallel.host_local_to_global({k: batch[k] for k in keys}, self.mesh)
    out = self._detect(self.variables, x["image"], x["image_hw"])
    emb = (self._embed(self.variables, x["image"], x["image_hw"], x["boxes"]) if embed_boxes
           else None)
    return out, emb

  def fetch(self, tree: Any) -> Any:
    """This process's rows of ``dispatch``'s global arrays, as numpy."""
    return parallel.host_local(tree, self.mesh)

  def detect_batch(self, arrays: Sequence[np.ndarray], canvas: tuple[int, int] | None = None
                   ) -> list[dict[str, np.ndarray]]:
    """One device step over ``arrays`` (at most ``batch_size``; none is a blank step, which a
    process with nothing left still takes with the others): each image's ``MatchRCNN.detect``
    outputs on the canvas (every row, ``valid`` marking the detections) plus its content's
    ``image_hw``. ``canvas`` defaults to ``canvas_for`` of the images."""
    canvas = canvas or self.canvas_for([a.shape for a in arrays])
    stacked = self.encode(arrays, canvas)
    out = self.fetch(self.dispatch(stacked)[0])
    return [dict({k: v[j] for k, v in out.items()}, image_hw=stacked["image_hw"][j])
            for j in range(len(arrays))]

  def detect(self, arrays: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """``detect_batch`` outputs of any number of images, in order: grouped by canvas (a
    portrait and a landscape image of a batch do not both go on the square canvas), then
    batched. A mesh of one process only (the number of steps depends on the images)."""
    if self.spans_processes:
      raise RuntimeError("Detector.detect runs on one process's devices; on a mesh of several "
                         "processes every process calls detect_batch with the same canvas")
    found: list[dict[str, np.ndarray] | None] = [None] * len(arrays)
    by_canvas: dict[tuple[int, int], list[int]] = {}
    for i, pixels in enumerate(arrays):
      by_canvas.setdefault(self.canvas_for([pixels.shape]), []).append(i)
    for canvas, indices in by_canvas.items():
      for start in range(0, len(indices), self.batch_size):
        chunk = indices[start:start + self.batch_size]
        for i, out in zip(chunk, self.detect_batch([arrays[i] for i in chunk], canvas)):
          found[i] = out
    return found


def _padded_rows(n: int) -> int:
  """Rows a set of n embeddings is padded to (powers of two from 8: few compilations)."""
  return max(8, 1 << (max(n, 1) - 1).bit_length())


class Predictor:
  """Detections, masks, landmarks and embeddings of images, from a loaded ``Run``.

  Args:
    run: what ``load_run`` returns.
    devices: the devices to run on (default: every local device); ``config.eval.batch_size``
      images per device per batch.
  """

  def __init__(self, run: Run, *, devices: Sequence[Any] | None = None):
    self.run = run
    self.config = run.config
    self.model = run.model
    devices = list(devices) if devices is not None else jax.local_devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), (parallel.DATA_AXIS,))
    self.detector = Detector(run.config, run.variables, model=run.model, mesh=mesh)
    self.geometry = self.detector.geometry
    self.batch_size = self.detector.batch_size
    model = run.model
    self._match = jax.jit(lambda v, q, g: jax.nn.sigmoid(
        model.apply(v, q, g, method=MatchRCNN.match_logits)))
    self._scorer = {"params": {"scorer": run.variables["params"]["scorer"]}}

  @classmethod
  def from_workdir(cls, path: str | os.PathLike, step: int | None = None, **kwargs
                   ) -> "Predictor":
    """The predictor of a training workdir's checkpoint (the latest unless ``step``)."""
    return cls(load_run(path, step), **kwargs)

  @classmethod
  def from_checkpoint(cls, directory: str | os.PathLike, step: int | None = None, **kwargs
                      ) -> "Predictor":
    """The predictor of a checkpoint directory (``WORKDIR/best``, a copied checkpoints
    folder, or one step's folder)."""
    return cls(load_run(directory, step), **kwargs)

  # ------------------------------------------------------------------------------------------

  def __call__(self, images: Any, *, mask_format: str | None = "bitmap"
               ) -> dict[str, Any] | list[dict[str, Any]]:
    """The detections of one image ([H, W, 3] uint8 RGB array: one dict) or of a list of
    them (a list of dicts, in order).

    Each dict holds the valid detections only, N of them, best score first, in the image's
    pixels: ``boxes`` [N, 4] float32 (x1, y1, x2, y2), ``scores`` [N], ``classes`` [N] int32
    (1..13), ``names`` (N category names, DeepFashion2's COCO names), ``masks`` ([N, H, W]
    bool with ``mask_format="bitmap"``; N COCO RLEs ``{"size": [H, W], "counts": str}`` with
    "rle"; absent with None), ``landmarks`` (N float32 arrays [K, 3]: x, y, score of the
    detection's own category's K landmarks, x and y as the annotations' pixel indices),
    ``embeddings`` [N, D] float32 (for ``match``) and ``image_hw`` (H, W).
    """
    if mask_format not in MASK_FORMATS:
      raise ValueError(f"mask_format must be one of {MASK_FORMATS}, got {mask_format!r}")
    single = isinstance(images, np.ndarray) and images.ndim == 3
    arrays = [_check_image(x, i) for i, x in enumerate([images] if single else list(images))]
    results = [image_result(out, out["image_hw"], pixels.shape[:2], mask_format)
               for pixels, out in zip(arrays, self.detector.detect(arrays))]
    return results[0] if single else results

  def predict_files(self, paths: Sequence[str | os.PathLike], *,
                    mask_format: str | None = "bitmap", exif_transpose: bool = True
                    ) -> list[dict[str, Any]]:
    """``self(...)`` of image files (``read_image``: upright by their EXIF orientation unless
    ``exif_transpose`` is False), a few batches' files in memory at a time; each dict also
    holds its ``path``. ``records.DataError`` for a file that cannot be decoded."""
    paths = [os.fspath(p) for p in paths]
    out = []
    step = self.batch_size * 4
    for start in range(0, len(paths), step):
      chunk = paths[start:start + step]
      results = self([read_image(p, exif_transpose=exif_transpose) for p in chunk],
                     mask_format=mask_format)
      for p, r in zip(chunk, results):
        r["path"] = p
        out.append(r)
    return out

  def match(self, query: Any, gallery: Any) -> np.ndarray:
    """[Q, G] match probabilities (the sigmoid of ``MatchRCNN.match_logits``) of every query
    detection against every gallery detection.

    ``query`` and ``gallery``: a result dict of ``__call__`` (its ``embeddings``), a list of
    them (their detections joined in order), or an [N, D] array of embeddings.
    """
    q, g = _embeddings(query, "query"), _embeddings(gallery, "gallery")
    if q.shape[1] != g.shape[1]:
      raise ValueError(f"query embeddings have {q.shape[1]} dimensions, gallery {g.shape[1]}")
    if not len(q) or not len(g):
      return np.zeros((len(q), len(g)), np.float32)
    pad = lambda x: np.pad(x, ((0, _padded_rows(len(x)) - len(x)), (0, 0)))
    scores = self._match(self._scorer, pad(q), pad(g))
    return np.asarray(jax.device_get(scores), np.float32)[:len(q), :len(g)]


def image_result(out: Mapping[str, np.ndarray], image_hw: Sequence[int],
                 orig_hw: Sequence[int], mask_format: str | None = "bitmap") -> dict[str, Any]:
  """One image's ``MatchRCNN.detect`` outputs (canvas coordinates, content ``image_hw`` on
  the canvas) -> its valid detections in the original (H, W) = ``orig_hw`` image's pixels (see
  ``Predictor.__call__``)."""
  from df2_jax.evaluation import masks as mask_lib  # pylint: disable=g-import-not-at-top
  h, w = int(orig_hw[0]), int(orig_hw[1])
  scale = transforms.original_scale(image_hw, orig_hw)  # [sx, sy]
  rows = np.nonzero(np.asarray(out["valid"], bool))[0]
  boxes = np.asarray(out["boxes"], np.float32)[rows] * np.tile(scale, 2)
  classes = np.asarray(out["classes"])[rows].astype(np.int32)
  soft = np.asarray(out["masks"], np.float32)[rows]
  landmarks = []
  for r, cat in zip(rows, classes):
    own = np.array(out["landmarks"][r, df2.landmark_slice(int(cat))], np.float32)
    # continuous coordinates scaled like the boxes, then pixel indices
    own[:, :2] = transforms.landmarks_to_pixel_indices(own[:, :2] * scale)
    landmarks.append(own)
  result = {"boxes": boxes, "scores": np.asarray(out["scores"], np.float32)[rows],
            "classes": classes, "names": [df2.COCO_NAMES[int(c)] for c in classes],
            "landmarks": landmarks,
            "embeddings": np.asarray(out["embeddings"], np.float32)[rows],
            "image_hw": (h, w)}
  if mask_format == "bitmap":
    masks = np.zeros((len(rows), h, w), bool)
    for d in range(len(rows)):  # detectron2's pasting (evaluation.masks)
      region, (top, left) = mask_lib.paste_mask_region(soft[d], boxes[d], (h, w))
      masks[d, top:top + region.shape[0], left:left + region.shape[1]] = region
    result["masks"] = masks
  elif mask_format == "rle":
    result["masks"] = mask_lib.paste_masks_rle(soft, boxes, (h, w))
  return result
