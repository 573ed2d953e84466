"""A trained run: loaded without its config file, detecting on every device, and its Python API.

  from df2_jax.inference import Predictor
  predictor = Predictor.from_workdir("runs/r50")          # or Predictor.from_checkpoint(DIR)
  result = predictor(image)                               # HxWx3 uint8 RGB, any size
  results = predictor([image1, image2])                   # or predictor.predict_files(paths)
  scores = predictor.match(results[0], results[1])        # [Q, G] match probabilities

Loading (below training: nothing here imports the training loop). ``load_run(path, step=None)``
reads what a training run saved: the config (``config.run_config.saved_config``: the
checkpoint's own record, else the workdir's ``config.json``, completed for runs of earlier
versions) and the checkpoint's params (``load_variables``: only params and constants, checked
against that config's shapes, ``expected_variables``, and against the checkpoint's checksums).
``path`` is a
training workdir (its ``checkpoints/``), a checkpoint directory (``WORKDIR/best``,
``WORKDIR/checkpoints``, a copy elsewhere) or one step's folder of one
(``WORKDIR/checkpoints/2000``). A checkpoint of an earlier version, saved without its config,
needs the config given: ``load_run(path, config=...)``.

Detecting. ``Detector`` runs ``MatchRCNN.detect`` on every device of a mesh, in two stages (the
boxes, then the mask, landmark and matching heads on the first K detections only, K the
smallest of ``HEAD_SLOTS`` and ``detections_per_image`` that holds them): the one inference
path that the evaluation, ``--mode predict``, the retrieval tool and the ``Predictor`` share
(``config.eval.batch_size`` images per device; a short batch is padded). Each image is resized
as the evaluation resizes it (``config.data.short_side``/``max_size``:
``transforms.encode_pixels``) and padded onto the smallest canvas of
``config.data.bucket_canvases`` + ``canvas`` that holds it; images are grouped by canvas (one
compiled program per canvas). ``Predictor`` returns the detections in the original image's
pixels (``postprocess``).

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

from data_pipeline import transforms
from data_pipeline.images import read_image, read_windows  # the API's readers
from df2_jax import checkpoint, parallel, postprocess
from df2_jax.config import run_config
from df2_jax.errors import Df2Error
from df2_jax.models.match_rcnn import MatchRCNN, init_variables, model_from_config

__all__ = ["Detector", "HEAD_SLOTS", "NonFiniteParams", "Predictor", "Run", "check_finite",
           "expected_variables", "head_slots_for", "jitted_detect", "jitted_stages", "load_run",
           "load_variables", "read_image"]



class NonFiniteParams(Df2Error, FloatingPointError):
  """A checkpoint's params hold NaN or inf (its run diverged before it was saved)."""


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


def expected_variables(config) -> dict[str, Any]:
  """ShapeDtypeStructs of ``{"params", "constants"}`` that ``config``'s model has (traced,
  nothing computed)."""
  model = model_from_config(config)
  geometry = transforms.geometry_from_config(config.data)
  shapes = jax.eval_shape(functools.partial(init_variables, model, jax.random.key(0),
                                            transforms.zero_train_batch(geometry, 1)))
  return {k: shapes[k] for k in ("params", "constants") if k in shapes}


