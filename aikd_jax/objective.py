"""One AI-KD objective; every method is a named preset of its weights.

The baselines of docs/method.md (ce, ls, tf_kd, ps_kd) and AI-KD's ablations are
not separate training loops: they are settings of the fields of `Objective`.
A weight of zero removes its term from the compiled step altogether, so a
`ce` step costs what plain cross-entropy costs.

The losses themselves are pure functions of logits, for any training loop:
`student_loss`, `discriminator_loss` and `bank_rows`, or `compute_losses`,
which returns all three. The train step (train_step.py) calls
`compute_losses`; README, "AI-KD in your own loop", shows it in an optax loop.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp

from aikd_jax import losses

TEACHER_MODES = ("precomputed", "online")


@dataclasses.dataclass(frozen=True)
class Objective:
  """The resolved weights of L_student (hashable: it is static in jit).

  Attributes:
    alpha_T: final weight of the previous-epoch predictions (PS-KD).
    label_smoothing: eps of the smoothed labels.
    lambda_det: weight of the distillation from the pre-trained model.
    lambda_adv: weight of the adversarial (generator) term.
    lambda_cls: weight of CS-KD's class-wise term: KL from the prediction on
      another training example of the same class (no gradient through it).
    temperature: tau of the distillation and class-wise terms.
    teacher_mode: 'precomputed' (teacher-logit bank) or 'online' (teacher
      forward pass on the augmented batch inside the step).
    teacher_ramp_epochs: the pre-trained model's terms (lambda_det and
      lambda_adv) grow linearly from 0 to their full weight over this many
      epochs (0: full weight from the first step). Their gradient is up to
      tau times cross-entropy's, which a fresh PreAct ResNet-18 at lr 0.1
      cannot absorb in its first steps (README, "Defaults and their origin").
    grad_clip_norm: the student's loss gradient is scaled down to this global
      norm whenever it is larger (0: never). Cross-entropy's curvature in
      the logits fades as the student grows confident; KD's at tau 4 does
      not, so at lr 0.1 the student can blow up long after the ramp
      (docs/dynamics.md); clipping bounds each step. Applied in the train
      step, so the optimiser state does not depend on it.
  """

  alpha_T: float = 0.0
  label_smoothing: float = 0.0
  lambda_det: float = 0.0
  lambda_adv: float = 0.0
  lambda_cls: float = 0.0
  temperature: float = 4.0
  teacher_mode: str = "precomputed"
  teacher_ramp_epochs: float = 0.0
  grad_clip_norm: float = 0.0

  @property
  def uses_progressive(self) -> bool:
    return self.alpha_T > 0

  @property
  def uses_teacher(self) -> bool:
    """The teacher's logits feed the distillation or the discriminator."""
    return self.lambda_det > 0 or self.lambda_adv > 0

  @property
  def uses_discriminator(self) -> bool:
    return self.lambda_adv > 0

  @property
  def uses_partners(self) -> bool:
    """CS-KD: each example is paired with one of the same class."""
    return self.lambda_cls > 0

  def validate(self) -> None:
    """Raises ValueError for settings that have no meaning."""
    if not 0.0 <= self.alpha_T <= 1.0:
      raise ValueError(f"alpha_T must lie in [0, 1], got {self.alpha_T}.")
    if not 0.0 <= self.label_smoothing < 1.0:
      raise ValueError(
        f"label_smoothing must lie in [0, 1), got {self.label_smoothing}."
      )
    for name in ("lambda_det", "lambda_adv", "lambda_cls"):
      value = getattr(self, name)
      if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}.")
    if not self.temperature > 0:
      raise ValueError(f"temperature must be positive, got {self.temperature}.")
    if self.teacher_ramp_epochs < 0:
      raise ValueError(
        "teacher_ramp_epochs must be non-negative, got "
        f"{self.teacher_ramp_epochs}."
      )
    if self.grad_clip_norm < 0:
      raise ValueError(
        f"grad_clip_norm must be non-negative, got {self.grad_clip_norm}."
      )
    if self.teacher_mode not in TEACHER_MODES:
      raise ValueError(
        f"teacher_mode must be one of {TEACHER_MODES}, "
        f"got {self.teacher_mode!r}."
      )

  def teacher_weight(self, step, steps_per_epoch: int):
    """The ramp factor in [0, 1] of the teacher's terms at `step` (0-based)."""
    if self.teacher_ramp_epochs <= 0:
      return 1.0
    ramp_steps = self.teacher_ramp_epochs * steps_per_epoch
    return jnp.minimum(1.0, (step + 1) / ramp_steps)


