"""Prediction on a folder of images: drawn PNGs and a predictions JSON.

``predict(config, variables, input_dir, output_dir)`` reads every .jpg/.jpeg/.png of
``input_dir`` (any mode converted to RGB; unreadable files are skipped with a warning), runs the
jitted ``MatchRCNN.detect`` in batches on the config's canvas, and writes per image
``<stem>.png`` (boxes, category names and scores, masks, landmarks) and one
``predictions.json``: ``{"images": [...], "bbox": [...], "segm": [...], "keypoints": [...]}``,
the images as COCO image entries (``id``, ``file_name``, ``height``, ``width``; the ids are the
files' numeric stems when all are distinct numbers, else 1..N in file-name order: see
``image_ids``) and the detections in the DeepFashion2 result formats, plus the detections'
embeddings for retrieval (``embeddings``: {image_id: [[D floats] per detection]}).
No TensorFlow: images are decoded with Pillow and encoded in numpy.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import cv2
import jax
import numpy as np

from data_pipeline import annotations, draw, images, transforms
from data_pipeline.records import DataError, ImageRecord
from df2_jax import parallel
from df2_jax.evaluation import coco
from df2_jax.evaluation import masks as mask_lib
from df2_jax.models.match_rcnn import model_from_config

log = logging.getLogger(__name__)


def image_ids(names: list[str]) -> list[int]:
  """One distinct id per file: the numeric stems when every stem is a number and no two are
  equal (DeepFashion2's ``000001.jpg``), else 1..N in the given order for every file (so
  ``1.jpg`` and ``a.jpg`` never share an id)."""
  stems = [os.path.splitext(n)[0] for n in names]
  if all(s.isdigit() for s in stems) and len({int(s) for s in stems}) == len(stems):
    return [int(s) for s in stems]
  return list(range(1, len(names) + 1))


def predict(config, variables: Any, input_dir: str, output_dir: str, *,
            score_threshold: float = 0.3) -> dict[str, Any]:
  """Predicts every image of ``input_dir``; draws detections scoring >= score_threshold.

  ``config.eval.batch_size`` images per device, every device of the run at once
  (``evaluator.jitted_detect``). In a run of several processes each process predicts and
  draws its contiguous share of the sorted file names, and process 0 joins the predictions
  into ``predictions.json`` (every process must call this together; process 0 returns all
  predictions, the others their share).
  """
  from data_pipeline.sources import geometry_from_config
  from df2_jax.evaluation import evaluator
  geometry = geometry_from_config(config.data)
  model = model_from_config(config)
  mesh = parallel.make_mesh()
  variables = parallel.replicate(variables, mesh)
  evaluator.check_finite(variables)
  detect = evaluator.jitted_detect(model, mesh)[0]
  index, count = jax.process_index(), jax.process_count()
  names = sorted(n for n in os.listdir(input_dir)
                 if n.lower().endswith(annotations.IMAGE_EXTENSIONS))
  ids = image_ids(names)
  stems = [os.path.splitext(n)[0] for n in names]
  # <stem>.png, or <name>.png for every file when two files share a stem (a.jpg, a.png).
  drawn_names = ([f"{s}.png" for s in stems] if len(set(stems)) == len(stems)
                 else [f"{n}.png" for n in names])
  shards = np.array_split(np.arange(len(names)), count)
  batch_size = int(config.eval.batch_size) * jax.local_device_count()
  num_batches = -(-max(len(s) for s in shards) // batch_size)  # the same on every process
  os.makedirs(output_dir, exist_ok=True)
  results = {"images": [], "bbox": [], "segm": [], "keypoints": [], "embeddings": {}}
  skipped = predicted = 0

  for b in range(num_batches):
    pending: list[tuple[int, tuple[str, str], np.ndarray, dict[str, np.ndarray]]] = []
    for i in shards[index][b * batch_size:(b + 1) * batch_size]:
      name = names[i]
      path = os.path.join(input_dir, name)
      try:
        pixels = images.load_image(path)
      except DataError as e:
        skipped += 1
        log.warning("Skipping %s", e)
        continue
      pending.append((ids[i], (name, drawn_names[i]), pixels))
    # The batch's canvas: the smallest that holds its images (orientation buckets). In a
    # multi-process run every process must use the same one: the largest then.
    canvas = (transforms.batch_canvas(geometry, [p[2].shape[:2] for p in pending])
              if count == 1 else tuple(geometry.canvas_hw))
    pending = [(image_id, names_, pixels, transforms.encode_image(
        ImageRecord(image_id, os.path.join(input_dir, names_[0]), pixels.shape[1],
                    pixels.shape[0], "", -1, ()), pixels, geometry, False, canvas))
               for image_id, names_, pixels in pending]
    spec = transforms.image_spec(geometry, canvas)
    stacked = {k: np.zeros((batch_size,) + spec[k][0], spec[k][1]) for k in ("image", "image_hw")}
    for j, p in enumerate(pending):  # the rest of the batch stays zero (no detections)
      for k in stacked:
        stacked[k][j] = p[3][k]
    x = parallel.host_local_to_global(stacked, mesh)
    out = parallel.host_local(detect(variables, x["image"], x["image_hw"]), mesh)
    for j, (image_id, name, pixels, enc) in enumerate(pending):
      _add_image(results, image_id, name, pixels, enc, {k: v[j] for k, v in out.items()},
                 output_dir, score_threshold)
      predicted += 1

  if count > 1:
    results, predicted, skipped = _join_shards(output_dir, results, predicted, skipped)
  if index == 0:
    with open(os.path.join(output_dir, "predictions.json"), "w") as f:
      json.dump(results, f)
  log.info("Predicted %d images (%d skipped) into %s.", predicted, skipped, output_dir)
  return results


def _add_image(results: dict[str, Any], image_id: int, names: tuple[str, str],
               pixels: np.ndarray, enc: dict[str, np.ndarray], out: dict[str, np.ndarray],
               output_dir: str, score_threshold: float) -> None:
  """One image's detections (``out``, on the canvas) -> original pixels, the result lists and
  the drawn PNG (``names``: the file's name and the PNG's)."""
  name, drawn_name = names
  h, w = pixels.shape[:2]
  sy, sx = np.array([h, w], np.float32) / np.maximum(enc["image_hw"], 1)
  keep = out["valid"]
  boxes = out["boxes"] * np.array([sx, sy, sx, sy], np.float32)
  masks = np.zeros((len(boxes), h, w), bool)
  for d in np.nonzero(keep)[0]:  # detectron2's pasting (evaluation.masks)
    region, (top, left) = mask_lib.paste_mask_region(out["masks"][d], boxes[d], (h, w))
    masks[d, top:top + region.shape[0], left:left + region.shape[1]] = region
  lms = out["landmarks"].copy()
  lms[..., 0] *= sx
  lms[..., 1] *= sy
  b, s, k = coco.detections_to_results(image_id, boxes, out["scores"], out["classes"], keep,
                                       masks, lms)
  results["images"].append({"id": int(image_id), "file_name": name, "height": int(h),
                            "width": int(w)})
  results["bbox"] += b
  results["segm"] += s
  results["keypoints"] += k
  results["embeddings"][str(image_id)] = out["embeddings"][keep].tolist()
  picture = draw.draw_detections(pixels, boxes, out["scores"], out["classes"], keep, masks, lms,
                                 score_threshold)
  path = os.path.join(output_dir, drawn_name)
  if not cv2.imwrite(path, picture[:, :, ::-1]):
    raise OSError(f"could not write {path}")


def _join_shards(output_dir: str, results: dict[str, Any], predicted: int, skipped: int
                 ) -> tuple[dict[str, Any], int, int]:
  """Several processes: each leaves its predictions in ``output_dir``; process 0 returns them
  joined in process order (file order) and removes the files, the others their own."""
  index, count = jax.process_index(), jax.process_count()
  path = lambda i: os.path.join(output_dir, f"shard-{i:05d}.json")
  with open(path(index), "w") as f:
    json.dump({"results": results, "predicted": predicted, "skipped": skipped}, f)
  parallel.barrier("predictions_written")
  if index != 0:
    return results, predicted, skipped
  joined = {"images": [], "bbox": [], "segm": [], "keypoints": [], "embeddings": {}}
  predicted = skipped = 0
  for i in range(count):
    with open(path(i)) as f:
      part = json.load(f)
    os.remove(path(i))
    for key in ("images", "bbox", "segm", "keypoints"):
      joined[key] += part["results"][key]
    joined["embeddings"].update(part["results"]["embeddings"])
    predicted += part["predicted"]
    skipped += part["skipped"]
  return joined, predicted, skipped
