"""The epoch loop with several steps per call (config.steps_per_dispatch).

Fast: the metric totals of one call equal those of one `accumulate` per
step, bit for bit (divergence detection by step included), a read finished
after later steps were queued holds only the steps before it, and the workdir
accepts a change of K between runs only where the result cannot change.
Slow: short digits runs with K = 2 and K = 3, and one with K = 3 stopped at
a step that is no multiple of 3 and resumed with K = 2, end bitwise equal.
"""

import os

import e2e_util as u
import jax
import numpy as np
import pytest

from aikd_jax import checkpointing
from aikd_jax import dispatch
from aikd_jax import preemption
from aikd_jax import progress as progress_lib
from aikd_jax import run_config
from aikd_jax import train


def _stacked(num_steps=5, bad_row=3):
  rng = np.random.default_rng(0)
  stacked = {
    "loss/student": rng.normal(size=num_steps).astype(np.float32),
    "train/max_abs_logit": rng.normal(size=num_steps).astype(np.float32),
  }
  if bad_row is not None:
    stacked["loss/student"][bad_row] = np.nan
  return stacked


@pytest.mark.parametrize("bad_row", [None, 1, 3])
def test_accumulate_steps_equals_one_accumulate_per_step(bad_row):
  stacked = _stacked(bad_row=bad_row)
  first = {k: v[0] for k, v in stacked.items()}
  totals = progress_lib.no_totals(first)
  per_step = totals
  for i in range(4):
    row = {k: v[i] for k, v in stacked.items()}
    per_step = progress_lib.accumulate(per_step, row, np.int32(40 + i))
  # Row 4 lies past the call's 4 steps: it must be left out.
  one_call = progress_lib.accumulate_steps(
    totals, stacked, np.int32(40), np.int32(4)
  )
  a, b = jax.device_get(per_step), jax.device_get(one_call)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
  expected_bad = progress_lib.NO_BAD_STEP if bad_row is None else 40 + bad_row
  assert int(b["bad_step"]) == expected_bad


def test_progress_add_steps_reports_the_first_bad_step():
  progress = progress_lib.Progress()
  progress.add_steps(_stacked(bad_row=None), 0, 5)
  progress.add_steps(_stacked(bad_row=2), 5, 4)
  progress.request_read(9, ends_epoch=False)
  with pytest.raises(progress_lib.NonFiniteStep) as info:
    progress.finish_read()
  assert info.value.step == 7


def _step_metrics(value):
  return {
    "loss/student": np.float32(value),
    "train/max_abs_logit": np.float32(value),
  }


def test_a_read_finished_later_sees_only_the_steps_before_it():
  """The loop asks for a read, dispatches more steps, then finishes it:
  the read must hold the steps before it, and the epoch's last read its
  whole epoch, however many of the next steps were added meanwhile."""
  progress = progress_lib.Progress()
  for step, value in enumerate([1.0, 2.0, 3.0, 4.0]):
    progress.add(_step_metrics(value), step)
  progress.request_read(4, ends_epoch=False)
  progress.add(_step_metrics(100.0), 4)
  scalars, closed = progress.finish_read()
  assert scalars == {"loss/student": 2.5, "train/max_abs_logit": 4.0}
  assert closed is None
  progress.add(_step_metrics(6.0), 5)
  progress.request_read(6, ends_epoch=True)
  # The next epoch's first step, added before the epoch's read finishes.
  progress.add(_step_metrics(1000.0), 6)
  scalars, closed = progress.finish_read()
  assert scalars == {"loss/student": 53.0, "train/max_abs_logit": 100.0}
  assert closed == {"loss/student": 116.0 / 6, "train/max_abs_logit": 100.0}
  progress.request_read(1, ends_epoch=False)
  assert progress.finish_read() == (
    {"loss/student": 1000.0, "train/max_abs_logit": 1000.0},
    None,
  )
  # Nothing new since the last read: nothing to ask for.
  progress.request_read(1, ends_epoch=False)
  assert progress.finish_read() == (None, None)


def test_workdir_accepts_k_changes_that_keep_the_result(tmp_path):
  workdir = str(tmp_path)
  run_config.save(u.digits_config(steps_per_dispatch=4), workdir)
  notes = run_config.compare_with_saved(
    u.digits_config(steps_per_dispatch=2), workdir
  )
  assert notes == ["  steps_per_dispatch: 4 (saved) -> 2 (now)"]
  # 1 runs the plain step, equal to the loop's steps only to rounding.
  with pytest.raises(run_config.ConfigError, match="steps_per_dispatch"):
    run_config.compare_with_saved(
      u.digits_config(steps_per_dispatch=1), workdir
    )