# docs/method.md's table, plus AI-KD's ablations. `ai_kd`'s lambda_adv = 0.1,
# tau = 4 and the stabiliser of the pre-trained model's terms (a 5-epoch ramp,
# the student's gradient clipped to norm 1) are this project's choices
# (README, "Defaults and their origin"); alpha_T = 0.8 is PS-KD's.
TEACHER_RAMP_EPOCHS = 5.0
GRAD_CLIP_NORM = 1.0
_TEACHER_STABILISER = dict(
  teacher_ramp_epochs=TEACHER_RAMP_EPOCHS, grad_clip_norm=GRAD_CLIP_NORM
)
_AI_KD = dict(
  alpha_T=0.8,
  lambda_det=1.0,
  lambda_adv=0.1,
  temperature=4.0,
  **_TEACHER_STABILISER,
)
PRESETS: Mapping[str, Mapping[str, Any]] = {
  "ce": dict(),
  "ls": dict(label_smoothing=0.1),
  "tf_kd": dict(lambda_det=1.0, temperature=4.0, **_TEACHER_STABILISER),
  "ps_kd": dict(alpha_T=0.8),
  # CS-KD (Yun et al., 2020): lambda 1, tau 4 as its public code uses; the
  # clip is ours (its tau^2 KL has the det term's curvature; README).
  "cs_kd": dict(lambda_cls=1.0, temperature=4.0, grad_clip_norm=GRAD_CLIP_NORM),
  "ai_kd": _AI_KD,
  "ai_kd_no_adv": {**_AI_KD, "lambda_adv": 0.0},
  "ai_kd_no_det": {**_AI_KD, "lambda_det": 0.0},
  "ai_kd_no_prog": {**_AI_KD, "alpha_T": 0.0},
  "ai_kd_online": {**_AI_KD, "teacher_mode": "online"},
}
METHODS = tuple(PRESETS)
# The weights that tell the presets apart: set one, and `ce` is no longer CE.
METHOD_WEIGHTS = (
  "alpha_T",
  "label_smoothing",
  "lambda_det",
  "lambda_adv",
  "lambda_cls",
)
OVERRIDABLE_FIELDS = tuple(f.name for f in dataclasses.fields(Objective))


def resolve_objective(
  method: str, overrides: Mapping[str, Any] | None = None
) -> Objective:
  """The preset named `method`, with any non-None `overrides` applied.

  Raises:
    ValueError: unknown method, unknown field, or a value out of range.
  """
  if method not in PRESETS:
    raise ValueError(
      f"Unknown method {method!r}; choose one of {', '.join(METHODS)}."
    )
  fields = dict(PRESETS[method])
  for name, value in (overrides or {}).items():
    if name not in OVERRIDABLE_FIELDS:
      raise ValueError(
        f"Unknown objective field {name!r}; known fields: "
        f"{', '.join(OVERRIDABLE_FIELDS)}."
      )
    if value is not None:
      fields[name] = value
  objective = Objective(**fields)
  objective.validate()
  return objective


# --- The losses, as pure functions of logits ---------------------------------

# `discriminator_apply(discriminator_params, probs) -> logits [B] or [B, 1]`;
# for a Flax module, its `apply` with its whole variables dict as the params
# (README's example), or `lambda p, x: module.apply({"params": p}, x)`.
DiscriminatorApply = Callable[[Any, jax.Array], jax.Array]


