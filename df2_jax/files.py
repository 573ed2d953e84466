"""Files a user keeps: written whole or not at all, and folders one run owns at a time.

Everything here is the standard library and numpy (no jax, no TensorFlow), so the input
pipeline, the tools and the training loop share it.

* ``atomic_write(path)``: a file object on a temporary file in the same folder; on a clean
  exit it is flushed, fsync'ed and renamed over ``path`` (then the folder is fsync'ed). A kill
  or an exception leaves ``path`` as it was (the old file or none), never half written.
  ``write_json``, ``write_text``, ``save_npz``, ``save_npy`` are the common cases.
* ``FolderLock(folder, what)``: an exclusive ``fcntl`` lock on ``folder/.lock`` held for a
  run's life; a second run on the same folder gets ``Locked`` naming the holder's pid. The
  kernel drops the lock when the process dies (no stale lock files to clean up).
* ``swap_in(staging, target)``: replaces folder ``target`` by the complete folder ``staging``
  (the old contents are moved aside first and deleted only once the new ones are in place).
* ``read_jsonl(path)``: the records of a JSON-lines file; a torn last line (a kill during the
  write) is dropped with a warning, a torn line elsewhere is an error naming the line.
* ``disk_full_message(error, folder, needed)``: one line for ENOSPC naming the folder, the
  free bytes and (when known) the bytes needed.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np

from df2_jax.errors import Df2Error

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


def _fsync_dir(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some filesystems refuse fsync on a directory
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None
                 ) -> Iterator[io.IOBase]:
  """Yields a file opened with ``mode`` ("w" or "wb") on a temporary file beside ``path``;
  renames it over ``path`` when the block ends without an exception (the temporary file is
  removed otherwise). The folder must exist."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_write: mode {mode!r}, expected 'w' or 'wb'")
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would make results unreadable to a group
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise
  _fsync_dir(folder)


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
  """``json.dump(obj)`` to ``path`` atomically (``dump_kwargs`` go to ``json.dump``)."""
  with atomic_write(path, "w") as f:
    json.dump(obj, f, **dump_kwargs)


def write_text(path: str | os.PathLike, text: str) -> None:
  with atomic_write(path, "w") as f:
    f.write(text)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  with atomic_write(path, "wb") as f:
    f.write(data)


def save_npz(path: str | os.PathLike, compressed: bool = True, **arrays: np.ndarray) -> None:
  """``np.savez(_compressed)`` to exactly ``path`` (no ".npz" appended), atomically."""
  with atomic_write(path, "wb") as f:
    (np.savez_compressed if compressed else np.savez)(f, **arrays)


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
  """``np.save`` to exactly ``path``, atomically."""
  with atomic_write(path, "wb") as f:
    np.save(f, np.asarray(array), allow_pickle=False)


