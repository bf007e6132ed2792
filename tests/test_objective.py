"""Tests for aikd_jax.objective's losses and README's own-loop example."""

from __future__ import annotations

import math
import os
import re

import chex
import e2e_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aikd_jax import objective as aikd

pytestmark = pytest.mark.usefixtures("fast_compilation")

_README_HEADING = "## AI-KD in your own loop"


def _readme_example() -> str:
  with open(os.path.join(e2e_util.REPO_ROOT, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index(_README_HEADING) :]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _disc(params, probs):
  """A linear discriminator: D(p) = p . w + b."""
  return probs @ params["w"] + params["b"]


def _batch():
  labels = jnp.array([0, 2])
  student = jnp.array([[1.0, 0.0, -1.0], [0.5, 0.5, 2.0]])
  teacher = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
  previous = jnp.array([[0.6, 0.3, 0.1], [0.2, 0.2, 0.6]])
  disc_params = {"w": jnp.array([1.0, -1.0, 0.5]), "b": jnp.array(0.1)}
  return labels, student, teacher, previous, disc_params


def test_compute_losses_equals_the_written_out_formula():
  labels, z, zbar, prev, phi = _batch()
  obj = aikd.resolve_objective("ai_kd")
  out = aikd.compute_losses(
    obj,
    z,
    labels,
    prev,
    alpha=0.4,
    teacher_logits=zbar,
    discriminator_apply=_disc,
    discriminator_params=phi,
    teacher_weight=0.5,
  )
  # L_student = CE(t, z) + r [lambda_det tau^2 KL + lambda_adv softplus(-D)],
  # in NumPy, float64.
  z64, zbar64, prev64 = (np.asarray(a, np.float64) for a in (z, zbar, prev))
  log_softmax = lambda a: a - np.log(np.exp(a).sum(-1, keepdims=True))
  softmax = lambda a: np.exp(log_softmax(a))
  t = 0.6 * np.eye(3)[np.asarray(labels)] + 0.4 * prev64
  ce = -(t * log_softmax(z64)).sum(-1).mean()
  pt, ps = softmax(zbar64 / 4), log_softmax(z64 / 4)
  kl = 16 * (pt * (np.log(pt) - ps)).sum(-1).mean()
  w, b = np.asarray(phi["w"], np.float64), float(phi["b"])
  d_fake, d_real = softmax(z64) @ w + b, softmax(zbar64) @ w + b
  softplus = lambda a: np.log1p(np.exp(a))
  adv = softplus(-d_fake).mean()
  expected_student = ce + 0.5 * (1.0 * kl + 0.1 * adv)
  expected_disc = (softplus(-d_real) + softplus(d_fake)).mean()

  np.testing.assert_allclose(out.student_loss, expected_student, rtol=1e-5)
  np.testing.assert_allclose(out.discriminator_loss, expected_disc, rtol=1e-5)
  np.testing.assert_allclose(out.terms["prog"], ce, rtol=1e-5)
  np.testing.assert_allclose(out.terms["det"], kl, rtol=1e-5)
  np.testing.assert_allclose(out.terms["adv"], adv, rtol=1e-5)
  np.testing.assert_allclose(out.bank_rows, softmax(z64), rtol=1e-5)
  np.testing.assert_allclose(
    out.discriminator_accuracy["disc_real_acc"],
    np.mean(d_real > 0),
  )
  chex.assert_shape(out.bank_rows, (2, 3))


def test_each_loss_reaches_only_its_own_model():
  labels, z, zbar, prev, phi = _batch()
  obj = aikd.resolve_objective("ai_kd")

  def losses_of(z, phi):
    out = aikd.compute_losses(
      obj,
      z,
      labels,
      prev,
      alpha=0.4,
      teacher_logits=zbar,
      discriminator_apply=_disc,
      discriminator_params=phi,
    )
    return out.student_loss, out.discriminator_loss

  (dz_s, dphi_s), (dz_d, dphi_d) = jax.jacrev(losses_of, argnums=(0, 1))(z, phi)
  assert float(jnp.abs(dz_s).sum()) > 0
  assert all(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(dphi_d))
  # The student's loss leaves the discriminator alone, and vice versa.
  chex.assert_trees_all_equal(dphi_s, jax.tree.map(jnp.zeros_like, phi))
  chex.assert_trees_all_equal(dz_d, jnp.zeros_like(z))


def test_ce_preset_is_plain_cross_entropy_and_needs_no_teacher():
  labels, z, _, prev, _ = _batch()
  out = aikd.compute_losses(
    aikd.resolve_objective("ce"), z, labels, prev, alpha=0.0
  )
  expected = optax.losses.softmax_cross_entropy_with_integer_labels(z, labels)
  np.testing.assert_allclose(out.student_loss, expected.mean(), rtol=1e-5)
  assert float(out.discriminator_loss) == 0.0
  assert sorted(out.terms) == ["prog", "student"]


def test_missing_teacher_or_discriminator_is_named():
  labels, z, zbar, prev, _ = _batch()
  with pytest.raises(ValueError, match="teacher_logits"):
    aikd.student_loss(aikd.resolve_objective("tf_kd"), z, labels, prev, alpha=0)
  with pytest.raises(ValueError, match="discriminator_apply"):
    aikd.student_loss(
      aikd.resolve_objective("ai_kd"),
      z,
      labels,
      prev,
      alpha=0,
      teacher_logits=zbar,
    )


def test_readme_example_runs_and_learns(capsys):
  namespace = {}
  exec(compile(_readme_example(), "README.md", "exec"), namespace)  # noqa: S102
  printed = capsys.readouterr().out.splitlines()
  assert [line.split(" ")[0] for line in printed] == ["0", "1", "2"]

  ns = namespace
  obj = ns["obj"]
  # Every bank row is a distribution, and no longer the one-hot label.
  np.testing.assert_allclose(ns["bank"].sum(-1), np.ones(64), rtol=1e-5)
  assert float(jnp.abs(ns["bank"] - jax.nn.one_hot(ns["y"], 10)).min()) > 0
  # The last step's terms are those of the formula at that step's inputs.
  terms = ns["terms"]
  last_step = ns["EPOCHS"] * ns["steps_per_epoch"] - 1
  ramp = obj.teacher_weight(last_step, ns["steps_per_epoch"])
  np.testing.assert_allclose(ramp, 12 / 20)
  np.testing.assert_allclose(
    terms["student"],
    terms["prog"]
    + ramp * (obj.lambda_det * terms["det"] + obj.lambda_adv * terms["adv"]),
    rtol=1e-6,
  )
  # The student fits the training set it distils on: the cross-entropy with
  # the labels after 3 epochs is below log(10), where it started.
  logits = ns["student"].apply(ns["params"], ns["x"])
  ce = optax.losses.softmax_cross_entropy_with_integer_labels(logits, ns["y"])
  assert float(ce.mean()) < math.log(10) - 0.5, float(ce.mean())
  assert np.isfinite(float(terms["disc"]))
