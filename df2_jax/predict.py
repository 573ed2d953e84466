"""Prediction on a folder of images: drawn PNGs and a predictions JSON.

``predict(config, variables, input_dir, output_dir)`` reads every .jpg/.jpeg/.png of
``input_dir`` (any mode converted to RGB and turned upright by its EXIF orientation, as a
photo viewer shows it: ``images.read_image``; unreadable files are skipped with a warning),
runs ``MatchRCNN.detect`` on every device through ``inference.Detector`` (the path of the
Python API, the retrieval tool and the evaluation: images grouped by canvas, batched), and
writes per image
``<stem>.png`` (boxes, category names and scores, masks, landmarks) and one
``predictions.json``: ``{"images": [...], "bbox": [...], "segm": [...], "keypoints": [...]}``,
the images as COCO image entries (``id``, ``file_name``, ``height``, ``width``; the ids are the
files' numeric stems when all are distinct numbers, else 1..N in file-name order: see
``image_ids``) and the detections in the DeepFashion2 result formats (landmarks as the
annotations' pixel indices: ``transforms.landmarks_to_pixel_indices``), plus the detections'
embeddings for retrieval (``embeddings``: {image_id: [[D floats] per detection]}).
No TensorFlow: images are decoded with Pillow and encoded in numpy.

The output folder is replaced whole or not at all: the run builds it in a staging folder beside
it (``.NAME.partial.*``) and swaps it in at the end (``files.swap_in``), so a kill or an error
leaves the previous output as it was (the next run deletes the stale staging folder); every
file is written by temp file, fsync and rename. One prediction at a time writes an output
folder (an exclusive ``files.FolderLock`` on ``.NAME.lock`` beside it). Refused with a
``PredictError`` before anything is written: an input that is not a folder or holds no
images, an output folder that is the input folder, inside it or around it, and an existing
output folder that holds anything but an earlier prediction's files (it would be replaced).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable

import cv2
import jax
import numpy as np

from data_pipeline import draw, images, transforms
from df2_jax import files, parallel, postprocess
from df2_jax.errors import Df2Error
from df2_jax.evaluation import coco

log = logging.getLogger(__name__)

RESULTS = "predictions.json"


class PredictError(Df2Error, RuntimeError):
  """A prediction that cannot run as asked: one line naming the folder and the reason."""


def _inside(path: str, folder: str) -> bool:
  """Whether real path ``path`` is ``folder`` or inside it."""
  return os.path.commonpath([path, folder]) == folder


def _is_earlier_output(folder: str) -> bool:
  """An empty folder, or one holding an earlier prediction's files only (predictions.json
  and drawn PNGs): what a prediction may replace whole."""
  entries = os.listdir(folder)
  return not entries or (RESULTS in entries and all(
      n == RESULTS or (n.lower().endswith(".png") and os.path.isfile(os.path.join(folder, n)))
      for n in entries))


def check_folders(input_dir: str, output_dir: str) -> list[str]:
  """The image files of ``input_dir`` (sorted names), or PredictError, before anything is
  written: ``input_dir`` missing, a file or without images; ``output_dir`` the same folder as
  ``input_dir`` (through symlinks and relative paths too), inside it or around it, a file, or
  a folder holding other files than an earlier prediction's."""
  if not os.path.exists(input_dir):
    raise PredictError(f"input_dir {input_dir}: no such folder")
  if not os.path.isdir(input_dir):
    raise PredictError(f"input_dir {input_dir} is a file, not a folder of images")
  source, target = os.path.realpath(input_dir), os.path.realpath(output_dir)
  if _inside(target, source):
    where = "the same folder as" if target == source else "inside"
    raise PredictError(f"output_dir {output_dir} is {where} input_dir {input_dir}: the "
                       f"drawings would overwrite or mix with the input images; choose an "
                       f"output_dir outside it (nothing written)")
  if _inside(source, target):
    raise PredictError(f"input_dir {input_dir} is inside output_dir {output_dir}, which a "
                       f"prediction replaces whole: choose an output_dir outside it (nothing "
                       f"written)")
  if os.path.lexists(target) and not os.path.isdir(target):
    raise PredictError(f"output_dir {output_dir} is a file, not a folder")
  if os.path.isdir(target) and not _is_earlier_output(target):
    raise PredictError(f"output_dir {output_dir} holds files that are not an earlier "
                       f"prediction's ({RESULTS} and drawn PNGs), and a prediction replaces "
                       f"the folder whole: choose a new or empty folder (nothing written)")
  names = images.image_names(input_dir)
  if not names:
    raise PredictError(f"input_dir {input_dir} holds no images "
                       f"({', '.join(images.IMAGE_EXTENSIONS)}): nothing to predict, "
                       f"output_dir {output_dir} left as it is")
  return names


def lock_folder(output_dir: str) -> str:
  """The folder whose ``files.FolderLock`` a prediction into ``output_dir`` holds: beside it
  (the output folder itself is replaced by the run)."""
  target = os.path.realpath(output_dir)
  return os.path.join(os.path.dirname(target), f".{os.path.basename(target)}.lock")


