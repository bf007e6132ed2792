"""SIGTERM / SIGINT as a flag the training loop reads after each step."""

from __future__ import annotations

import signal

import jax
from jax.experimental import multihost_utils
import numpy as np


class Preempted(Exception):
  """Raised after a checkpoint was saved because SIGTERM/SIGINT arrived."""


class SignalFlag:
  """Turns SIGTERM/SIGINT into a flag, while inside `with SignalFlag()`."""

  def __init__(self):
    self.received: str | None = None
    self._previous = {}

  def __enter__(self) -> SignalFlag:
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, exc_type, exc, traceback):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self.received and exc_type is None:
      # A signal after the last step: everything is saved, but the caller
      # (say, a comparison about to start its next run) must still stop.
      raise Preempted(
        f"{self.received} received after the last step; all "
        "results are saved. Rerun the same command to go on."
      )

  def stop_agreed(self, at_sync_point: bool) -> bool:
    """Whether every process stops after this step for a signal.

    One process checks after every step. Several processes must stop at the
    same step (checkpoints are collective), so they agree at sync points
    (log steps) only, where the host synchronises anyway. Call it once per
    step on every process.
    """
    if jax.process_count() == 1:
      return self.received is not None
    if not at_sync_point:
      return False
    flags = multihost_utils.process_allgather(
      np.int32(self.received is not None)
    )
    if flags.any() and self.received is None:
      self.received = "a signal to another process"
    return bool(flags.any())
