"""Tests for aikd_jax.train_step: the jitted, shard_mapped AI-KD step.

Multi-device checks run in this process on 8 of the session's fake CPU
devices (see conftest.py), next to 1-device runs of the same setup code.
"""

import dataclasses
import math
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aikd_jax import banks
from aikd_jax import models
from aikd_jax import optim
from aikd_jax import train_step as ts
from aikd_jax.objective import resolve_objective

# Compiled with most XLA optimisations off (conftest.py): like with like.
pytestmark = pytest.mark.usefixtures("fast_compilation")

IMAGE_SHAPE = (8, 8, 1)
MEAN, STD = (0.5,), (0.25,)


# --- shared setup ------------------------------------------------------------


def random_dataset(n, c, seed=0):
  """Random uint8 images, labels and teacher logits, by dataset index."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n,) + IMAGE_SHAPE, dtype=np.uint8)
  labels = rng.integers(0, c, n).astype(np.int32)
  teacher_logits = (2.0 * rng.normal(size=(n, c))).astype(np.float32)
  return images, labels, teacher_logits


def quadrant_dataset(n, c, seed=0):
  """A learnable problem: class k lights up image quadrant k (c <= 4)."""
  assert c <= 4
  rng = np.random.default_rng(seed)
  labels = (np.arange(n) % c).astype(np.int32)
  rng.shuffle(labels)
  images = np.full((n,) + IMAGE_SHAPE, 40.0)
  for i, k in enumerate(labels):
    y, x = divmod(int(k), 2)
    images[i, 4 * y : 4 * y + 4, 4 * x : 4 * x + 4] = 200.0
  images = np.clip(images + rng.normal(0, 30, images.shape), 0, 255)
  teacher_logits = (4.0 * np.eye(c)[labels] + rng.normal(size=(n, c))).astype(
    np.float32
  )
  return images.astype(np.uint8), labels, teacher_logits


@dataclasses.dataclass
class Setup:
  mesh: jax.sharding.Mesh
  layout: banks.RowLayout
  config: ts.StepConfig
  step_fn: object
  carry: ts.TrainState
  images: jax.Array
  labels: jax.Array
  teacher_bank: jax.Array
  labels_by_id: np.ndarray

  def data(self, order: np.ndarray) -> ts.StepData:
    order = banks.put_sharded(np.asarray(order, np.int32), self.mesh)
    return ts.StepData(
      self.images, self.labels, order, ts.Teacher(logits=self.teacher_bank)
    )


def build_setup(
  mesh,
  layout,
  dataset,
  ids,
  *,
  method="ai_kd",
  overrides=None,
  per_device_batch,
  steps_per_epoch,
  num_epochs,
  num_classes,
  bank_dtype="float32",
  seed=0,
  base_lr=0.05,
  crop_padding=1,
  flip=True,
  wrap_local_step=None,
  steps_per_dispatch=1,
) -> Setup:
  images, labels, teacher_logits = dataset
  objective = resolve_objective(method, overrides)
  config = ts.StepConfig(
    objective=objective,
    num_classes=num_classes,
    num_epochs=num_epochs,
    steps_per_epoch=steps_per_epoch,
    per_device_batch=per_device_batch,
    rows_per_device=layout.rows_per_device,
    seed=seed,
    crop_padding=crop_padding,
    flip=flip,
    mean=MEAN,
    std=STD,
    sync_batch_norm=True,
  )
  model = models.create_model("tiny_cnn", num_classes, bn_axis_name="data")
  init_model = models.create_model("tiny_cnn", num_classes)
  discriminator = models.Discriminator()
  lr = optim.student_learning_rate(base_lr, (), 0.1, steps_per_epoch)
  tx = optim.student_optimizer(
    lr, momentum=0.9, nesterov=True, weight_decay=5e-4
  )
  disc_tx = optim.discriminator_optimizer(2e-4, 0.5, 0.999)
  replicated = banks.replicated(mesh)
  student = jax.jit(
    lambda: ts.create_classifier_state(
      init_model, IMAGE_SHAPE, tx, jax.random.key(seed)
    ),
    out_shardings=replicated,
  )()
  disc = jax.jit(
    lambda: ts.create_discriminator_state(
      discriminator, num_classes, disc_tx, jax.random.key(seed + 1)
    ),
    out_shardings=replicated,
  )()
  rows = layout.num_rows
  labels_by_id = banks.arrange_by_id(labels, ids, rows, fill=-1)
  setup = Setup(
    mesh=mesh,
    layout=layout,
    config=config,
    step_fn=ts.make_train_step(
      mesh,
      config,
      model=model,
      discriminator=discriminator,
      learning_rate=lr,
      wrap_local_step=wrap_local_step,
      steps_per_dispatch=steps_per_dispatch,
    ),
    carry=ts.TrainState(
      student,
      disc,
      banks.initial_prediction_bank(
        labels_by_id, num_classes, bank_dtype, mesh
      ),
    ),
    images=banks.put_sharded(banks.arrange_by_id(images, ids, rows), mesh),
    labels=banks.put_sharded(labels_by_id, mesh),
    teacher_bank=banks.put_sharded(
      banks.arrange_by_id(teacher_logits, ids, rows), mesh
    ),
    labels_by_id=labels_by_id,
  )
  return setup


def snapshot(carry: ts.TrainState) -> dict:
  """Host copies of everything the step updates (the carry is donated)."""
  get = lambda x: jax.tree_util.tree_map(np.asarray, jax.device_get(x))
  return dict(
    params=get(carry.student.params),
    batch_stats=get(carry.student.batch_stats),
    opt_state=get(carry.student.opt_state),
    step=int(carry.student.step),
    disc_params=get(carry.discriminator.params),
    disc_opt_state=get(carry.discriminator.opt_state),
    disc_step=int(carry.discriminator.step),
    bank=np.asarray(carry.prediction_bank.astype(jnp.float32)),
    bank_dtype=str(carry.prediction_bank.dtype),
  )


def host_metrics(metrics) -> dict:
  return {k: float(v) for k, v in metrics.items()}


def one_device_mesh():
  return banks.data_mesh(jax.devices()[:1])


# --- HLO parsing -------------------------------------------------------------

_MOVING_COLLECTIVE = re.compile(
  r"\b(all-gather|all-to-all|collective-permute|reduce-scatter)"
  r"(-start|-done)?\("
)
_ALL_REDUCE = re.compile(r"\ball-reduce(-start|-done)?\(")
_SHAPE = re.compile(r"\b(?:pred|bf16|[suf]\d+|c\d+|f8\w*)\[([0-9,]*)\]")


def _shapes(line):
  return [
    tuple(int(x) for x in dims.split(",") if x) for dims in _SHAPE.findall(line)
  ]


def bank_sized_collectives(hlo_text, num_rows, num_classes):
  """Lines of data-moving collectives with an operand/result of bank size.

  Bank-sized: leading dim >= N_pad, or at least N_pad * C elements. For
  all-reduce (the gradients, some larger than the bank) only the leading
  dimension counts.
  """
  bad = []
  for line in hlo_text.splitlines():
    if _MOVING_COLLECTIVE.search(line):
      if any(
        s and (s[0] >= num_rows or math.prod(s) >= num_rows * num_classes)
        for s in _shapes(line)
      ):
        bad.append(line.strip())
    elif _ALL_REDUCE.search(line):
      if any(s and s[0] >= num_rows for s in _shapes(line)):
        bad.append(line.strip())
  return bad


def test_bank_sized_collectives_parser():
  hlo = "\n".join(
    [
      "  %all-gather.1 = f32[304,10]{1,0} all-gather(f32[38,10]{1,0} %p), "
      "channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}",
      "  %ag2 = (f32[8]{0}, u32[]) all-gather-start(f32[1]{0} %q), "
      "dimensions={0}",
      "  %cp = bf16[38,10]{1,0} collective-permute(bf16[38,10]{1,0} %b), "
      "source_target_pairs={{0,1}}",
      "  %ar = (f32[256,256]{1,0}, f32[3,3,16,32]{3,2,1,0}) all-reduce("
      "f32[256,256]{1,0} %g0, f32[3,3,16,32]{3,2,1,0} %g1), to_apply=%sum",
      "  %ar2 = f32[304,10]{1,0} all-reduce(f32[304,10]{1,0} %bank)",
      "  %add = f32[304,10]{1,0} add(f32[304,10]{1,0} %all-gather.1, "
      "f32[304,10]{1,0} %x)",
    ]
  )
  bad = bank_sized_collectives(hlo, num_rows=304, num_classes=10)
  assert len(bad) == 2
  assert bad[0].startswith("%all-gather.1")
  assert bad[1].startswith("%ar2")
  assert _shapes("%cp = bf16[38,10]{1,0} collective-permute(") == [(38, 10)]


# --- 1 vs 8 devices ---------------------------------------------------------

EIGHT_N, EIGHT_C, EIGHT_B, EIGHT_STEPS = 300, 10, 4, 3


def _eight_vs_one_device_run(devices):
  """Runs the same global batches on 8 devices and on 1; returns the results.

  Also returns the compiled HLO of the 8-device step, and of a deliberately
  bank-gathering function (to prove the HLO check can see a violation).
  """
  from jax.sharding import PartitionSpec as P

  assert len(devices) == 8, devices
  n, c, b, steps = EIGHT_N, EIGHT_C, EIGHT_B, EIGHT_STEPS
  dataset = random_dataset(n, c, seed=1)
  ids = banks.example_ids(n, seed=0)

  layout8 = banks.RowLayout(n, 8)
  s8 = layout8.rows_per_device
  spe = layout8.steps_per_epoch(b)
  assert spe > steps  # both runs stay in epoch 0
  chex.clear_trace_counter()
  eight = build_setup(
    banks.data_mesh(devices),
    layout8,
    dataset,
    ids,
    per_device_batch=b,
    steps_per_epoch=spe,
    num_epochs=2,
    num_classes=c,
    wrap_local_step=chex.assert_max_traces(n=1),
  )
  order8 = banks.epoch_order(layout8, seed=0, epoch=0)
  data8 = eight.data(order8)
  initial = snapshot(eight.carry)

  step_hlo = eight.step_fn.lower(eight.carry, data8).compile().as_text()
  gather = jax.jit(
    jax.shard_map(
      lambda x: jax.lax.all_gather(x, "data", tiled=True),
      mesh=eight.mesh,
      in_specs=P("data"),
      out_specs=P(),
      check_vma=False,
    )
  )
  gather_hlo = gather.lower(eight.carry.prediction_bank).compile().as_text()

  carry, metrics8, first8 = eight.carry, [], None
  for k in range(steps):
    carry, m = eight.step_fn(carry, data8)
    metrics8.append(host_metrics(m))
    first8 = snapshot(carry) if k == 0 else first8
  result8 = snapshot(carry)

  # Keep going into epoch 1 with a new epoch order: no retrace (the wrapped
  # local step raises on a second trace), no new XLA compilation.
  compiles = []
  listener = lambda event, secs, **kw: (
    compiles.append(event)
    if (event == "/jax/core/compile/backend_compile_duration")
    else None
  )
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for k in range(steps, 2 * spe):
      if k == spe:
        data8 = eight.data(banks.epoch_order(layout8, seed=0, epoch=1))
      carry, m = eight.step_fn(carry, data8)
    final_alpha = float(m["train/alpha"])
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  retrace = dict(
    compiles=len(compiles),
    cache_size=int(eight.step_fn._cache_size()),
    final_step=int(carry.student.step),
    final_alpha=final_alpha,
  )

  # The global ids of each 8-device step's batch, device by device.
  batch_ids = [
    np.concatenate(
      [order8[d * s8 + k * b : d * s8 + (k + 1) * b] + d * s8 for d in range(8)]
    )
    for k in range(steps)
  ]
  seen = np.concatenate(batch_ids)
  order1 = np.concatenate([seen, np.setdiff1d(np.arange(n), seen)])
  layout1 = banks.RowLayout(n, 1)
  assert layout1.num_rows == n and order1.shape == (n,)
  one = build_setup(
    banks.data_mesh(devices[:1]),
    layout1,
    dataset,
    ids,
    per_device_batch=8 * b,
    steps_per_epoch=spe,
    num_epochs=2,
    num_classes=c,
  )
  data1 = one.data(order1)
  carry, metrics1, first1 = one.carry, [], None
  for k in range(steps):
    carry, m = one.step_fn(carry, data1)
    metrics1.append(host_metrics(m))
    first1 = snapshot(carry) if k == 0 else first1
  result1 = snapshot(carry)

  results = dict(
    initial=initial,
    eight=result8,
    one=result1,
    first_eight=first8,
    first_one=first1,
    retrace=retrace,
    metrics8=metrics8,
    metrics1=metrics1,
    batch_ids=batch_ids,
    num_rows=layout8.num_rows,
    labels_by_id=eight.labels_by_id,
  )
  info = dict(num_rows=layout8.num_rows, steps_per_epoch=spe, **retrace)
  return dict(
    info=info, results=results, step_hlo=step_hlo, gather_hlo=gather_hlo
  )


@pytest.fixture(scope="module")
def eight_device_run(eight_devices):
  return _eight_vs_one_device_run(eight_devices)


def _max_abs_diff(a, b):
  leaves = jax.tree_util.tree_leaves(
    jax.tree_util.tree_map(
      lambda x, y: np.max(
        np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)),
        initial=0.0,
      ),
      a,
      b,
    )
  )
  return max(float(x) for x in leaves)


def test_eight_devices_equal_one_device(eight_device_run):
  r = eight_device_run["results"]
  n, c, steps = EIGHT_N, EIGHT_C, EIGHT_STEPS
  num_rows = r["num_rows"]
  assert num_rows == 304
  eight, one, initial = r["eight"], r["one"], r["initial"]
  assert eight["step"] == one["step"] == steps
  assert eight["disc_step"] == one["disc_step"] == steps
  chex.assert_shape(eight["bank"], (num_rows, c))
  chex.assert_shape(one["bank"], (n, c))

  # Not vacuous: the states moved and the visited bank rows were rewritten.
  assert _max_abs_diff(eight["params"], initial["params"]) > 1e-3
  assert _max_abs_diff(eight["disc_params"], initial["disc_params"]) > 1e-5
  seen = np.concatenate(r["batch_ids"])
  assert len(np.unique(seen)) == steps * 8 * EIGHT_B
  assert np.all(
    np.abs(eight["bank"][seen] - initial["bank"][seen]).max(-1) > 1e-3
  )
  unseen = np.setdiff1d(np.arange(num_rows), seen)
  np.testing.assert_array_equal(eight["bank"][unseen], initial["bank"][unseen])
  np.testing.assert_array_equal(eight["bank"][n:], 0.0)

  tol = dict(rtol=1e-5, atol=1e-5)
  report = {
    k: _max_abs_diff(eight[k], one[k])
    for k in (
      "params",
      "batch_stats",
      "opt_state",
      "disc_params",
      "disc_opt_state",
    )
  }
  report["bank"] = _max_abs_diff(eight["bank"][:n], one["bank"])
  print("max |8-device - 1-device| per group:", report)
  try:
    chex.assert_trees_all_close(eight["params"], one["params"], **tol)
    chex.assert_trees_all_close(eight["batch_stats"], one["batch_stats"], **tol)
    chex.assert_trees_all_close(eight["opt_state"], one["opt_state"], **tol)
    chex.assert_trees_all_close(eight["disc_params"], one["disc_params"], **tol)
    chex.assert_trees_all_close(
      eight["disc_opt_state"], one["disc_opt_state"], **tol
    )
    # The 8-device bank has padding rows [n, N_pad); rows are example ids.
    chex.assert_trees_all_close(eight["bank"][:n], one["bank"], **tol)
  except AssertionError as e:
    raise AssertionError(
      f"{steps} steps on 8 devices differ from the same global batches on "
      f"1 device; max abs differences: {report}. (If "
      "test_eight_device_gradients_are_global_batch_means fails too, the "
      f"gradients are summed over devices, not averaged.)\n{e}"
    ) from None

  metrics8, metrics1 = r["metrics8"], r["metrics1"]
  assert len(metrics8) == len(metrics1) == steps
  assert (
    set(metrics8[0])
    == set(metrics1[0])
    >= {
      "loss/prog",
      "loss/det",
      "loss/adv",
      "loss/disc",
      "loss/student",
      "train/train_acc",
      "train/alpha",
      "train/learning_rate",
    }
  )
  for m8, m1 in zip(metrics8, metrics1):
    chex.assert_trees_all_close(m8, m1, **tol)
    assert m8["train/alpha"] == pytest.approx(0.8 * 1 / 2)


def test_eight_device_gradients_are_global_batch_means(eight_device_run):
  """After one step, both optimisers saw the same gradient on 8 devices as on 1.

  The 1-device step's gradient is the mean over the global batch; so must be
  the 8-device step's (mean of the per-device means). Read back from the
  optimiser states: SGD's momentum trace after step 1 is g + wd * theta_0,
  Adam's first moment is (1 - b1) * g.
  """
  r = eight_device_run["results"]
  p0 = r["initial"]["params"]
  eight, one = r["first_eight"], r["first_one"]
  assert eight["step"] == one["step"] == 1
  student_grad = lambda snap: jax.tree_util.tree_map(
    lambda t, p: t - 5e-4 * p, snap["opt_state"][1][0].trace, p0
  )
  g8, g1 = student_grad(eight), student_grad(one)
  d8, d1 = eight["disc_opt_state"][0].mu, one["disc_opt_state"][0].mu
  ratio = lambda a, b: float(
    np.median(
      np.concatenate(
        [
          (x / y).ravel()
          for x, y in zip(
            jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
          )
        ]
      )
    )
  )
  student_ratio, disc_ratio = ratio(g8, g1), ratio(d8, d1)
  message = (
    f"8-device gradients are {student_ratio:.4g}x (student) and "
    f"{disc_ratio:.4g}x (discriminator) the 1-device gradients of the same "
    "global batch; expected 1x. Under jax.shard_map (check_vma=True), "
    "jax.grad w.r.t. the replicated (P()) params already psums over "
    "'data', so the lax.pmean that follows in train_step.py is a no-op and "
    "the step applies the SUM of per-device gradients (D x the mean)."
  )
  assert student_ratio == pytest.approx(1.0, rel=1e-3), message
  assert disc_ratio == pytest.approx(1.0, rel=1e-3), message
  chex.assert_trees_all_close(g8, g1, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(d8, d1, rtol=1e-4, atol=1e-7)


def test_eight_device_step_never_recompiles(eight_device_run):
  info = eight_device_run["info"]
  spe = info["steps_per_epoch"]
  assert spe == 8
  # The wrapped per-device step was traced once (else the fixture raised),
  # no XLA compilation happened after the first call, one cache entry.
  assert info["compiles"] == 0
  assert info["cache_size"] == 1
  assert info["final_step"] == 2 * spe
  assert info["final_alpha"] == pytest.approx(0.8)


def test_eight_device_step_hlo_moves_no_bank(eight_device_run):
  num_rows = eight_device_run["results"]["num_rows"]
  hlo = eight_device_run["step_hlo"]
  gather_hlo = eight_device_run["gather_hlo"]
  # Not vacuous: gradients/metrics are averaged with all-reduce, and the
  # checker does flag a real all-gather of the bank compiled on this backend.
  assert "all-reduce" in hlo
  assert any(_ALL_REDUCE.search(line) for line in hlo.splitlines())
  assert bank_sized_collectives(gather_hlo, num_rows, EIGHT_C), gather_hlo
  bad = bank_sized_collectives(hlo, num_rows, EIGHT_C)
  assert not bad, "bank-sized cross-device traffic:\n" + "\n".join(bad)


# --- no recompilation --------------------------------------------------------


def test_step_never_retraces_across_epochs():
  chex.clear_trace_counter()
  n, c, b = 64, 10, 16
  layout = banks.RowLayout(n, 1)
  spe = layout.steps_per_epoch(b)
  assert spe == 4
  setup = build_setup(
    one_device_mesh(),
    layout,
    random_dataset(n, c),
    banks.example_ids(n, 0),
    per_device_batch=b,
    steps_per_epoch=spe,
    num_epochs=2,
    num_classes=c,
    wrap_local_step=chex.assert_max_traces(n=1),
  )
  compiles = []
  listener = lambda event, secs, **kw: (
    compiles.append(event)
    if (event == "/jax/core/compile/backend_compile_duration")
    else None
  )
  carry, alphas = setup.carry, []
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    for epoch in range(2):
      data = setup.data(banks.epoch_order(layout, seed=0, epoch=epoch))
      for _ in range(spe):
        carry, metrics = setup.step_fn(carry, data)
        alphas.append(float(metrics["train/alpha"]))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert int(carry.student.step) == 2 * spe
  assert int(carry.discriminator.step) == 2 * spe
  np.testing.assert_allclose(alphas, [0.4] * spe + [0.8] * spe, rtol=1e-6)
  # One XLA compilation, for the first call, and one dispatch-cache entry:
  # the step's outputs keep the shardings of its inputs.
  assert len(compiles) == 1, compiles
  assert setup.step_fn._cache_size() == 1


# --- learning ----------------------------------------------------------------


def test_ai_kd_learns_a_small_problem():
  n, c, b, total = 250, 4, 32, 300
  layout = banks.RowLayout(n, 1)
  spe = layout.steps_per_epoch(b)
  assert spe == 7  # 26 examples skipped each epoch
  num_epochs = -(-total // spe)
  setup = build_setup(
    one_device_mesh(),
    layout,
    quadrant_dataset(n, c),
    banks.example_ids(n, 0),
    per_device_batch=b,
    steps_per_epoch=spe,
    num_epochs=num_epochs,
    num_classes=c,
    base_lr=0.05,
    flip=False,
  )
  onehot = np.eye(c, dtype=np.float32)[setup.labels_by_id]
  carry, history, early = setup.carry, [], None
  for step in range(total):
    epoch, k = divmod(step, spe)
    if k == 0:
      order = banks.epoch_order(layout, seed=0, epoch=epoch)
      data = setup.data(order)
    carry, metrics = setup.step_fn(carry, data)
    history.append(host_metrics(metrics))
    if step == 2:
      early = (np.asarray(carry.prediction_bank), order[: 3 * b])

  # Three steps into epoch 0: only the rows read so far were rewritten.
  bank, seen = early
  unseen = np.setdiff1d(np.arange(n), seen)
  assert len(unseen) == n - 3 * b
  np.testing.assert_array_equal(bank[unseen], onehot[unseen])
  assert np.all(np.abs(bank[seen] - onehot[seen]).max(-1) > 0)
  np.testing.assert_allclose(bank[seen].sum(-1), 1.0, atol=1e-5)

  student = np.array([h["loss/student"] for h in history])
  disc = np.array([h["loss/disc"] for h in history])
  acc = np.array([h["train/train_acc"] for h in history])
  assert np.all(np.isfinite(student))
  assert np.all(np.isfinite(disc)), np.flatnonzero(~np.isfinite(disc))
  first, last = student[:20].mean(), student[-20:].mean()
  assert last < 0.5 * first, (first, last)
  assert acc[-20:].mean() > 0.9, acc[-20:]
  assert history[-1]["train/alpha"] == pytest.approx(
    0.8 * ((total - 1) // spe + 1) / num_epochs, rel=1e-6
  )

  bank = np.asarray(carry.prediction_bank)
  chex.assert_shape(bank, (n, c))
  assert bank.dtype == np.float32
  assert np.all(bank >= 0)
  np.testing.assert_allclose(bank.sum(-1), 1.0, atol=1e-5)
  # The bank's predictions agree with the labels once learned.
  assert np.mean(bank.argmax(-1) == setup.labels_by_id) > 0.9


# --- objective presets inside the step ---------------------------------------


def _preset_setup(method, bank_dtype="float32", overrides=None):
  n, c, b = 64, 10, 16
  layout = banks.RowLayout(n, 1)
  setup = build_setup(
    one_device_mesh(),
    layout,
    random_dataset(n, c, seed=2),
    banks.example_ids(n, 0),
    method=method,
    overrides=overrides,
    per_device_batch=b,
    steps_per_epoch=layout.steps_per_epoch(b),
    num_epochs=2,
    num_classes=c,
    bank_dtype=bank_dtype,
  )
  order = banks.epoch_order(layout, seed=0, epoch=0)
  return setup, order, b


def test_ce_step_leaves_discriminator_and_bank_alone():
  setup, order, b = _preset_setup("ce")
  before = snapshot(setup.carry)
  carry, metrics = setup.step_fn(setup.carry, setup.data(order))
  after = snapshot(carry)
  chex.assert_trees_all_equal(after["disc_params"], before["disc_params"])
  chex.assert_trees_all_equal(after["disc_opt_state"], before["disc_opt_state"])
  assert after["disc_step"] == before["disc_step"] == 0
  np.testing.assert_array_equal(after["bank"], before["bank"])
  assert after["step"] == 1
  assert _max_abs_diff(after["params"], before["params"]) > 1e-4
  assert set(metrics) == {
    "loss/prog",
    "loss/student",
    "train/train_acc",
    "train/learning_rate",
    "train/alpha",
    "train/grad_norm",
    "train/max_abs_logit",
  }
  assert float(metrics["loss/student"]) == float(metrics["loss/prog"])
  assert float(metrics["train/alpha"]) == 0.0


def test_grad_clip_scales_the_loss_gradient_to_the_norm():
  def first_step_gradient(clip):
    setup, order, _ = _preset_setup("ce", overrides={"grad_clip_norm": clip})
    before = snapshot(setup.carry)
    carry, metrics = setup.step_fn(setup.carry, setup.data(order))
    # First SGD step (Nesterov, momentum 0.9, lr 0.05, coupled weight decay
    # 5e-4): delta = -0.05 * 1.9 * (g + 5e-4 * params). Solve for g.
    gradient = jax.tree_util.tree_map(
      lambda new, old: (old - new) / (0.05 * 1.9) - 5e-4 * old,
      snapshot(carry)["params"],
      before["params"],
    )
    return gradient, float(metrics["train/grad_norm"])

  unclipped, norm = first_step_gradient(0.0)
  clipped, clipped_norm = first_step_gradient(0.5 * norm)
  assert clipped_norm == pytest.approx(norm)  # logged before clipping
  assert float(optax.tree.norm(unclipped)) == pytest.approx(norm, rel=1e-3)
  chex.assert_trees_all_close(
    clipped,
    jax.tree_util.tree_map(lambda g: 0.5 * g, unclipped),
    rtol=1e-3,
    atol=1e-6,
  )
  # A bound above the norm changes nothing.
  loose, _ = first_step_gradient(2.0 * norm)
  chex.assert_trees_all_close(loose, unclipped, rtol=1e-5, atol=1e-7)


def test_ps_kd_step_writes_the_bank():
  setup, order, b = _preset_setup("ps_kd")
  before = snapshot(setup.carry)
  carry, metrics = setup.step_fn(setup.carry, setup.data(order))
  carry, metrics = setup.step_fn(carry, setup.data(order))
  after = snapshot(carry)
  seen, unseen = order[: 2 * b], order[2 * b :]
  assert np.all(
    np.abs(after["bank"][seen] - before["bank"][seen]).max(-1) > 1e-4
  )
  np.testing.assert_array_equal(after["bank"][unseen], before["bank"][unseen])
  np.testing.assert_allclose(after["bank"].sum(-1), 1.0, atol=1e-5)
  chex.assert_trees_all_equal(after["disc_params"], before["disc_params"])
  assert "loss/adv" not in metrics and "loss/det" not in metrics
  assert float(metrics["train/alpha"]) == pytest.approx(0.4)


def test_ai_kd_step_with_bfloat16_bank():
  setup, order, b = _preset_setup("ai_kd", bank_dtype="bfloat16")
  assert setup.carry.prediction_bank.dtype == jnp.bfloat16
  before = snapshot(setup.carry)
  carry = setup.carry
  for _ in range(2):
    carry, metrics = setup.step_fn(carry, setup.data(order))
    assert carry.prediction_bank.dtype == jnp.bfloat16
  chex.assert_shape(carry.prediction_bank, (64, 10))
  after = snapshot(carry)
  assert after["bank_dtype"] == "bfloat16"
  seen, unseen = order[: 2 * b], order[2 * b :]
  assert np.all(
    np.abs(after["bank"][seen] - before["bank"][seen]).max(-1) > 1e-3
  )
  np.testing.assert_array_equal(after["bank"][unseen], before["bank"][unseen])
  np.testing.assert_allclose(after["bank"][seen].sum(-1), 1.0, atol=2e-2)
  assert after["disc_step"] == 2
  assert _max_abs_diff(after["disc_params"], before["disc_params"]) > 0
  m = host_metrics(metrics)
  # The preset ramps the teacher's terms in: at its second step (step 1)
  # they carry 2 / (5 epochs x steps per epoch) of their weight.
  ramp = 2 / (5 * setup.config.steps_per_epoch)
  assert m["train/teacher_weight"] == pytest.approx(ramp, rel=1e-6)
  assert m["loss/student"] == pytest.approx(
    m["loss/prog"] + ramp * (1.0 * m["loss/det"] + 0.1 * m["loss/adv"]),
    rel=1e-5,
  )


# --- CS-KD -----------------------------------------------------------------


def _cs_kd_run(dataset, n=64, c=4, b=16):
  layout = banks.RowLayout(n, 1)
  setup = build_setup(
    one_device_mesh(),
    layout,
    dataset,
    banks.example_ids(n, 0),
    method="cs_kd",
    per_device_batch=b,
    steps_per_epoch=layout.steps_per_epoch(b),
    num_epochs=2,
    num_classes=c,
    crop_padding=0,
    flip=False,
  )
  partners = banks.partner_rows(layout, setup.labels_by_id, seed=0, epoch=0)
  data = setup.data(banks.epoch_order(layout, seed=0, epoch=0)).replace(
    partner_rows=banks.put_sharded(partners, setup.mesh)
  )
  return setup.step_fn(setup.carry, data)


def test_cs_kd_class_wise_term_vanishes_when_a_class_is_one_image():
  # Every image of a class is the same and augmentation is off, so each
  # partner batch equals its anchor batch: the KL between them is 0.
  n, c = 64, 4
  labels = (np.arange(n) % c).astype(np.int32)
  class_images = np.random.default_rng(0).integers(
    0, 256, (c,) + IMAGE_SHAPE, dtype=np.uint8
  )
  dataset = (class_images[labels], labels, np.zeros((n, c), np.float32))
  _, metrics = _cs_kd_run(dataset, n, c)
  assert set(metrics) >= {"loss/cls", "loss/prog", "loss/student"}
  np.testing.assert_allclose(float(metrics["loss/cls"]), 0.0, atol=1e-6)


def test_cs_kd_step_adds_the_class_wise_term():
  _, metrics = _cs_kd_run(random_dataset(64, 4, seed=3))
  cls = float(metrics["loss/cls"])
  assert cls > 1e-4 and np.isfinite(cls)
  # lambda_cls = 1: the student loss is the sum of the two terms.
  np.testing.assert_allclose(
    float(metrics["loss/student"]), float(metrics["loss/prog"]) + cls, rtol=1e-5
  )


@pytest.mark.parametrize("method", ["ps_kd", "ai_kd"])
def test_bank_is_updated_in_place(method):
  # A copy of the whole bank in the compiled step would read and write all
  # N x C entries every step (5 GB at ImageNet scale) instead of B rows.
  setup, order, _ = _preset_setup(method)
  bank = setup.carry.prediction_bank
  token = "f32[%s]" % ",".join(map(str, bank.shape))
  text = setup.step_fn.lower(setup.carry, setup.data(order)).compile().as_text()
  copies = [
    line
    for line in text.splitlines()
    if re.search(r"=\s*" + re.escape(token) + r"(\{[^}]*\})?\s+copy\(", line)
  ]
  assert not copies, copies
  # Not vacuous: the bank is in the program, and written by a scatter.
  assert token in text and "scatter" in text
