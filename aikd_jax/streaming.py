"""The host input pipeline: per-step batches read from a random-access source.

For a training split too large for the devices. The order stays the
device-resident one: step k of an epoch gives device d the rows
`banks.epoch_order(...)[d*S + k*b : d*S + (k+1)*b]` of its own block, so a
device receives only examples whose bank rows it owns (the bank reads and
writes stay local) and the order is a function of (seed, epoch, step) alone:
a resumed run starts at the step it stopped at. Each process reads only the
rows of its own devices.

Reading is grain's MapDataset over the explicit list of (dataset index,
example id, step, row) records, mapped and batched with threads, in order;
the batches then go to the devices a few steps ahead of the step.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Any, Callable, Iterator, Protocol

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np

from aikd_jax import banks
from aikd_jax import host_augment
from aikd_jax import train_step as step_lib


class Source(Protocol):
  """Random access to (uint8 [H, W, C] image, int label) by dataset index."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]: ...


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """An in-memory split (digits, an image folder) as a random-access source."""

  images: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    return self.images[index], int(self.labels[index])

  def all_labels(self) -> np.ndarray:
    return np.asarray(self.labels, np.int32)


class TfdsSource:
  """A TFDS split prepared as ArrayRecord, read through `tfds.data_source`."""

  def __init__(self, name: str, split: str, data_dir: str | None):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

    self._tfds = tfds
    self._args = (name, split, data_dir)
    self._source = tfds.data_source(
      name, split=split, data_dir=data_dir, download=False
    )

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
    example = self._source[int(index)]
    image = np.asarray(example["image"], np.uint8)
    if image.ndim == 2:
      image = image[..., None]
    return image, int(example["label"])

  def all_labels(self) -> np.ndarray:
    """Every label, reading the images undecoded (one pass over the split)."""
    name, split, data_dir = self._args
    try:
      source = self._tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=False,
        decoders={"image": self._tfds.decode.SkipDecoding()},
      )
    except (TypeError, ValueError):
      source = self._source
    return np.asarray(
      [int(source[i]["label"]) for i in range(len(source))], np.int32
    )


@dataclasses.dataclass(frozen=True)
class StreamedDataset:
  """The dataset as the training loop sees it when it streams.

  The fields the loop shares with device_data.DeviceDataset mean the same;
  the splits stay on the host (`train_source`, `test_source`) and the
  device image fields are None.
  """

  layout: banks.RowLayout
  train_labels_by_id: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  image_shape: tuple[int, ...]
  mean: tuple[float, ...]
  std: tuple[float, ...]
  train_source: Any
  test_source: Any
  index_of_id: np.ndarray  # dataset index of each row, -1 on padding
  host_augment: bool
  # Colour jitter and lighting after the host's crop: train images then
  # arrive as float32 in [0, 1] (unclipped), not uint8.
  host_color_augment: bool
  workers: int
  prefetch: int
  train_images: None = None
  train_labels: None = None
  test_images: None = None


def local_blocks(mesh: jax.sharding.Mesh) -> list[int]:
  """The row blocks (mesh positions) of this process's devices."""
  me = jax.process_index()
  return [
    d
    for d, device in enumerate(mesh.devices.flat)
    if device.process_index == me
  ]


def epoch_records(
  data: StreamedDataset,
  order: np.ndarray,
  blocks: list[int],
  per_device_batch: int,
  first_step: int,
  num_steps: int,
  step_offset: int,
) -> np.ndarray:
  """int64 [num_steps * len(blocks) * b, 4]: (index, id, step, row) records.

  Step k (from `first_step` of the epoch) takes, block by block, that block's
  k-th slice of the epoch order; `step_offset` turns k into the global step.
  """
  s, b = data.layout.rows_per_device, per_device_batch
  records = []
  for k in range(first_step, first_step + num_steps):
    for d in blocks:
      rows = order[d * s + k * b : d * s + (k + 1) * b].astype(np.int64)
      ids = rows + d * s
      step = np.full_like(rows, step_offset + k)
      records.append(np.stack([data.index_of_id[ids], ids, step, rows], 1))
  if not records:
    return np.zeros((0, 4), np.int64)
  return np.concatenate(records)


def _read(
  records: np.ndarray,
  load: Callable[[np.ndarray], dict],
  batch_size: int,
  workers: int,
) -> Iterator[dict]:
  """Loads records with `workers` threads, in order, `batch_size` at a time."""
  import grain  # pylint: disable=g-import-not-at-top  # Streamed runs only.

  dataset = grain.MapDataset.source(records).map(load).batch(batch_size)
  options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=workers)
  return iter(dataset.to_iter_dataset(options))


