"""The workdir's safeguards, in-process: the lock, checkpoint checksums and
write failures, a teacher's model restored whatever its optimiser, and the
config record (config.json kept as started, later changes listed)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import e2e_util as u
import flax.linen as nn
from flax.training import train_state as flax_train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from aikd_jax import checkpointing
from aikd_jax import objective as objective_lib
from aikd_jax import run_config
from aikd_jax import train_step as step_lib
from aikd_jax import workdir_lock

# The lock.


def test_a_second_lock_is_refused_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  first = workdir_lock.WorkdirLock(workdir)
  first.acquire()
  try:
    # flock conflicts between two opens of the file, in one process too.
    with pytest.raises(workdir_lock.WorkdirBusy) as info:
      workdir_lock.WorkdirLock(workdir).acquire()
    message = str(info.value)
    assert f"pid {os.getpid()}" in message, message
    assert "in use by another run" in message and workdir in message
    assert "running since 20" in message, message
  finally:
    first.release()
  assert not os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  second = workdir_lock.WorkdirLock(workdir)
  second.acquire()  # Free again.
  second.release()


def test_a_busy_comparison_folder_is_refused_and_left_alone(tmp_path):
  from aikd_jax import compare  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "comparison")
  holder = workdir_lock.WorkdirLock(workdir)
  holder.acquire()
  try:
    before = u.file_digests(workdir)
    with pytest.raises(workdir_lock.WorkdirBusy, match="in use by another"):
      compare.run_comparison(u.digits_config(), workdir, ["ce"], 1)
    assert u.file_digests(workdir) == before
  finally:
    holder.release()
  # Refused on a new folder for another reason: nothing is left behind.
  fresh = str(tmp_path / "fresh")
  with pytest.raises(run_config.ConfigError, match="lambda_adv"):
    compare.run_comparison(u.digits_config(lambda_adv=0.5), fresh, ["ce"], 1)
  assert not os.path.exists(fresh)


def test_undo_removes_only_the_folders_the_lock_created(tmp_path):
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("x")
  lock = workdir_lock.WorkdirLock(str(existing / "a" / "b"))
  lock.acquire()
  assert (existing / "a" / "b" / workdir_lock.LOCK_FILE).exists()
  lock.release(undo_creation=True)
  assert sorted(os.listdir(existing)) == ["keep.txt"]
  # A workdir that existed is kept, less the lock file.
  lock = workdir_lock.WorkdirLock(str(existing))
  lock.acquire()
  lock.release(undo_creation=True)
  assert sorted(os.listdir(existing)) == ["keep.txt"]


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  """kill -9 of the holder: the OS drops the lock, the next run takes it."""
  workdir = str(tmp_path / "run")
  holder = subprocess.Popen(
    [
      sys.executable,
      "-c",
      "import sys, time\n"
      "from aikd_jax import workdir_lock\n"
      "workdir_lock.WorkdirLock(sys.argv[1]).acquire()\n"
      "print('locked', flush=True)\n"
      "time.sleep(600)\n",
      workdir,
    ],
    cwd=u.REPO_ROOT,
    env={**u.subprocess_env(), "PYTHONPATH": u.REPO_ROOT},
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lock.WorkdirBusy) as info:
      workdir_lock.WorkdirLock(workdir).acquire()
    assert f"pid {holder.pid}" in str(info.value)
  finally:
    holder.kill()  # SIGKILL: no clean-up of its own.
    holder.wait(timeout=60)
  assert os.path.exists(os.path.join(workdir, workdir_lock.LOCK_FILE))
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  lock.release()


# Checkpoints.


class _Linear(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(4)(x)
    return nn.BatchNorm(use_running_average=True)(x)


def _train_state(optimizer: optax.GradientTransformation, scale: float):
  """A TrainState as a stage saves it, the student's parameters scaled."""
  variables = _Linear().init(jax.random.key(0), jnp.ones((1, 3)))
  params = jax.tree.map(lambda p: p * scale + scale, variables["params"])
  student = step_lib.ClassifierState.create(
    apply_fn=None,
    params=params,
    tx=optimizer,
    batch_stats=variables["batch_stats"],
  )
  discriminator = flax_train_state.TrainState.create(
    apply_fn=None, params={"w": jnp.ones((2,))}, tx=optax.adam(1e-3)
  )
  return step_lib.TrainState(
    student=student.replace(step=jnp.asarray(7, jnp.int32)),
    discriminator=discriminator,
    prediction_bank=jnp.zeros((4, 4)),
  )