class Losses(NamedTuple):
  """What `compute_losses` returns.

  student_loss: scalar, L_student (batch mean).
  discriminator_loss: scalar, L_D (batch mean); 0 without a discriminator.
  bank_rows: [B, C] float32, the student's probabilities (no gradient): the
    prediction bank's new rows for these examples.
  terms: the batch mean of each term before weighting ("prog", and "det",
    "cls", "adv", "disc" where used), plus "student".
  discriminator_accuracy: {"disc_real_acc", "disc_fake_acc"} where a
    discriminator is used, else empty.
  """

  student_loss: jax.Array
  discriminator_loss: jax.Array
  bank_rows: jax.Array
  terms: dict[str, jax.Array]
  discriminator_accuracy: dict[str, jax.Array]


def bank_rows(student_logits: jax.Array) -> jax.Array:
  """The prediction bank's new rows: softmax of the student, no gradient."""
  return lax.stop_gradient(jax.nn.softmax(student_logits.astype(jnp.float32)))


def student_loss(
  objective: Objective,
  student_logits: jax.Array,
  labels: jax.Array,
  previous_probs: jax.Array,
  *,
  alpha: losses.Scalar,
  teacher_logits: jax.Array | None = None,
  discriminator_apply: DiscriminatorApply | None = None,
  discriminator_params: Any = None,
  teacher_weight: losses.Scalar = 1.0,
  partner_logits: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_student of docs/method.md, as the batch mean.

  L = CE(t, z) + r * (lambda_det * KL_tau + lambda_adv * softplus(-D(p)))
    + lambda_cls * KL_tau(partner), t = (1 - alpha) ybar + alpha P[id].

  Args:
    objective: the weights (`resolve_objective("ai_kd")`, ...).
    student_logits: [B, C], the student on the batch (differentiated).
    labels: int [B].
    previous_probs: [B, C], the previous epoch's probabilities of these
      examples (the prediction bank's rows; one-hot labels in epoch 0).
    alpha: weight of `previous_probs`, e.g. `losses.alpha_at(epoch, ...)`.
    teacher_logits: [B, C], the pre-trained model's; needed when
      `objective.uses_teacher`. Not differentiated.
    discriminator_apply, discriminator_params: the discriminator, needed when
      `objective.uses_discriminator`; its parameters get no gradient here.
    teacher_weight: the ramp of the teacher's terms,
      `objective.teacher_weight(step, steps_per_epoch)`.
    partner_logits: [B, C], CS-KD's same-class partners (not differentiated);
      needed when `objective.uses_partners`.

  Returns:
    (loss, terms): the scalar loss and each unweighted term's batch mean.
  """
  _check_inputs(objective, teacher_logits, discriminator_apply, partner_logits)
  loss, terms, _ = _student_loss(
    objective,
    student_logits.astype(jnp.float32),
    labels,
    previous_probs,
    alpha=alpha,
    teacher_logits=teacher_logits,
    discriminator_apply=discriminator_apply,
    discriminator_params=discriminator_params,
    teacher_weight=teacher_weight,
    partner_logits=partner_logits,
  )
  return loss, terms


def _student_loss(
  objective: Objective,
  logits: jax.Array,
  labels: jax.Array,
  previous_probs: jax.Array,
  *,
  alpha: losses.Scalar,
  teacher_logits: jax.Array | None,
  discriminator_apply: DiscriminatorApply | None,
  discriminator_params: Any,
  teacher_weight: losses.Scalar,
  partner_logits: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array], jax.Array]:
  """student_loss of float32 logits, and their softmax."""
  num_classes = logits.shape[-1]
  targets = losses.progressive_targets(
    labels, previous_probs, alpha, num_classes, objective.label_smoothing
  )
  terms = {"prog": losses.soft_cross_entropy(logits, targets).mean()}
  loss = terms["prog"]
  # Where the softmax is taken fixes the order in which the backward pass adds
  # up the logits' cotangents, and with it the last bits of a run's figures.
  probs = jax.nn.softmax(logits)
  if objective.lambda_det > 0:
    teacher = lax.stop_gradient(teacher_logits.astype(jnp.float32))
    terms["det"] = losses.distillation_kl(
      logits, teacher, objective.temperature
    ).mean()
    loss += teacher_weight * objective.lambda_det * terms["det"]
  if objective.uses_partners:
    partner = lax.stop_gradient(partner_logits.astype(jnp.float32))
    terms["cls"] = losses.distillation_kl(
      logits, partner, objective.temperature
    ).mean()
    loss += objective.lambda_cls * terms["cls"]
  if objective.uses_discriminator:
    # The student's term sees the discriminator as a constant.
    fooled = discriminator_apply(lax.stop_gradient(discriminator_params), probs)
    terms["adv"] = losses.generator_loss(fooled).mean()
    loss += teacher_weight * objective.lambda_adv * terms["adv"]
  return loss, terms, probs


def discriminator_loss(
  student_logits: jax.Array,
  teacher_logits: jax.Array,
  discriminator_apply: DiscriminatorApply,
  discriminator_params: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_D = softplus(-D(softmax(teacher))) + softplus(D(sg(softmax(student)))).

  The batch mean; the student's probabilities enter as constants, so its
  gradient reaches the discriminator's parameters alone.

  Returns:
    (loss, accuracy): the scalar loss and the discriminator's accuracy on
    the teacher's ("disc_real_acc") and the student's ("disc_fake_acc")
    probabilities.
  """
  logits = student_logits.astype(jnp.float32)
  return _discriminator_loss(
    jax.nn.softmax(logits),
    teacher_logits,
    discriminator_apply,
    discriminator_params,
  )


def _discriminator_loss(
  probs: jax.Array,
  teacher_logits: jax.Array,
  discriminator_apply: DiscriminatorApply,
  discriminator_params: Any,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """discriminator_loss, given the student's probabilities."""
  real = discriminator_apply(
    discriminator_params,
    jax.nn.softmax(lax.stop_gradient(teacher_logits.astype(jnp.float32))),
  )
  fake = discriminator_apply(discriminator_params, lax.stop_gradient(probs))
  loss = losses.discriminator_loss(real, fake).mean()
  accuracy = {
    "disc_real_acc": jnp.mean(real > 0),
    "disc_fake_acc": jnp.mean(fake < 0),
  }
  return loss, accuracy


def compute_losses(
  objective: Objective,
  student_logits: jax.Array,
  labels: jax.Array,
  previous_probs: jax.Array,
  *,
  alpha: losses.Scalar,
  teacher_logits: jax.Array | None = None,
  discriminator_apply: DiscriminatorApply | None = None,
  discriminator_params: Any = None,
  teacher_weight: losses.Scalar = 1.0,
  partner_logits: jax.Array | None = None,
) -> Losses:
  """Both losses and the bank's new rows, from one batch's logits.

  Arguments as `student_loss`'s. Each loss reaches only its own model's
  parameters, so one gradient of `student_loss + discriminator_loss` with
  respect to both models' parameters gives each model its own gradient.
  """
  _check_inputs(objective, teacher_logits, discriminator_apply, partner_logits)
  # One softmax for every use (a second one would change how XLA fuses the
  # step, and with it the last bits of a run's figures).
  loss, terms, probs = _student_loss(
    objective,
    student_logits.astype(jnp.float32),
    labels,
    previous_probs,
    alpha=alpha,
    teacher_logits=teacher_logits,
    discriminator_apply=discriminator_apply,
    discriminator_params=discriminator_params,
    teacher_weight=teacher_weight,
    partner_logits=partner_logits,
  )
  disc_loss, accuracy = jnp.float32(0.0), {}
  if objective.uses_discriminator:
    disc_loss, accuracy = _discriminator_loss(
      probs, teacher_logits, discriminator_apply, discriminator_params
    )
    terms["disc"] = disc_loss
  terms["student"] = loss
  return Losses(loss, disc_loss, lax.stop_gradient(probs), terms, accuracy)


def _check_inputs(
  objective: Objective,
  teacher_logits: jax.Array | None,
  discriminator_apply: DiscriminatorApply | None,
  partner_logits: jax.Array | None,
) -> None:
  if objective.uses_teacher and teacher_logits is None:
    raise ValueError(
      "This objective distils from a pre-trained model: pass teacher_logits."
    )
  if objective.uses_discriminator and discriminator_apply is None:
    raise ValueError(
      "This objective has an adversarial term: pass discriminator_apply and "
      "discriminator_params."
    )
  if objective.uses_partners and partner_logits is None:
    raise ValueError(
      "This objective has CS-KD's class-wise term: pass partner_logits."
    )
