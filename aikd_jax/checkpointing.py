"""Per-stage checkpoints with orbax: asynchronous, atomic, a few kept.

A stage's checkpoint holds every array its result depends on (the `state`
item: student and discriminator TrainStates, the prediction bank) and the
bookkeeping that makes a resumed run identical to an uninterrupted one (the
`progress` item: epoch history, partial-epoch metric sums). Everything else
(the augmentation keys, the per-epoch shuffles, the example ids) derives from
the seed and the step, so it is recomputed, not stored.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import sys
import time
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy

# A stage's checkpoints live in this folder of the stage's own folder.
CHECKPOINT_DIR = "checkpoints"
# Orbax writes this file last when it finalises a step directory.
_FINALIZED_MARKER = "_CHECKPOINT_METADATA"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be read; the message says how to fall back."""


def _fallback_message(directory: str, step: int) -> str:
  return (
    f"The latest checkpoint {os.path.join(directory, str(step))} is "
    f"corrupted or incomplete. To resume from the previous one, move "
    f"that folder out of the way (e.g. `mv {directory}/{step} "
    f"{directory}/{step}.bad`) and rerun the same command."
  )


def verify_latest(directory: str) -> None:
  """Raises CheckpointError if the newest step folder is not a whole save.

  Cheap (file listing only), so it runs before any compute.
  """
  if not os.path.isdir(directory):
    return
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  if not steps:
    return
  latest = os.path.join(directory, str(steps[-1]))
  expected = [_FINALIZED_MARKER, "state", "progress"]
  if not all(os.path.exists(os.path.join(latest, name)) for name in expected):
    raise CheckpointError(_fallback_message(directory, steps[-1]))


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

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, progress: dict) -> None:
    """Starts an asynchronous save (device arrays are copied first).

    `progress` is copied now: it is written later, in the background, while
    the caller goes on changing its own dict.
    """
    progress = json.loads(json.dumps(progress))
    self._manager.save(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), progress=ocp.args.JsonSave(progress)
      ),
      force=True,
    )

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
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


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
