r"""Consumer-to-shop retrieval as a tool: index a folder of shop photos, then query it by photo.

  python -m df2_jax.retrieval index --workdir runs/demo --images SHOP_DIR --out INDEX_DIR
  python -m df2_jax.retrieval query --index INDEX_DIR --image PHOTO_OR_FOLDER [--top 20]

The contract. A garment is a detection of ``inference.Detector`` (the one inference path)
kept by the evaluation's gallery rule: score >= ``min_score`` after a class-agnostic NMS per
image at ``nms`` (``GarmentFinder``). ``index`` appends one part per call to INDEX_DIR
(``build_index``); a part is built in a staging folder and named in the manifest last, every
file is written atomically, an index folder has one writer at a time (``files.FolderLock``),
and only the index's own model may append to it. ``query`` scores each garment of a photo
against the whole gallery exactly, logit = fc((v_q - v_g)^2) (``GalleryScorer``: a running
top-k over chunks of gallery rows, no approximate index). No TensorFlow; one process, all of
its local devices. The index layout, the query JSON and every flag: docs/OUTPUTS.md and
``--help``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
import sys
from typing import Any, Iterator, Sequence

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from data_pipeline import images
from data_pipeline import spec as spec_lib
from data_pipeline.records import DataError
from df2_jax import errors, files, postprocess, progress
from df2_jax.config import rules, run_config
from df2_jax.errors import Df2Error
from df2_jax.evaluation import retrieval_protocol
from df2_jax.evaluation import visualize

log = logging.getLogger(__name__)

FORMAT = "df2-jax-retrieval-index"
VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = {"embeddings": np.float32, "boxes": np.float32, "classes": np.int32,
          "scores": np.float32, "image": np.int32}
DEFAULT_CHUNK = 8192  # gallery rows per product (chunk sizes timed: docs/PERFORMANCE.md)


class IndexFolderError(Df2Error, ValueError):
  """An index folder that cannot be used as asked (named, with the reason)."""


# ---------------------------------------------------------------------------------------------
# Detection of the garments of image files.


@dataclasses.dataclass
class Garments:
  """The garments found in one image: the detections kept by the gallery rule."""
  path: str
  height: int
  width: int
  boxes: np.ndarray  # [n, 4] float32, original pixels
  classes: np.ndarray  # [n] int32
  scores: np.ndarray  # [n] float32
  embeddings: np.ndarray  # [n, D] float32
  pixels: np.ndarray | None = None  # [H, W, 3] uint8 RGB, when asked for


def image_files(path: str, source: str | None = None) -> list[str]:
  """``path`` itself when it is a file, else the images of the folder (sorted, not recursive:
  .jpg, .jpeg, .png in any case). With ``source`` ("shop" or "user") only the images whose
  DeepFashion2 annotation (``../annos/<stem>.json`` beside the image folder) has that
  "source"."""
  if os.path.isfile(path):
    paths = [os.path.abspath(path)]
  elif os.path.isdir(path):
    paths = [os.path.abspath(os.path.join(path, n)) for n in images.image_names(path)]
  else:
    raise FileNotFoundError(f"{path}: no such image file or folder")
  if source is None:
    return paths
  kept = []
  for p in paths:
    anno = os.path.join(os.path.dirname(os.path.dirname(p)), "annos",
                        os.path.splitext(os.path.basename(p))[0] + ".json")
    try:
      with open(anno) as f:
        found = json.load(f).get("source")
    except (OSError, json.JSONDecodeError) as e:
      raise FileNotFoundError(f"{anno}: cannot read the annotation of {p} for --source "
                              f"({e})") from None
    if found == source:
      kept.append(p)
  return kept


def garment_rows(found: dict[str, Any], *, min_score: float, nms: float) -> np.ndarray:
  """The rows of an image's detections (``postprocess.image_detections``: ``boxes``,
  ``scores``) that are garments by the gallery rule (``retrieval_protocol.dedupe_gallery``:
  score >= ``min_score``, class-agnostic NMS at ``nms``), best first: [n] int64."""
  dets = [dict(image_id=0, bbox=box.tolist(), score=float(score), row=n)
          for n, (box, score) in enumerate(zip(found["boxes"], found["scores"]))]
  kept = retrieval_protocol.dedupe_gallery(dets, nms, min_score)
  kept.sort(key=lambda d: -d["score"])
  return np.array([d["row"] for d in kept], np.int64)


class GarmentFinder:
  """The garments of image files (``garments``): ``inference.Detector`` (the one inference
  path, on every local device) and ``postprocess.image_detections``, then the gallery rule
  (``retrieval_protocol.dedupe_gallery``: score >= ``min_score``, class-agnostic NMS at ``nms``)."""

  # Images decoded and detected together (grouped by canvas), in batches of the detector.
  WINDOW_BATCHES = 4

  def __init__(self, config, variables: Any, *, min_score: float, nms: float):
    from df2_jax import inference
    if jax.process_count() > 1:
      raise RuntimeError("df2_jax.retrieval runs as one process (on all of its devices)")
    self.detector = inference.Detector(config, variables)
    self.batch_size = self.detector.batch_size
    self.min_score, self.nms = float(min_score), float(nms)

  def garments(self, paths: Sequence[str], *, keep_pixels: bool = False,
               skipped: list[dict] | None = None, progress_label: str | None = None
               ) -> Iterator[Garments]:
    """The garments of every readable file of ``paths``, in order (each image upright by its
    EXIF orientation, ``WINDOW_BATCHES`` batches' files decoded at a time while the device
    detects the previous ones: ``images.read_windows``). A file that cannot be decoded is
    logged, appended to ``skipped`` ({path, error}) and left out. With ``progress_label`` a
    log line with the rate and the time left is written about every 10 s
    (``progress.Progress``)."""
    counter = progress.Progress(len(paths), progress_label or "", every_s=10.0)
    done = 0
    for n, window in enumerate(images.read_windows(
        paths, self.batch_size * self.WINDOW_BATCHES,
        skipped=skipped if skipped is not None else [])):
      yield from self._garments([(path, pixels) for _, path, pixels in window], keep_pixels)
      done = min(len(paths), (n + 1) * self.batch_size * self.WINDOW_BATCHES)
      if progress_label:
        counter.update(done, final=True)

  def _garments(self, loaded: list[tuple[str, np.ndarray]], keep_pixels: bool
                ) -> Iterator[Garments]:
    if not loaded:
      return
    outs = self.detector.detect([pixels for _, pixels in loaded])
    for (path, pixels), out in zip(loaded, outs):
      h, w = pixels.shape[:2]
      found = postprocess.image_detections(out, out["image_hw"], (h, w), masks=None,
                                           spec=self.detector.spec)
      take = garment_rows(found, min_score=self.min_score, nms=self.nms)
      n = len(take)
      yield Garments(
          path=path, height=int(h), width=int(w),
          boxes=found["boxes"][take].reshape(n, 4),
          classes=found["classes"][take].reshape(n),
          scores=found["scores"][take].reshape(n),
          embeddings=found["embeddings"][take].reshape(n, -1),
          pixels=pixels if keep_pixels else None)


# ---------------------------------------------------------------------------------------------
# The index on disk.


class GalleryIndex:
  """An index folder, read: its manifest and its parts' arrays (memory-mapped)."""

  def __init__(self, directory: str):
    self.directory = directory
    path = os.path.join(directory, MANIFEST)
    try:
      with open(path) as f:
        self.manifest = json.load(f)
    except FileNotFoundError:
      raise FileNotFoundError(f"{path}: no retrieval index here (build one with "
                              f"'python -m df2_jax.retrieval index ... --out {directory}')"
                              ) from None
    except json.JSONDecodeError as e:
      raise IndexFolderError(f"{path}: not JSON ({e})") from None
    if self.manifest.get("format") != FORMAT:
      raise IndexFolderError(f"{path}: field 'format' is {self.manifest.get('format')!r}, not "
                        f"{FORMAT!r}")
    if self.manifest.get("version") != VERSION:
      raise IndexFolderError(f"{path}: field 'version' is {self.manifest.get('version')!r}; this "
                        f"code reads version {VERSION}")
    self.parts = [p["name"] for p in self.manifest["parts"]]
    # The run's dataset spec (its categories' ids and names), from the config it was built with.
    self.spec = spec_lib.from_config(run_config.config_from_json(self.manifest["config"]))
    self._arrays: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
    for name in self.parts:
      for key in ARRAYS:
        self._arrays[key].append(np.load(os.path.join(directory, name, f"{key}.npy"),
                                         mmap_mode="r", allow_pickle=False))
    sizes = [len(a) for a in self._arrays["embeddings"]]
    self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    if int(self.offsets[-1]) != int(self.manifest["items"]):
      raise IndexFolderError(f"{path}: field 'items' says {self.manifest['items']} but the parts "
                        f"hold {int(self.offsets[-1])}")
    self._images: dict[int, list[dict]] = {}

  def __len__(self) -> int:
    return int(self.offsets[-1])

  @property
  def embed_dim(self) -> int:
    return int(self.manifest["embed_dim"])

  def array(self, key: str) -> np.ndarray:
    """One array over all parts ([N, ...]; a copy when there are several parts)."""
    parts = self._arrays[key]
    if len(parts) == 1:
      return parts[0]
    if not parts:
      shape = (0, self.embed_dim) if key == "embeddings" else (0, 4) if key == "boxes" else (0,)
      return np.zeros(shape, ARRAYS[key])
    return np.concatenate(parts)

  def part_images(self, part: int) -> list[dict]:
    if part not in self._images:
      with open(os.path.join(self.directory, self.parts[part], "images.json")) as f:
        self._images[part] = json.load(f)["images"]
    return self._images[part]

  def indexed_paths(self) -> set[str]:
    return {im["path"] for p in range(len(self.parts)) for im in self.part_images(p)}

  def item(self, i: int) -> dict[str, Any]:
    """Gallery item ``i``: {index, image, box, category_id, category, detection_score}."""
    part = int(np.searchsorted(self.offsets, i, side="right") - 1)
    row = int(i - self.offsets[part])
    a = {k: v[part] for k, v in self._arrays.items()}
    cls = int(a["classes"][row])
    return {"index": int(i), "image": self.part_images(part)[int(a["image"][row])]["path"],
            "box": [round(float(v), 2) for v in a["boxes"][row]],
            "category_id": int(self.spec.original_ids[cls]),
            "category": self.spec.class_name(cls),
            "detection_score": round(float(a["scores"][row]), 4)}

  def check_model(self, variables: Any, what: str) -> None:
    """Raises ``IndexFolderError`` unless ``variables`` (``what``, named in the error) hold the
    scorer this index was built with: a query of another model's embeddings is meaningless."""
    stored = self.scorer_params()
    got = {k: np.asarray(v, np.float32) for k, v in variables["params"]["scorer"].items()}
    if not (np.array_equal(stored["kernel"], got["kernel"])
            and np.array_equal(stored["bias"], got["bias"])):
      raise IndexFolderError(f"{what} is not the one {self.directory} was built with (their "
                             f"scorers differ)")

  def scorer_params(self) -> dict[str, np.ndarray]:
    s = self.manifest["scorer"]
    return {"kernel": np.asarray(s["kernel"], np.float32),
            "bias": np.asarray(s["bias"], np.float32)}


