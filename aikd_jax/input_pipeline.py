"""Chooses where the training split lives, and feeds the loop either way.

`input_pipeline="device"` puts both splits on the devices (device_data.py);
`"stream"` reads each step's batch on the host (streaming.py); `"auto"`
streams only when the training split would take more than
`device_data_budget_gb` per device. The training loop, stage 2 and
evaluation call the three functions below and need not know which it is.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from aikd_jax import banks
from aikd_jax import data as data_lib
from aikd_jax import run_config
from aikd_jax import streaming
from aikd_jax import train_step as step_lib
from aikd_jax.device_data import DeviceDataset
from aikd_jax.device_data import place_dataset
from aikd_jax.streaming import StreamedDataset

MODES = ("auto", "device", "stream")
_GB = 1 << 30


def open_dataset(
  config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
) -> DeviceDataset | StreamedDataset:
  """The dataset placed on the devices, or opened for streaming."""
  kind, name = data_lib._parse_name(config.dataset)  # pylint: disable=protected-access
  budget = config.device_data_budget_gb * _GB * mesh.devices.size
  data_dir = config.data_dir or None
  if kind == "tfds" and config.input_pipeline != "device":
    nbytes = _tfds_train_bytes(name, data_dir)
    if config.input_pipeline == "stream" or nbytes is None or nbytes > budget:
      return _stream_tfds(config, mesh, name, data_dir)
  dataset = data_lib.load_dataset(
    config.dataset,
    data_dir,
    download=config.download,
    split_seed=config.data_seed,
    image_size=config.image_size or None,
  )
  mode = "stream" if config.host_augment else config.input_pipeline
  if mode == "auto":
    mode = "stream" if dataset.train_images.nbytes > budget else "device"
  if mode == "device":
    return place_dataset(dataset, mesh, config)
  return stream_arrays(dataset, mesh, config)


def stream_arrays(
  dataset: data_lib.Dataset,
  mesh: jax.sharding.Mesh,
  config: ml_collections.ConfigDict,
) -> StreamedDataset:
  """An in-memory dataset streamed as if it were on disk (the same ids)."""
  if len(config.mean):
    mean, std = tuple(config.mean), tuple(config.std)
  else:
    mean, std = data_lib.channel_stats(dataset.train_images)
  return _streamed(
    config,
    mesh,
    streaming.ArraySource(dataset.train_images, dataset.train_labels),
    streaming.ArraySource(dataset.test_images, dataset.test_labels),
    dataset.num_classes,
    dataset.image_shape,
    mean,
    std,
  )


def _tfds_train_bytes(name: str, data_dir: str | None) -> int | None:
  """The training split's decoded size, or None when images vary in size."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  info = tfds.builder(name, data_dir=data_dir).info
  shape = info.features["image"].shape
  if any(d is None for d in shape) or "train" not in info.splits:
    return None
  return int(info.splits["train"].num_examples) * math.prod(shape)


def _stream_tfds(
  config: ml_collections.ConfigDict,
  mesh: jax.sharding.Mesh,
  name: str,
  data_dir: str | None,
) -> StreamedDataset:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from aikd_jax import tfds_data  # pylint: disable=g-import-not-at-top

  # Streaming reads a prepared copy; it never downloads one.
  tfds_data.check_available(name, data_dir, download=False)
  info = tfds.builder(name, data_dir=data_dir).info
  if not len(config.mean):
    raise run_config.ConfigError(
      f"Streaming {name} needs --config.mean and --config.std (the split's "
      "statistics would take a pass over it)."
    )
  shape = tuple(info.features["image"].shape)
  if config.host_augment:
    shape = (config.image_size, config.image_size, shape[-1])
  elif any(d is None for d in shape):
    raise run_config.ConfigError(
      f"{name}'s images differ in size; stream it with "
      "--config.host_augment=True and --config.image_size=SIZE."
    )
  test_split = tfds_data.eval_split(name, data_dir)
  return _streamed(
    config,
    mesh,
    streaming.TfdsSource(name, "train", data_dir),
    streaming.TfdsSource(name, test_split, data_dir),
    int(info.features["label"].num_classes),
    shape,
    tuple(config.mean),
    tuple(config.std),
  )


