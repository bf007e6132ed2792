"""Tests for aikd_jax.data. No network: TFDS data is mocked or built locally."""

import contextlib
import importlib.resources
import importlib.util
import os
import sys
import time
from unittest import mock

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from aikd_jax import data


@pytest.fixture
def offline(monkeypatch):
  """Every connectivity check fails, so nothing can ever be downloaded."""
  calls = []

  def no_connection(host, port, timeout):
    calls.append((host, port, timeout))
    return False

  monkeypatch.setattr(data, '_can_connect', no_connection)
  return calls


# ---------------------------------------------------------------------------
# digits


def test_digits_shapes_dtypes_and_values():
  ds = data.load_dataset('digits')
  assert ds.name == 'digits'
  assert ds.num_classes == 10
  assert ds.class_names == tuple('0123456789')
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
  ds = data.load_dataset('digits')
  train_counts = np.bincount(ds.train_labels, minlength=10)
  test_counts = np.bincount(ds.test_labels, minlength=10)
  total = train_counts + test_counts
  # Each class sends round(20%) of its examples to test.
  np.testing.assert_array_equal(test_counts, np.round(total * 0.2))
  np.testing.assert_allclose(
      test_counts / test_counts.sum(), total / total.sum(), atol=0.01
  )


def test_digits_split_is_seeded_and_ignores_global_state():
  a = data.load_dataset('digits', split_seed=0)
  np.random.seed(123)  # Global NumPy state must not matter.
  np.random.rand(10)
  b = data.load_dataset('digits', split_seed=0)
  c = data.load_dataset('digits', split_seed=1)
  np.testing.assert_array_equal(a.train_images, b.train_images)
  np.testing.assert_array_equal(a.test_labels, b.test_labels)
  assert a.test_images.shape == c.test_images.shape
  assert not np.array_equal(a.test_images, c.test_images)
  # A split, not a resampling: train and test together are the whole set.
  whole = np.concatenate([c.train_images, c.test_images]).reshape(1797, -1)
  ref = np.concatenate([a.train_images, a.test_images]).reshape(1797, -1)
  np.testing.assert_array_equal(np.sort(whole, axis=0), np.sort(ref, axis=0))


def test_digits_resize_with_image_size():
  ds = data.load_dataset('digits', image_size=16)
  assert ds.image_shape == (16, 16, 1)
  assert ds.test_images.shape[1:] == (16, 16, 1)
  assert ds.train_images.dtype == np.uint8


# ---------------------------------------------------------------------------
# TFDS, mocked (tfds.testing.mock_data fakes tfds.data_source).


@pytest.mark.parametrize('name,num_classes', [('cifar100', 100),
                                              ('cifar10', 10)])
