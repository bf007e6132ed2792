"""Reads your own images: root/<split>/<class>/<image>, with Pillow.

Labels are the indices of the sorted class-folder names; images are decoded
to RGB. Without a `test` folder a stratified, seeded share of `train` is held
out, so every folder has a test split.

No TensorFlow: this reader replaced TFDS's ImageFolder builder and keeps its
conventions, so a folder loads into the same arrays as before (byte for byte
for PNGs): the same class list (every class folder of every split folder), the
same example order (paths sorted, then shuffled by `random.Random(split)`),
and the same RGB conversion (alpha dropped, not composited; 16-bit samples cut
to their high byte). JPEGs differ by a few levels per pixel: TensorFlow
decoded them with libjpeg's fast integer IDCT by default, Pillow uses the
accurate one (what TF's dct_method='INTEGER_ACCURATE' gives, exactly).
"""

from __future__ import annotations

import concurrent.futures
import os
import random

from absl import logging
import numpy as np

from aikd_jax import data

TEST_FRACTION = 0.2
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # What ImageFolder read.
_READ_CHUNK = 1024  # Images decoded (in parallel) between shape checks.


def check_layout(root: str) -> None:
  """Checks the root/<split>/<class>/<image> layout without reading images."""
  layout = (
    "expected root/train/<class>/<image> (and optionally "
    f"root/test/<class>/<image>), images ending in "
    f"{', '.join(_IMAGE_EXTENSIONS)}"
  )
  if not os.path.isdir(root):
    raise data.DatasetUnavailableError(
      f"Image folder {root} does not exist or is not a directory; {layout}."
    )
  train_dir = os.path.join(root, "train")
  if not os.path.isdir(train_dir):
    found = sorted(os.listdir(root))
    raise data.DatasetUnavailableError(
      f'Image folder {root} has no "train" subfolder (found: {found}); '
      f"{layout}."
    )
  for split in ("train", "test"):
    split_dir = os.path.join(root, split)
    if not os.path.isdir(split_dir):
      continue
    if not any(
      _image_files(os.path.join(split_dir, c)) for c in _class_dirs(split_dir)
    ):
      raise data.DatasetUnavailableError(
        f"{split_dir} holds no class folder with images; {layout}."
      )
  # Every class folder of every split names a class (see _list_examples);
  # an empty one would be a class with no examples, and would shift the
  # labels of the classes sorted after it.
  for split in _class_dirs(root):
    split_dir = os.path.join(root, split)
    for name in _class_dirs(split_dir):
      if not _image_files(os.path.join(split_dir, name)):
        raise data.DatasetUnavailableError(
          f"Class folder {os.path.join(split_dir, name)} holds no image "
          f"(files ending in {', '.join(_IMAGE_EXTENSIONS)}); add its "
          "images or remove it."
        )


def load(
  name: str, root: str, split_seed: int, image_size: int | None
) -> data.Dataset:
  """Loads `root` whole; `image_size` resizes each image as it is read."""
  check_layout(root)
  class_names, splits = _list_examples(root)
  ignored = sorted(set(splits) - {"train", "test"})
  if ignored:
    logging.info("%s: ignoring split folders %s.", root, ignored)
  train_images, train_labels = _read_split(root, splits["train"], image_size)
  if "test" in splits:
    test_images, test_labels = _read_split(root, splits["test"], image_size)
    if test_images.shape[1:] != train_images.shape[1:]:
      raise ValueError(
        f"{root}: test images are {test_images.shape[1:]} but train images "
        f"are {train_images.shape[1:]}; pass image_size to resize all."
      )
  else:
    logging.warning(
      '%s has no "test" folder; holding out a stratified %d%% of "train" '
      "(split_seed=%d) as the test split.",
      root,
      100 * TEST_FRACTION,
      split_seed,
    )
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
        (size, size), Image.Resampling.BILINEAR
      )
    )
    for c in range(pixels.shape[-1])
  ]
  return np.stack(planes, axis=-1)


def resize_all(images: np.ndarray, size: int) -> np.ndarray:
  return np.stack([resize(image, size) for image in images])


