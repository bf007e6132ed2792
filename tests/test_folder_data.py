"""Tests for aikd_jax.folder_data (through the public load_dataset)."""

import json
import os
import warnings

import e2e_util as u
import numpy as np
from PIL import Image
import pytest

from aikd_jax import data


def test_missing_folder_names_the_path(tmp_path):
  missing = tmp_path / "nope"
  for fn in (data.check_dataset_available, data.load_dataset):
    with pytest.raises(data.DatasetUnavailableError) as info:
      fn(f"folder:{missing}")
    assert str(missing) in str(info.value)
  (tmp_path / "root" / "val" / "cat").mkdir(parents=True)
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available(f"folder:{tmp_path / 'root'}")
  assert "train" in str(info.value) and "val" in str(info.value)
  (tmp_path / "root" / "train" / "cat").mkdir(parents=True)
  (tmp_path / "root" / "train" / "cat" / "notes.txt").write_text("x")
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.check_dataset_available(f"folder:{tmp_path / 'root'}")
  assert "no class folder with images" in str(info.value)


def _write_folder(
  root, sizes, classes=("dog", "ant", "cat"), per_class=None, mode="RGB"
):
  """Writes root/<split>/<class>/<i>.png.

  Returns:
    {(split, pixels.tobytes()): label}.
  """
  per_class = per_class or {"train": 3, "test": 2}
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
        channels = 3 if mode == "RGB" else 1
        pixels = rng.integers(0, 256, (h, w, channels), dtype=np.uint8)
        pixels = pixels if mode == "RGB" else pixels[..., 0]
        Image.fromarray(pixels, mode).save(
          os.path.join(root, split, name, f"{i}.png")
        )
        truth[(split, pixels.tobytes())] = sorted_classes.index(name)
  return truth


def _check_against_truth(ds, truth):
  for split, images, labels in (
    ("train", ds.train_images, ds.train_labels),
    ("test", ds.test_images, ds.test_labels),
  ):
    assert len({k for k in truth if k[0] == split}) == len(images)
    for image, label in zip(images, labels):
      assert truth[(split, image.tobytes())] == label  # Exact pixels.


def test_folder_round_trip(tmp_path):
  truth = _write_folder(str(tmp_path), sizes=[(16, 16)])
  name = f"folder:{tmp_path}"
  data.check_dataset_available(name)
  ds = data.load_dataset(name)
  assert ds.name == name
  assert ds.class_names == ("ant", "cat", "dog")  # Sorted folder names.
  assert ds.num_classes == 3
  assert ds.train_images.shape == (9, 16, 16, 3)
  assert ds.test_images.shape == (6, 16, 16, 3)
  assert ds.train_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3, 3])
  np.testing.assert_array_equal(np.bincount(ds.test_labels), [2, 2, 2])
  _check_against_truth(ds, truth)
  assert sorted(os.listdir(tmp_path)) == ["test", "train"]  # Read only.


def test_folder_grayscale_becomes_rgb(tmp_path):
  _write_folder(str(tmp_path), sizes=[(8, 8)], mode="L")
  ds = data.load_dataset(f"folder:{tmp_path}")
  assert ds.image_shape == (8, 8, 3)
  np.testing.assert_array_equal(
    ds.train_images[..., 0], ds.train_images[..., 2]
  )


def test_folder_mixed_sizes_need_image_size(tmp_path):
  _write_folder(str(tmp_path), sizes=[(16, 16), (20, 12), (16, 16)])
  name = f"folder:{tmp_path}"
  with pytest.raises(ValueError) as info:
    data.load_dataset(name)
  assert "image_size" in str(info.value)
  assert str(tmp_path) in str(info.value)
  assert ".png" in str(info.value)
  ds = data.load_dataset(name, image_size=16)
  assert ds.train_images.shape == (9, 16, 16, 3)
  assert ds.test_images.shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(np.bincount(ds.train_labels), [3, 3, 3])


def test_folder_without_test_split_holds_out_stratified(tmp_path):
  truth = _write_folder(str(tmp_path), sizes=[(8, 8)], per_class={"train": 10})
  name = f"folder:{tmp_path}"
  a = data.load_dataset(name, split_seed=0)
  b = data.load_dataset(name, split_seed=0)
  c = data.load_dataset(name, split_seed=1)
  assert a.train_images.shape[0] == 24 and a.test_images.shape[0] == 6
  np.testing.assert_array_equal(np.bincount(a.test_labels), [2, 2, 2])
  np.testing.assert_array_equal(a.test_images, b.test_images)
  assert not np.array_equal(a.test_images, c.test_images)
  for images, labels in (
    (a.train_images, a.train_labels),
    (a.test_images, a.test_labels),
  ):
    for image, label in zip(images, labels):
      assert truth[("train", image.tobytes())] == label


