"""Loads a whole image-classification dataset into host memory as NumPy.

The trainer places the full dataset on the accelerators and augments it
there, so loading only has to produce uint8 images and int32 labels quickly,
or fail fast with a message that says how to provide the data. This module
names the datasets and dispatches; each source has its own module:

* ``'digits'``: scikit-learn's bundled 8x8 digits (no download), here.
* ``'cifar10'``, ``'cifar100'``: TensorFlow Datasets (`tfds_data`), which
  fails within seconds offline (`reachability`) instead of retrying.
* ``'tfds:NAME'``: any TFDS image-classification dataset (features
  'image' and 'label'), e.g. tfds:imagenet2012 (streamed: see streaming).
* ``'folder:/path/to/root'``: your own class folders (`folder_data`), read
  with Pillow: no TensorFlow needed.

`python -m aikd_jax.data --dataset=cifar100 --data_dir=DIR` prepares a TFDS
dataset, e.g. on a connected machine, for copying to one that is not.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import os
import time

from absl import logging
import numpy as np

KNOWN_DATASETS = ("digits", "cifar10", "cifar100")
FOLDER_PREFIX = "folder:"
TFDS_PREFIX = "tfds:"

# The source modules import this one (for Dataset and the error), so they are
# imported where used; that also keeps TFDS out of `import aikd_jax.data`.


class DatasetUnavailableError(RuntimeError):
  """The dataset is not on this machine and cannot be fetched now."""


@dataclasses.dataclass(frozen=True)
class Dataset:
  """A whole dataset in host memory.

  Attributes:
    name: the name it was loaded under (e.g. 'cifar100', 'folder:/data/x').
    train_images: uint8 [N, H, W, C].
    train_labels: int32 [N], in [0, num_classes).
    test_images: uint8 [M, H, W, C].
    test_labels: int32 [M], in [0, num_classes).
    num_classes: number of classes.
    class_names: the name of each class, indexed by label, when known.
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  class_names: tuple[str, ...] | None = None

  def __post_init__(self):
    for split, images, labels in (
      ("train", self.train_images, self.train_labels),
      ("test", self.test_images, self.test_labels),
    ):
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
          f"{self.name}: {split} images must be uint8 [N, H, W, C], got "
          f"{images.dtype} {images.shape}."
        )
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
          f"{self.name}: {split} labels must be int32 [{images.shape[0]}], "
          f"got {labels.dtype} {labels.shape}."
        )
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(
          f"{self.name}: {split} labels span [{labels.min()}, "
          f"{labels.max()}], outside [0, {self.num_classes})."
        )
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(
        f"{self.name}: train images are {self.train_images.shape[1:]} but "
        f"test images are {self.test_images.shape[1:]}."
      )
    names = self.class_names
    if names is not None and len(names) != self.num_classes:
      raise ValueError(
        f"{self.name}: {len(names)} class names for {self.num_classes} classes."
      )

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(self.train_images.shape[1:])

  @property
  def num_train(self) -> int:
    return self.train_images.shape[0]

  @property
  def num_test(self) -> int:
    return self.test_images.shape[0]


def check_dataset_available(
  name: str, data_dir: str | None = None, *, download: bool = True
) -> None:
  """Checks, without loading anything, that `load_dataset` can succeed.

  Meant to run before any model is built. Takes well under a second when the
  data is present, and at most a few seconds (the connectivity check) when a
  TFDS dataset would have to be downloaded.

  Args:
    name: a dataset name (see `KNOWN_DATASETS`) or 'folder:/path'.
    data_dir: TFDS data directory; None means TFDS's default
      (the TFDS_DATA_DIR environment variable, else ~/tensorflow_datasets).
    download: whether `load_dataset` will be allowed to download.

  Raises:
    ValueError: the name is unknown or malformed.
    DatasetUnavailableError: the data is missing and cannot be fetched.
  """
  kind, arg = _parse_name(name)
  if kind == "folder":
    from aikd_jax import folder_data  # pylint: disable=g-import-not-at-top

    folder_data.check_layout(arg)
  elif kind == "tfds":
    from aikd_jax import tfds_data  # pylint: disable=g-import-not-at-top

    tfds_data.check_available(arg, data_dir, download)