def test_cifar_through_mocked_tfds(tmp_path, name, num_classes):
  with tfds.testing.mock_data(
      num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    data.check_dataset_available(name, data_dir=str(tmp_path))
    ds = data.load_dataset(name, data_dir=str(tmp_path))
  assert ds.name == name
  assert ds.num_classes == num_classes
  assert len(ds.class_names) == num_classes
  for images, labels in ((ds.train_images, ds.train_labels),
                         (ds.test_images, ds.test_labels)):
    assert images.shape == (12, 32, 32, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (12,)
    assert labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < num_classes
  assert ds.train_images.std() > 10  # Random pixels, not zeros.


def test_mocked_tfds_generic_decoding_route(tmp_path, monkeypatch):
  """TFDS's own decoding is used when the records are not tf.Examples."""

  def not_serialized(source, info):
    raise data._NotSerializedExamples('forced by the test')

  monkeypatch.setattr(data, '_read_serialized_examples', not_serialized)
  with tfds.testing.mock_data(
      num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    ds = data.load_dataset('cifar100', data_dir=str(tmp_path))
  assert ds.train_images.shape == (5, 32, 32, 3)
  assert ds.train_images.dtype == np.uint8
  assert ds.train_labels.dtype == np.int32
  assert ds.train_labels.max() < 100


# ---------------------------------------------------------------------------
# TFDS, really prepared on disk: TFDS's own CIFAR-10 builder run on fake
# CIFAR-10 binary files, so the real ArrayRecord and TFRecord readers are used.


def _fake_cifar10_batches(root, num_train, num_test):
  """Writes CIFAR-10 binary batches; pixel (0, 0) encodes split and index."""
  rng = np.random.default_rng(0)
  folder = os.path.join(root, 'cifar-10-batches-bin')
  os.makedirs(folder)
  truth = {}
  files = {'train': ['data_batch_%d.bin' % i for i in range(1, 6)],
           'test': ['test_batch.bin']}
  for split, n in (('train', num_train), ('test', num_test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = 0 if split == 'train' else 1
    images[:, 0, 0, 1] = np.arange(n)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    truth[split] = (images, labels)
    records = np.concatenate(
        [labels[:, None], images.transpose(0, 3, 1, 2).reshape(n, -1)], axis=1)
    for i, chunk in enumerate(np.array_split(records, len(files[split]))):
      chunk.tofile(os.path.join(folder, files[split][i]))
  with open(os.path.join(folder, 'batches.meta.txt'), 'w') as f:
    f.write('\n'.join(f'class_{i}' for i in range(10)))
  return truth


@contextlib.contextmanager
def _tfds_preparable_offline(raw_dir):
  """Lets TFDS prepare cifar10 from `raw_dir`, with no network access."""
  # TFDS 4.9.10 needs importlib_resources to prepare a dataset but does not
  # declare it (tensorflow/datasets#11212); the standard library's
  # importlib.resources does the same job here.
  stub = importlib.util.find_spec('importlib_resources') is None
  if stub:
    sys.modules['importlib_resources'] = importlib.resources
  try:
    with mock.patch.object(tfds.download.DownloadManager,
                           'download_and_extract', lambda self, url: raw_dir):
      yield
  finally:
    if stub:
      sys.modules.pop('importlib_resources', None)


@pytest.fixture(scope='module')
def prepared_cifar10(tmp_path_factory):
  """{'array_record': data_dir, 'tfrecord': data_dir}, plus the true data."""
  root = tmp_path_factory.mktemp('cifar10')
  raw_dir = str(root / 'raw')
  truth = _fake_cifar10_batches(raw_dir, num_train=40, num_test=10)
  dirs = {}
  with _tfds_preparable_offline(raw_dir):
    for file_format in ('array_record', 'tfrecord'):
      data_dir = str(root / file_format)
      builder = tfds.builder('cifar10', data_dir=data_dir,
                             file_format=file_format)
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False))
      dirs[file_format] = data_dir
  return dirs, truth


def _assert_matches_truth(ds, truth):
  for split, images, labels in (('train', ds.train_images, ds.train_labels),
                                ('test', ds.test_images, ds.test_labels)):
    true_images, true_labels = truth[split]
    assert images.shape == true_images.shape
    assert labels.dtype == np.int32 and images.dtype == np.uint8
    assert (images[:, 0, 0, 0] == (0 if split == 'train' else 1)).all()
    index = images[:, 0, 0, 1]
    np.testing.assert_array_equal(np.sort(index), np.arange(len(index)))
    np.testing.assert_array_equal(images, true_images[index])
    np.testing.assert_array_equal(labels, true_labels[index])


@pytest.mark.parametrize('file_format', ['array_record', 'tfrecord'])
def test_prepared_cifar10_round_trips_exactly(prepared_cifar10, offline,
                                              file_format):
  dirs, truth = prepared_cifar10
  data.check_dataset_available('cifar10', data_dir=dirs[file_format])
  ds = data.load_dataset('cifar10', data_dir=dirs[file_format])
  _assert_matches_truth(ds, truth)
  assert ds.num_classes == 10
  assert ds.class_names == tuple(f'class_{i}' for i in range(10))
  assert not offline  # Prepared data needs no connectivity check.


def test_prepared_cifar10_generic_decoding_matches(prepared_cifar10,
                                                   monkeypatch):
  dirs, truth = prepared_cifar10
  monkeypatch.setattr(data, '_READ_BATCH', 16)  # Several batches.

  def not_serialized(source, info):
    raise data._NotSerializedExamples('forced by the test')

  fast = data.load_dataset('cifar10', data_dir=dirs['array_record'])
  monkeypatch.setattr(data, '_read_serialized_examples', not_serialized)
  generic = data.load_dataset('cifar10', data_dir=dirs['array_record'])
  np.testing.assert_array_equal(fast.train_images, generic.train_images)
  np.testing.assert_array_equal(fast.train_labels, generic.train_labels)
  _assert_matches_truth(generic, truth)


# ---------------------------------------------------------------------------
# Missing data fails fast, with instructions.


def _assert_helpful(message):
  assert 'TFDS_DATA_DIR' in message
  assert 'tfds build' in message
  assert 'folder:' in message


@pytest.mark.parametrize('download', [True, False])
def test_missing_tfds_dataset_fails_fast(tmp_path, offline, download):
  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_dataset('cifar100', data_dir=str(tmp_path), download=download)
  assert time.monotonic() - start < 10
  _assert_helpful(str(info.value))
  assert str(tmp_path) in str(info.value)
  if download:
    assert offline == [('www.cs.toronto.edu', 443, data._CONNECT_TIMEOUT_S)]
    assert 'offline' in str(info.value)
  else:
    assert not offline
    assert 'download=False' in str(info.value)
  assert os.listdir(tmp_path) == []  # Nothing written.

  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available('cifar100', data_dir=str(tmp_path),
                                 download=download)
  assert time.monotonic() - start < 10
  _assert_helpful(str(info.value))


def test_connectivity_check_is_bounded():
  # 192.0.2.0/24 is TEST-NET-1: never routed, so a connect there hangs.
  for host in ('192.0.2.1', 'host.invalid'):
    start = time.monotonic()
    assert not data._can_connect(host, 443, timeout=0.5)
    assert time.monotonic() - start < 2


def test_connection_target_honours_proxy(monkeypatch):
  url = data._DOWNLOAD_URLS['cifar100']
  for var in ('https_proxy', 'HTTPS_PROXY', 'no_proxy', 'NO_PROXY'):
    monkeypatch.delenv(var, raising=False)
  assert data._connection_target(url) == ('www.cs.toronto.edu', 443)
  monkeypatch.setenv('https_proxy', 'http://proxy.example:3128')
  assert data._connection_target(url) == ('proxy.example', 3128)


@pytest.mark.parametrize('name', ['cifar10', 'cifar100'])
def test_download_hosts_match_tfds(name):
  builder_cls = tfds.builder_cls(name)
  url = builder_cls._cifar_info.fget(builder_cls).url
  assert url == data._DOWNLOAD_URLS[name]


def test_unknown_names_raise_value_error():
  for name in ('imagenet', 'CIFAR100', 'cifar-100', '', 'folder:', 'folder: '):
    with pytest.raises(ValueError) as info:
      data.load_dataset(name)
    assert 'folder:' in str(info.value)
    with pytest.raises(ValueError):
      data.check_dataset_available(name)


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


# ---------------------------------------------------------------------------
# folder:/path


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


# ---------------------------------------------------------------------------
# channel_stats and Dataset checks.


def test_channel_stats_by_hand():
  images = np.zeros((2, 1, 2, 3), np.uint8)
  images[..., 0] = 255                       # constant 1.0
  images[0, 0, :, 1] = [0, 255]              # 0, 1, 0, 1 -> mean .5, std .5
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
  ok = data.Dataset('x', images, labels, images, labels, num_classes=3)
  assert ok.image_shape == (2, 2, 1)
  with pytest.raises(ValueError):
    data.Dataset('x', images, labels.astype(np.int64), images, labels, 3)
  with pytest.raises(ValueError):
    data.Dataset('x', images, labels, images, labels, num_classes=2)
  with pytest.raises(ValueError):
    data.Dataset('x', images.astype(np.float32), labels, images, labels, 3)
