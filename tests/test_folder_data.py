"""Tests for aikd_jax.folder_data (through the public load_dataset)."""

import os

import numpy as np
from PIL import Image
import pytest

from aikd_jax import data


def test_missing_folder_names_the_path(tmp_path):
  missing = tmp_path / 'nope'
  for fn in (data.check_dataset_available, data.load_dataset):
    with pytest.raises(data.DatasetUnavailableError) as info:
      fn(f'folder:{missing}')
    assert str(missing) in str(info.value)
  (tmp_path / 'root' / 'val' / 'cat').mkdir(parents=True)
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available(f'folder:{tmp_path / "root"}')
  assert 'train' in str(info.value) and 'val' in str(info.value)
  (tmp_path / 'root' / 'train' / 'cat').mkdir(parents=True)
  (tmp_path / 'root' / 'train' / 'cat' / 'notes.txt').write_text('x')
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available(f'folder:{tmp_path / "root"}')
  assert 'no class folder with images' in str(info.value)


def _write_folder(root, sizes, classes=('dog', 'ant', 'cat'), per_class=None,
                  mode='RGB'):
  """Writes root/<split>/<class>/<i>.png.

  Returns:
    {(split, pixels.tobytes()): label}.
  """
  per_class = per_class or {'train': 3, 'test': 2}
  rng = np.random.default_rng(0)
  truth = {}
  sorted_classes = sorted(classes)
  k = 0
  for split, count in per_class.items():
    for name in classes:
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        h, w = sizes[k % len(sizes)]
        k += 1
        channels = 3 if mode == 'RGB' else 1
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        pixels = pixels if mode == 'RGB' else pixels[..., 0]
        Image.fromarray(pixels, mode).save(
            os.path.join(root, split, name, f'{i}.png'))
        truth[(split, pixels.tobytes())] = sorted_classes.index(name)
  return truth


def _check_against_truth(ds, truth):
  for split, images, labels in (('train', ds.train_images, ds.train_labels),
                                ('test', ds.test_images, ds.test_labels)):
    assert len({k for k in truth if k[0] == split}) == len(images)
    for image, label in zip(images, labels):
      assert truth[(split, image.tobytes())] == label  # Exact pixels.


def test_folder_round_trip(tmp_path):
  truth = _write_folder(str(tmp_path), sizes=[(16, 16)])
  name = f'folder:{tmp_path}'
  data.check_dataset_available(name)
  ds = data.load_dataset(name)
  assert ds.name == name
  assert ds.class_names == ('ant', 'cat', 'dog')  # Sorted folder names.
  assert ds.num_classes == 3
  assert ds.train_images.shape == (9, 16, 16, 3)
  assert ds.test_images.shape == (6, 16, 16, 3)
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3, 3])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])
  _check_against_truth(ds, truth)
  assert sorted(os.listdir(tmp_path)) == ['test', 'train']  # Read only.


def test_folder_grayscale_becomes_rgb(tmp_path):
  _write_folder(str(tmp_path), sizes=[(8, 8)], mode='L')
  ds = data.load_dataset(f'folder:{tmp_path}')
  assert ds.image_shape == (8, 8, 3)
  np.testing.assert_array_equal(ds.train_images[..., 0],
                                ds.train_images[..., 2])


def test_folder_mixed_sizes_need_image_size(tmp_path):
  _write_folder(str(tmp_path), sizes=[(16, 16), (20, 12), (16, 16)])
  name = f'folder:{tmp_path}'
  with pytest.raises(ValueError) as info:
    data.load_dataset(name)
  assert 'image_size' in str(info.value)
  assert str(tmp_path) in str(info.value)
  assert '.png' in str(info.value)
  ds = data.load_dataset(name, image_size=16)
  assert ds.train_images.shape == (9, 16, 16, 3)
  assert ds.test_images.shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3, 3])


def test_folder_without_test_split_holds_out_stratified(tmp_path):
  truth = _write_folder(str(tmp_path), sizes=[(8, 8)],
                        per_class={'train': 10})
  name = f'folder:{tmp_path}'
  a = data.load_dataset(name, split_seed=0)
  b = data.load_dataset(name, split_seed=0)
  c = data.load_dataset(name, split_seed=1)
  assert a.train_images.shape[0] == 24 and a.test_images.shape[0] == 6
  np.testing.assert_array_equal(np.bincount(a.test_labels), [2, 2, 2])
  np.testing.assert_array_equal(a.test_images, b.test_images)
  assert not np.array_equal(a.test_images, c.test_images)
  for images, labels in ((a.train_images, a.train_labels),
                         (a.test_images, a.test_labels)):
    for image, label in zip(images, labels):
      assert truth[('train', image.tobytes())] == label