def image_ids(names: list[str]) -> list[int]:
  """One distinct id per file: the numeric stems when every stem is a number and no two are
  equal (DeepFashion2's ``000001.jpg``), else 1..N in the given order for every file (so
  ``1.jpg`` and ``a.jpg`` never share an id)."""
  stems = [os.path.splitext(n)[0] for n in names]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(names) + 1))


def predict(config, variables: Any | Callable[[], Any], input_dir: str, output_dir: str, *,
            score_threshold: float = 0.3) -> dict[str, Any]:
  """Predicts every image of ``input_dir``; draws detections scoring >= score_threshold.

  ``variables``: the model's, or a function returning them (called once the folders are
  checked and the output folder is locked, so a refused run loads nothing).
  ``config.eval.batch_size`` images per device, every device of the run at once
  (``inference.Detector``). In a run of several processes each process predicts and
  draws its contiguous share of the sorted file names into the common staging folder, and
  process 0 joins the predictions into ``predictions.json`` and swaps the folder in (every
  process must call this together; process 0 returns all predictions, the others their
  share). ``PredictError`` (nothing replaced) for the folders ``check_folders`` refuses, an
  output folder another prediction is writing, no readable image, or a full disk.
  """
  names = check_folders(input_dir, output_dir)
  target = os.path.realpath(output_dir)
  index, count = jax.process_index(), jax.process_count()
  lock = None
  if index == 0:  # the processes of one run share the folder; process 0 holds its lock
    lock = files.FolderLock(lock_folder(output_dir), f"prediction into {target}")
    try:
      lock.acquire()
    except files.Locked as e:
      raise PredictError(f"output_dir {output_dir} is being written by another prediction "
                         f"(pid {e.holder}; lock file {os.path.join(e.folder, files.LOCK_NAME)})"
                         f": wait for it to end or stop it, or use another output_dir"
                         ) from None
  staging = None
  try:
    if count == 1:
      files.remove_stale_staging(target)  # a killed run's staging folder
      staging = files.staging_folder(target)
    else:  # one name every process knows; process 0 makes it fresh under the lock
      staging = os.path.join(os.path.dirname(target),
                             f".{os.path.basename(target)}.partial.processes")
      if index == 0:
        files.remove_stale_staging(target)
        os.makedirs(staging)
      parallel.barrier("predict_staging")
    if callable(variables):
      variables = variables()
    results, predicted, skipped = _predict_into(config, variables, input_dir, names, staging,
                                                score_threshold)
    if count > 1:
      results, predicted, skipped = _join_shards(staging, results, predicted, skipped)
    if index == 0:
      if not predicted:
        raise PredictError(f"none of the {len(names)} image files of input_dir {input_dir} "
                           f"could be read (see the warnings): output_dir {output_dir} left as "
                           f"it is")
      files.write_json(os.path.join(staging, RESULTS), results)
      files.swap_in(staging, target)
      staging = None
  except OSError as e:
    if files.is_disk_full(e):
      raise PredictError(files.disk_full_message(os.path.dirname(target))) from e
    raise
  finally:
    if index == 0 and staging is not None:  # an error: the old output stays as it was
      shutil.rmtree(staging, ignore_errors=True)
    if lock is not None:
      lock.release()
  log.info("Predicted %d images (%d skipped) into %s.", predicted, skipped, output_dir)
  return results


# One process predicts this many batches' images at a time, grouped by canvas
# (``inference.Detector.detect``); several processes step together, a batch at a time.
WINDOW_BATCHES = 4


