"""Small networks: a CNN for tests and small data, and the discriminator."""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from aikd_jax.models.layers import batch_norm
from aikd_jax.models.layers import conv
from aikd_jax.models.layers import dense
from aikd_jax.models.layers import global_average_pool


class TinyCNN(nn.Module):
  """A small CNN with BatchNorm, for tests and small data (8x8 digits)."""

  num_classes: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, train: bool, example_ids: jax.Array | None = None
  ) -> jax.Array:
    """Args: x [B, H, W, C] normalised images. Returns float32 [B, classes]."""
    del example_ids  # no per-example randomness
    x = x.astype(self.dtype)
    x = conv(16, 3, 1, self.dtype, "conv1")(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn1")(x))
    x = conv(32, 3, 2, self.dtype, "conv2")(x)
    x = nn.relu(batch_norm(train, self.dtype, self.bn_axis_name, "bn2")(x))
    x = global_average_pool(x)
    x = dense(self.num_classes, x.shape[-1], self.dtype, "head")(x)
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
      h = dense(width, h.shape[-1], self.dtype, f"hidden{i + 1}")(h)
      h = nn.leaky_relu(h, negative_slope=0.2)
    h = dense(1, h.shape[-1], self.dtype, "out")(h)
    return jnp.squeeze(h, axis=-1).astype(jnp.float32)
