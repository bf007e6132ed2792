"""One AI-KD objective; every method is a named preset of its weights.

The baselines of METHOD.md (ce, ls, tf_kd, ps_kd) and AI-KD's ablations are
not separate training loops: they are settings of the five fields below. A
weight of zero removes its term from the compiled step altogether, so a `ce`
step costs what plain cross-entropy costs.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

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
  """

  alpha_T: float = 0.0
  label_smoothing: float = 0.0
  lambda_det: float = 0.0
  lambda_adv: float = 0.0
  lambda_cls: float = 0.0
  temperature: float = 4.0
  teacher_mode: str = "precomputed"

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
          f"label_smoothing must lie in [0, 1), got {self.label_smoothing}.")
    for name in ("lambda_det", "lambda_adv", "lambda_cls"):
      value = getattr(self, name)
      if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}.")
    if not self.temperature > 0:
      raise ValueError(
          f"temperature must be positive, got {self.temperature}.")
    if self.teacher_mode not in TEACHER_MODES:
      raise ValueError(f"teacher_mode must be one of {TEACHER_MODES}, "
                       f"got {self.teacher_mode!r}.")


# METHOD.md's table, plus AI-KD's ablations. `ai_kd`'s lambda_adv = 0.1 and
# tau = 4 are this project's choices; alpha_T = 0.8 is PS-KD's.
_AI_KD = dict(alpha_T=0.8, lambda_det=1.0, lambda_adv=0.1, temperature=4.0)
PRESETS: Mapping[str, Mapping[str, Any]] = {
    "ce": dict(),
    "ls": dict(label_smoothing=0.1),
    "tf_kd": dict(lambda_det=1.0, temperature=4.0),
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


def resolve_objective(method: str,
                      overrides: Mapping[str, Any] | None = None) -> Objective:
  """The preset named `method`, with any non-None `overrides` applied.

  Raises:
    ValueError: unknown method, unknown field, or a value out of range.
  """
  if method not in PRESETS:
    raise ValueError(
        f"Unknown method {method!r}; choose one of {', '.join(METHODS)}.")
  fields = dict(PRESETS[method])
  for name, value in (overrides or {}).items():
    if name not in OVERRIDABLE_FIELDS:
      raise ValueError(f"Unknown objective field {name!r}; known fields: "
                       f"{', '.join(OVERRIDABLE_FIELDS)}.")
    if value is not None:
      fields[name] = value
  objective = Objective(**fields)
  objective.validate()
  return objective
