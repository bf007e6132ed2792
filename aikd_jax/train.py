"""The three stages of AI-KD and the epoch loop that runs each of them.

Stage 1 trains the teacher (the pre-trained model) with `ce`, or loads a
named checkpoint; stage 2 stores its eval-mode logits on every un-augmented
training image in the teacher-logit bank; stage 3 trains a fresh student
with the configured method. Every stage resumes from its own checkpoints and
is skipped once its results file says it finished.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from aikd_jax import banks
from aikd_jax import checkpointing
from aikd_jax import data as data_lib
from aikd_jax import metrics as metrics_lib
from aikd_jax import models
from aikd_jax import optim
from aikd_jax import results as results_lib
from aikd_jax import run_config
from aikd_jax import train_step as step_lib
from aikd_jax import writers
from aikd_jax.objective import Objective, resolve_objective

STAGES = ("teacher", "teacher_logits", "student")
CHECKPOINT_DIR = "checkpoints"
# Salts keep the stages' random streams apart under one seed.
_STAGE_SALT = {"teacher": 1, "student": 3}


class Preempted(Exception):
  """Raised after a checkpoint was saved because SIGTERM/SIGINT arrived."""


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN or Inf; nothing from that point is saved."""


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


def place_dataset(dataset: data_lib.Dataset, mesh: jax.sharding.Mesh,
                  config: ml_collections.ConfigDict) -> DeviceDataset:
  """Puts both splits on the devices; training rows go where their id says."""
  num_devices = mesh.devices.size
  layout = banks.RowLayout(len(dataset.train_labels), num_devices)
  ids = banks.example_ids(layout.num_examples, config.seed)
  labels = banks.arrange_by_id(dataset.train_labels.astype(np.int32), ids,
                               layout.num_rows, fill=-1)
  test_layout = banks.RowLayout(len(dataset.test_labels), num_devices)
  test_images = np.zeros((test_layout.num_rows,) + dataset.image_shape,
                         np.uint8)
  test_images[:len(dataset.test_labels)] = dataset.test_images
  if len(config.mean):
    mean, std = tuple(config.mean), tuple(config.std)
  else:
    mean, std = data_lib.channel_stats(dataset.train_images)
  if len(mean) != dataset.image_shape[-1]:
    raise run_config.ConfigError(
        f"mean/std have {len(mean)} channels but the images have "
        f"{dataset.image_shape[-1]}.")
  return DeviceDataset(
      layout=layout,
      train_images=banks.put_by_id(dataset.train_images, ids,
                                   layout.num_rows, mesh),
      train_labels=banks.put_sharded(labels, mesh),
      train_labels_by_id=labels,
      test_images=banks.put_sharded(test_images, mesh),
      test_labels=dataset.test_labels.astype(np.int32),
      num_classes=dataset.num_classes,
      image_shape=tuple(dataset.image_shape),
      mean=tuple(float(m) for m in mean),
      std=tuple(float(s) for s in std))


class _SignalFlag:
  """Turns SIGTERM/SIGINT into a flag the loop checks after each step."""

  def __init__(self):
    self.received = None
    self._previous = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    self.received = signal.Signals(signum).name

  def __exit__(self, exc_type, exc, traceback):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    if self.received and exc_type is None:
      # A signal after the last step: everything is saved, but the caller
      # (say, a comparison about to start its next run) must still stop.
      raise Preempted(f"{self.received} received after the last step; all "
                      "results are saved. Rerun the same command to go on.")


_NO_BAD_STEP = np.iinfo(np.int32).max
# Read as the largest value of a log interval or epoch, not the mean.
PEAK_METRICS = ("train/max_abs_logit",)


@jax.jit
def _no_totals(metrics: dict) -> dict:
  """Empty epoch totals shaped like one step's metrics."""
  return {"sum": jax.tree.map(jnp.zeros_like, metrics),
          "peak": jax.tree.map(lambda v: jnp.full_like(v, -jnp.inf), metrics),
          "bad_step": jnp.int32(_NO_BAD_STEP),
          "bad_values": jax.tree.map(jnp.zeros_like, metrics)}


