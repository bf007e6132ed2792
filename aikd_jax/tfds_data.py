"""Reads CIFAR-10/100 from TensorFlow Datasets into NumPy.

A copy prepared as ArrayRecord (what `python -m aikd_jax.data` writes, and
what `tfds.testing.mock_data` fakes) is read with `tfds.data_source`, without
tf.data; a TFRecord copy (`tfds build`'s default) through tf.data. A missing
copy is downloaded only if its host answers now (see `reachability`).
"""

from __future__ import annotations

from collections.abc import Sequence
import importlib.util
import os
import time
from typing import Any

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from aikd_jax import data
from aikd_jax import reachability

# Where TFDS downloads each dataset from (`Cifar10._cifar_info.url` and
# `Cifar100._cifar_info.url` in TFDS); used only for the reachability check.
DOWNLOAD_URLS = {
  "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
  "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
}
_READ_BATCH = 4096


def check_available(name: str, data_dir: str | None, download: bool) -> None:
  """Raises DatasetUnavailableError now if `load` could not get the data."""
  if _probe(name, data_dir)[0] == "missing":
    _raise_if_unobtainable(name, data_dir, download)
    logging.info("%s is not prepared yet; load_dataset will download it.", name)


def load(name: str, data_dir: str | None, download: bool) -> data.Dataset:
  """Loads both splits, downloading and preparing them first if allowed."""
  state, found = _probe(name, data_dir)
  if state == "missing":
    _raise_if_unobtainable(name, data_dir, download)
    logging.info("Downloading and preparing %s (ArrayRecord)...", name)
    data.hide_accelerators_from_tensorflow()
    try:
      tfds.data_source(
        name,
        split="train",
        data_dir=data_dir,
        download=True,
        builder_kwargs={"file_format": "array_record"},
      )
    except Exception as e:  # pylint: disable=broad-except
      raise data.DatasetUnavailableError(
        _missing_message(name, data_dir, f"download failed: {e!r}")
      ) from e
    state, found = _probe(name, data_dir)
    if state == "missing":
      raise data.DatasetUnavailableError(
        _missing_message(
          name, data_dir, "TFDS reported success but nothing was prepared"
        )
      )
  if state == "sources":
    arrays = [
      _read_source(name, split, source)
      for split, source in zip(("train", eval_split(name, data_dir)), found)
    ]
  else:
    splits = ("train", eval_split(name, data_dir))
    arrays = [_read_tfrecord(found, split) for split in splits]
  label_feature = tfds.builder(name, data_dir=data_dir).info.features["label"]
  (train_images, train_labels), (test_images, test_labels) = arrays
  return data.Dataset(
    name=name,
    train_images=train_images,
    train_labels=train_labels,
    test_images=test_images,
    test_labels=test_labels,
    num_classes=int(label_feature.num_classes),
    class_names=tuple(label_feature.names),
  )


def eval_split(name: str, data_dir: str | None) -> str:
  """'test', or 'validation' for a dataset without a test split (ImageNet)."""
  splits = tfds.builder(name, data_dir=data_dir).info.splits
  return (
    "validation" if "test" not in splits and "validation" in splits else "test"
  )


def _probe(name: str, data_dir: str | None) -> tuple[str, Any]:
  """('sources', [train, test]), ('tfrecord', builder) or ('missing', builder).

  Data sources are tried first because they are what `tfds.testing.mock_data`
  fakes (its builder is never "prepared"). Reads no examples.
  """
  try:
    return "sources", list(
      tfds.data_source(
        name,
        split=["train", eval_split(name, data_dir)],
        data_dir=data_dir,
        download=False,
      )
    )
  except Exception as e:  # pylint: disable=broad-except
    # TFDS reports a missing dataset as NotImplementedError (no random
    # access for its default TFRecord format) or KeyError (no splits);
    # the builder says what really happened.
    first_error = e
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    return "missing", builder
  if builder.info.file_format in tfds.core.FileFormat.with_random_access():
    raise first_error  # Prepared and readable: the failure is something else.
  return "tfrecord", builder


