"""The jitted, data-parallel AI-KD train step and the prediction step.

Both are pure functions written per device and mapped over the 1-D `data`
mesh with `jax.shard_map` inside `jax.jit` (the successor of `jax.pmap`).
One forward pass of the student at the current (theta, phi) gives the
gradients of both the student and the discriminator; both states and the
prediction bank are updated in the same step, and their buffers are donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
from flax.training import train_state as flax_train_state
import jax
from jax import lax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from aikd_jax import augment as augment_lib
from aikd_jax import losses
from aikd_jax import objective as objective_lib
from aikd_jax.banks import DATA_AXIS
from aikd_jax.models import SHAKEDROP_RNG
from aikd_jax.objective import Objective


class ClassifierState(flax_train_state.TrainState):
  """A classifier's (student's or teacher's) parameters, optimiser state and
  BatchNorm statistics."""

  batch_stats: Any = None

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}


@flax.struct.dataclass
class TrainState:
  """Everything the step updates (and donates): the student, the
  discriminator and the prediction bank (rows by example id, sharded)."""

  student: ClassifierState
  discriminator: flax_train_state.TrainState
  prediction_bank: jax.Array


@flax.struct.dataclass
class Teacher:
  """The pre-trained model, as the objective's teacher mode reads it.

  logits: its logits on every training example (precomputed teacher), rows
    by example id, sharded over `data` like the prediction bank.
  variables: its frozen variables (online teacher), replicated; the module
    that runs them is `make_train_step`'s `teacher_model`.
  """

  logits: jax.Array | None = None
  variables: Any = None


@flax.struct.dataclass
class StreamedBatch:
  """One step's examples, prepared on the host (streaming.py).

  Each array is [per_device_batch * D, ...], sharded over `data`: device d's
  block holds only examples whose bank rows it owns, so the banks stay local.

  images: uint8 [B, H, W, C]; raw (the step augments them as it does
    device-resident images) or already cropped and flipped on the host;
    float32 in [0, 1] when the host also jittered their colours.
  labels: int32 [B].
  rows: int32 [B], each example's local bank row on its device.
  """

  images: jax.Array
  labels: jax.Array
  rows: jax.Array


@flax.struct.dataclass
class StepData:
  """What the step reads but never writes.

  images/labels: rows by example id, sharded over `data`; None when
    `batch` brings the step's examples instead.
  epoch_order: each device's local rows in this epoch's order (banks.py).
  teacher: the pre-trained model; None unless the objective uses one.
  partner_rows: CS-KD's same-class local partner of each row (this epoch);
    None unless the objective uses partners.
  batch: this step's streamed examples; None for device-resident data.
  """

  images: jax.Array | None
  labels: jax.Array | None
  epoch_order: jax.Array | None
  teacher: Teacher | None = None
  partner_rows: jax.Array | None = None
  batch: StreamedBatch | None = None


@dataclasses.dataclass(frozen=True)
class StepConfig:
  """Static settings of a train step (hashable)."""

  objective: Objective
  num_classes: int
  num_epochs: int
  steps_per_epoch: int
  per_device_batch: int
  rows_per_device: int
  seed: int
  crop_padding: int
  flip: bool
  mean: tuple[float, ...]
  std: tuple[float, ...]
  sync_batch_norm: bool = True
  # Streamed images arrive cropped and flipped: the step only normalises.
  host_augment: bool = False


def create_classifier_state(
  model: nn.Module,
  image_shape: tuple[int, ...],
  tx: optax.GradientTransformation,
  key: jax.Array,
) -> ClassifierState:
  """Initialises a classifier and its optimiser state (float32 params)."""
  variables = model.init(key, jnp.zeros((1,) + tuple(image_shape)), train=False)
  state = ClassifierState.create(
    apply_fn=model.apply,
    params=variables["params"],
    tx=tx,
    batch_stats=variables.get("batch_stats", {}),
  )
  return state.replace(step=_step_zero())


def create_discriminator_state(
  discriminator: nn.Module,
  num_classes: int,
  tx: optax.GradientTransformation,
  key: jax.Array,
) -> flax_train_state.TrainState:
  params = discriminator.init(key, jnp.zeros((1, num_classes)))["params"]
  state = flax_train_state.TrainState.create(
    apply_fn=discriminator.apply, params=params, tx=tx
  )
  return state.replace(step=_step_zero())


def _step_zero() -> jax.Array:
  """A strongly typed int32 step counter, as a restored checkpoint has
  (flax's is a weakly typed 0): fresh and resumed runs then compile to one
  program, and a resumed run finds it in the compilation cache."""
  return jnp.zeros((), jnp.int32)


def augmentation_key(seed: int, step: jax.Array) -> jax.Array:
  """The step's augmentation key; each example folds in its own id."""
  return jax.random.fold_in(jax.random.key(seed), step)


# CS-KD's partner views use their own stream, so an example paired with
# itself is still seen through two different augmentations.
_PARTNER_STREAM = 1
# The model's own randomness (ShakeDrop), another stream of the same key;
# like the augmentation it is keyed on (seed, step, example id), so resuming
# at a step replays it exactly.
_MODEL_STREAM = 2


def model_rngs(key: jax.Array) -> dict[str, jax.Array]:
  """The rngs of a train-mode forward pass whose augmentation used `key`."""
  return {SHAKEDROP_RNG: jax.random.fold_in(key, _MODEL_STREAM)}


def _step_examples(
  data: StepData, step: jax.Array, config: StepConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """This step's local bank rows, uint8 images and labels on one device.

  From the device-resident split at this step's slice of the epoch order,
  or from the host's streamed batch, which the host built from the same
  slice (streaming.py): either way the rows are local.
  """
  if data.batch is not None:
    return data.batch.rows, data.batch.images, data.batch.labels
  batch = config.per_device_batch
  start = (step % config.steps_per_epoch) * batch
  rows = lax.dynamic_slice_in_dim(data.epoch_order, start, batch)
  return rows, data.images[rows], data.labels[rows]


def _local_train_step(
  state: TrainState,
  data: StepData,
  *,
  config: StepConfig,
  model: nn.Module,
  discriminator: nn.Module,
  teacher_model: nn.Module | None,
  learning_rate: optax.Schedule,
):
  """One step on one device's shard; collectives average across devices."""
  objective = config.objective
  student, discriminator_state = state.student, state.discriminator
  step = student.step
  epoch = step // config.steps_per_epoch
  rows, raw_images, labels = _step_examples(data, step, config)
  ids = rows + lax.axis_index(DATA_AXIS) * config.rows_per_device

  key = augmentation_key(config.seed, step)
  augment = lambda images, ids, key: augment_lib.augment(
    images,
    ids,
    key,
    pad=config.crop_padding,
    flip=config.flip,
    mean=config.mean,
    std=config.std,
  )
  if config.host_augment:
    images = augment_lib.normalize(raw_images, config.mean, config.std)
  else:
    images = augment(raw_images, ids, key)
  if objective.uses_partners:
    if data.batch is not None:
      raise ValueError("Streamed batches carry no CS-KD partner images.")
    partners = data.partner_rows[rows]
    partner_ids = partners + (ids - rows)
    partner_key = jax.random.fold_in(key, _PARTNER_STREAM)
    partner_images = augment(data.images[partners], partner_ids, partner_key)

  teacher_logits = None
  if objective.uses_teacher:
    if objective.teacher_mode == "online":
      teacher_logits = teacher_model.apply(
        data.teacher.variables, images, train=False
      )
    else:
      teacher_logits = data.teacher.logits[rows]
    teacher_logits = lax.stop_gradient(teacher_logits.astype(jnp.float32))

  alpha = losses.alpha_at(epoch, objective.alpha_T, config.num_epochs)
  teacher_weight = objective.teacher_weight(step, config.steps_per_epoch)
  previous = state.prediction_bank[rows].astype(jnp.float32)
  discriminator_apply = lambda params, probs: discriminator.apply(
    {"params": params}, probs
  )

  def objective_fn(params, discriminator_params):
    logits, model_updates = model.apply(
      {"params": params, "batch_stats": student.batch_stats},
      images,
      train=True,
      example_ids=ids,
      rngs=model_rngs(key),
      mutable=["batch_stats"],
    )
    partner_logits = None
    if objective.uses_partners:
      # CS-KD: a second train-mode pass on the same-class partners, without
      # gradient (its BatchNorm statistics update follows the anchors').
      partner_logits, model_updates = model.apply(
        {
          "params": lax.stop_gradient(params),
          "batch_stats": model_updates["batch_stats"],
        },
        partner_images,
        train=True,
        example_ids=partner_ids,
        rngs=model_rngs(partner_key),
        mutable=["batch_stats"],
      )
    # One implementation of the objective, the public one: each loss reaches
    # only its own model's parameters, so one backward pass of the sum gives
    # each model exactly its own gradient.
    out = objective_lib.compute_losses(
      objective,
      logits,
      labels,
      previous,
      alpha=alpha,
      teacher_logits=teacher_logits,
      discriminator_apply=discriminator_apply,
      discriminator_params=discriminator_params,
      teacher_weight=teacher_weight,
      partner_logits=partner_logits,
    )
    aux = dict(out.discriminator_accuracy)
    logits = logits.astype(jnp.float32)
    aux["train_acc"] = jnp.mean(jnp.argmax(logits, -1) == labels)
    aux["max_abs_logit"] = jnp.max(jnp.abs(logits))
    return (
      out.student_loss + out.discriminator_loss,
      (out.terms, aux, out.bank_rows, model_updates),
    )

  grad_fn = jax.grad(objective_fn, argnums=(0, 1), has_aux=True)
  # Parameters enter as device-invariant values, whose gradient shard_map
  # would already sum over devices; marking them varying keeps each device's
  # gradient local, so the pmean below is the global-batch mean.
  (grads, discriminator_grads), (terms, aux, probs, model_updates) = grad_fn(
    lax.pcast(student.params, DATA_AXIS, to="varying"),
    lax.pcast(discriminator_state.params, DATA_AXIS, to="varying"),
  )

  grads = lax.pmean(grads, DATA_AXIS)
  grad_norm = optax.tree.norm(grads)
  if objective.grad_clip_norm > 0:
    # As torch.nn.utils.clip_grad_norm_ before the optimiser step: the loss
    # gradient only, before weight decay.
    clip = optax.clip_by_global_norm(objective.grad_clip_norm)
    grads, _ = clip.update(grads, clip.init(grads))
  batch_stats = model_updates["batch_stats"]
  if not config.sync_batch_norm:
    # Per-device statistics (PS-KD's DataParallel behaviour) are averaged
    # after the update so that the replicated state stays identical.
    batch_stats = lax.pmean(batch_stats, DATA_AXIS)
  new_student = student.apply_gradients(grads=grads, batch_stats=batch_stats)
  new_discriminator = discriminator_state
  if objective.uses_discriminator:
    new_discriminator = discriminator_state.apply_gradients(
      grads=lax.pmean(discriminator_grads, DATA_AXIS)
    )

  bank = state.prediction_bank
  if objective.uses_progressive:
    # Train-mode softmax of the augmented view, before the update (PS-KD).
    # Adding 0 * (the rows read above) orders the write after the read, so
    # XLA updates the donated bank in place instead of copying all of it
    # (twice) every step; bank rows are finite, so the value is unchanged.
    new_rows = probs + 0.0 * previous
    bank = bank.at[rows].set(new_rows.astype(bank.dtype))

  metrics = {
    **{f"loss/{k}": v for k, v in terms.items()},
    **{f"train/{k}": v for k, v in aux.items()},
  }
  metrics = lax.pmean(metrics, DATA_AXIS)
  # Early signs of divergence: the largest logit on any device, and the
  # global norm of the loss gradient (before weight decay or clipping).
  metrics["train/max_abs_logit"] = lax.pmax(aux["max_abs_logit"], DATA_AXIS)
  metrics["train/grad_norm"] = grad_norm
  if objective.uses_teacher and objective.teacher_ramp_epochs > 0:
    metrics["train/teacher_weight"] = jnp.asarray(teacher_weight, jnp.float32)
  metrics["train/learning_rate"] = jnp.asarray(learning_rate(step), jnp.float32)
  metrics["train/alpha"] = jnp.asarray(alpha, jnp.float32)
  return TrainState(new_student, new_discriminator, bank), metrics


def repeat_step(local_step: Callable, max_steps: int) -> Callable:
  """Up to `max_steps` consecutive calls of `local_step` as one loop.

  Returns `run(state, data, num_steps)`: `num_steps` (at most `max_steps`)
  iterations of a `lax.fori_loop`, each step's metrics written to row i of
  buffers of `max_steps` rows (rows past `num_steps` stay zero). The carry
  is the whole (donated) state, so the bank is updated in place.
  `num_steps` is the int `max_steps` itself (a full call: XLA knows the
  trip count) or a traced int32 (a shorter call). Either way XLA compiles
  the loop body alone, never unrolled, so every step of every call runs the
  same body, whatever `max_steps` is, which keeps the results of different
  `max_steps` bitwise equal (tests/test_steps_per_dispatch.py).
  """

  def run(state, data, num_steps):
    _, shapes = jax.eval_shape(local_step, state, data)
    buffers = jax.tree.map(
      lambda s: jnp.zeros((max_steps,) + s.shape, s.dtype), shapes
    )

    def body(i, carry):
      state, buffers = carry
      state, metrics = local_step(state, data)
      buffers = jax.tree.map(
        lambda buf, m: lax.dynamic_update_index_in_dim(buf, m, i, 0),
        buffers,
        metrics,
      )
      return state, buffers

    return lax.fori_loop(0, num_steps, body, (state, buffers))

  return run


class StepsPerCall:
  """A train step of up to K steps per call: `step(state, data, num_steps)`.

  A call of K steps runs a program whose loop has the constant trip count
  K; a shorter call (an epoch's last when K does not divide it, the first
  after some resumes) runs one whose trip count is an argument. XLA:GPU runs
  a loop of unknown trip count by copying its condition to the host after
  every iteration and blocking the host until the device is done (its
  WhileThunk), so the host could never queue work ahead of the device; a
  known trip count needs no such wait. Each program compiles on its first
  call, so a run whose epochs K divides compiles one.
  """

  def __init__(self, full: Callable, partial: Callable, steps_per_call: int):
    self.full, self.partial = full, partial
    self.steps_per_call = steps_per_call

  def _program(self, num_steps) -> tuple[Callable, tuple]:
    if int(num_steps) == self.steps_per_call:
      return self.full, ()
    return self.partial, (np.int32(num_steps),)

  def __call__(self, state, data, num_steps):
    program, count = self._program(num_steps)
    return program(state, data, *count)

  def lower(self, state, data, num_steps):
    program, count = self._program(num_steps)
    return program.lower(state, data, *count)


def make_train_step(
  mesh: jax.sharding.Mesh,
  config: StepConfig,
  *,
  model: nn.Module,
  discriminator: nn.Module,
  learning_rate: optax.Schedule,
  teacher_model: nn.Module | None = None,
  wrap_local_step: Callable | None = None,
  steps_per_dispatch: int = 1,
):
  """Returns jitted `step(state, data) -> (state, metrics)`; state donated.

  Args:
    mesh: 1-D mesh with axis 'data'.
    config: static step settings.
    model / discriminator / teacher_model: Flax modules (the teacher only for
      an online teacher).
    learning_rate: the student's schedule, for logging.
    wrap_local_step: optional decorator for the per-device function (tests
      pass `chex.assert_max_traces(n=1)` to prove it never retraces).
    steps_per_dispatch: K > 1 returns `step(state, data, num_steps)`
      instead, which runs `num_steps` <= K consecutive steps in one call
      (`repeat_step`), each metric stacked to shape [K] (rows past
      num_steps zero); the caller keeps them inside one epoch (the step
      reads this epoch's `data.epoch_order`).

  `data.teacher` must be given when the objective uses a teacher; it is
  ignored (and never moved) when the objective uses none.
  """
  objective = config.objective
  local = lambda state, data: _local_train_step(
    state,
    data,
    config=config,
    model=model,
    discriminator=discriminator,
    teacher_model=teacher_model,
    learning_rate=learning_rate,
  )
  if wrap_local_step is not None:
    local = wrap_local_step(local)
  sharded = P(DATA_AXIS)
  state_spec = TrainState(
    student=P(), discriminator=P(), prediction_bank=sharded
  )
  data_spec = StepData(
    images=sharded,
    labels=sharded,
    epoch_order=sharded,
    teacher=(
      Teacher(logits=sharded, variables=P()) if objective.uses_teacher else None
    ),
    partner_rows=sharded,
    batch=sharded,
  )
  # Explicit output shardings keep the state's shardings equal to its input
  # ones (on a 1-device mesh JAX would otherwise call the bank replicated),
  # so feeding the output back in never adds a second cache entry.
  shardings = jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    (state_spec, P()),
    is_leaf=lambda x: isinstance(x, P),
  )

  def jitted(local_fn: Callable, counted: bool):
    mapped = jax.shard_map(
      local_fn,
      mesh=mesh,
      in_specs=(state_spec, data_spec) + ((P(),) if counted else ()),
      out_specs=(state_spec, P()),
    )

    def step(state: TrainState, data: StepData, *num_steps):
      if not objective.uses_teacher:
        data = data.replace(teacher=None)
      elif data.teacher is None:
        raise ValueError(
          "This objective reads a teacher: pass StepData(teacher=Teacher("
          "logits=...)) for a precomputed teacher, or Teacher(variables=...)"
          " and make_train_step(teacher_model=...) for an online one."
        )
      return mapped(state, data, *num_steps)

    return jax.jit(step, donate_argnums=(0,), out_shardings=shardings)

  if steps_per_dispatch == 1:
    return jitted(local, counted=False)
  run = repeat_step(local, steps_per_dispatch)
  return StepsPerCall(
    full=jitted(
      lambda state, data: run(state, data, steps_per_dispatch), counted=False
    ),
    partial=jitted(run, counted=True),
    steps_per_call=steps_per_dispatch,
  )


def make_predict_fn(
  mesh: jax.sharding.Mesh,
  model: nn.Module,
  *,
  batch_per_device: int,
  mean: tuple[float, ...],
  std: tuple[float, ...],
):
  """Returns jitted `predict(variables, images) -> logits`, eval mode.

  `images` (uint8, rows sharded over `data`) are normalised, not augmented;
  each device runs its rows in chunks of `batch_per_device` with lax.map, so
  one call covers a whole split and compiles once.
  """

  def local(variables, images):
    rows = images.shape[0]
    # As few chunks as the batch allows, each as even as possible, so the
    # padding computed is less than one row per chunk.
    chunks = -(-rows // batch_per_device)
    chunk = -(-rows // chunks)
    padded = jnp.pad(
      images, [(0, chunks * chunk - rows)] + [(0, 0)] * (images.ndim - 1)
    )
    padded = padded.reshape((chunks, chunk) + images.shape[1:])

    def run(chunk):
      x = augment_lib.normalize(chunk, mean, std)
      return model.apply(variables, x, train=False).astype(jnp.float32)

    logits = lax.map(run, padded)
    return logits.reshape((-1, logits.shape[-1]))[:rows]

  mapped = jax.shard_map(
    local, mesh=mesh, in_specs=(P(), P(DATA_AXIS)), out_specs=P(DATA_AXIS)
  )
  return jax.jit(mapped)
