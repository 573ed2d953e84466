"""tf.data input pipeline: training batches of image pairs, evaluation batches of single images.

Every batch has static shapes (the contract is ``transforms.image_spec``):
  training:   image [P, 2, H, W, 3], boxes [P, 2, M, 4], ...; P elements of two images, plus
              ``match_valid`` [P] (True where the element is a matched (user, shop) partner pair,
              axis 1 in that order; False where it is two images trained without the matching
              targets) and ``element`` [P] (the element's global stream index);
  evaluation: image [B, H, W, 3], ... plus ``valid`` [B] (False for padding after the last
              image).

A training epoch visits every image once (``pairs.PairIndex.epoch_elements``: a maximum matching
of the user-shop partners, the other images paired at random). The stream is a pure function of
(seed, global element index): element g of the stream is element ``g % E`` of epoch ``g // E``
(E = ceil(images / 2) elements per epoch), whose matching and order are drawn from
(seed, epoch); the flips come from (seed, g). Resuming at step k starts the stream at element
``k * P_global`` without touching the data before it, and each process reads its own slice of
every global batch (``jax.process_index()`` / ``process_count()``).

Decoding, resizing, flipping and mask rasterization run in numpy/OpenCV inside
``tf.numpy_function`` with parallel calls (OpenCV and Pillow release the GIL); tf.data provides
the parallelism, ordering, batching and prefetching.
"""

from __future__ import annotations

import functools
import logging
import os
import threading

import numpy as np
import tensorflow as tf

from data_pipeline import transforms
from data_pipeline.pairs import EpochElements, PairIndex
from data_pipeline.records import DataError
from data_pipeline.sources import DataSource
from data_pipeline.transforms import ImageGeometry

log = logging.getLogger(__name__)

_MAX_SUBSTITUTIONS = 16


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Deferred: only the process layout is needed from jax.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


