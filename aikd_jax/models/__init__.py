"""Networks: PS-KD's CIFAR and ImageNet classifiers, a tiny CNN for tests,
the discriminator. Conventions (dtypes, BatchNorm, initialisers, padding)
are in `layers`; one module per family.

Every classifier is called as `model.apply(variables, x, train=...,
example_ids=None)` and returns float32 logits. Only ShakeDrop reads
`example_ids` and the 'shakedrop' rng (training only); the others ignore
both.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from aikd_jax.models.densenet import DenseNet
from aikd_jax.models.layers import batch_norm as _batch_norm
from aikd_jax.models.layers import compute_dtype
from aikd_jax.models.layers import torch_bias_init
from aikd_jax.models.layers import torch_kernel_init
from aikd_jax.models.preact_resnet import PreActBlock
from aikd_jax.models.preact_resnet import PreActResNet18
from aikd_jax.models.pyramidnet import SHAKEDROP_RNG
from aikd_jax.models.pyramidnet import PyramidNet
from aikd_jax.models.pyramidnet import ShakeDrop
from aikd_jax.models.resnet import STAGE_SIZES
from aikd_jax.models.resnet import ImageNetResNet
from aikd_jax.models.resnext import CifarResNeXt
from aikd_jax.models.small import Discriminator
from aikd_jax.models.small import TinyCNN

# Config name -> constructor with PS-KD's arguments (models/network.py there).
_MODELS = {
  "preact_resnet18": PreActResNet18,
  "densenet121": functools.partial(
    DenseNet, blocks=(6, 12, 24, 16), growth_rate=32
  ),
  "resnext29": functools.partial(
    CifarResNeXt, depth=29, cardinality=8, base_width=64, widen_factor=4
  ),
  "pyramidnet200": functools.partial(PyramidNet, depth=200, alpha=240.0),
  "pyramidnet200_shakedrop": functools.partial(
    PyramidNet, depth=200, alpha=240.0, shakedrop=True
  ),
  "resnet152": functools.partial(ImageNetResNet, stage_sizes=STAGE_SIZES[152]),
  "tiny_cnn": TinyCNN,
}

MODEL_NAMES = tuple(_MODELS)

__all__ = [
  "MODEL_NAMES",
  "SHAKEDROP_RNG",
  "CifarResNeXt",
  "DenseNet",
  "Discriminator",
  "ImageNetResNet",
  "PreActBlock",
  "PreActResNet18",
  "PyramidNet",
  "ShakeDrop",
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
