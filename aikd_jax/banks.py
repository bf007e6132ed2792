"""Example ids, the per-device row layout, and the banks indexed by them.

Every per-example array on device (the prediction bank, the teacher-logit
bank, the training images and labels) has shape [N_pad, ...] with row r
holding the example whose id is r, and is sharded along axis 0 over the
mesh's data axis: device d owns rows [d*S, (d+1)*S). Each device draws its
batches only from its own rows, so bank reads and writes never cross devices.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

DATA_AXIS = "data"


@dataclasses.dataclass(frozen=True)
class RowLayout:
  """How N examples spread over D devices in rows of S."""

  num_examples: int
  num_devices: int

  @property
  def rows_per_device(self) -> int:
    return -(-self.num_examples // self.num_devices)

  @property
  def num_rows(self) -> int:
    return self.rows_per_device * self.num_devices

  def valid_rows(self, device: int) -> int:
    """How many of device `device`'s rows hold a real example."""
    start = device * self.rows_per_device
    return int(np.clip(self.num_examples - start, 0, self.rows_per_device))

  def steps_per_epoch(self, per_device_batch: int) -> int:
    """Full batches every device can draw; the remainder is skipped."""
    return (
      min(self.valid_rows(d) for d in range(self.num_devices))
      // per_device_batch
    )


def example_ids(num_examples: int, seed: int) -> np.ndarray:
  """ids[i]: the stable id of dataset index i, a seeded permutation.

  A permutation rather than the identity so that a dataset sorted by class
  does not give each device one class.
  """
  return (
    np.random.default_rng([seed, 0x1D5])
    .permutation(num_examples)
    .astype(np.int32)
  )


def arrange_by_id(
  values: np.ndarray, ids: np.ndarray, num_rows: int, fill=0
) -> np.ndarray:
  """Host array with row ids[i] = values[i]; padding rows hold `fill`."""
  out = np.full((num_rows,) + values.shape[1:], fill, values.dtype)
  out[ids] = values
  return out


def put_by_id(
  values: np.ndarray,
  ids: np.ndarray,
  num_rows: int,
  mesh: jax.sharding.Mesh,
  fill=0,
) -> jax.Array:
  """Device array with row ids[i] = values[i], sharded by rows.

  Each process builds only the row blocks its own devices hold, so on a
  multi-host run no host arranges (or uploads) another host's examples.
  """
  index_of_id = np.full((num_rows,), -1, np.int64)
  index_of_id[ids] = np.arange(len(ids))

  def rows(index):
    block = index_of_id[index[0]]
    out = np.full((len(block),) + values.shape[1:], fill, values.dtype)
    out[block >= 0] = values[block[block >= 0]]
    return out

  shape = (num_rows,) + values.shape[1:]
  return jax.make_array_from_callback(shape, data_sharding(mesh), rows)


def data_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_sharded(host_array: np.ndarray, mesh: jax.sharding.Mesh) -> jax.Array:
  """Places a host array sharded by rows; each process supplies its rows."""
  sharding = data_sharding(mesh)
  return jax.make_array_from_callback(
    host_array.shape, sharding, lambda index: host_array[index]
  )


def initial_prediction_bank(
  labels_by_id: np.ndarray, num_classes: int, dtype, mesh: jax.sharding.Mesh
) -> jax.Array:
  """The prediction bank before epoch 0: each row the one-hot label.

  docs/method.md sets a row to onehot(y) before it is first read in epoch 0;
  holding the one-hot from the start is the same for every row read in epoch
  0 and well defined for rows skipped as a remainder. Padding rows hold 0.
  """
  bank = np.zeros((labels_by_id.shape[0], num_classes), np.float32)
  bank[np.arange(labels_by_id.shape[0]), labels_by_id] = 1.0
  bank[labels_by_id < 0] = 0.0
  return put_sharded(bank.astype(jnp.dtype(dtype)), mesh)


def epoch_order(layout: RowLayout, seed: int, epoch: int) -> np.ndarray:
  """Each device's shuffled local rows for one epoch, concatenated.

  Row block d (length S) lists device d's local row indices in this epoch's
  order: its valid rows shuffled by (seed, epoch, d), then its padding rows,
  which are never reached because every device takes the same number of
  full batches. Computed on the host once per epoch (S integers a device).
  """
  s = layout.rows_per_device
  order = np.empty((layout.num_rows,), np.int32)
  for d in range(layout.num_devices):
    valid = layout.valid_rows(d)
    rng = np.random.default_rng([seed, epoch, d, 0xE0])
    order[d * s : d * s + valid] = rng.permutation(valid)
    order[d * s + valid : (d + 1) * s] = np.arange(valid, s)
  return order


def data_mesh(devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh over all (or the given) devices with the axis 'data'."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,))


def partner_rows(
  layout: RowLayout, labels_by_id: np.ndarray, seed: int, epoch: int
) -> np.ndarray:
  """CS-KD's pairing: for each row, a local row of the same class.

  Drawn per device and epoch (seeded by seed, epoch, device) among the
  device's own valid rows, so a pair never crosses devices; an example may
  be its own partner, as in CS-KD, so every example has one. Padding rows
  point at themselves.
  """
  s = layout.rows_per_device
  partners = np.tile(np.arange(s, dtype=np.int32), layout.num_devices)
  for d in range(layout.num_devices):
    labels = labels_by_id[d * s : d * s + layout.valid_rows(d)]
    rng = np.random.default_rng([seed, epoch, d, 0xC5])
    for label in np.unique(labels):
      members = np.flatnonzero(labels == label).astype(np.int32)
      partners[d * s + members] = rng.choice(members, size=members.size)
  return partners
