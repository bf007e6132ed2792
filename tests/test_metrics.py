"""Tests for aikd_jax.metrics on hand-built cases with known answers."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from aikd_jax import metrics

# --- expected_calibration_error -----------------------------------------


def test_ece_all_correct_and_certain_is_zero():
  assert metrics.expected_calibration_error(np.ones(5), np.ones(5)) == 0.0


def test_ece_two_bins():
  # Bin (0.8, 0.9]: acc 1/2, conf 0.9 -> |0.5 - 0.9| * 2/4 = 0.2.
  # Bin (0.5, 0.6]: acc 1, conf 0.6  -> |1 - 0.6| * 2/4 = 0.2.
  # ECE = 100 * 0.4 = 40.
  ece = metrics.expected_calibration_error(
    [0.9, 0.9, 0.6, 0.6], [True, False, True, True]
  )
  assert ece == pytest.approx(40.0)


def test_ece_bins_are_closed_on_the_right():
  # 0.3 belongs to (0.2, 0.3], 0.35 to (0.3, 0.4]:
  # |1 - 0.3| / 2 + |0 - 0.35| / 2 = 0.525 -> 52.5.
  # (Were both in one bin: |0.5 - 0.325| = 0.175 -> 17.5.)
  ece = metrics.expected_calibration_error([0.3, 0.35], [True, False])
  assert ece == pytest.approx(52.5)


def test_ece_zero_confidence_goes_to_first_bin():
  # Both in (0, 0.1] (0 included): |acc 0.5 - conf 0.05| = 0.45 -> 45.
  # (A separate bin for 0 would give 55; dropping it would give 5.)
  ece = metrics.expected_calibration_error([0.0, 0.1], [True, False])
  assert ece == pytest.approx(45.0)


def test_ece_num_bins():
  # Two bins (0, 0.5], (0.5, 1]: |1 - 0.5| / 2 + |1 - 0.75| / 2 = 0.375.
  ece = metrics.expected_calibration_error([0.5, 0.75], [1, 1], num_bins=2)
  assert ece == pytest.approx(37.5)


# --- aurc_eaurc ---------------------------------------------------------


def test_aurc_all_correct_is_zero():
  assert metrics.aurc_eaurc(np.ones(4), np.ones(4, bool)) == (0.0, 0.0)


def test_aurc_single_error_ranked_first():
  # Ranked 0.9 (wrong), 0.8, 0.7, 0.6: risk = 1, 1/2, 1/3, 1/4, so
  # AURC = (1 + 1/2 + 1/3 + 1/4) / 4 = 25/48; optimal (r = 1, n = 4) is
  # (1/4) * 1/4 = 1/16; E-AURC = 25/48 - 3/48 = 22/48.
  aurc, eaurc = metrics.aurc_eaurc(
    [0.9, 0.8, 0.7, 0.6], [False, True, True, True]
  )
  assert aurc == pytest.approx(1000 * 25 / 48)
  assert eaurc == pytest.approx(1000 * 22 / 48)


def test_aurc_single_error_ranked_last_is_ideal():
  # Risk = 0, 0, 0, 1/4: AURC = 1/16 = the optimum, so E-AURC = 0.
  # Input order is shuffled; the ranking comes from the confidences.
  aurc, eaurc = metrics.aurc_eaurc(
    [0.7, 0.6, 0.9, 0.8], [True, False, True, True]
  )
  assert aurc == pytest.approx(62.5)
  assert eaurc == pytest.approx(0.0, abs=1e-9)


def test_eaurc_ideal_ranking_with_several_errors():
  # n = 5, r = 2, errors least confident: risk = 0, 0, 0, 1/4, 2/5, so
  # AURC = (1/4 + 2/5) / 5 = 0.13 = (1/5) * sum_{i=1,2} i / (3 + i).
  aurc, eaurc = metrics.aurc_eaurc(
    [0.95, 0.9, 0.85, 0.5, 0.4], [True, True, True, False, False]
  )
  assert aurc == pytest.approx(130.0)
  assert eaurc == pytest.approx(0.0, abs=1e-9)


def test_aurc_ties_keep_input_order():
  # Equal confidences: the stable sort keeps input order.
  # [wrong, right] -> risk 1, 1/2 -> 750; [right, wrong] -> 0, 1/2 -> 250.
  # Optimum for n = 2, r = 1 is (1/2) * 1/2 = 0.25.
  assert metrics.aurc_eaurc([0.5, 0.5], [False, True]) == pytest.approx(
    (750.0, 500.0)
  )
  assert metrics.aurc_eaurc([0.5, 0.5], [True, False]) == pytest.approx(
    (250.0, 0.0)
  )


def test_aurc_all_wrong():
  # Risk is 1 at every coverage, as is the optimum: AURC 1000, E-AURC 0.
  aurc, eaurc = metrics.aurc_eaurc([0.9, 0.5, 0.7], [False, False, False])
  assert aurc == pytest.approx(1000.0)
  assert eaurc == pytest.approx(0.0, abs=1e-9)


# --- classification_report ----------------------------------------------

# Rows are softmax probabilities; their logs are the logits. Confidences sit
# mid-bin so that rounding in log/softmax cannot move them across an edge.
_PROBS = np.array(
  [
    [0.65, 0.15, 0.05, 0.05, 0.05, 0.05],  # label 0: right, conf 0.65
    [0.75, 0.15, 0.04, 0.03, 0.02, 0.01],  # label 1: wrong, rank 1, conf 0.75
    [0.35, 0.25, 0.15, 0.1, 0.1, 0.05],  # label 5: wrong, rank 5, conf 0.35
    [0.1, 0.1, 0.55, 0.15, 0.05, 0.05],  # label 2: right, conf 0.55
  ]
)
_LABELS = np.array([0, 1, 5, 2])


def _check_hand_case(report, rel):
  assert set(report) == {"top1_err", "top5_err", "nll", "ece", "aurc", "eaurc"}
  assert all(isinstance(v, float) for v in report.values())
  assert report["top1_err"] == pytest.approx(50.0)
  assert report["top5_err"] == pytest.approx(25.0)  # only row 2 misses
  # NLL = -mean log p(label) = -(log .65 + log .15 + log .05 + log .55) / 4.
  nll = -(math.log(0.65) + math.log(0.15) + math.log(0.05) + math.log(0.55)) / 4
  assert report["nll"] == pytest.approx(nll, rel=rel)
  # One example per bin: (|1 - .65| + |0 - .75| + |0 - .35| + |1 - .55|) / 4
  # = 1.9 / 4 -> 47.5.
  assert report["ece"] == pytest.approx(47.5, rel=rel)
  # Ranked .75 (W), .65, .55, .35 (W): risk 1, 1/2, 1/3, 1/2 -> sum 7/3, AURC
  # 7/12. Optimum for n = 4, r = 2: (1/4)(1/3 + 2/4) = 5/24.
  # E-AURC = 14/24 - 5/24 = 9/24.
  assert report["aurc"] == pytest.approx(1000 * 7 / 12, rel=rel)
  assert report["eaurc"] == pytest.approx(1000 * 9 / 24, rel=rel)


def test_report_hand_case_numpy_with_large_offsets():
  # A per-row constant does not change the softmax; +1e3 would overflow a
  # naive exp.
  logits = np.log(_PROBS) + np.array([[1e3], [-1e3], [0.0], [5e2]])
  _check_hand_case(metrics.classification_report(logits, _LABELS), 1e-9)


def test_report_hand_case_jax_float32():
  logits = jnp.log(jnp.asarray(_PROBS, jnp.float32))
  report = metrics.classification_report(logits, jnp.asarray(_LABELS))
  _check_hand_case(report, 1e-5)


def test_report_top5_with_fewer_than_five_classes():
  # C = 3: top-5 means top-3, always right. Top-1: rows 0 and 2 right.
  logits = np.array([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
  report = metrics.classification_report(logits, np.array([0, 2, 2]))
  assert report["top1_err"] == pytest.approx(100 / 3)
  assert report["top5_err"] == 0.0


def test_report_class_ties_break_to_lower_index():
  # Row 0 ties classes 0 and 1: the prediction is class 0, as argmax says.
  # With C = 6, class 5 tied with classes 0..4 at rank 5 misses the top 5.
  logits = np.zeros((3, 6))
  logits[0, :2] = 1.0
  report = metrics.classification_report(logits, np.array([1, 0, 5]))
  assert report["top1_err"] == pytest.approx(200 / 3)  # rows 0 and 2 wrong
  assert report["top5_err"] == pytest.approx(100 / 3)  # row 2 only


def test_report_matches_naive_reference():
  rng = np.random.default_rng(0)
  n, c = 500, 10
  logits = 3 * rng.normal(size=(n, c))
  labels = rng.integers(0, c, size=n)
  report = metrics.classification_report(logits, labels)

  probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
  conf = probs.max(axis=1)
  correct = probs.argmax(axis=1) == labels
  top5 = np.argsort(-logits, axis=1)[:, :5]
  assert report["top1_err"] == pytest.approx(100 * (1 - correct.mean()))
  assert report["top5_err"] == pytest.approx(
    100 * (1 - (top5 == labels[:, None]).any(axis=1).mean())
  )
  assert report["nll"] == pytest.approx(
    -np.log(probs[np.arange(n), labels]).mean()
  )
  # PS-KD-style loops over bins and over coverage.
  ece = 0.0
  for lower in np.arange(10) / 10:
    in_bin = (conf > lower) & (conf <= lower + 0.1)
    if in_bin.any():
      ece += abs(correct[in_bin].mean() - conf[in_bin].mean()) * in_bin.mean()
  assert report["ece"] == pytest.approx(100 * ece)
  errors, risks = 0, []
  for k, i in enumerate(sorted(range(n), key=lambda i: -conf[i])):
    errors += not correct[i]
    risks.append(errors / (k + 1))
  assert report["aurc"] == pytest.approx(1000 * np.mean(risks))


@pytest.mark.parametrize(
  "logits, labels, message",
  [
    (np.zeros(4), np.zeros(4, int), "2-D"),
    (np.zeros((4, 3)), np.zeros((4, 1), int), "1-D"),
    (np.zeros((4, 3)), np.zeros(3, int), "4 rows"),
    (np.zeros((0, 3)), np.zeros(0, int), "at least one"),
    (np.zeros((2, 3)), np.array([0, 3]), r"\[0, 3\)"),
    (np.zeros((2, 3)), np.array([-1, 0]), r"\[0, 3\)"),
    (np.zeros((2, 3)), np.array([0.0, 1.0]), "integers"),
    (np.array([[0.0, np.nan]]), np.array([0]), "NaN"),
  ],
)
def test_report_validates_inputs(logits, labels, message):
  with pytest.raises(ValueError, match=message):
    metrics.classification_report(logits, labels)


@pytest.mark.parametrize(
  "confidences, correct, message",
  [
    ([0.5, 0.6], [True], "same length"),
    ([], [], "at least one"),
    ([1.5], [True], r"\[0, 1\]"),
  ],
)
def test_helpers_validate_inputs(confidences, correct, message):
  with pytest.raises(ValueError, match=message):
    metrics.expected_calibration_error(confidences, correct)
  with pytest.raises(ValueError, match=message):
    metrics.aurc_eaurc(confidences, correct)


def test_reliability_diagram_bins_match_ece():
  # Confidences 0.9, 0.9 (one right, one wrong) and 0.55 (right): bins
  # (0.8, 0.9] and (0.5, 0.6].
  logits = np.log(np.array([[0.9, 0.1], [0.9, 0.1], [0.45, 0.55]]))
  labels = np.array([0, 1, 1])
  diagram = metrics.reliability_diagram(logits, labels)
  assert diagram["counts"] == [0, 0, 0, 0, 0, 1, 0, 0, 2, 0]
  np.testing.assert_allclose(diagram["accuracy"][8], 0.5)
  np.testing.assert_allclose(diagram["confidence"][8], 0.9)
  np.testing.assert_allclose(diagram["accuracy"][5], 1.0)
  np.testing.assert_allclose(diagram["confidence"][5], 0.55)
  # ECE from the diagram: sum_b |acc_b - conf_b| n_b / n, in percent.
  ece = 100 * (2 * abs(0.5 - 0.9) + abs(1.0 - 0.55)) / 3
  np.testing.assert_allclose(
    metrics.classification_report(logits, labels)["ece"], ece
  )