def _host_work(config: ml_collections.ConfigDict) -> str:
  if config.host_color_augment:
    return "crop, flip, colour jitter and lighting"
  return "crop and flip" if config.host_augment else "raw images"


def _streamed(
  config, mesh, train, test, num_classes, image_shape, mean, std
) -> StreamedDataset:
  if config.host_augment:
    image_shape = (config.image_size, config.image_size, image_shape[-1])
  if config.host_color_augment and image_shape[-1] != 3:
    raise run_config.ConfigError(
      "host_color_augment jitters RGB colours; the images have "
      f"{image_shape[-1]} channel(s)."
    )
  if len(mean) != image_shape[-1]:
    raise run_config.ConfigError(
      f"mean/std have {len(mean)} channels but the images have "
      f"{image_shape[-1]}."
    )
  labels = train.all_labels()
  layout = banks.RowLayout(len(labels), mesh.devices.size)
  ids = banks.example_ids(layout.num_examples, config.seed)
  index_of_id = np.full((layout.num_rows,), -1, np.int64)
  index_of_id[ids] = np.arange(len(ids))
  logging.info(
    "Streaming %s: %d train / %d test examples, %s on the host.",
    config.dataset,
    len(labels),
    len(test),
    _host_work(config),
  )
  return StreamedDataset(
    layout=layout,
    train_labels_by_id=banks.arrange_by_id(
      labels, ids, layout.num_rows, fill=-1
    ),
    test_labels=test.all_labels(),
    num_classes=num_classes,
    image_shape=tuple(image_shape),
    mean=tuple(float(m) for m in mean),
    std=tuple(float(s) for s in std),
    train_source=train,
    test_source=test,
    index_of_id=index_of_id,
    host_augment=bool(config.host_augment),
    host_color_augment=bool(config.host_color_augment),
    workers=config.stream_workers,
    prefetch=config.stream_prefetch,
  )


def feed(
  step_data: step_lib.StepData,
  stage,
  data: DeviceDataset | StreamedDataset,
  mesh: jax.sharding.Mesh,
  epoch: int,
  step: int,
) -> Iterator[step_lib.StepData]:
  """What each step of `epoch` reads, from global step `step` on."""
  if not isinstance(data, StreamedDataset):
    return itertools.repeat(step_data)
  config = stage.step_config
  batches = streaming.train_batches(
    data,
    mesh,
    seed=stage.seed,
    epoch=epoch,
    first_step=max(step - epoch * stage.steps_per_epoch, 0),
    steps_per_epoch=stage.steps_per_epoch,
    per_device_batch=config.per_device_batch,
    image_size=data.image_shape[0],
    flip=config.flip,
  )
  return (step_data.replace(batch=batch) for batch in batches)


def test_logits(
  predict, variables, data, mesh, eval_batch_size: int
) -> np.ndarray:
  """Eval-mode logits [M, C] on the test split, on every host."""
  return read_test_logits(
    start_test_logits(predict, variables, data, mesh, eval_batch_size), data
  )


def start_test_logits(predict, variables, data, mesh, eval_batch_size: int):
  """Dispatches the test split's evaluation without waiting for it, so the
  device can go on to the next steps; `read_test_logits` reads it. A
  streamed split is read batch by batch from the host, so it is read here."""
  if isinstance(data, StreamedDataset):
    return streaming.predict_test(
      predict, variables, data, mesh, eval_batch_size // mesh.devices.size
    )
  logits = predict(variables, data.test_images)
  # Queued now, the copy follows the evaluation, not the steps queued next.
  logits.copy_to_host_async()
  return logits


def read_test_logits(started, data) -> np.ndarray:
  """`start_test_logits`'s logits [M, C], on every host."""
  if isinstance(started, np.ndarray):
    return started
  logits = multihost_utils.process_allgather(started, tiled=True)
  return np.asarray(logits)[: len(data.test_labels)]


def train_logits_by_id(
  predict, variables, data, mesh, eval_batch_size: int
) -> jax.Array:
  """Eval-mode logits [N_pad, C] on the un-augmented training split, rows by
  example id, sharded like the banks."""
  if isinstance(data, StreamedDataset):
    return streaming.predict_train_by_id(
      predict, variables, data, mesh, eval_batch_size // mesh.devices.size
    )
  return predict(variables, data.train_images)
