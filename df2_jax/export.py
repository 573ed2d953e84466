r"""A trained Match R-CNN's detector as serialized ``jax.export`` programs, run without the model code.

  python -m df2_jax.export --workdir W --out DIR [--step N] [--batch B] [--platforms cpu,cuda]

writes into DIR (replaced whole or not at all):

* ``detect_<H>x<W>.jaxexport``: ``MatchRCNN.detect`` for one canvas H x W and a fixed batch B,
  serialized by ``jax.export`` (``Exported.serialize``: StableHLO in JAX's versioned container,
  with the input and output pytrees). One per canvas: ``config.data.bucket_canvases`` (if any)
  and ``config.data.canvas``, each shape its own program as in evaluation.
* ``weights.npz``: the variables ("params" and "constants"), one ``tNNNNN`` array per tensor in
  the programs' argument order (names, shapes and dtypes in the manifest; a dtype numpy has no
  name for, e.g. bfloat16, stored as the unsigned integers of its bits).
* ``manifest.json`` (written last): see ``build_manifest``: the format version, the jax version
  and platforms exported for, each canvas's file and sha256, the inputs and outputs (names,
  shapes, dtypes), the preprocessing, the category names and the landmark layout.

``load(DIR)`` returns an ``ExportedDetector``: ``detector(images, image_hw)`` runs the artifact
of the images' canvas and returns detect's dict as numpy arrays; it needs only jax and numpy
(``jax.export.deserialize``), not this project. Any number of images: they are run B at a
time, the last batch padded with empty images whose outputs are dropped.

The variables are arguments of the programs, not constants baked into them. Baked, every
canvas's file would carry its own copy of the weights (3 x 266 MB for the 1x R50 recipe), and
XLA would compile and constant-fold programs with tens of millions of constant elements (slow,
and near the 2 GB protobuf limit for bigger models). As arguments, one ``weights.npz`` serves
every canvas, the programs stay at a few MB (4.6 to 7.5 MB for the 1x recipe), ``load`` checks every tensor's shape and dtype
against the programs' and the files' sha256 against the manifest, and the weights are put on
the device once at load; serving then is the same single call as with baked weights.

Platforms: ``cpu`` and ``cuda`` by default (``--platforms``). One serialized program holds
the lowering for each (``jax.export.export(..., platforms=...)``); the platform is chosen when
it runs. Lowering needs no GPU: a CPU-only machine exports the cuda program too (the tests,
CPU-only, check that it is produced and that the cpu one runs; not the cuda one on a GPU).

Not supported:

* A variable batch size: B is fixed (``--batch``, default ``config.eval.batch_size``); ``load``
  pads and splits. Symbolic batch shapes were not attempted (detect's top-k and NMS sizes).
* Canvases other than the exported ones: ``load`` refuses them naming those it has.
* ONNX: there is no converter from StableHLO to ONNX; the RoI align, NMS and landmark decoding
  would need hand-written ONNX operators.
* TensorFlow SavedModel: not done. ``jax2tf`` (native serialization) would only wrap this same
  StableHLO in a TF ``XlaCallModule`` op, which needs TensorFlow with XLA to run (no gain for
  TF Lite or TF.js), and TensorFlow is not installed on the GPU machine.
* Gradients (no VJP is serialized), ``MatchRCNN.embed`` and ``match_logits`` (the match scorer
  is two small matrix products; its weights are in ``weights.npz`` under ``params/scorer``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import sys
from typing import Any, Sequence

import jax
import numpy as np

from df2_jax import errors
from df2_jax.errors import Df2Error

log = logging.getLogger(__name__)

FORMAT = "df2_jax.export"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.npz"
DEFAULT_PLATFORMS = ("cpu", "cuda")
KNOWN_PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
INPUTS = ("images", "image_hw")
# MatchRCNN.detect's outputs with their meaning (the manifest's "outputs").
OUTPUT_MEANINGS = {
    "boxes": "x1, y1, x2, y2 on the canvas (content coordinates); 0 where not valid",
    "scores": "class probability; 0 where not valid",
    "classes": "class 1..C (see categories: the dataset's own id and name); 0 where not valid",
    "valid": "whether the detection slot holds a detection",
    "masks": "28 x 28 foreground probabilities in the box's frame (paste them into the box)",
    "landmarks": "x, y (continuous canvas coordinates: a pixel index + 0.5), score of every "
                 "landmark of the dataset (DeepFashion2: 294); only the detection's category "
                 "slice is filled (landmark_slices)",
    "embeddings": "the matching head's embedding of the detection (retrieval)",
}


class ExportError(Df2Error, RuntimeError):
  """An export that cannot be written, or a folder that cannot be loaded: one line."""


def artifact_name(canvas_hw: tuple[int, int]) -> str:
  return f"detect_{int(canvas_hw[0])}x{int(canvas_hw[1])}.jaxexport"


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 22), b""):
      digest.update(chunk)
  return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Export.

def _flat_variables(variables: Any) -> tuple[list[str], list[np.ndarray], Any]:
  """(names, host arrays, treedef) of the "params" and "constants" of ``variables``, in the
  order the programs take them."""
  tree = {k: variables[k] for k in ("params", "constants") if k in variables}
  if "params" not in tree:
    raise ExportError(f"the variables have no 'params' collection (have {sorted(variables)})")
  with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
           for path, _ in with_path]
  arrays = [np.asarray(jax.device_get(leaf)) for _, leaf in with_path]
  bad = [n for n, a in zip(names, arrays)
         if (np.issubdtype(a.dtype, np.inexact) or a.dtype.kind == "V")
         and not np.all(np.isfinite(a.astype(np.float32)))]
  if bad:
    raise ExportError(f"the variables hold NaN or inf in {len(bad)} tensors (e.g. "
                      f"{', '.join(bad[:3])}): the run diverged before this checkpoint; export "
                      f"an earlier step")
  return names, arrays, treedef


def _storable(array: np.ndarray) -> np.ndarray:
  """``array`` as numpy can save it without pickling: a dtype numpy has no name for (e.g.
  bfloat16, an ml_dtypes extension type) as the unsigned integers of its bits."""
  if array.dtype.kind in "biuf" and array.dtype.name in np.sctypeDict:
    return array
  return array.view(np.dtype(f"u{array.dtype.itemsize}"))


def _spec(aval) -> dict[str, Any]:
  return {"shape": [int(d) for d in aval.shape], "dtype": np.dtype(aval.dtype).name}


def canvases_of(config) -> list[tuple[int, int]]:
  """The canvases evaluation uses: the bucket canvases by increasing area, then
  ``config.data.canvas`` (``transforms.ImageGeometry.canvases``)."""
  from data_pipeline.transforms import geometry_from_config
  return [tuple(int(v) for v in c) for c in geometry_from_config(config.data).canvases]


def export_detect(model, variables: Any, canvas_hw: tuple[int, int], batch_size: int,
                  platforms: Sequence[str] = DEFAULT_PLATFORMS) -> jax.export.Exported:
  """``MatchRCNN.detect`` of ``model`` for [batch_size, H, W, 3] uint8 images and
  [batch_size, 2] int32 image_hw, the flat variables (``_flat_variables`` order, a tuple) its
  first argument: ``exported.call(weights, images, image_hw)``."""
  _, arrays, treedef = _flat_variables(variables)
  return _export_flat(model, arrays, treedef, canvas_hw, batch_size, platforms)


def _export_flat(model, arrays: list[np.ndarray], treedef: Any, canvas_hw: tuple[int, int],
                 batch_size: int, platforms: Sequence[str]) -> jax.export.Exported:
  from df2_jax.models.match_rcnn import MatchRCNN

  def detect(weights, images, image_hw):
    return model.apply(jax.tree_util.tree_unflatten(treedef, list(weights)), images, image_hw,
                       method=MatchRCNN.detect)

  h, w = (int(v) for v in canvas_hw)
  specs = (tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
           jax.ShapeDtypeStruct((batch_size, h, w, 3), np.uint8),
           jax.ShapeDtypeStruct((batch_size, 2), np.int32))
  try:
    return jax.export.export(jax.jit(detect), platforms=tuple(platforms))(*specs)
  except Exception as e:  # a lowering rule missing for one of the platforms
    raise ExportError(f"exporting detect for canvas {h}x{w} and platforms {list(platforms)} "
                      f"failed: {type(e).__name__}: {e}") from e


def build_manifest(config, exported: dict[tuple[int, int], jax.export.Exported],
                   names: list[str], arrays: list[np.ndarray], batch_size: int,
                   checksums: dict[str, str], source: dict[str, Any]) -> dict[str, Any]:
  """The manifest of an export (``manifest.json``)."""
  from data_pipeline import spec as spec_lib
  spec = spec_lib.from_config(config)
  canvases = list(exported)
  max_canvas = [int(v) for v in config.data.canvas]
  first = exported[canvases[0]]
  artifacts = []
  for canvas in canvases:
    exp = exported[canvas]
    in_avals = exp.in_avals[len(arrays):]
    out = jax.tree_util.tree_unflatten(exp.out_tree, exp.out_avals)
    artifacts.append({
        "canvas_hw": list(canvas),
        "file": artifact_name(canvas),
        "sha256": checksums[artifact_name(canvas)],
        "inputs": [dict(name=n, **_spec(a)) for n, a in zip(INPUTS, in_avals)],
        "outputs": [dict(name=k, **_spec(out[k])) for k in OUTPUT_MEANINGS if k in out],
    })
  return {
      "format": FORMAT,
      "format_version": FORMAT_VERSION,
      "function": "df2_jax.models.match_rcnn.MatchRCNN.detect",
      "jax_version": jax.__version__,
      "calling_convention_version": int(first.calling_convention_version),
      "platforms": list(first.platforms),
      "batch_size": int(batch_size),
      # The exported program is MatchRCNN.detect in one program: the mask, landmark and
      # matching heads run on every one of the detections_per_image slots (the Detector of
      # df2_jax.inference runs them on the first K only, in a second program).
      "head_slots": int(config.model.detections_per_image),
      "source": source,
      "canvases": [list(c) for c in canvases],
      "artifacts": artifacts,
      "call": "exported.call(weights, images, image_hw): weights the tuple of weights.npz's "
              "arrays t00000, t00001, ... in order; returns a dict of the outputs",
      "weights": {
          "file": WEIGHTS,
          "sha256": checksums[WEIGHTS],
          "tensors": [{"key": f"t{i:05d}", "name": n, "shape": list(a.shape),
                       "dtype": a.dtype.name} for i, (n, a) in enumerate(zip(names, arrays))],
      },
      "inputs": {
          "images": "uint8 [B, H, W, 3] RGB, each image resized (see preprocessing) and put at "
                    "the top-left of the H x W canvas; the rest of the canvas any value",
          "image_hw": "int32 [B, 2]: each image's resized height and width on the canvas "
                      "(0, 0 for an empty slot: no detections)",
      },
      "outputs": OUTPUT_MEANINGS,
      "preprocessing": {
          "color": "RGB, uint8; no normalisation: the model subtracts the ImageNet mean and "
                   "divides by the std itself, and sees the padding as the mean",
          "short_side": int(config.data.short_side),
          "max_size": int(config.data.max_size),
          "max_canvas_hw": max_canvas,
          "scale": "s = short_side / min(h, w); if max(h, w) * s > max_size: "
                   "s = max_size / max(h, w); s = min(s, max_canvas_hw[0] / h, "
                   "max_canvas_hw[1] / w)",
          "resized_hw": "(min(max(round(h * s), 1), max_canvas_hw[0]), "
                        "min(max(round(w * s), 1), max_canvas_hw[1])) with Python's round "
                        "(halves to even)",
          "interpolation": "OpenCV INTER_AREA when s < 1, INTER_LINEAR otherwise (training "
                           "and evaluation resize so)",
          "canvas": "the first of 'canvases' (by increasing area, the largest last) whose "
                    "height and width hold every resized image of the batch",
          "padding": "top-left: canvas[:rh, :rw] = resized image; image_hw = (rh, rw)",
          "to_original": "boxes and landmark x times w / rw, y times h / rh; landmark pixel "
                         "indices (as annotated) = continuous coordinates - 0.5",
      },
      # The output classes 1..C: the dataset's own id, the name (DeepFashion2's raw name for
      # its categories) and the COCO name; their landmark channels [start, stop). The whole
      # spec (flip pairs, OKS sigmas, landmark names) is the config's data.spec.
      "dataset": spec.name,
      "spec": json.loads(json.dumps(spec.to_dict())),  # lists, as the file reads back
      "categories": {str(c): {"id": int(spec.original_ids[c]),
                              "name": spec.raw_name(c) or spec.class_name(c),
                              "coco_name": spec.class_name(c)}
                     for c in spec.class_ids},
      "landmark_slices": {str(c): [spec.landmark_slice(c).start, spec.landmark_slice(c).stop]
                          for c in spec.class_ids},
  }


def _is_earlier_export(folder: str) -> bool:
  """An empty folder, or one whose manifest is an export's: what an export may replace."""
  if not os.listdir(folder):
    return True
  try:
    from df2_jax import files
    return files.read_json(os.path.join(folder, MANIFEST)).get("format") == FORMAT
  except (OSError, ValueError, AttributeError):
    return False


