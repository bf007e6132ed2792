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


if __name__ == "__main__":
  app.run(main)
