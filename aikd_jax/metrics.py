"""Test-split metrics in PS-KD's conventions (docs/method.md, "Evaluation").

Computed once per epoch on the host in float64 NumPy: the test split is at
most ~100k examples, and float64 keeps ECE and AURC free of accumulation
error. Units are the reported ones: percent for errors and ECE, x1000 for
AURC and E-AURC, plain mean cross-entropy for NLL.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _as_1d_pair(
  confidences: Any, correct: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Validates and converts the (confidence, correct) inputs of the helpers."""
  confidences = np.asarray(confidences, dtype=np.float64)
  correct = np.asarray(correct).astype(bool)
  if confidences.ndim != 1 or correct.shape != confidences.shape:
    raise ValueError(
      f"confidences and correct must be 1-D of the same length, got "
      f"shapes {confidences.shape} and {correct.shape}"
    )
  if confidences.size == 0:
    raise ValueError("need at least one example")
  if not np.all((confidences >= 0) & (confidences <= 1)):
    raise ValueError(
      "confidences must lie in [0, 1] (max softmax probabilities)"
    )
  return confidences, correct


def expected_calibration_error(
  confidences: Any, correct: Any, num_bins: int = 10
) -> float:
  """ECE over `num_bins` equal-width bins of the confidence, in percent.

  Bins are half-open (lower, upper] as in PS-KD's code; a confidence of
  exactly 0 goes into the first bin.

  Args:
    confidences: [n] max softmax probability per example.
    correct: [n] whether the top-1 prediction is right.
    num_bins: number of bins over [0, 1].

  Returns:
    100 * sum_b |acc_b - conf_b| * n_b / n.
  """
  confidences, correct = _as_1d_pair(confidences, correct)
  _, correct_per_bin, confidence_per_bin = _bin_sums(
    confidences, correct, num_bins
  )
  # |acc_b - conf_b| * n_b = |sum_b correct - sum_b confidence|.
  gap = np.abs(correct_per_bin - confidence_per_bin).sum()
  return float(100.0 * gap / confidences.size)


def _bin_sums(
  confidences: np.ndarray, correct: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Each example's bin, and per-bin sums of correctness and confidence."""
  # k / num_bins is the float nearest to each edge, so e.g. a confidence of
  # exactly 0.3 lands in (0.2, 0.3] as intended.
  edges = np.arange(num_bins + 1) / num_bins
  bins = np.clip(
    np.searchsorted(edges, confidences, side="left") - 1, 0, num_bins - 1
  )
  return (
    bins,
    np.bincount(bins, weights=correct, minlength=num_bins),
    np.bincount(bins, weights=confidences, minlength=num_bins),
  )


def aurc_eaurc(confidences: Any, correct: Any) -> tuple[float, float]:
  """Area under the risk-coverage curve and its excess over the ideal, x1000.

  Examples are ranked by confidence, highest first, with a stable sort: ties
  keep their input order (as PS-KD's Python `sorted(..., reverse=True)` does).
  E-AURC subtracts the AURC of a ranking that puts all r errors last, in its
  exact discrete form (1/n) * sum_{i=1..r} i / (n - r + i).

  Args:
    confidences: [n] max softmax probability per example.
    correct: [n] whether the top-1 prediction is right.

  Returns:
    (AURC * 1000, E-AURC * 1000).
  """
  confidences, correct = _as_1d_pair(confidences, correct)
  n = confidences.size
  order = np.argsort(-confidences, kind="stable")
  errors = ~correct[order]
  risk = np.cumsum(errors) / np.arange(1, n + 1)
  aurc = risk.mean()
  r = int(errors.sum())
  i = np.arange(1, r + 1)
  optimal = np.sum(i / (n - r + i)) / n  # 0 when r == 0
  return float(1000.0 * aurc), float(1000.0 * (aurc - optimal))


def _score(logits: Any, labels: Any) -> dict[str, np.ndarray]:
  """Validates a prediction set; per-example confidence and correctness.

  Ties between classes break towards the lower class index (as argmax does),
  so top-1 correctness, top-k membership and the confidence all agree.
  """
  logits = np.asarray(logits)
  labels = np.asarray(labels)
  if logits.ndim != 2:
    raise ValueError(f"logits must be 2-D [n, C], got shape {logits.shape}")
  if labels.ndim != 1:
    raise ValueError(f"labels must be 1-D [n], got shape {labels.shape}")
  n, num_classes = logits.shape
  if labels.shape[0] != n:
    raise ValueError(
      f"logits have {n} rows but labels have {labels.shape[0]} entries"
    )
  if n == 0 or num_classes == 0:
    raise ValueError(
      f"need at least one example and one class, got logits "
      f"of shape {logits.shape}"
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(
      f"labels must lie in [0, {num_classes}), got values in "
      f"[{labels.min()}, {labels.max()}]"
    )
  logits = logits.astype(np.float64)
  if not np.all(np.isfinite(logits)):
    raise ValueError("logits contain NaN or inf (did training diverge?)")

  shifted = logits - logits.max(axis=1, keepdims=True)
  log_normaliser = np.log(np.exp(shifted).sum(axis=1))
  rows = np.arange(n)
  label_log_prob = shifted[rows, labels] - log_normaliser
  # The top class has shifted logit 0, so its probability is 1 / normaliser.
  confidences = np.exp(-log_normaliser)

  label_logit = logits[rows, labels][:, None]
  class_index = np.arange(num_classes)
  # Rank of the true class: classes strictly above it, plus lower-index
  # classes tied with it.
  rank = np.sum(
    (logits > label_logit)
    | ((logits == label_logit) & (class_index < labels[:, None])),
    axis=1,
  )
  return {
    "confidences": confidences,
    "correct": rank == 0,
    "top5_correct": rank < min(5, num_classes),
    "label_log_prob": label_log_prob,
  }


def classification_report(logits: Any, labels: Any) -> dict[str, float]:
  """Top-1/top-5 error, NLL, ECE, AURC and E-AURC of a set of predictions.

  Args:
    logits: [n, C] finite logits (NumPy or JAX, any float dtype).
    labels: [n] integer class indices in [0, C).

  Returns:
    Dict with `top1_err`, `top5_err` (percent; top-min(5, C) when C < 5),
    `nll` (mean cross-entropy), `ece` (percent), `aurc` and `eaurc` (x1000),
    all Python floats.
  """
  scores = _score(logits, labels)
  confidences, correct = scores["confidences"], scores["correct"]
  aurc, eaurc = aurc_eaurc(confidences, correct)
  return {
    "top1_err": float(100.0 * (1.0 - correct.mean())),
    "top5_err": float(100.0 * (1.0 - scores["top5_correct"].mean())),
    "nll": float(-scores["label_log_prob"].mean()),
    "ece": expected_calibration_error(confidences, correct),
    "aurc": aurc,
    "eaurc": eaurc,
  }


def reliability_diagram(
  logits: Any, labels: Any, num_bins: int = 10
) -> dict[str, list[float]]:
  """Per-bin counts, accuracy and mean confidence, as a reliability plot draws.

  Uses the same (lower, upper] bins as the ECE; empty bins report 0.
  """
  scores = _score(logits, labels)
  bins, correct_sum, confidence_sum = _bin_sums(
    *_as_1d_pair(scores["confidences"], scores["correct"]), num_bins
  )
  counts = np.bincount(bins, minlength=num_bins)
  safe = np.maximum(counts, 1)
  return {
    "counts": counts.tolist(),
    "accuracy": (correct_sum / safe).tolist(),
    "confidence": (confidence_sum / safe).tolist(),
  }
