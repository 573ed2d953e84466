r"""RoIAlign "gather" vs "matmul" on the demo's feature maps (CPU or GPU), same values.

  python bench/roi_align.py

FPN levels P2..P5 of 4 images on a 128 px canvas (32x32 .. 4x4, 64 channels), 64 random boxes
per image: 7x7 pooling forward, forward + backward, and 14x14 forward + backward for 16 boxes
per image (the box head's and the mask head's shapes in configs/demo_synthetic.py).
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from df2_jax.ops import roi_align as ra


def timed(name, f, *args, n=20):
  f = jax.jit(f)
  jax.block_until_ready(f(*args))
  start = time.time()
  for _ in range(n):
    out = f(*args)
  jax.block_until_ready(out)
  print(f"{name}: {(time.time() - start) / n * 1000:.1f} ms", flush=True)


def main():
  rng = np.random.default_rng(0)
  levels = [jnp.asarray(rng.normal(size=(4, 32 // 2**i, 32 // 2**i, 64)), jnp.float32)
            for i in range(4)]
  xy = rng.uniform(-10, 120, (4, 64, 2))
  wh = rng.uniform(1, 120, (4, 64, 2))
  boxes = jnp.asarray(np.concatenate([xy, xy + wh], -1), jnp.float32)
  for size in (7, 14):
    a = ra.multilevel_roi_align(levels, boxes, size, method="gather")
    b = ra.multilevel_roi_align(levels, boxes, size, method="matmul")
    print(f"{size}x{size}: max |gather - matmul| = {float(jnp.max(jnp.abs(a - b))):.2e}")
  print(jax.devices()[0].device_kind, "jax", jax.__version__)
  for m in ("gather", "matmul"):
    pool = lambda L, b, s, m=m: ra.multilevel_roi_align(L, b, s, method=m)
    loss = lambda L, b, s, pool=pool: jnp.sum(pool(L, b, s) ** 2)
    timed(f"{m} 7x7 x256 fwd", lambda L, b: pool(L, b, 7), levels, boxes)
    timed(f"{m} 7x7 x256 fwd+bwd", lambda L, b: jax.grad(loss)(L, b, 7), levels, boxes)
    timed(f"{m} 14x14 x64 fwd+bwd", lambda L, b: jax.grad(loss)(L, b, 14), levels,
          boxes[:, :16])


if __name__ == "__main__":
  main()
