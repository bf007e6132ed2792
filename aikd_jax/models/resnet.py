"""PS-KD's ImageNet ResNet (`ResNet(dataset='imagenet', bottleneck=True)`).

torchvision's layout: 7x7/2 stem, 3x3/2 max pool, bottleneck stages with
the stride on the 3x3 conv, projection shortcuts (conv1x1-BN) where the
shape changes. Convs re-initialised as PS-KD does (normal, std
sqrt(2 / (k * k * out))); BatchNorm scale 1 / bias 0; the classifier keeps
PyTorch's Linear defaults. ResNet-152: 60,192,808 parameters, 1000 classes.
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
from aikd_jax.models.layers import kaiming_normal_fan_out

# Blocks per stage of PS-KD's bottleneck ImageNet ResNets, by depth.
STAGE_SIZES = {
  50: (3, 4, 6, 3),
  101: (3, 4, 23, 3),
  152: (3, 8, 36, 3),
  200: (3, 24, 36, 3),
}


class Bottleneck(nn.Module):
  """conv1x1-BN-ReLU, conv3x3(stride)-BN-ReLU, conv1x1(4x)-BN, + shortcut,
  ReLU."""

  planes: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    norm = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    make_conv = lambda width, k, stride, name: conv(
      width, k, stride, self.dtype, name, kernel_init=kaiming_normal_fan_out
    )
    h = make_conv(self.planes, 1, 1, "conv1")(x)
    h = nn.relu(norm("bn1")(h))
    h = make_conv(self.planes, 3, self.stride, "conv2")(h)
    h = nn.relu(norm("bn2")(h))
    h = make_conv(4 * self.planes, 1, 1, "conv3")(h)
    h = norm("bn3")(h)
    shortcut = x
    if self.stride != 1 or x.shape[-1] != 4 * self.planes:
      shortcut = make_conv(4 * self.planes, 1, self.stride, "downsample_conv")(
        x
      )
      shortcut = norm("downsample_bn")(shortcut)
    return nn.relu(h + shortcut)


class ImageNetResNet(nn.Module):
  """Bottleneck ResNet for 224x224 inputs (any size that survives /32).

  `width` (64 in PS-KD) is the stem's width and the first stage's bottleneck
  width; later stages double it. Tests shrink it and `stage_sizes`.
  """

  num_classes: int
  stage_sizes: Sequence[int] = STAGE_SIZES[152]
  width: int = 64
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
      self.width, 7, 2, self.dtype, "conv1", kernel_init=kaiming_normal_fan_out
    )(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    # PyTorch pads max pooling with -inf, as Flax does.
    x = nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        x = Bottleneck(
          self.width * 2**stage,
          2 if stage > 0 and block == 0 else 1,
          self.dtype,
          self.bn_axis_name,
          name=f"layer{stage + 1}_block{block + 1}",
        )(x, train)
    x = global_average_pool(x)
    x = dense(self.num_classes, x.shape[-1], self.dtype, "fc")(x)
    return x.astype(jnp.float32)