def load_dataset(
  name: str,
  data_dir: str | None = None,
  *,
  download: bool = True,
  split_seed: int = 0,
  image_size: int | None = None,
) -> Dataset:
  """Loads a whole dataset into host memory.

  Args:
    name: 'digits', 'cifar10', 'cifar100' or 'folder:/path/to/root'.
    data_dir: TFDS data directory; None means TFDS's default (TFDS_DATA_DIR,
      else ~/tensorflow_datasets). Ignored by 'digits' and 'folder:'.
    download: let TFDS download and prepare a missing dataset (only after a
      quick connectivity check passes).
    split_seed: seed of the stratified train/test split, for datasets that
      have no test split of their own ('digits'; a folder without 'test').
    image_size: resize every image to image_size x image_size (bilinear,
      antialiased). Required for a folder whose images differ in size.

  Returns:
    The dataset, uint8 images and int32 labels.

  Raises:
    ValueError: unknown name, or images of different sizes and no image_size.
    DatasetUnavailableError: the data is missing and cannot be fetched.
  """
  from aikd_jax import folder_data  # pylint: disable=g-import-not-at-top

  kind, arg = _parse_name(name)
  if image_size is not None and image_size <= 0:
    raise ValueError(f"image_size must be positive, got {image_size}.")
  start = time.monotonic()
  if kind == "digits":
    dataset = _load_digits(split_seed)
  elif kind == "folder":
    dataset = folder_data.load(name, arg, split_seed, image_size)
  else:
    from aikd_jax import tfds_data  # pylint: disable=g-import-not-at-top

    dataset = tfds_data.load(arg, data_dir, download)
  if image_size is not None and dataset.image_shape[:2] != (image_size,) * 2:
    dataset = dataclasses.replace(
      dataset,
      train_images=folder_data.resize_all(dataset.train_images, image_size),
      test_images=folder_data.resize_all(dataset.test_images, image_size),
    )
  logging.info(
    "Loaded %s: %d train + %d test images of shape %s, %d classes, in %.2f s.",
    dataset.name,
    dataset.num_train,
    dataset.num_test,
    dataset.image_shape,
    dataset.num_classes,
    time.monotonic() - start,
  )
  return dataset


def channel_stats(
  images: np.ndarray,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and standard deviation of uint8 images scaled to [0, 1].

  The standard deviation is over all pixels of the set (ddof=0). Note that
  the CIFAR std usually quoted, (0.2023, 0.1994, 0.2010), is not this figure
  (it is about (0.247, 0.243, 0.261) for CIFAR-10).

  Args:
    images: uint8 [..., C].

  Returns:
    (mean, std), each a tuple of C floats.
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"channel_stats expects uint8 images, got {images.dtype}.")
  flat = images.reshape(-1, images.shape[-1])
  if not flat.shape[0]:
    raise ValueError("channel_stats needs at least one pixel.")
  # A histogram per channel gives exact sums (no float round-off) without
  # materialising a wider copy of the images.
  levels = np.arange(256, dtype=np.float64)
  mean, std = [], []
  for c in range(flat.shape[1]):
    channel = np.ascontiguousarray(flat[:, c])  # bincount is slow on strides.
    counts = np.bincount(channel, minlength=256).astype(np.float64)
    n = counts.sum()
    m = counts @ levels / n
    var = max(counts @ (levels - m) ** 2 / n, 0.0)
    mean.append(float(m / 255.0))
    std.append(float(np.sqrt(var) / 255.0))
  return tuple(mean), tuple(std)


def hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow (used only by TFDS) off GPUs and TPUs; imports it if
  installed, and does nothing if not."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return

  for kind in ("GPU", "TPU"):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # TF already initialised its devices, or has none of this kind.


def _parse_name(name: str) -> tuple[str, str]:
  """Returns ('digits', ''), ('tfds', name) or ('folder', path)."""
  if not isinstance(name, str):
    raise ValueError(f"Dataset name must be a string, got {name!r}.")
  if name.startswith(FOLDER_PREFIX):
    path = name[len(FOLDER_PREFIX) :].strip()
    if not path:
      raise ValueError(
        f"{name!r}: the folder: syntax needs a path, e.g. folder:/data/pets."
      )
    return "folder", os.path.abspath(os.path.expanduser(path))
  if name == "digits":
    return "digits", ""
  if name.startswith(TFDS_PREFIX):
    tfds_name = name[len(TFDS_PREFIX) :].strip()
    if not tfds_name:
      raise ValueError(
        f"{name!r}: the tfds: syntax needs a name, e.g. tfds:mnist."
      )
    return "tfds", tfds_name
  if name in KNOWN_DATASETS:
    return "tfds", name
  raise ValueError(
    f"Unknown dataset {name!r}. Known datasets: {', '.join(KNOWN_DATASETS)};"
    " or folder:/path/to/root with root/train/<class>/<image> (and "
    "optionally root/test/<class>/<image>)."
  )


def _load_digits(split_seed: int) -> Dataset:
  """Scaled to 0..255 and split 80/20, stratified and seeded."""
  from sklearn import datasets as sk_datasets

  from aikd_jax import folder_data  # pylint: disable=g-import-not-at-top

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = folder_data.stratified_split(
    labels, folder_data.TEST_FRACTION, split_seed
  )
  return Dataset(
    name="digits",
    train_images=images[train],
    train_labels=labels[train],
    test_images=images[test],
    test_labels=labels[test],
    num_classes=10,
    class_names=tuple(str(c) for c in range(10)),
  )


# ---------------------------------------------------------------------------
# Command line: prepare (download) a dataset, e.g. on a connected machine.


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  dataset = load_dataset(
    flags.FLAGS.dataset, flags.FLAGS.data_dir, download=True
  )
  mean, std = channel_stats(dataset.train_images)
  print(
    f"{dataset.name}: train {dataset.train_images.shape}, test "
    f"{dataset.test_images.shape}, {dataset.num_classes} classes; "
    f"channel mean {np.round(mean, 4).tolist()}, "
    f"std {np.round(std, 4).tolist()}"
  )


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  absl_flags.DEFINE_string("dataset", "cifar100", "Dataset name.")
  absl_flags.DEFINE_string("data_dir", None, "TFDS data directory.")
  app.run(main)