def export_model(model, variables: Any, config, out: str, *, batch_size: int | None = None,
                 platforms: Sequence[str] = DEFAULT_PLATFORMS,
                 source: dict[str, Any] | None = None) -> dict[str, Any]:
  """Exports ``model.detect`` with ``variables`` for every canvas of ``config`` into folder
  ``out`` (replaced whole: built in a staging folder beside it, then swapped in); returns the
  manifest. ``batch_size``: default ``config.eval.batch_size``. ``source``: what the manifest
  records as the origin (workdir, step). ``ExportError`` before anything is written for an
  ``out`` that is a file or a folder holding anything but an earlier export, unknown
  platforms, a bad batch size, or variables with NaN/inf."""
  from df2_jax import files
  batch_size = int(config.eval.batch_size if batch_size is None else batch_size)
  if batch_size < 1:
    raise ExportError(f"batch size must be >= 1, got {batch_size}")
  platforms = tuple(dict.fromkeys(p.strip().lower() for p in platforms if p.strip()))
  unknown = [p for p in platforms if p not in KNOWN_PLATFORMS]
  if not platforms or unknown:
    raise ExportError(f"platforms {list(platforms)}: each must be one of {list(KNOWN_PLATFORMS)}")
  target = os.path.realpath(out)
  if os.path.lexists(target) and not os.path.isdir(target):
    raise ExportError(f"--out {out} is a file, not a folder")
  if os.path.isdir(target) and not _is_earlier_export(target):
    raise ExportError(f"--out {out} holds files that are not an earlier export (no {MANIFEST} "
                      f"of format {FORMAT}), and an export replaces the folder whole: choose "
                      f"a new or empty folder (nothing written)")
  names, arrays, treedef = _flat_variables(variables)
  canvases = canvases_of(config)
  lock = files.FolderLock(os.path.join(os.path.dirname(target),
                                       f".{os.path.basename(target)}.lock"),
                          f"export into {target}")
  try:
    lock.acquire()
  except files.Locked as e:
    raise ExportError(f"--out {out} is being written by another export (pid {e.holder})"
                      ) from None
  staging = None
  try:
    files.remove_stale_staging(target)
    staging = files.staging_folder(target)
    exported, checksums = {}, {}
    for canvas in canvases:
      log.info("Exporting detect for canvas %dx%d, batch %d, platforms %s.", *canvas,
               batch_size, ",".join(platforms))
      exp = _export_flat(model, arrays, treedef, canvas, batch_size, platforms)
      path = os.path.join(staging, artifact_name(canvas))
      files.write_bytes(path, bytes(exp.serialize()))
      checksums[artifact_name(canvas)] = _sha256(path)
      exported[canvas] = exp
    weights_path = os.path.join(staging, WEIGHTS)
    files.save_npz(weights_path, compressed=False,
                   **{f"t{i:05d}": _storable(a) for i, a in enumerate(arrays)})
    checksums[WEIGHTS] = _sha256(weights_path)
    manifest = build_manifest(config, exported, names, arrays, batch_size, checksums,
                              dict(source or {}))
    files.write_json(os.path.join(staging, MANIFEST), manifest, indent=1)
    files.swap_in(staging, target)
    staging = None
  except OSError as e:
    if files.is_disk_full(e):
      raise ExportError(files.disk_full_message(os.path.dirname(target))) from e
    raise
  finally:
    if staging is not None:
      shutil.rmtree(staging, ignore_errors=True)
    lock.release()
  log.info("Exported %d canvas(es) into %s.", len(canvases), out)
  return manifest