def _read_source(
  name: str, split: str, source: Sequence[Any]
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a `tfds.data_source` split, _READ_BATCH examples at a time."""
  start_time = time.monotonic()
  n = len(source)
  images = labels = None
  for start in range(0, n, _READ_BATCH):
    keys = list(range(start, min(start + _READ_BATCH, n)))
    try:
      batch = source.__getitems__(keys)  # About 2x faster than one by one.
    except TypeError:  # tfds.testing.mock_data's source breaks __getitems__.
      batch = [source[k] for k in keys]
    if images is None:
      images = np.empty((n,) + np.shape(batch[0]["image"]), np.uint8)
      labels = np.empty((n,), np.int32)
    for i, example in zip(keys, batch):
      images[i] = example["image"]
      labels[i] = example["label"]
  if images is None:
    raise data.DatasetUnavailableError("The split is empty.")
  logging.info(
    "Read %s/%s: %d examples in %.2f s (data source).",
    name,
    split,
    n,
    time.monotonic() - start_time,
  )
  return images, labels


def _read_tfrecord(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split prepared as TFRecord (no random access) through tf.data."""
  # The one fallback: data sources cannot read TFRecord, `tfds build`'s default.
  data.hide_accelerators_from_tensorflow()
  logging.warning(
    "%s is prepared as TFRecord in %s; reading it through tf.data. "
    "Preparing it with --file_format=array_record avoids TensorFlow.",
    builder.name,
    builder.data_dir,
  )
  start = time.monotonic()
  batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = np.asarray(batch["image"], np.uint8)
  labels = np.asarray(batch["label"]).astype(np.int32)
  logging.info(
    "Read %s/%s: %d examples in %.2f s (tf.data).",
    builder.name,
    split,
    len(labels),
    time.monotonic() - start,
  )
  return images, labels


def _raise_if_unobtainable(
  name: str, data_dir: str | None, download: bool
) -> None:
  """For a dataset not prepared locally: fail now unless it can be fetched."""
  reason = _download_blocker(name) if download else "download=False"
  if reason:
    raise data.DatasetUnavailableError(_missing_message(name, data_dir, reason))


def _download_blocker(name: str) -> str | None:
  """Why TFDS cannot download `name` now, or None if it should be able to."""
  url = DOWNLOAD_URLS.get(name)
  reason = reachability.unreachable_reason(url) if url else None
  if reason:
    return reason
  if importlib.util.find_spec("tensorflow") is None:
    # Preparing (`tfds build`) runs TensorFlow; reading a prepared
    # ArrayRecord copy does not, so it is an optional extra.
    return (
      "preparing a TFDS dataset needs TensorFlow: "
      'pip install -e ".[tfds-prepare]"'
    )
  if importlib.util.find_spec("importlib_resources") is None:
    # TFDS imports it unconditionally when preparing a dataset but declares
    # it only for Python < 3.9 (tensorflow/datasets#11212).
    return (
      "TFDS needs the importlib_resources package to download: "
      "pip install importlib_resources"
    )
  return None


def _missing_message(name: str, data_dir: str | None, reason: str) -> str:
  where = _tfds_location(name, data_dir)
  return (
    f"Dataset {name!r} is not prepared in {where} and cannot be downloaded "
    f"now ({reason}). To provide it, either:\n"
    "  * set TFDS_DATA_DIR (or --config.data_dir) to a directory that holds "
    f"a prepared copy (DIR/{name}/<version>/...);\n"
    "  * or, on a machine with internet access, run "
    f"`python -m aikd_jax.data --dataset={name} --data_dir=DIR` (or "
    f"`tfds build {name} --data_dir=DIR --file_format=array_record`, which "
    "needs apache-beam installed) and copy DIR to this machine;\n"
    "  * or train on your own images with "
    f"--config.dataset={data.FOLDER_PREFIX}/path/to/root, laid out as "
    "root/train/<class>/*.png and root/test/<class>/*.png."
  )


def _tfds_location(name: str, data_dir: str | None) -> str:
  try:
    return str(tfds.builder(name, data_dir=data_dir).data_dir)
  except Exception:  # pylint: disable=broad-except
    return data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")
