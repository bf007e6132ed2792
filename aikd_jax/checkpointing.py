"""Per-stage checkpoints with orbax: asynchronous, atomic, a few kept.

A stage's checkpoint holds every array its result depends on (the `state`
item: student and discriminator TrainStates, the prediction bank) and the
bookkeeping that makes a resumed run identical to an uninterrupted one (the
`progress` item: epoch history, partial-epoch metric sums). Everything else
(the augmentation keys, the per-epoch shuffles, the example ids) derives from
the seed and the step, so it is recomputed, not stored.

Once orbax has finished a save, the step folder gets a sha256 of each of its
files (checksums.sha256, `sha256sum -c` reads it). The newest checkpoint is
checked against it before a run resumes, so a flipped bit is refused rather
than trained on. A save that fails (a full disk, a folder made unwritable)
stops the run with one line; the checkpoints before it stay as they were.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import os
import sys
import tempfile
import time
from typing import Any

from absl import logging
import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

from aikd_jax import results as results_lib

# A stage's checkpoints live in this folder of the stage's own folder.
CHECKPOINT_DIR = "checkpoints"
# Orbax writes this file last when it finalises a step directory.
_FINALIZED_MARKER = "_CHECKPOINT_METADATA"
# Written by us into a step folder once orbax has finished it.
CHECKSUM_FILE = "checksums.sha256"


class _OrbaxErrorsInOneLine(logging.logging.Filter):
  """Keeps orbax's error lines but not their tracebacks.

  A failed asynchronous save makes each of orbax's background threads log
  its traceback; the error that matters (which step, which folder, the
  cause, what is intact) is raised as one CheckpointWriteError.
  """

  def filter(self, record):
    if "/orbax/" in record.pathname and record.levelno >= logging.ERROR:
      record.msg = (record.getMessage().splitlines() or [""])[0]
      record.args, record.exc_info, record.exc_text = None, None, None
    return True


logging.get_absl_logger().addFilter(_OrbaxErrorsInOneLine())


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read; the message says how to fall back."""


class CheckpointWriteError(CheckpointError):
  """A checkpoint could not be written; the earlier ones are intact."""


