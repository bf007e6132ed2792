"""Loads a whole image-classification dataset into host memory as NumPy.

The trainer places the full dataset on the accelerators and augments it
there, so this module only has to produce uint8 images and int32 labels
quickly, or fail fast with a message that says how to provide the data.

Dataset names:

* ``'digits'``: scikit-learn's bundled 8x8 digits (no download), scaled to
  0..255 and split 80/20, stratified and seeded by ``split_seed``.
* ``'cifar10'``, ``'cifar100'``: TensorFlow Datasets, read through
  ``tfds.data_source`` (ArrayRecord files; no ``tf.data`` needed). A copy
  prepared in the TFRecord format (the default of ``tfds build``) is read
  through ``tf.data`` instead.
* ``'folder:/path/to/root'``: ``root/<split>/<class>/<image>.{png,jpg,jpeg}``
  read with TFDS's ``ImageFolder``. Splits ``train`` and (optionally)
  ``test``; without ``test``, a stratified 20% of ``train`` (seeded by
  ``split_seed``) is held out. Images are always decoded to 3 channels (RGB;
  grayscale is replicated), which is ``ImageFolder``'s own convention. Labels
  are the indices of the sorted class-folder names.

Offline behaviour (measured with TFDS 4.9.10): when a dataset is not prepared
and ``download=True``, TFDS retries an unreachable host 10 times with
exponential back-off, which took 204 s for a DNS failure and can take much
longer behind a firewall that drops packets. So before asking TFDS to
download, this module opens one TCP connection to the download host (or to the
HTTPS proxy, when one is configured) with a 3 s limit, and raises
`DatasetUnavailableError` at once if that fails.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
import urllib.parse
import urllib.request

from absl import logging
import numpy as np

KNOWN_DATASETS = ('digits', 'cifar10', 'cifar100')
FOLDER_PREFIX = 'folder:'

# Where TFDS downloads each dataset from (`Cifar10._cifar_info.url` and
# `Cifar100._cifar_info.url` in TFDS); used only for the connectivity check.
_DOWNLOAD_URLS = {
    'cifar10': 'https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz',
    'cifar100': 'https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz',
}
_CONNECT_TIMEOUT_S = 3.0
_READ_BATCH = 4096
_TEST_FRACTION = 0.2
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')  # What ImageFolder reads.


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
        ('train', self.train_images, self.train_labels),
        ('test', self.test_images, self.test_labels),
    ):
      if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f'{self.name}: {split} images must be uint8 [N, H, W, C], got '
            f'{images.dtype} {images.shape}.'
        )
      if labels.dtype != np.int32 or labels.shape != images.shape[:1]:
        raise ValueError(
            f'{self.name}: {split} labels must be int32 [{images.shape[0]}], '
            f'got {labels.dtype} {labels.shape}.'
        )
      if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
        raise ValueError(
            f'{self.name}: {split} labels span [{labels.min()}, '
            f'{labels.max()}], outside [0, {self.num_classes}).'
        )
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise ValueError(
          f'{self.name}: train images are {self.train_images.shape[1:]} but '
          f'test images are {self.test_images.shape[1:]}.'
      )
    names = self.class_names
    if names is not None and len(names) != self.num_classes:
      raise ValueError(
          f'{self.name}: {len(names)} class names for '
          f'{self.num_classes} classes.'
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


# ---------------------------------------------------------------------------
# Public API.


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
  if kind == 'digits':
    return
  if kind == 'folder':
    _check_folder(arg)
    return
  state, _ = _probe_tfds(arg, data_dir)
  if state == 'missing':
    _raise_if_unobtainable(arg, data_dir, download)
    logging.info('%s is not prepared yet; load_dataset will download it.', arg)


def _raise_if_unobtainable(name: str, data_dir: str | None,
                           download: bool) -> None:
  """For a dataset not prepared locally: fail now unless it can be fetched."""
  reason = _download_blocker(name) if download else 'download=False'
  if reason:
    raise DatasetUnavailableError(_missing_message(name, data_dir, reason))


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
  kind, arg = _parse_name(name)
  if image_size is not None and image_size <= 0:
    raise ValueError(f'image_size must be positive, got {image_size}.')
  start = time.monotonic()
  if kind == 'digits':
    dataset = _load_digits(split_seed)
  elif kind == 'folder':
    dataset = _load_folder(name, arg, split_seed, image_size)
  else:
    dataset = _load_tfds(arg, data_dir, download)
  if image_size is not None and dataset.image_shape[:2] != (image_size,) * 2:
    dataset = dataclasses.replace(
        dataset,
        train_images=_resize_all(dataset.train_images, image_size),
        test_images=_resize_all(dataset.test_images, image_size),
    )
  logging.info(
      'Loaded %s: %d train + %d test images of shape %s, %d classes, in '
      '%.2f s.',
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
    raise ValueError(f'channel_stats expects uint8 images, got {images.dtype}.')
  flat = images.reshape(-1, images.shape[-1])
  if not flat.shape[0]:
    raise ValueError('channel_stats needs at least one pixel.')
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


# ---------------------------------------------------------------------------
# Names and splits.


def _parse_name(name: str) -> tuple[str, str]:
  """Returns ('digits', ''), ('tfds', name) or ('folder', path)."""
  if not isinstance(name, str):
    raise ValueError(f'Dataset name must be a string, got {name!r}.')
  if name.startswith(FOLDER_PREFIX):
    path = name[len(FOLDER_PREFIX):].strip()
    if not path:
      raise ValueError(
          f'{name!r}: the folder: syntax needs a path, e.g. folder:/data/pets.'
      )
    return 'folder', os.path.abspath(os.path.expanduser(path))
  if name == 'digits':
    return 'digits', ''
  if name in KNOWN_DATASETS:
    return 'tfds', name
  raise ValueError(
      f'Unknown dataset {name!r}. Known datasets: {", ".join(KNOWN_DATASETS)};'
      ' or folder:/path/to/root with root/train/<class>/<image> (and '
      'optionally root/test/<class>/<image>).'
  )


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
  """Sorted train and test indices; each class keeps its share in both."""
  rng = np.random.default_rng(seed)  # Independent of global NumPy state.
  train, test = [], []
  for label in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == label))
    num_test = int(round(len(members) * test_fraction))
    num_test = min(num_test, len(members) - 1)  # Keep one to train on.
    test.append(members[:num_test])
    train.append(members[num_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


# ---------------------------------------------------------------------------
# digits.


def _load_digits(split_seed: int) -> Dataset:
  from sklearn import datasets as sk_datasets

  digits = sk_datasets.load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train, test = _stratified_split(labels, _TEST_FRACTION, split_seed)
  return Dataset(
      name='digits',
      train_images=images[train],
      train_labels=labels[train],
      test_images=images[test],
      test_labels=labels[test],
      num_classes=10,
      class_names=tuple(str(c) for c in range(10)),
  )


# ---------------------------------------------------------------------------
# TFDS (cifar10, cifar100).


def _tfds():
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  return tfds


def _probe_tfds(name: str, data_dir: str | None) -> tuple[str, Any]:
  """Finds out, without reading examples, how to read a TFDS dataset.

  Returns:
    ('sources', [train_source, test_source]): random-access data sources;
    ('tfrecord', builder): prepared as TFRecord, readable through tf.data;
    ('missing', builder): not prepared in data_dir.
  """
  tfds = _tfds()
  try:
    # The data-source route is tried first because it is also what
    # `tfds.testing.mock_data` fakes (the builder there is never "prepared").
    sources = tfds.data_source(
        name, split=['train', 'test'], data_dir=data_dir, download=False
    )
    return 'sources', list(sources)
  except Exception as e:  # pylint: disable=broad-except
    # TFDS reports a missing dataset as NotImplementedError (no random
    # access for its default TFRecord format) or KeyError (no splits);
    # the builder says what really happened.
    first_error = e
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    return 'missing', builder
  if builder.info.file_format in tfds.core.FileFormat.with_random_access():
    raise first_error  # Prepared and readable: the failure is something else.
  return 'tfrecord', builder


def _load_tfds(name: str, data_dir: str | None, download: bool) -> Dataset:
  tfds = _tfds()
  state, found = _probe_tfds(name, data_dir)
  if state == 'missing':
    _raise_if_unobtainable(name, data_dir, download)
    logging.info('Downloading and preparing %s (ArrayRecord)...', name)
    try:
      tfds.data_source(
          name,
          split='train',
          data_dir=data_dir,
          download=True,
          builder_kwargs={'file_format': 'array_record'},
      )
    except Exception as e:  # pylint: disable=broad-except
      raise DatasetUnavailableError(
          _missing_message(name, data_dir, f'download failed: {e!r}')
      ) from e
    state, found = _probe_tfds(name, data_dir)
    if state == 'missing':
      raise DatasetUnavailableError(_missing_message(
          name, data_dir, 'TFDS reported success but nothing was prepared'))
  info = tfds.builder(name, data_dir=data_dir).info
  label_feature = info.features['label']
  arrays = {}
  for split in ('train', 'test'):
    if state == 'sources':
      arrays[split] = _read_data_source(name, data_dir, split, info)
    else:
      arrays[split] = _read_tfrecord(found, split)
  return Dataset(
      name=name,
      train_images=arrays['train'][0],
      train_labels=arrays['train'][1],
      test_images=arrays['test'][0],
      test_labels=arrays['test'][1],
      num_classes=int(label_feature.num_classes),
      class_names=tuple(label_feature.names),
  )


def _batched_reader(source: Sequence[Any]) -> Callable[[list[int]], list[Any]]:
  """Returns keys -> records, reading a batch at once where the source can."""

  def one_by_one(keys):
    return [source[k] for k in keys]

  getitems = getattr(source, '__getitems__', None)
  if getitems is None:
    return one_by_one
  state = {'batched': True}

  def read(keys):
    if state['batched']:
      try:
        return getitems(keys)
      except TypeError:
        # tfds.testing.mock_data's fake ArrayRecord source (TFDS 4.9.10)
        # breaks `__getitems__`; single reads work.
        logging.info('Batched reads unsupported by %r; reading one by one.',
                     type(source).__name__)
        state['batched'] = False
    return one_by_one(keys)

  return read


def _read_data_source(
    name: str, data_dir: str | None, split: str, info: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split through `tfds.data_source`, in batches."""
  tfds = _tfds()
  start = time.monotonic()
  raw = tfds.data_source(
      name,
      split=split,
      data_dir=data_dir,
      download=False,
      deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES,
  )
  try:
    arrays = _read_serialized_examples(raw, info)
    route = 'serialized tf.Example + PIL'
  except _NotSerializedExamples as e:
    logging.info('%s/%s: %s; using TFDS decoding.', name, split, e)
    source = tfds.data_source(
        name, split=split, data_dir=data_dir, download=False
    )
    arrays = _read_decoded_examples(source)
    route = 'TFDS decoding'
  logging.info('Read %s/%s: %d examples in %.2f s (%s).', name, split,
               len(arrays[1]), time.monotonic() - start, route)
  return arrays