def _config_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def _model_identity(config_json: dict) -> dict:
  """What must agree for two embeddings to be comparable: the model and the image geometry."""
  model = {k: v for k, v in config_json["model"].items()
           if k not in ("backbone_weights", "init_from", "init_from_step")}
  data = {k: config_json["data"][k] for k in ("canvas", "short_side", "max_size")}
  # The canvases an image may be padded onto.
  data["bucket_canvases"] = [list(c) for c in config_json["data"]["bucket_canvases"]]
  return {"model": model, "data": data}


def build_index(config, variables: Any, image_dir: str, out_dir: str, *, checkpoint_dir: str,
                step: int, min_score: float | None = None, nms: float | None = None,
                source: str | None = None) -> dict[str, Any]:
  """Indexes the images of ``image_dir`` (those of ``source``, see ``image_files``) into
  ``out_dir`` (a new index, or a new part of an existing one). Returns the manifest written."""
  scorer = {k: np.asarray(v, np.float32) for k, v in variables["params"]["scorer"].items()}
  manifest_path = os.path.join(out_dir, MANIFEST)
  existing = GalleryIndex(out_dir) if os.path.exists(manifest_path) else None
  config_json = _config_json(config)
  if existing is not None:
    m = existing.manifest
    if (_model_identity(run_config.upgrade(m["config"])) != _model_identity(config_json)
        or int(m["step"]) != step):
      raise IndexFolderError(
          f"{out_dir} was built by another model (step {m['step']} of {m['checkpoint_dir']}); "
          f"its embeddings cannot be compared with this one's: index into a new folder")
    old = existing.scorer_params()
    if not (np.array_equal(old["kernel"], scorer["kernel"])
            and np.array_equal(old["bias"], scorer["bias"])):
      raise IndexFolderError(f"{out_dir} was built by another checkpoint (its scorer "
                             f"differs): index into a new folder")
    min_score = float(m["min_score"]) if min_score is None else min_score
    nms = float(m["nms"]) if nms is None else nms
    if (min_score, nms) != (float(m["min_score"]), float(m["nms"])):
      raise IndexFolderError(f"{out_dir} keeps detections with min_score {m['min_score']} and "
                             f"nms {m['nms']}; appending must use the same")
    manifest = m
    done = existing.indexed_paths()
  else:
    min_score = float(config.eval.gallery_score_threshold) if min_score is None else min_score
    nms = float(config.eval.gallery_nms_threshold) if nms is None else nms
    manifest = {"format": FORMAT, "version": VERSION, "items": 0, "images": 0,
                "embed_dim": int(scorer["kernel"].shape[0]), "parts": [],
                "checkpoint_dir": os.path.abspath(checkpoint_dir), "step": int(step),
                "config": config_json,
                "scorer": {"kernel": scorer["kernel"].tolist(), "bias": float(scorer["bias"])},
                "min_score": min_score, "nms": nms}
    done = set()

  paths = image_files(image_dir, source)
  new = [p for p in paths if p not in done]
  if len(new) < len(paths):
    log.info("%d of %d images of %s are already in the index; indexing the other %d.",
             len(paths) - len(new), len(paths), image_dir, len(new))
  if not new:
    log.info("Nothing to add to %s.", out_dir)
    return manifest

  finder = GarmentFinder(config, variables, min_score=min_score, nms=nms)
  skipped: list[dict] = []
  part_images: list[dict] = []
  cols: dict[str, list[np.ndarray]] = {k: [] for k in ARRAYS}
  for g in finder.garments(new, skipped=skipped, progress_label=f"Indexing {image_dir}"):
    n = len(g.scores)
    cols["embeddings"].append(g.embeddings)
    cols["boxes"].append(g.boxes)
    cols["classes"].append(g.classes)
    cols["scores"].append(g.scores)
    cols["image"].append(np.full((n,), len(part_images), np.int32))
    part_images.append({"path": g.path, "height": g.height, "width": g.width})

  name = f"part-{len(manifest['parts']):05d}"
  part_dir = os.path.join(out_dir, name)
  # A part folder is in the index once the manifest names it. The part is built in a staging
  # folder and swapped in whole (a part folder of this name, or a staging one, that an earlier
  # run killed before its manifest left is not in the index: replaced, deleted).
  files.remove_stale_staging(part_dir)
  staging = files.staging_folder(part_dir)
  try:
    dim = manifest["embed_dim"]
    for key, dtype in ARRAYS.items():
      empty = {"embeddings": (0, dim), "boxes": (0, 4)}.get(key, (0,))
      arr = np.concatenate(cols[key]).astype(dtype) if cols[key] else np.zeros(empty, dtype)
      files.save_npy(os.path.join(staging, f"{key}.npy"), arr)
    files.write_json(os.path.join(staging, "images.json"),
                     {"images": part_images, "skipped": skipped})
    files.swap_in(staging, part_dir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  items = int(sum(len(c) for c in cols["scores"]))
  manifest = dict(manifest, parts=manifest["parts"] + [
      {"name": name, "images": len(part_images), "items": items, "skipped": len(skipped)}])
  manifest["items"] = int(manifest["items"]) + items
  manifest["images"] = int(manifest["images"]) + len(part_images)
  files.write_json(manifest_path, manifest)
  log.info("Indexed %d images (%d garments, %d unreadable images skipped) into %s/%s; the "
           "index holds %d garments of %d images.", len(part_images), items, len(skipped),
           out_dir, name, manifest["items"], manifest["images"])
  return manifest


# ---------------------------------------------------------------------------------------------
# Scoring a gallery.


@functools.partial(jax.jit, static_argnames=("k",))
def _scan_top_k(kernel, bias, center, queries, chunks, chunk_sq, num_valid, k: int):
  """Exact top-k logits of queries [Q, D] against the gallery chunks [C, R, D] (already
  shifted by ``center``; rows >= num_valid are padding), whose terms sum_d w_d g_d^2 are
  ``chunk_sq`` [C, R]: a running top-k over the chunks, ties to the lower gallery index."""
  rows = chunks.shape[1]
  kc = min(k, rows)
  q = queries - center
  q_sq = jnp.einsum("qd,d->q", q * q, kernel, precision=jax.lax.Precision.HIGHEST)
  qw = q * kernel

  def body(carry, xs):
    best_v, best_i = carry
    chunk, sq, offset = xs
    cross = jnp.einsum("qd,rd->qr", qw, chunk, precision=jax.lax.Precision.HIGHEST)
    logits = q_sq[:, None] + sq[None, :] - 2.0 * cross + bias
    index = offset + jnp.arange(rows, dtype=jnp.int32)
    logits = jnp.where(index[None, :] < num_valid, logits, -jnp.inf)
    v, i = jax.lax.top_k(logits, kc)
    all_v = jnp.concatenate([best_v, v], axis=1)
    all_i = jnp.concatenate([best_i, index[i]], axis=1)
    top_v, pick = jax.lax.top_k(all_v, k)
    return (top_v, jnp.take_along_axis(all_i, pick, axis=1)), None

  init = (jnp.full((q.shape[0], k), -jnp.inf, jnp.float32),
          jnp.zeros((q.shape[0], k), jnp.int32))
  offsets = jnp.arange(chunks.shape[0], dtype=jnp.int32) * rows
  (values, indices), _ = jax.lax.scan(body, init, (chunks, chunk_sq, offsets))
  return values, indices


@jax.jit
def _gallery_terms(kernel, shifted):
  return jnp.einsum("crd,d->cr", shifted * shifted, kernel, precision=jax.lax.Precision.HIGHEST)


class GalleryScorer:
  """Exact top-k of the matching network's logits of queries against a whole gallery.

  The logit of query q and gallery item g is fc((q - g)^2) = sum_d w_d (q_d - g_d)^2 + b,
  expanded as in ``matching.expanded_square_logits`` with a fixed shift c (the gallery's
  mean): sum w (q - c)^2 + sum w (g - c)^2 - 2 ((q - c) * w) . (g - c) + b. The gallery side is
  prepared once: the shifted rows, as [C, R, D] chunks of R rows on the default device (the
  accelerator when there is one), and their terms sum w (g - c)^2. A query batch is then one
  compiled program per power-of-two batch size that reads each chunk once (one [Q, D] x
  [D, R] product) and keeps a running top-k: exact, no approximate index.
  """

  def __init__(self, scorer: dict[str, np.ndarray], gallery: np.ndarray, *,
               chunk: int = DEFAULT_CHUNK):
    self.size, self.dim = gallery.shape
    self.kernel = jnp.asarray(scorer["kernel"], jnp.float32)
    self.bias = jnp.asarray(scorer["bias"], jnp.float32)
    num_chunks = max(1, -(-self.size // chunk))
    per_chunk = -(-self.size // num_chunks)  # equal chunks, under 8 padded rows each
    rows = max(8, -(-per_chunk // 8) * 8)
    padded = np.zeros((num_chunks * rows, self.dim), np.float32)
    mean = np.zeros(self.dim, np.float64)
    for start in range(0, self.size, rows):  # a memory-mapped gallery is read once, in slices
      part = np.asarray(gallery[start:start + rows], np.float32)
      padded[start:start + len(part)] = part
      mean += part.sum(axis=0, dtype=np.float64)
    center = (mean / max(self.size, 1)).astype(np.float32)
    padded -= center  # in place: one host copy of the gallery (padding rows stay masked)
    self.center = jnp.asarray(center)
    self.chunks = jax.device_put(padded.reshape(num_chunks, rows, self.dim))
    del padded
    self.chunk_sq = _gallery_terms(self.kernel, self.chunks)

  def top_k(self, queries: np.ndarray, k: int, *, min_rows: int = 1
            ) -> tuple[np.ndarray, np.ndarray]:
    """(logits [Q, k'], gallery indices [Q, k']) best first, k' = min(k, gallery size).
    The queries are padded to a power of two of at least ``min_rows`` rows (one program for
    every query count up to it)."""
    queries = np.asarray(queries, np.float32).reshape(-1, self.dim)
    num_q, k = len(queries), min(int(k), self.size)
    if num_q == 0 or k == 0:
      return np.zeros((num_q, 0), np.float32), np.zeros((num_q, 0), np.int64)
    bucket = 1 << (max(num_q, int(min_rows)) - 1).bit_length()
    padded = np.zeros((bucket, self.dim), np.float32)
    padded[:num_q] = queries
    values, indices = _scan_top_k(self.kernel, self.bias, self.center, jnp.asarray(padded),
                                  self.chunks, self.chunk_sq, jnp.int32(self.size), k)
    return (np.asarray(values)[:num_q], np.asarray(indices)[:num_q].astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Queries.


def query_result(g: Garments, index: GalleryIndex, logits: np.ndarray, rows: np.ndarray
                 ) -> dict[str, Any]:
  """One photo's answer: {image, height, width, garments: [{box, category_id, category,
  detection_score, results: [{rank, index, image, box, category_id, category,
  detection_score, match_score, logit}]}]} (match_score = sigmoid(logit), best first)."""
  garments = []
  for n in range(len(g.scores)):
    results = []
    for r, (logit, i) in enumerate(zip(logits[n], rows[n])):
      item = index.item(int(i))
      item.update(rank=r + 1, logit=round(float(logit), 4),
                  match_score=round(float(1.0 / (1.0 + np.exp(-float(logit)))), 4))
      results.append(item)
    cls = int(g.classes[n])
    garments.append({"box": [round(float(v), 2) for v in g.boxes[n]],
                     "category_id": int(index.spec.original_ids[cls]),
                     "category": index.spec.class_name(cls),
                     "detection_score": round(float(g.scores[n]), 4), "results": results})
  return {"image": g.path, "height": g.height, "width": g.width, "garments": garments}


def fitted_thumbnail(pixels: np.ndarray, box: Sequence[float], height: int,
                     max_aspect: float = 4.0) -> np.ndarray:
  """The box's crop of an RGB image fitted into ``height`` rows and 8 to ``max_aspect *
  height`` columns, aspect kept (a crop wider or taller than that is letterboxed on black):
  a crop of any shape, a 4000x1 photo's or a box outside the image, makes a tile of the
  same height."""
  h, w = pixels.shape[:2]
  coords = np.nan_to_num(np.asarray(box, np.float64).reshape(4), nan=0.0)
  x1 = int(np.clip(np.floor(coords[0]), 0, w - 1))
  y1 = int(np.clip(np.floor(coords[1]), 0, h - 1))
  x2 = max(int(np.clip(np.ceil(coords[2]), 1, w)), x1 + 1)
  y2 = max(int(np.clip(np.ceil(coords[3]), 1, h)), y1 + 1)
  crop = np.ascontiguousarray(pixels[y1:y2, x1:x2])
  ch, cw = crop.shape[:2]
  max_width = max(8, int(max_aspect * height))
  scale = min(height / ch, max_width / cw)
  th, tw = max(1, min(height, int(round(ch * scale)))), max(1, min(max_width,
                                                                  int(round(cw * scale))))
  thumb = cv2.resize(crop, (tw, th), interpolation=cv2.INTER_AREA if scale < 1
                     else cv2.INTER_LINEAR)
  out = np.zeros((height, max(8, tw), 3), np.uint8)
  top, left = (height - th) // 2, (out.shape[1] - tw) // 2
  out[top:top + th, left:left + tw] = thumb.reshape(th, tw, 3)
  return out


def draw_result(photo: np.ndarray, result: dict[str, Any], *, top: int = 8, height: int = 112
                ) -> np.ndarray:
  """[H, W, 3] uint8 RGB: one strip per garment of the photo, the garment's crop (grey frame)
  then its ``top`` best shop items' crops (rank and match probability under each)."""
  rows = []
  cache: dict[str, np.ndarray | None] = {}
  for n, garment in enumerate(result["garments"]):
    tiles = [visualize.framed(fitted_thumbnail(photo, garment["box"], height),
                              visualize.GREY,
                              f"garment {n + 1} {garment['category']} "
                              f"{garment['detection_score']:.2f}")]
    for item in garment["results"][:top]:
      if item["image"] not in cache:
        try:
          cache[item["image"]] = images.read_image(item["image"])
        except DataError as e:  # a gallery image moved or deleted since it was indexed
          log.warning("Cannot draw %s", e)
          cache[item["image"]] = None
      pixels = cache[item["image"]]
      thumb = (fitted_thumbnail(pixels, item["box"], height) if pixels is not None
               else np.zeros((height, height // 2, 3), np.uint8))
      tiles.append(visualize.framed(thumb, visualize.BLUE,
                                    f"#{item['rank']} {item['match_score']:.2f}"))
    rows.append(np.concatenate([np.pad(t, ((0, height + 20 - t.shape[0]), (0, 6), (0, 0)))
                                for t in tiles], axis=1))
  if not rows:
    blank = np.zeros((24, 320, 3), np.uint8)
    cv2.putText(blank, "no garment found", (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                (255, 255, 255), 1, cv2.LINE_AA)
    return blank
  return visualize.stack_rows(rows)


def format_text(result: dict[str, Any]) -> str:
  lines = [f"{result['image']} ({result['width']}x{result['height']}): "
           f"{len(result['garments'])} garment(s)"]
  for n, garment in enumerate(result["garments"]):
    lines.append(f"  garment {n + 1}: {garment['category']} "
                 f"(detection {garment['detection_score']:.2f}) box {_box(garment['box'])}")
    for item in garment["results"]:
      lines.append(f"    {item['rank']:>3}. {item['match_score']:.3f}  {item['image']}  "
                   f"box {_box(item['box'])}  {item['category']}")
  return "\n".join(lines)


def _box(box: Sequence[float]) -> str:
  return "[" + ", ".join(f"{v:.0f}" for v in box) + "]"


def run_query(index: GalleryIndex, finder: GarmentFinder, photos: Sequence[str], *, top: int,
              scorer: GalleryScorer | None = None, skipped: list[dict] | None = None
              ) -> Iterator[tuple[Garments, dict[str, Any]]]:
  """(garments with pixels, ``query_result``) of every readable photo."""
  scorer = scorer or GalleryScorer(index.scorer_params(), index.array("embeddings"))
  for g in finder.garments(photos, keep_pixels=True, skipped=skipped):
    logits, rows = scorer.top_k(g.embeddings, top)
    yield g, query_result(g, index, logits, rows)


# ---------------------------------------------------------------------------------------------
# Command line.


def _load_model(checkpoint_dir: str, step: int | None, config=None
                ) -> tuple[dict[str, Any], int]:
  """(variables, step) of a checkpoint directory (its latest step when ``step`` is None);
  with ``config``, a checkpoint of another config is refused in one line
  (``run_config.RunMismatch``) before any array is read."""
  from df2_jax import inference
  return inference.load_variables("", checkpoint_dir=checkpoint_dir, step=step, config=config)


def index_main(config, workdir: str | None, checkpoint_dir: str | None, step: int | None,
               image_dir: str, out_dir: str, min_score: float | None,
               source: str | None = None) -> int:
  """The ``index`` command: the images of folder ``image_dir`` into index ``out_dir``, which
  this process holds locked (``files.FolderLock``) from start to end (``files.Locked`` when
  another holds it)."""
  if not os.path.exists(image_dir):
    raise FileNotFoundError(f"--images {image_dir}: no such folder")
  if not os.path.isdir(image_dir):
    raise IndexFolderError(f"--images {image_dir} is a file, not a folder of images")
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise IndexFolderError(f"--out {out_dir} is a file, not an index folder")
  with files.FolderLock(out_dir, "retrieval index"):
    return _index_locked(config, workdir, checkpoint_dir, step, image_dir, out_dir, min_score,
                         source)


def _index_locked(config, workdir: str | None, checkpoint_dir: str | None, step: int | None,
                  image_dir: str, out_dir: str, min_score: float | None,
                  source: str | None) -> int:
  existing = os.path.exists(os.path.join(out_dir, MANIFEST))
  if existing:
    m = GalleryIndex(out_dir).manifest
    if config is None:
      config = run_config.config_from_json(m["config"])
    checkpoint_dir = checkpoint_dir or m["checkpoint_dir"]
    step = int(m["step"]) if step is None else step
  if checkpoint_dir is None:
    if not workdir:
      raise IndexFolderError("--workdir or --checkpoint_dir is needed to build a new index")
    checkpoint_dir = os.path.join(workdir, "checkpoints")
  if config is None:  # the config saved with the checkpoint
    try:
      config, _, step = run_config.saved_config(checkpoint_dir, step)
    except run_config.NoSavedConfig as e:
      raise run_config.NoSavedConfig(f"{e}: pass it as --config") from None
  rules.validate(config)
  variables, step = _load_model(checkpoint_dir, step, config)
  build_index(config, variables, image_dir, out_dir, checkpoint_dir=checkpoint_dir, step=step,
              min_score=min_score, source=source)
  return 0


def query_main(index_dir: str, image: str, top: int, out: str | None, json_path: str | None,
               checkpoint_dir: str | None, min_score: float | None,
               source: str | None = None) -> int:
  index = GalleryIndex(index_dir)
  m = index.manifest
  config = run_config.config_from_json(m["config"])
  variables, _ = _load_model(checkpoint_dir or m["checkpoint_dir"], int(m["step"]))
  index.check_model(variables, f"the checkpoint (step {m['step']} of "
                    f"{checkpoint_dir or m['checkpoint_dir']})")
  finder = GarmentFinder(config, variables,
                         min_score=float(m["min_score"]) if min_score is None else min_score,
                         nms=float(m["nms"]))
  photos = image_files(image, source)
  many = os.path.isdir(image)
  if out and many:
    os.makedirs(out, exist_ok=True)
  elif out and os.path.dirname(out):
    os.makedirs(os.path.dirname(out), exist_ok=True)
  answers, skipped = [], []
  one_photo: np.ndarray | None = None  # kept for the picture of a single photo
  for g, result in run_query(index, finder, photos, top=top, skipped=skipped):
    print(format_text(result), flush=True)
    answers.append(result)
    one_photo = None if many else g.pixels
  if json_path:  # first: the answers are kept whatever happens to the pictures
    if os.path.dirname(json_path):
      os.makedirs(os.path.dirname(json_path), exist_ok=True)
    files.write_json(json_path, {"index": os.path.abspath(index_dir),
                                 "gallery_items": len(index), "queries": answers,
                                 "skipped": skipped}, indent=1)
  failed = 0
  for result in answers if out else []:
    path = (os.path.join(out, os.path.splitext(os.path.basename(result["image"]))[0] + ".png")
            if many else out)
    try:
      photo = one_photo if one_photo is not None else images.read_image(result["image"])
      write_picture(path, draw_result(photo, result))
    except Exception as e:  # pylint: disable=broad-except  (the answers are written already)
      if files.is_disk_full(e):
        raise
      failed += 1
      log.warning("Cannot draw the picture %s of %s: %s", path, result["image"],
                  " ".join(str(e).split()) or type(e).__name__)
  if skipped:
    log.warning("%d of %d photos could not be read", len(skipped), len(photos))
  if failed:
    log.warning("%d of %d pictures could not be drawn%s", failed, len(answers),
                f"; the answers are in {json_path}" if json_path else "")
  return 0 if (answers or not photos) and not failed else 1


def write_picture(path: str, picture: np.ndarray) -> None:
  """An RGB picture to ``path`` (its extension picks the format; none: PNG), atomically."""
  ext = os.path.splitext(path)[1] or ".png"
  ok, data = cv2.imencode(ext, np.ascontiguousarray(picture[:, :, ::-1]))
  if not ok:
    raise OSError(f"could not encode {path} as {ext}")
  files.write_bytes(path, data.tobytes())


def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  parser = argparse.ArgumentParser(prog="python -m df2_jax.retrieval",
                                   description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  ix = sub.add_parser("index", help="detect the garments of a folder of shop images into an "
                      "index (a new one, or appended)")
  ix.add_argument("--config", help="the model's config file (get_config()); default: the "
                  "config saved with the checkpoint")
  ix.add_argument("--workdir", help="the training workdir (its checkpoints/)")
  ix.add_argument("--checkpoint_dir", help="a checkpoint directory (default WORKDIR/checkpoints)")
  ix.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
  ix.add_argument("--images", required=True, help="a folder of shop images (.jpg/.jpeg/.png)")
  ix.add_argument("--out", required=True, help="the index folder")
  ix.add_argument("--source", choices=("shop", "user"),
                  help="only the images of this source in their DeepFashion2 annotations "
                       "(IMAGES/../annos/<stem>.json), e.g. the shop images of a split")
  ix.add_argument("--min_score", type=float,
                  help="keep detections scoring at least this (default "
                       "config.eval.gallery_score_threshold)")
  q = sub.add_parser("query", help="rank the indexed shop items for the garments of photos")
  q.add_argument("--index", required=True, help="an index folder")
  q.add_argument("--image", required=True, help="a photo, or a folder of photos")
  q.add_argument("--top", type=int, default=20, help="shop items per garment (default 20)")
  q.add_argument("--out", help="the strips: a .png for one photo, a folder for a folder")
  q.add_argument("--json", help="write the ranked items to this JSON file")
  q.add_argument("--checkpoint_dir", help="where the index's checkpoint is now, if moved")
  q.add_argument("--source", choices=("shop", "user"),
                 help="of a folder, only the images of this source (as for index)")
  q.add_argument("--min_score", type=float,
                 help="a photo's garments: detections scoring at least this (default: the "
                      "index's)")
  args, rest = parser.parse_known_args(argv)
  overrides = [a for a in rest if a.startswith("--config.")]
  unknown = [a for a in rest if not a.startswith("--config.")]
  if unknown or (overrides and args.command != "index"):
    parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")
  try:
    if args.command == "index":
      config = _read_config(args.config, overrides) if args.config else None
      if overrides and config is None:
        parser.error("--config.a.b=v overrides need --config")
      return index_main(config, args.workdir, args.checkpoint_dir, args.step, args.images,
                        args.out, args.min_score, args.source)
    if args.top < 1:
      parser.error(f"--top must be >= 1, got {args.top}")
    return query_main(args.index, args.image, args.top, args.out, args.json,
                      args.checkpoint_dir, args.min_score, args.source)
  except Df2Error as e:  # every known failure in one line (a config problem: status 2)
    prefix = "Config error: " if e.exit_code == 2 else ""
    return errors.report(e, log, prefix)
  except FileNotFoundError as e:  # an --images or --image path that does not exist
    log.error("%s", e)
    return 1
  except OSError as e:
    if not files.is_disk_full(e):
      raise
    folder = args.out if args.command == "index" else os.path.dirname(
        os.path.abspath(args.json or args.out or "."))
    log.error("%s", files.disk_full_message(os.path.abspath(folder)))
    return 1
  except ValueError as e:  # a bad --config.a.b=v override (absl's parser)
    for line in str(e).splitlines():
      log.error("Config error: %s", line)
    return 2


def _read_config(path: str, overrides: Sequence[str]):
  """The config of a config file with ``--config.a.b=v`` overrides (absl's parser, as run.py)."""
  from absl import flags
  from ml_collections import config_flags
  argv = ["retrieval", f"--config={path}", *overrides]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  try:
    fv(argv)
  except (flags.Error, AttributeError, KeyError, TypeError) as e:
    raise ValueError(" ".join(str(e).split())) from None
  return fv.config


if __name__ == "__main__":
  # The command's own logging (main() called from Python leaves the caller's alone); force:
  # importing orbax above installed a handler of its own.
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notes
  sys.exit(main())