def saved_steps(directory: str) -> list[int]:
  """The steps of the finished step folders in `directory`, ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def _file_digests(step_dir: str) -> dict[str, str]:
  """sha256 of every file of a step folder but the checksum file."""
  digests = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if relative == CHECKSUM_FILE:
        continue
      with open(path, "rb") as f:
        digests[relative] = hashlib.file_digest(f, "sha256").hexdigest()
  return digests


def write_checksums(step_dir: str) -> None:
  """Records the sha256 of each file of a finished step folder."""
  lines = [f"{d}  {p}" for p, d in _file_digests(step_dir).items()]
  results_lib.write_text(
    os.path.join(step_dir, CHECKSUM_FILE), "\n".join(lines) + "\n"
  )


def verify_checksums(directory: str, step: int) -> bool:
  """Checks a step folder against its checksums.

  Returns:
    False if the folder has no checksum file (saved by an older version, or
    the run was killed between orbax's save and the checksums), True if
    every file matches.
  Raises:
    CheckpointError: a file differs, is missing, or was added.
  """
  step_dir = os.path.join(directory, str(step))
  path = os.path.join(step_dir, CHECKSUM_FILE)
  if not os.path.exists(path):
    return False
  with open(path) as f:
    expected = dict(
      reversed(line.split("  ", 1)) for line in f.read().splitlines() if line
    )
  found = _file_digests(step_dir)
  for name in sorted(set(expected) | set(found)):
    if expected.get(name) != found.get(name):
      what = (
        "is missing"
        if name not in found
        else "is not in the checksum list"
        if name not in expected
        else "does not match its checksum"
      )
      raise CheckpointError(
        _fallback_message(directory, step) + f" ({name} {what}.)"
      )
  return True


def _fallback_message(directory: str, step: int) -> str:
  return (
    f"The latest checkpoint {os.path.join(directory, str(step))} is "
    f"corrupted or incomplete. To resume from the previous one, move "
    f"that folder out of the way (e.g. `mv {directory}/{step} "
    f"{directory}/{step}.bad`) and rerun the same command."
  )


def verify_latest(directory: str) -> None:
  """Raises CheckpointError if the newest step folder is not a whole save,
  or differs from its checksums.

  Reads the folder once (well under a second for a ResNet-18), so it runs
  before any compute.
  """
  steps = saved_steps(directory)
  if not steps:
    return
  latest = os.path.join(directory, str(steps[-1]))
  expected = [_FINALIZED_MARKER, "state", "progress"]
  if not all(os.path.exists(os.path.join(latest, name)) for name in expected):
    raise CheckpointError(_fallback_message(directory, steps[-1]))
  if not verify_checksums(directory, steps[-1]):
    logging.warning(
      "%s has no %s (saved by an older version, or the run stopped just "
      "after saving it): resuming from it unverified.",
      latest,
      CHECKSUM_FILE,
    )


def require_checkpoint(directory: str, remedy: str) -> int:
  """The latest step in `directory`; CheckpointError (with `remedy`) if it
  holds none. Creates nothing."""
  steps = saved_steps(directory)
  if not steps:
    what = "does not exist" if not os.path.isdir(directory) else "is empty"
    raise CheckpointError(
      f"The checkpoint folder {directory} {what}, but this run needs the "
      f"teacher's final weights from it. {remedy}"
    )
  return steps[-1]


@contextlib.contextmanager
def _quiet_stderr():
  """Sends file descriptor 2 to /dev/null for the duration.

  When one array of a checkpoint cannot be read, orbax's other read tasks
  fail too, from background threads, each printing a long traceback; the one
  message that matters (which checkpoint, and how to fall back) would drown
  in them. Restores are short, so nothing else is lost for long.
  """
  sys.stderr.flush()
  saved = os.dup(2)
  try:
    with open(os.devnull, "w") as devnull:
      os.dup2(devnull.fileno(), 2)
      yield
      sys.stderr.flush()
  finally:
    os.dup2(saved, 2)
    os.close(saved)


def _probe_folder_creation(directory: str) -> None:
  """Raises OSError now if no step folder can be made in `directory`.

  orbax's background writers wait for the step folder's creation with a
  5-minute timeout and keep the process alive meanwhile, so a save that
  cannot create it would hold the exit that long after the error.
  """
  if not os.path.lexists(directory):
    os.makedirs(directory)
  os.rmdir(tempfile.mkdtemp(prefix="write-probe-", dir=directory))


class StageCheckpoints:
  """The checkpoints of one training stage."""

  def __init__(self, directory: str, keep: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
      preservation_policy=preservation_policy.LatestN(max(1, keep)),
      enable_async_checkpointing=True,
      cleanup_tmp_directories=True,
      create=True,
    )
    self._manager = ocp.CheckpointManager(
      self.directory, options=options, item_names=("state", "progress")
    )
    self._pending: int | None = None  # Saved, not yet checksummed.
    self._finished = self._manager.latest_step()  # The newest whole save.
    self._failed = False  # A save failed and was reported.

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, progress: dict) -> None:
    """Starts an asynchronous save (device arrays are copied first).

    `progress` is copied now: it is written later, in the background, while
    the caller goes on changing its own dict. The previous save is finished
    (and checksummed) first.

    Raises:
      CheckpointWriteError: this save or the previous one failed.
    """
    self.wait()
    progress = json.loads(json.dumps(progress))
    with self._write_errors(step):
      _probe_folder_creation(self.directory)
      self._manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state),
          progress=ocp.args.JsonSave(progress),
        ),
        force=True,
      )
    self._pending = step

  @contextlib.contextmanager
  def _write_errors(self, step: int):
    """Turns any failure to write `step` into one CheckpointWriteError."""
    try:
      yield
    except Exception as error:  # orbax and tensorstore raise many kinds.
      self._failed = True
      detail = (str(error).splitlines() or [type(error).__name__])[0][:300]
      kept = (
        f"the checkpoint of step {self._finished} is intact; once it is "
        "fixed, rerun the same command to resume from there"
        if self._finished is not None
        else "no earlier checkpoint exists; once it is fixed, rerun the same "
        "command"
      )
      raise CheckpointWriteError(
        f"Could not write the checkpoint of step {step} to {self.directory}"
        f" ({type(error).__name__}: {detail}). Check the free space and the "
        f"folder's permissions; {kept}."
      ) from None

  def restore(self, step: int, target: Any) -> tuple[Any, dict]:
    """Restores onto `target`'s structure, shapes, dtypes and shardings."""
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    with _quiet_stderr():
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract),
            progress=ocp.args.JsonRestore(),
          ),
        )
        error = None
      except Exception as failure:  # orbax raises many kinds.
        error = failure
        # Let the failed restore's other reads end while still unprinted.
        self._manager.close()
        gc.collect()
        time.sleep(1.0)
        gc.collect()
    if error is not None:
      detail = (str(error).splitlines() or [type(error).__name__])[0][:300]
      raise CheckpointError(
        _fallback_message(self.directory, step) + f" ({detail})"
      )
    return restored["state"], restored["progress"]

  def wait(self) -> None:
    """Finishes the pending save and writes its checksums (process 0)."""
    step, self._pending = self._pending, None
    if step is None:
      # After a reported failure orbax raises it again; once is enough.
      with contextlib.suppress(*([Exception] if self._failed else [])):
        self._manager.wait_until_finished()
      return
    with self._write_errors(step):
      self._manager.wait_until_finished()
      step_dir = os.path.join(self.directory, str(step))
      if jax.process_index() == 0 and os.path.isdir(step_dir):
        write_checksums(step_dir)
    self._finished = step

  def close(self) -> None:
    with contextlib.suppress(*([Exception] if self._failed else [])):
      self._manager.close()


