r"""TFDS builder for DeepFashion2, reading an unpacked release from ``manual_dir``.

  python -m data_pipeline.tfds_deepfashion2 --manual_dir ROOT --data_dir ~/tensorflow_datasets

``ROOT`` holds ``train/{image,annos}`` and ``validation/{image,annos}`` (the release layout;
the synthetic generator writes the same). Every file is validated on the way in: bad files are
skipped, counted and logged, exactly as the raw reader does.

Each example stores the image file's original bytes (no re-encoding; our loader converts any
mode to RGB) and the annotation as its validated JSON text, so the TFDS data holds nothing the
raw reader would not accept. The data is written as ArrayRecord, which gives random access:
``tfds_source`` turns a split into a ``DataSource`` for the pipeline, whose resumable,
per-element-seeded stream needs exactly that.
"""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import annotations, images
from data_pipeline.sources import DataSource

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "validation": "validation"}


class Deepfashion2(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """DeepFashion2: clothing detection, landmarks, segmentation and retrieval.

  Not registered by name (it is built directly from this module; registering would clash
  when the module also runs as ``__main__``)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Raw bytes + validated per-image annotation JSON."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Request DeepFashion2 from its authors (non-commercial research licence), unpack it and "
      "point manual_dir at the folder holding train/{image,annos} and "
      "validation/{image,annos}.")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image_bytes": tfds.features.Tensor(shape=(), dtype=np.object_),
            "file_name": tfds.features.Text(),
            "image_id": np.int64,
            "width": np.int32,
            "height": np.int32,
            "annotation": tfds.features.Text(),
        }),
        homepage="https://github.com/switchablenorms/DeepFashion2",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = dl_manager.manual_dir
    return {name: self._generate_examples(os.path.join(root, folder))
            for name, folder in SPLITS.items() if os.path.isdir(os.path.join(root, folder))}

  def _generate_examples(self, split_dir: str):
    scan = annotations.scan_raw_root(split_dir)
    if scan.num_skipped:
      log.warning("%s: %d files skipped (see the warnings above).", split_dir, scan.num_skipped)
    for record in scan.records:
      with open(record.image_path, "rb") as f:
        data = f.read()
      with open(record.anno_path) as f:
        anno = json.load(f)
      yield record.image_id, {
          "image_bytes": data,
          "file_name": os.path.basename(record.image_path),
          "image_id": record.image_id,
          "width": record.width,
          "height": record.height,
          "annotation": json.dumps(anno, sort_keys=True),
      }


def prepare(manual_dir: str, data_dir: str) -> Deepfashion2:
  """Builds (once) the ArrayRecord-backed TFDS data from ``manual_dir``."""
  builder = Deepfashion2(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
      file_format="array_record")
  return builder


def tfds_source(data_dir: str, split: str) -> DataSource:
  """A prepared split as a pipeline ``DataSource`` (random access, validated records)."""
  builder = Deepfashion2(data_dir=data_dir)
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"No prepared DeepFashion2 TFDS data in {data_dir} (config.data.tfds_data_dir). "
        f"Prepare it once from the unpacked release: python -m data_pipeline.tfds_deepfashion2 "
        f"--manual_dir /path/to/deepfashion2 --data_dir {data_dir}")
  if split not in builder.info.splits:
    raise FileNotFoundError(f"The TFDS data in {data_dir} has no split {split!r} (it has "
                            f"{sorted(builder.info.splits)}); prepare it from a release that "
                            f"holds {split}/")
  data = builder.as_data_source(split=split)
  records = []
  for i in range(len(data)):
    ex = data[i]
    name = f"tfds:{builder.name}/{split}[{i}]"
    records.append(annotations.parse_raw_annotation(
        json.loads(ex["annotation"]), anno_path=name, image_id=int(ex["image_id"]),
        image_path="", width=int(ex["width"]), height=int(ex["height"])))

  def loader(index: int) -> np.ndarray:
    return images.decode_image_bytes(data[index]["image_bytes"],
                                     f"tfds:{builder.name}/{split}[{index}]")

  return DataSource(records, loader, f"tfds:{data_dir}/{builder.name}/{split}")


def main(argv):
  del argv
  from absl import flags
  logging.basicConfig(level=logging.INFO)
  builder = prepare(flags.FLAGS.manual_dir, flags.FLAGS.data_dir)
  log.info("Prepared %s: %s", builder.data_dir,
           {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == "__main__":
  from absl import app, flags
  # The builder must come from the package module, not from __main__ (TFDS locates a builder's
  # files through its class's module, and "__main__" is not a package).
  from data_pipeline import tfds_deepfashion2 as _package_module
  flags.DEFINE_string("manual_dir", None, "DeepFashion2 root (train/, validation/).",
                      required=True)
  flags.DEFINE_string("data_dir", os.path.expanduser("~/tensorflow_datasets"),
                      "TFDS data directory.")
  app.run(_package_module.main)
