"""What the epoch loop keeps besides the train state: metric totals, history.

Each step's metrics are added up on device in float32, step by step, so an
epoch's means do not depend on when the host reads them; beside the sums,
the largest value of each metric since the last read, and the first step at
which any metric was not finite, with all of that step's values, so that a
divergence can be reported whole. The host reads a few scalars per log
interval. A checkpoint's `progress` item is `Progress.saved()`: what a
resumed run needs to go on bit for bit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from aikd_jax import banks

NO_BAD_STEP = np.iinfo(np.int32).max
# Read as the largest value of a log interval or epoch, not the mean.
PEAK_METRICS = ("train/max_abs_logit",)


@jax.jit
def no_totals(metrics: dict) -> dict:
  """Empty epoch totals shaped like one step's metrics."""
  return {
    "sum": jax.tree.map(jnp.zeros_like, metrics),
    "peak": jax.tree.map(lambda v: jnp.full_like(v, -jnp.inf), metrics),
    "bad_step": jnp.int32(NO_BAD_STEP),
    "bad_values": jax.tree.map(jnp.zeros_like, metrics),
  }


@jax.jit
def accumulate(totals: dict, metrics: dict, step: jax.Array) -> dict:
  """Adds one step's metrics to the epoch's totals, on device.

  Keeps, per metric, the running sum and the largest value since the last
  read; and the first step at which any metric was not finite, with all of
  that step's values.
  """
  finite = jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)])
  )
  first_bad = ~finite & (totals["bad_step"] == NO_BAD_STEP)
  return {
    "sum": jax.tree.map(jnp.add, totals["sum"], metrics),
    "peak": jax.tree.map(jnp.maximum, totals["peak"], metrics),
    "bad_step": jnp.where(first_bad, step, totals["bad_step"]),
    "bad_values": jax.tree.map(
      lambda old, new: jnp.where(first_bad, new, old),
      totals["bad_values"],
      metrics,
    ),
  }


@jax.jit
def reset_peaks(totals: dict) -> dict:
  return {
    **totals,
    "peak": jax.tree.map(lambda v: jnp.full_like(v, -jnp.inf), totals["peak"]),
  }


class NonFiniteStep(Exception):
  """A step had a NaN or Inf metric: the first such step and its values."""

  def __init__(self, step: int, values: dict[str, float]):
    super().__init__(step, values)
    self.step, self.values = step, values


@dataclasses.dataclass
class Progress:
  """A stage's bookkeeping between steps.

  Attributes:
    history: one entry per finished epoch: its train means (and peaks), the
      test split's report and reliability diagram.
    epoch_sums: the current epoch's metric sums as last read.
    epoch_steps: how many of the epoch's steps those sums cover.
    epoch_peaks: the epoch's largest PEAK_METRICS values as last read.
    totals: the running totals on device (`accumulate`); None before the
      epoch's first step.
  """

  history: list[dict] = dataclasses.field(default_factory=list)
  epoch_sums: dict[str, float] = dataclasses.field(default_factory=dict)
  epoch_steps: int = 0
  epoch_peaks: dict[str, float] = dataclasses.field(default_factory=dict)
  totals: dict | None = None

  @classmethod
  def restore(cls, saved: dict, mesh: jax.sharding.Mesh) -> Progress:
    """From a checkpoint's `progress` item; a checkpoint taken mid-epoch gets
    its device sums back bit for bit (float32 values survive JSON)."""
    progress = cls(
      history=saved["history"],
      epoch_sums=saved["epoch_sums"],
      epoch_steps=saved["epoch_steps"],
      epoch_peaks=saved.get("epoch_peaks", {}),
    )
    if progress.epoch_steps:
      sums = {name: np.float32(v) for name, v in progress.epoch_sums.items()}
      progress.totals = jax.device_put(
        {
          "sum": sums,
          "peak": {name: np.float32(-np.inf) for name in sums},
          "bad_step": np.int32(NO_BAD_STEP),
          "bad_values": {name: np.float32(0) for name in sums},
        },
        banks.replicated(mesh),
      )
    return progress

  def saved(self) -> dict:
    """The checkpoint's `progress` item (JSON)."""
    return {
      "history": self.history,
      "epoch_sums": self.epoch_sums,
      "epoch_steps": self.epoch_steps,
      "epoch_peaks": self.epoch_peaks,
    }

  def add(self, metrics: dict, step: int) -> None:
    """Adds step `step`'s metrics to the epoch's totals (no host sync)."""
    if self.totals is None:
      self.totals = no_totals(metrics)
    self.totals = accumulate(self.totals, metrics, step)

  def read(self, steps_in_epoch: int) -> dict[str, float] | None:
    """Reads the totals after the epoch's `steps_in_epoch`-th step.

    Returns the means of the steps since the last read and the peaks of
    PEAK_METRICS over them (None if nothing is new), and resets the peaks.
    Raises NonFiniteStep if a step of the epoch had a non-finite metric.
    """
    if self.totals is None or steps_in_epoch == self.epoch_steps:
      return None
    fetched = jax.device_get(self.totals)
    if fetched["bad_step"] != NO_BAD_STEP:
      raise NonFiniteStep(
        int(fetched["bad_step"]),
        {name: float(v) for name, v in fetched["bad_values"].items()},
      )
    sums = {name: float(total) for name, total in fetched["sum"].items()}
    peaks = {
      name: float(fetched["peak"][name])
      for name in PEAK_METRICS
      if name in sums
    }
    count = steps_in_epoch - self.epoch_steps
    means = {
      name: (total - self.epoch_sums.get(name, 0.0)) / count
      for name, total in sums.items()
    }
    self.epoch_sums, self.epoch_steps = sums, steps_in_epoch
    for name, value in peaks.items():
      self.epoch_peaks[name] = max(value, self.epoch_peaks.get(name, -np.inf))
    self.totals = reset_peaks(self.totals)
    return means | peaks

  def end_epoch(self, epoch: int, test: dict, reliability: dict) -> dict:
    """Closes the epoch (read to its end) in the history; returns the entry."""
    count = max(self.epoch_steps, 1)
    train = {k: v / count for k, v in self.epoch_sums.items()}
    train.update(self.epoch_peaks)
    entry = {
      "epoch": epoch,
      "train": train,
      "test": test,
      "reliability": reliability,
    }
    self.history.append(entry)
    self.epoch_sums, self.epoch_steps, self.epoch_peaks = {}, 0, {}
    self.totals = None
    return entry