def _predict_into(config, variables: Any, input_dir: str, names: list[str], output_dir: str,
                  score_threshold: float) -> tuple[dict[str, Any], int, int]:
  """This process's share of ``names``: drawn into ``output_dir``, (results, predicted,
  skipped) returned."""
  from df2_jax import inference
  detector = inference.Detector(config, variables)  # every device of the run
  index, count = jax.process_index(), jax.process_count()
  ids = image_ids(names)
  stems = [os.path.splitext(n)[0] for n in names]
  # <stem>.png, or <name>.png for every file when two files share a stem (a.jpg, a.png).
  drawn_names = ([f"{s}.png" for s in stems] if len(set(stems)) == len(stems)
                 else [f"{n}.png" for n in names])
  shards = np.array_split(np.arange(len(names)), count)  # the first is the largest
  shard = shards[index]
  window = detector.batch_size * (1 if detector.spans_processes else WINDOW_BATCHES)
  # Every process steps through as many windows as the largest shard has (each detection
  # step is one program over every device).
  num_windows = -(-len(shards[0]) // window)
  results = {"images": [], "bbox": [], "segm": [], "keypoints": [], "embeddings": {}}
  skipped: list[dict] = []
  predicted = 0
  windows = images.read_windows([os.path.join(input_dir, names[i]) for i in shard], window,
                                skipped=skipped)
  for _ in range(num_windows):
    loaded = [(int(shard[j]), pixels) for j, _, pixels in next(windows, [])]
    arrays = [pixels for _, pixels in loaded]
    if detector.spans_processes:  # one step with the others, on the run's canvas
      outs = detector.detect_batch(arrays)
    elif not arrays:  # no readable image in this window
      continue
    else:  # grouped by canvas, batched
      outs = detector.detect(arrays)
    for (i, pixels), out in zip(loaded, outs):
      result = postprocess.image_detections(out, out["image_hw"], pixels.shape[:2], "bitmap",
                                            spec=detector.spec)
      _add_image(results, ids[i], (names[i], drawn_names[i]), pixels, result, output_dir,
                 score_threshold, detector.spec)
      predicted += 1
  return results, predicted, len(skipped)


def all_landmarks(result: dict[str, Any], spec) -> np.ndarray:
  """[N, L, 3] of a ``Predictor`` result (bitmap masks or not): each detection's own
  category's landmarks (x, y, score as the annotations' pixel indices) in its category's
  slots of the spec's L, the rest zero."""
  n = len(result["boxes"])
  exported = np.zeros((n, spec.num_landmarks, 3), np.float32)
  for d, (cat, own) in enumerate(zip(result["classes"], result["landmarks"])):
    exported[d, spec.landmark_slice(int(cat))] = own
  return exported


def draw_prediction(pixels: np.ndarray, result: dict[str, Any], spec, score_threshold: float,
                    *, exported: np.ndarray | None = None) -> np.ndarray:
  """[H, W, 3] uint8 RGB: a ``Predictor`` result (bitmap masks) drawn on its image, the
  detections scoring at least ``score_threshold`` (mask, box with the spec's category name and
  score, landmarks); ``exported``: ``all_landmarks`` of the result, when already computed."""
  exported = all_landmarks(result, spec) if exported is None else exported
  # Drawn at continuous coordinates (draw.draw_instances), the exports' indices + 0.5.
  drawn = exported.copy()
  own_slots = spec.category_landmark_mask[result["classes"]]
  drawn[..., :2] = np.where(own_slots[..., None], exported[..., :2]
                            + np.float32(transforms.LANDMARK_PIXEL_CENTRE), 0.0)
  return draw.draw_detections(pixels, result["boxes"], result["scores"], result["classes"],
                              np.ones(len(result["boxes"]), bool), result["masks"], drawn,
                              score_threshold, names=spec.names)


def _add_image(results: dict[str, Any], image_id: int, names: tuple[str, str],
               pixels: np.ndarray, result: dict[str, Any], output_dir: str,
               score_threshold: float, spec) -> None:
  """One image's detections in its pixels (``postprocess.image_detections``, bitmap masks) ->
  the result lists (the dataset's own category ids) and the drawn PNG (the spec's category
  names; ``names``: the file's name and the PNG's)."""
  name, drawn_name = names
  h, w = pixels.shape[:2]
  exported = all_landmarks(result, spec)
  b, s, k = coco.detections_to_results(image_id, result["boxes"], result["scores"],
                                       result["classes"], None, result["masks"], exported,
                                       spec=spec)
  results["images"].append({"id": int(image_id), "file_name": name, "height": int(h),
                            "width": int(w)})
  results["bbox"] += b
  results["segm"] += s
  results["keypoints"] += k
  results["embeddings"][str(image_id)] = result["embeddings"].tolist()
  picture = draw_prediction(pixels, result, spec, score_threshold, exported=exported)
  path = os.path.join(output_dir, drawn_name)
  ok, png = cv2.imencode(".png", np.ascontiguousarray(picture[:, :, ::-1]))
  if not ok:
    raise OSError(f"could not encode the drawing of {name} as PNG")
  files.write_bytes(path, png.tobytes())


def _join_shards(output_dir: str, results: dict[str, Any], predicted: int, skipped: int
                 ) -> tuple[dict[str, Any], int, int]:
  """Several processes: each one's predictions joined on process 0 in process order, which
  is file order (``parallel.gather_on_process_zero`` through the staging folder: numbers only,
  ``shard_arrays``); the other processes get their own back."""
  parts = parallel.gather_on_process_zero(shard_arrays(results, predicted, skipped),
                                          output_dir, "predictions")
  if parts is None:
    return results, predicted, skipped
  return join_shards(parts)


def shard_arrays(results: dict[str, Any], predicted: int, skipped: int
                 ) -> dict[str, np.ndarray]:
  """One process's predictions as numeric arrays: the results as JSON bytes, the counts."""
  return {"results": np.frombuffer(json.dumps(results).encode(), np.uint8),
          "counts": np.array([predicted, skipped], np.int64)}


def join_shards(parts: list[dict[str, np.ndarray]]) -> tuple[dict[str, Any], int, int]:
  """(results, predicted, skipped) of every process's ``shard_arrays``, joined in order."""
  joined = {"images": [], "bbox": [], "segm": [], "keypoints": [], "embeddings": {}}
  predicted = skipped = 0
  for part in parts:
    shard = json.loads(part["results"].tobytes().decode())
    for key in ("images", "bbox", "segm", "keypoints"):
      joined[key] += shard[key]
    joined["embeddings"].update(shard["embeddings"])
    predicted += int(part["counts"][0])
    skipped += int(part["counts"][1])
  return joined, predicted, skipped