def load_variables(workdir: str, *, checkpoint_dir: str | None = None,
                   step: int | None = None, config=None) -> tuple[dict[str, Any], int]:
  """``({"params", "constants"}, step)`` of a checkpoint of ``checkpoint_dir`` (default
  ``workdir/checkpoints``; the latest step by default), params only: no optimizer state is
  read, so a directory copied to another machine works.

  With ``config``, the saved shapes are compared with the config's model first: a checkpoint
  of another config raises ``run_config.RunMismatch`` (one line naming the run's config) before any
  array is read.

  Raises:
    checkpoint.NoCheckpoint: no checkpoint (of ``step``) there.
    run_config.RunMismatch: the checkpoint's arrays do not fit ``config``'s model.
    checkpoint.ChecksumError: a file of the checkpoint changed since it was saved.
  """
  directory = checkpoint_dir or os.path.join(workdir, "checkpoints")
  if step is None:  # read-only: a missing folder is not created
    step = checkpoint.latest_step(directory)
    if step is None:
      raise checkpoint.NoCheckpoint(f"no checkpoint in {directory}")
  expected = expected_variables(config) if config is not None else None
  try:
    params, constants = checkpoint.restore_params(directory, step, expected=expected)
  except checkpoint.ConfigMismatch as e:
    own = not checkpoint_dir or os.path.abspath(checkpoint_dir) == os.path.abspath(
        os.path.join(workdir, "checkpoints"))
    stored = run_config.stored_for(directory, checkpoint.read_extra(directory, step),
                                   workdir if own else None)
    raise run_config.RunMismatch(run_config.mismatch_line(
        workdir if own else directory, stored, config, e.differences)) from None
  return jax.device_put({"params": params, "constants": constants}), int(step)


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
    checkpoint.NoCheckpoint: no such folder, no checkpoint in it, no checkpoint of ``step``.
    run_config.NoSavedConfig: the checkpoint has no saved config, and none was given.
    run_config.RunMismatch: the checkpoint's arrays do not fit the config's model.
    checkpoint.ChecksumError: a file of the checkpoint changed since it was saved.
  """
  if config is None:
    try:
      config, directory, step = run_config.saved_config(path, step)
    except run_config.NoSavedConfig as e:
      raise run_config.NoSavedConfig(f"{e}: load_run(path, config=...)") from None
  else:
    directory, step = checkpoint.find_step(path, step)
    if not isinstance(config, ml_collections.ConfigDict):
      config = run_config.config_from_json(config)
  model = model_from_config(config)
  variables, step = load_variables(os.path.dirname(directory), checkpoint_dir=directory,
                                   step=step, config=config)
  return Run(config=config, model=model, variables=variables, step=int(step),
             checkpoint_dir=directory)


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


# The numbers of detections the heads run on (inference.Detector; and detections_per_image):
# each is one compiled heads program per canvas, the smallest that holds a batch's valid
# detections is used. A trained model keeps a few garments per photo.
HEAD_SLOTS = (8, 32)


def head_slots_for(num_valid: int, detections_per_image: int) -> int:
  """The heads' slots for a batch whose images have at most ``num_valid`` valid detections:
  the smallest of ``HEAD_SLOTS`` and ``detections_per_image`` that holds them."""
  for k in HEAD_SLOTS:
    if num_valid <= k < detections_per_image:
      return k
  return int(detections_per_image)


@functools.lru_cache(maxsize=4)
def jitted_stages(model: MatchRCNN, mesh) -> tuple[Any, Any]:
  """(boxes, heads) of ``model`` on every device of ``mesh`` (``parallel.per_device``):
  ``boxes(variables, images, image_hw)`` runs ``MatchRCNN.detect_boxes``;
  ``heads(k)(variables, features, boxes, classes)`` runs ``MatchRCNN.detect_heads`` on the
  first k of the D detections and returns its outputs padded with zero rows to D (one
  program per k, built once)."""
  boxes = parallel.per_device(
      lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect_boxes), mesh, 2)

  def heads_fn(k, v, features, det_boxes, classes):
    out = model.apply(v, features, det_boxes[:, :k], classes[:, :k],
                      method=MatchRCNN.detect_heads)
    d = det_boxes.shape[1]
    return {name: jnp.pad(a, [(0, 0), (0, d - k)] + [(0, 0)] * (a.ndim - 2))
            for name, a in out.items()}

  heads = functools.lru_cache(maxsize=None)(
      lambda k: parallel.per_device(functools.partial(heads_fn, k), mesh, 3))
  return boxes, heads


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
  """Raises ``NonFiniteParams`` naming the tensors of ``variables`` that hold NaN or inf (a
  diverged run's params would evaluate to AP 0 without a word)."""
  floats = {jax.tree_util.keystr(path): leaf for path, leaf in
            jax.tree_util.tree_leaves_with_path(variables)
            if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jnp.floating)}
  ok = jax.device_get(parallel.one_replica(_finite_leaves(floats)))
  bad = sorted(k for k, v in ok.items() if not bool(v))
  if bad:
    raise NonFiniteParams(
        f"{what} hold non-finite values in {len(bad)} of {len(floats)} tensors (e.g. "
        f"{', '.join(bad[:3])}): the run diverged before this checkpoint; evaluate an earlier "
        f"step (--step) instead.")