class _NotSerializedExamples(Exception):
  """The records are not tf.Examples with one encoded image and a label."""


def _read_serialized_examples(
    source: Sequence[Any], info: Any
) -> tuple[np.ndarray, np.ndarray]:
  """Parses tf.Example records and decodes their images with Pillow.

  About 2x faster than TFDS's own per-example decoding (3.2 s instead of
  5.5 s for 50,000 CIFAR images on one CPU core), as it skips the generic
  feature machinery.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from tensorflow_datasets.proto import tf_example_pb2

  def decode(record):
    if not isinstance(record, (bytes, memoryview)):
      raise _NotSerializedExamples(f'records are {type(record).__name__}')
    try:
      feature = tf_example_pb2.Example.FromString(record).features.feature
      (encoded,) = feature['image'].bytes_list.value
      (label,) = feature['label'].int64_list.value
      with Image.open(io.BytesIO(encoded)) as image:
        pixels = np.asarray(image)
    except Exception as e:  # pylint: disable=broad-except
      raise _NotSerializedExamples(f'cannot parse a record ({e!r})') from e
    return (pixels[..., None] if pixels.ndim == 2 else pixels), label

  n = len(source)
  read = _batched_reader(source)
  expected = tuple(info.features['image'].shape)
  images = labels = None
  for start in range(0, n, _READ_BATCH):
    keys = list(range(start, min(start + _READ_BATCH, n)))
    for i, record in zip(keys, read(keys)):
      pixels, label = decode(record)
      if images is None:
        if pixels.dtype != np.uint8 or (
            None not in expected and pixels.shape != expected
        ):
          raise _NotSerializedExamples(
              f'decoded image is {pixels.dtype}{pixels.shape}, feature says '
              f'{expected}'
          )
        images = np.empty((n,) + pixels.shape, np.uint8)
        labels = np.empty((n,), np.int32)
      images[i] = pixels
      labels[i] = label
  if images is None:
    raise DatasetUnavailableError('The split is empty.')
  return images, labels


def _read_decoded_examples(
    source: Sequence[Any],
) -> tuple[np.ndarray, np.ndarray]:
  """Reads examples decoded by TFDS ({'image': uint8 HWC, 'label': int})."""
  n = len(source)
  read = _batched_reader(source)
  images = labels = None
  for start in range(0, n, _READ_BATCH):
    keys = list(range(start, min(start + _READ_BATCH, n)))
    for i, example in zip(keys, read(keys)):
      if images is None:
        images = np.empty((n,) + np.shape(example['image']), np.uint8)
        labels = np.empty((n,), np.int32)
      images[i] = example['image']
      labels[i] = example['label']
  if images is None:
    raise DatasetUnavailableError('The split is empty.')
  return images, labels


def _read_tfrecord(builder: Any, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a split prepared as TFRecord (no random access) through tf.data."""
  tfds = _tfds()
  hide_accelerators_from_tensorflow()
  logging.warning(
      '%s is prepared as TFRecord in %s; reading it through tf.data. '
      'Preparing it with --file_format=array_record avoids TensorFlow.',
      builder.name, builder.data_dir)
  start = time.monotonic()
  batch = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  images = np.asarray(batch['image'], np.uint8)
  labels = np.asarray(batch['label']).astype(np.int32)
  logging.info('Read %s/%s: %d examples in %.2f s (tf.data).', builder.name,
               split, len(labels), time.monotonic() - start)
  return images, labels


