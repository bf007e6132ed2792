"""Tests for aikd_jax.tfds_data. No network: TFDS is mocked or built locally."""

import contextlib
import importlib.resources
import importlib.util
import os
import sys
import time
from unittest import mock

import e2e_util as u
import numpy as np
import pytest
import tensorflow_datasets as tfds

from aikd_jax import data
from aikd_jax import reachability
from aikd_jax import tfds_data


@pytest.fixture
def offline(monkeypatch):
  """Every connectivity check fails, so nothing can ever be downloaded."""
  calls = []

  def no_connection(host, port, timeout):
    calls.append((host, port, timeout))
    return False

  monkeypatch.setattr(reachability, "can_connect", no_connection)
  return calls


# ---------------------------------------------------------------------------
# TFDS, mocked (tfds.testing.mock_data fakes tfds.data_source).


@pytest.mark.parametrize(
  "name,num_classes", [("cifar100", 100), ("cifar10", 10)]
)
def test_cifar_through_mocked_tfds(tmp_path, name, num_classes):
  with tfds.testing.mock_data(
    num_examples=12, policy=tfds.testing.MockPolicy.USE_CODE
  ):
    data.check_dataset_available(name, data_dir=str(tmp_path))
    ds = data.load_dataset(name, data_dir=str(tmp_path))
  assert ds.name == name
  assert ds.num_classes == num_classes
  assert len(ds.class_names) == num_classes
  for images, labels in (
    (ds.train_images, ds.train_labels),
    (ds.test_images, ds.test_labels),
  ):
    assert images.shape == (12, 32, 32, 3)
    assert images.dtype == np.uint8
    assert labels.shape == (12,)
    assert labels.dtype == np.int32
    assert labels.min() >= 0 and labels.max() < num_classes
  assert ds.train_images.std() > 10  # Random pixels, not zeros.


# ---------------------------------------------------------------------------
# TFDS, really prepared on disk: TFDS's own CIFAR-10 builder run on fake
# CIFAR-10 binary files, so the real ArrayRecord and TFRecord readers are used.


def _fake_cifar10_batches(root, num_train, num_test):
  """Writes CIFAR-10 binary batches; pixel (0, 0) encodes split and index."""
  rng = np.random.default_rng(0)
  folder = os.path.join(root, "cifar-10-batches-bin")
  os.makedirs(folder)
  truth = {}
  files = {
    "train": ["data_batch_%d.bin" % i for i in range(1, 6)],
    "test": ["test_batch.bin"],
  }
  for split, n in (("train", num_train), ("test", num_test)):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = 0 if split == "train" else 1
    images[:, 0, 0, 1] = np.arange(n)
    labels = rng.integers(0, 10, n).astype(np.uint8)
    truth[split] = (images, labels)
    records = np.concatenate(
      [labels[:, None], images.transpose(0, 3, 1, 2).reshape(n, -1)], axis=1
    )
    for i, chunk in enumerate(np.array_split(records, len(files[split]))):
      chunk.tofile(os.path.join(folder, files[split][i]))
  with open(os.path.join(folder, "batches.meta.txt"), "w") as f:
    f.write("\n".join(f"class_{i}" for i in range(10)))
  return truth


@contextlib.contextmanager
def _tfds_preparable_offline(raw_dir):
  """Lets TFDS prepare cifar10 from `raw_dir`, with no network access."""
  # TFDS 4.9.10 needs importlib_resources to prepare a dataset but does not
  # declare it (tensorflow/datasets#11212); the standard library's
  # importlib.resources does the same job here.
  stub = importlib.util.find_spec("importlib_resources") is None
  if stub:
    sys.modules["importlib_resources"] = importlib.resources
  try:
    with mock.patch.object(
      tfds.download.DownloadManager,
      "download_and_extract",
      lambda self, url: raw_dir,
    ):
      yield
  finally:
    if stub:
      sys.modules.pop("importlib_resources", None)