# ----------------------------------------------------------------------------------------------
# Load: jax and numpy only.

def _read_manifest(folder: str) -> dict[str, Any]:
  import json
  if not os.path.isdir(folder):
    raise ExportError(f"{folder}: no such folder (an export is a folder with {MANIFEST})")
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise ExportError(f"{folder} is not an export: it has no {MANIFEST} (an interrupted export "
                      f"leaves none; run python -m df2_jax.export again)")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ExportError(f"{path} is not a readable manifest: {e}") from None
  if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
    raise ExportError(f"{folder} is not an export: {MANIFEST} is not of format {FORMAT!r}")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ExportError(f"{folder}: export format version {version}, this loader reads "
                      f"{FORMAT_VERSION}")
  return manifest


def _check_file(folder: str, entry: dict[str, Any]) -> str:
  path = os.path.join(folder, entry["file"])
  if not os.path.isfile(path):
    raise ExportError(f"{folder}: {entry['file']} is missing")
  if _sha256(path) != entry["sha256"]:
    raise ExportError(f"{path} does not match the manifest's sha256 (damaged, or from "
                      f"another export)")
  return path


@dataclasses.dataclass
class ExportedDetector:
  """Runs an export's programs: ``detector(images, image_hw) -> {name: np.ndarray}``.

  Attributes:
    manifest: the folder's manifest.json.
    batch_size: B of the programs.
    canvases: the (H, W) canvases exported, by increasing area (the largest last).
  """
  manifest: dict[str, Any]
  batch_size: int
  canvases: tuple[tuple[int, int], ...]
  _exported: dict[tuple[int, int], Any]
  _weights: tuple[Any, ...]
  _calls: dict[tuple[int, int], Any] = dataclasses.field(default_factory=dict)

  def resize_plan(self, height: int, width: int) -> tuple[float, tuple[int, int]]:
    """(scale, (resized height, resized width)) of an image, as the preprocessing says."""
    p = self.manifest["preprocessing"]
    ch, cw = p["max_canvas_hw"]
    scale = p["short_side"] / min(height, width)
    if max(height, width) * scale > p["max_size"]:
      scale = p["max_size"] / max(height, width)
    scale = min(scale, ch / height, cw / width)
    return scale, (max(1, min(ch, int(round(height * scale)))),
                   max(1, min(cw, int(round(width * scale)))))

  def canvas_for(self, resized_hws: Sequence[Sequence[int]]) -> tuple[int, int]:
    """The smallest exported canvas that holds every resized (height, width)."""
    for ch, cw in self.canvases:
      if all(h <= ch and w <= cw for h, w in resized_hws):
        return (ch, cw)
    raise ValueError(f"resized sizes {[tuple(s) for s in resized_hws]} do not fit the largest "
                     f"canvas {self.canvases[-1]}")

  def __call__(self, images: Any, image_hw: Any) -> dict[str, np.ndarray]:
    """Detections of N >= 0 images on one canvas.

    Args:
      images: [N, H, W, 3] uint8, (H, W) one of ``canvases``.
      image_hw: [N, 2] integers, each image's content (height, width) at the top-left.

    Returns:
      detect's outputs (``manifest["outputs"]``), each [N, ...] numpy.
    """
    images = np.asarray(images)
    image_hw = np.asarray(image_hw)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} "
                       f"{list(images.shape)}")
    canvas = tuple(int(v) for v in images.shape[1:3])
    if canvas not in self._exported:
      raise ValueError(f"canvas {canvas[0]}x{canvas[1]} was not exported; this export has "
                       f"{', '.join(f'{h}x{w}' for h, w in self.canvases)} (pad the images "
                       f"onto one of them: see canvas_for)")
    n = images.shape[0]
    if image_hw.shape != (n, 2) or not np.issubdtype(image_hw.dtype, np.integer):
      raise ValueError(f"image_hw must be integers [{n}, 2], got {image_hw.dtype} "
                       f"{list(image_hw.shape)}")
    if n and (np.any(image_hw < 0) or np.any(image_hw > np.array(canvas))):
      raise ValueError(f"image_hw {image_hw.tolist()} outside the {canvas[0]}x{canvas[1]} "
                       f"canvas")
    image_hw = image_hw.astype(np.int32)
    call = self._calls.get(canvas)
    if call is None:
      call = self._calls[canvas] = jax.jit(self._exported[canvas].call)
    b = self.batch_size
    parts = []
    for start in range(0, max(n, 1), b):
      x, hw = images[start:start + b], image_hw[start:start + b]
      k = x.shape[0]
      if k < b:  # empty images (image_hw 0): no detections, dropped below
        x = np.concatenate([x, np.zeros((b - k,) + x.shape[1:], np.uint8)])
        hw = np.concatenate([hw, np.zeros((b - k, 2), np.int32)])
      out = jax.device_get(call(self._weights, x, hw))
      parts.append({name: np.asarray(v)[:k] for name, v in out.items()})
    return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def load(folder: str | os.PathLike, device: Any = None) -> ExportedDetector:
  """The ``ExportedDetector`` of an export folder; its weights put on ``device`` (default:
  jax's default device). ``ExportError`` in one line for a folder that is not an export, an
  export of another format version, a missing or damaged file, a program this jax cannot read,
  or a machine whose platform was not exported for."""
  folder = os.fspath(folder)
  manifest = _read_manifest(folder)
  try:
    platform = jax.export.default_export_platform()
    batch_size = int(manifest["batch_size"])
    artifacts = manifest["artifacts"]
    tensors = manifest["weights"]["tensors"]
    canvases = tuple(tuple(int(v) for v in a["canvas_hw"]) for a in artifacts)
  except (KeyError, TypeError, ValueError) as e:
    raise ExportError(f"{folder}: {MANIFEST} is incomplete ({type(e).__name__}: {e})") from None
  if platform not in manifest.get("platforms", ()):
    raise ExportError(f"{folder} was exported for {manifest.get('platforms')}, not for this "
                      f"machine's {platform}: export again with --platforms including {platform}")
  with np.load(_check_file(folder, manifest["weights"]), allow_pickle=False) as npz:
    weights = []
    for t in tensors:
      array = npz[t["key"]]
      dtype = jax.numpy.dtype(t["dtype"])
      if array.dtype != dtype and array.dtype == _storable(np.zeros(0, dtype)).dtype:
        array = array.view(dtype)  # bfloat16 and the like, stored as their bits
      if array.dtype != dtype:
        raise ExportError(f"{folder}: weight {t['name']} is {array.dtype}, the manifest says "
                          f"{t['dtype']}")
      if list(array.shape) != list(t["shape"]):
        raise ExportError(f"{folder}: weight {t['name']} has shape {list(array.shape)}, the "
                          f"manifest says {t['shape']}")
      weights.append(array)
  exported = {}
  for canvas, entry in zip(canvases, artifacts):
    path = _check_file(folder, entry)
    with open(path, "rb") as f:
      blob = bytearray(f.read())
    try:
      exp = jax.export.deserialize(blob)
    except Exception as e:  # a newer calling convention or serialization version
      raise ExportError(f"{path} cannot be read by jax {jax.__version__} (exported with jax "
                        f"{manifest.get('jax_version')}, calling convention "
                        f"{manifest.get('calling_convention_version')}): {e}") from None
    avals = exp.in_avals
    if len(avals) != len(weights) + 2 or any(
        tuple(a.shape) != w.shape or np.dtype(a.dtype) != w.dtype
        for a, w in zip(avals, weights)):
      raise ExportError(f"{path} takes other weights than {WEIGHTS} holds (another export's "
                        f"file?)")
    if tuple(avals[-2].shape) != (batch_size,) + canvas + (3,):
      raise ExportError(f"{path} takes images {list(avals[-2].shape)}, the manifest says "
                        f"batch {batch_size} on {canvas[0]}x{canvas[1]}")
    exported[canvas] = exp
  device = device if device is not None else jax.devices()[0]
  placed = tuple(jax.device_put(w, device) for w in weights)
  order = sorted(range(len(canvases)), key=lambda i: canvases[i][0] * canvases[i][1])
  return ExportedDetector(manifest, batch_size, tuple(canvases[i] for i in order), exported,
                          placed)