def _download_blocker(name: str) -> str | None:
  """Why TFDS cannot download `name` now, or None if it should be able to."""
  url = _DOWNLOAD_URLS.get(name)
  if url is not None:
    host, port = _connection_target(url)
    if not _can_connect(host, port, _CONNECT_TIMEOUT_S):
      return (f'no connection to {host}:{port} within '
              f'{_CONNECT_TIMEOUT_S:g} s: offline?')
  if importlib.util.find_spec('importlib_resources') is None:
    # TFDS imports it unconditionally when preparing a dataset but declares
    # it only for Python < 3.9 (tensorflow/datasets#11212).
    return ('TFDS needs the importlib_resources package to download: '
            'pip install importlib_resources')
  return None


def _connection_target(url: str) -> tuple[str, int]:
  """The host and port a download of `url` connects to (its proxy, if any)."""
  parsed = urllib.parse.urlsplit(url)
  host = parsed.hostname or ''
  port = parsed.port or (443 if parsed.scheme == 'https' else 80)
  proxy = urllib.request.getproxies().get(parsed.scheme)
  if proxy and not urllib.request.proxy_bypass(host):
    proxy_url = urllib.parse.urlsplit(
        proxy if '://' in proxy else f'http://{proxy}')
    if proxy_url.hostname:
      return proxy_url.hostname, proxy_url.port or 80
  return host, port