@pytest.fixture(scope="module")
def prepared_cifar10(tmp_path_factory):
  """{'array_record': data_dir, 'tfrecord': data_dir}, plus the true data."""
  # Preparing runs TensorFlow, the [tfds-prepare] extra (CI installs it).
  pytest.importorskip("tensorflow")
  root = tmp_path_factory.mktemp("cifar10")
  raw_dir = str(root / "raw")
  truth = _fake_cifar10_batches(raw_dir, num_train=40, num_test=10)
  dirs = {}
  with _tfds_preparable_offline(raw_dir):
    for file_format in ("array_record", "tfrecord"):
      data_dir = str(root / file_format)
      builder = tfds.builder(
        "cifar10", data_dir=data_dir, file_format=file_format
      )
      builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False)
      )
      dirs[file_format] = data_dir
  return dirs, truth


def _assert_matches_truth(ds, truth):
  for split, images, labels in (
    ("train", ds.train_images, ds.train_labels),
    ("test", ds.test_images, ds.test_labels),
  ):
    true_images, true_labels = truth[split]
    assert images.shape == true_images.shape
    assert labels.dtype == np.int32 and images.dtype == np.uint8
    assert (images[:, 0, 0, 0] == (0 if split == "train" else 1)).all()
    index = images[:, 0, 0, 1]
    np.testing.assert_array_equal(np.sort(index), np.arange(len(index)))
    np.testing.assert_array_equal(images, true_images[index])
    np.testing.assert_array_equal(labels, true_labels[index])


@pytest.mark.parametrize("file_format", ["array_record", "tfrecord"])
def test_prepared_cifar10_round_trips_exactly(
  prepared_cifar10, offline, file_format
):
  dirs, truth = prepared_cifar10
  data.check_dataset_available("cifar10", data_dir=dirs[file_format])
  ds = data.load_dataset("cifar10", data_dir=dirs[file_format])
  _assert_matches_truth(ds, truth)
  assert ds.num_classes == 10
  assert ds.class_names == tuple(f"class_{i}" for i in range(10))
  assert not offline  # Prepared data needs no connectivity check.


def test_prepared_cifar10_read_in_several_batches(
  prepared_cifar10, monkeypatch
):
  dirs, truth = prepared_cifar10
  monkeypatch.setattr(tfds_data, "_READ_BATCH", 16)  # 40 train: 3 batches.
  _assert_matches_truth(
    data.load_dataset("cifar10", data_dir=dirs["array_record"]), truth
  )


def test_command_line_prepares_and_summarises(prepared_cifar10):
  """`python -m aikd_jax.data` (documented in the README) still runs."""
  dirs, _ = prepared_cifar10
  proc = u.run_module(
    "aikd_jax.data",
    "--dataset=cifar10",
    f"--data_dir={dirs['array_record']}",
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "cifar10: train (40, 32, 32, 3), test (10, 32, 32, 3)" in proc.stdout


# ---------------------------------------------------------------------------
# Missing data fails fast, with instructions.


def _assert_helpful(message):
  assert "TFDS_DATA_DIR" in message
  assert "tfds build" in message
  assert "folder:" in message


@pytest.mark.parametrize("download", [True, False])
def test_missing_tfds_dataset_fails_fast(tmp_path, offline, download):
  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_dataset("cifar100", data_dir=str(tmp_path), download=download)
  assert time.monotonic() - start < 10
  _assert_helpful(str(info.value))
  assert str(tmp_path) in str(info.value)
  if download:
    assert offline == [
      ("www.cs.toronto.edu", 443, reachability.CONNECT_TIMEOUT_S)
    ]
    assert "offline" in str(info.value)
  else:
    assert not offline
    assert "download=False" in str(info.value)
  assert os.listdir(tmp_path) == []  # Nothing written.

  start = time.monotonic()
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available(
      "cifar100", data_dir=str(tmp_path), download=download
    )
  assert time.monotonic() - start < 10
  _assert_helpful(str(info.value))


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_download_hosts_match_tfds(name):
  builder_cls = tfds.builder_cls(name)
  url = builder_cls._cifar_info.fget(builder_cls).url
  assert url == tfds_data.DOWNLOAD_URLS[name]


def test_download_without_tensorflow_names_the_extra(tmp_path, monkeypatch):
  monkeypatch.setattr(reachability, "unreachable_reason", lambda url: None)
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util,
    "find_spec",
    lambda name, *a: None if name == "tensorflow" else real_find_spec(name, *a),
  )
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available("cifar100", str(tmp_path), download=True)
  assert 'pip install -e ".[tfds-prepare]"' in str(info.value)
  _assert_helpful(str(info.value))
  assert os.listdir(tmp_path) == []
