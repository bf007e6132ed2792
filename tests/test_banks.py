"""Tests for aikd_jax.banks: row layout, example ids, epoch orders, banks."""

import chex
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from aikd_jax import banks

# --- RowLayout ---------------------------------------------------------------


@pytest.mark.parametrize(
  "n, d, rows_per_device, num_rows, valid",
  [
    (203, 4, 51, 204, [51, 51, 51, 50]),
    (256, 8, 32, 256, [32] * 8),
    (300, 8, 38, 304, [38] * 7 + [34]),
    (7, 1, 7, 7, [7]),
    # More devices than a full share: trailing devices own padding only,
    # and valid_rows clips at 0 rather than going negative.
    (9, 8, 2, 16, [2, 2, 2, 2, 1, 0, 0, 0]),
  ],
)
def test_row_layout_arithmetic(n, d, rows_per_device, num_rows, valid):
  layout = banks.RowLayout(n, d)
  assert layout.rows_per_device == rows_per_device == -(-n // d)
  assert layout.num_rows == num_rows == rows_per_device * d
  assert [layout.valid_rows(i) for i in range(d)] == valid
  assert sum(valid) == n
  assert layout.num_rows - n < d  # at most D - 1 padding rows


@pytest.mark.parametrize(
  "n, d, batch, steps",
  [
    (203, 4, 8, 6),  # last device has 50 rows: 6 full batches, 2 skipped
    (203, 4, 51, 0),  # the last device cannot fill one batch of 51
    (203, 4, 50, 1),
    (256, 8, 32, 1),
    (256, 8, 5, 6),  # 32 // 5, remainder 2 per device skipped
    (300, 8, 4, 8),  # limited by the last device's 34 rows
    (250, 1, 32, 7),  # 26 examples skipped each epoch
    (9, 8, 1, 0),  # devices with no data: no full batch anywhere
  ],
)
def test_steps_per_epoch_skips_the_remainder(n, d, batch, steps):
  layout = banks.RowLayout(n, d)
  assert layout.steps_per_epoch(batch) == steps
  # Every device can serve that many batches, and not one more everywhere.
  assert all(layout.valid_rows(i) >= steps * batch for i in range(d))
  assert min(layout.valid_rows(i) for i in range(d)) < (steps + 1) * batch


# --- example ids -------------------------------------------------------------


def test_example_ids_is_a_seeded_permutation():
  ids = banks.example_ids(203, seed=3)
  chex.assert_shape(ids, (203,))
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(np.sort(ids), np.arange(203))
  np.testing.assert_array_equal(ids, banks.example_ids(203, seed=3))
  assert not np.array_equal(ids, banks.example_ids(203, seed=4))
  assert not np.array_equal(ids, np.arange(203))


def test_example_ids_spread_a_sorted_dataset_over_devices():
  """A dataset sorted by class must not give one device one class."""
  n, d, c = 1000, 8, 10
  labels = np.repeat(np.arange(c), n // c)  # sorted by class
  layout = banks.RowLayout(n, d)
  labels_by_id = banks.arrange_by_id(
    labels, banks.example_ids(n, 0), layout.num_rows, fill=-1
  )
  s = layout.rows_per_device
  for dev in range(d):
    block = labels_by_id[dev * s : (dev + 1) * s]
    counts = np.bincount(block[block >= 0], minlength=c)
    assert (counts > 0).sum() == c, (dev, counts)
    assert counts.max() < 0.3 * s, (dev, counts)


# --- arrange_by_id -----------------------------------------------------------


def test_arrange_by_id_places_rows_by_id():
  n, num_rows = 13, 16
  ids = banks.example_ids(n, seed=0)
  values = np.stack([np.arange(n), 10 * np.arange(n) + 1], -1).astype(np.int64)
  out = banks.arrange_by_id(values, ids, num_rows, fill=-7)
  chex.assert_shape(out, (num_rows, 2))
  assert out.dtype == values.dtype
  for i in range(n):
    np.testing.assert_array_equal(out[ids[i]], values[i])
  np.testing.assert_array_equal(out[n:], np.full((num_rows - n, 2), -7))

  labels = np.arange(n, dtype=np.int32) % 3
  lab = banks.arrange_by_id(labels, ids, num_rows, fill=-1)
  chex.assert_shape(lab, (num_rows,))
  assert lab.dtype == np.int32
  np.testing.assert_array_equal(lab[ids], labels)
  np.testing.assert_array_equal(lab[n:], [-1, -1, -1])

  images = np.arange(n * 4, dtype=np.uint8).reshape(n, 2, 2, 1)
  img = banks.arrange_by_id(images, ids, num_rows)
  chex.assert_shape(img, (num_rows, 2, 2, 1))
  np.testing.assert_array_equal(img[ids], images)
  assert not img[n:].any()


# --- epoch_order -------------------------------------------------------------


def _blocks(order, layout):
  s = layout.rows_per_device
  return [order[d * s : (d + 1) * s] for d in range(layout.num_devices)]


@pytest.mark.parametrize("n, d", [(203, 4), (300, 8), (64, 1), (9, 8)])
def test_epoch_order_is_a_local_permutation_with_valid_rows_first(n, d):
  layout = banks.RowLayout(n, d)
  s = layout.rows_per_device
  order = banks.epoch_order(layout, seed=0, epoch=0)
  chex.assert_shape(order, (layout.num_rows,))
  assert order.dtype == np.int32
  for dev, block in enumerate(_blocks(order, layout)):
    valid = layout.valid_rows(dev)
    np.testing.assert_array_equal(np.sort(block), np.arange(s))
    # Valid rows first (shuffled), then the padding rows in order.
    np.testing.assert_array_equal(np.sort(block[:valid]), np.arange(valid))
    np.testing.assert_array_equal(block[valid:], np.arange(valid, s))
  # Global rows (local row + d * S) read in the epoch are real examples only.
  steps = layout.steps_per_epoch(2)
  for dev, block in enumerate(_blocks(order, layout)):
    assert np.all(block[: steps * 2] + dev * s < n)


def test_epoch_order_is_deterministic_and_varies_by_epoch_and_seed():
  layout = banks.RowLayout(203, 4)
  base = banks.epoch_order(layout, seed=0, epoch=0)
  np.testing.assert_array_equal(base, banks.epoch_order(layout, 0, 0))
  other_epoch = banks.epoch_order(layout, 0, 1)
  other_seed = banks.epoch_order(layout, 1, 0)
  for a, b in zip(_blocks(base, layout), _blocks(other_epoch, layout)):
    assert not np.array_equal(a, b)
  for a, b in zip(_blocks(base, layout), _blocks(other_seed, layout)):
    assert not np.array_equal(a, b)
  # Devices shuffle independently: blocks of equal length differ.
  blocks = _blocks(base, layout)
  assert not np.array_equal(blocks[0], blocks[1])


def test_epoch_order_skips_a_different_remainder_each_epoch():
  layout = banks.RowLayout(250, 1)
  batch = 32
  steps = layout.steps_per_epoch(batch)
  assert steps == 7
  skipped = [
    set(banks.epoch_order(layout, 0, e)[steps * batch : 250].tolist())
    for e in range(3)
  ]
  assert all(len(s) == 26 for s in skipped)
  assert skipped[0] != skipped[1] and skipped[1] != skipped[2]


# --- initial_prediction_bank -------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_initial_prediction_bank_one_device(dtype):
  n, c = 203, 10
  layout = banks.RowLayout(n, 4)  # 204 rows: one padding row
  rng = np.random.default_rng(0)
  labels = rng.integers(0, c, n).astype(np.int32)
  ids = banks.example_ids(n, 0)
  labels_by_id = banks.arrange_by_id(labels, ids, layout.num_rows, fill=-1)
  mesh = banks.data_mesh(jax.devices()[:1])

  bank = banks.initial_prediction_bank(labels_by_id, c, dtype, mesh)
  chex.assert_shape(bank, (layout.num_rows, c))
  assert bank.dtype == jnp.dtype(dtype)
  assert bank.sharding.spec == P("data")
  assert bank.sharding.is_equivalent_to(banks.data_sharding(mesh), 2)

  host = np.asarray(bank.astype(jnp.float32))
  expected = np.zeros((layout.num_rows, c), np.float32)
  expected[
    np.arange(layout.num_rows)[labels_by_id >= 0],
    labels_by_id[labels_by_id >= 0],
  ] = 1.0
  np.testing.assert_array_equal(host, expected)
  np.testing.assert_array_equal(host[ids], np.eye(c)[labels])
  np.testing.assert_array_equal(host[n:], np.zeros((1, c)))
  np.testing.assert_array_equal(host.sum(-1), (labels_by_id >= 0) * 1.0)


def _eight_device_banks(devices):
  """The banks and the image array of the test below, on 8 devices.

  Returns what the test checks, as plain values: per dtype the bank's
  shape, dtype, spec and each shard's device, rows and contents.
  """
  n, c = 203, 10
  layout = banks.RowLayout(n, 8)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, c, n).astype(np.int32)
  ids = banks.example_ids(n, 0)
  labels_by_id = banks.arrange_by_id(labels, ids, layout.num_rows, fill=-1)
  mesh = banks.data_mesh(devices)
  out = {"mesh_devices": int(mesh.devices.size)}
  for name in ("float32", "bfloat16"):
    bank = banks.initial_prediction_bank(labels_by_id, c, name, mesh)
    shards = []
    for sh in sorted(bank.addressable_shards, key=lambda s: s.device.id):
      rows = sh.index[0]
      data = np.asarray(sh.data.astype(jnp.float32))
      want = np.zeros_like(data)
      lab = labels_by_id[rows]
      want[np.arange(len(lab))[lab >= 0], lab[lab >= 0]] = 1.0
      shards.append(
        dict(
          device=list(mesh.devices).index(sh.device),
          shape=list(sh.data.shape),
          dtype=str(sh.data.dtype),
          start=rows.start,
          stop=rows.stop,
          matches=bool(np.array_equal(data, want)),
          row_sums=float(data.sum()),
        )
      )
    out[name] = dict(
      shape=list(bank.shape),
      dtype=str(bank.dtype),
      spec=str(bank.sharding.spec),
      shards=shards,
    )
  images = np.zeros((n, 8, 8, 1), np.uint8)
  img = banks.put_sharded(
    banks.arrange_by_id(images, ids, layout.num_rows), mesh
  )
  out["image_shards"] = sorted(
    {tuple(s.data.shape) for s in img.addressable_shards}
  )
  return out


def test_initial_prediction_bank_shards_on_eight_devices(eight_devices):
  assert len(eight_devices) == 8, eight_devices
  out = _eight_device_banks(eight_devices)
  layout = banks.RowLayout(203, 8)
  s = layout.rows_per_device
  assert (s, layout.num_rows) == (26, 208)
  assert out["mesh_devices"] == 8
  for name in ("float32", "bfloat16"):
    info = out[name]
    assert info["shape"] == [208, 10]
    assert info["dtype"] == name
    assert info["spec"] == str(P("data"))
    assert len(info["shards"]) == 8
    for d, sh in enumerate(info["shards"]):
      assert sh["device"] == d
      assert sh["shape"] == [s, 10]
      assert sh["dtype"] == name
      assert (sh["start"], sh["stop"]) == (d * s, (d + 1) * s)
      assert sh["matches"], sh
      # One one-hot row per real example; device 7 holds 21 real rows.
      assert sh["row_sums"] == layout.valid_rows(d)
  assert [tuple(x) for x in out["image_shards"]] == [(26, 8, 8, 1)]


def test_partner_rows_pair_local_rows_of_the_same_class():
  layout = banks.RowLayout(37, 4)  # S = 10, last device 7 valid rows.
  labels = np.random.default_rng(0).integers(0, 3, 37).astype(np.int32)
  labels_by_id = banks.arrange_by_id(
    labels, banks.example_ids(37, 0), layout.num_rows, fill=-1
  )
  partners = banks.partner_rows(layout, labels_by_id, seed=0, epoch=0)
  chex.assert_shape(partners, (layout.num_rows,))
  s = layout.rows_per_device
  for d in range(4):
    block = partners[d * s : (d + 1) * s]
    valid = layout.valid_rows(d)
    assert np.all((block >= 0) & (block < valid) | (np.arange(s) >= valid))
    local_labels = labels_by_id[d * s : (d + 1) * s]
    np.testing.assert_array_equal(
      local_labels[block[:valid]], local_labels[:valid]
    )
    # Padding rows point at themselves.
    np.testing.assert_array_equal(block[valid:], np.arange(valid, s))
  again = banks.partner_rows(layout, labels_by_id, seed=0, epoch=0)
  np.testing.assert_array_equal(partners, again)
  other = banks.partner_rows(layout, labels_by_id, seed=0, epoch=1)
  assert not np.array_equal(partners, other)
