"""PS-KD's CIFAR PyramidNet (bottleneck) with and without ShakeDrop.

`PyramidNet(dataset='cifar100', depth=200, alpha=240, bottleneck=True)` and
`PyramidNet_ShakeDrop(...)` with the same arguments: 26,844,952 parameters
for 100 classes either way (ShakeDrop has none). Convs are re-initialised
as PS-KD does (normal, std sqrt(2 / (k * k * out))); BatchNorm scale 1 /
bias 0; the classifier keeps PyTorch's Linear defaults.

ShakeDrop's randomness comes from the 'shakedrop' rng stream and the
examples' ids (see `ShakeDrop`), so a step is a pure function of its key,
as the augmentation is.
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
from aikd_jax.models.layers import kaiming_normal_fan_out

SHAKEDROP_RNG = "shakedrop"


@jax.custom_vjp
def _shake(x: jax.Array, forward: jax.Array, backward: jax.Array) -> jax.Array:
  """x * forward on the way in; the gradient is scaled by `backward`."""
  return x * forward


def _shake_forward(x, forward, backward):
  return x * forward, (forward, backward)


def _shake_backward(residuals, grad):
  forward, backward = residuals
  return grad * backward, jnp.zeros_like(forward), jnp.zeros_like(backward)


_shake.defvjp(_shake_forward, _shake_backward)


class ShakeDrop(nn.Module):
  """ShakeDrop as PS-KD's `ShakeDropFunction` computes it.

  Training: one Bernoulli gate per step and layer keeps the branch with
  probability 1 - p_drop (PS-KD draws one gate per forward call); where it
  is closed, each example's branch is scaled by alpha ~ U(-1, 1) forward and
  its gradient by beta ~ U(0, 1) backward. Evaluation: the expectation,
  (1 - p_drop) * x.

  The gate comes from the layer's key (the 'shakedrop' stream, which Flax
  folds with the layer's path); alpha and beta from that key folded with
  the example's id, so an example's draws do not depend on its position in
  the batch or on which device holds it.
  """

  p_drop: float

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array
  ) -> jax.Array:
    if not train:
      return (1.0 - self.p_drop) * x
    gate_key, example_key = jax.random.split(self.make_rng(SHAKEDROP_RNG))
    keep = jax.random.bernoulli(gate_key, 1.0 - self.p_drop)

    def draws(example_id: jax.Array) -> tuple[jax.Array, jax.Array]:
      alpha_key, beta_key = jax.random.split(
        jax.random.fold_in(example_key, example_id)
      )
      alpha = jax.random.uniform(alpha_key, minval=-1.0, maxval=1.0)
      return alpha, jax.random.uniform(beta_key)

    alpha, beta = jax.vmap(draws)(example_ids)
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    forward = jnp.where(keep, 1.0, alpha).reshape(shape).astype(x.dtype)
    backward = jnp.where(keep, 1.0, beta).reshape(shape).astype(x.dtype)
    return _shake(x, forward, backward)


def _downsample(x: jax.Array) -> jax.Array:
  """AvgPool2d(2, stride 2, ceil_mode=True): odd edges average what exists."""
  pad = ((0, x.shape[1] % 2), (0, x.shape[2] % 2))
  return nn.avg_pool(x, (2, 2), (2, 2), pad, count_include_pad=False)


class PyramidBottleneck(nn.Module):
  """BN-conv1x1-BN-ReLU-conv3x3(stride)-BN-ReLU-conv1x1(4x)-BN [ShakeDrop],
  plus the (pooled where strided) input, zero-padded to the new width."""

  planes: int
  stride: int = 1
  p_drop: float | None = None  # None: no ShakeDrop
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array | None
  ) -> jax.Array:
    norm = lambda name: batch_norm(train, self.dtype, self.bn_axis_name, name)
    make_conv = lambda width, k, stride, name: conv(
      width, k, stride, self.dtype, name, kernel_init=kaiming_normal_fan_out
    )
    h = norm("bn1")(x)
    h = make_conv(self.planes, 1, 1, "conv1")(h)
    h = nn.relu(norm("bn2")(h))
    h = make_conv(self.planes, 3, self.stride, "conv2")(h)
    h = nn.relu(norm("bn3")(h))
    h = make_conv(4 * self.planes, 1, 1, "conv3")(h)
    h = norm("bn4")(h)
    if self.p_drop is not None:
      h = ShakeDrop(self.p_drop, name="shake_drop")(h, train, example_ids)
    shortcut = _downsample(x) if self.stride != 1 else x
    extra = h.shape[-1] - shortcut.shape[-1]
    shortcut = jnp.pad(shortcut, ((0, 0), (0, 0), (0, 0), (0, extra)))
    return h + shortcut


def pyramid_widths(depth: int, alpha: float) -> list[int]:
  """Each block's bottleneck width, rounded as PS-KD rounds it.

  The width grows by alpha / (number of blocks) per block from 16; the
  running sum is kept in floating point and each block rounds it (Python's
  round, halves to even), with the same arithmetic as PS-KD's code.
  """
  blocks = 3 * ((depth - 2) // 9)
  add_rate = alpha / (blocks * 1.0)
  widths, width = [], 16.0
  for _ in range(blocks):
    width = width + add_rate
    widths.append(int(round(width)))
  return widths


def shakedrop_probabilities(depth: int) -> list[float]:
  """PS-KD's linear decay rule: block i of L drops with p = 0.5 (i + 1) / L."""
  blocks = 3 * ((depth - 2) // 9)
  return [1.0 - (1.0 - (0.5 / blocks) * (i + 1)) for i in range(blocks)]


class PyramidNet(nn.Module):
  """3x3 stem (16)-BN (no ReLU), three stages of (depth - 2) // 9 pyramid
  bottlenecks (strides 1, 2, 2), BN-ReLU, global average pool, linear head.

  shakedrop: PS-KD's `PyramidNet_ShakeDrop`. Training then needs an rng for
  'shakedrop' (`model.apply(..., rngs={'shakedrop': key})`) and the batch's
  `example_ids`; without ids, positions in the batch stand in for them.
  """

  num_classes: int
  depth: int = 200
  alpha: float = 240.0
  shakedrop: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    """x [B, H, W, C] normalised images -> float32 [B, classes]."""
    if self.shakedrop and train and example_ids is None:
      example_ids = jnp.arange(x.shape[0])
    x = x.astype(self.dtype)
    x = conv(16, 3, 1, self.dtype, "conv1", kernel_init=kaiming_normal_fan_out)(
      x
    )
    x = batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x)
    widths = pyramid_widths(self.depth, self.alpha)
    drops = shakedrop_probabilities(self.depth)
    per_stage = len(widths) // 3
    for i, planes in enumerate(widths):
      stage, block = divmod(i, per_stage)
      x = PyramidBottleneck(
        planes,
        2 if stage > 0 and block == 0 else 1,
        drops[i] if self.shakedrop else None,
        self.dtype,
        self.bn_axis_name,
        name=f"layer{stage + 1}_block{block + 1}",
      )(x, train, example_ids)
    x = batch_norm(train, self.dtype, self.bn_axis_name, "bn_final")(x)
    x = global_average_pool(nn.relu(x))
    x = dense(self.num_classes, x.shape[-1], self.dtype, "fc")(x)
    return x.astype(jnp.float32)
