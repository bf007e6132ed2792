"""What the epoch loop keeps besides the train state: metric totals, history.

Each step's metrics are added up on device in float32, step by step, so an
epoch's means do not depend on when the host reads them; beside the sums,
the largest value of each metric since the last read, and the first step at
which any metric was not finite, with all of that step's values, so that a
divergence can be reported whole. The host reads a few scalars per log
interval, and asks for them before it waits for them (`request_read`,
`finish_read`), so the loop can queue more steps in between. A
checkpoint's `progress` item is `Progress.saved()`: what a resumed run
needs to go on bit for bit.

`ConsoleReport` turns what the host reads into the console's lines: one per
log interval, one per epoch, and the compilation of the train step.
"""

from __future__ import annotations

from collections.abc import Iterator
import contextlib
import dataclasses
import time

from absl import logging
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
def accumulate_steps(
  totals: dict, stacked: dict, first_step: jax.Array, num_steps: jax.Array
) -> dict:
  """`accumulate` for the first `num_steps` rows of stacked metrics (one
  call of a several-steps-per-dispatch step), row i being step
  first_step + i: the same sums, peaks and first bad step as one call of
  `accumulate` per step, in one dispatch. The loop runs over every row and
  keeps the totals past `num_steps`, so its trip count is a constant (see
  train_step.StepsPerCall)."""

  def body(i, totals):
    row = jax.tree.map(lambda v: v[i], stacked)
    added = accumulate(totals, row, first_step + i)
    return jax.tree.map(
      lambda new, old: jnp.where(i < num_steps, new, old), added, totals
    )

  rows = jax.tree.leaves(stacked)[0].shape[0]
  return jax.lax.fori_loop(0, rows, body, totals)


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
    pending: the totals `request_read` asked for, with the step they reach
      and whether they end the epoch, until `finish_read`.
  """

  history: list[dict] = dataclasses.field(default_factory=list)
  epoch_sums: dict[str, float] = dataclasses.field(default_factory=dict)
  epoch_steps: int = 0
  epoch_peaks: dict[str, float] = dataclasses.field(default_factory=dict)
  totals: dict | None = None
  pending: tuple[dict | None, int, bool] | None = None

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
    assert self.pending is None, "finish_read before saving"
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

  def add_steps(self, stacked: dict, first_step: int, num_steps: int) -> None:
    """Adds steps first_step .. first_step + num_steps - 1, whose metrics
    are the first rows of `stacked` (no host sync)."""
    if self.totals is None:
      self.totals = no_totals(jax.tree.map(lambda v: v[0], stacked))
    self.totals = accumulate_steps(
      self.totals, stacked, np.int32(first_step), np.int32(num_steps)
    )

  def request_read(self, steps_in_epoch: int, ends_epoch: bool) -> None:
    """Asks for the totals after the epoch's `steps_in_epoch`-th step,
    without waiting for them: `finish_read` reads them later, so the device
    can run the steps dispatched in between while the host waits.

    Nothing is asked if no step was added since the last request. With
    `ends_epoch`, the next step added starts the next epoch's totals.
    """
    assert self.pending is None, "finish_read the previous request first"
    if self.totals is not None and steps_in_epoch != self.epoch_steps:
      self.pending = (self.totals, steps_in_epoch, ends_epoch)
      self.totals = None if ends_epoch else reset_peaks(self.totals)
    elif ends_epoch:
      self.pending, self.totals = (None, steps_in_epoch, ends_epoch), None

  def finish_read(self) -> tuple[dict[str, float] | None, dict | None]:
    """Reads what `request_read` asked for (waiting if need be).

    Returns:
      (scalars, closed): the means of the steps since the previous read and
      the peaks of PEAK_METRICS over them (None if nothing was asked), and,
      for a read that ends the epoch, the epoch's train means and peaks for
      `record_epoch` (else None).
    Raises:
      NonFiniteStep if a step of the epoch had a non-finite metric.
    """
    if self.pending is None:
      return None, None
    totals, steps_in_epoch, ends_epoch = self.pending
    self.pending = None
    scalars = None if totals is None else self._take(totals, steps_in_epoch)
    return scalars, (self._close_epoch() if ends_epoch else None)

  def _take(self, totals: dict, steps_in_epoch: int) -> dict[str, float]:
    """The interval's means and peaks from fetched `totals`."""
    fetched = jax.device_get(totals)
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
    return means | peaks

  def _close_epoch(self) -> dict[str, float]:
    """The epoch's train means and peaks, read to its end; the next
    epoch's reads start afresh."""
    count = max(self.epoch_steps, 1)
    train = {k: v / count for k, v in self.epoch_sums.items()}
    train.update(self.epoch_peaks)
    self.epoch_sums, self.epoch_steps, self.epoch_peaks = {}, 0, {}
    return train

  def record_epoch(
    self, epoch: int, train: dict, test: dict, reliability: dict
  ) -> dict:
    """Adds a closed epoch and its evaluation to the history; returns the
    entry. `saved()` must not be taken between the two: a checkpoint's
    history has every epoch before its step."""
    entry = {
      "epoch": epoch,
      "train": train,
      "test": test,
      "reliability": reliability,
    }
    self.history.append(entry)
    return entry


