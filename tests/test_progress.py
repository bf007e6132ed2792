"""Tests for progress.ConsoleReport: the console's lines, rates and ETAs."""

import logging as std_logging

import pytest

from aikd_jax import progress


class FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


SCALARS = {
  "loss/student": 2.25,
  "loss/prog": 2.0,
  "loss/det": 2.5,
  "loss/adv": 0.6931,
  "loss/disc": 1.386,
  "train/train_acc": 0.5,
  "train/learning_rate": 0.1,
  "train/grad_norm": 3.0,
}


def _report(clock):
  return progress.ConsoleReport(
    "student",
    num_epochs=4,
    steps_per_epoch=10,
    batch_size=128,
    later_steps=0,
    clock=clock,
  )


def test_interval_line_rates_and_etas(caplog):
  caplog.set_level(std_logging.INFO)
  clock = FakeClock()
  report = _report(clock)
  report.compiling()
  clock.now += 29.5  # Compilation and the first step.
  assert report.compiled(1) == pytest.approx(29.5)
  clock.now += 4.5  # Steps 2..10: 9 steps at 2 steps/s.
  rates = report.interval(10, SCALARS)
  assert rates == {
    "steps_per_sec": pytest.approx(2.0),
    "images_per_sec": pytest.approx(256.0),
  }
  with report.excluded("eval"):
    clock.now += 2.0
  assert report.end_epoch(0, {"top1_err": 12.5, "nll": 0.5, "ece": 3.25}) == (
    pytest.approx(36.0)
  )
  clock.now += 5.0  # Steps 11..20; the 2 s of eval are left out.
  report.interval(20, SCALARS)
  messages = caplog.messages
  assert messages[0] == "student: compiling the train step..."
  assert messages[1] == (
    "student: train step compiled and first step run in 29.5s."
  )
  # 30 steps left at 2/s; no evaluation has been timed yet.
  assert messages[2] == (
    "student epoch 1/4 | step 10/40 | 256 img/s | ETA 15s (run 15s) | "
    "loss 2.25 (prog 2, det 2.5, adv 0.6931, disc 1.386) | "
    "train acc 50.0% | lr 0.1"
  )
  assert messages[3] == (
    "student epoch 1/4 done in 36s (eval 2.0s): test top-1 error 12.50%, "
    "NLL 0.500, ECE 3.25%"
  )
  # 20 steps at 2/s, plus 3 evaluations (epochs 2 to 4) of 2 s each.
  assert messages[4].startswith(
    "student epoch 2/4 | step 20/40 | 256 img/s | ETA 16s (run 16s) | "
  )


def test_whole_run_eta_counts_the_stages_to_come():
  clock = FakeClock()
  report = progress.ConsoleReport(
    "teacher",
    num_epochs=2,
    steps_per_epoch=10,
    batch_size=64,
    start_step=0,
    later_steps=30,
    later_epochs=3,
    clock=clock,
  )
  clock.now += 5.0
  report.interval(10, {})
  assert report.steps_per_sec == pytest.approx(2.0)
  stage, run = report.eta(10)
  assert stage == pytest.approx(5.0)
  assert run == pytest.approx(5.0 + 15.0)


@pytest.mark.parametrize(
  "seconds, text",
  [
    (0.42, "0.4s"),
    (12.3, "12s"),
    (754, "12m34s"),
    (45296, "12h34m"),
    (2 * 86400 + 3600, "2d01h"),
  ],
)
def test_format_duration(seconds, text):
  assert progress.format_duration(seconds) == text