# ----------------------------------------------------------------------------------------------
# Command line.

def _load_run(workdir: str, step: int | None):
  """``inference.load_run``: its refusals (no checkpoint, no saved config, a config that does
  not fit, a damaged checkpoint) are ``Df2Error``s, reported by ``main`` in one line."""
  from df2_jax.inference import load_run
  return load_run(workdir, step=step)


def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m df2_jax.export",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="a training workdir, or a checkpoint directory")
  parser.add_argument("--out", required=True, help="the export folder (replaced whole)")
  parser.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
  parser.add_argument("--batch", type=int,
                      help="images per call (default: the config's eval.batch_size)")
  parser.add_argument("--platforms", default=",".join(DEFAULT_PLATFORMS),
                      help=f"comma-separated, of {', '.join(KNOWN_PLATFORMS)} (default "
                           f"{','.join(DEFAULT_PLATFORMS)})")
  args = parser.parse_args(argv)
  if args.batch is not None and args.batch < 1:
    parser.error(f"--batch must be >= 1, got {args.batch}")
  try:
    run = _load_run(args.workdir, args.step)
    source = {"workdir": os.path.abspath(args.workdir), "step": run.step,
              "checkpoint_dir": str(getattr(run, "checkpoint_dir", "") or "")}
    export_model(run.model, run.variables, run.config, args.out, batch_size=args.batch,
                 platforms=args.platforms.split(","), source=source)
  except Df2Error as e:
    return errors.report(e, log)
  return 0


if __name__ == "__main__":
  # The command's own logging (main() called from Python leaves the caller's alone).
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
  sys.exit(main())