@jax.jit
def _accumulate(totals: dict, metrics: dict, step: jax.Array) -> dict:
  """Adds one step's metrics to the epoch's totals, on device.

  Keeps, per metric, the running float32 sum (added step by step, so the
  epoch means do not depend on when the host reads them) and the largest
  value since the last read; and the first step at which any metric was not
  finite, with all of that step's values, so a divergence can be reported
  whole. The host reads a few scalars per log interval.
  """
  finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v))
                              for v in jax.tree.leaves(metrics)]))
  first_bad = ~finite & (totals["bad_step"] == _NO_BAD_STEP)
  return {"sum": jax.tree.map(jnp.add, totals["sum"], metrics),
          "peak": jax.tree.map(jnp.maximum, totals["peak"], metrics),
          "bad_step": jnp.where(first_bad, step, totals["bad_step"]),
          "bad_values": jax.tree.map(
              lambda old, new: jnp.where(first_bad, new, old),
              totals["bad_values"], metrics)}


@jax.jit
def _reset_peaks(totals: dict) -> dict:
  return {**totals, "peak": jax.tree.map(
      lambda v: jnp.full_like(v, -jnp.inf), totals["peak"])}


def divergence_message(stage: str, step: int, steps_per_epoch: int,
                       values: dict[str, float], objective: Objective,
                       config: ml_collections.ConfigDict) -> str:
  """Names every non-finite term of the step, its other values, a remedy."""
  bad = sorted(name for name, v in values.items() if not np.isfinite(v))
  rest = sorted(name for name in values if name not in bad)
  shown = lambda names: ", ".join(f"{n} = {values[n]:.4g}" for n in names)
  return (f"Training diverged at step {step} (epoch {step // steps_per_epoch})"
          f" of the {stage} stage: {shown(bad)} not finite; the same step's "
          f"other values: {shown(rest)}. Nothing after the last checkpoint "
          f"was saved. To go on, {_remedies(stage, objective, config)}, then "
          "rerun.")


def _remedies(stage: str, objective: Objective,
              config: ml_collections.ConfigDict) -> str:
  """What to change after a divergence, the most specific first."""
  remedies = []
  if stage == "student" and objective.uses_teacher:
    remedies.append(
        "ramp the pre-trained model's terms in over more epochs (--config."
        f"teacher_ramp_epochs, now {objective.teacher_ramp_epochs:g})")
  remedies.append(
      f"lower --config.learning_rate (now {config.learning_rate:g})")
  if not config.grad_clip_norm:
    remedies.append("clip the gradient (e.g. --config.grad_clip_norm=5)")
  return ", or ".join(remedies)


