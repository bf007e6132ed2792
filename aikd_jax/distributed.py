"""Joins JAX's multi-process runtime when the run spans several hosts.

One process runs per host (Cloud TPU pod slice, multi-node GPU cluster);
`jax.distributed.initialize` must run before anything touches the devices.
"""

from __future__ import annotations

import os

from absl import logging
import jax

# Environment variables that name the cluster explicitly (any launcher).
COORDINATOR_ENV = "AIKD_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "AIKD_NUM_PROCESSES"
PROCESS_ID_ENV = "AIKD_PROCESS_ID"


def _detected_cluster() -> str | None:
  """Names a multi-host environment JAX can configure itself, if any."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and (
    "SLURM_JOB_ID" in os.environ
  ):
    return "SLURM"
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if len([h for h in hosts.split(",") if h]) > 1:
    return "Cloud TPU pod slice"
  return None


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Initialises jax.distributed if this is a multi-process run.

  Explicit arguments win, then the AIKD_* environment variables, then the
  cluster JAX detects by itself (SLURM's variables, a Cloud TPU pod's
  metadata). Returns whether the run is multi-process.
  """
  coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV)
  if num_processes is None and os.environ.get(NUM_PROCESSES_ENV):
    num_processes = int(os.environ[NUM_PROCESSES_ENV])
  if process_id is None and os.environ.get(PROCESS_ID_ENV):
    process_id = int(os.environ[PROCESS_ID_ENV])
  explicit = coordinator_address is not None
  cluster = None if explicit else _detected_cluster()
  if not explicit and cluster is None:
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError(
      "A coordinator address needs the number of processes and this "
      f"process's id too (--num_processes/--process_id or {NUM_PROCESSES_ENV}"
      f"/{PROCESS_ID_ENV})."
    )
  # CPU devices of different processes talk through gloo (accelerators use
  # their own collectives; this setting does not touch them).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(
      coordinator_address=coordinator_address,
      num_processes=num_processes,
      process_id=process_id,
    )
  else:
    jax.distributed.initialize()
  logging.info(
    "Process %d of %d (%s), %d local / %d global devices.",
    jax.process_index(),
    jax.process_count(),
    cluster or coordinator_address,
    jax.local_device_count(),
    jax.device_count(),
  )
  return True
