"""Data sources of a config: validated records plus random access to their pixels.

The pipeline reads every input the same way (``records.DataSource``): ``source.records[i]``
(metadata, small) and ``source.load_image(i)`` (uint8 [H, W, 3]). Four kinds exist
(``FORMATS``): a DeepFashion2 root in the raw layout, a COCO-format JSON with its image folder,
the TFDS builder's prepared data (``tfds_deepfashion2``) and the synthetic generator's data.
"""

from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from data_pipeline import annotations, images
from data_pipeline import spec as spec_lib
from data_pipeline.records import DataSource, ImageRecord
from df2_jax.errors import ConfigError

log = logging.getLogger(__name__)

FORMATS = ("raw", "coco", "tfds", "synthetic")  # config.data.format


def _path_loader(records: list[ImageRecord]) -> Callable[[int], np.ndarray]:
  return lambda i: images.load_image(records[i].image_path)


def raw_source(root: str, *, strict: bool = False, check_image: str = "decode",
               num_workers: int | None = None) -> DataSource:
  """A split directory in the raw layout (``root/image``, ``root/annos``)."""
  scan = annotations.scan_raw_root(root, strict=strict, check_image=check_image,
                                   num_workers=num_workers)
  return DataSource(scan.records, _path_loader(scan.records), str(root), scan.counts)


def coco_source(json_path: str, image_dir: str, *, spec: spec_lib.DatasetSpec,
                strict: bool = False, check_image: str = "decode",
                num_workers: int | None = None) -> DataSource:
  """A COCO-format JSON of the taxonomy ``spec`` (the official DeepFashion2 conversion, or
  one's own set) and its image folder."""
  scan = annotations.read_coco(json_path, image_dir, spec=spec, strict=strict,
                               check_image=check_image, num_workers=num_workers)
  return DataSource(scan.records, _path_loader(scan.records), str(json_path), scan.counts)


def ensure_synthetic(data) -> str:
  """The synthetic dataset of ``data`` (a ConfigDict), generated on first use and cached.

  The cache folder is ``synthetic.cache_root`` (settings and generator version), so changing the
  recipe generates a new dataset instead of reusing a stale one.
  """
  import os
  from data_pipeline import synthetic
  root = synthetic.cache_root(data.synthetic_dir, data.synthetic_train_pairs,
                             data.synthetic_val_pairs, data.synthetic_image_size,
                             data.synthetic_seed)
  if not os.path.exists(os.path.join(root, synthetic.COMPLETE)):
    log.info("Generating the synthetic DeepFashion2 dataset in %s (cached for later runs).", root)
    synthetic.generate(root, data.synthetic_train_pairs, data.synthetic_val_pairs,
                       data.synthetic_image_size, data.synthetic_seed,
                       workers=max(1, os.cpu_count() or 1))
    synthetic.mark_complete(root)
  return root


def prepare(data) -> None:
  """What ``config.data`` needs before its splits are read: the synthetic dataset generated on
  first use (``ensure_synthetic``); nothing for the other formats. One process of a run calls
  it while the others wait (``parallel.on_process_zero``): two processes writing the same
  files at once would corrupt them."""
  if data.format == "synthetic":
    ensure_synthetic(data)


def resolve_spec(data) -> spec_lib.DatasetSpec:
  """The dataset spec of ``config.data``, written into ``data.spec`` (so the run's config and
  every checkpoint carry it): for format "coco" read from ``coco_json_train`` and
  ``spec_file`` (``spec.from_coco``); for the others DeepFashion2's, as the config has it.

  Raises:
    ConfigError: a spec file given for a format other than "coco".
    DataError: a bad spec (one line naming the file and the field).
  """
  if data.format != "coco":
    if data.spec_file:
      raise ConfigError(f"config.data.spec_file={data.spec_file!r} is read for "
                        f"config.data.format='coco' only (got {data.format!r})")
    return spec_lib.from_config(data)
  found = spec_lib.from_coco(data.coco_json_train, data.spec_file)
  if found != spec_lib.from_config(data):
    data.spec = found.to_dict()
  log.info("%s (from %s%s)", found.describe(), data.coco_json_train,
           f" and {data.spec_file}" if data.spec_file else "")
  if not found.has_pairs:
    log.info("The dataset has no user/shop pairs: the matching loss and the retrieval metrics "
             "are off.")
  return found


def source_from_config(data, split: str) -> DataSource:
  """The ``DataSource`` of one split as ``config.data`` describes it.

  ``data.format``: "raw" (``data.root/split``), "coco" (``coco_json_{train,eval}`` with
  ``coco_images_{train,eval}``; ``split`` must be ``data.train_split`` or
  ``data.eval_split``), "tfds" (``tfds_data_dir``), "synthetic" (generated on first use).
  """
  import os
  kw = dict(strict=data.strict, check_image=data.check_images,
            num_workers=data.num_workers or None)
  if data.format == "synthetic":
    return raw_source(os.path.join(ensure_synthetic(data), split), **kw)
  if data.format == "raw":
    if not data.root:
      raise ConfigError("config.data.root is empty: set it to the DeepFashion2 root "
                       "(holding train/ and validation/), or use config.data.format=synthetic")
    return raw_source(os.path.join(data.root, split), **kw)
  if data.format == "coco":
    which = "train" if split == data.train_split else "eval"
    json_path, image_dir = data[f"coco_json_{which}"], data[f"coco_images_{which}"]
    if not json_path or not image_dir:
      raise ConfigError(f"config.data.coco_json_{which} / coco_images_{which} must be set "
                       f"for format=coco")
    return coco_source(json_path, image_dir, spec=spec_lib.from_config(data), **kw)
  if data.format == "tfds":
    from data_pipeline import tfds_deepfashion2
    return tfds_deepfashion2.tfds_source(data.tfds_data_dir, split)
  raise ConfigError(f"config.data.format={data.format!r}: expected one of {FORMATS}")
