"""Tests for aikd_jax.losses: hand-computed values, properties, stability."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aikd_jax import losses

# Compiled with most XLA optimisations off (conftest.py): like with like.
pytestmark = pytest.mark.usefixtures("fast_compilation")


def _random_logits(key: int, shape: tuple[int, ...], scale: float = 3.0):
  return scale * jax.random.normal(jax.random.key(key), shape)


# --- alpha_at -----------------------------------------------------------


def test_alpha_at_python_numbers():
  assert losses.alpha_at(0, 0.8, 300) == pytest.approx(0.8 / 300)
  assert losses.alpha_at(149, 0.8, 300) == pytest.approx(0.4)
  assert losses.alpha_at(299, 0.8, 300) == pytest.approx(0.8)
  assert isinstance(losses.alpha_at(0, 0.8, 300), float)


def test_alpha_at_under_jit_is_float32():
  alpha = jax.jit(lambda e: losses.alpha_at(e, 0.8, 4))
  values = [alpha(jnp.int32(e)) for e in range(4)]
  assert all(v.dtype == jnp.float32 for v in values)
  np.testing.assert_allclose(values, [0.2, 0.4, 0.6, 0.8], rtol=1e-6)


# --- progressive_targets ------------------------------------------------


def test_progressive_targets_hand_computed():
  labels = jnp.array([0, 2])
  prev = jnp.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
  # eps = 0.3, C = 3: ybar = 0.7 * onehot + 0.1.
  # Row 0: 0.75 * [0.8, 0.1, 0.1] + 0.25 * [0.5, 0.3, 0.2]
  #      = [0.6 + 0.125, 0.075 + 0.075, 0.075 + 0.05] = [0.725, 0.15, 0.125].
  # Row 1: 0.75 * [0.1, 0.1, 0.8] + 0.25 * [0.1, 0.1, 0.8] = [0.1, 0.1, 0.8].
  targets = losses.progressive_targets(labels, prev, 0.25, 3, 0.3)
  chex.assert_shape(targets, (2, 3))
  chex.assert_type(targets, jnp.float32)
  np.testing.assert_allclose(
    targets, [[0.725, 0.15, 0.125], [0.1, 0.1, 0.8]], rtol=1e-6
  )


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_progressive_targets_alpha_zero_is_smoothed_label(eps):
  labels = jnp.array([3, 0, 9, 4])
  prev = jax.nn.softmax(_random_logits(0, (4, 10)))
  targets = losses.progressive_targets(labels, prev, 0.0, 10, eps)
  expected = (1 - eps) * np.eye(10)[np.array(labels)] + eps / 10
  np.testing.assert_allclose(targets, expected, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(targets.sum(axis=-1), np.ones(4), rtol=1e-6)


def test_progressive_targets_alpha_one_is_prev_probs_bfloat16():
  labels = jnp.array([1, 2, 0])
  prev = jax.nn.softmax(_random_logits(1, (3, 5))).astype(jnp.bfloat16)
  targets = losses.progressive_targets(labels, prev, 1.0, 5, 0.1)
  chex.assert_type(targets, jnp.float32)
  np.testing.assert_allclose(
    targets, prev.astype(jnp.float32), rtol=1e-6, atol=1e-7
  )


def test_progressive_targets_rows_sum_to_one():
  labels = jnp.array([1, 2, 0, 7])
  prev = jax.nn.softmax(_random_logits(2, (4, 8)))
  targets = losses.progressive_targets(labels, prev, 0.37, 8, 0.1)
  np.testing.assert_allclose(targets.sum(axis=-1), np.ones(4), rtol=1e-6)


# --- soft_cross_entropy -------------------------------------------------


def test_soft_cross_entropy_hand_computed():
  # Uniform logits over 2 classes: log_softmax = log(1/2) everywhere, so the
  # loss is log 2 for any target distribution.
  # Logits [0, log 3]: softmax [1/4, 3/4]; targets [1/2, 1/2] give
  # -(1/2) log(1/4) - (1/2) log(3/4) = log 4 - (1/2) log 3.
  logits = jnp.array([[5.0, 5.0], [0.0, math.log(3.0)]])
  targets = jnp.array([[0.9, 0.1], [0.5, 0.5]])
  loss = losses.soft_cross_entropy(logits, targets)
  chex.assert_shape(loss, (2,))
  np.testing.assert_allclose(
    loss, [math.log(2.0), math.log(4.0) - 0.5 * math.log(3.0)], rtol=1e-6
  )


def test_soft_cross_entropy_one_hot_matches_optax():
  logits = _random_logits(3, (6, 11))
  labels = jnp.array([0, 10, 5, 5, 3, 1])
  loss = losses.soft_cross_entropy(logits, jax.nn.one_hot(labels, 11))
  expected = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  chex.assert_trees_all_close(loss, expected, rtol=1e-6, atol=1e-6)


def test_soft_cross_entropy_bfloat16_logits_computed_in_float32():
  logits = _random_logits(4, (3, 4)).astype(jnp.bfloat16)
  targets = jax.nn.softmax(_random_logits(5, (3, 4)))
  loss = losses.soft_cross_entropy(logits, targets)
  chex.assert_type(loss, jnp.float32)
  expected = -np.sum(
    np.asarray(targets)
    * np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32))),
    axis=-1,
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


# --- distillation_kl ----------------------------------------------------


def test_distillation_kl_hand_computed():
  # tau = 2: teacher [0, 2 log 3] / 2 -> softmax [1/4, 3/4]; student
  # [0, 0] -> [1/2, 1/2]. KL = 1/4 log(1/2) + 3/4 log(3/2)
  # = 3/4 log 3 - log 2; times tau^2 = 4 gives 3 log 3 - 4 log 2.
  student = jnp.array([[0.0, 0.0]])
  teacher = jnp.array([[0.0, 2.0 * math.log(3.0)]])
  loss = losses.distillation_kl(student, teacher, 2.0)
  chex.assert_shape(loss, (1,))
  np.testing.assert_allclose(
    loss, [3 * math.log(3.0) - 4 * math.log(2.0)], rtol=1e-6
  )


def test_distillation_kl_zero_for_equal_and_nonnegative_otherwise():
  a = _random_logits(6, (16, 10))
  b = _random_logits(7, (16, 10))
  np.testing.assert_allclose(
    losses.distillation_kl(a, a, 4.0), np.zeros(16), atol=1e-6
  )
  kl = losses.distillation_kl(a, b, 4.0)
  assert np.all(np.asarray(kl) > 0)
  # Also not symmetric: the teacher is the reference distribution.
  assert not np.allclose(kl, losses.distillation_kl(b, a, 4.0))


@pytest.mark.parametrize("tau", [0.5, 2.0, 4.0])
def test_distillation_kl_temperature_squared_factor(tau):
  a = _random_logits(8, (5, 7))
  b = _random_logits(9, (5, 7))
  np.testing.assert_allclose(
    losses.distillation_kl(a * tau, b * tau, tau),
    tau**2 * np.asarray(losses.distillation_kl(a, b, 1.0)),
    rtol=1e-5,
    atol=1e-6,
  )


def test_distillation_kl_zero_teacher_probability_no_nan():
  # Teacher puts zero mass on class 2 (-inf logit): that class contributes
  # 0 * log 0 = 0, leaving KL([1/2, 1/2, 0] || [1/2, 1/2, 0+]) ~ 0 for a
  # student that is nearly zero on class 2.
  student = jnp.array([[0.0, 0.0, -1e4]])
  teacher = jnp.array([[0.0, 0.0, -jnp.inf]])
  loss, grad = jax.value_and_grad(
    lambda s: losses.distillation_kl(s, teacher, 1.0).sum()
  )(student)
  np.testing.assert_allclose(loss, 0.0, atol=1e-6)
  assert np.all(np.isfinite(grad))
  # Against a uniform student: KL = 2 * (1/2) log((1/2) / (1/3)) = log(3/2).
  uniform = losses.distillation_kl(jnp.zeros((1, 3)), teacher, 1.0)
  np.testing.assert_allclose(uniform, [math.log(1.5)], rtol=1e-6)


# --- adversarial losses -------------------------------------------------


def test_discriminator_and_generator_hand_computed():
  # softplus(0) = log 2; softplus(log 3) = log 4; softplus(-log 3) = log(4/3).
  real = jnp.array([0.0, math.log(3.0)])
  fake = jnp.array([[0.0], [math.log(3.0)]])  # a [B, 1] discriminator output
  d_loss = losses.discriminator_loss(real, fake)
  g_loss = losses.generator_loss(fake)
  chex.assert_shape([d_loss, g_loss], (2,))
  np.testing.assert_allclose(
    d_loss, [2 * math.log(2.0), math.log(4.0 / 3.0) + math.log(4.0)], rtol=1e-6
  )
  np.testing.assert_allclose(
    g_loss, [math.log(2.0), math.log(4.0 / 3.0)], rtol=1e-6
  )


def test_discriminator_loss_is_binary_cross_entropy():
  real = _random_logits(10, (8,))
  fake = _random_logits(11, (8,))
  expected = optax.sigmoid_binary_cross_entropy(
    real, jnp.ones(8)
  ) + optax.sigmoid_binary_cross_entropy(fake, jnp.zeros(8))
  np.testing.assert_allclose(
    losses.discriminator_loss(real, fake), expected, rtol=1e-5, atol=1e-6
  )


def test_adversarial_losses_reject_bad_shapes():
  with pytest.raises(ValueError, match="shape"):
    losses.generator_loss(jnp.zeros((4, 2)))


# --- stability and jit --------------------------------------------------


def test_losses_finite_with_huge_logits_including_gradients():
  big = 1e4 * jnp.array([[1.0, -1.0, 0.5], [-1.0, 1.0, 0.0]])
  other = 1e4 * jnp.array([[-1.0, 1.0, 0.0], [0.5, -1.0, 1.0]])
  targets = jnp.array([[0.2, 0.3, 0.5], [0.0, 0.0, 1.0]])
  d_logits = jnp.array([1e4, -1e4])

  functions = {
    "soft_cross_entropy": lambda z: losses.soft_cross_entropy(z, targets),
    "distillation_kl": lambda z: losses.distillation_kl(z, other, 4.0),
    "distillation_kl_teacher": (
      lambda z: losses.distillation_kl(other, z, 4.0)
    ),
    "discriminator_loss": (
      lambda z: losses.discriminator_loss(z[:, 0], d_logits)
    ),
    "generator_loss": lambda z: losses.generator_loss(z[:, 0]),
  }
  for name, fn in functions.items():
    value, grad = jax.value_and_grad(lambda z: fn(z).sum())(big)
    assert np.isfinite(value), name
    assert np.all(np.isfinite(grad)), name
  # The values are the exact large-margin limits, not clipped: e.g. row 0 of
  # the cross-entropy is 0.3 * 2e4 + 0.5 * 5e3 = 8500.
  np.testing.assert_allclose(
    losses.soft_cross_entropy(big, targets)[0], 8500.0, rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.discriminator_loss(d_logits, -d_logits), [0.0, 2e4], atol=1e-3
  )


def test_losses_jit_match_eager():
  logits = _random_logits(12, (4, 6))
  teacher = _random_logits(13, (4, 6))
  labels = jnp.array([0, 5, 2, 2])
  prev = jax.nn.softmax(_random_logits(14, (4, 6)))
  d_real = _random_logits(15, (4, 1))
  d_fake = _random_logits(16, (4, 1))

  def all_losses(logits, teacher, labels, prev, epoch, d_real, d_fake):
    alpha = losses.alpha_at(epoch, 0.8, 10)
    targets = losses.progressive_targets(labels, prev, alpha, 6, 0.1)
    return (
      losses.soft_cross_entropy(logits, targets),
      losses.distillation_kl(logits, teacher, 4.0),
      losses.discriminator_loss(d_real, d_fake),
      losses.generator_loss(d_fake),
    )

  args = (logits, teacher, labels, prev, jnp.int32(3), d_real, d_fake)
  jitted = jax.jit(all_losses)(*args)
  chex.assert_shape(jitted, (4,))
  chex.assert_trees_all_close(jitted, all_losses(*args), rtol=1e-6)
