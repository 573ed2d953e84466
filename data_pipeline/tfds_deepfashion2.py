r"""TFDS builder for DeepFashion2, reading an unpacked release from ``manual_dir``.

  python -m data_pipeline.tfds_deepfashion2 --manual_dir ROOT --data_dir ~/tensorflow_datasets

``ROOT`` holds ``train/{image,annos}`` and ``validation/{image,annos}`` (the release layout;
the synthetic generator writes the same). Every file is validated on the way in by the raw
reader: bad images are left out, and bad items, polygons and landmarks are dropped, each counted
and logged (``annotations.scan_raw_root``).

Each example stores the image file's original bytes (no re-encoding; our loader converts any
mode to RGB) and the annotation as its JSON text, which ``tfds_source`` validates again with
the same code, dropping the same items, polygons and landmarks, so the TFDS data yields nothing
the raw reader would not. The data is written as ArrayRecord, which gives random access:
``tfds_source`` turns a split into a ``DataSource`` for the pipeline, whose resumable,
per-element-seeded stream needs exactly that.

A release folder that yields no record (no train/ or validation/ folder, a split without
annos/ or image/, or a split whose files all fail validation) is an error naming the folder and
what is missing (exit status 1), and nothing is written. A complete build holds a marker,
``deepfashion2_build.json``: the release folder it was built from, and per split the records
written, the files skipped ("skipped", the images dropped), what the scan dropped ("dropped":
images, items, polygons, landmarks; ``tfds_source`` gives them to its ``DataSource``, so that an
evaluation from TFDS knows the ground truth it lacks) and the files the split's annos/ and
image/ held. It is written
inside TFDS's temporary folder, so it appears with the data or not at all. ``prepare`` reuses a
build only when the marker agrees with the data (same record counts, none zero) and with the
release folder (same folder, same file counts); a build without it (empty, interrupted, or from
before the marker) or from a changed folder is rebuilt; a complete build from another folder is
refused (delete it, or use another --data_dir). ``tfds_source`` reads only complete builds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import tensorflow_datasets as tfds

from data_pipeline import annotations, images, records as records_lib
from data_pipeline.records import DataSource
from df2_jax import files
from df2_jax import errors
from df2_jax.errors import Df2Error

log = logging.getLogger(__name__)

SPLITS = {"train": "train", "validation": "validation"}
# Written last into a build (see the module docstring); its absence means "not complete".
MARKER = "deepfashion2_build.json"
_MARKER_FORMAT = 1
_COMMAND = "python -m data_pipeline.tfds_deepfashion2 --manual_dir /path/to/deepfashion2"


class NotPrepared(Df2Error, FileNotFoundError):
  """No complete build of the split in the TFDS data folder (one line saying how to prepare)."""


class PrepareError(Df2Error, RuntimeError):
  """The release folder gives no usable build, or the existing build is not this folder's.
  The message is one line naming the folder and what is missing."""


def split_dirs(manual_dir: str) -> dict[str, str]:
  """Split name -> its folder in the release folder ``manual_dir``, checked for annos/ and
  image/.

  Raises:
    PrepareError: no split folder, or a split folder without annos/ or image/ (0 records).
  """
  if not os.path.isdir(manual_dir):
    raise PrepareError(f"{manual_dir}: no such folder (--manual_dir is the DeepFashion2 root "
                       f"holding train/ and validation/)")
  found = {name: os.path.join(manual_dir, folder) for name, folder in SPLITS.items()
           if os.path.isdir(os.path.join(manual_dir, folder))}
  if not found:
    hint = ""
    if any(os.path.isdir(os.path.join(manual_dir, sub)) for sub in ("annos", "image")):
      hint = ("; it looks like one split's folder: point --manual_dir at the folder holding "
              "train/ and validation/")
    raise PrepareError(f"{manual_dir}: no train/ or validation/ folder, 0 records (expected "
                       f"train/{{image,annos}} and/or validation/{{image,annos}}){hint}")
  for split_dir in found.values():
    for sub in ("annos", "image"):
      if not os.path.isdir(os.path.join(split_dir, sub)):
        raise PrepareError(f"{split_dir}: no {sub}/ folder, 0 records (a split folder holds "
                           f"image/ and annos/)")
  return found


def _file_counts(split_dir: str) -> dict[str, int]:
  """Files in the split's annos/ (.json) and image/ (image extensions): cheap to recount, so a
  changed release folder is noticed without reading it."""
  counts = {}
  for sub, extensions in (("annos", (".json",)), ("image", images.IMAGE_EXTENSIONS)):
    with os.scandir(os.path.join(split_dir, sub)) as entries:
      counts[sub] = sum(1 for e in entries
                        if os.path.splitext(e.name)[1].lower() in extensions)
  return counts


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
    """Scans every split before anything is written; a split without records is an error."""
    root = os.path.realpath(os.fspath(dl_manager.manual_dir))
    self._source = {"format": _MARKER_FORMAT, "source": root, "splits": {}}
    generators = {}
    for name, split_dir in split_dirs(root).items():
      counts = _file_counts(split_dir)
      scan = annotations.scan_raw_root(split_dir)
      if not scan.records:
        if not counts["annos"]:
          why = f"annos/ holds no .json file ({counts['image']} images in image/)"
        elif not counts["image"]:
          why = f"image/ holds no image ({counts['annos']} files in annos/)"
        else:
          why = (f"none of {counts['annos']} annotation files and {counts['image']} images is "
                 f"readable (first: {scan.skipped[0][1]})")
        raise PrepareError(f"{split_dir}: 0 records: {why}")
      if scan.counts:
        log.warning("%s: dropped %s (see the warnings above).", split_dir, scan.counts)
      self._source["splits"][name] = {"folder": split_dir, "records": len(scan.records),
                                      "skipped": scan.num_skipped,
                                      "dropped": scan.counts.as_dict(), "files": counts}
      generators[name] = self._generate_examples(scan)
    return generators

  def _download_and_prepare(self, dl_manager, download_config):
    """TFDS's build, then the marker, written into TFDS's temporary folder (``data_dir`` here)
    once every split holds the records its scan found."""
    super()._download_and_prepare(dl_manager, download_config)
    written = {name: int(info.num_examples) for name, info in self.info.splits.items()}
    expected = {name: split["records"] for name, split in self._source["splits"].items()}
    if written != expected:
      raise PrepareError(f"{self._source['source']}: the build holds {written} records, the "
                         f"scan found {expected}")
    files.write_json(os.path.join(os.fspath(self.data_dir), MARKER), self._source, indent=1)

  def _generate_examples(self, scan: records_lib.ScanResult):
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


def read_marker(builder: Deepfashion2) -> tuple[dict | None, str]:
  """(the marker, '') of a complete build; (None or the marker, why not) otherwise.

  Complete: TFDS's data is there, the marker is readable and names the same splits with the
  same record counts as the data, none of them zero.
  """
  path = os.fspath(builder.data_path)
  if not builder.is_prepared():
    return None, f"{path} holds no prepared data"
  try:
    with open(os.path.join(path, MARKER)) as f:
      marker = json.load(f)
    recorded = {name: int(split["records"]) for name, split in marker["splits"].items()}
    str(marker["source"])
  except FileNotFoundError:
    return None, f"{path} has no {MARKER}: an empty, interrupted or older build"
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    return None, f"{os.path.join(path, MARKER)} is unreadable ({e!r})"
  held = {name: int(info.num_examples) for name, info in builder.info.splits.items()}
  if held != recorded or not recorded or min(recorded.values()) <= 0:
    return marker, f"{path} is incomplete: it holds {held} records, its {MARKER} says {recorded}"
  return marker, ""


def prepare(manual_dir: str, data_dir: str) -> Deepfashion2:
  """Builds the ArrayRecord-backed TFDS data from ``manual_dir``, or reuses the complete build
  of the same, unchanged folder (see the module docstring).

  Raises:
    PrepareError: ``manual_dir`` yields no records (nothing is written), or ``data_dir``
      holds a complete build of another folder.
  """
  manual_dir = os.path.realpath(os.path.expanduser(os.fspath(manual_dir)))
  folders = split_dirs(manual_dir)  # Fails before anything is written.
  builder = Deepfashion2(data_dir=data_dir)
  path = os.fspath(builder.data_path)
  if os.path.exists(path):
    marker, why = read_marker(builder)
    if not why and marker["source"] != manual_dir:
      raise PrepareError(f"{path} was built from {marker['source']}, not {manual_dir}: delete "
                         f"it to rebuild from {manual_dir}, or use another --data_dir")
    if not why:
      changed = {name: _file_counts(folder) for name, folder in folders.items()}
      was = {name: split.get("files") for name, split in marker["splits"].items()}
      if changed == was:
        log.info("Reusing %s (built from %s: %s records)", path, manual_dir,
                 {name: split["records"] for name, split in marker["splits"].items()})
        return builder
      why = f"{manual_dir} changed since the build (files {was} then, {changed} now)"
    log.warning("Rebuilding %s: %s.", path, why)
    # Deleted here, not by TFDS's overwrite mode: a builder that found data on disk keeps that
    # data's DatasetInfo (and refuses the file format), so the new build needs a fresh one.
    shutil.rmtree(path)
    builder = Deepfashion2(data_dir=data_dir)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
      file_format="array_record")
  _, why = read_marker(builder)
  if why:
    raise PrepareError(f"{path}: the build did not complete: {why}")
  return builder


def tfds_source(data_dir: str, split: str) -> DataSource:
  """A prepared split as a pipeline ``DataSource`` (random access, validated records).

  Its ``dropped``: the images the build left out (its marker's count) and the items, polygons
  and landmarks this validation of the stored annotations drops again (the build's scan
  dropped the same ones; a build from before the marker recorded them held none).
  """
  builder = Deepfashion2(data_dir=data_dir)
  if not builder.is_prepared():
    raise NotPrepared(
        f"No prepared DeepFashion2 TFDS data in {data_dir} (config.data.tfds_data_dir). "
        f"Prepare it once from the unpacked release: {_COMMAND} --data_dir {data_dir}")
  marker, why = read_marker(builder)
  if why:
    raise NotPrepared(f"The DeepFashion2 TFDS data in {data_dir} is not a complete build "
                            f"({why}); prepare it again: {_COMMAND} --data_dir {data_dir}")
  if split not in builder.info.splits:
    raise NotPrepared(f"The TFDS data in {data_dir} has no split {split!r} (it has "
                            f"{sorted(builder.info.splits)}); prepare it from a release that "
                            f"holds {split}/")
  data = builder.as_data_source(split=split)
  records = []
  drops = annotations.Drops()  # logged once, by the build's scan; counted here
  for i in range(len(data)):
    ex = data[i]
    name = f"tfds:{builder.name}/{split}[{i}]"
    records.append(annotations.parse_raw_annotation(
        json.loads(ex["annotation"]), anno_path=name, image_id=int(ex["image_id"]),
        image_path="", width=int(ex["width"]), height=int(ex["height"]), drops=drops))
  built = marker["splits"][split]
  dropped = records_lib.DropCounts(images=int(built.get("dropped", {}).get(
      "images", built.get("skipped", 0)))) + drops.counts
  if dropped:
    log.warning("%s/%s: the build dropped %s as invalid (its scan's warnings name them).",
                data_dir, split, dropped)

  def loader(index: int) -> np.ndarray:
    return images.decode_image_bytes(data[index]["image_bytes"],
                                     f"tfds:{builder.name}/{split}[{index}]")

  return DataSource(records, loader, f"tfds:{data_dir}/{builder.name}/{split}", dropped)


def main(argv):
  del argv
  from absl import flags
  logging.basicConfig(level=logging.INFO)
  try:
    builder = prepare(flags.FLAGS.manual_dir, flags.FLAGS.data_dir)
  except Df2Error as e:  # PrepareError, DataError: one line
    return errors.report(e, log)
  log.info("Prepared %s: %s", builder.data_dir,
           {k: v.num_examples for k, v in builder.info.splits.items()})
  return 0


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
