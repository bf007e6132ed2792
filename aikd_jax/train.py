"""The three stages of AI-KD and the epoch loop that runs each of them.

Stage 1 trains the teacher (the pre-trained model) with `ce`, or loads a
named checkpoint; stage 2 stores its eval-mode logits on every un-augmented
training image in the teacher-logit bank; stage 3 trains a fresh student
with the configured method. Every stage resumes from its own checkpoints and
is skipped once its results file says it finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Callable, ContextManager

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from aikd_jax import banks
from aikd_jax import checkpoint_policy
from aikd_jax import checkpointing
from aikd_jax import data as data_lib
from aikd_jax import dispatch
from aikd_jax import input_pipeline
from aikd_jax import metrics as metrics_lib
from aikd_jax import results as results_lib
from aikd_jax import run_config
from aikd_jax import stage as stage_lib
from aikd_jax import streaming
from aikd_jax import teacher_logits
from aikd_jax import train_step as step_lib
from aikd_jax import workdir_lock
from aikd_jax import writers
from aikd_jax.checkpointing import CHECKPOINT_DIR
from aikd_jax.device_data import DeviceDataset
from aikd_jax.objective import GRAD_CLIP_NORM
from aikd_jax.objective import Objective
from aikd_jax.objective import resolve_objective
from aikd_jax.preemption import Preempted
from aikd_jax.preemption import SignalFlag
from aikd_jax.progress import ConsoleReport
from aikd_jax.progress import NonFiniteStep
from aikd_jax.progress import Progress

STAGES = ("teacher", teacher_logits.STAGE, "student")


class NonFiniteLossError(RuntimeError):
  """A loss term became NaN or Inf; nothing from that point is saved."""


def divergence_message(
  stage: str,
  step: int,
  steps_per_epoch: int,
  values: dict[str, float],
  objective: Objective,
  config: ml_collections.ConfigDict,
) -> str:
  """Names every non-finite term of the step, its other values, a remedy."""
  bad = sorted(name for name, v in values.items() if not np.isfinite(v))
  rest = sorted(name for name in values if name not in bad)
  shown = lambda names: ", ".join(f"{n} = {values[n]:.4g}" for n in names)
  return (
    f"Training diverged at step {step} (epoch {step // steps_per_epoch})"
    f" of the {stage} stage: {shown(bad)} not finite; the same step's "
    f"other values: {shown(rest)}. Nothing after the last checkpoint "
    f"was saved. To go on, {_remedies(stage, objective, config)}, then "
    "rerun."
  )


def _remedies(
  stage: str, objective: Objective, config: ml_collections.ConfigDict
) -> str:
  """What to change after a divergence, the most specific first."""
  remedies = []
  if stage == "student" and objective.uses_teacher:
    remedies.append(
      "ramp the pre-trained model's terms in over more epochs (--config."
      f"teacher_ramp_epochs, now {objective.teacher_ramp_epochs:g})"
    )
  remedies.append(
    f"lower --config.learning_rate (now {config.learning_rate:g})"
  )
  if stage != "student":
    # The teacher is PS-KD's `ce` recipe: no clip to tune.
    remedies.append(
      f"warm the lr up (--config.warmup_epochs, now {config.warmup_epochs:g})"
    )
  elif objective.grad_clip_norm:
    remedies.append(
      "clip the student's gradient harder (--config.grad_clip_norm, now "
      f"{objective.grad_clip_norm:g})"
    )
  else:
    remedies.append(
      "clip the student's gradient (e.g. --config.grad_clip_norm="
      f"{GRAD_CLIP_NORM:g})"
    )
  return ", or ".join(remedies)


def _untimed(phase: str) -> ContextManager[None]:
  del phase
  return contextlib.nullcontext()


def train_stage(
  stage: stage_lib.Stage,
  config: ml_collections.ConfigDict,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  workdir: str,
  signals: SignalFlag,
  teacher: step_lib.Teacher | None = None,
  time_phase: Callable[[str], ContextManager[None]] = _untimed,
  later_stages: tuple[int, int] = (0, 0),
) -> step_lib.TrainState:
  """Trains `stage` to its last epoch, resuming from its checkpoints.

  Evaluates on the test split after every epoch, saves a checkpoint every
  `config.checkpoint_every_epochs` epochs (or, with
  `config.checkpoint_every_minutes`, by wall time: checkpoint_policy.py)
  and at the end, then writes the stage's results file.

  Args:
    teacher: the pre-trained model, for an objective that uses one.
    time_phase: `time_phase(name)` is entered around each part of the loop
      other than the steps: "log" (reading the metric totals, the divergence
      check, the scalars), "epoch_end" (the same for the read that ends an
      epoch, which waits for its last step), "eval" (evaluation and the
      epoch's history entry) and "checkpoint" (starting a save). For
      benchmarks.
    later_stages: (steps, epochs) of the training stages that will run after
      this one, for the whole run's ETA.

  Returns:
    The final train state.

  Raises:
    Preempted: a signal arrived; a checkpoint of the current step was saved.
    NonFiniteLossError: a metric or the test logits stopped being finite.
  """
  steps_per_epoch, total_steps = stage.steps_per_epoch, stage.total_steps
  stage_dir = os.path.join(workdir, stage.name)
  os.makedirs(stage_dir, exist_ok=True)
  state, progress = stage_lib.create_train_state(stage, data, mesh), Progress()
  checkpoints = checkpointing.StageCheckpoints(
    os.path.join(stage_dir, CHECKPOINT_DIR), config.keep_checkpoints
  )
  latest = checkpoints.latest_step()
  if latest is not None:
    start = time.monotonic()
    state, saved = checkpoints.restore(latest, state)
    progress = Progress.restore(saved, mesh)
    reached = latest // steps_per_epoch
    if reached > stage.num_epochs:
      raise run_config.ConfigError(
        f"The {stage.name} stage already reached epoch {reached}; "
        f"num_epochs={stage.num_epochs} would end before it."
      )
    logging.info(
      "%s: resumed from step %d (epoch %d) in %.1fs.",
      stage.name,
      latest,
      reached,
      time.monotonic() - start,
    )
  # Several steps per call (dispatch.py): logs, signals and the divergence
  # check then act after the call that reaches their step.
  per_call = _steps_per_call(config, data)
  step_fn = stage_lib.make_train_step(stage, mesh, per_call)
  predict = stage_lib.make_predict_fn(stage, data, mesh, config.eval_batch_size)
  # The console gets ConsoleReport's lines; TensorBoard every scalar.
  writer = writers.create_writer(
    stage_dir, just_logging=jax.process_index() > 0, console=False
  )
  console = ConsoleReport(
    stage.name,
    num_epochs=stage.num_epochs,
    steps_per_epoch=steps_per_epoch,
    batch_size=config.batch_size,
    start_step=int(state.student.step),
    later_steps=later_stages[0],
    later_epochs=later_stages[1],
  )
  if latest is None:
    writer.write_hparams(config.to_dict())

  policy = checkpoint_policy.CheckpointPolicy(
    config.checkpoint_every_epochs, config.checkpoint_every_minutes
  )

  # Reads lag one call behind the steps: a sync point (a log step, an
  # epoch's end) asks for the metric totals, and they are read after the
  # next call is dispatched, so the device runs that call while the host
  # reads, logs and starts the next epoch. An epoch's evaluation is
  # dispatched at its end and read at the next epoch's first sync point.
  # A save or a stop reads both first (a checkpoint's history holds every
  # epoch before its step): with saves by time, the device seldom waits
  # for the host.
  asked: list[tuple[int, int]] = []  # (step, epoch) of the read asked for
  started_evaluations: dict[int, object] = {}  # epoch -> its test logits
  unread: list[tuple] = []  # (epoch, step, train means, started logits)

  def finish_read(saving: bool = False) -> None:
    if not asked:
      return
    at_step, epoch = asked.pop()
    ends_epoch = at_step == (epoch + 1) * steps_per_epoch
    with time_phase("epoch_end" if ends_epoch else "log"):
      try:
        scalars, closed = progress.finish_read()
      except NonFiniteStep as bad:
        raise NonFiniteLossError(
          divergence_message(
            stage.name,
            bad.step,
            steps_per_epoch,
            bad.values,
            stage.objective,
            config,
          )
        ) from None
      if scalars is not None:
        rates = console.interval(at_step, scalars)
        writer.write_scalars(at_step, scalars | rates)
    if closed is not None:
      if not saving:
        console.steps_ended()
      started = started_evaluations.pop(epoch)
      unread.append((epoch, at_step, closed, started))

  def read_evaluation(overlapped: bool) -> None:
    if not unread:
      return
    epoch, at_step, train, started = unread.pop()
    excluded = (
      contextlib.nullcontext() if overlapped else console.excluded("eval")
    )
    with time_phase("eval"), excluded:
      test, reliability = _evaluate(stage, config, started, data, epoch)
      progress.record_epoch(epoch, train, test, reliability)
      writer.write_scalars(at_step, {f"test/{k}": v for k, v in test.items()})
      if jax.process_index() == 0:
        writer.write_images(
          at_step,
          {
            "test/reliability": writers.reliability_image(
              reliability,
              f"{stage.name}, epoch {epoch + 1}: ECE {test['ece']:.2f}%",
            )
          },
        )
    console.end_epoch(epoch, test)

  def save(step: int) -> None:
    finish_read(saving=True)
    read_evaluation(overlapped=False)
    policy.saved()
    with time_phase("checkpoint"), console.excluded("checkpoint"):
      checkpoints.save(step, state, progress.saved())

  def stop_here(step: int) -> None:
    finish_read(saving=True)
    if checkpoints.latest_step() != step:
      save(step)
    checkpoints.wait()
    raise Preempted(
      f"{signals.received} received: saved a checkpoint at step {step} of "
      f"the {stage.name} stage. Rerun the same command with the same "
      "--workdir to resume."
    )

  step, stop = int(state.student.step), False
  start_step = step
  try:
    for epoch in range(step // steps_per_epoch, stage.num_epochs):
      step_data = stage_lib.step_data(stage, data, mesh, epoch, teacher)
      feed = input_pipeline.feed(step_data, stage, data, mesh, epoch, step)
      epoch_start, epoch_end = (
        epoch * steps_per_epoch,
        (epoch + 1) * steps_per_epoch,
      )
      while step < epoch_end:
        first = step == start_step
        if first:
          console.compiling()
        count = dispatch.call_length(step, epoch_end, per_call)
        if per_call > 1:  # Device-resident data only (dispatch.check_data).
          state, metrics = step_fn(state, step_data, np.int32(count))
          progress.add_steps(metrics, step, count)
        else:
          state, metrics = step_fn(state, next(feed))
          progress.add(metrics, step)
        before, step = step, step + count
        if first:
          jax.block_until_ready(metrics)
          console.compiled(step)
        finish_read()
        sync_point = step == epoch_end or dispatch.crossed(
          before, step, config.log_every_steps
        )
        stop = signals.stop_agreed(sync_point)
        if sync_point or stop:
          read_evaluation(overlapped=True)
          progress.request_read(step - epoch_start, step == epoch_end)
          asked.append((step, epoch))
          if not stop and step < epoch_end and policy.at_log_step():
            save(step)
        if stop and step < epoch_end:
          stop_here(step)
      started_evaluations[epoch] = input_pipeline.start_test_logits(
        predict, state.student.variables, data, mesh, config.eval_batch_size
      )
      if policy.at_epoch_end(epoch, step == total_steps):
        save(step)
      if stop and step < total_steps:
        stop_here(step)
    finish_read()
    read_evaluation(overlapped=False)
    checkpoints.wait()
    if (
      latest is None
      or latest < total_steps
      or not (results_lib.finished_results(stage_dir, stage.num_epochs))
    ):
      _write_stage_results(stage_dir, stage, config, progress.history)
  finally:
    checkpoints.wait()
    checkpoints.close()
    writer.close()
  return state


def _steps_per_call(config: ml_collections.ConfigDict, data) -> int:
  """The run's steps per call of the jitted step (dispatch.py)."""
  return dispatch.steps_per_call(
    config.steps_per_dispatch,
    isinstance(data, streaming.StreamedDataset),
    jax.default_backend(),
  )


def _evaluate(
  stage: stage_lib.Stage,
  config: ml_collections.ConfigDict,
  started,
  data: DeviceDataset,
  epoch: int,
) -> tuple[dict, dict]:
  """The test split's report and reliability diagram after `epoch`, from
  `input_pipeline.start_test_logits`' logits."""
  logits = input_pipeline.read_test_logits(started, data)
  if not np.all(np.isfinite(logits)):
    raise NonFiniteLossError(
      f"Training diverged in epoch {epoch} of the {stage.name} stage: "
      "every loss term was finite, but the test logits after step "
      f"{(epoch + 1) * stage.steps_per_epoch} are not (the eval-mode "
      "weights exploded). Nothing from this epoch was saved. To go on, "
      f"{_remedies(stage.name, stage.objective, config)}, then rerun."
    )
  return (
    metrics_lib.classification_report(logits, data.test_labels),
    metrics_lib.reliability_diagram(logits, data.test_labels),
  )


def _write_stage_results(
  stage_dir: str,
  stage: stage_lib.Stage,
  config: ml_collections.ConfigDict,
  history: list[dict],
) -> None:
  if jax.process_index() > 0:  # Every process holds the same; one file.
    return
  best = min(history, key=lambda h: h["test"]["top1_err"])
  results_lib.write_json(
    os.path.join(stage_dir, results_lib.RESULTS_FILE),
    {
      "stage": stage.name,
      "method": "ce" if stage.name == "teacher" else config.method,
      "objective": dataclasses.asdict(stage.objective),
      "num_epochs": stage.num_epochs,
      "steps_per_epoch": stage.steps_per_epoch,
      "complete": True,
      "last": {"epoch": history[-1]["epoch"], **history[-1]["test"]},
      "best": {"epoch": best["epoch"], **best["test"]},
      "history": history,
    },
  )


def _restore_final(
  stage: stage_lib.Stage,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  directory: str,
) -> step_lib.ClassifierState:
  """The model (variables and step) of the latest checkpoint in `directory`.

  Only the model is read, so a teacher trained with other optimiser
  settings (another run's --config.teacher_checkpoint) loads all the same.
  check_inputs has made sure a checkpoint is there.
  """
  step = checkpointing.saved_steps(directory)[-1]
  target = stage_lib.create_train_state(stage, data, mesh).student
  return checkpointing.restore_model(directory, step, target)


def _teacher_stage(
  config: ml_collections.ConfigDict,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  workdir: str,
  signals: SignalFlag,
  later_epochs: int = 0,
) -> tuple[stage_lib.Stage, step_lib.ClassifierState]:
  """Stage 1: the teacher's final state (trained, resumed or loaded).

  `later_epochs`: the student's epochs to come, for the run's ETA."""
  stage = stage_lib.build_stage(
    "teacher",
    resolve_objective("ce"),
    run_config.teacher_epochs(config),
    config,
    data,
    mesh.devices.size,
  )
  stage_dir = os.path.join(workdir, stage.name)
  if config.teacher_checkpoint:
    teacher = _restore_final(stage, data, mesh, config.teacher_checkpoint)
    logging.info(
      "teacher: loaded %s step %d.",
      config.teacher_checkpoint,
      int(teacher.step),
    )
  elif results_lib.finished_results(stage_dir, stage.num_epochs):
    logging.info("teacher: finished earlier; loading its final state.")
    teacher = _restore_final(
      stage, data, mesh, os.path.join(stage_dir, CHECKPOINT_DIR)
    )
  else:
    later = (later_epochs * stage.steps_per_epoch, later_epochs)
    teacher = train_stage(
      stage, config, data, mesh, workdir, signals, later_stages=later
    ).student
  return stage, teacher


def check_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """The checks that need nothing from the workdir: they run before it is
  locked (or created), so a run they refuse never touches it."""
  run_config.validate(config)
  run_config.check_workdir(workdir)
  data_lib.check_dataset_available(
    config.dataset, config.data_dir or None, download=config.download
  )


def check_run_folder(
  config: ml_collections.ConfigDict,
  workdir: str,
  ignore: frozenset = frozenset(),
) -> list[str]:
  """A run folder accepts `config` (its saved config allows the change) and
  the newest checkpoint of each of its stages is whole.

  Returns:
    The log lines of accepted changes.
  """
  notes = run_config.compare_with_saved(config, workdir, ignore)
  for stage in STAGES:
    checkpointing.verify_latest(os.path.join(workdir, stage, CHECKPOINT_DIR))
  return notes


def check_inputs(
  config: ml_collections.ConfigDict, workdir: str, teacher_only: bool = False
) -> tuple[Objective, list[str]]:
  """The checks on the workdir, after `check_config` and under its lock.

  Reads the workdir, writes nothing. A field the workdir's config predates
  takes the value it was started with (run_config.adopt_legacy_values), in
  `config`.

  Returns:
    The objective, and the log lines of accepted changes.
  """
  notes = [
    f" {line}" for line in run_config.adopt_legacy_values(config, workdir)
  ]
  # Legacy values are ones a run was started with: valid by construction.
  objective = run_config.objective_from_config(config)
  ignore = run_config.STUDENT_ONLY_FIELDS if teacher_only else frozenset()
  notes += check_run_folder(config, workdir, ignore)
  if teacher_only or objective.uses_teacher:
    _check_teacher_weights(config, workdir)
  return objective, notes


def _check_teacher_weights(
  config: ml_collections.ConfigDict, workdir: str
) -> None:
  """A teacher the run will load (not train) has a sound checkpoint."""
  if config.teacher_checkpoint:
    checkpointing.require_checkpoint(
      config.teacher_checkpoint,
      "Point --config.teacher_checkpoint at the checkpoints folder of a "
      "finished teacher (its WORKDIR/teacher/checkpoints).",
    )
    checkpointing.verify_latest(config.teacher_checkpoint)
    return
  stage_dir = os.path.join(workdir, "teacher")
  if results_lib.finished_results(stage_dir, run_config.teacher_epochs(config)):
    checkpointing.require_checkpoint(
      os.path.join(stage_dir, CHECKPOINT_DIR),
      f"Its {results_lib.RESULTS_FILE} says the teacher finished; to train "
      f"it again, remove the folder {stage_dir} and rerun the same command "
      "(the same seed trains the same teacher).",
    )


def _check_progress(
  config: ml_collections.ConfigDict,
  objective: Objective,
  data: DeviceDataset,
  workdir: str,
  teacher_only: bool,
) -> None:
  """Builds the stages to run (refusing a batch larger than the data) and
  refuses a num_epochs that ends before a stage's latest checkpoint."""
  epochs = {}
  if teacher_only or objective.uses_teacher:
    epochs["teacher"] = ("ce", run_config.teacher_epochs(config))
  if not teacher_only:
    epochs["student"] = (objective, config.num_epochs)
  for name, (stage_objective, num_epochs) in epochs.items():
    if isinstance(stage_objective, str):
      stage_objective = resolve_objective(stage_objective)
    stage = stage_lib.build_stage(
      name, stage_objective, num_epochs, config, data, jax.device_count()
    )
    if name == "teacher" and config.teacher_checkpoint:
      continue
    steps = checkpointing.saved_steps(
      os.path.join(workdir, name, CHECKPOINT_DIR)
    )
    reached = steps[-1] // stage.steps_per_epoch if steps else 0
    if reached > num_epochs:
      option = "teacher_num_epochs" if name == "teacher" else "num_epochs"
      raise run_config.ConfigError(
        f"The {name} stage already reached epoch {reached}; "
        f"{option}={num_epochs} would end before it. Rerun with "
        f"--config.{option}={reached} or more, or use a new --workdir."
      )


def train_and_evaluate(
  config: ml_collections.ConfigDict, workdir: str, teacher_only: bool = False
) -> dict:
  """Runs (or resumes) all stages; returns the student's results.

  With `teacher_only`, runs stage 1 alone and returns the teacher's results:
  a teacher that several students share (`config.teacher_checkpoint` set to
  WORKDIR/teacher/checkpoints) whatever their methods.

  The workdir is locked for the whole run (a second run on it is refused).
  Its config is recorded only once every check has passed, the data's
  included: a refused run leaves the workdir as it found it.
  """
  check_config(config, workdir)
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  accepted = False
  try:
    objective, notes = check_inputs(config, workdir, teacher_only)
    mesh = banks.data_mesh()
    data = input_pipeline.open_dataset(config, mesh)
    streamed = isinstance(data, streaming.StreamedDataset)
    dispatch.check_data(config.steps_per_dispatch, streamed)
    logging.info(
      "%s: %d train / %d test examples, %d classes, %d devices, "
      "%d steps per call%s.",
      config.dataset,
      data.layout.num_examples,
      len(data.test_labels),
      data.num_classes,
      mesh.devices.size,
      _steps_per_call(config, data),
      " (automatic)" if config.steps_per_dispatch == dispatch.AUTO else "",
    )
    _check_progress(config, objective, data, workdir, teacher_only)
    for note in notes:
      logging.warning("Config change accepted on resume:%s", note)
    writers.open_log_files()
    if jax.process_index() == 0:
      run_config.save(config, workdir)
    accepted = True
    return _run_stages(config, objective, data, mesh, workdir, teacher_only)
  finally:
    lock.release(undo_creation=not accepted)


def _run_stages(
  config: ml_collections.ConfigDict,
  objective: Objective,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  workdir: str,
  teacher_only: bool,
) -> dict:
  """The three stages (or the teacher's alone), each resumed or skipped."""
  with SignalFlag() as signals:
    if teacher_only:
      _teacher_stage(config, data, mesh, workdir, signals)
      _await_results_file()
      return results_lib.finished_results(os.path.join(workdir, "teacher"))
    teacher = None
    if not objective.uses_teacher:
      logging.info(
        "teacher and teacher_logits: skipped (method %s uses no "
        "pre-trained model).",
        config.method,
      )
    else:
      teacher_stage, teacher_state = _teacher_stage(
        config, data, mesh, workdir, signals, config.num_epochs
      )
      if objective.teacher_mode == "online":
        logging.info("teacher_logits: skipped (online teacher).")
        teacher = step_lib.Teacher(variables=teacher_state.variables)
      else:
        teacher = step_lib.Teacher(
          logits=teacher_logits.compute_or_load(
            teacher_stage, teacher_state, config, data, mesh, workdir
          )
        )
    student = stage_lib.build_stage(
      "student", objective, config.num_epochs, config, data, mesh.devices.size
    )
    stage_dir = os.path.join(workdir, student.name)
    if results_lib.finished_results(stage_dir, student.num_epochs):
      logging.info("student: finished earlier; nothing to do.")
    else:
      train_stage(student, config, data, mesh, workdir, signals, teacher)
  _await_results_file()
  return results_lib.read_json(
    os.path.join(stage_dir, results_lib.RESULTS_FILE)
  )


def _await_results_file() -> None:
  """Returns once process 0 has written the last stage's results file.

  Only process 0 writes it, after its own last step; another process,
  done with the same step, could otherwise read the file before it exists.
  """
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("stage results written")
