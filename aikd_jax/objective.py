"""One AI-KD objective; every method is a named preset of its weights.

The baselines of docs/method.md (ce, ls, tf_kd, ps_kd) and AI-KD's ablations are
not separate training loops: they are settings of the five fields below. A
weight of zero removes its term from the compiled step altogether, so a `ce`
step costs what plain cross-entropy costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax.numpy as jnp

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
      norm whenever it is larger (0: never). KD at tau 4 keeps the logits'
      curvature from fading as the student grows confident, as cross-entropy
      does, so at lr 0.1 the student can blow up long after the ramp
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
# the student's gradient clipped to norm 5) are this project's choices
# (README, "Defaults and their origin"); alpha_T = 0.8 is PS-KD's.
TEACHER_RAMP_EPOCHS = 5.0
GRAD_CLIP_NORM = 5.0
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
  # CS-KD (Yun et al., 2020): lambda 1, tau 4 as its public code uses.
  "cs_kd": dict(lambda_cls=1.0, temperature=4.0),
  "ai_kd": _AI_KD,
  "ai_kd_no_adv": {**_AI_KD, "lambda_adv": 0.0},
  "ai_kd_no_det": {**_AI_KD, "lambda_det": 0.0},
  "ai_kd_no_prog": {**_AI_KD, "alpha_T": 0.0},
  "ai_kd_online": {**_AI_KD, "teacher_mode": "online"},
}
METHODS = tuple(PRESETS)
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
