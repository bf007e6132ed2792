"""Tests for aikd_jax.data: names, digits, channel_stats and Dataset checks.

The TFDS and image-folder sources have their own test files.
"""

import numpy as np
import pytest

from aikd_jax import data

# ---------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_and_values():
  ds = data.load_dataset("digits")
  assert ds.name == "digits"
  assert ds.num_classes == 10
  assert ds.class_names == tuple("0123456789")
  assert ds.image_shape == (8, 8, 1)
  assert ds.train_images.dtype == np.uint8
  assert ds.test_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.test_labels.dtype == np.int32
  assert ds.train_images.shape[0] + ds.test_images.shape[0] == 1797
  assert ds.test_images.shape[0] == pytest.approx(0.2 * 1797, abs=10)
  assert ds.train_images.shape[1:] == ds.test_images.shape[1:] == (8, 8, 1)
  all_images = np.concatenate([ds.train_images, ds.test_images])
  assert all_images.min() == 0 and all_images.max() == 255
  # 0..16 scaled by 255/16 and rounded: only these 17 levels occur.
  levels = np.round(np.arange(17) * 255 / 16).astype(np.uint8)
  assert set(np.unique(all_images)) <= set(levels)


def test_digits_split_is_stratified():
  ds = data.load_dataset("digits")
  train_counts = np.bincount(ds.train_labels, minlength=10)
  test_counts = np.bincount(ds.test_labels, minlength=10)
  total = train_counts + test_counts
  # Each class sends round(20%) of its examples to test.
  np.testing.assert_array_equal(test_counts, np.round(total * 0.2))
  np.testing.assert_allclose(
    test_counts / test_counts.sum(), total / total.sum(), atol=0.01
  )


def test_digits_split_is_seeded_and_ignores_global_state():
  a = data.load_dataset("digits", split_seed=0)
  np.random.seed(123)  # Global NumPy state must not matter.
  np.random.rand(10)
  b = data.load_dataset("digits", split_seed=0)
  c = data.load_dataset("digits", split_seed=1)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert a.test_images.shape == c.test_images.shape
  assert not np.array_equal(a.test_images, c.test_images)
  # A split, not a resampling: train and test together are the whole set.
  whole = np.concatenate([c.train_images, c.test_images]).reshape(1797, -1)
  ref = np.concatenate([a.train_images, a.test_images]).reshape(1797, -1)
  np.testing.assert_array_equal(np.sort(whole, axis=0), np.sort(ref, axis=0))


def test_digits_resize_with_image_size():
  ds = data.load_dataset("digits", image_size=16)
  assert ds.image_shape == (16, 16, 1)
  assert ds.test_images.shape[1:] == (16, 16, 1)
  assert ds.train_images.dtype == np.uint8


# ---------------------------------------------------------------------------
# Names.


def test_unknown_names_raise_value_error():
  for name in ("imagenet", "CIFAR100", "cifar-100", "", "folder:", "folder: "):
    with pytest.raises(ValueError) as info:
      data.load_dataset(name)
    assert "folder:" in str(info.value)
    with pytest.raises(ValueError):
      data.check_dataset_available(name)


# ---------------------------------------------------------------------------
# channel_stats and Dataset checks.


def test_channel_stats_by_hand():
  images = np.zeros((2, 1, 2, 3), np.uint8)
  images[..., 0] = 255  # constant 1.0
  images[0, 0, :, 1] = [0, 255]  # 0, 1, 0, 1 -> mean .5, std .5
  images[1, 0, :, 1] = [0, 255]
  images[..., 2] = [[[51, 102]], [[153, 204]]]  # .2 .4 .6 .8
  mean, std = data.channel_stats(images)
  np.testing.assert_allclose(mean, [1.0, 0.5, 0.5], atol=1e-12)
  np.testing.assert_allclose(std, [0.0, 0.5, np.sqrt(0.05)], atol=1e-12)
  assert isinstance(mean, tuple) and isinstance(std[0], float)
  ref = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(std, ref.std(axis=0), atol=1e-12)


def test_channel_stats_matches_numpy_on_random_images():
  images = np.random.default_rng(0).integers(0, 256, (50, 7, 5, 3), np.uint8)
  mean, std = data.channel_stats(images)
  ref = images.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(mean, ref.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(std, ref.std(axis=0), rtol=1e-12)
  with pytest.raises(ValueError):
    data.channel_stats(images.astype(np.float32))


def test_dataset_rejects_bad_arrays():
  images = np.zeros((4, 2, 2, 1), np.uint8)
  labels = np.array([0, 1, 2, 1], np.int32)
  ok = data.Dataset("x", images, labels, images, labels, num_classes=3)
  assert ok.image_shape == (2, 2, 1)
  with pytest.raises(ValueError):
    data.Dataset("x", images, labels.astype(np.int64), images, labels, 3)
  with pytest.raises(ValueError):
    data.Dataset("x", images, labels, images, labels, num_classes=2)
  with pytest.raises(ValueError):
    data.Dataset("x", images.astype(np.float32), labels, images, labels, 3)
