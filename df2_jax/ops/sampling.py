"""Static-shape random subsampling of labelled candidates (detectron2 sampling).

detectron2's `subsample_labels` keeps at most int(num_samples *
positive_fraction) foreground candidates and fills the rest of num_samples with
background, each chosen uniformly at random without replacement (randperm +
slice). Here every candidate draws a random 31-bit priority; non-candidates get
-1, and `lax.top_k` over the priorities picks the winners. The first k of a
uniformly random order of the candidates is a uniform k-subset, so the result
has detectron2's distribution, with static shapes and no `nonzero`.

Functions act on one image; the caller vmaps them over a batch (with one key
per image, e.g. `jax.random.split(key, batch)`).
"""

from typing import Tuple

import jax
import jax.numpy as jnp

Array = jnp.ndarray


def _num_fg(num_samples: int, positive_fraction: float) -> int:
  if num_samples <= 0:
    raise ValueError(f'num_samples must be > 0, got {num_samples}')
  if not 0.0 <= positive_fraction <= 1.0:
    raise ValueError(f'positive_fraction must be in [0, 1], got '
                     f'{positive_fraction}')
  return int(num_samples * positive_fraction)


def _ranked_candidates(key: Array, labels: Array, num_samples: int,
                       positive_fraction: float):
  """Random top-k of the fg and of the bg candidates.

  Args:
    key: PRNG key.
    labels: [N] int in {-1 ignore, 0 bg, 1 fg} (any value > 0 counts as fg).
    num_samples: total samples wanted.
    positive_fraction: at most int(num_samples * positive_fraction) fg.

  Returns:
    fg_idx [kf] int32, fg_take [kf] bool, bg_idx [kb] int32, bg_take [kb] bool
    with kf = min(int(num_samples * positive_fraction), N) and
    kb = min(num_samples, N). The taken entries are a prefix of each list: the
    fg picked, and the bg picked given the number of fg picked.
  """
  n = labels.shape[0]
  max_fg = min(_num_fg(num_samples, positive_fraction), n)
  is_fg = labels > 0
  is_bg = labels == 0
  priority = (jax.random.bits(key, (n,), jnp.uint32) >> 1).astype(jnp.int32)
  fg_idx, fg_take = _top(jnp.where(is_fg, priority, -1), max_fg)
  num_fg = jnp.sum(fg_take.astype(jnp.int32))
  bg_idx, bg_take = _top(jnp.where(is_bg, priority, -1), min(num_samples, n))
  # The bg list is sorted, so its first num_samples - num_fg candidates win.
  slot = jnp.arange(bg_idx.shape[0], dtype=jnp.int32)
  bg_take = bg_take & (slot < num_samples - num_fg)
  return fg_idx, fg_take, bg_idx, bg_take


def _top(priority: Array, k: int) -> Tuple[Array, Array]:
  """Indices of the k largest priorities and whether each is a candidate."""
  if k == 0:
    return jnp.zeros((0,), jnp.int32), jnp.zeros((0,), bool)
  values, idx = jax.lax.top_k(priority, k)
  return idx.astype(jnp.int32), values >= 0


def subsample_labels(key: Array, labels: Array, num_samples: int,
                     positive_fraction: float) -> Tuple[Array, Array]:
  """Random fg / bg subsample (detectron2 `subsample_labels`), one image.

  At most int(num_samples * positive_fraction) fg candidates (labels > 0) are
  kept; background candidates (labels == 0) fill the remainder up to
  num_samples when enough exist. Labels -1 are never picked. Vmap over images.

  Args:
    key: PRNG key; the same key and labels give the same selection.
    labels: [N] int32 in {-1 ignore, 0 bg, 1 fg}.
    num_samples: static total number of samples.
    positive_fraction: static fraction of num_samples allowed to be fg.

  Returns:
    fg_mask [N] bool, bg_mask [N] bool (disjoint).
  """
  n = labels.shape[0]
  fg_idx, fg_take, bg_idx, bg_take = _ranked_candidates(
      key, labels, num_samples, positive_fraction)
  # top_k indices are distinct, so these scatters have no collisions.
  fg_mask = jnp.zeros((n,), bool).at[fg_idx].set(fg_take)
  bg_mask = jnp.zeros((n,), bool).at[bg_idx].set(bg_take)
  return fg_mask, bg_mask


def sample_indices(key: Array, labels: Array, num_samples: int,
                   positive_fraction: float) -> Tuple[Array, Array, Array]:
  """A fixed number of sampled indices, fg first, then bg, then padding.

  Same selection as `subsample_labels` with the same key, as a list of
  exactly num_samples indices for gathering a fixed number of RoIs. Slots past
  the sampled candidates (too few candidates in total) are padding: index 0
  and valid False. Vmap over images.

  Args:
    key: PRNG key.
    labels: [N] int32 in {-1 ignore, 0 bg, 1 fg}.
    num_samples: static output length.
    positive_fraction: static fraction of num_samples allowed to be fg.

  Returns:
    indices [num_samples] int32 into [0, N), valid [num_samples] bool,
    is_fg [num_samples] bool (valid and fg; a prefix of the slots).
  """
  fg_idx, fg_take, bg_idx, bg_take = _ranked_candidates(
      key, labels, num_samples, positive_fraction)
  num_fg = jnp.sum(fg_take.astype(jnp.int32))
  num_bg = jnp.sum(bg_take.astype(jnp.int32))
  slot = jnp.arange(num_samples, dtype=jnp.int32)
  is_fg = slot < num_fg
  valid = slot < num_fg + num_bg
  if fg_idx.shape[0]:
    from_fg = fg_idx[jnp.clip(slot, 0, fg_idx.shape[0] - 1)]
  else:
    from_fg = jnp.zeros_like(slot)
  from_bg = bg_idx[jnp.clip(slot - num_fg, 0, bg_idx.shape[0] - 1)]
  indices = jnp.where(is_fg, from_fg, jnp.where(valid, from_bg, 0))
  return indices, valid, is_fg