def read_json(path: str | os.PathLike, what: str = "") -> Any:
  """``json.load`` of ``path``; a broken file raises ValueError naming it (and ``what``)."""
  path = os.fspath(path)
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}{f' ({what})' if what else ''} is not valid JSON: {e}") from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of a JSON-lines file (blank lines skipped).

  A last line that does not parse (a write cut by a kill or a full disk) is dropped with a
  warning: every complete record is kept. A broken line before the last raises ValueError
  naming the file and the line number.
  """
  path = os.fspath(path)
  with open(path) as f:
    lines = f.readlines()
  out = []
  numbered = [(i + 1, l) for i, l in enumerate(lines) if l.strip()]
  for k, (number, line) in enumerate(numbered):
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError as e:
      if k == len(numbered) - 1:
        log.warning("%s: line %d is torn (%s; %d bytes), a write cut short; it is dropped.",
                    path, number, e.msg, len(line))
        break
      raise ValueError(f"{path}: line {number} is not valid JSON ({e.msg}); only a torn last "
                       f"line is dropped") from None
  return out


def swap_in(staging: str, target: str) -> None:
  """Makes complete folder ``staging`` the folder ``target`` (same filesystem).

  The old ``target`` (if any) is renamed aside, ``staging`` renamed to ``target``, then the old
  one deleted: at every moment either the old or the new folder is whole on disk.
  """
  target = os.path.abspath(target)
  old = None
  if os.path.lexists(target):
    old = tempfile.mkdtemp(dir=os.path.dirname(target),
                           prefix=f".{os.path.basename(target)}.old.")
    os.rmdir(old)
    os.rename(target, old)
  os.rename(staging, target)
  _fsync_dir(os.path.dirname(target))
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def staging_folder(target: str) -> str:
  """A new empty folder beside ``target`` to build its replacement in (``swap_in``)."""
  target = os.path.abspath(target)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  folder = tempfile.mkdtemp(dir=os.path.dirname(target),
                            prefix=f".{os.path.basename(target)}.partial.")
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(folder, 0o777 & ~mask)  # a new folder's permissions (mkdtemp makes it 0700)
  return folder


def remove_stale_staging(target: str) -> None:
  """Deletes the staging and aside folders that an interrupted ``swap_in`` of ``target``
  left (``.NAME.partial.*``, ``.NAME.old.*``)."""
  target = os.path.abspath(target)
  parent, name = os.path.dirname(target), os.path.basename(target)
  if not os.path.isdir(parent):
    return
  for entry in os.listdir(parent):
    if entry.startswith(f".{name}.partial.") or entry.startswith(f".{name}.old."):
      shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


class NotWritable(Df2Error):
  """A folder a command must write that cannot be created or written (one line)."""

  exit_code = 2


def check_writable(folder: str, *, create: bool, what: str = "folder") -> None:
  """Raises ``NotWritable`` unless ``folder`` can be written: with ``create`` it is created (as
  training creates its workdir) and a file is written and removed in it; without, nothing is
  created and the folder (or its nearest existing parent) must be writable. ``what`` names it
  in the message (e.g. "--workdir"). A remote path (gs://...) is left to its first write."""
  if "://" in folder:
    return
  path = os.path.abspath(folder)
  if os.path.exists(path) and not os.path.isdir(path):
    raise NotWritable(f"{what} {folder} is a file, not a folder")
  if create:
    try:
      os.makedirs(path, exist_ok=True)
      with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
        pass
    except OSError as e:
      raise NotWritable(f"{what} {folder} cannot be created or written: "
                        f"{e.strerror or e}") from None
    return
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.access(parent, os.W_OK | os.X_OK):
    raise NotWritable(f"{what} {folder} cannot be written ({parent} is not writable)")


class Locked(Df2Error, RuntimeError):
  """Another live process holds the folder's lock."""

  def __init__(self, folder: str, what: str, holder: str):
    self.folder, self.holder = folder, holder
    super().__init__(f"{folder} is in use by another {what} (pid {holder}; lock file "
                     f"{os.path.join(folder, LOCK_NAME)}): wait for it to end or stop it, or "
                     f"use another folder.")


class FolderLock:
  """An exclusive lock on ``folder`` for as long as it is held (a context manager).

  ``fcntl.flock`` on ``folder/.lock``, which then holds the holder's pid and ``what`` for the
  message another process gets. The lock dies with the process, so a killed run never leaves
  a folder locked. ``folder`` is created if missing.
  """

  def __init__(self, folder: str | os.PathLike, what: str = "run"):
    self.folder = os.path.abspath(os.fspath(folder))
    self.what = what
    self._fd: int | None = None

  def acquire(self) -> "FolderLock":
    os.makedirs(self.folder, exist_ok=True)
    path = os.path.join(self.folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        os.close(fd)
        raise
      try:
        holder = os.pread(fd, 200, 0).decode(errors="replace").split()[0]
      except (OSError, IndexError):
        holder = "unknown"
      os.close(fd)
      raise Locked(self.folder, self.what, holder) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {self.what}\n".encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "FolderLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def free_bytes(folder: str) -> int | None:
  while folder and not os.path.exists(folder):
    folder = os.path.dirname(folder)
  try:
    st = os.statvfs(folder or ".")
  except OSError:
    return None
  return st.f_bavail * st.f_frsize


def is_disk_full(error: BaseException) -> bool:
  """Whether ``error`` (or an error it was raised from) is ENOSPC / EDQUOT."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(error)
    if "No space left on device" in text or "ENOSPC" in text or "Disk quota exceeded" in text:
      return True
    error = error.__cause__ or error.__context__
  return False


def disk_full_message(folder: str, needed: int | None = None) -> str:
  """One line: the folder is full, how much is free and (when known) needed."""
  free = free_bytes(folder)
  have = f"{free:,} bytes free" if free is not None else "free space unknown"
  need = f", about {needed:,} bytes needed" if needed else ""
  return f"No space left on the disk of {folder} ({have}{need}): free some space and rerun."
