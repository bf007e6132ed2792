"""On-device augmentation: random crop with zero padding, flip, normalise.

Runs inside the jitted, shard_mapped train step, so it is pure jnp. Each
example's randomness is `jax.random.fold_in(key, example_id)`: the view of an
example depends only on (key, id), never on its position in the batch or on
which device holds it, so a step on 8 devices equals the same step on 1.
Pass the same (replicated) key to every device.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

ArrayLike = jax.Array | Sequence[float]


def normalize(images: jax.Array, mean: ArrayLike, std: ArrayLike) -> jax.Array:
  """uint8 images [..., H, W, C] -> float32 (x / 255 - mean) / std.

  Float images are taken as already scaled to [0, 1] (the host's colour
  augmentation sends them so, unclipped), so they skip the / 255.
  """
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  x = images.astype(jnp.float32)
  if not jnp.issubdtype(images.dtype, jnp.floating):
    x = x / 255.0
  return (x - mean) / std


def augment_offsets(
  example_ids: jax.Array, key: jax.Array, *, pad: int, flip: bool
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The per-example crop offsets and flips that `augment` applies.

  Args:
    example_ids: int [b] stable example ids.
    key: PRNG key shared by all devices for this step.
    pad: zero padding per side; offsets are drawn uniformly from [0, 2 * pad].
    flip: whether to draw horizontal flips (p = 0.5).

  Returns:
    (dy, dx, flipped): int32 [b] offsets into the padded image and bool [b].
  """

  def one(example_id: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    crop_key, flip_key = jax.random.split(jax.random.fold_in(key, example_id))
    dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * pad + 1, dtype=jnp.int32)
    flipped = jax.random.bernoulli(flip_key, 0.5) if flip else jnp.bool_(False)
    return dy, dx, flipped

  return jax.vmap(one)(jnp.asarray(example_ids))


def augment(
  images: jax.Array,
  example_ids: jax.Array,
  key: jax.Array,
  *,
  pad: int,
  flip: bool,
  mean: ArrayLike,
  std: ArrayLike,
) -> jax.Array:
  """torchvision's RandomCrop(H, padding=pad), RandomHorizontalFlip, Normalize.

  Padding is zeros in pixel space, before normalisation, as torchvision does.

  Args:
    images: uint8 [b, H, W, C].
    example_ids: int [b] stable example ids (the randomness is keyed on them).
    key: PRNG key, the same on every device.
    pad: pixels of zero padding per side; 0 disables the crop.
    flip: random horizontal flip with p = 0.5.
    mean, std: per-channel normalisation constants.

  Returns:
    float32 [b, H, W, C].
  """
  _, height, width, channels = images.shape
  dy, dx, flipped = augment_offsets(example_ids, key, pad=pad, flip=flip)
  padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))

  def one(
    image: jax.Array, y: jax.Array, x: jax.Array, f: jax.Array
  ) -> jax.Array:
    crop = jax.lax.dynamic_slice(image, (y, x, 0), (height, width, channels))
    return jnp.where(f, crop[:, ::-1], crop)

  return normalize(jax.vmap(one)(padded, dy, dx, flipped), mean, std)
