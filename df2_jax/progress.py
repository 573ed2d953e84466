"""Progress lines of long loops: a duration as h:mm:ss, and the rate and time left of a count.

``Progress(total, label)`` logs "<label>: done/total images, R images/s, eta h:mm:ss" at most
every ``every_s`` seconds (and at the end, when asked), the one way the evaluation and the
retrieval index report how far they are; ``duration`` formats every time the logs show.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)


def duration(seconds: float) -> str:
  """``seconds`` as h:mm:ss (whole seconds, truncated)."""
  seconds = int(seconds)
  return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Counts items done out of ``total`` and logs the rate and the time left.

  Args:
    total: the number of items (images) the loop will do.
    label: what the line starts with (e.g. "Evaluation").
    every_s: the least time between two lines.
    logger: where the lines go (default: this module's).
  """

  def __init__(self, total: int, label: str, every_s: float = 30.0,
               logger: logging.Logger | None = None):
    self.total, self.label, self.every_s = int(total), label, float(every_s)
    self.log = logger or log
    self.done = 0
    self.started = self._last = time.perf_counter()

  @property
  def rate(self) -> float:
    """Items per second since the start."""
    return self.done / max(time.perf_counter() - self.started, 1e-9)

  def update(self, done: int, *, final: bool = False) -> None:
    """Records ``done`` items in all; logs a line when ``every_s`` has passed since the last
    (or with ``final``, when all are done)."""
    self.done = int(done)
    now = time.perf_counter()
    if now - self._last >= self.every_s or (final and self.done >= self.total):
      rate = self.rate
      self.log.info("%s: %d/%d images, %.1f images/s, eta %s", self.label, self.done,
                    self.total, rate, duration((self.total - self.done) / max(rate, 1e-9)))
      self._last = now
