"""When the epoch loop saves a checkpoint besides a stage's end and a stop.

By epochs (`checkpoint_every_epochs`, the default rule) or, when
`checkpoint_every_minutes` is set, by wall time: a save once that much time
has passed since the last one, checked at every epoch end and every log
step. On a fast GPU a CIFAR epoch takes seconds, and a save's blocking part
(copying the state off the device, finishing the previous save and its
checksums) then costs a visible share of each epoch; saving by time bounds
both that cost and the work a crash can lose. A stage's last step and a
stop signal always save, whatever the rule.

Processes must save at the same step (a save is collective), and their
clocks differ, so with several processes process 0's decision is the one
taken.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
from jax.experimental import multihost_utils
import numpy as np


class CheckpointPolicy:
  """Decides at epoch ends and log steps whether to save now.

  Args:
    every_epochs: save after every this many epochs (when every_minutes is
      0).
    every_minutes: > 0 replaces the epoch rule by a time rule.
    clock: seconds, monotonic (tests pass a fake one).
  """

  def __init__(
    self,
    every_epochs: int,
    every_minutes: float = 0.0,
    clock: Callable[[], float] = time.monotonic,
  ):
    self.every_epochs, self.every_minutes = every_epochs, every_minutes
    self._clock = clock
    self._last = clock()  # The stage's start counts as a save.

  def saved(self) -> None:
    """Call when a save starts: the time rule counts from here."""
    self._last = self._clock()

  def _time_due(self) -> bool:
    return self._clock() - self._last >= 60.0 * self.every_minutes

  def at_epoch_end(self, epoch: int, last_step: bool) -> bool:
    """Whether to save after `epoch` (0-based); `last_step`: the stage's."""
    if last_step:
      return True
    if self.every_minutes > 0:
      return _agreed(self._time_due())
    return (epoch + 1) % self.every_epochs == 0

  def at_log_step(self) -> bool:
    """Whether to save at a log step inside an epoch (time rule only)."""
    return self.every_minutes > 0 and _agreed(self._time_due())


def _agreed(decision: bool) -> bool:
  """Process 0's decision on every process."""
  if jax.process_count() == 1:
    return decision
  return bool(multihost_utils.broadcast_one_to_all(np.bool_(decision)))