def _gather(array: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


class _Trainer:
  """Runs one classifier-training stage: epochs, eval, logs, checkpoints."""

  def __init__(self, *, stage: str, objective: Objective, num_epochs: int,
               config: ml_collections.ConfigDict, data: DeviceDataset,
               mesh: jax.sharding.Mesh, workdir: str,
               signals: _SignalFlag):
    self.stage, self.objective, self.num_epochs = stage, objective, num_epochs
    self.config, self.data, self.mesh, self.signals = config, data, mesh, signals
    self.stage_dir = os.path.join(workdir, stage)
    num_devices = mesh.devices.size
    self.per_device_batch = config.batch_size // num_devices
    self.steps_per_epoch = data.layout.steps_per_epoch(self.per_device_batch)
    if self.steps_per_epoch == 0:
      raise run_config.ConfigError(
          f"batch_size={config.batch_size} is larger than the "
          f"{data.layout.valid_rows(num_devices - 1) * num_devices} training "
          "examples the devices can draw from; lower it.")
    dtype = models.compute_dtype(config.compute_dtype)
    bn_axis = banks.DATA_AXIS if config.sync_batch_norm else None
    self.model = models.create_model(config.model, data.num_classes, dtype,
                                     bn_axis_name=bn_axis)
    self.eval_model = models.create_model(config.model, data.num_classes,
                                          dtype)
    self.discriminator = models.Discriminator(tuple(config.disc_hidden))
    self.learning_rate = optim.student_learning_rate(
        config.learning_rate, config.lr_decay_epochs, config.lr_decay_factor,
        self.steps_per_epoch, config.warmup_epochs)
    self.seed = int(config.seed) * 16 + _STAGE_SALT[stage]

  def initial_carry(self) -> step_lib.TrainState:
    """Fresh states, replicated; a bank of one-hot rows, sharded."""
    config = self.config
    tx = optim.student_optimizer(self.learning_rate, momentum=config.momentum,
                                 nesterov=config.nesterov,
                                 weight_decay=config.weight_decay,
                                 grad_clip_norm=config.grad_clip_norm)
    disc_tx = optim.discriminator_optimizer(
        config.disc_learning_rate, config.disc_b1, config.disc_b2)
    student_key, disc_key = jax.random.split(jax.random.key(self.seed))

    def init():
      return (step_lib.create_classifier_state(self.eval_model,
                                            self.data.image_shape, tx,
                                            student_key),
              step_lib.create_discriminator_state(
                  self.discriminator, self.data.num_classes, disc_tx,
                  disc_key))

    student, disc = jax.jit(init, out_shardings=banks.replicated(self.mesh))()
    bank = banks.initial_prediction_bank(
        self.data.train_labels_by_id, self.data.num_classes,
        self.config.bank_dtype, self.mesh)
    return step_lib.TrainState(student, disc, bank)

  def step_config(self) -> step_lib.StepConfig:
    return step_lib.StepConfig(
        objective=self.objective, num_classes=self.data.num_classes,
        num_epochs=self.num_epochs, steps_per_epoch=self.steps_per_epoch,
        per_device_batch=self.per_device_batch,
        rows_per_device=self.data.layout.rows_per_device,
        seed=self.seed, crop_padding=self.config.crop_padding,
        flip=self.config.flip, mean=self.data.mean, std=self.data.std,
        sync_batch_norm=self.config.sync_batch_norm)

  def predict_fn(self):
    per_device = self.config.eval_batch_size // self.mesh.devices.size
    return step_lib.make_predict_fn(self.mesh, self.eval_model,
                                    batch_per_device=per_device,
                                    mean=self.data.mean, std=self.data.std)

  def evaluate(self, predict, variables, epoch: int) -> tuple[dict, dict]:
    """The test split's report and reliability diagram."""
    logits = _gather(predict(variables, self.data.test_images))
    logits = logits[:len(self.data.test_labels)]
    if not np.all(np.isfinite(logits)):
      raise NonFiniteLossError(
          f"Training diverged in epoch {epoch} of the {self.stage} stage: "
          "every loss term was finite, but the test logits after step "
          f"{(epoch + 1) * self.steps_per_epoch} are not (the eval-mode "
          "weights exploded). Nothing from this epoch was saved. To go on, "
          f"{_remedies(self.stage, self.objective, self.config)}, then "
          "rerun.")
    return (metrics_lib.classification_report(logits, self.data.test_labels),
            metrics_lib.reliability_diagram(logits, self.data.test_labels))

  def checkpoints(self) -> checkpointing.StageCheckpoints:
    return checkpointing.StageCheckpoints(
        os.path.join(self.stage_dir, CHECKPOINT_DIR),
        self.config.keep_checkpoints)

  def restore_final(self, directory: str | None = None
                    ) -> step_lib.TrainState:
    """The latest checkpoint's carry: this stage's, or one in `directory`
    (a `teacher_checkpoint` from another run)."""
    ckpts = (checkpointing.StageCheckpoints(directory, keep=1) if directory
             else self.checkpoints())
    try:
      step = ckpts.latest_step()
      if step is None:
        raise run_config.ConfigError(
            f"{directory or ckpts.directory!r} holds no checkpoint.")
      carry, _ = ckpts.restore(step, self.initial_carry())
    finally:
      ckpts.close()
    return carry

  def run(self, teacher: step_lib.Teacher | None = None,
          teacher_model=None) -> step_lib.TrainState:
    """Trains the stage to its last epoch (resuming), writes its results."""
    config, spe = self.config, self.steps_per_epoch
    os.makedirs(self.stage_dir, exist_ok=True)
    total_steps = self.num_epochs * spe
    carry = self.initial_carry()
    progress = {"history": [], "epoch_sums": {}, "epoch_peaks": {},
                "epoch_steps": 0}
    ckpts = self.checkpoints()
    latest = ckpts.latest_step()
    if latest is not None:
      start = time.monotonic()
      carry, progress = ckpts.restore(latest, carry)
      if latest // spe > self.num_epochs:
        raise run_config.ConfigError(
            f"The {self.stage} stage already reached epoch {latest // spe}; "
            f"num_epochs={self.num_epochs} would end before it.")
      logging.info("%s: resumed from step %d (epoch %d) in %.1fs.",
                   self.stage, latest, latest // spe,
                   time.monotonic() - start)
    step_fn = step_lib.make_train_step(
        self.mesh, self.step_config(), model=self.model,
        discriminator=self.discriminator, learning_rate=self.learning_rate,
        teacher_model=teacher_model)
    predict = self.predict_fn()
    writer = writers.create_writer(
        self.stage_dir, just_logging=jax.process_index() > 0)
    report = writers.ReportProgress(
        num_train_steps=total_steps, writer=writer,
        every_steps=config.log_every_steps)
    step = int(carry.student.step)
    # This epoch's running metric totals, on device (restored mid-epoch).
    totals = self._restore_totals(progress)
    logged = (dict(progress["epoch_sums"]), progress["epoch_steps"])
    order_epoch, step_data = None, None
    try:
      while step < total_steps:
        epoch = step // spe
        if order_epoch != epoch:  # Everything the step reads, per epoch.
          epoch_order, partner_rows = self._epoch_rows(epoch)
          step_data = step_lib.StepData(
              images=self.data.train_images, labels=self.data.train_labels,
              epoch_order=epoch_order, teacher=teacher,
              partner_rows=partner_rows)
          order_epoch = epoch
        carry, step_metrics = step_fn(carry, step_data)
        if totals is None:
          totals = _no_totals(step_metrics)
        totals = _accumulate(totals, step_metrics, step)
        step += 1
        report(step)
        epoch_done = step % spe == 0
        log_now = epoch_done or step % config.log_every_steps == 0
        stop = self._stop_agreed(log_now)
        if log_now or stop:
          totals, logged = self._flush(totals, logged, progress, writer,
                                       step)
        if epoch_done:
          with report.timed("eval"):
            self._end_epoch(epoch, carry, predict, progress, writer)
          totals, logged = None, ({}, 0)
          last = step == total_steps
          if last or (epoch + 1) % config.checkpoint_every_epochs == 0:
            ckpts.save(step, carry, progress)
        if stop and step < total_steps:
          if ckpts.latest_step() != step:
            ckpts.save(step, carry, progress)
          ckpts.wait()
          raise Preempted(
              f"{self.signals.received} received: saved a checkpoint at step "
              f"{step} of the {self.stage} stage. Rerun the same command "
              "with the same --workdir to resume.")
      ckpts.wait()
      if latest is None or latest < total_steps or not results_lib.finished_results(
          self.stage_dir, self.num_epochs):
        self._write_results(progress)
    finally:
      ckpts.wait()
      ckpts.close()
      writer.close()
    return carry

  def _epoch_rows(self, epoch: int) -> tuple[jax.Array, jax.Array | None]:
    """This epoch's per-device batch order and (CS-KD) partner rows."""
    layout = self.data.layout
    order = banks.put_sharded(banks.epoch_order(layout, self.seed, epoch),
                              self.mesh)
    if not self.objective.uses_partners:
      return order, None
    partners = banks.partner_rows(layout, self.data.train_labels_by_id,
                                  self.seed, epoch)
    return order, banks.put_sharded(partners, self.mesh)

  def _stop_agreed(self, at_log_step: bool) -> bool:
    """Whether every process stops after this step for a signal.

    One process checks after every step. Several processes must stop at the
    same step (checkpoints are collective), so they agree at log steps only,
    where the host synchronises anyway.
    """
    if jax.process_count() == 1:
      return self.signals.received is not None
    if not at_log_step:
      return False
    flags = multihost_utils.process_allgather(
        np.int32(self.signals.received is not None))
    if flags.any() and self.signals.received is None:
      self.signals.received = "a signal to another process"
    return bool(flags.any())

  def _restore_totals(self, progress: dict) -> dict | None:
    """Device totals of a checkpoint taken mid-epoch, bit for bit."""
    if not progress["epoch_steps"]:
      return None
    put = lambda value: jax.device_put(value, banks.replicated(self.mesh))
    sums = {name: np.float32(v) for name, v in progress["epoch_sums"].items()}
    return put({"sum": sums,
                "peak": {name: np.float32(-np.inf) for name in sums},
                "bad_step": np.int32(_NO_BAD_STEP),
                "bad_values": {name: np.float32(0) for name in sums}})

  def _flush(self, totals: dict | None, logged: tuple, progress: dict,
             writer, step: int) -> tuple[dict | None, tuple]:
    """Reads the epoch's metric totals: divergence check, log, progress.

    Returns the totals with their interval peaks reset, and the (sums, steps)
    logged so far, to log the next interval's means.
    """
    steps_in_epoch = step - (step - 1) // self.steps_per_epoch * (
        self.steps_per_epoch)
    if totals is None or steps_in_epoch == logged[1]:
      return totals, logged
    fetched = jax.device_get(totals)
    if fetched["bad_step"] != _NO_BAD_STEP:
      raise NonFiniteLossError(divergence_message(
          self.stage, int(fetched["bad_step"]), self.steps_per_epoch,
          {name: float(v) for name, v in fetched["bad_values"].items()},
          self.objective, self.config))
    sums = {name: float(total) for name, total in fetched["sum"].items()}
    peaks = {name: float(fetched["peak"][name]) for name in PEAK_METRICS
             if name in sums}
    progress["epoch_sums"], progress["epoch_steps"] = sums, steps_in_epoch
    epoch_peaks = progress.setdefault("epoch_peaks", {})
    for name, value in peaks.items():
      epoch_peaks[name] = max(value, epoch_peaks.get(name, -np.inf))
    logged_sums, logged_steps = logged
    count = steps_in_epoch - logged_steps
    writer.write_scalars(step, {
        name: (total - logged_sums.get(name, 0.0)) / count
        for name, total in sums.items()} | peaks)
    return _reset_peaks(totals), (dict(sums), steps_in_epoch)

  def _end_epoch(self, epoch: int, carry: step_lib.TrainState, predict,
                 progress: dict, writer) -> None:
    """Evaluates on the test split and closes the epoch's history entry."""
    test, reliability = self.evaluate(predict, carry.student.variables,
                                      epoch)
    count = max(progress["epoch_steps"], 1)
    train = {k: v / count for k, v in progress["epoch_sums"].items()}
    train.update(progress.pop("epoch_peaks", {}))
    progress["history"].append({"epoch": epoch, "train": train,
                                "test": test, "reliability": reliability})
    progress["epoch_sums"], progress["epoch_steps"] = {}, 0
    step = (epoch + 1) * self.steps_per_epoch
    writer.write_scalars(step, {f"test/{k}": v for k, v in test.items()})
    logging.info("%s epoch %d/%d: test top-1 error %.2f%%, NLL %.3f, "
                 "ECE %.2f", self.stage, epoch + 1, self.num_epochs,
                 test["top1_err"], test["nll"], test["ece"])

  def _write_results(self, progress: dict) -> None:
    history = progress["history"]
    best = min(history, key=lambda h: h["test"]["top1_err"])
    _write_results_file(os.path.join(self.stage_dir, results_lib.RESULTS_FILE), {
        "stage": self.stage,
        "method": "ce" if self.stage == "teacher" else self.config.method,
        "objective": dataclasses.asdict(self.objective),
        "num_epochs": self.num_epochs,
        "steps_per_epoch": self.steps_per_epoch,
        "complete": True,
        "last": {"epoch": history[-1]["epoch"], **history[-1]["test"]},
        "best": {"epoch": best["epoch"], **best["test"]},
        "history": history,
    })