def _can_connect(host: str, port: int, timeout: float) -> bool:
  """Whether a TCP connection opens within `timeout` s, DNS lookup included."""
  result = []

  def probe():
    try:
      with socket.create_connection((host, port), timeout=timeout):
        result.append(True)
    except OSError:
      result.append(False)

  # getaddrinfo ignores socket timeouts, so the whole probe runs in a daemon
  # thread that is abandoned if it outlives `timeout`.
  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout)
  return bool(result and result[0])


def _missing_message(name: str, data_dir: str | None, reason: str) -> str:
  where = _tfds_location(name, data_dir)
  return (
      f'Dataset {name!r} is not prepared in {where} and cannot be downloaded '
      f'now ({reason}). To provide it, either:\n'
      '  * set TFDS_DATA_DIR (or --config.data_dir) to a directory that holds '
      f'a prepared copy (DIR/{name}/<version>/...);\n'
      '  * or, on a machine with internet access, run '
      f'`python -m aikd_jax.data --dataset={name} --data_dir=DIR` (or '
      f'`tfds build {name} --data_dir=DIR --file_format=array_record`, which '
      'needs apache-beam installed) and copy DIR to this machine;\n'
      '  * or train on your own images with '
      '--config.dataset=folder:/path/to/root, laid out as '
      'root/train/<class>/*.png and root/test/<class>/*.png.'
  )


def _tfds_location(name: str, data_dir: str | None) -> str:
  try:
    return str(_tfds().builder(name, data_dir=data_dir).data_dir)
  except Exception:  # pylint: disable=broad-except
    return data_dir or os.environ.get('TFDS_DATA_DIR', '~/tensorflow_datasets')


def hide_accelerators_from_tensorflow() -> None:
  """Keeps TensorFlow (used only for input reading) off GPUs and TPUs."""
  try:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
  except ImportError:
    return

  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # TF already initialised its devices, or has none of this kind.


# ---------------------------------------------------------------------------
# folder:/path (TFDS ImageFolder).


def _image_files(directory: str) -> list[str]:
  return sorted(
      f for f in os.listdir(directory)
      if f.lower().endswith(_IMAGE_EXTENSIONS)
      and os.path.isfile(os.path.join(directory, f))
  )


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(
      d for d in os.listdir(split_dir)
      if os.path.isdir(os.path.join(split_dir, d))
  )


