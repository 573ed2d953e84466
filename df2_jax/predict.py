"""Prediction on a folder of images: drawn PNGs and a predictions JSON.

``predict(config, variables, input_dir, output_dir)`` reads every .jpg/.jpeg/.png of
``input_dir`` (any mode converted to RGB; unreadable files are skipped with a warning), runs the
jitted ``MatchRCNN.detect`` in batches on the config's canvas, and writes per image
``<stem>.png`` (boxes, category names and scores, masks, landmarks) and one
``predictions.json``: ``{"bbox": [...], "segm": [...], "keypoints": [...]}`` in the DeepFashion2
result formats (image_id = the file's numeric stem, else its index), plus the detections'
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
from df2_jax.evaluation import coco
from df2_jax.evaluation import masks as mask_lib
from df2_jax.models.match_rcnn import MatchRCNN, model_from_config

log = logging.getLogger(__name__)


def _image_id(name: str, index: int) -> int:
  stem = os.path.splitext(name)[0]
  return int(stem) if stem.isdigit() else index


def predict(config, variables: Any, input_dir: str, output_dir: str, *,
            score_threshold: float = 0.3) -> dict[str, Any]:
  """Predicts every image of ``input_dir``; draws detections scoring >= score_threshold."""
  from data_pipeline.sources import geometry_from_config
  geometry = geometry_from_config(config.data)
  model = model_from_config(config)
  detect = jax.jit(lambda v, x, hw: model.apply(v, x, hw, method=MatchRCNN.detect))
  names = sorted(n for n in os.listdir(input_dir)
                 if n.lower().endswith(annotations.IMAGE_EXTENSIONS))
  os.makedirs(output_dir, exist_ok=True)
  results = {"bbox": [], "segm": [], "keypoints": [], "embeddings": {}}
  batch_size = int(config.eval.batch_size)
  pending: list[tuple[int, str, np.ndarray, dict[str, np.ndarray]]] = []
  skipped = 0

  def flush():
    stacked = {k: np.stack([p[3][k] for p in pending]) for k in ("image", "image_hw")}
    pad = batch_size - len(pending)
    if pad:
      stacked = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                 for k, v in stacked.items()}
    out = jax.device_get(detect(variables, stacked["image"], stacked["image_hw"]))
    for i, (image_id, name, pixels, enc) in enumerate(pending):
      h, w = pixels.shape[:2]
      sy, sx = np.array([h, w], np.float32) / np.maximum(enc["image_hw"], 1)
      keep = out["valid"][i]
      boxes = out["boxes"][i] * np.array([sx, sy, sx, sy], np.float32)
      masks = np.zeros((len(boxes), h, w), bool)
      for d in np.nonzero(keep)[0]:  # detectron2's pasting (evaluation.masks)
        region, (top, left) = mask_lib.paste_mask_region(out["masks"][i, d], boxes[d], (h, w))
        masks[d, top:top + region.shape[0], left:left + region.shape[1]] = region
      lms = out["landmarks"][i].copy()
      lms[..., 0] *= sx
      lms[..., 1] *= sy
      b, s, k = coco.detections_to_results(image_id, boxes, out["scores"][i],
                                           out["classes"][i], keep, masks, lms)
      results["bbox"] += b
      results["segm"] += s
      results["keypoints"] += k
      results["embeddings"][str(image_id)] = out["embeddings"][i][keep].tolist()
      picture = draw.draw_detections(pixels, boxes, out["scores"][i], out["classes"][i], keep,
                                     masks, lms, score_threshold)
      cv2.imwrite(os.path.join(output_dir, os.path.splitext(name)[0] + ".png"),
                  picture[:, :, ::-1])
    pending.clear()

  for index, name in enumerate(names):
    path = os.path.join(input_dir, name)
    try:
      pixels = images.load_image(path)
    except DataError as e:
      skipped += 1
      log.warning("Skipping %s", e)
      continue
    h, w = pixels.shape[:2]
    image_id = _image_id(name, index)
    record = ImageRecord(image_id, path, w, h, "", -1, ())
    pending.append((image_id, name, pixels, transforms.encode_image(record, pixels, geometry,
                                                                    False)))
    if len(pending) == batch_size:
      flush()
  if pending:
    flush()
  with open(os.path.join(output_dir, "predictions.json"), "w") as f:
    json.dump(results, f)
  log.info("Predicted %d images (%d skipped) into %s.", len(names) - skipped, skipped,
           output_dir)
  return results