def _teacher_logits_stage(trainer: _Trainer,
                          teacher: step_lib.ClassifierState,
                          workdir: str) -> jax.Array:
  """Stage 2: eval-mode teacher logits of every un-augmented train image.

  Saved under the teacher's step, so a teacher trained further (extended
  num_epochs) gets its bank recomputed; otherwise it is loaded, never redone.
  """
  teacher_step = int(teacher.step)
  stage_dir = os.path.join(workdir, "teacher_logits")
  ckpts = checkpointing.StageCheckpoints(
      os.path.join(stage_dir, CHECKPOINT_DIR), keep=1)
  data = trainer.data
  template = {"teacher_bank": jax.device_put(
      jnp.zeros((data.layout.num_rows, data.num_classes),
                trainer.config.bank_dtype), banks.data_sharding(trainer.mesh))}
  results_path = os.path.join(stage_dir, results_lib.RESULTS_FILE)
  try:
    if ckpts.latest_step() == teacher_step:
      logging.info("teacher_logits: finished earlier; loading the bank.")
      restored, progress = ckpts.restore(teacher_step, template)
      if not results_lib.finished_results(stage_dir):  # Stopped before writing results.
        _write_stage2_results(results_path, progress["train_report"], None)
      return restored["teacher_bank"]
    start = time.monotonic()
    logits = trainer.predict_fn()(teacher.variables, data.train_images)
    bank = logits.astype(trainer.config.bank_dtype)
    host = _gather(logits)
    valid = data.train_labels_by_id >= 0
    report = metrics_lib.classification_report(
        host[valid], data.train_labels_by_id[valid])
    ckpts.save(teacher_step, {"teacher_bank": bank},
               {"train_report": report})
    ckpts.wait()
    _write_stage2_results(results_path, report, time.monotonic() - start)
    logging.info("teacher_logits: %d rows in %.1fs; teacher train top-1 "
                 "error %.2f%%.", int(valid.sum()),
                 time.monotonic() - start, report["top1_err"])
    return bank
  finally:
    ckpts.close()