def _save(directory: str, steps: tuple[int, ...]) -> step_lib.TrainState:
  state = _train_state(optax.sgd(0.1, momentum=0.9), 1.0)
  checkpoints = checkpointing.StageCheckpoints(directory, keep=len(steps))
  try:
    for step in steps:
      checkpoints.save(step, state, {"epoch": step})
    checkpoints.wait()
  finally:
    checkpoints.close()
  return state


def test_every_finished_save_gets_checksums_that_verify(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save(directory, (1, 2))
  for step in (1, 2):
    step_dir = os.path.join(directory, str(step))
    with open(os.path.join(step_dir, checkpointing.CHECKSUM_FILE)) as f:
      listed = {line.split("  ", 1)[1] for line in f.read().splitlines()}
    on_disk = {
      os.path.relpath(os.path.join(root, name), step_dir)
      for root, _, names in os.walk(step_dir)
      for name in names
    } - {checkpointing.CHECKSUM_FILE}
    assert listed == on_disk and any(p.startswith("state/") for p in listed)
    assert checkpointing.verify_checksums(directory, step)
  checkpointing.verify_latest(directory)


def test_a_flipped_bit_is_refused_naming_the_step_and_the_fallback(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _save(directory, (1, 2))
  data_dir = os.path.join(directory, "2", "state", "ocdbt.process_0", "d")
  target = max(
    (os.path.join(data_dir, n) for n in os.listdir(data_dir)),
    key=os.path.getsize,
  )
  with open(target, "r+b") as f:
    f.seek(os.path.getsize(target) // 2)
    byte = f.read(1)
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte[0] ^ 0x10]))
  before = u.file_digests(directory)
  with pytest.raises(checkpointing.CheckpointError) as info:
    checkpointing.verify_latest(directory)
  message = str(info.value)
  step_dir = os.path.join(directory, "2")
  assert f"The latest checkpoint {step_dir} is corrupted" in message
  assert f"mv {step_dir} {step_dir}.bad" in message
  assert os.path.relpath(target, step_dir) in message
  assert "does not match its checksum" in message
  assert u.file_digests(directory) == before  # Refusing changed nothing.
  shutil.move(step_dir, step_dir + ".bad")  # The fallback it names.
  checkpointing.verify_latest(directory)


def test_a_checkpoint_without_checksums_is_still_accepted(tmp_path):
  """Saved by an older version, or killed between the save and the sums."""
  directory = str(tmp_path / "checkpoints")
  _save(directory, (1,))
  os.remove(os.path.join(directory, "1", checkpointing.CHECKSUM_FILE))
  assert not checkpointing.verify_checksums(directory, 1)
  checkpointing.verify_latest(directory)


def test_a_failed_save_is_one_error_and_keeps_the_previous_one(tmp_path):
  directory = str(tmp_path / "checkpoints")
  state = _train_state(optax.sgd(0.1), 1.0)
  checkpoints = checkpointing.StageCheckpoints(directory, keep=2)
  aside = str(tmp_path / "aside")
  try:
    checkpoints.save(1, state, {"epoch": 1})
    checkpoints.wait()
    before = u.file_digests(directory)
    # The folder swapped for a file: no step folder can be made in it.
    os.rename(directory, aside)
    with open(directory, "w") as f:
      f.write("in the way\n")
    with pytest.raises(checkpointing.CheckpointWriteError) as info:
      checkpoints.save(2, state, {"epoch": 2})
      checkpoints.wait()
    message = str(info.value)
    assert f"checkpoint of step 2 to {directory}" in message, message
    assert "the checkpoint of step 1 is intact" in message, message
    assert "\n" not in message
    # Nothing of the failed save is left waiting in the background: orbax's
    # writers would otherwise hold the process's exit for 5 minutes.
    waiting = [
      t.name
      for t in threading.enumerate()
      if type(t).__name__ == "_SignalingThread" and t.is_alive()
    ]
    assert not waiting, waiting
  finally:
    if os.path.isfile(directory):
      os.remove(directory)
      os.rename(aside, directory)
    checkpoints.close()
  assert u.file_digests(directory) == before
  checkpointing.verify_latest(directory)