class _SkipCounter:
  """Counts images that failed to load in the stream (each logged once, with the reason)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.skipped: dict[int, str] = {}

  def add(self, record_index: int, error: Exception) -> None:
    with self._lock:
      if record_index not in self.skipped:
        self.skipped[record_index] = str(error)
        log.warning("Skipping image (%d skipped so far): %s", len(self.skipped), error)


class TrainStream:
  """Maps global element indices to encoded elements of two images (host-side, numpy).

  Each epoch's elements are computed once (an LRU cache of two: the parallel map calls may
  straddle an epoch boundary).
  """

  def __init__(self, source: DataSource, pair_index: PairIndex, geometry: ImageGeometry,
               seed: int, flip_prob: float = 0.5, group_size: int = 1):
    if pair_index.epoch_size == 0:
      raise ValueError("The training source has no images.")
    self.source = source
    self.pair_index = pair_index
    self.geometry = geometry
    self.seed = seed
    self.flip_prob = flip_prob
    self.group_size = group_size
    self.skips = _SkipCounter()
    self._epoch_cache = functools.lru_cache(maxsize=2)(self._epoch)
    self.keys = list(transforms.image_spec(geometry))

  def _epoch(self, epoch: int) -> EpochElements:
    return self.pair_index.epoch_elements(epoch, self.seed, self.group_size)

  def _encode(self, record_index: int, flip: bool) -> dict[str, np.ndarray]:
    record = self.source.records[record_index]
    return transforms.encode_image(record, self.source.load_image(record_index),
                                   self.geometry, flip)

  def element(self, g: int) -> dict[str, np.ndarray]:
    """Element g of the stream: dict of [2, ...] arrays plus match_valid and element.

    An element with an image that fails to load is replaced by the next element of the epoch
    (with that element's match_valid).
    """
    size = self.pair_index.epoch_size
    epoch, pos = divmod(int(g), size)
    rng = np.random.default_rng([self.seed, int(g), 7])
    flips = rng.random(2) < self.flip_prob
    elements, match_valid = self._epoch_cache(epoch)
    for attempt in range(_MAX_SUBSTITUTIONS):
      k = (pos + attempt) % size
      first, second = (int(i) for i in elements[k])
      try:
        encoded = [self._encode(first, bool(flips[0])), self._encode(second, bool(flips[1]))]
        break
      except DataError as e:  # An image that passed the scan but fails now: skip, never crash.
        bad = first if e.path == self.source.records[first].image_path else second
        self.skips.add(bad, e)
    else:
      raise RuntimeError(f"{_MAX_SUBSTITUTIONS} consecutive elements failed to load near "
                         f"element {g}; see the warnings above.")
    out = {key: np.stack([encoded[0][key], encoded[1][key]]) for key in self.keys}
    out["match_valid"] = np.bool_(match_valid[k])
    out["element"] = np.int64(g)
    return out


def _output_signature(geometry: ImageGeometry, lead: tuple[int, ...]):
  spec = transforms.image_spec(geometry)
  return {k: (lead + shape, dtype) for k, (shape, dtype) in spec.items()}


def _numpy_map(fn, signature: dict[str, tuple[tuple[int, ...], np.dtype]]):
  """Wraps ``fn(int) -> dict of arrays`` as a tf.data map function with static shapes."""
  keys = list(signature)

  def py(index):
    result = fn(int(index))
    return [np.asarray(result[k], signature[k][1]) for k in keys]

  def mapped(index):
    values = tf.numpy_function(py, [index], [tf.as_dtype(signature[k][1]) for k in keys],
                               stateful=False)
    return {k: tf.ensure_shape(v, signature[k][0]) for k, v in zip(keys, values)}

  return mapped


def train_dataset(source: DataSource, pair_index: PairIndex, geometry: ImageGeometry, *,
                  global_batch_pairs: int, seed: int, start_step: int = 0,
                  flip_prob: float = 0.5, process_index: int | None = None,
                  process_count: int | None = None, num_parallel_calls: int = -1,
                  prefetch: int = 2, category_batches: bool = False) -> tf.data.Dataset:
  """An infinite dataset of this process's training batches, from step ``start_step`` on.

  Each batch holds ``global_batch_pairs / process_count`` elements of two images (matched
  partner pairs or two images with the matching targets masked): this process's slice of the
  global batch. Deterministic for a seed, whatever the parallelism. With
  ``category_batches`` the matched elements of one global batch share the user image's
  category where the epoch allows (``PairIndex.epoch_elements`` with ``group_size``
  global_batch_pairs): the matching loss then sees same-category negatives every step.
  """
  pi, pc = _process_info(process_index, process_count)
  if global_batch_pairs % pc:
    raise ValueError(f"global_batch_pairs={global_batch_pairs} is not divisible by the "
                     f"{pc} processes.")
  local = global_batch_pairs // pc
  stream = TrainStream(source, pair_index, geometry, seed, flip_prob,
                       group_size=global_batch_pairs if category_batches else 1)
  signature = _output_signature(geometry, (2,))
  signature["match_valid"] = ((), np.dtype(np.bool_))
  signature["element"] = ((), np.dtype(np.int64))

  # Local element k of this process is global element (k // local) * P + pi * local + k % local.
  start = start_step * local
  ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
  ds = ds.map(lambda k: (k // local) * global_batch_pairs + pi * local + k % local)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = 0
  ds = ds.with_options(options)
  ds = ds.map(_numpy_map(stream.element, signature),
              num_parallel_calls=num_parallel_calls if num_parallel_calls > 0 else tf.data.AUTOTUNE,
              deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(prefetch)
  ds.stream = stream  # For skip counts and tests.
  return ds


def eval_indices(num_images: int, batch_size: int, process_index: int,
                 process_count: int) -> np.ndarray:
  """This process's record indices in file order, padded with -1 to whole batches.

  Every process gets the same number of batches (a multi-host evaluation stays in step); each
  image appears exactly once over all processes.
  """
  shards = np.array_split(np.arange(num_images), process_count)
  per_process = max(len(s) for s in shards)
  padded = -(-per_process // batch_size) * batch_size if per_process else batch_size
  mine = shards[process_index]
  return np.concatenate([mine, np.full(padded - len(mine), -1, np.int64)])


def eval_dataset(source: DataSource, geometry: ImageGeometry, *, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 num_parallel_calls: int = -1, prefetch: int = 2) -> tf.data.Dataset:
  """Single images in file order, no flip, nothing dropped; the last batch padded (valid=0).

  ``batch_size`` is per process. A record that fails to load is logged, counted and returned
  as a padding entry (valid False), so evaluation completes.
  """
  pi, pc = _process_info(process_index, process_count)
  indices = eval_indices(len(source.records), batch_size, pi, pc)
  spec = transforms.image_spec(geometry)
  signature = dict(spec)
  signature["valid"] = ((), np.dtype(np.bool_))
  skips = _SkipCounter()

  def element(i):
    if i >= 0:
      try:
        out = transforms.encode_image(source.records[i], source.load_image(i), geometry, False)
        out["valid"] = np.bool_(True)
        return out
      except DataError as e:
        skips.add(i, e)
    out = {k: np.zeros(shape, dtype) for k, (shape, dtype) in spec.items()}
    out["valid"] = np.bool_(False)
    return out

  ds = tf.data.Dataset.from_tensor_slices(indices)
  # No autotuning: destroying a finished evaluation iterator waited for tf.data's autotuning
  # thread to end its sleep, up to 17 s (caught with py-spy on the 2-core machine, in about one
  # evaluation in four; an evaluation during training pays it every time it happens). The map
  # runs on every core instead.
  options = tf.data.Options()
  options.autotune.enabled = False
  ds = ds.with_options(options)
  ds = ds.map(_numpy_map(element, signature),
              num_parallel_calls=num_parallel_calls if num_parallel_calls > 0 else
              (os.cpu_count() or 1), deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=False).prefetch(prefetch)
  ds.skips = skips
  return ds
