"""A web page for a trained run: upload a photo, see its garments and their best shop matches.

  python -m df2_jax.app --workdir runs/demo [--index runs/demo/shop_index] [--port 7860]

One process holds one ``inference.Predictor`` and, with ``--index``, one loaded gallery
(``retrieval.GalleryIndex`` and its ``GalleryScorer``), for every photo of every visitor: a
second photo on a canvas already seen compiles nothing (each answer logs what it compiled).
``PhotoApp.answer`` is the whole handler, usable without a server; ``build_page`` lays it out
with Gradio (the ``app`` extra: ``pip install -e ".[app]"``), whose queue answers the visitors
one photo at a time, and whose API (the page's ``/detect`` endpoint) serves scripts:

  from gradio_client import Client, handle_file
  picture, table, garment, matches, result, status = Client("http://127.0.0.1:7860/").predict(
      handle_file("photo.jpg"), api_name="/detect")   # result: the JSON of the page

A photo's garments follow the retrieval tool's rule (``retrieval.garment_rows``: score at least
``min_score``, class-agnostic NMS), so the page and ``retrieval query`` agree. A file that is not
a photo this server takes (not an image, empty, more pixels than ``max_megapixels``, no
garment) is answered with a message on the page; nothing a visitor uploads stops the server.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import logging
import os
import sys
import threading
import time
from typing import Any, Sequence

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from data_pipeline import images
from data_pipeline.records import DataError
from df2_jax import errors, inference, predict, retrieval
from df2_jax.errors import Df2Error

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860
DEFAULT_MAX_MEGAPIXELS = 40.0  # a 40 MP photo decodes to 120 MB of RGB
DEFAULT_MAX_FILE_MB = 25  # the upload limit (Gradio refuses larger files before they land)
EXAMPLES = 6  # example photos shown under the upload
THUMB_HEIGHT = 128  # the shop crops' height in pixels
DRAW_SIZE = 512  # a smaller photo is drawn scaled up by a whole factor to about this size
TABLE_HEADERS = ["garment", "category", "score", "box (x1, y1, x2, y2)", "landmarks",
                 "best match"]


_COMPILED = [0]  # XLA programs compiled by this process since the first PhotoApp
_COUNTING = threading.Lock()


def _count_compile(event: str, duration: float, **kwargs) -> None:
  del duration, kwargs
  if event == "/jax/core/compile/backend_compile_duration":  # jax's event per XLA compile
    _COMPILED[0] += 1


def compiled_programs() -> int:
  """How many XLA programs this process has compiled since the first ``PhotoApp`` (jax's
  backend-compile events; the listener is registered once)."""
  with _COUNTING:
    if not getattr(compiled_programs, "registered", False):
      from jax import monitoring
      monitoring.register_event_duration_secs_listener(_count_compile)
      compiled_programs.registered = True
  return _COMPILED[0]


def _rounded(values: np.ndarray, decimals: int) -> list:
  """Nested lists of Python floats rounded to ``decimals`` (for JSON: 65.66, not 65.66000366)."""
  return np.round(np.asarray(values, np.float64), decimals).tolist()


def _reason(error: DataError, path: str, name: str) -> str:
  """A ``DataError``'s message with the upload's temporary path shown as its name."""
  return error.message.replace(path, name)


@dataclasses.dataclass
class Answer:
  """What the page shows for one photo."""
  message: str  # one line: what was found and how long it took, or what is wrong
  picture: np.ndarray | None = None  # the photo with each garment drawn; None on an error
  table: list[list[Any]] = dataclasses.field(default_factory=list)  # one row per garment
  choices: list[str] = dataclasses.field(default_factory=list)  # the garments, by name
  matches: list[list[tuple[np.ndarray, str]]] = dataclasses.field(default_factory=list)
  result: dict[str, Any] = dataclasses.field(default_factory=dict)  # the JSON
  seconds: float = 0.0
  compiled: int = 0  # XLA programs compiled while answering
  ok: bool = False


class PhotoApp:
  """The page's handler: a loaded run (and gallery), answering one photo file at a time.

  Args:
    predictor: the run's ``inference.Predictor``.
    index: a ``retrieval.GalleryIndex`` built with the same model, or None.
    top: shop matches per garment.
    min_score: a garment's least detection score (default: the config's
      ``eval.draw_score_threshold``, as ``--mode predict`` draws).
    nms: the class-agnostic NMS IoU of the garments (default: the index's, else the config's
      ``eval.gallery_nms_threshold``).
    max_megapixels: larger photos are refused from their header, before any decoding.
    examples: photo files offered under the upload.
  """

  def __init__(self, predictor: inference.Predictor, *,
               index: retrieval.GalleryIndex | None = None, top: int = 8,
               min_score: float | None = None, nms: float | None = None,
               max_megapixels: float = DEFAULT_MAX_MEGAPIXELS,
               examples: Sequence[str] = ()):
    if top < 1:
      raise ValueError(f"top must be >= 1, got {top}")
    if not max_megapixels > 0:
      raise ValueError(f"max_megapixels must be > 0, got {max_megapixels}")
    self.predictor = predictor
    self.spec = predictor.spec
    config = predictor.config
    self.index = index
    self.top = int(top)
    self.min_score = float(config.eval.draw_score_threshold if min_score is None
                           else min_score)
    self.nms = float(nms if nms is not None else index.manifest["nms"] if index is not None
                     else config.eval.gallery_nms_threshold)
    self.max_pixels = int(max_megapixels * 1e6)
    self.examples = list(examples)
    self.scorer = None
    if index is not None:
      index.check_model(predictor.run.variables,
                        f"the model (step {predictor.run.step} of "
                        f"{predictor.run.checkpoint_dir})")
      self.scorer = retrieval.GalleryScorer(index.scorer_params(), index.array("embeddings"))
    compiled_programs()  # counting from here
    self._lock = threading.Lock()  # one photo at a time through the one Predictor
    self._thumbs: collections.OrderedDict[int, np.ndarray] = collections.OrderedDict()
    self.photos = 0

  @classmethod
  def from_workdir(cls, workdir: str, *, step: int | None = None, index_dir: str | None = None,
                   **kwargs) -> "PhotoApp":
    """The app of a training workdir (or checkpoint directory) and an optional index folder."""
    predictor = inference.Predictor.from_workdir(workdir, step)
    index = retrieval.GalleryIndex(index_dir) if index_dir else None
    return cls(predictor, index=index, **kwargs)

  # ------------------------------------------------------------------------------------------

  def _refusal(self, path: str) -> str | None:
    """Why the file at ``path`` is not a photo this server takes (from its header), or None."""
    name = os.path.basename(path)
    try:
      size = os.path.getsize(path)
    except OSError as e:
      return f"{name}: cannot read the upload ({e.strerror or e})."
    if size == 0:
      return f"{name} is an empty file (0 bytes): upload a JPEG or PNG photo."
    limit = f"this server takes photos up to {self.max_pixels / 1e6:g} megapixels"
    try:
      width, height = images.image_size(path)
    except DataError as e:
      if isinstance(e.__cause__, Image.DecompressionBombError):
        return f"{name} has too many pixels ({' '.join(str(e.__cause__).split()[:4])}): {limit}."
      return (f"{name} is not an image this server can read (a JPEG or PNG photo): "
              f"{_reason(e, path, name)}.")
    if width * height > self.max_pixels:
      return (f"{name} is {width}x{height} ({width * height / 1e6:.1f} megapixels): {limit} "
              f"(--max_megapixels); resize it and upload it again.")
    return None

  def answer(self, path: str | None) -> Answer:
    """The page's answer for the photo file at ``path`` (an upload). Never raises for a bad
    file: the answer's ``message`` says what is wrong."""
    if not path:
      return Answer("Upload a photo (JPEG or PNG) to see its garments.")
    path = os.fspath(path)
    name = os.path.basename(path)
    refusal = self._refusal(path)
    if refusal:
      log.info("Refused %s: %s", name, refusal)
      return Answer(refusal)
    try:
      with self._lock:
        return self._answer(path, name)
    except DataError as e:  # a header that decodes but pixels that do not (truncated)
      log.info("Refused %s: %s", name, e)
      return Answer(f"{name} is not an image this server can read: {_reason(e, path, name)}.")
    except Exception as e:  # pylint: disable=broad-except  (the server answers the next one)
      log.exception("Could not answer %s", name)
      return Answer(f"{name}: this server could not answer it ({type(e).__name__}: "
                    f"{' '.join(str(e).split())[:300]}); the server log has the details.")

  def _answer(self, path: str, name: str) -> Answer:
    start = time.perf_counter()
    compiled = compiled_programs()
    pixels = images.read_image(path)
    h, w = pixels.shape[:2]
    # Masks as RLEs, each pasted in its box's region only: a full-photo bitmap for every
    # detection (up to 100 of a 40 MP photo) would be built to keep a few.
    found = self.predictor(pixels, mask_format="rle")
    detected = time.perf_counter()
    rows = retrieval.garment_rows(found, min_score=self.min_score, nms=self.nms)
    garments = {k: (v[rows] if isinstance(v, np.ndarray) else [v[int(r)] for r in rows])
                for k, v in found.items() if k != "image_hw"}
    bitmaps = (np.stack([mask_utils.decode(rle) for rle in garments["masks"]]).astype(bool)
               if len(rows) else np.zeros((0, h, w), bool))
    picture = self._draw(pixels, dict(garments, masks=bitmaps))
    matched = self._matches(name, h, w, garments)
    thumbs = [self._strip(g) for g in matched["garments"]] if matched else []
    seconds = time.perf_counter() - start
    compiled = compiled_programs() - compiled
    self.photos += 1
    n = len(rows)
    log.info("Photo %d (%s, %dx%d): %d garment(s) in %.2f s (detection %.2f s); %s.",
             self.photos, name, w, h, n, seconds, detected - start,
             f"compiled {compiled} program(s)" if compiled else "compiled nothing")
    result = self._json(name, h, w, garments, matched, seconds, compiled)
    choices = [f"{i + 1}: {garments['names'][i]} {garments['scores'][i]:.2f}" for i in range(n)]
    best = [(f"{g['results'][0]['match_score']:.3f} {os.path.basename(g['results'][0]['image'])}"
             if g["results"] else "-") for g in matched["garments"]] if matched else ["-"] * n
    table = [[i + 1, garments["names"][i], round(float(garments["scores"][i]), 3),
              ", ".join(f"{v:.0f}" for v in garments["boxes"][i]),
              len(garments["landmarks"][i]), best[i]] for i in range(n)]
    timing = f"{seconds:.2f} s" + (f", of which compiling {compiled} program(s)"
                                   if compiled else "")
    if n:
      message = f"{name}: {n} garment(s) in {timing}."
    else:
      message = (f"{name}: no garment found (none scores {self.min_score:g} or more) in "
                 f"{timing}.")
    return Answer(message, picture, table, choices, thumbs, result, seconds, compiled, ok=True)

  def _draw(self, pixels: np.ndarray, garments: dict[str, Any]) -> np.ndarray:
    """The photo with its garments drawn (``predict.draw_prediction``), a small photo scaled up
    by a whole factor first so that its labels can be read (``DRAW_SIZE``)."""
    h, w = pixels.shape[:2]
    s = max(1, DRAW_SIZE // max(h, w))
    if s == 1:
      return predict.draw_prediction(pixels, garments, self.spec, 0.0)
    scaled = dict(garments, boxes=garments["boxes"] * s,
                  masks=garments["masks"].repeat(s, axis=1).repeat(s, axis=2),
                  landmarks=[np.concatenate([(lm[:, :2] + 0.5) * s - 0.5, lm[:, 2:]], axis=1)
                             for lm in garments["landmarks"]])
    return predict.draw_prediction(pixels.repeat(s, axis=0).repeat(s, axis=1), scaled,
                                   self.spec, 0.0)

  def _matches(self, name: str, h: int, w: int, garments: dict[str, Any]
               ) -> dict[str, Any] | None:
    """``retrieval.query_result`` of the garments against the gallery, or None (no index)."""
    if self.scorer is None:
      return None
    g = retrieval.Garments(path=name, height=h, width=w, boxes=garments["boxes"],
                           classes=garments["classes"], scores=garments["scores"],
                           embeddings=garments["embeddings"])
    # Every photo's garments in one padded batch: one compiled program whatever their count.
    logits, found = self.scorer.top_k(g.embeddings, self.top,
                                      min_rows=self.predictor.detector.detections_per_image)
    return retrieval.query_result(g, self.index, logits, found)

  def _strip(self, garment: dict[str, Any]) -> list[tuple[np.ndarray, str]]:
    """(crop, caption) of each shop match of one garment."""
    out = []
    for item in garment["results"]:
      thumb = self._thumbs.get(item["index"])
      if thumb is None:
        try:
          thumb = retrieval.fitted_thumbnail(images.read_image(item["image"]), item["box"],
                                             THUMB_HEIGHT)
        except DataError as e:  # a gallery image moved or deleted since it was indexed
          log.warning("Cannot show shop item %d: %s", item["index"], e)
          thumb = np.zeros((THUMB_HEIGHT, THUMB_HEIGHT // 2, 3), np.uint8)
        self._thumbs[item["index"]] = thumb
        while len(self._thumbs) > 512:  # a bounded cache of the shop crops shown
          self._thumbs.popitem(last=False)
      out.append((thumb, f"#{item['rank']} {item['match_score']:.3f} "
                         f"{os.path.basename(item['image'])}"))
    return out

  def _json(self, name: str, h: int, w: int, garments: dict[str, Any],
            matched: dict[str, Any] | None, seconds: float, compiled: int) -> dict[str, Any]:
    """The raw result: the Predictor's fields of the garments (masks as COCO RLE, landmarks
    [K, 3] x, y, score) and, with an index, each garment's shop matches."""
    return {
        "image": name, "image_hw": [h, w], "seconds": round(seconds, 3),
        "compiled_programs": compiled, "min_score": self.min_score,
        "boxes": _rounded(garments["boxes"], 2),
        "scores": _rounded(garments["scores"], 4),
        "classes": garments["classes"].tolist(),
        "category_ids": np.asarray(garments["category_ids"]).tolist(),
        "names": list(garments["names"]),
        "masks": list(garments["masks"]),
        "landmarks": [_rounded(lm, 2) for lm in garments["landmarks"]],
        "embeddings": _rounded(garments["embeddings"], 5),
        "matches": [g["results"] for g in matched["garments"]] if matched else None,
    }

  # ------------------------------------------------------------------------------------------

  def describe(self) -> str:
    """The page's heading: the run."""
    run = self.predictor.run
    return (f"**Run:** step {run.step} of `{run.checkpoint_dir}` ({len(self.spec.names)} "
            f"categories); garments scoring {self.min_score:g} or more.")

  def retrieval_note(self) -> str:
    """The retrieval panel's line: the index, or how to build one."""
    if self.index is None:
      return ("**No shop index:** build one with `python -m df2_jax.retrieval index "
              f"--checkpoint_dir {self.predictor.run.checkpoint_dir} --images SHOP_PHOTOS "
              "--out INDEX` and start the app with `--index INDEX` to see each garment's best "
              "shop matches here.")
    return (f"**Shop index:** `{self.index.directory}`, {len(self.index)} garments; the "
            f"{self.top} best matches of the selected garment.")


def demo_examples(config, count: int = EXAMPLES) -> list[str]:
  """The user photos of a synthetic run's validation split (the demo's), when on disk."""
  if config.data.format != "synthetic":
    return []
  from data_pipeline import synthetic  # no TensorFlow: numpy and OpenCV
  data = config.data
  folder = os.path.join(synthetic.cache_root(data.synthetic_dir, data.synthetic_train_pairs,
                                             data.synthetic_val_pairs,
                                             data.synthetic_image_size, data.synthetic_seed),
                        "validation", "image")
  if not os.path.isdir(folder):
    log.info("No example photos: the run's synthetic data is not at %s (--examples DIR)", folder)
    return []
  return retrieval.image_files(folder, "user")[:count]


# ---------------------------------------------------------------------------------------------
# The page.


def _gradio():
  os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
  try:
    import gradio
  except ImportError:
    raise ImportError("the web app needs Gradio: pip install -e \".[app]\"") from None
  return gradio


def build_page(app: PhotoApp):
  """The Gradio ``Blocks`` of ``app``: the upload and examples, the drawn photo, the garments'
  table, the selected garment's shop matches and the JSON; the photo's event is the API's
  ``/detect``."""
  gr = _gradio()

  def detect(path):
    a = app.answer(path)
    matches = a.matches[0] if a.matches else []
    return (a.picture, a.table,
            gr.update(choices=a.choices, value=a.choices[0] if a.choices else None),
            matches, a.result, a.message, a.matches)

  def select(choice, strips):
    if not choice or not strips:
      return []
    return strips[int(choice.split(":")[0]) - 1]

  with gr.Blocks(title="df2-jax: Match R-CNN") as page:
    gr.Markdown("## df2-jax: clothing detection, landmarks, masks and shop retrieval\n"
                + app.describe(), elem_id="about")
    strips = gr.State([])
    with gr.Row():
      with gr.Column(scale=1):
        photo = gr.File(label="Photo (JPEG or PNG)", type="filepath", elem_id="photo")
        status = gr.Markdown("Upload a photo, or pick an example.", elem_id="status",
                             label="Status")
        if app.examples:
          gr.Examples(app.examples, inputs=photo, label="Examples")
      with gr.Column(scale=2):
        drawn = gr.Image(label="Photo: each garment's mask, box, category, score, landmarks",
                         type="numpy", interactive=False, elem_id="drawn", format="png",
                         height=440)
    table = gr.Dataframe(headers=TABLE_HEADERS, label="Garments", interactive=False,
                         elem_id="garments")
    gr.Markdown(app.retrieval_note(), elem_id="retrieval_note")
    garment = gr.Dropdown(choices=[], label="Garment", elem_id="garment", interactive=True)
    matches = gr.Gallery(label="Shop matches (rank, match probability, shop photo)",
                         columns=8, height=THUMB_HEIGHT + 80, object_fit="contain",
                         elem_id="matches", format="png")
    with gr.Accordion("The result as JSON", open=False):
      result = gr.JSON(label="Result", elem_id="result")
    photo.change(detect, inputs=photo,
                 outputs=[drawn, table, garment, matches, result, status, strips],
                 api_name="detect", concurrency_limit=1)
    garment.change(select, inputs=[garment, strips], outputs=matches,
                   api_visibility="private")
  return page


def launch(app: PhotoApp, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
           max_file_mb: float = DEFAULT_MAX_FILE_MB, block: bool = True):
  """Serves ``build_page(app)`` on ``host:port`` (Gradio's queue: one photo at a time, the
  others waiting their turn); returns the Blocks (``block=False``: serving in a thread, stop it
  with ``.close()``)."""
  page = build_page(app)
  page.queue(max_size=64)
  allowed = sorted({os.path.dirname(os.path.abspath(p)) for p in app.examples})
  page.launch(server_name=host, server_port=port, max_file_size=f"{max_file_mb:g}mb",
              allowed_paths=allowed, prevent_thread_lock=not block, quiet=not block,
              show_error=False)
  return page


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m df2_jax.app",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True,
                      help="a training workdir, or a checkpoint directory (WORKDIR/best)")
  parser.add_argument("--step", type=int, help="the checkpoint step (default: the latest)")
  parser.add_argument("--index", help="a retrieval index folder built with this model "
                      "(python -m df2_jax.retrieval index): each garment's best shop matches")
  parser.add_argument("--host", default="127.0.0.1",
                      help="the address to listen on (default 127.0.0.1: this machine only; "
                           "0.0.0.0: every interface)")
  parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                      help=f"default {DEFAULT_PORT}")
  parser.add_argument("--examples", help="a folder of example photos (default: a synthetic "
                      "run's validation user photos, when on disk)")
  parser.add_argument("--top", type=int, default=8, help="shop matches per garment (default 8)")
  parser.add_argument("--min_score", type=float,
                      help="a garment's least detection score (default: the config's "
                           "eval.draw_score_threshold)")
  parser.add_argument("--max_megapixels", type=float, default=DEFAULT_MAX_MEGAPIXELS,
                      help=f"larger photos are refused (default {DEFAULT_MAX_MEGAPIXELS:g})")
  parser.add_argument("--max_file_mb", type=float, default=DEFAULT_MAX_FILE_MB,
                      help=f"the upload limit in MB (default {DEFAULT_MAX_FILE_MB})")
  args = parser.parse_args(argv)
  if args.top < 1:
    parser.error(f"--top must be >= 1, got {args.top}")
  if not args.max_megapixels > 0 or not args.max_file_mb > 0:
    parser.error("--max_megapixels and --max_file_mb must be > 0")
  try:
    _gradio()
    predictor = inference.Predictor.from_workdir(args.workdir, args.step)
    index = retrieval.GalleryIndex(args.index) if args.index else None
    examples = (retrieval.image_files(args.examples)[:EXAMPLES] if args.examples
                else demo_examples(predictor.config))
    app = PhotoApp(predictor, index=index, top=args.top, min_score=args.min_score,
                   max_megapixels=args.max_megapixels, examples=examples)
  except Df2Error as e:
    return errors.report(e, log, "Config error: " if e.exit_code == 2 else "")
  except (FileNotFoundError, ImportError) as e:
    log.error("%s", e)
    return 1
  log.info("Serving step %d of %s%s on http://%s:%d/ (Ctrl-C stops it).",
           predictor.run.step, predictor.run.checkpoint_dir,
           f" with the {len(index)} garments of {args.index}" if index is not None else "",
           args.host, args.port)
  launch(app, host=args.host, port=args.port, max_file_mb=args.max_file_mb)
  return 0


if __name__ == "__main__":
  logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s", force=True)
  logging.getLogger("absl").setLevel(logging.ERROR)  # orbax's read-only notes
  logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
  sys.exit(main())
