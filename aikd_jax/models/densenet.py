"""PS-KD's CIFAR DenseNet-121 (`CIFAR_DenseNet121`, growth rate 32).

PyTorch's default initialisers throughout (PS-KD does not re-initialise this
network); 7,048,548 parameters for 100 classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aikd_jax.models.layers import batch_norm
from aikd_jax.models.layers import conv
from aikd_jax.models.layers import dense
from aikd_jax.models.layers import global_average_pool


class DenseLayer(nn.Module):
  """BN-ReLU-conv1x1(4k)-BN-ReLU-conv3x3(k), its output first in the concat.

  PS-KD's `Bottleneck` concatenates [new features, input] in that order.
  """

  growth_rate: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    h = nn.relu(norm("bn1")(x))
    h = conv(4 * self.growth_rate, 1, 1, self.dtype, "conv1")(h)
    h = nn.relu(norm("bn2")(h))
    h = conv(self.growth_rate, 3, 1, self.dtype, "conv2")(h)
    return jnp.concatenate([h, x], axis=-1)


class Transition(nn.Module):
  """BN-ReLU-conv1x1, then 2x2 average pooling."""

  features: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    h = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn")(x))
    h = conv(self.features, 1, 1, self.dtype, "conv")(h)
    return nn.avg_pool(h, (2, 2), strides=(2, 2))


class DenseNet(nn.Module):
  """PS-KD's `CIFAR_DenseNet`: 3x3 stem, dense blocks, transitions halving
  the width (floor), final BN-ReLU, global average pool, linear head."""

  num_classes: int
  blocks: Sequence[int] = (6, 12, 24, 16)
  growth_rate: int = 32
  reduction: float = 0.5
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    """x [B, H, W, C] normalised images -> float32 [B, classes]."""
    del example_ids  # no per-example randomness
    x = x.astype(self.dtype)
    x = conv(2 * self.growth_rate, 3, 1, self.dtype, "conv1")(x)
    for stage, layers in enumerate(self.blocks):
      for layer in range(layers):
        x = DenseLayer(
          self.growth_rate,
          self.dtype,
          self.bn_axis_name,
          name=f"dense{stage + 1}_layer{layer + 1}",
        )(x, train)
      if stage < len(self.blocks) - 1:
        x = Transition(
          int(x.shape[-1] * self.reduction),
          self.dtype,
          self.bn_axis_name,
          name=f"trans{stage + 1}",
        )(x, train)
    x = batch_norm(train, self.dtype, self.bn_axis_name, "bn")(x)
    x = global_average_pool(nn.relu(x))
    x = dense(self.num_classes, x.shape[-1], self.dtype, "linear")(x)
    return x.astype(jnp.float32)
