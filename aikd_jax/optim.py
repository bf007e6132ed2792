"""The student's and the discriminator's optimisers (optax)."""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import optax


def student_learning_rate(
  base_lr: float,
  decay_epochs: Sequence[int],
  decay_factor: float,
  steps_per_epoch: int,
  warmup_epochs: float = 0.0,
) -> optax.Schedule:
  """Step schedule given in epochs: lr x decay_factor at each listed epoch.

  With `warmup_epochs` > 0 the rate first grows linearly from base_lr / W to
  base_lr over those W steps (Goyal et al., 2017); 0 is PS-KD's recipe.
  """
  boundaries = {int(e) * steps_per_epoch: decay_factor for e in decay_epochs}
  decayed = optax.piecewise_constant_schedule(base_lr, boundaries)
  warmup_steps = int(round(warmup_epochs * steps_per_epoch))
  if warmup_steps <= 0:
    return decayed
  return lambda step: (
    decayed(step) * jnp.minimum(1.0, (step + 1) / warmup_steps)
  )


def student_optimizer(
  learning_rate: optax.Schedule,
  *,
  momentum: float,
  nesterov: bool,
  weight_decay: float,
) -> optax.GradientTransformation:
  """SGD as PS-KD's PyTorch code runs it.

  Weight decay is coupled (added to the gradient before momentum, on every
  parameter including BatchNorm scales and biases), which is what
  torch.optim.SGD(weight_decay=...) does; optax's sgd with nesterov=True
  follows torch's Nesterov formulation. Gradient clipping, where the
  objective asks for it, happens in the train step before this.
  """
  return optax.chain(
    optax.add_decayed_weights(weight_decay),
    optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
  )


def discriminator_optimizer(
  learning_rate: float, b1: float, b2: float
) -> optax.GradientTransformation:
  """Adam with GAN-style betas (b1 0.5)."""
  return optax.adam(learning_rate, b1=b1, b2=b2)
