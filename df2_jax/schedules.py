"""Learning-rate schedules: detectron2's WarmupMultiStepLR, built from optax pieces.

detectron2 (``solver/lr_scheduler.py``, ``WarmupMultiStepLR`` with linear warm-up) sets the
learning rate of iteration ``it`` (0-based, the number of updates already done) to::

    base_lr * warmup(it) * gamma ** bisect_right(milestones, it)
    warmup(it) = warmup_factor * (1 - it / warmup_iters) + it / warmup_iters  (it < warmup_iters)
               = 1                                                           (otherwise)

so the decay applies from the milestone step itself. An optax schedule is called with the
optimizer's update count, which is the same 0-based number, so the two agree step for step.
"""

from __future__ import annotations

import math
from typing import Sequence

import optax


def steps_per_epoch(num_elements: int, global_batch_pairs: int) -> int:
  """Optimizer steps in one epoch of ``num_elements`` elements of two images (ceil(images /
  2), see ``data_pipeline.pairs``) at ``global_batch_pairs`` elements per step; the last
  partial batch counts."""
  if num_elements <= 0 or global_batch_pairs <= 0:
    raise ValueError(f"num_elements ({num_elements}) and global_batch_pairs "
                     f"({global_batch_pairs}) must be positive")
  return math.ceil(num_elements / global_batch_pairs)


def scaled_lr(batch_images: int, *, base_lr: float = 0.02, base_batch_images: int = 16
              ) -> float:
  """The linear scaling rule (Goyal et al. 2017, "Accurate, Large Minibatch SGD").

  The learning rate grows in proportion to the batch: ``base_lr * batch_images /
  base_batch_images``. detectron2's reference recipe is 0.02 for 16 images per step, so a
  batch of 8 image pairs (16 images) keeps 0.02 and 4 pairs (8 images) use 0.01. Count images,
  not pairs: every image of a pair contributes its own detection losses.

  Args:
    batch_images: images in one global batch (2 x the number of image pairs).
    base_lr: the learning rate tuned for ``base_batch_images``.
    base_batch_images: the batch size ``base_lr`` was tuned for.
  """
  if batch_images <= 0 or base_batch_images <= 0:
    raise ValueError(f"batch_images ({batch_images}) and base_batch_images "
                     f"({base_batch_images}) must be positive")
  return base_lr * batch_images / base_batch_images


# pylint: disable-next=redefined-outer-name
def step_decay_schedule(base_lr: float, steps_per_epoch: int,
                        decay_epochs: Sequence[int] = (8, 11), decay_factor: float = 0.1,
                        warmup_steps: int = 1000, warmup_factor: float = 0.001
                        ) -> optax.Schedule:
  """detectron2's WarmupMultiStepLR (linear warm-up) as an optax schedule.

  The rate rises linearly from ``base_lr * warmup_factor`` at step 0 towards ``base_lr`` at
  ``warmup_steps``, and is multiplied by ``decay_factor`` from the first step of each epoch in
  ``decay_epochs`` (step ``epoch * steps_per_epoch``). The default is the "1x" recipe: 12
  epochs, decays at the start of epochs 8 and 11 (0-based).

  A decay step inside the warm-up multiplies the warm-up ramp, as in detectron2: the schedule
  is joined (``optax.join_schedules``) from one piece per interval between consecutive
  boundaries, a ``linear_schedule`` on the exact warm-up line while warming up and a
  ``constant_schedule`` after.

  Args:
    base_lr: the peak learning rate (see ``scaled_lr``).
    steps_per_epoch: optimizer steps per epoch (see ``steps_per_epoch``).
    decay_epochs: epochs (0-based) whose first step starts a decay.
    decay_factor: the multiplier applied at each decay (detectron2's ``GAMMA``).
    warmup_steps: length of the linear warm-up; 0 disables it.
    warmup_factor: the fraction of ``base_lr`` at step 0.

  Returns:
    A function of the update count (int or int array) giving the learning rate.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
  if warmup_steps < 0:
    raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
  decay_steps = sorted(int(e) * steps_per_epoch for e in decay_epochs)
  if decay_steps and decay_steps[0] < 0:
    raise ValueError(f"decay_epochs must be >= 0, got {tuple(decay_epochs)}")

  def warm(step: int) -> float:
    """detectron2's linear warm-up factor at ``step``."""
    if step >= warmup_steps:
      return 1.0
    alpha = step / warmup_steps
    return warmup_factor * (1.0 - alpha) + alpha

  def decay(step: int) -> float:
    """gamma ** bisect_right(decay_steps, step)."""
    return decay_factor ** sum(1 for d in decay_steps if d <= step)

  starts = sorted({0, *(d for d in decay_steps if d > 0),
                   *((warmup_steps,) if warmup_steps > 0 else ())})
  pieces = []
  for i, start in enumerate(starts):
    scale = base_lr * decay(start)
    if start < warmup_steps:
      end = starts[i + 1]  # warmup_steps is itself a start, so a later one exists.
      pieces.append(optax.linear_schedule(init_value=scale * warm(start),
                                          end_value=scale * warm(end),
                                          transition_steps=end - start))
    else:
      pieces.append(optax.constant_schedule(scale))
  if len(pieces) == 1:
    return pieces[0]
  return optax.join_schedules(pieces, starts[1:])
