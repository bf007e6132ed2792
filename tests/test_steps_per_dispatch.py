"""Several steps per dispatch: the same steps, whatever K > 1 is.

The same two epochs (4 steps each) are run with K = 2 and 3 steps per call,
grouped as the loop groups them (K = 3: a call of 3, then the epoch's last
step alone, with the same program); parameters, BatchNorm statistics,
optimiser states, the prediction bank and every step's metrics must agree
bit for bit (on a CPU; to rounding on a GPU). Against K = 1 (the plain
one-step program) they agree only to float rounding: XLA compiles a loop
body differently from a top-level program (measured on CPU: state leaves
differ in their last bits), so that comparison has a tolerance."""

import re

import jax
import numpy as np
import pytest
import test_train_step as tts

from aikd_jax import banks
from aikd_jax import dispatch

# Compiled with most XLA optimisations off (conftest.py), like
# test_train_step: about half the compile time. The whole runs of
# test_dispatch_loop.py check the same equalities on optimised programs.
pytestmark = pytest.mark.usefixtures("fast_compilation")

N, C, B = 64, 10, 16
K = 3


def _setup(mesh, layout, steps_per_dispatch, method="ps_kd", num_epochs=2):
  return tts.build_setup(
    mesh,
    layout,
    tts.random_dataset(N, C, seed=3),
    banks.example_ids(N, 0),
    method=method,
    per_device_batch=B // mesh.devices.size,
    steps_per_epoch=layout.steps_per_epoch(B // mesh.devices.size),
    num_epochs=num_epochs,
    num_classes=C,
    steps_per_dispatch=steps_per_dispatch,
  )


def _run(mesh, layout, steps_per_dispatch, method, num_epochs=2):
  """Trains `num_epochs` epochs grouped as the loop groups them; returns the
  final snapshot, each step's metrics and the call lengths used."""
  setup = _setup(mesh, layout, steps_per_dispatch, method, num_epochs)
  spe = setup.config.steps_per_epoch
  carry, metrics, lengths, step = setup.carry, [], [], 0
  for epoch in range(num_epochs):
    data = setup.data(banks.epoch_order(layout, seed=0, epoch=epoch))
    while step < (epoch + 1) * spe:
      n = dispatch.call_length(step, (epoch + 1) * spe, steps_per_dispatch)
      if steps_per_dispatch == 1:
        carry, m = setup.step_fn(carry, data)
        metrics.append(jax.device_get(m))
      else:
        carry, m = setup.step_fn(carry, data, np.int32(n))
        m = jax.device_get(m)
        assert all(v.shape[0] == steps_per_dispatch for v in m.values())
        # Rows past the call's steps stay zero.
        assert all(not np.any(v[n:]) for v in m.values())
        metrics += [{k: v[i] for k, v in m.items()} for i in range(n)]
      lengths.append(n)
      step += n
  return tts.snapshot(carry), metrics, lengths


def _assert_same_steps(a, b):
  """Bit for bit on a CPU, where the README claims it. On a GPU each
  compiled program picks its own convolution algorithms (an H200 run found
  K = 2 and K = 4 one byte apart in the bank): there, to rounding."""
  if jax.default_backend() == "cpu":
    _assert_bitwise_equal(a, b)
  else:
    jax.tree.map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5),
      a,
      b,
    )


def _assert_bitwise_equal(a, b):
  flat_a = jax.tree_util.tree_flatten_with_path(a)[0]
  flat_b = jax.tree_util.tree_flatten_with_path(b)[0]
  assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
  for (path, x), (_, y) in zip(flat_a, flat_b):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape, path
    assert x.tobytes() == y.tobytes(), jax.tree_util.keystr(path)