class Detector:
  """The one inference path: ``MatchRCNN.detect`` of a model's variables on every device of a
  mesh, over decoded images, in two stages (``dispatch``): the heads run on the detections
  that exist, in one of a few fixed sizes, so a photo with a few garments costs little more
  than its boxes, and each canvas has a fixed set of programs. ``Predictor``, ``--mode
  predict`` (``predict``), the retrieval tool (``retrieval.GarmentFinder``) and the
  evaluation (``evaluator.run_detection``, on the input pipeline's encoded batches) all run
  through it.

  Each image is resized as the evaluation resizes it (``config.data.short_side``/``max_size``:
  ``transforms.encode_pixels``) and padded onto a canvas of ``config.data.canvas`` and
  ``bucket_canvases`` (``canvas_for``); ``config.eval.batch_size`` images per device of this
  process make a batch, a short one padded with blank images (which detect nothing). ``detect``
  puts each image on the smallest canvas that holds it, the rule of the evaluation's input
  pipeline, so an image's detections depend on the image alone (not on the other images of a
  call) and every path gives the same numbers. The canvas does matter a little: the padding's
  features are not zero after the first layer, and where the canvas ends the convolutions'
  zero padding takes over, so features near the content's right or bottom border differ
  between canvases (measured: docs/EXPERIMENTS.md); RoIs there sample those features, as in
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
    self.config = config
    self.geometry = transforms.geometry_from_config(config.data)
    self.spec = self.geometry.spec  # the run's dataset spec (names, ids, landmark layout)
    self.model = model if model is not None else model_from_config(config)
    self.mesh = mesh if mesh is not None else parallel.make_mesh()
    self.variables = parallel.replicate(variables, self.mesh)
    check_finite(self.variables)
    self._detect, self._embed = jitted_detect(self.model, self.mesh)
    self._boxes, self._heads = jitted_stages(self.model, self.mesh)
    processes = {d.process_index for d in self.mesh.devices.flat}
    local = sum(d.process_index == jax.process_index() for d in self.mesh.devices.flat)
    self.spans_processes = len(processes) > 1
    self.detections_per_image = int(config.model.detections_per_image)
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
      stacked["image"][j], stacked["image_hw"][j], _ = transforms.encode_pixels(
          pixels, self.geometry, canvas, name=f"image {j}")
    return stacked

  def dispatch(self, batch: Mapping[str, np.ndarray], *, embed_boxes: bool = False
               ) -> tuple[Any, Any]:
    """Starts ``detect`` on one batch (this process's ``image``, ``image_hw`` and, with
    ``embed_boxes``, ``boxes``, whose embeddings ``MatchRCNN.embed`` computes as well) and
    returns (detections, box embeddings or None) as global arrays: ``fetch`` them.

    In two stages (``MatchRCNN.detect_boxes``, then ``detect_heads`` on the first K
    detections of each image, K the smallest of ``HEAD_SLOTS`` and D that holds the batch's
    valid detections; the other rows of masks, landmarks and embeddings are zero): the
    first stage is awaited, the heads are not. One program per canvas and per K. On a mesh
    of several processes, one program with the heads on all D (every process must run the
    same programs)."""
    keys = ("image", "image_hw") + (("boxes",) if embed_boxes else ())
    x = parallel.host_local_to_global({k: batch[k] for k in keys}, self.mesh)
    if self.spans_processes:  # every process must run the same programs: heads on all D
      out = self._detect(self.variables, x["image"], x["image_hw"])
    else:
      out = self._boxes(self.variables, x["image"], x["image_hw"])
      features = out.pop("features")
      # Waits for the first stage: the heads' size depends on how many detections it found.
      most = int(np.max(np.sum(jax.device_get(out["valid"]), axis=1), initial=0))
      k = head_slots_for(most, self.detections_per_image)
      out.update(self._heads(k)(self.variables, features, out["boxes"], out["classes"]))
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
    self.spec = self.detector.spec  # the run's dataset spec: its categories' names and ids
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

    Each dict holds the valid detections only, N of them, in the image's pixels
    (``postprocess.image_detections``): ``boxes`` [N, 4] float32 (x1, y1, x2, y2), ``scores``
    [N], ``classes`` [N] int32 (the run's classes 1..C), ``category_ids`` (the dataset's own
    ids), ``names`` (N category names: the run's dataset spec, ``self.spec``; DeepFashion2's
    COCO names for a DeepFashion2 run), ``masks`` ([N, H, W] bool with
    ``mask_format="bitmap"``; N COCO RLEs ``{"size": [H, W], "counts": str}`` with "rle";
    absent with None), ``landmarks`` (N float32
    arrays [K, 3]: x, y, score of the detection's own category's K landmarks, x and y as the
    annotations' pixel indices), ``embeddings`` [N, D] float32 (for ``match``) and
    ``image_hw`` (H, W).
    """
    if mask_format not in postprocess.MASK_FORMATS:
      raise ValueError(f"mask_format must be one of {postprocess.MASK_FORMATS}, got "
                       f"{mask_format!r}")
    single = isinstance(images, np.ndarray) and images.ndim == 3
    arrays = [_check_image(x, i) for i, x in enumerate([images] if single else list(images))]
    results = [postprocess.image_detections(out, out["image_hw"], pixels.shape[:2], mask_format,
                                            spec=self.spec)
               for pixels, out in zip(arrays, self.detector.detect(arrays))]
    return results[0] if single else results

  def predict_files(self, paths: Sequence[str | os.PathLike], *,
                    mask_format: str | None = "bitmap", exif_transpose: bool = True,
                    skipped: list[dict] | None = None) -> list[dict[str, Any]]:
    """``self(...)`` of image files (``images.read_image``: upright by their EXIF orientation
    unless ``exif_transpose`` is False), a few batches' files in memory at a time; each dict
    also holds its ``path``. A file that cannot be decoded raises ``records.DataError``, or,
    with ``skipped`` (a list), is left out and appended to it as ``{"path", "error"}``."""
    out = []
    for window in read_windows(paths, self.batch_size * 4, skipped=skipped,
                               exif_transpose=exif_transpose):
      results = self([pixels for _, _, pixels in window], mask_format=mask_format)
      for (_, path, _), r in zip(window, results):
        r["path"] = path
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