def test_a_teacher_loads_whatever_optimiser_its_run_used(tmp_path):
  """Only the model is restored: a clipped optimiser's state tree differs."""
  directory = str(tmp_path / "checkpoints")
  saved = _save(directory, (7,))
  clipped = optax.chain(
    optax.clip_by_global_norm(5.0), optax.sgd(0.1, momentum=0.9)
  )
  target = _train_state(clipped, 0.0)
  # The whole state cannot be restored onto the other optimiser's tree.
  checkpoints = checkpointing.StageCheckpoints(directory, keep=1)
  try:
    with pytest.raises(checkpointing.CheckpointError):
      checkpoints.restore(7, target)
  finally:
    checkpoints.close()
  restored = checkpointing.restore_model(directory, 7, target.student)
  for got, want in zip(
    jax.tree.leaves(restored.variables),
    jax.tree.leaves(saved.student.variables),
  ):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert int(restored.step) == 7
  # The optimiser state is this run's own, untouched.
  assert jax.tree.structure(restored.opt_state) == jax.tree.structure(
    target.student.opt_state
  )


# The config record.


def test_config_json_keeps_the_start_and_changes_are_listed(tmp_path):
  workdir = str(tmp_path)
  run_config.save(u.digits_config(), workdir)
  path = os.path.join(workdir, run_config.CONFIG_FILE)
  with open(path, "rb") as f:
    started = f.read()
  run_config.save(
    u.digits_config(), workdir
  )  # Nothing changed: nothing recorded.
  assert not os.path.exists(os.path.join(workdir, run_config.CHANGES_FILE))
  longer = u.digits_config(num_epochs=40, log_every_steps=7)
  assert len(run_config.compare_with_saved(longer, workdir)) == 2
  run_config.save(longer, workdir)
  run_config.save(u.digits_config(num_epochs=50, log_every_steps=7), workdir)
  with open(path, "rb") as f:
    assert f.read() == started
  with open(os.path.join(workdir, run_config.CHANGES_FILE)) as f:
    changes = json.load(f)
  assert [c["fields"] for c in changes] == [
    {"log_every_steps": [20, 7], "num_epochs": [30, 40]},
    {"num_epochs": [40, 50]},
  ]
  assert all(c["time"].startswith(time.strftime("%Y-")) for c in changes)
  saved = run_config.saved_config(workdir)
  assert saved["num_epochs"] == 50 and saved["log_every_steps"] == 7
  # Compared with the newest accepted values, not the first ones.
  assert (
    run_config.compare_with_saved(
      u.digits_config(num_epochs=50, log_every_steps=7), workdir
    )
    == []
  )


def test_a_refused_change_records_nothing(tmp_path):
  workdir = str(tmp_path)
  run_config.save(u.digits_config(), workdir)
  before = u.file_digests(workdir)
  with pytest.raises(run_config.ConfigError) as info:
    run_config.compare_with_saved(u.digits_config(batch_size=4096), workdir)
  assert "batch_size: 64 (saved) -> 4096 (now)" in str(info.value)
  assert u.file_digests(workdir) == before


def _predating(workdir: str, *fields: str, config=None) -> None:
  """A config.json written before `fields` existed (and before it recorded
  the resolved objective)."""
  run_config.save(config or u.digits_config(), workdir)

  def forget(saved):
    for field in (*fields, run_config.OBJECTIVE_FIELD):
      del saved[field]

  u.edit_saved_config(workdir, forget)


def test_a_workdir_predating_the_ramp_resumes_without_one(tmp_path):
  workdir = str(tmp_path)
  _predating(workdir, "teacher_ramp_epochs", "warmup_epochs", "grad_clip_norm")
  config = u.digits_config()
  assert run_config.objective_from_config(config).teacher_ramp_epochs > 0
  lines = run_config.adopt_legacy_values(config, workdir)
  # The presets' stabiliser, ramp and clip, is what a run started before it
  # never had; the warmup's default (off) is its legacy value already.
  assert lines == [
    "config.json predates teacher_ramp_epochs: resuming with "
    "teacher_ramp_epochs=0.0, as the run was started.",
    "config.json predates grad_clip_norm: resuming with "
    "grad_clip_norm=0.0, as the run was started.",
  ]
  assert config.teacher_ramp_epochs == 0.0
  assert run_config.objective_from_config(config).teacher_ramp_epochs == 0
  assert config.warmup_epochs == 0.0 and config.grad_clip_norm == 0.0
  assert run_config.compare_with_saved(config, workdir) == []
  # Without the adoption (as the comparison's pre-flight sees it) the same.
  assert run_config.compare_with_saved(u.digits_config(), workdir) == []


