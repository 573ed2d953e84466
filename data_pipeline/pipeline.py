"""tf.data input pipeline: training batches of image pairs, evaluation batches of single images.

Every batch has static shapes (the contract is ``transforms.image_spec``); with orientation
buckets (``ImageGeometry.buckets``) H x W is one of a few canvases, the same for every image of
a batch (each canvas shape is one compiled program of the step):
  training:   image [P, 2, H, W, 3], boxes [P, 2, M, 4], ...; P elements of two images, plus
              ``match_valid`` [P] (True where the element is a matched (user, shop) partner pair,
              axis 1 in that order; False where it is two images trained without the matching
              targets) and ``element`` [P] (the element's global stream index);
  evaluation: image [B, H, W, 3], ... plus ``valid`` [B] (False for padding after the last
              image).

A training epoch (``pairs.PairIndex.epoch_elements``) visits every image once ("matching": a
maximum matching of the user-shop partners, the other images paired at random) or every
partner pair once ("all_pairs"; the images without a partner paired at random). The stream is a
pure function of (seed, global element index): element g of the stream is element ``g % E`` of
epoch ``g // E`` (E = ``PairIndex.epoch_size`` elements per epoch), whose matching and order
are drawn from (seed, epoch); the flips come from (seed, g). Resuming at step k starts the
stream at element ``k * P_global`` without touching the data before it, and each process reads
its own slice of every global batch (``jax.process_index()`` / ``process_count()``). With
buckets an epoch's order is laid out in runs of P_global elements of one orientation
(``PairIndex.epoch_elements`` with ``fit``), and global batch k goes onto the smallest canvas
holding all of its images: a function of the records and (seed, k) alone, so resumption and
process sharding hold.

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
from data_pipeline.records import DataSource
from data_pipeline.transforms import ImageGeometry

log = logging.getLogger(__name__)

_MAX_SUBSTITUTIONS = 16


def _process_info(process_index, process_count):
  if process_index is None or process_count is None:
    import jax  # Deferred: only the process layout is needed from jax.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  return int(process_index), int(process_count)


def host_cores() -> int:
  """The CPU cores this process may run on (its affinity mask: a job pinned to some cores of a
  node gets those), for the input pipeline's parallel decoding."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # not on Linux
    return max(1, os.cpu_count() or 1)


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

  Each epoch's elements are computed once (an LRU cache: the parallel map calls may straddle
  an epoch boundary). With orientation buckets (``geometry.buckets``) every element of global
  batch k (elements k * batch_pairs ... + batch_pairs - 1) is padded onto the batch's canvas:
  the smallest of ``geometry.canvases`` that holds all of the batch's images, a pure function
  of the records and (seed, k), so every process of a run picks the same one.
  """

  def __init__(self, source: DataSource, pair_index: PairIndex, geometry: ImageGeometry,
               seed: int, flip_prob: float = 0.5, batch_pairs: int = 1,
               categories: bool = False):
    if pair_index.epoch_size == 0:
      raise ValueError("The training source has no images.")
    self.source = source
    self.pair_index = pair_index
    self.geometry = geometry
    self.seed = seed
    self.flip_prob = flip_prob
    self.batch_pairs = batch_pairs
    self.categories = categories
    self.skips = _SkipCounter()
    self.fit = (np.array([geometry.fit_mask(r.height, r.width) for r in source.records],
                         np.int64) if geometry.buckets else None)
    self._epoch_cache = functools.lru_cache(maxsize=4)(self._epoch)
    self._canvas_cache = functools.lru_cache(maxsize=64)(self._batch_canvas)
    self.keys = list(transforms.image_spec(geometry))

  def _epoch(self, epoch: int) -> EpochElements:
    # Runs of one batch: of one category (``categories``), of one canvas (buckets), laid on
    # the stream's batches; otherwise a plain shuffle.
    return self.pair_index.epoch_elements(
        epoch, self.seed, self.batch_pairs, categories=self.categories, fit=self.fit,
        batch_offset=epoch * self.pair_index.epoch_size % self.batch_pairs)

  def _records(self, g: int) -> np.ndarray:
    epoch, pos = divmod(int(g), self.pair_index.epoch_size)
    return self._epoch_cache(epoch).elements[pos]

  def _batch_canvas(self, k: int) -> int:
    mask = -1
    for g in range(k * self.batch_pairs, (k + 1) * self.batch_pairs):
      first, second = self._records(g)
      mask &= int(self.fit[first]) & int(self.fit[second])
    return transforms.canvas_index(mask)

  def canvas(self, g: int) -> int:
    """The canvas index (``geometry.canvases``) of element g's batch."""
    if self.fit is None:
      return len(self.geometry.canvases) - 1
    return self._canvas_cache(int(g) // self.batch_pairs)

  def _encode(self, record_index: int, flip: bool, canvas_hw) -> dict[str, np.ndarray]:
    record = self.source.records[record_index]
    return transforms.encode_image(record, self.source.load_image(record_index),
                                   self.geometry, flip, canvas_hw)

  def element(self, g: int) -> dict[str, np.ndarray]:
    """Element g of the stream: dict of [2, ...] arrays plus match_valid and element.

    An element with an image that fails to load is replaced by the next element of the epoch
    that fits the batch's canvas (with that element's match_valid).
    """
    size = self.pair_index.epoch_size
    epoch, pos = divmod(int(g), size)
    rng = np.random.default_rng([self.seed, int(g), 7])
    flips = rng.random(2) < self.flip_prob
    elements, match_valid = self._epoch_cache(epoch)
    c = self.canvas(g)
    canvas_hw = self.geometry.canvases[c]
    failures = 0
    for attempt in range(size):
      k = (pos + attempt) % size
      first, second = (int(i) for i in elements[k])
      if attempt and self.fit is not None and not (self.fit[first] & self.fit[second]) >> c & 1:
        continue  # A substitute must fit the batch's canvas.
      try:
        encoded = [self._encode(first, bool(flips[0]), canvas_hw),
                   self._encode(second, bool(flips[1]), canvas_hw)]
        break
      except DataError as e:  # An image that passed the scan but fails now: skip, never crash.
        bad = first if e.path == self.source.records[first].image_path else second
        self.skips.add(bad, e)
        failures += 1
        if failures == _MAX_SUBSTITUTIONS:
          break
    else:
      failures = _MAX_SUBSTITUTIONS
    if failures == _MAX_SUBSTITUTIONS:
      raise RuntimeError(f"{_MAX_SUBSTITUTIONS} elements failed to load near element {g}; see "
                         f"the warnings above.")
    out = {key: np.stack([encoded[0][key], encoded[1][key]]) for key in self.keys}
    out["match_valid"] = np.bool_(match_valid[k])
    out["element"] = np.int64(g)
    return out


def _output_signature(geometry: ImageGeometry, lead: tuple[int, ...]):
  """The static shapes of an element; with buckets the image's height and width vary by batch
  (None: each batch has one canvas, and each canvas shape is one compiled program)."""
  spec = transforms.image_spec(geometry)
  out = {k: (lead + shape, dtype) for k, (shape, dtype) in spec.items()}
  if geometry.buckets:
    out["image"] = (lead + (None, None, 3), out["image"][1])
  return out


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
  global_batch_pairs): the matching loss then sees same-category negatives every step. With
  ``geometry.buckets`` each global batch is on one canvas (``TrainStream``), most of them a
  bucket's: the image's height and width then vary from batch to batch.
  """
  pi, pc = _process_info(process_index, process_count)
  if global_batch_pairs % pc:
    raise ValueError(f"global_batch_pairs={global_batch_pairs} is not divisible by the "
                     f"{pc} processes.")
  local = global_batch_pairs // pc
  stream = TrainStream(source, pair_index, geometry, seed, flip_prob,
                       batch_pairs=global_batch_pairs, categories=category_batches)
  signature = _output_signature(geometry, (2,))
  signature["match_valid"] = ((), np.dtype(np.bool_))
  signature["element"] = ((), np.dtype(np.int64))

  # Local element k of this process is global element (k // local) * P + pi * local + k % local.
  start = start_step * local
  ds = tf.data.Dataset.range(start, np.iinfo(np.int64).max)
  ds = ds.map(lambda k: (k // local) * global_batch_pairs + pi * local + k % local)
  # One decoding call per core this process may use (OpenCV releases the GIL), on a private
  # pool of that size.
  workers = num_parallel_calls if num_parallel_calls > 0 else host_cores()
  options = tf.data.Options()
  options.deterministic = True
  options.threading.private_threadpool_size = workers
  ds = ds.with_options(options)
  ds = ds.map(_numpy_map(stream.element, signature), num_parallel_calls=workers,
              deterministic=True)
  ds = ds.batch(local, drop_remainder=True)
  ds = ds.prefetch(prefetch)
  ds.stream = stream  # For skip counts and tests.
  return ds


def eval_indices(num_images: int, batch_size: int, process_index: int, process_count: int,
                 canvas: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """This process's record indices, padded with -1 to whole batches, and each entry's canvas.

  Each process takes a contiguous shard of the records. Without ``canvas`` (each image's
  canvas index, e.g. ``transforms.canvas_index`` of its fit mask) the shard is in file order
  on canvas 0. With it the shard is grouped by canvas (file order within a canvas), each
  canvas padded to whole batches: every process gets the same number of batches of each
  canvas, in the same order (a multi-host evaluation stays in step, each step one program
  over every device); each image appears exactly once over all processes.
  """
  shards = np.array_split(np.arange(num_images), process_count)
  if canvas is None:
    canvas = np.zeros(num_images, np.int64)
  canvas = np.asarray(canvas, np.int64)
  mine = shards[process_index]
  indices, canvases = [], []
  for c in np.unique(canvas):
    most = max(int(np.sum(canvas[s] == c)) for s in shards)
    padded = -(-most // batch_size) * batch_size
    chosen = mine[canvas[mine] == c]
    indices.append(np.concatenate([chosen, np.full(padded - len(chosen), -1, np.int64)]))
    canvases.append(np.full(padded, c, np.int64))
  if not indices or not sum(len(i) for i in indices):
    return np.full(batch_size, -1, np.int64), np.zeros(batch_size, np.int64)
  return np.concatenate(indices), np.concatenate(canvases)


def eval_dataset(source: DataSource, geometry: ImageGeometry, *, batch_size: int,
                 process_index: int | None = None, process_count: int | None = None,
                 num_parallel_calls: int = -1, prefetch: int = 2) -> tf.data.Dataset:
  """Single images, no flip, nothing dropped; each canvas's last batch padded (valid=0).

  ``batch_size`` is per process. With ``geometry.buckets`` every image goes onto the smallest
  canvas that holds it (``eval_indices``: batches grouped by canvas), else onto
  ``geometry.canvas_hw`` in file order. A record that fails to load is logged, counted and
  returned as a padding entry (valid False), so evaluation completes.
  """
  pi, pc = _process_info(process_index, process_count)
  canvases = geometry.canvases
  canvas = (transforms.canvas_index(np.array([geometry.fit_mask(r.height, r.width)
                                              for r in source.records], np.int64))
            if geometry.buckets else None)
  # Without buckets every entry is on canvas 0, the only one.
  indices, entry_canvas = eval_indices(len(source.records), batch_size, pi, pc, canvas)
  signature = _output_signature(geometry, ())
  signature["valid"] = ((), np.dtype(np.bool_))
  skips = _SkipCounter()

  def element(entry):
    i = int(indices[entry])
    canvas_hw = canvases[int(entry_canvas[entry])]
    if i >= 0:
      try:
        out = transforms.encode_image(source.records[i], source.load_image(i), geometry, False,
                                      canvas_hw)
        out["valid"] = np.bool_(True)
        return out
      except DataError as e:
        skips.add(i, e)
    out = {k: np.zeros(shape, dtype)
           for k, (shape, dtype) in transforms.image_spec(geometry, canvas_hw).items()}
    out["valid"] = np.bool_(False)
    return out

  ds = tf.data.Dataset.range(len(indices))
  # No autotuning: destroying a finished evaluation iterator waited for tf.data's autotuning
  # thread to end its sleep, up to 17 s (caught with py-spy on the 2-core machine, in about one
  # evaluation in four; an evaluation during training pays it every time it happens). The map
  # runs on every core instead.
  options = tf.data.Options()
  options.autotune.enabled = False
  ds = ds.with_options(options)
  ds = ds.map(_numpy_map(element, signature),
              num_parallel_calls=num_parallel_calls if num_parallel_calls > 0 else
              host_cores(), deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=False).prefetch(prefetch)
  ds.skips = skips
  return ds
