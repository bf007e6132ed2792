"""Runs (or resumes) AI-KD's three stages: teacher, teacher logits, student.

  python main.py --config=configs/cifar100.py --workdir=DIR
  python main.py --config=configs/digits.py --workdir=DIR --config.method=ps_kd

Rerunning with the same --workdir resumes where the run stopped.
"""

import os
import sys

# TensorFlow (imported only to prepare a TFDS dataset) is quiet unless asked.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app
from absl import flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "workdir",
  None,
  "Directory for checkpoints, logs and "
  "results; rerun with the same one to resume.",
)
config_flags.DEFINE_config_file(
  "config", None, "Training config file.", lock_config=True
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "Multi-process runs: "
  "host:port of process 0 (default: $AIKD_COORDINATOR_ADDRESS,"
  " or what SLURM / Cloud TPU provide).",
)
flags.DEFINE_integer("num_processes", None, "Multi-process runs: how many.")
flags.DEFINE_integer("process_id", None, "Multi-process runs: this one's id.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from aikd_jax import cli  # pylint: disable=g-import-not-at-top
  from aikd_jax import distributed  # pylint: disable=g-import-not-at-top

  cli.set_up_logging()
  distributed.initialize(
    FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
  )
  cli.log_to_file(FLAGS.workdir)
  sys.exit(cli.run(FLAGS.config, FLAGS.workdir))


def _config_argument(argv: list[str]) -> str | None:
  """The --config file as given (an ml_collections ':arg' suffix cut)."""
  path = None
  for arg in argv[1:]:
    if arg.startswith("--config="):
      path = arg.split("=", 1)[1].split(":", 1)[0]
  return path


def _unknown_field_message(argv: list[str], path: str) -> str | None:
  """Names the first --config.FIELD that the config file does not have."""
  import difflib  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("_config_for_flags", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  fields = module.get_config().to_dict()
  for arg in argv[1:]:
    if not arg.startswith("--config."):
      continue
    name = arg[len("--config.") :].split("=", 1)[0]
    node, known = fields, []
    for part in name.split("."):
      if not isinstance(node, dict) or part not in node:
        known = list(node) if isinstance(node, dict) else []
        break
      node = node[part]
    else:
      continue
    close = difflib.get_close_matches(part, known, n=3, cutoff=0.5)
    hint = f" (closest: {', '.join(close)})" if close else ""
    return f"--config.{name}: the config has no field {part!r}{hint}."
  return None


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with one line (exit 2) for an unknown --config
  field or a --config file that cannot be read, instead of a traceback."""
  try:
    remaining = FLAGS(argv)
    FLAGS.config.get("model")  # A file that failed to load raises here.
    return remaining
  except Exception as error:  # pylint: disable=broad-except
    path = _config_argument(argv)
    if path is not None and not os.path.isfile(path):
      message = f"--config={path}: no such file."
    elif isinstance(error, flags.Error):
      # Its first line, and the cause a file's traceback ends with.
      lines = [line.strip() for line in str(error).splitlines() if line]
      message = " ".join(lines[:1] + lines[1:][-1:])
    else:
      try:
        message = _unknown_field_message(argv, path) if path else None
      except Exception:  # pylint: disable=broad-except
        message = None
      if message is None:
        lines = str(error).strip().splitlines() or [type(error).__name__]
        message = f"{type(error).__name__}: {lines[0]}"
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