def test_workdir_from_before_the_field_counts_as_one_step_per_call(tmp_path):
  workdir = str(tmp_path)
  run_config.save(u.digits_config(), workdir)
  u.edit_saved_config(workdir, lambda saved: saved.pop("steps_per_dispatch"))
  assert run_config.compare_with_saved(u.digits_config(), workdir) == []
  with pytest.raises(run_config.ConfigError, match="steps_per_dispatch"):
    run_config.compare_with_saved(
      u.digits_config(steps_per_dispatch=8), workdir
    )


def test_steps_per_dispatch_must_not_be_negative():
  with pytest.raises(run_config.ConfigError, match="steps_per_dispatch"):
    run_config.validate(u.digits_config(steps_per_dispatch=-1))
  run_config.validate(u.digits_config(steps_per_dispatch=0))  # automatic


@pytest.mark.parametrize(
  "setting, streamed, backend, expected",
  [
    (0, False, "gpu", dispatch.GPU_STEPS_PER_DISPATCH),
    (0, True, "gpu", 1),  # A call of K steps reads the split on the devices.
    (0, False, "cpu", 1),  # XLA:CPU runs the loop far slower.
    (0, False, "tpu", 1),  # Not measured.
    (4, False, "cpu", 4),  # An explicit K is kept.
    (1, False, "gpu", 1),
  ],
)
def test_automatic_steps_per_dispatch(setting, streamed, backend, expected):
  assert dispatch.steps_per_call(setting, streamed, backend) == expected


def test_workdir_automatic_k_is_what_it_chooses_here(tmp_path):
  """On this CPU the automatic K is 1: a run started with it may go on
  with an explicit 1, not with a K > 1 (another program)."""
  workdir = str(tmp_path)
  run_config.save(u.digits_config(steps_per_dispatch=0), workdir)
  run_config.compare_with_saved(u.digits_config(steps_per_dispatch=1), workdir)
  with pytest.raises(run_config.ConfigError, match="steps_per_dispatch"):
    run_config.compare_with_saved(
      u.digits_config(steps_per_dispatch=4), workdir
    )


# --- whole runs --------------------------------------------------------------

EPOCHS = 2
STEPS_PER_EPOCH = 22  # digits: 1438 training examples, batch 64


def _short_config(k):
  return u.digits_config(
    method="ps_kd", num_epochs=EPOCHS, steps_per_dispatch=k
  )


def _assert_same(a, b):
  assert a[0] == b[0] == EPOCHS * STEPS_PER_EPOCH
  assert sorted(a[1]) == sorted(b[1])
  differ = [n for n in a[1] if a[1][n].tobytes() != b[1][n].tobytes()]
  assert not differ, differ
  # History, train means included, bit for bit (JSON floats).
  assert a[2] == b[2]


def _stop_after_calls(calls):
  """A SignalFlag that 'receives' SIGTERM during the `calls`-th call."""

  class StopAfter(preemption.SignalFlag):
    seen = 0

    def stop_agreed(self, at_sync_point):
      StopAfter.seen += 1
      if StopAfter.seen == calls:
        self.received = "SIGTERM"
      return super().stop_agreed(at_sync_point)

  return StopAfter


@pytest.mark.slow  # three short runs, about a minute on 2 cores
def test_runs_with_any_k_above_one_and_a_resume_end_bitwise_equal(
  tmp_path, monkeypatch
):
  three = str(tmp_path / "k3")
  train.train_and_evaluate(_short_config(3), three)
  two = str(tmp_path / "k2")
  train.train_and_evaluate(_short_config(2), two)
  reference = u.final_student(three)
  _assert_same(reference, u.final_student(two))

  # K = 3: epoch 0 is 7 calls of 3 and one of 1; the 9th call ends at step
  # 25, no multiple of 3. The stopped run saves there; the rerun goes on
  # with K = 2 from step 25.
  stopped = str(tmp_path / "stopped")
  monkeypatch.setattr(train, "SignalFlag", _stop_after_calls(9))
  with pytest.raises(preemption.Preempted, match="at step 25 "):
    train.train_and_evaluate(_short_config(3), stopped)
  directory = os.path.join(stopped, "student", checkpointing.CHECKPOINT_DIR)
  assert checkpointing.saved_steps(directory)[-1] == 25
  monkeypatch.setattr(train, "SignalFlag", preemption.SignalFlag)
  train.train_and_evaluate(_short_config(2), stopped)
  _assert_same(reference, u.final_student(stopped))


def test_k_above_one_is_refused_for_a_streamed_split():
  dispatch.check_data(1, streamed=True)
  dispatch.check_data(4, streamed=False)
  with pytest.raises(run_config.ConfigError, match="streams it"):
    dispatch.check_data(4, streamed=True)
