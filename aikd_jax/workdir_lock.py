"""One run per workdir: an exclusive lock held for the whole run.

The lock is `fcntl.flock` on a file in the workdir, so the OS drops it when
its holder ends in any way, kill -9 included: there is never a stale lock to
remove by hand. The file names its holder (host, pid, start time) for the
message a second run gives. In a multi-process run process 0 holds the lock
and the others wait for its verdict.

A run that is refused before it records its config leaves no trace: the lock
file goes, and so do the folders the lock created (a fresh --workdir).
"""

from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket

import jax
from jax.experimental import multihost_utils
import numpy as np

from aikd_jax import run_config

LOCK_FILE = ".lock"


class WorkdirBusy(run_config.ConfigError):
  """Another run holds the workdir."""


def _missing_root(path: str) -> str | None:
  """The outermost folder of `path` that does not exist yet, if any."""
  path, missing = os.path.abspath(path), None
  while not os.path.exists(path):
    missing, path = path, os.path.dirname(path)
  return missing


class WorkdirLock:
  """The workdir's lock, held from `acquire` to `release`."""

  def __init__(self, workdir: str):
    self.workdir = os.path.abspath(workdir)
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None
    self._created_root: str | None = None

  def acquire(self) -> None:
    """Creates the workdir if needed and locks it; raises WorkdirBusy."""
    if jax.process_count() == 1:
      self._lock()
      return
    error = None
    if jax.process_index() == 0:
      try:
        self._lock()
      except WorkdirBusy as busy:
        error = busy
    held = multihost_utils.broadcast_one_to_all(np.int32(error is None))
    if error is not None:
      raise error
    if not int(held):
      raise WorkdirBusy(
        f"The workdir {self.workdir!r} is in use by another run (process "
        "0 of this run could not lock it; its log names the holder)."
      )

  def _lock(self) -> None:
    self._created_root = _missing_root(self.workdir)
    os.makedirs(self.workdir, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.read(fd, 4096).decode(errors="replace")
        os.close(fd)
        raise WorkdirBusy(self._busy_message(holder)) from None
      # The previous holder removes the file as it lets go; a lock on a
      # file no longer at `path` locks nothing, so open it afresh.
      try:
        same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    holder = {
      "host": socket.gethostname(),
      "pid": os.getpid(),
      "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"
      ),
    }
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(holder).encode())
    self._fd = fd

  def _busy_message(self, holder_text: str) -> str:
    try:
      holder = json.loads(holder_text)
      who = (
        f"pid {holder['pid']} on host {holder['host']}, running since "
        f"{holder['since']}"
      )
    except (ValueError, KeyError, TypeError):
      who = "a run that is just starting"
    return (
      f"The workdir {self.workdir!r} is in use by another run ({who}). "
      "Wait for it to end, or use another --workdir."
    )

  def release(self, undo_creation: bool = False) -> None:
    """Lets go; with `undo_creation`, removes the folders `acquire` made
    (those that are still empty)."""
    if self._fd is None:
      return
    # Removed while still held, so no one can lock the departing file.
    try:
      os.unlink(self.path)
    except FileNotFoundError:
      pass
    fcntl.flock(self._fd, fcntl.LOCK_UN)
    os.close(self._fd)
    self._fd = None
    if undo_creation and self._created_root is not None:
      path = self.workdir
      while True:
        try:
          os.rmdir(path)
        except OSError:  # Not empty: someone else's now.
          break
        if path == self._created_root:
          break
        path = os.path.dirname(path)
