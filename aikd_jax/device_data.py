"""The dataset on the devices: both splits sharded, training rows by id."""

from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from aikd_jax import banks
from aikd_jax import data as data_lib
from aikd_jax import run_config


@dataclasses.dataclass(frozen=True)
class DeviceDataset:
  """The dataset on the devices, training rows arranged by example id."""

  layout: banks.RowLayout
  train_images: jax.Array  # uint8 [N_pad, H, W, C], sharded by id
  train_labels: jax.Array  # int32 [N_pad], -1 on padding rows
  train_labels_by_id: np.ndarray
  test_images: jax.Array  # uint8 [M_pad, H, W, C], sharded
  test_labels: np.ndarray  # int32 [M]
  num_classes: int
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]


def place_dataset(
  dataset: data_lib.Dataset,
  mesh: jax.sharding.Mesh,
  config: ml_collections.ConfigDict,
) -> DeviceDataset:
  """Puts both splits on the devices; training rows go where their id says.

  Reads `config.seed` (the example ids) and `config.mean` / `config.std`
  (empty: the train split's own channel statistics).
  """
  num_devices = mesh.devices.size
  layout = banks.RowLayout(len(dataset.train_labels), num_devices)
  ids = banks.example_ids(layout.num_examples, config.seed)
  labels = banks.arrange_by_id(
    dataset.train_labels.astype(np.int32), ids, layout.num_rows, fill=-1
  )
  test_layout = banks.RowLayout(len(dataset.test_labels), num_devices)
  test_images = np.zeros(
    (test_layout.num_rows,) + dataset.image_shape, np.uint8
  )
  test_images[: len(dataset.test_labels)] = dataset.test_images
  if len(config.mean):
    mean, std = tuple(config.mean), tuple(config.std)
  else:
    mean, std = data_lib.channel_stats(dataset.train_images)
  if len(mean) != dataset.image_shape[-1]:
    raise run_config.ConfigError(
      f"mean/std have {len(mean)} channels but the images have "
      f"{dataset.image_shape[-1]}."
    )
  return DeviceDataset(
    layout=layout,
    train_images=banks.put_by_id(
      dataset.train_images, ids, layout.num_rows, mesh
    ),
    train_labels=banks.put_sharded(labels, mesh),
    train_labels_by_id=labels,
    test_images=banks.put_sharded(test_images, mesh),
    test_labels=dataset.test_labels.astype(np.int32),
    num_classes=dataset.num_classes,
    image_shape=tuple(dataset.image_shape),
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
  )