def _check_folder(root: str) -> None:
  """Checks the root/<split>/<class>/<image> layout without reading images."""
  layout = ('expected root/train/<class>/<image> (and optionally '
            f'root/test/<class>/<image>), images ending in '
            f'{", ".join(_IMAGE_EXTENSIONS)}')
  if not os.path.isdir(root):
    raise DatasetUnavailableError(
        f'Image folder {root} does not exist or is not a directory; {layout}.')
  train_dir = os.path.join(root, 'train')
  if not os.path.isdir(train_dir):
    found = sorted(os.listdir(root))
    raise DatasetUnavailableError(
        f'Image folder {root} has no "train" subfolder (found: {found}); '
        f'{layout}.')
  for split in ('train', 'test'):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      continue
    if not any(_image_files(os.path.join(split_dir, c))
               for c in _class_dirs(split_dir)):
      raise DatasetUnavailableError(
          f'{split_dir} holds no class folder with images; {layout}.')


def _load_folder(
    name: str, root: str, split_seed: int, image_size: int | None
) -> Dataset:
  _check_folder(root)
  tfds = _tfds()
  hide_accelerators_from_tensorflow()
  builder = tfds.folder_dataset.ImageFolder(root)
  class_names = tuple(builder.info.features['label'].names)
  splits = set(builder.info.splits.keys())
  ignored = sorted(splits - {'train', 'test'})
  if ignored:
    logging.info('%s: ignoring split folders %s.', root, ignored)
  train_images, train_labels = _read_image_folder(builder, 'train', image_size)
  if 'test' in splits:
    test_images, test_labels = _read_image_folder(builder, 'test', image_size)
    if test_images.shape[1:] != train_images.shape[1:]:
      raise ValueError(
          f'{root}: test images are {test_images.shape[1:]} but train images '
          f'are {train_images.shape[1:]}; pass image_size to resize all.')
  else:
    logging.warning(
        '%s has no "test" folder; holding out a stratified %d%% of "train" '
        '(split_seed=%d) as the test split.', root, 100 * _TEST_FRACTION,
        split_seed)
    train, test = _stratified_split(train_labels, _TEST_FRACTION, split_seed)
    test_images, test_labels = train_images[test], train_labels[test]
    train_images, train_labels = train_images[train], train_labels[train]
  return Dataset(
      name=name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=len(class_names),
      class_names=class_names,
  )


def _read_image_folder(
    builder: Any, split: str, image_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every image of a split (as RGB), resizing if asked to."""
  tfds = _tfds()
  images, labels = [], []
  first_file = None
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    pixels = example['image']
    filename = example['image/filename'].decode()
    if image_size is not None:
      pixels = _resize(pixels, image_size)
    elif images and pixels.shape != images[0].shape:
      raise ValueError(
          f'Images in {builder.data_dir} differ in size: {filename} is '
          f'{_hw(pixels)} but {first_file} is {_hw(images[0])}. Pass '
          'image_size (e.g. --config.image_size=32) to resize them all.')
    if first_file is None:
      first_file = filename
    images.append(pixels)
    labels.append(example['label'])
  return np.stack(images).astype(np.uint8), np.asarray(labels, np.int32)


def _hw(pixels: np.ndarray) -> str:
  return f'{pixels.shape[1]}x{pixels.shape[0]} (WxH)'


def _resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of one HWC uint8 image."""
  if pixels.shape[:2] == (size, size):
    return pixels
  from PIL import Image  # pylint: disable=g-import-not-at-top

  channels = pixels.shape[-1]
  planes = [
      np.asarray(
          Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(
              (size, size), Image.Resampling.BILINEAR))
      for c in range(channels)
  ]
  return np.stack(planes, axis=-1)


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
  return np.stack([_resize(image, size) for image in images])


# ---------------------------------------------------------------------------
# Command line: prepare (download) a dataset, e.g. on a connected machine.


def main(argv: Sequence[str]) -> None:
  del argv
  from absl import flags  # pylint: disable=g-import-not-at-top

  dataset = load_dataset(
      flags.FLAGS.dataset, flags.FLAGS.data_dir, download=True
  )
  mean, std = channel_stats(dataset.train_images)
  print(f'{dataset.name}: train {dataset.train_images.shape}, test '
        f'{dataset.test_images.shape}, {dataset.num_classes} classes; '
        f'channel mean {np.round(mean, 4).tolist()}, '
        f'std {np.round(std, 4).tolist()}')


if __name__ == '__main__':
  from absl import app  # pylint: disable=g-import-not-at-top
  from absl import flags as absl_flags  # pylint: disable=g-import-not-at-top

  absl_flags.DEFINE_string('dataset', 'cifar100', 'Dataset name.')
  absl_flags.DEFINE_string('data_dir', None, 'TFDS data directory.')
  app.run(main)
