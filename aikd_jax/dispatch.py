"""How the epoch loop groups steps into calls of the jitted step.

With `steps_per_dispatch` K > 1 one call runs K steps (train_step's
`repeat_step`), which saves the host's launch cost per step on a fast
device. A call never crosses an epoch's end (the step reads its epoch's
batch order): an epoch's last call runs the steps left, fewer than K when
steps_per_epoch is not a multiple of K. A call of K steps runs a program
whose loop trip count XLA knows; a shorter one, a second program whose
trip count is an argument (train_step.StepsPerCall), so at most two
programs are compiled per stage wherever a run starts or resumes.

K = 0 (the default) chooses: GPU_STEPS_PER_DISPATCH on a GPU with the
training split on the devices, else 1. XLA's CPU backend runs the loop far
slower than the plain step, and on a TPU it is not measured yet.
"""

from __future__ import annotations

from aikd_jax.run_config import ConfigError

AUTO = 0
# benchmarks/gpu_check.sh on one H200, PreAct ResNet-18 ai_kd, batch 128,
# bfloat16, K = 1, 4, 8, 16 interleaved: 38.7k, 38.8k, 42.6k, 45.2k
# images/s. A stop signal waits for the call in flight: up to K steps.
GPU_STEPS_PER_DISPATCH = 16


def steps_per_call(setting: int, streamed: bool, backend: str) -> int:
  """The K a run uses: `setting`, or for AUTO the backend's choice."""
  if setting != AUTO:
    return setting
  return GPU_STEPS_PER_DISPATCH if backend == "gpu" and not streamed else 1


def check_data(steps_per_dispatch: int, streamed: bool) -> None:
  """Refuses K > 1 on a streamed training split: a call of K steps reads
  the dataset on the devices, not K batches from the host."""
  if steps_per_dispatch > 1 and streamed:
    raise ConfigError(
      f"steps_per_dispatch={steps_per_dispatch} needs the training split on "
      "the devices, but this run streams it from the host; use "
      "steps_per_dispatch=1 or 0 (automatic), or input_pipeline=device if it "
      "fits."
    )


def call_length(step: int, epoch_end: int, steps_per_dispatch: int) -> int:
  """How many steps the call starting at `step` runs: K, or the epoch's
  remaining steps if fewer."""
  return min(steps_per_dispatch, epoch_end - step)


def crossed(before: int, after: int, every: int) -> bool:
  """Whether a call from step `before` to step `after` passed a multiple of
  `every` (a log step): the loop syncs after the first call that does."""
  return after // every > before // every