def _write_results_file(path: str, payload: dict) -> None:
  if jax.process_index() == 0:  # Every process holds the same; one file.
    results_lib.write_json(path, payload)


def _write_stage2_results(path: str, report: dict,
                          seconds: float | None) -> None:
  _write_results_file(path, {
      "stage": "teacher_logits", "complete": True,
      "split": "train (un-augmented, eval mode)", "seconds": seconds,
      "last": report, "best": report})


def _teacher_stage(config, data, mesh, workdir, signals
                   ) -> tuple[step_lib.ClassifierState, _Trainer]:
  """Stage 1: the teacher's final state (trained, resumed or loaded)."""
  trainer = _Trainer(stage="teacher", objective=resolve_objective("ce"),
                     num_epochs=run_config.teacher_epochs(config),
                     config=config, data=data, mesh=mesh, workdir=workdir,
                     signals=signals)
  if config.teacher_checkpoint:
    teacher = trainer.restore_final(config.teacher_checkpoint).student
    logging.info("teacher: loaded %s step %d.", config.teacher_checkpoint,
                 int(teacher.step))
    return teacher, trainer
  if results_lib.finished_results(trainer.stage_dir, trainer.num_epochs):
    logging.info("teacher: finished earlier; loading its final state.")
    return trainer.restore_final().student, trainer
  carry = trainer.run()
  return carry.student, trainer



