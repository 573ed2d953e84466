r"""Query speed of the retrieval tool's gallery scoring (``retrieval.GalleryScorer``) against
galleries of 10k, 100k and 1M items, and the memory it takes.

  python bench/retrieval_query.py --sizes 10000,100000,1000000 --dim 256

For each size: a random gallery of ``--dim``-wide float32 embeddings (the recipe's embed_dim is
256) is written as an index part's ``embeddings.npy`` in a temporary folder and memory-mapped,
as ``query`` reads it; the scorer is built from it (the gallery copied to the default device:
the accelerator when there is one) and then asked for the top ``--top`` items of
  * one query at a time (a photo with one garment: latency), ``--repeats`` times;
  * ``--batch`` queries at once (many garments or photos: throughput).
Reported: build seconds, queries/s of each, and the process's peak resident memory after the
size (it only grows, so each line holds the largest gallery so far) with the device's memory in
use where the backend reports it. Every top-k is exact (the whole gallery is scored). No
TensorFlow and no model, so it runs as it is on the GPU machine; detection of the query photo
is not included (its speed is the model's, ``bench/eval.py``).
"""

from __future__ import annotations

import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags
import jax
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_string("sizes", "10000,100000,1000000", "Gallery sizes, comma-separated.")
flags.DEFINE_integer("dim", 256, "Embedding width.")
flags.DEFINE_integer("top", 20, "Items per query.")
flags.DEFINE_integer("batch", 64, "Queries per call for the throughput figure.")
flags.DEFINE_integer("repeats", 20, "Timed calls of each kind.")
flags.DEFINE_integer("chunk", 0, "Gallery rows per matrix product (0: the tool's default).")
flags.DEFINE_integer("seed", 0, "Random seed.")


def _rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _device_gib() -> str:
  stats = jax.devices()[0].memory_stats() or {}
  used = stats.get("bytes_in_use")
  return f"{used / 2**30:.2f} GiB" if used is not None else "n/a"


def _timed(fn, repeats: int) -> float:
  fn()  # compile and warm up
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def main(argv):
  del argv
  from df2_jax import retrieval
  rng = np.random.default_rng(FLAGS.seed)
  dim = FLAGS.dim
  scorer_params = {"kernel": -rng.uniform(0.01, 1.0, dim).astype(np.float32),
                   "bias": np.float32(3.0)}
  chunk = FLAGS.chunk or retrieval.DEFAULT_CHUNK
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind} ({jax.default_backend()}), "
        f"{os.cpu_count()} CPUs; dim {dim}, top {FLAGS.top}, chunk {chunk}")
  print("| gallery | build s | 1 query: queries/s | ms/query | "
        f"{FLAGS.batch} queries: queries/s | peak RSS | device memory |")
  print("|---|---|---|---|---|---|---|")
  with tempfile.TemporaryDirectory() as tmp:
    for size in (int(s) for s in FLAGS.sizes.split(",")):
      path = os.path.join(tmp, f"embeddings_{size}.npy")
      out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(size, dim))
      for start in range(0, size, 100_000):  # written in slices: no second copy in memory
        n = min(100_000, size - start)
        out[start:start + n] = rng.normal(size=(n, dim)).astype(np.float32) + 1.0
      out.flush()
      del out
      gallery = np.load(path, mmap_mode="r")
      start = time.perf_counter()
      scorer = retrieval.GalleryScorer(scorer_params, gallery, chunk=chunk)
      jax.block_until_ready(scorer.chunks)
      build = time.perf_counter() - start
      one = rng.normal(size=(1, dim)).astype(np.float32) + 1.0
      many = rng.normal(size=(FLAGS.batch, dim)).astype(np.float32) + 1.0
      t1 = _timed(lambda: scorer.top_k(one, FLAGS.top), FLAGS.repeats)
      tb = _timed(lambda: scorer.top_k(many, FLAGS.top), max(2, FLAGS.repeats // 4))
      print(f"| {size:,} | {build:.2f} | {1 / t1:.1f} | {1000 * t1:.1f} | "
            f"{FLAGS.batch / tb:.1f} | {_rss_gib():.2f} GiB | {_device_gib()} |", flush=True)
      del scorer, gallery


if __name__ == "__main__":
  app.run(main)
