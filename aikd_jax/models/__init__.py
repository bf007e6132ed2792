"""Networks: PS-KD's PreAct ResNet-18, a tiny CNN for tests, the
discriminator. Conventions (dtypes, BatchNorm, initialisers, padding) are in
`layers`; one module per family.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aikd_jax.models.layers import batch_norm as _batch_norm
from aikd_jax.models.layers import compute_dtype
from aikd_jax.models.layers import torch_bias_init
from aikd_jax.models.layers import torch_kernel_init
from aikd_jax.models.preact_resnet import PreActBlock
from aikd_jax.models.preact_resnet import PreActResNet18
from aikd_jax.models.small import Discriminator
from aikd_jax.models.small import TinyCNN

_MODELS = {"preact_resnet18": PreActResNet18, "tiny_cnn": TinyCNN}

MODEL_NAMES = tuple(_MODELS)

__all__ = [
  "MODEL_NAMES",
  "Discriminator",
  "PreActBlock",
  "PreActResNet18",
  "TinyCNN",
  "_batch_norm",
  "compute_dtype",
  "create_model",
  "torch_bias_init",
  "torch_kernel_init",
]


def create_model(
  name: str,
  num_classes: int,
  dtype: Any = jnp.float32,
  bn_axis_name: str | None = None,
) -> nn.Module:
  """Builds a classifier by config name; `dtype` may be a string."""
  if name not in _MODELS:
    raise ValueError(
      f"Unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}."
    )
  return _MODELS[name](
    num_classes=num_classes,
    dtype=compute_dtype(dtype),
    bn_axis_name=bn_axis_name,
  )
