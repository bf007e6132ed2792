"""PS-KD's CIFAR PreAct ResNet-18 (`CIFAR_ResNet18_preActBasic`)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aikd_jax.models.layers import batch_norm
from aikd_jax.models.layers import conv
from aikd_jax.models.layers import dense
from aikd_jax.models.layers import global_average_pool


class PreActBlock(nn.Module):
  """PS-KD's pre-activation basic block (`PreActBlock` in its CIFAR ResNets).

  Quirk kept on purpose: without downsampling the shortcut is
  `relu(bn1(x))`, not `x`, exactly as PS-KD's code computes it.
  """

  features: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    out = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = conv(self.features, 1, self.stride, self.dtype, "shortcut")(
        out
      )
    else:
      shortcut = out
    h = conv(self.features, 3, self.stride, self.dtype, "conv1")(out)
    h = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn2")(h))
    h = conv(self.features, 3, 1, self.dtype, "conv2")(h)
    return h + shortcut


class PreActResNet18(nn.Module):
  """PS-KD's `CIFAR_ResNet18_preActBasic` (11,217,444 parameters, C=100)."""

  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    """x [B, H, W, C] normalised images (C = 1 or 3) -> float32 [B, classes].

    `example_ids` is unused (only ShakeDrop networks draw per example).
    """
    del example_ids
    x = x.astype(self.dtype)
    x = conv(64, 3, 1, self.dtype, "stem_conv")(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "stem_bn")(x))
    for stage, (features, stride) in enumerate(
      zip((64, 128, 256, 512), (1, 2, 2, 2))
    ):
      for block in range(2):
        x = PreActBlock(
          features,
          stride if block == 0 else 1,
          dtype=self.dtype,
          bn_axis_name=self.bn_axis_name,
          name=f"stage{stage + 1}_block{block + 1}",
        )(x, train)
    # PS-KD pools the final 4x4 map with no BN-ReLU before it.
    x = global_average_pool(x)
    x = dense(self.num_classes, x.shape[-1], self.dtype, "head")(x)
    return x.astype(jnp.float32)