def restore_model(directory: str, step: int, target: Any) -> Any:
  """Restores one classifier's model from a stage checkpoint, nothing else.

  Only `student.params`, `student.batch_stats` and `student.step` are read,
  onto `target`'s (a ClassifierState's) structure, shapes, dtypes and
  shardings, so the optimiser state and the discriminator of the run that
  saved it (its optax chain, its settings) need not match this run's.
  Returns `target` with those three replaced.
  """
  wanted = {
    "student": {
      "params": target.params,
      "batch_stats": target.batch_stats,
      "step": target.step,
    }
  }
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, wanted)
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  with _quiet_stderr():
    try:
      with ocp.PyTreeCheckpointer() as checkpointer:
        restored = checkpointer.restore(
          path,
          args=ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
          ),
        )
      error = None
    except Exception as failure:  # orbax raises many kinds.
      error = failure
  if error is not None:
    detail = (str(error).splitlines() or [type(error).__name__])[0][:300]
    raise CheckpointError(
      _fallback_message(os.path.abspath(directory), step) + f" ({detail})"
    )
  student = restored["student"]
  return target.replace(
    params=student["params"],
    batch_stats=student["batch_stats"],
    step=student["step"],
  )


def load_arrays(directory: str, step: int | None = None) -> tuple[int, Any]:
  """Reads a stage checkpoint's `state` as NumPy arrays, on any topology.

  For inspection and comparison (tests, notebooks): no model or mesh needed.
  Returns (step, nested dict of arrays); `step` None means the latest.
  """
  if step is None:
    steps = sorted(int(n) for n in os.listdir(directory) if n.isdigit())
    if not steps:
      raise CheckpointError(f"No checkpoint in {directory}.")
    step = steps[-1]
  path = os.path.join(os.path.abspath(directory), str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
    )
    state = checkpointer.restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args)
    )
  return step, state
