"""Building blocks shared by every network: PyTorch-style layers and dtypes.

Conventions shared by every module of this package:
- parameters are always float32; computation runs in `dtype` (float32 or
  bfloat16); logits are returned as float32 so losses and banks see float32.
- BatchNorm uses PyTorch's defaults (Flax momentum 0.9 = PyTorch 0.1,
  epsilon 1e-5, scale 1, bias 0) and an optional `bn_axis_name`: inside
  `jax.shard_map` over a mesh axis of that name the batch statistics are
  averaged across devices (synchronised BN); None keeps per-device
  statistics.
- Initialisers copy what PS-KD's PyTorch code uses for each network, so that
  training behaves like it: PyTorch's Conv2d/Linear defaults
  (`torch_kernel_init`, `torch_bias_init`) unless the network re-initialises
  its convs (`kaiming_normal_fan_out`).
- Convolutions pad explicitly by kernel // 2 on each side, as PyTorch's
  `padding=k // 2` does (Flax's 'SAME' pads (0, 1) for stride 2, which shifts
  the sampling grid by a pixel).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# PyTorch's Conv2d/Linear default is kaiming_uniform_(a=sqrt(5)): a uniform
# distribution with bound sqrt(6 / ((1 + a^2) * fan_in)) = 1 / sqrt(fan_in),
# i.e. variance 1 / (3 * fan_in). Flax's lecun_normal default would train
# differently from PS-KD's code, so we match PyTorch instead.
torch_kernel_init = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform"
)

# `normal_(0, sqrt(2 / (k * k * out_channels)))`, the re-initialisation of
# PS-KD's PyramidNet and ImageNet ResNet, and `kaiming_normal_(mode=
# 'fan_out')` of its ResNeXt: the same untruncated normal. Flax computes
# fan_out of a [k, k, in / groups, out] kernel as k * k * out, as PyTorch does.
kaiming_normal_fan_out = nn.initializers.variance_scaling(
  2.0, "fan_out", "normal"
)

# `kaiming_normal_(weight)` (fan_in, gain sqrt(2)), untruncated.
kaiming_normal_fan_in = nn.initializers.variance_scaling(
  2.0, "fan_in", "normal"
)


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


def batch_norm(
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


def conv(
  features: int,
  kernel: int,
  stride: int,
  dtype: Any,
  name: str,
  *,
  groups: int = 1,
  kernel_init: nn.initializers.Initializer = torch_kernel_init,
) -> nn.Conv:
  """A bias-free conv with PyTorch's padding (kernel // 2) and initialiser."""
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    feature_group_count=groups,
    use_bias=False,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    name=name,
  )


def dense(
  features: int,
  fan_in: int,
  dtype: Any,
  name: str,
  *,
  kernel_init: nn.initializers.Initializer = torch_kernel_init,
  bias_init: nn.initializers.Initializer | None = None,
) -> nn.Dense:
  """nn.Dense with PyTorch Linear's default initialisers unless given."""
  return nn.Dense(
    features,
    dtype=dtype,
    param_dtype=jnp.float32,
    kernel_init=kernel_init,
    bias_init=torch_bias_init(fan_in) if bias_init is None else bias_init,
    name=name,
  )


def global_average_pool(x: jax.Array) -> jax.Array:
  """[B, H, W, C] -> [B, C].

  PS-KD's CIFAR networks pool their last map with a fixed window equal to
  its size at 32x32 inputs (`avg_pool2d(x, 4)`, `AvgPool2d(8)`); the mean
  over H, W is the same pool there and also works for other input sizes.
  """
  return jnp.mean(x, axis=(1, 2))
