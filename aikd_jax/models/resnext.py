"""PS-KD's CIFAR ResNeXt-29 (`CifarResNeXt`, cardinality 8, base width 64).

Initialisers as PS-KD re-initialises this network: every conv kaiming normal
with fan_out, BatchNorm scale 1 / bias 0, the classifier's weight kaiming
normal (fan_in) and its bias 0. 34,518,948 parameters for 100 classes.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from aikd_jax.models.layers import batch_norm
from aikd_jax.models.layers import conv
from aikd_jax.models.layers import dense
from aikd_jax.models.layers import global_average_pool
from aikd_jax.models.layers import kaiming_normal_fan_in
from aikd_jax.models.layers import kaiming_normal_fan_out


class ResNeXtBottleneck(nn.Module):
  """Type-C block: conv1x1(D)-BN-ReLU, grouped conv3x3(D)-BN-ReLU,
  conv1x1(out)-BN, plus the shortcut (conv1x1-BN where the width changes),
  then ReLU. D = cardinality * int(base_width * out / (widen_factor * 64))."""

  features: int
  stride: int
  cardinality: int
  base_width: int
  widen_factor: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    make_conv = lambda width, k, stride, name, groups=1: conv(
      width,
      k,
      stride,
      self.dtype,
      name,
      groups=groups,
      kernel_init=kaiming_normal_fan_out,
    )
    width_ratio = self.features / (self.widen_factor * 64.0)
    width = self.cardinality * int(self.base_width * width_ratio)
    h = make_conv(width, 1, 1, "conv_reduce")(x)
    h = nn.relu(norm("bn_reduce")(h))
    h = make_conv(width, 3, self.stride, "conv_conv", self.cardinality)(h)
    h = nn.relu(norm("bn")(h))
    h = make_conv(self.features, 1, 1, "conv_expand")(h)
    h = norm("bn_expand")(h)
    shortcut = x
    # PS-KD projects only where the width changes (every stage's first block,
    # which is also where the stride is).
    if x.shape[-1] != self.features:
      shortcut = make_conv(self.features, 1, self.stride, "shortcut_conv")(x)
      shortcut = norm("shortcut_bn")(shortcut)
    return nn.relu(shortcut + h)


class CifarResNeXt(nn.Module):
  """3x3 stem (64)-BN-ReLU, three stages of (depth - 2) // 9 blocks with
  widths 64 * widen_factor * (1, 2, 4), strides (1, 2, 2), global average
  pool, linear classifier."""

  num_classes: int
  depth: int = 29
  cardinality: int = 8
  base_width: int = 64
  widen_factor: int = 4
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    """x [B, H, W, C] normalised images -> float32 [B, classes]."""
    del example_ids  # no per-example randomness
    x = x.astype(self.dtype)
    x = conv(
      64, 3, 1, self.dtype, "conv_1_3x3", kernel_init=kaiming_normal_fan_out
    )(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn_1")(x))
    blocks = (self.depth - 2) // 9
    for stage, (scale, stride) in enumerate(zip((1, 2, 4), (1, 2, 2))):
      for block in range(blocks):
        x = ResNeXtBottleneck(
          64 * self.widen_factor * scale,
          stride if block == 0 else 1,
          self.cardinality,
          self.base_width,
          self.widen_factor,
          self.dtype,
          self.bn_axis_name,
          name=f"stage_{stage + 1}_bottleneck_{block}",
        )(x, train)
    x = global_average_pool(x)
    x = dense(
      self.num_classes,
      x.shape[-1],
      self.dtype,
      "classifier",
      kernel_init=kaiming_normal_fan_in,
      bias_init=nn.initializers.zeros,
    )(x)
    return x.astype(jnp.float32)
