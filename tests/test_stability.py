"""PS-KD's recipe on real images with the paper's model must not diverge.

PreAct ResNet-18 at lr 0.1 and batch 128 on the bundled digits (real
handwritten images), with a teacher trained at a constant lr of 0.1: the
pre-trained model's terms at full weight from the first step blow the
student up within one epoch; with the ramp alone (objective.
TEACHER_RAMP_EPOCHS) it blew up in epoch 3-5, as the terms neared full
weight; the presets' stabiliser (the ramp and the student's gradient clipped
to objective.GRAD_CLIP_NORM) lets it train.
"""

import math
import os

import numpy as np
import pytest

from aikd_jax import progress
from aikd_jax import train
from aikd_jax.objective import resolve_objective
from configs import digits

TEACHER_EPOCHS = 3
STUDENT_EPOCHS = 7  # past the 5-epoch ramp: two epochs at full weight


def _config(**overrides):
  config = digits.get_config()
  config.model = "preact_resnet18"
  config.batch_size = 128
  config.learning_rate = 0.1
  config.lr_decay_epochs = (100,)  # constant lr 0.1: the unstable phase
  config.num_epochs = STUDENT_EPOCHS
  config.log_every_steps = 11
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


@pytest.fixture(scope="module")
def teacher_checkpoints(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = _config(num_epochs=TEACHER_EPOCHS)
  results = train.train_and_evaluate(config, workdir, teacher_only=True)
  assert results["last"]["top1_err"] < 20.0, results["last"]
  return os.path.join(workdir, "teacher", "checkpoints")


@pytest.mark.slow
def test_ai_kd_without_the_stabiliser_diverges(tmp_path, teacher_checkpoints):
  """Guards the test below: it would fail on a student that diverges."""
  config = _config(
    method="ai_kd",
    teacher_ramp_epochs=0.0,
    grad_clip_norm=0.0,
    teacher_checkpoint=teacher_checkpoints,
  )
  with pytest.raises(train.NonFiniteLossError, match="diverged"):
    train.train_and_evaluate(config, str(tmp_path / "student"))


@pytest.mark.slow
def test_ai_kd_defaults_train_preact_resnet18(tmp_path, teacher_checkpoints):
  config = _config(method="ai_kd", teacher_checkpoint=teacher_checkpoints)
  results = train.train_and_evaluate(config, str(tmp_path / "student"))
  assert len(results["history"]) == STUDENT_EPOCHS
  steps_per_epoch = results["steps_per_epoch"]
  assert STUDENT_EPOCHS * steps_per_epoch > 5 * steps_per_epoch + 10
  for epoch in results["history"]:
    for name, value in epoch["train"].items():
      assert math.isfinite(value), (epoch["epoch"], name, value)
    # Logits of a diverging run grow by orders of magnitude within steps.
    assert epoch["train"]["train/max_abs_logit"] < 1e3, epoch
  assert results["history"][-1]["train"]["train/teacher_weight"] == 1.0
  assert results["last"]["top1_err"] < 20.0, results["last"]
  assert np.isfinite(results["last"]["nll"])


# --- Seeing a divergence coming (fast) ---------------------------------------


def _step_metrics(det, prog, logit):
  return {
    "loss/det": np.float32(det),
    "loss/prog": np.float32(prog),
    "train/max_abs_logit": np.float32(logit),
  }


def test_totals_keep_the_first_bad_step_whole_and_interval_peaks():
  totals = progress.no_totals(_step_metrics(0, 0, 0))
  for step, metrics in enumerate(
    [
      _step_metrics(1.0, 2.0, 30.0),
      _step_metrics(5.0, 3.0, 900.0),
      _step_metrics(np.nan, 4.0, 1e6),
      _step_metrics(np.inf, np.nan, np.nan),
    ]
  ):
    totals = progress.accumulate(totals, metrics, step)
  assert int(totals["bad_step"]) == 2
  bad = {k: float(v) for k, v in totals["bad_values"].items()}
  assert np.isnan(bad["loss/det"])
  assert bad["loss/prog"] == 4.0 and bad["train/max_abs_logit"] == 1e6
  totals = progress.reset_peaks(totals)
  totals = progress.accumulate(totals, _step_metrics(1.0, 1.0, 7.0), 4)
  assert float(totals["peak"]["train/max_abs_logit"]) == 7.0
  assert int(totals["bad_step"]) == 2  # the first one stays


def test_divergence_message_names_every_bad_term_and_a_remedy():
  config = _config(method="ai_kd")
  objective = resolve_objective("ai_kd", {"teacher_ramp_epochs": 0.0})
  message = train.divergence_message(
    "student",
    9,
    11,
    {
      "loss/det": float("nan"),
      "loss/adv": float("inf"),
      "loss/prog": 5.5,
      "train/grad_norm": 1.2e4,
    },
    objective,
    config,
  )
  assert "step 9 (epoch 0) of the student stage" in message
  assert "loss/adv = inf, loss/det = nan not finite" in message
  assert "loss/prog = 5.5" in message and "train/grad_norm = 1.2e+04" in message
  assert "--config.teacher_ramp_epochs, now 0" in message
  assert "--config.learning_rate (now 0.1)" in message
  teacher = train.divergence_message(
    "teacher",
    3,
    11,
    {"loss/prog": float("nan")},
    resolve_objective("ce"),
    config,
  )
  assert "teacher_ramp_epochs" not in teacher
  assert "learning_rate" in teacher and "warmup_epochs" in teacher
  assert "grad_clip_norm" not in teacher  # the teacher's recipe has no clip
