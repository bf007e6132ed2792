"""Per-example losses of the AI-KD objective (docs/method.md, "The objective").

Every function is pure and jit-able and returns one value per example (shape
[B]); the training step takes the batch means and combines them with the
config's weights. Losses are computed in float32 whatever the input dtype, so
bfloat16 logits or banks do not cost precision in the reductions. Where optax
has the loss, it computes it here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

Scalar = int | float | jax.Array


def alpha_at(epoch: Scalar, alpha_T: Scalar, num_epochs: Scalar) -> Scalar:
  """PS-KD's linear schedule for the weight of the previous-epoch predictions.

  alpha_e = alpha_T * (e + 1) / E, so epoch 0 already gives alpha_T / E and
  the last epoch (E - 1) gives alpha_T.

  Args:
    epoch: 0-indexed epoch, a Python int or a (possibly traced) scalar.
    alpha_T: final weight.
    num_epochs: total number of epochs E.

  Returns:
    A Python float when every argument is a Python number (usable when
    building configs), else a float32 scalar array (usable under jit).
  """
  if all(isinstance(x, (int, float)) for x in (epoch, alpha_T, num_epochs)):
    return alpha_T * (epoch + 1) / num_epochs
  epoch = jnp.asarray(epoch, jnp.float32)
  alpha_T = jnp.asarray(alpha_T, jnp.float32)
  num_epochs = jnp.asarray(num_epochs, jnp.float32)
  return alpha_T * (epoch + 1.0) / num_epochs


def progressive_targets(
  labels: jax.Array,
  prev_probs: jax.Array,
  alpha: Scalar,
  num_classes: int,
  label_smoothing: float = 0.0,
) -> jax.Array:
  """Soft targets t = (1 - alpha) * ybar + alpha * P[id] (PS-KD).

  ybar = (1 - eps) * onehot(y) + eps / C is the (optionally smoothed) label, so
  that `ls` and `ps_kd` are both settings of this one function.

  Args:
    labels: int [B] class indices.
    prev_probs: [B, C] previous-epoch probabilities from the prediction bank
      (may be bfloat16; cast to float32).
    alpha: weight of the previous-epoch predictions, scalar.
    num_classes: C.
    label_smoothing: eps.

  Returns:
    float32 [B, C]; rows sum to 1 when the rows of `prev_probs` do.
  """
  onehot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  smoothed = optax.losses.smooth_labels(onehot, label_smoothing)
  alpha = jnp.asarray(alpha, jnp.float32)
  return (1.0 - alpha) * smoothed + alpha * prev_probs.astype(jnp.float32)


def soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Cross-entropy against soft targets, sum_c -t_c * log_softmax(z)_c.

  log_softmax keeps it finite for logits of any finite magnitude (no
  log(softmax) underflow to log 0).

  Args:
    logits: [B, C] student logits.
    targets: [B, C] target distributions.

  Returns:
    float32 [B].
  """
  return optax.losses.softmax_cross_entropy(
    logits.astype(jnp.float32), targets.astype(jnp.float32)
  )


def distillation_kl(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  temperature: Scalar,
) -> jax.Array:
  """tau^2 * KL(softmax(teacher / tau) || softmax(student / tau)).

  The tau^2 factor (Hinton et al.) keeps the gradient's scale independent of
  tau. Classes where the teacher's probability is exactly 0 (e.g. -inf
  logits, or underflow) contribute 0, as 0 * log 0 = 0, with no NaN in the
  value or in the gradient. The teacher is not stop-gradiented here: callers
  pass a bank entry or a frozen model's output.

  Args:
    student_logits: [B, C].
    teacher_logits: [B, C].
    temperature: tau > 0.

  Returns:
    float32 [B].
  """
  # Not optax.losses.kl_divergence: it takes log(p) of the teacher's
  # probabilities, whose gradient is NaN (0 * 1/0) wherever a probability
  # underflows to 0, as it does for large teacher logits at any tau; nor
  # kl_divergence_with_log_targets, whose exp(-inf) * (-inf) is NaN in the
  # value. Here both value and gradient stay finite (tests/test_losses.py).
  temperature = jnp.asarray(temperature, jnp.float32)
  student_log_probs = jax.nn.log_softmax(
    student_logits.astype(jnp.float32) / temperature, axis=-1
  )
  teacher_log_probs = jax.nn.log_softmax(
    teacher_logits.astype(jnp.float32) / temperature, axis=-1
  )
  teacher_probs = jnp.exp(teacher_log_probs)
  positive = teacher_probs > 0
  # Substitute a finite value where p = 0 so that neither branch of the
  # `where` produces inf/NaN (a NaN in the unused branch still poisons grads).
  safe_teacher_log_probs = jnp.where(positive, teacher_log_probs, 0.0)
  pointwise = jnp.where(
    positive, teacher_probs * (safe_teacher_log_probs - student_log_probs), 0.0
  )
  return temperature**2 * jnp.sum(pointwise, axis=-1)


def _per_example(logits: jax.Array) -> jax.Array:
  """Accepts a discriminator's [B] or [B, 1] output; returns float32 [B]."""
  if logits.ndim == 2 and logits.shape[-1] == 1:
    logits = logits[:, 0]
  if logits.ndim != 1:
    raise ValueError(
      f"discriminator logits must have shape [B] or [B, 1], got {logits.shape}"
    )
  return logits.astype(jnp.float32)


def discriminator_loss(
  real_logits: jax.Array, fake_logits: jax.Array
) -> jax.Array:
  """Binary cross-entropy of the discriminator: real = pre-trained model.

  softplus(-D(real)) + softplus(D(fake)) equals
  -log sigmoid(D(real)) - log(1 - sigmoid(D(fake))), written with softplus so
  that it stays finite for large |logits|.

  Args:
    real_logits: [B] or [B, 1], D on the pre-trained model's probabilities.
    fake_logits: [B] or [B, 1], D on the (stop-gradiented) student's.

  Returns:
    float32 [B].
  """
  real = _per_example(real_logits)
  fake = _per_example(fake_logits)
  return optax.losses.sigmoid_binary_cross_entropy(
    real, jnp.ones_like(real)
  ) + optax.losses.sigmoid_binary_cross_entropy(fake, jnp.zeros_like(fake))


def generator_loss(fake_logits: jax.Array) -> jax.Array:
  """Non-saturating adversarial loss of the student, softplus(-D(fake)).

  -log sigmoid(D(fake)) rather than log(1 - sigmoid(D(fake))), so the student
  still gets a gradient when the discriminator confidently rejects it.

  Args:
    fake_logits: [B] or [B, 1], D on the student's probabilities.

  Returns:
    float32 [B].
  """
  fake = _per_example(fake_logits)
  return optax.losses.sigmoid_binary_cross_entropy(fake, jnp.ones_like(fake))
