"""The failures the project knows, and how every command reports them.

Each failure a user can cause or meet (a config that cannot work, a checkpoint that is missing,
damaged or of another config, a folder that cannot be used, data that cannot be read, a run
stopped by a signal) raises a subclass of ``Df2Error``. Its ``str`` is the whole message: one
line (one per problem for a config). Its ``exit_code`` is the status a command exits with: the
one map from failure to status, on the classes themselves:

  2  the command cannot work as given: ``ConfigError`` (``config.rules``),
     ``config.run_config.RunMismatch`` and ``NoSavedConfig`` (another config or none),
     ``evaluation.evaluator.
     SkippedGroundTruth`` (an override is needed);
  1  everything else: a missing or damaged checkpoint, a folder in use or not usable, bad data,
     diverged params, an export that cannot be written or read;
  128 + N  training stopped by signal N after saving (``train.Interrupted``).

Every entry point (run.py, the retrieval tool, export, the scorers, the data tools) catches
``Df2Error`` and calls ``report``: the lines go to the log, no traceback, and the command exits
with ``exit_code``. The standard library only: the data pipeline's errors derive from it too.
"""

from __future__ import annotations

import logging


class Df2Error(Exception):
  """A known failure: ``str(error)`` is the whole message, ``exit_code`` the command's status."""

  exit_code: int = 1


class ConfigError(Df2Error, ValueError):
  """A config that cannot work; ``str`` is one line per problem (``config.rules``)."""

  exit_code = 2


class UsageError(Df2Error):
  """A command given flags or inputs that cannot work as given (one line)."""

  exit_code = 2


def report(error: Df2Error, logger: logging.Logger | None = None, prefix: str = "") -> int:
  """Logs each line of ``error`` at ERROR (``prefix`` before each) and returns its exit code."""
  logger = logger or logging.getLogger()
  for line in str(error).splitlines() or [type(error).__name__]:
    logger.error("%s%s", prefix, line)
  return int(error.exit_code)
