"""Stage 2: the teacher's eval-mode logits on every un-augmented training image.

They fill the teacher-logit bank (rows by example id, sharded like the
prediction bank) that a precomputed teacher's student reads. Computed once,
saved under the teacher's step, and loaded afterwards; a teacher trained
further (an extended num_epochs) gets its bank recomputed.
"""

from __future__ import annotations

import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from aikd_jax import banks
from aikd_jax import checkpointing
from aikd_jax import input_pipeline
from aikd_jax import metrics as metrics_lib
from aikd_jax import results as results_lib
from aikd_jax import stage as stage_lib
from aikd_jax import train_step as step_lib
from aikd_jax.device_data import DeviceDataset

STAGE = "teacher_logits"


def compute_or_load(
  teacher_stage: stage_lib.Stage,
  teacher: step_lib.ClassifierState,
  config: ml_collections.ConfigDict,
  data: DeviceDataset,
  mesh: jax.sharding.Mesh,
  workdir: str,
) -> jax.Array:
  """The teacher-logit bank [N_pad, C], sharded by example id."""
  teacher_step = int(teacher.step)
  stage_dir = os.path.join(workdir, STAGE)
  checkpoints = checkpointing.StageCheckpoints(
    os.path.join(stage_dir, checkpointing.CHECKPOINT_DIR), keep=1
  )
  results_path = os.path.join(stage_dir, results_lib.RESULTS_FILE)
  try:
    if checkpoints.latest_step() == teacher_step:
      logging.info("teacher_logits: finished earlier; loading the bank.")
      template = {
        "teacher_bank": jax.device_put(
          jnp.zeros(
            (data.layout.num_rows, data.num_classes), config.bank_dtype
          ),
          banks.data_sharding(mesh),
        )
      }
      restored, progress = checkpoints.restore(teacher_step, template)
      if not results_lib.finished_results(stage_dir):  # Stopped before.
        _write_results(results_path, progress["train_report"], None)
      return restored["teacher_bank"]
    start = time.monotonic()
    predict = stage_lib.make_predict_fn(
      teacher_stage, data, mesh, config.eval_batch_size
    )
    logits = input_pipeline.train_logits_by_id(
      predict, teacher.variables, data, mesh, config.eval_batch_size
    )
    # Sharded as a loaded bank is, so a fresh and a resumed student step
    # compile to one program.
    bank = jax.device_put(
      logits.astype(config.bank_dtype), banks.data_sharding(mesh)
    )
    host = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
    valid = data.train_labels_by_id >= 0
    report = metrics_lib.classification_report(
      host[valid], data.train_labels_by_id[valid]
    )
    checkpoints.save(
      teacher_step, {"teacher_bank": bank}, {"train_report": report}
    )
    checkpoints.wait()
    _write_results(results_path, report, time.monotonic() - start)
    logging.info(
      "teacher_logits: %d rows in %.1fs; teacher train top-1 error %.2f%%.",
      int(valid.sum()),
      time.monotonic() - start,
      report["top1_err"],
    )
    return bank
  finally:
    checkpoints.close()


def _write_results(path: str, report: dict, seconds: float | None) -> None:
  if jax.process_index() == 0:  # Every process holds the same; one file.
    results_lib.write_json(
      path,
      {
        "stage": STAGE,
        "complete": True,
        "split": "train (un-augmented, eval mode)",
        "seconds": seconds,
        "last": report,
        "best": report,
      },
    )