def test_a_workdir_saved_with_the_old_clip_default_resumes_unclipped(tmp_path):
  workdir = str(tmp_path)
  run_config.save(
    u.digits_config(grad_clip_norm=0.0), workdir
  )  # the old default
  config = u.digits_config()
  assert config.grad_clip_norm is None
  assert run_config.objective_from_config(config).grad_clip_norm > 0
  lines = run_config.adopt_legacy_values(config, workdir)
  assert lines == [
    "the workdir was started with grad_clip_norm=0.0: resuming with "
    "grad_clip_norm=0.0, as the run was started."
  ]
  assert run_config.objective_from_config(config).grad_clip_norm == 0.0
  assert run_config.compare_with_saved(u.digits_config(), workdir) == []
  # Another clip than the saved one is still a change.
  with pytest.raises(run_config.ConfigError, match="0.0 .saved. -> 2.0"):
    run_config.compare_with_saved(u.digits_config(grad_clip_norm=2.0), workdir)


def test_a_new_fields_explicit_value_is_a_change_like_any_other(tmp_path):
  workdir = str(tmp_path)
  _predating(workdir, "teacher_ramp_epochs", "grad_clip_norm")
  for field, value, shown in (
    ("teacher_ramp_epochs", 5.0, "teacher_ramp_epochs: 0.0 (saved) -> 5.0"),
    ("grad_clip_norm", 5.0, "grad_clip_norm: 0.0 (saved) -> 5.0"),
  ):
    config = u.digits_config(**{field: value})
    lines = run_config.adopt_legacy_values(config, workdir)
    assert not any(f"predates {field}" in line for line in lines), lines
    assert config[field] == value
    with pytest.raises(run_config.ConfigError) as info:
      run_config.compare_with_saved(config, workdir)
    assert shown in str(info.value)


def test_config_json_records_the_resolved_objective(tmp_path):
  workdir = str(tmp_path)
  run_config.save(u.digits_config(method="cs_kd"), workdir)
  with open(os.path.join(workdir, run_config.CONFIG_FILE)) as f:
    recorded = json.load(f)[run_config.OBJECTIVE_FIELD]
  assert recorded["lambda_cls"] == 1.0 and recorded["temperature"] == 4.0
  assert recorded["grad_clip_norm"] == objective_lib.GRAD_CLIP_NORM


def test_a_cs_kd_workdir_from_before_its_clip_resumes_unclipped(tmp_path):
  workdir = str(tmp_path)
  _predating(workdir, config=u.digits_config(method="cs_kd"))
  config = u.digits_config(method="cs_kd")
  assert run_config.objective_from_config(config).grad_clip_norm > 0
  lines = run_config.adopt_legacy_values(config, workdir)
  assert lines == [
    "cs_kd's grad_clip_norm was 0.0 when the workdir was started (1.0 "
    "now): resuming with grad_clip_norm=0.0."
  ]
  assert run_config.objective_from_config(config).grad_clip_norm == 0.0
  assert run_config.compare_with_saved(
    u.digits_config(method="cs_kd"), workdir
  ) == ["  grad_clip_norm: None (saved) -> 0.0 (now)"]
  # Asking for today's clip explicitly is a change of the run.
  with pytest.raises(run_config.ConfigError) as info:
    run_config.compare_with_saved(
      u.digits_config(method="cs_kd", grad_clip_norm=1.0), workdir
    )
  assert "grad_clip_norm, as the method resolves it: 0.0 (saved) -> 1.0" in (
    str(info.value)
  )
  # Other presets' workdirs of that time resolve as today.
  other = str(tmp_path / "ai_kd")
  os.makedirs(other)
  _predating(other)
  assert run_config.adopt_legacy_values(u.digits_config(), other) == []


def test_a_preset_changed_after_the_start_keeps_its_recorded_value(tmp_path):
  workdir = str(tmp_path)
  run_config.save(u.digits_config(), workdir)
  u.edit_saved_config(  # the preset then
    workdir,
    lambda saved: saved[run_config.OBJECTIVE_FIELD].update(lambda_adv=0.3),
  )
  config = u.digits_config()
  lines = run_config.adopt_legacy_values(config, workdir)
  assert lines == [
    "ai_kd's lambda_adv was 0.3 when the workdir was started (0.1 now): "
    "resuming with lambda_adv=0.3."
  ]
  assert run_config.objective_from_config(config).lambda_adv == 0.3
  with pytest.raises(run_config.ConfigError, match="lambda_adv"):
    run_config.compare_with_saved(u.digits_config(lambda_adv=0.1), workdir)
