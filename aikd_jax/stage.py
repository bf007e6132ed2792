"""A training stage from the config: models, schedule, step, initial state.

The training loop (train.py) and the benchmarks build a stage here, so each
runs exactly the step and the initial state a run does; tests may too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import optax

from aikd_jax import banks
from aikd_jax import models
from aikd_jax import optim
from aikd_jax import run_config
from aikd_jax import train_step as step_lib
from aikd_jax.device_data import DeviceDataset
from aikd_jax.objective import Objective

# Salts keep the stages' random streams apart under one seed.
SEED_SALT = {"teacher": 1, "student": 3}


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one classifier-training stage (the teacher's or the student's) runs.

  Attributes:
    name: 'teacher' or 'student'; also its folder in the workdir.
    objective: what it trains with.
    num_epochs: how long.
    seed: the stage's own seed (config.seed salted by stage): initial
      parameters, per-epoch shuffles and partners, augmentation keys.
    step_config: the train step's static settings.
    model: the classifier in train mode, BatchNorm over `data` if synced.
    eval_model: the same classifier for initialisation and evaluation.
    teacher_model: the online teacher's module (an eval-mode classifier of
      the same architecture), or None.
    discriminator: AI-KD's discriminator.
    learning_rate: the student's schedule.
    optimizer / discriminator_optimizer: their optax transformations.
    bank_dtype: the prediction bank's dtype.
  """

  name: str
  objective: Objective
  num_epochs: int
  seed: int
  step_config: step_lib.StepConfig
  model: nn.Module
  eval_model: nn.Module
  teacher_model: nn.Module | None
  discriminator: nn.Module
  learning_rate: optax.Schedule
  optimizer: optax.GradientTransformation
  discriminator_optimizer: optax.GradientTransformation
  bank_dtype: Any

  @property
  def steps_per_epoch(self) -> int:
    return self.step_config.steps_per_epoch

  @property
  def total_steps(self) -> int:
    return self.num_epochs * self.steps_per_epoch


def build_stage(
  name: str,
  objective: Objective,
  num_epochs: int,
  config: ml_collections.ConfigDict,
  data: DeviceDataset,
  num_devices: int,
) -> Stage:
  """The stage `name` of a run with `config` on `data` over `num_devices`."""
  per_device_batch = config.batch_size // num_devices
  steps_per_epoch = data.layout.steps_per_epoch(per_device_batch)
  if steps_per_epoch == 0:
    raise run_config.ConfigError(
      f"batch_size={config.batch_size} is larger than the "
      f"{data.layout.valid_rows(num_devices - 1) * num_devices} training "
      "examples the devices can draw from; lower it."
    )
  seed = int(config.seed) * 16 + SEED_SALT[name]
  dtype = models.compute_dtype(config.compute_dtype)
  bn_axis = banks.DATA_AXIS if config.sync_batch_norm else None
  eval_model = models.create_model(config.model, data.num_classes, dtype)
  online = objective.uses_teacher and objective.teacher_mode == "online"
  learning_rate = optim.student_learning_rate(
    config.learning_rate,
    config.lr_decay_epochs,
    config.lr_decay_factor,
    steps_per_epoch,
    config.warmup_epochs,
  )
  return Stage(
    name=name,
    objective=objective,
    num_epochs=num_epochs,
    seed=seed,
    step_config=step_lib.StepConfig(
      objective=objective,
      num_classes=data.num_classes,
      num_epochs=num_epochs,
      steps_per_epoch=steps_per_epoch,
      per_device_batch=per_device_batch,
      rows_per_device=data.layout.rows_per_device,
      seed=seed,
      crop_padding=config.crop_padding,
      flip=config.flip,
      mean=data.mean,
      std=data.std,
      sync_batch_norm=config.sync_batch_norm,
      host_augment=bool(getattr(data, "host_augment", False)),
    ),
    model=models.create_model(
      config.model, data.num_classes, dtype, bn_axis_name=bn_axis
    ),
    eval_model=eval_model,
    teacher_model=eval_model if online else None,
    discriminator=models.Discriminator(tuple(config.disc_hidden)),
    learning_rate=learning_rate,
    optimizer=optim.student_optimizer(
      learning_rate,
      momentum=config.momentum,
      nesterov=config.nesterov,
      weight_decay=config.weight_decay,
    ),
    discriminator_optimizer=optim.discriminator_optimizer(
      config.disc_learning_rate, config.disc_b1, config.disc_b2
    ),
    bank_dtype=config.bank_dtype,
  )


def create_train_state(
  stage: Stage, data: DeviceDataset, mesh: jax.sharding.Mesh
) -> step_lib.TrainState:
  """Fresh student and discriminator states from the stage's seed,
  replicated; a prediction bank of one-hot rows, sharded by example id."""
  student_key, discriminator_key = jax.random.split(jax.random.key(stage.seed))

  def init():
    return (
      step_lib.create_classifier_state(
        stage.eval_model, data.image_shape, stage.optimizer, student_key
      ),
      step_lib.create_discriminator_state(
        stage.discriminator,
        data.num_classes,
        stage.discriminator_optimizer,
        discriminator_key,
      ),
    )

  student, discriminator = jax.jit(init, out_shardings=banks.replicated(mesh))()
  bank = banks.initial_prediction_bank(
    data.train_labels_by_id, data.num_classes, stage.bank_dtype, mesh
  )
  return step_lib.TrainState(student, discriminator, bank)


def make_train_step(
  stage: Stage, mesh: jax.sharding.Mesh, steps_per_dispatch: int = 1
):
  """The stage's jitted `step(state, data) -> (state, metrics)`; with
  `steps_per_dispatch` K > 1, K steps per call, metrics stacked to [K]."""
  return step_lib.make_train_step(
    mesh,
    stage.step_config,
    model=stage.model,
    discriminator=stage.discriminator,
    learning_rate=stage.learning_rate,
    teacher_model=stage.teacher_model,
    steps_per_dispatch=steps_per_dispatch,
  )


def step_data(
  stage: Stage,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  epoch: int,
  teacher: step_lib.Teacher | None = None,
) -> step_lib.StepData:
  """What the step reads in `epoch`: the training rows, the epoch's batch
  order and (CS-KD) partner rows, and the teacher."""
  order = banks.put_sharded(
    banks.epoch_order(data.layout, stage.seed, epoch), mesh
  )
  partners = None
  if stage.objective.uses_partners:
    partners = banks.put_sharded(
      banks.partner_rows(
        data.layout, data.train_labels_by_id, stage.seed, epoch
      ),
      mesh,
    )
  return step_lib.StepData(
    images=data.train_images,
    labels=data.train_labels,
    epoch_order=order,
    teacher=teacher,
    partner_rows=partners,
  )


def make_predict_fn(
  stage: Stage,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  eval_batch_size: int,
):
  """Jitted `predict(variables, images) -> logits` in eval mode, normalised
  as in training; `eval_batch_size` is global."""
  return step_lib.make_predict_fn(
    mesh,
    stage.eval_model,
    batch_per_device=eval_batch_size // mesh.devices.size,
    mean=data.mean,
    std=data.std,
  )
