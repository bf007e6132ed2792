"""Tests for aikd_jax.augment: crops, flips, normalisation, determinism."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aikd_jax import augment

# Compiled with most XLA optimisations off (conftest.py): like with like.
pytestmark = pytest.mark.usefixtures("fast_compilation")

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2023, 0.1994, 0.2010)


def _images(n, size=8, channels=3, seed=0):
  rng = np.random.default_rng(seed)
  # Values in [1, 255] so zero padding is distinguishable from image pixels.
  return jnp.asarray(
    rng.integers(1, 256, (n, size, size, channels), dtype=np.uint8)
  )


def _unnormalize(x):
  return np.rint(
    (np.asarray(x) * np.asarray(STD) + np.asarray(MEAN)) * 255.0
  ).astype(np.int64)


def test_normalize():
  images = jnp.array([[[[0, 255, 51]]]], dtype=jnp.uint8)
  out = augment.normalize(images, MEAN, STD)
  assert out.dtype == jnp.float32
  expected = (np.array([0.0, 1.0, 0.2]) - np.array(MEAN)) / np.array(STD)
  chex.assert_trees_all_close(
    out[0, 0, 0], jnp.asarray(expected, jnp.float32), rtol=1e-6
  )


@pytest.mark.parametrize("channels", [1, 3])
def test_shapes_and_dtypes(channels):
  images = _images(5, size=6, channels=channels)
  mean, std = MEAN[:channels], STD[:channels]
  out = augment.augment(
    images,
    jnp.arange(5),
    jax.random.key(0),
    pad=2,
    flip=True,
    mean=mean,
    std=std,
  )
  chex.assert_shape(out, (5, 6, 6, channels))
  chex.assert_type(out, jnp.float32)
  dy, dx, flipped = augment.augment_offsets(
    jnp.arange(5), jax.random.key(0), pad=2, flip=True
  )
  chex.assert_shape((dy, dx, flipped), (5,))
  assert flipped.dtype == jnp.bool_


def test_crops_are_windows_of_the_padded_image():
  pad, size, n = 4, 8, 64
  images = _images(n, size=size)
  ids = jnp.arange(100, 100 + n)
  key = jax.random.key(3)
  out = _unnormalize(
    augment.augment(images, ids, key, pad=pad, flip=True, mean=MEAN, std=STD)
  )
  dy, dx, flipped = map(
    np.asarray, augment.augment_offsets(ids, key, pad=pad, flip=True)
  )
  assert dy.min() >= 0 and dx.min() >= 0
  assert dy.max() <= 2 * pad and dx.max() <= 2 * pad
  # Over 64 examples both extremes of the 9 offsets show up: the range is used.
  assert {0, 2 * pad} <= set(dy.tolist()) | set(dx.tolist())
  padded = np.pad(np.asarray(images), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  for i in range(n):
    window = padded[i, dy[i] : dy[i] + size, dx[i] : dx[i] + size]
    if flipped[i]:
      window = window[:, ::-1]
    np.testing.assert_array_equal(out[i], window)
  # Some crops reach into the zero padding (pixel zeros, before Normalize).
  assert (out == 0).any()


def test_flips_about_half_the_time():
  ids = jnp.arange(2000)
  _, _, flipped = augment.augment_offsets(
    ids, jax.random.key(7), pad=0, flip=True
  )
  assert 0.45 <= float(flipped.mean()) <= 0.55
  _, _, never = augment.augment_offsets(
    ids, jax.random.key(7), pad=0, flip=False
  )
  assert not bool(never.any())


def test_flip_reverses_width():
  images = _images(64, size=4)
  key = jax.random.key(1)
  out = augment.augment(
    images, jnp.arange(64), key, pad=0, flip=True, mean=MEAN, std=STD
  )
  _, _, flipped = augment.augment_offsets(jnp.arange(64), key, pad=0, flip=True)
  plain = augment.normalize(images, MEAN, STD)
  expected = jnp.where(flipped[:, None, None, None], plain[:, :, ::-1], plain)
  chex.assert_trees_all_close(out, expected)
  assert 0 < int(flipped.sum()) < 64


def test_deterministic_in_key_and_ids():
  images = _images(16)
  ids = jnp.arange(16) * 3
  run = lambda key: augment.augment(
    images, ids, key, pad=4, flip=True, mean=MEAN, std=STD
  )
  chex.assert_trees_all_equal(run(jax.random.key(0)), run(jax.random.key(0)))
  assert not np.allclose(run(jax.random.key(0)), run(jax.random.key(1)))


def test_independent_of_position_in_batch():
  images = _images(32)
  ids = jnp.arange(1000, 1032)
  key = jax.random.key(5)
  kwargs = dict(pad=4, flip=True, mean=MEAN, std=STD)
  out = augment.augment(images, ids, key, **kwargs)
  perm = np.random.default_rng(0).permutation(32)
  out_perm = augment.augment(images[perm], ids[perm], key, **kwargs)
  chex.assert_trees_all_equal(out_perm[np.argsort(perm)], out)
  # A sub-batch (as one device of several would see it) gives the same views.
  chex.assert_trees_all_equal(
    augment.augment(images[8:16], ids[8:16], key, **kwargs), out[8:16]
  )


def test_no_pad_no_flip_is_normalize():
  images = _images(4)
  out = augment.augment(
    images,
    jnp.arange(4),
    jax.random.key(0),
    pad=0,
    flip=False,
    mean=MEAN,
    std=STD,
  )
  chex.assert_trees_all_equal(out, augment.normalize(images, MEAN, STD))


def test_under_jit():
  images = _images(8)
  ids = jnp.arange(8)
  key = jax.random.key(2)
  fn = jax.jit(
    lambda im, i, k: augment.augment(
      im, i, k, pad=4, flip=True, mean=MEAN, std=STD
    )
  )
  chex.assert_trees_all_close(
    fn(images, ids, key),
    augment.augment(images, ids, key, pad=4, flip=True, mean=MEAN, std=STD),
    atol=1e-6,
  )
  raw_key = jax.random.PRNGKey(2)  # legacy uint32 keys work too
  chex.assert_shape(fn(images, ids, raw_key), (8, 8, 8, 3))
