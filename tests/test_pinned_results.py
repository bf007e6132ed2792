"""Refactoring guard: short digits runs end on the figures recorded here.

The loop, the step and the checkpoints may be reorganised freely, but a
change to these numbers is a change of behaviour and must be deliberate.
Recorded on this project's x86 CPU machine; the tolerance leaves room only
for another CPU's float rounding, not for a different computation.
"""

import pytest

from aikd_jax import train
from configs import digits

pytestmark = pytest.mark.slow

# method -> (last epoch's test metrics, last epoch's training means)
PINNED = {
  "ai_kd": (
    {
      "top1_err": 56.82451253481895,
      "nll": 1.8634557850166642,
      "ece": 21.184892627230045,
      "aurc": 395.4601417838542,
    },
    {
      "loss/adv": 0.7180402062155984,
      "loss/det": 0.05501013994216919,
      "loss/disc": 1.3437273719094016,
      "loss/prog": 2.199411218816584,
      "loss/student": 2.2632614482532847,
      "train/grad_norm": 0.13713942874561658,
      "train/teacher_weight": 0.5045455152338202,
      "train/train_acc": 0.4786931818181818,
    },
  ),
  "cs_kd": (
    {
      "top1_err": 36.49025069637884,
      "nll": 1.4183521798155367,
      "ece": 33.51745915546221,
      "aurc": 178.6146482391933,
    },
    {
      "loss/cls": 0.13918072527105158,
      "loss/prog": 1.604737021706321,
      "loss/student": 1.7439176386052913,
      "train/grad_norm": 0.7110388929193671,
      "train/max_abs_logit": 3.3106589317321777,
      "train/train_acc": 0.6022727272727273,
    },
  ),
}


@pytest.mark.parametrize("method", sorted(PINNED))
def test_short_digits_run_ends_on_the_recorded_figures(method, tmp_path):
  config = digits.get_config()
  config.method = method
  config.num_epochs = 3
  config.teacher_num_epochs = 2
  results = train.train_and_evaluate(config, str(tmp_path))
  test, training = PINNED[method]
  assert {k: results["last"][k] for k in test} == pytest.approx(test, rel=1e-5)
  last_train = results["history"][-1]["train"]
  assert {k: last_train[k] for k in training} == pytest.approx(
    training, rel=1e-5
  )