def check_inputs(config: ml_collections.ConfigDict, workdir: str,
                 teacher_only: bool = False) -> tuple[Objective, list[str]]:
  """Every check that must pass before anything is computed or written."""
  objective = run_config.validate(config)
  run_config.check_workdir(workdir)
  data_lib.check_dataset_available(config.dataset, config.data_dir or None,
                                   download=config.download)
  ignore = run_config.STUDENT_ONLY_FIELDS if teacher_only else frozenset()
  notes = run_config.compare_with_saved(config, workdir, ignore)
  for stage in STAGES:
    checkpointing.verify_latest(os.path.join(workdir, stage, CHECKPOINT_DIR))
  return objective, notes


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       teacher_only: bool = False) -> dict:
  """Runs (or resumes) all stages; returns the student's results.

  With `teacher_only`, runs stage 1 alone and returns the teacher's results:
  a teacher that several students share (`config.teacher_checkpoint` set to
  WORKDIR/teacher/checkpoints) whatever their methods.
  """
  objective, notes = check_inputs(config, workdir, teacher_only)
  for note in notes:
    logging.warning("Config change accepted on resume:%s", note)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:
    run_config.save(config, workdir)
  mesh = banks.data_mesh()
  dataset = data_lib.load_dataset(
      config.dataset, config.data_dir or None, download=config.download,
      split_seed=config.data_seed, image_size=config.image_size or None)
  data = place_dataset(dataset, mesh, config)
  logging.info("%s: %d train / %d test examples, %d classes, %d devices.",
               config.dataset, data.layout.num_examples,
               len(data.test_labels), data.num_classes, mesh.devices.size)
  with _SignalFlag() as signals:
    if teacher_only:
      _teacher_stage(config, data, mesh, workdir, signals)
      return results_lib.finished_results(os.path.join(workdir, "teacher"))
    teacher, teacher_model = None, None
    if objective.uses_teacher:
      teacher_state, teacher_trainer = _teacher_stage(config, data, mesh,
                                                      workdir, signals)
      if objective.teacher_mode == "online":
        teacher_model = teacher_trainer.eval_model
        teacher = step_lib.Teacher(variables=teacher_state.variables)
        logging.info("teacher_logits: skipped (online teacher).")
      else:
        teacher = step_lib.Teacher(logits=_teacher_logits_stage(
            teacher_trainer, teacher_state, workdir))
    else:
      logging.info("teacher and teacher_logits: skipped (method %s uses no "
                   "pre-trained model).", config.method)
    student = _Trainer(stage="student", objective=objective,
                       num_epochs=config.num_epochs, config=config,
                       data=data, mesh=mesh, workdir=workdir,
                       signals=signals)
    if results_lib.finished_results(student.stage_dir, student.num_epochs):
      logging.info("student: finished earlier; nothing to do.")
    else:
      student.run(teacher, teacher_model)
  return results_lib.read_json(
      os.path.join(student.stage_dir, results_lib.RESULTS_FILE))