def _write_mixed_modes(root):
  """train/ and test/ (classes ant, bee) in several PNG modes, plus val/
  with a class of its own; returns nothing (the truth comes from TFDS)."""
  rng = np.random.default_rng(1)
  palette = rng.integers(0, 256, 768).astype(np.uint8).tolist()
  for split, count in (("train", 7), ("test", 3), ("val", 1)):
    for name in ("ant", "bee") if split != "val" else ("cow",):
      os.makedirs(os.path.join(root, split, name))
      for i in range(count):
        path = os.path.join(root, split, name, f"{i}.png")
        kind = i % 5
        shape = ((6, 6, 3), (6, 6), (6, 6, 4), (6, 6), (6, 6))[kind]
        dtype = np.uint16 if kind == 3 else np.uint8  # 16-bit grey.
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, shape, dtype=dtype)
        if kind < 4:  # RGB, L, RGBA, I;16.
          Image.fromarray(pixels).save(path)
        else:  # Palette with per-entry transparency.
          image = Image.fromarray(pixels, "P")
          image.putpalette(palette)
          image.save(path, transparency=bytes(range(0, 256, 8)))
  with open(os.path.join(root, "train", "ant", "notes.txt"), "w") as f:
    f.write("not an image")


def test_folder_matches_tfds_image_folder(tmp_path):
  """The arrays TFDS's ImageFolder (the loader this one replaced) gave."""
  tfds = pytest.importorskip("tensorflow_datasets")
  pytest.importorskip("tensorflow")
  _write_mixed_modes(str(tmp_path))
  builder = tfds.folder_dataset.ImageFolder(str(tmp_path))
  expected = {}
  for split in ("train", "test"):
    examples = list(tfds.as_numpy(builder.as_dataset(split=split)))
    expected[split] = (
      np.stack([e["image"] for e in examples]),
      np.array([e["label"] for e in examples], np.int32),
    )
  ds = data.load_dataset(f"folder:{tmp_path}")
  # val's class counts too, as it did for ImageFolder.
  assert (
    ds.class_names
    == tuple(builder.info.features["label"].names)
    == ("ant", "bee", "cow")
  )
  for split, images, labels in (
    ("train", ds.train_images, ds.train_labels),
    ("test", ds.test_images, ds.test_labels),
  ):
    np.testing.assert_array_equal(images, expected[split][0])
    np.testing.assert_array_equal(labels, expected[split][1])


def test_folder_decodes_16_bit_and_transparent_palettes(tmp_path):
  grey16 = np.arange(64, dtype=np.uint16).reshape(8, 8) * 1021
  palette = np.arange(768, dtype=np.uint8)[::-1]
  indices = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
  os.makedirs(tmp_path / "train" / "a")
  Image.fromarray(grey16).save(tmp_path / "train" / "a" / "0.png")
  image = Image.fromarray(indices, "P")
  image.putpalette(palette.tolist())
  image.save(tmp_path / "train" / "a" / "1.png", transparency=bytes(range(64)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # e.g. Pillow's palette-transparency one.
    ds = data.load_dataset(f"folder:{tmp_path}")
  images = np.concatenate([ds.train_images, ds.test_images])
  got = {image[..., 0].tobytes() for image in images}
  assert (grey16 >> 8).astype(np.uint8).tobytes() in got  # The high byte.
  assert palette.reshape(256, 3)[indices][..., 0].tobytes() in got
  for image in images:
    if (image[..., 0] == image[..., 1]).all():
      np.testing.assert_array_equal(image[..., 0], image[..., 2])


def test_unreadable_image_names_the_file(tmp_path):
  _write_folder(str(tmp_path), sizes=[(8, 8)])
  bad = tmp_path / "train" / "ant" / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
  with pytest.raises(data.DatasetUnavailableError) as info:
    data.load_dataset(f"folder:{tmp_path}")
  assert str(bad) in str(info.value)


def test_folder_load_imports_no_tensorflow(tmp_path):
  """In a clean interpreter, a folder loads without TensorFlow or TFDS."""
  _write_folder(str(tmp_path / "with_test"), sizes=[(12, 12)], mode="L")
  _write_folder(
    str(tmp_path / "no_test"),
    sizes=[(12, 12), (10, 14)],
    per_class={"train": 5},
  )
  code = f"""
import json, sys
from aikd_jax import data
shapes = []
for root, size in (({str(tmp_path / "with_test")!r}, None),
                   ({str(tmp_path / "no_test")!r}, 8)):
  data.check_dataset_available('folder:' + root)
  ds = data.load_dataset('folder:' + root, None, download=False,
                         split_seed=0, image_size=size)
  shapes.append([list(ds.train_images.shape), list(ds.test_images.shape)])
print(json.dumps({{'shapes': shapes, 'modules': sorted(
    m for m in sys.modules
    if m.split('.')[0] in ('tensorflow', 'tensorflow_datasets'))}}))
"""
  proc = u.run_python("-c", code, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["shapes"] == [
    [[9, 12, 12, 3], [6, 12, 12, 3]],
    [[12, 8, 8, 3], [3, 8, 8, 3]],
  ]
  assert result["modules"] == []


@pytest.mark.parametrize("split", ["train", "test"])
def test_empty_class_folder_is_refused_naming_it(tmp_path, split):
  """An empty class folder would be a class of its own and shift the labels
  of the classes after it; it is refused before anything is read."""
  _write_folder(str(tmp_path), sizes=[(8, 8)])
  empty = tmp_path / split / "bee"  # Sorts between "ant" and "cat".
  empty.mkdir()
  (empty / "notes.txt").write_text("not an image")
  for fn in (data.check_dataset_available, data.load_dataset):
    with pytest.raises(data.DatasetUnavailableError) as info:
      fn(f"folder:{tmp_path}")
    assert f"Class folder {empty} holds no image" in str(info.value)
