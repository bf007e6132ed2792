"""Networks: PS-KD's PreAct ResNet-18, a tiny CNN for tests, the discriminator.

Conventions shared by every module here:
- parameters are always float32; computation runs in `dtype` (float32 or
  bfloat16); logits are returned as float32 so losses and banks see float32.
- BatchNorm uses PyTorch's defaults (Flax momentum 0.9 = PyTorch 0.1,
  epsilon 1e-5) and an optional `bn_axis_name`: inside `jax.shard_map` over a
  mesh axis of that name the batch statistics are averaged across devices
  (synchronised BN); None keeps per-device statistics.
- Initialisers copy PyTorch's defaults for Conv2d/Linear so that training
  behaves like PS-KD's PyTorch code (see `torch_kernel_init`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

MODEL_NAMES = ("preact_resnet18", "tiny_cnn")

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# PyTorch's Conv2d/Linear default is kaiming_uniform_(a=sqrt(5)): a uniform
# distribution with bound sqrt(6 / ((1 + a^2) * fan_in)) = 1 / sqrt(fan_in),
# i.e. variance 1 / (3 * fan_in). Flax's lecun_normal default would train
# differently from PS-KD's code, so we match PyTorch instead.
torch_kernel_init = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)

# PyTorch's 3x3 convs use padding=1. Written out explicitly because Flax's
# 'SAME' pads (0, 1) for stride 2, which shifts the sampling grid by a pixel.
_PAD_3X3 = ((1, 1), (1, 1))


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's Linear bias default: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(
    key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32
  ) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def compute_dtype(name: Any) -> jnp.dtype:
  """Maps 'float32' / 'bfloat16' (or the dtypes themselves) to a jnp dtype.

  Config files name the compute dtype as a string; anything else is an error
  rather than a silent fallback to float32.
  """
  if isinstance(name, str):
    key = name
  else:
    try:
      key = jnp.dtype(name).name
    except TypeError:
      key = None
  if key not in _COMPUTE_DTYPES:
    raise ValueError(
      f"Unknown compute dtype {name!r}; use one of {sorted(_COMPUTE_DTYPES)}."
    )
  return jnp.dtype(_COMPUTE_DTYPES[key])


def _batch_norm(
  train: bool, dtype: Any, axis_name: str | None, name: str | None = None
) -> nn.BatchNorm:
  """BatchNorm with PyTorch's momentum (0.1 = Flax 0.9) and epsilon (1e-5)."""
  return nn.BatchNorm(
    use_running_average=not train,
    momentum=0.9,
    epsilon=1e-5,
    dtype=dtype,
    param_dtype=jnp.float32,
    axis_name=axis_name,
    name=name,
  )


def _conv(
  features: int, kernel: int, stride: int, dtype: Any, name: str
) -> nn.Conv:
  """A bias-free conv with PyTorch's padding and initialiser."""
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=_PAD_3X3 if kernel == 3 else "VALID",
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=torch_kernel_init,
    name=name,
  )


def _dense(features: int, fan_in: int, dtype: Any, name: str) -> nn.Dense:
  """nn.Dense with PyTorch Linear's default initialisers."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=torch_kernel_init,
    bias_init=torch_bias_init(fan_in),
    name=name,
  )


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
    out = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    if self.stride != 1 or x.shape[-1] != self.features:
      shortcut = _conv(self.features, 1, self.stride, self.dtype, "shortcut")(
        out
      )
    else:
      shortcut = out
    h = _conv(self.features, 3, self.stride, self.dtype, "conv1")(out)
    h = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn2")(h))
    h = _conv(self.features, 3, 1, self.dtype, "conv2")(h)
    return h + shortcut


class PreActResNet18(nn.Module):
  """PS-KD's `CIFAR_ResNet18_preActBasic` (about 11.2M parameters, C=100)."""

  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """x [B, H, W, C] normalised images (C = 1 or 3) -> float32 [B, classes]."""
    x = x.astype(self.dtype)
    x = _conv(64, 3, 1, self.dtype, "stem_conv")(x)
    x = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "stem_bn")(x))
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
    # PS-KD pools the final 4x4 map with no BN-ReLU before it; a mean over
    # H, W is the same pool and also works for other input sizes.
    x = jnp.mean(x, axis=(1, 2))
    x = _dense(self.num_classes, x.shape[-1], self.dtype, "head")(x)
    return x.astype(jnp.float32)


class TinyCNN(nn.Module):
  """A small CNN with BatchNorm, for tests and small data (8x8 digits)."""

  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Args: x [B, H, W, C] normalised images. Returns float32 [B, classes]."""
    x = x.astype(self.dtype)
    x = _conv(16, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    x = _conv(32, 3, 2, self.dtype, "conv2")(x)
    x = nn.relu(_batch_norm(train, self.dtype, self.bn_axis_name, "bn2")(x))
    x = jnp.mean(x, axis=(1, 2))
    x = _dense(self.num_classes, x.shape[-1], self.dtype, "head")(x)
    return x.astype(jnp.float32)


class Discriminator(nn.Module):
  """MLP C -> 256 -> 256 -> 1 with LeakyReLU(0.2): one 'from the teacher' logit.

  No BatchNorm, so real and fake batches are scored independently.
  """

  hidden: Sequence[int] = (256, 256)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, probs: jax.Array) -> jax.Array:
    """Args: probs [B, C] probabilities. Returns float32 logits [B]."""
    h = probs.astype(self.dtype)
    for i, width in enumerate(self.hidden):
      h = _dense(width, h.shape[-1], self.dtype, f"hidden{i + 1}")(h)
      h = nn.leaky_relu(h, negative_slope=0.2)
    h = _dense(1, h.shape[-1], self.dtype, "out")(h)
    return jnp.squeeze(h, axis=-1).astype(jnp.float32)


_MODELS = {"preact_resnet18": PreActResNet18, "tiny_cnn": TinyCNN}


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