@pytest.mark.parametrize(
  "method", [pytest.param("ai_kd", marks=pytest.mark.slow), "ps_kd"]
)
def test_any_k_above_one_gives_bitwise_the_same_steps(method):
  mesh = tts.one_device_mesh()
  layout = banks.RowLayout(N, 1)
  assert layout.steps_per_epoch(B) == 4
  runs = {k: _run(mesh, layout, k, method) for k in (2, 3)}
  assert runs[2][2] == [2, 2, 2, 2]
  assert runs[3][2] == [3, 1, 3, 1]  # 4 is not a multiple of 3
  assert runs[3][0]["step"] == 8
  _assert_same_steps(runs[2][0], runs[3][0])
  _assert_same_steps(runs[2][1], runs[3][1])
  # Not vacuous: the metrics vary by step.
  assert len({float(m["loss/student"]) for m in runs[3][1]}) > 1


def test_a_full_call_has_a_trip_count_xla_knows():
  """XLA:GPU reads an unknown trip count's loop condition back to the host
  after every iteration; a full call of K steps must not have one."""
  layout = banks.RowLayout(N, 1)
  setup = _setup(tts.one_device_mesh(), layout, K)
  data = setup.data(banks.epoch_order(layout, seed=0, epoch=0))
  counts = {}
  for n in (K, 1):
    text = setup.step_fn.lower(setup.carry, data, n).compile().as_text()
    counts[n] = set(re.findall(r'known_trip_count":\{"n":"(\d+)"', text))
  assert str(K) in counts[K]
  assert str(K) not in counts[1]


def test_k_above_one_matches_one_step_per_call_to_rounding():
  mesh = tts.one_device_mesh()
  layout = banks.RowLayout(N, 1)
  one, one_metrics, _ = _run(mesh, layout, 1, "ai_kd")
  many, many_metrics, _ = _run(mesh, layout, K, "ai_kd")
  for key in ("params", "batch_stats", "disc_params", "bank"):
    jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      one[key],
      many[key],
    )
  for a, b in zip(one_metrics, many_metrics):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # about 30 s on 2 cores
def test_k_steps_per_call_on_eight_devices(eight_devices):
  mesh = banks.data_mesh(eight_devices)
  layout = banks.RowLayout(N, 8)
  two, two_metrics, _ = _run(mesh, layout, 2, "ai_kd", num_epochs=1)
  many, many_metrics, lengths = _run(mesh, layout, K, "ai_kd", num_epochs=1)
  assert lengths[0] == K
  _assert_bitwise_equal(two, many)
  _assert_bitwise_equal(two_metrics, many_metrics)


@pytest.mark.parametrize("num_steps", [K, 1])  # Full and shorter calls.
def test_scanned_step_updates_the_bank_in_place(num_steps):
  layout = banks.RowLayout(N, 1)
  setup = _setup(tts.one_device_mesh(), layout, K)
  data = setup.data(banks.epoch_order(layout, seed=0, epoch=0))
  bank = setup.carry.prediction_bank
  token = "f32[%s]" % ",".join(map(str, bank.shape))
  text = setup.step_fn.lower(setup.carry, data, num_steps).compile().as_text()
  copies = [
    line
    for line in text.splitlines()
    if re.search(r"=\s*" + re.escape(token) + r"(\{[^}]*\})?\s+copy\(", line)
  ]
  assert not copies, copies
  # Not vacuous: a loop carries the bank and a scatter writes it.
  assert "while(" in text and token in text and "scatter" in text


@pytest.mark.parametrize(
  "step, epoch_end, k, expected",
  [(0, 4, 3, 3), (3, 4, 3, 1), (0, 3, 3, 3), (2, 10, 1, 1), (8, 10, 4, 2)],
)
def test_call_length(step, epoch_end, k, expected):
  assert dispatch.call_length(step, epoch_end, k) == expected


def test_crossed():
  assert dispatch.crossed(18, 21, 20)
  assert dispatch.crossed(17, 20, 20)
  assert not dispatch.crossed(20, 23, 20)
  assert not dispatch.crossed(0, 19, 20)