def _put(
  host: np.ndarray,
  blocks: list[int],
  mesh: jax.sharding.Mesh,
  per_device: int,
) -> jax.Array:
  """A [D * per_device, ...] array sharded over `data` from this process's
  blocks (`host` holds them in the order of `blocks`)."""
  position = {d: i for i, d in enumerate(blocks)}
  shape = (mesh.devices.size * per_device,) + host.shape[1:]

  def block(index):
    i = position[(index[0].start or 0) // per_device]
    return host[i * per_device : (i + 1) * per_device]

  return jax.make_array_from_callback(shape, banks.data_sharding(mesh), block)


def prefetch(iterator: Iterator, size: int) -> Iterator:
  """Keeps `size` items (device transfers under way) ahead of the consumer."""
  queue = collections.deque()
  for item in iterator:
    queue.append(item)
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def train_batches(
  data: StreamedDataset,
  mesh: jax.sharding.Mesh,
  *,
  seed: int,
  epoch: int,
  first_step: int,
  steps_per_epoch: int,
  per_device_batch: int,
  image_size: int,
  flip: bool,
) -> Iterator[step_lib.StreamedBatch]:
  """The streamed batches of `epoch` from its step `first_step` on."""
  blocks = local_blocks(mesh)
  order = banks.epoch_order(data.layout, seed, epoch)
  records = epoch_records(
    data,
    order,
    blocks,
    per_device_batch,
    first_step,
    steps_per_epoch - first_step,
    epoch * steps_per_epoch,
  )
  source, on_host = data.train_source, data.host_augment
  color = data.host_color_augment

  def load(record: np.ndarray) -> dict:
    index, example_id, step, row = (int(x) for x in record)
    image, label = source[index]
    if on_host:
      rng = host_augment.view_rng(seed, step, example_id)
      image = host_augment.train_view(image, image_size, rng, flip)
    if color:
      rng = host_augment.color_rng(seed, step, example_id)
      image = host_augment.color_augment(image, rng)
    return {"image": image, "label": np.int32(label), "row": np.int32(row)}

  def to_device(batch: dict) -> step_lib.StreamedBatch:
    put = lambda x: _put(x, blocks, mesh, per_device_batch)
    return step_lib.StreamedBatch(
      images=put(batch["image"]),
      labels=put(batch["label"]),
      rows=put(batch["row"]),
    )

  batch_size = len(blocks) * per_device_batch
  host = _read(records, load, batch_size, data.workers)
  return prefetch(map(to_device, host), data.prefetch)


def _eval_image(
  data: StreamedDataset, source: Any, index: int, size: int
) -> np.ndarray:
  """The un-augmented view of one example (centre crop under host_augment)."""
  if index < 0:
    return np.zeros(data.image_shape, np.uint8)
  image, _ = source[index]
  return host_augment.eval_view(image, size) if data.host_augment else image


def chunk_rows(rows: int, batch_per_device: int) -> int:
  """The chunk a device evaluates its `rows` in: as make_predict_fn splits
  them, so that streamed evaluation runs the very same programs."""
  chunks = -(-rows // batch_per_device)
  return -(-rows // chunks)


def _predict_blocks(
  predict,
  variables,
  data: StreamedDataset,
  mesh: jax.sharding.Mesh,
  source: Any,
  index_of_row: np.ndarray,
  rows: int,
  batch_per_device: int,
) -> Iterator[jax.Array]:
  """Eval-mode logits, chunk by chunk, of device d's rows [d*rows, ...).

  `index_of_row` maps a global row to its dataset index (-1: a zero image).
  Chunk c gives every device its rows [c*k, (c+1)*k) (k: chunk_rows), the
  ones past `rows` being zero images, as make_predict_fn pads them.
  """
  blocks, size = local_blocks(mesh), data.image_shape[0]
  k = chunk_rows(rows, batch_per_device)
  chunks = -(-rows // k)
  indices = [
    index_of_row[d * rows + r] if r < rows else -1
    for c in range(chunks)
    for d in blocks
    for r in range(c * k, (c + 1) * k)
  ]
  records = np.asarray(indices, np.int64).reshape(-1, 1)
  load = lambda record: _eval_image(data, source, int(record[0]), size)
  for images in _read(records, load, len(blocks) * k, data.workers):
    yield predict(variables, _put(images, blocks, mesh, k))


def predict_test(
  predict, variables, data: StreamedDataset, mesh, batch_per_device: int
) -> np.ndarray:
  """Eval-mode logits [M, C] on the streamed test split, on every host.

  Device d evaluates test examples [d*R, (d+1)*R) (R = ceil(M / D)), as the
  device-resident test split is sharded.
  """

  num, devices = len(data.test_labels), mesh.devices.size
  rows = -(-num // devices)
  index_of_row = np.arange(rows * devices)
  index_of_row[num:] = -1
  k = chunk_rows(rows, batch_per_device)
  parts = [
    np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    for logits in _predict_blocks(
      predict,
      variables,
      data,
      mesh,
      data.test_source,
      index_of_row,
      rows,
      batch_per_device,
    )
  ]
  # parts[c][d*k + j] is device d's row c*k + j.
  logits = np.stack(parts).reshape(len(parts), devices, k, -1)
  logits = logits.transpose(1, 0, 2, 3).reshape(devices, len(parts) * k, -1)
  return logits[:, :rows].reshape(devices * rows, -1)[:num]


def predict_train_by_id(
  predict, variables, data: StreamedDataset, mesh, batch_per_device: int
) -> jax.Array:
  """Eval-mode logits [N_pad, C] on the un-augmented training split, rows by
  example id and sharded like the banks; each device computes its own rows
  (padding rows see a zero image, as on the device-resident path)."""
  s = data.layout.rows_per_device
  parts = list(
    _predict_blocks(
      predict,
      variables,
      data,
      mesh,
      data.train_source,
      data.index_of_id,
      s,
      batch_per_device,
    )
  )
  stitch = jax.jit(
    jax.shard_map(
      lambda parts: jnp.concatenate(parts)[:s],
      mesh=mesh,
      in_specs=(P(banks.DATA_AXIS),),
      out_specs=P(banks.DATA_AXIS),
    )
  )
  return stitch(parts)
