"""When checkpoints are saved: by epochs (the default) or by wall time.

Fast: the policy's decisions against a fake clock. Slow: a short digits run
that saves by time (at every log step and epoch end) ends bitwise equal to
one that saves by epoch, and so does a rerun from one of its mid-epoch
checkpoints; a run that saves only at its end reads each epoch's metrics
and evaluation while the next steps run, and ends bitwise equal too.
"""

import os
import shutil

import e2e_util as u
import pytest

from aikd_jax import checkpointing
from aikd_jax import progress as progress_lib
from aikd_jax import run_config
from aikd_jax import stage as stage_lib
from aikd_jax import train
from aikd_jax.checkpoint_policy import CheckpointPolicy
from configs import digits


class FakeClock:
  def __init__(self):
    self.now = 1000.0

  def __call__(self):
    return self.now


def test_by_epochs_by_default():
  policy = CheckpointPolicy(every_epochs=2, clock=FakeClock())
  assert [policy.at_epoch_end(e, False) for e in range(4)] == [
    False,
    True,
    False,
    True,
  ]
  assert policy.at_epoch_end(2, last_step=True)
  assert not policy.at_log_step()


def test_by_time_counts_from_the_last_save():
  clock = FakeClock()
  policy = CheckpointPolicy(every_epochs=1, every_minutes=10, clock=clock)
  clock.now += 9 * 60
  # The epoch rule is replaced, not added to.
  assert not policy.at_epoch_end(0, False)
  assert not policy.at_log_step()
  clock.now += 60
  assert policy.at_log_step()
  assert policy.at_epoch_end(0, False)
  policy.saved()
  clock.now += 5 * 60
  assert not policy.at_epoch_end(1, False)
  assert policy.at_epoch_end(1, last_step=True)  # A stage's end always saves.
  clock.now += 5 * 60
  assert policy.at_epoch_end(2, False)


def test_minutes_must_not_be_negative():
  config = digits.get_config()
  config.checkpoint_every_minutes = -1.0
  with pytest.raises(run_config.ConfigError, match="checkpoint_every_min"):
    run_config.validate(config)


# --- whole runs --------------------------------------------------------------

EPOCHS = 2


def _config(minutes):
  config = digits.get_config()
  config.method = "ps_kd"
  config.num_epochs = EPOCHS
  config.checkpoint_every_minutes = minutes
  config.keep_checkpoints = 10
  return config


def _checkpoints(workdir):
  return os.path.join(workdir, "student", checkpointing.CHECKPOINT_DIR)


def _assert_same(a, b):
  assert a[0] == b[0]
  assert sorted(a[1]) == sorted(b[1])
  differ = [n for n in a[1] if a[1][n].tobytes() != b[1][n].tobytes()]
  assert not differ, differ
  assert a[2] == b[2]


@pytest.mark.slow  # three short runs, about a minute on 2 cores
def test_saving_by_time_changes_nothing_and_resumes_bitwise(tmp_path):
  by_epoch = str(tmp_path / "by_epoch")
  train.train_and_evaluate(_config(0.0), by_epoch)
  reference = u.final_student(by_epoch)
  assert checkpointing.saved_steps(_checkpoints(by_epoch)) == [22, 44]

  # A tiny interval: a save at every log step (20, 40) and epoch end.
  by_time = str(tmp_path / "by_time")
  train.train_and_evaluate(_config(1e-9), by_time)
  assert checkpointing.saved_steps(_checkpoints(by_time)) == [20, 22, 40, 44]
  _assert_same(reference, u.final_student(by_time))

  # As if the run had been killed just after saving step 40, mid-epoch.
  for step in (44,):
    shutil.rmtree(os.path.join(_checkpoints(by_time), str(step)))
  os.remove(os.path.join(by_time, "student", "results.json"))
  train.train_and_evaluate(_config(1e-9), by_time)
  _assert_same(reference, u.final_student(by_time))


def _record_reads(monkeypatch):
  """Wraps each stage's train step; its `reads` get (steps into the epoch,
  ends the epoch, calls of the step dispatched so far) at each metric read
  the loop finishes. Returns the wrapped steps, one per stage."""
  steps = []
  make_train_step = stage_lib.make_train_step

  def counting(*args, **kwargs):
    step_fn = make_train_step(*args, **kwargs)

    def counted(*call_args):
      counted.calls += 1
      return step_fn(*call_args)

    counted.calls, counted.reads = 0, []
    steps.append(counted)
    return counted

  finish_read = progress_lib.Progress.finish_read

  def recording(self):
    if self.pending is not None:
      _, steps_in_epoch, ends_epoch = self.pending
      steps[-1].reads.append((steps_in_epoch, ends_epoch, steps[-1].calls))
    return finish_read(self)

  monkeypatch.setattr(stage_lib, "make_train_step", counting)
  monkeypatch.setattr(progress_lib.Progress, "finish_read", recording)
  return steps


@pytest.mark.slow  # two short runs
def test_evaluations_read_during_the_next_epoch_change_nothing(
  tmp_path, monkeypatch
):
  """Saving only at the stage's end lets each epoch's metrics and
  evaluation be read while the next steps run; the history and the weights
  must be those of a run that reads every evaluation at once (saving every
  epoch)."""
  by_epoch = str(tmp_path / "by_epoch")
  train.train_and_evaluate(_config(0.0), by_epoch)
  at_end = str(tmp_path / "at_end")
  steps = _record_reads(monkeypatch)
  train.train_and_evaluate(_config(1e9), at_end)
  assert checkpointing.saved_steps(_checkpoints(at_end)) == [44]
  # Each read finished one call after its step (22 steps per epoch, a log
  # step every 20): epoch 0's last after epoch 1's first call was queued.
  # Only the stage's last read waits for the last step.
  assert steps[-1].reads == [
    (20, False, 21),
    (22, True, 23),
    (18, False, 41),
    (22, True, 44),
  ]
  reference, overlapped = u.final_student(by_epoch), u.final_student(at_end)
  _assert_same(reference, overlapped)
  history = overlapped[2]["history"]
  assert [entry["epoch"] for entry in history] == list(range(EPOCHS))
