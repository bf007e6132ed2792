"""Reads your own images: root/<split>/<class>/<image>, via TFDS's ImageFolder.

Labels are the indices of the sorted class-folder names; images are decoded
to RGB (ImageFolder's convention). Without a `test` folder a stratified,
seeded share of `train` is held out, so every folder has a test split.
"""

from __future__ import annotations

import os
from typing import Any

from absl import logging
import numpy as np

from aikd_jax import data

TEST_FRACTION = 0.2
_IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')  # What ImageFolder reads.


def check_layout(root: str) -> None:
  """Checks the root/<split>/<class>/<image> layout without reading images."""
  layout = ('expected root/train/<class>/<image> (and optionally '
            f'root/test/<class>/<image>), images ending in '
            f'{", ".join(_IMAGE_EXTENSIONS)}')
  if not os.path.isdir(root):
    raise data.DatasetUnavailableError(
        f'Image folder {root} does not exist or is not a directory; {layout}.')
  train_dir = os.path.join(root, 'train')
  if not os.path.isdir(train_dir):
    found = sorted(os.listdir(root))
    raise data.DatasetUnavailableError(
        f'Image folder {root} has no "train" subfolder (found: {found}); '
        f'{layout}.')
  for split in ('train', 'test'):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      continue
    if not any(_image_files(os.path.join(split_dir, c))
               for c in _class_dirs(split_dir)):
      raise data.DatasetUnavailableError(
          f'{split_dir} holds no class folder with images; {layout}.')


def load(name: str, root: str, split_seed: int,
         image_size: int | None) -> data.Dataset:
  """Loads `root` whole; `image_size` resizes each image as it is read."""
  # TFDS is imported late: digits uses this module's split and resize only.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  check_layout(root)
  data.hide_accelerators_from_tensorflow()
  builder = tfds.folder_dataset.ImageFolder(root)
  class_names = tuple(builder.info.features['label'].names)
  splits = set(builder.info.splits.keys())
  ignored = sorted(splits - {'train', 'test'})
  if ignored:
    logging.info('%s: ignoring split folders %s.', root, ignored)
  train_images, train_labels = _read_split(builder, 'train', image_size)
  if 'test' in splits:
    test_images, test_labels = _read_split(builder, 'test', image_size)
    if test_images.shape[1:] != train_images.shape[1:]:
      raise ValueError(
          f'{root}: test images are {test_images.shape[1:]} but train images '
          f'are {train_images.shape[1:]}; pass image_size to resize all.')
  else:
    logging.warning(
        '%s has no "test" folder; holding out a stratified %d%% of "train" '
        '(split_seed=%d) as the test split.', root, 100 * TEST_FRACTION,
        split_seed)
    train, test = stratified_split(train_labels, TEST_FRACTION, split_seed)
    test_images, test_labels = train_images[test], train_labels[test]
    train_images, train_labels = train_images[train], train_labels[train]
  return data.Dataset(
      name=name,
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      num_classes=len(class_names),
      class_names=class_names,
  )


def stratified_split(
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


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
  """Bilinear (antialiased when shrinking) resize of one HWC uint8 image."""
  if pixels.shape[:2] == (size, size):
    return pixels
  from PIL import Image  # pylint: disable=g-import-not-at-top

  planes = [
      np.asarray(
          Image.fromarray(np.ascontiguousarray(pixels[..., c])).resize(
              (size, size), Image.Resampling.BILINEAR))
      for c in range(pixels.shape[-1])
  ]
  return np.stack(planes, axis=-1)


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
  return np.stack([resize(image, size) for image in images])


def _read_split(
    builder: Any, split: str, image_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every image of a split (as RGB), resizing if asked to."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  images, labels = [], []
  first_file = None
  for example in tfds.as_numpy(builder.as_dataset(split=split)):
    pixels = example['image']
    filename = example['image/filename'].decode()
    if image_size is not None:
      pixels = resize(pixels, image_size)
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
