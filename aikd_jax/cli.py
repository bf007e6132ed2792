"""Turns a run's outcome into an exit status and a message to act on."""

from __future__ import annotations

import os
import sys

from absl import logging
import ml_collections

from aikd_jax import checkpointing
from aikd_jax import compilation_cache
from aikd_jax import data as data_lib
from aikd_jax import run_config
from aikd_jax import train
from aikd_jax import writers

# Errors that are the input's fault: their message is the whole story.
INPUT_ERRORS = (
  run_config.ConfigError,
  data_lib.DatasetUnavailableError,
  checkpointing.CheckpointError,
)


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of orbax's checkpoint internals (warnings stay)."""

  def filter(self, record):
    return record.levelno >= logging.logging.WARNING or (
      "/orbax/" not in record.pathname
    )


def set_up_logging() -> None:
  """INFO and up on the console, without orbax's internal INFO lines."""
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())


LOG_FILE = "log.txt"


def log_to_file(workdir: str) -> None:
  """Copies the console log to WORKDIR/log.txt, appending (a resumed run adds
  to it). The lines wait in memory until train.train_and_evaluate has checked
  the inputs, so a refused run writes nothing. Process 0 only: call after
  jax.distributed is set up."""
  import jax  # pylint: disable=g-import-not-at-top

  if jax.process_index() > 0:
    return
  handler = writers.LogFile(
    os.path.join(workdir, LOG_FILE), logging.PythonFormatter()
  )
  handler.addFilter(_QuietLibraries())
  logging.logging.getLogger().addHandler(handler)


def input_error_status(error: Exception) -> int:
  """Reports an input error (one of INPUT_ERRORS); returns exit status 2."""
  logging.error("%s", error)
  print(f"error: {error}", flush=True)
  if isinstance(error, checkpointing.CheckpointError):
    # orbax leaves the failed restore's read tasks behind; at interpreter
    # teardown asyncio would print each one's traceback after the message
    # above. Nothing is left to save (no compute has run), so end now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # pylint: disable=protected-access
  return 2


def run(config: ml_collections.ConfigDict, workdir: str) -> int:
  """Runs train_and_evaluate; returns the process exit status."""
  compilation_cache.enable(config.get("compilation_cache_dir", ""))
  try:
    results = train.train_and_evaluate(config, workdir)
  except train.Preempted as stop:
    logging.warning("%s", stop)
    print(stop, flush=True)
    return 0
  except train.NonFiniteLossError as error:
    logging.error("%s", error)
    print(f"error: {error}", flush=True)
    return 3
  except INPUT_ERRORS as error:
    return input_error_status(error)
  last, best = results["last"], results["best"]
  print(
    f"student ({results['method']}): last epoch top-1 error "
    f"{last['top1_err']:.2f}%, best {best['top1_err']:.2f}% "
    f"(epoch {best['epoch'] + 1}/{results['num_epochs']}). Results: "
    f"{workdir}/student/results.json",
    flush=True,
  )
  return 0


# Console commands (pyproject.toml's [project.scripts]).


def train_main() -> None:
  """`aikd-train`: `python main.py` of this source tree, same flags.

  main.py stays the one definition of the training command; the configs it
  reads (configs/*.py) live beside it, so this command needs the source
  tree, installed with `pip install -e .`.
  """
  import runpy  # pylint: disable=g-import-not-at-top

  path = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "main.py"
  )
  if not os.path.isfile(path):
    sys.exit(
      "error: aikd-train runs main.py of an aikd-jax source tree; install "
      'the package from one with `pip install -e .`, or run "python main.py".'
    )
  sys.argv[0] = path
  runpy.run_path(path, run_name="__main__")


def compare_main() -> None:
  """`aikd-compare`: `python -m aikd_jax.compare`, same flags."""
  from absl import app  # pylint: disable=g-import-not-at-top

  from aikd_jax import compare  # pylint: disable=g-import-not-at-top

  compare.define_flags()
  set_up_logging()
  app.run(compare.main)


def report_main() -> None:
  """`aikd-report`: `python -m aikd_jax.report`, same flags."""
  from absl import app  # pylint: disable=g-import-not-at-top

  from aikd_jax import report  # pylint: disable=g-import-not-at-top

  report.define_flags()
  app.run(report.main)