def _list_examples(
  root: str,
) -> tuple[tuple[str, ...], dict[str, list[tuple[str, int]]]]:
  """(class names, {split: [(image path, label)]}), as ImageFolder listed them.

  Every folder of `root` that holds class folders is a split, and the class
  names are those of all splits together, sorted. Within a split the paths
  are sorted by class, then file name, then shuffled with
  `random.Random(split)` (ImageFolder's "deterministic shuffle").
  """
  by_split, names = {}, set()
  for split in _class_dirs(root):
    split_dir = os.path.join(root, split)
    classes = _class_dirs(split_dir)
    if classes:
      names.update(classes)
      by_split[split] = [
        (os.path.join(split_dir, name, f), name)
        for name in classes
        for f in _image_files(os.path.join(split_dir, name))
      ]
  class_names = tuple(sorted(names))
  index = {name: i for i, name in enumerate(class_names)}
  splits = {}
  for split, examples in by_split.items():
    random.Random(split).shuffle(examples)
    splits[split] = [(path, index[name]) for path, name in examples]
  return class_names, splits


def _read_split(
  root: str, examples: list[tuple[str, int]], image_size: int | None
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every image of a split (as RGB), resizing if asked to."""
  paths = [path for path, _ in examples]
  labels = np.asarray([label for _, label in examples], np.int32)
  images = None
  # Pillow releases the GIL while it decodes and resizes, so threads help.
  with concurrent.futures.ThreadPoolExecutor(_num_workers()) as pool:
    for start in range(0, len(paths), _READ_CHUNK):
      chunk = paths[start : start + _READ_CHUNK]
      decoded = pool.map(lambda p: _read_image(p, image_size), chunk)
      for i, pixels in enumerate(decoded, start):
        if images is None:
          images = np.empty((len(paths),) + pixels.shape, np.uint8)
        elif pixels.shape != images.shape[1:]:
          raise ValueError(
            f"Images in {root} differ in size: {paths[i]} is "
            f"{_hw(pixels)} but {paths[0]} is {_hw(images[0])}. Pass "
            "image_size (e.g. --config.image_size=32) to resize them all."
          )
        images[i] = pixels
  return images, labels


def _read_image(path: str, image_size: int | None) -> np.ndarray:
  pixels = _decode_rgb(path)
  return pixels if image_size is None else resize(pixels, image_size)


def _decode_rgb(path: str) -> np.ndarray:
  """uint8 [H, W, 3], as `tf.image.decode_image(channels=3)` decodes it."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  try:
    with Image.open(path) as image:
      if image.mode.startswith("I;16"):  # 16-bit grey PNG.
        # libpng's strip_16 in TensorFlow keeps the high byte; Pillow's
        # conversion to 8 bits would clip instead.
        grey = (np.asarray(image).astype(np.uint16) >> 8).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=-1)
      if image.mode in ("P", "PA"):
        # Via RGBA: the palette's colours, the transparency dropped (and no
        # warning about transparency that RGB cannot hold).
        image = image.convert("RGBA")
      if image.mode != "RGB":
        image = image.convert("RGB")  # Grey replicated; alpha dropped.
      return np.asarray(image, np.uint8)
  except (OSError, SyntaxError, ValueError) as e:  # Pillow's decode errors.
    raise data.DatasetUnavailableError(
      f"Cannot read {path} as an image ({e}); remove or replace it."
    ) from e


def _num_workers() -> int:
  try:
    cpus = len(os.sched_getaffinity(0))
  except AttributeError:  # Not on Linux.
    cpus = os.cpu_count() or 1
  return min(32, cpus + 4)


def _hw(pixels: np.ndarray) -> str:
  return f"{pixels.shape[1]}x{pixels.shape[0]} (WxH)"


def _image_files(directory: str) -> list[str]:
  return sorted(
    f
    for f in os.listdir(directory)
    if f.lower().endswith(_IMAGE_EXTENSIONS)
    and os.path.isfile(os.path.join(directory, f))
  )


def _class_dirs(split_dir: str) -> list[str]:
  return sorted(
    d
    for d in os.listdir(split_dir)
    if os.path.isdir(os.path.join(split_dir, d))
  )