def format_duration(seconds: float) -> str:
  """0.42 -> "0.4s", 12.3 -> "12s", 754 -> "12m34s", 45296 -> "12h34m",
  2 days -> "2d00h"."""
  if seconds < 9.95:
    return f"{max(seconds, 0.0):.1f}s"
  seconds = int(round(seconds))
  days, rest = divmod(seconds, 86400)
  hours, rest = divmod(rest, 3600)
  minutes, secs = divmod(rest, 60)
  if days:
    return f"{days}d{hours:02d}h"
  if hours:
    return f"{hours}h{minutes:02d}m"
  if minutes:
    return f"{minutes}m{secs:02d}s"
  return f"{secs}s"


# The console line's losses, in this order; the rest go to TensorBoard only.
_CONSOLE_LOSSES = ("student", "prog", "det", "cls", "adv", "disc")


class ConsoleReport:
  """A stage's progress on the console: a handful of lines per epoch.

  One line per log interval (epoch, step/total, images/s, the stage's ETA and
  the whole run's, the interval's losses), the compilation of the train step,
  and one line per epoch with its wall time and test figures. Time spent in
  `excluded` blocks (evaluation, checkpoints) does not count towards the
  images/s; the ETAs add the mean evaluation time of the epochs to come.

  Args:
    stage: its name, at the start of every line.
    num_epochs, steps_per_epoch: the stage's length.
    batch_size: images per step, over all devices.
    start_step: the step a resumed stage starts from.
    later_steps, later_epochs: the training steps and epochs of the stages
      that will run after this one, for the whole run's ETA.
    clock: seconds, monotonic (tests pass a fake one).
  """

  def __init__(
    self,
    stage: str,
    *,
    num_epochs: int,
    steps_per_epoch: int,
    batch_size: int,
    start_step: int = 0,
    later_steps: int = 0,
    later_epochs: int = 0,
    clock=None,
  ):
    self._clock = clock or time.monotonic
    self.stage, self.num_epochs = stage, num_epochs
    self.steps_per_epoch, self.batch_size = steps_per_epoch, batch_size
    self.total_steps = num_epochs * steps_per_epoch
    self.later_steps, self.later_epochs = later_steps, later_epochs
    now = self._clock()
    self._mark_step, self._mark_time, self._excluded = start_step, now, 0.0
    self._epoch_start, self._epoch_excluded = now, {}
    self._steps_ended: float | None = None
    self._eval_times: list[float] = []
    self._compile_start = None
    self.steps_per_sec: float | None = None

  def compiling(self) -> None:
    """Call just before the stage's first step."""
    self._compile_start = self._clock()
    logging.info("%s: compiling the train step...", self.stage)

  def compiled(self, step: int) -> float:
    """Call once the first step (`step` is the one after it) has finished.

    Returns the seconds from `compiling` to now (compilation and one step);
    the images/s leave them out.
    """
    now = self._clock()
    seconds = now - self._compile_start
    logging.info(
      "%s: train step compiled and first step run in %.1fs.",
      self.stage,
      seconds,
    )
    self._mark_step, self._mark_time, self._excluded = step, now, 0.0
    return seconds

  @contextlib.contextmanager
  def excluded(self, name: str) -> Iterator[None]:
    """`with report.excluded("eval"):` keeps the block out of images/s."""
    start = self._clock()
    try:
      yield
    finally:
      seconds = self._clock() - start
      self._excluded += seconds
      parts = self._epoch_excluded
      parts[name] = parts.get(name, 0.0) + seconds

  def eta(self, step: int) -> tuple[float, float] | None:
    """(stage, whole run) seconds left after `step`; None before a rate."""
    if not self.steps_per_sec:
      return None
    eval_secs = (
      sum(self._eval_times) / len(self._eval_times) if self._eval_times else 0
    )
    # Evaluations to come, the current epoch's included: an interval that
    # ends an epoch is logged before that epoch is evaluated.
    epochs_left = self.num_epochs - max(step - 1, 0) // self.steps_per_epoch
    stage = (self.total_steps - step) / self.steps_per_sec
    stage += epochs_left * eval_secs
    run = stage + self.later_steps / self.steps_per_sec
    run += self.later_epochs * eval_secs
    return stage, run

  def interval(self, step: int, scalars: dict[str, float]) -> dict[str, float]:
    """Logs the line of the interval that ends after `step`.

    Args:
      scalars: the interval's means (`Progress.read`).

    Returns:
      The rates, for TensorBoard: steps_per_sec and images_per_sec.
    """
    now = self._clock()
    seconds = now - self._mark_time - self._excluded
    rates = {}
    if step > self._mark_step and seconds > 0:
      self.steps_per_sec = (step - self._mark_step) / seconds
      rates = {
        "steps_per_sec": self.steps_per_sec,
        "images_per_sec": self.steps_per_sec * self.batch_size,
      }
    self._mark_step, self._mark_time, self._excluded = step, now, 0.0
    epoch = min(step - 1, self.total_steps - 1) // self.steps_per_epoch
    parts = [
      f"{self.stage} epoch {epoch + 1}/{self.num_epochs}",
      f"step {step}/{self.total_steps}",
    ]
    if rates:
      parts.append(f"{rates['images_per_sec']:,.0f} img/s")
    eta = self.eta(step)
    if eta is not None:
      stage_eta, run_eta = eta
      parts.append(
        f"ETA {format_duration(stage_eta)} (run {format_duration(run_eta)})"
      )
    parts.append(_losses_text(scalars))
    logging.info("%s", " | ".join(parts))
    return rates

  def steps_ended(self) -> None:
    """Call at an epoch's end when its evaluation will be read later, during
    the next epoch's steps: the epoch's wall time ends here."""
    self._steps_ended = self._clock()

  def end_epoch(self, epoch: int, test: dict[str, float]) -> float:
    """Logs the epoch's wall time and test figures; returns the wall time.

    Call after the epoch's evaluation (and its checkpoint, if any).
    """
    now = self._clock() if self._steps_ended is None else self._steps_ended
    self._steps_ended = None
    wall = now - self._epoch_start
    if "eval" in self._epoch_excluded:
      self._eval_times.append(self._epoch_excluded["eval"])
    excluded = ", ".join(
      f"{name} {format_duration(secs)}"
      for name, secs in sorted(self._epoch_excluded.items())
    )
    logging.info(
      "%s epoch %d/%d done in %s%s: test top-1 error %.2f%%, NLL %.3f, "
      "ECE %.2f%%",
      self.stage,
      epoch + 1,
      self.num_epochs,
      format_duration(wall),
      f" ({excluded})" if excluded else "",
      test["top1_err"],
      test["nll"],
      test["ece"],
    )
    self._epoch_start, self._epoch_excluded = now, {}
    return wall


def _losses_text(scalars: dict[str, float]) -> str:
  """ "loss 1.234 (prog 1.1, det 0.3) | acc 55.0% | lr 0.1"."""
  losses = {
    name: scalars[f"loss/{name}"]
    for name in _CONSOLE_LOSSES
    if f"loss/{name}" in scalars
  }
  text = []
  if "student" in losses:
    total = losses.pop("student")
    inner = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    text.append(f"loss {total:.4g}" + (f" ({inner})" if inner else ""))
  if "train/train_acc" in scalars:
    text.append(f"train acc {100 * scalars['train/train_acc']:.1f}%")
  if "train/learning_rate" in scalars:
    text.append(f"lr {scalars['train/learning_rate']:.3g}")
  return " | ".join(text)
