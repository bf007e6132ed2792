"""What one checkpoint of a stage costs: the save's parts and its checksums.

  python benchmarks/checkpoint_cost.py                 # PreAct ResNet-18
  python benchmarks/checkpoint_cost.py --model=tiny_cnn --num_examples=2048

Builds the student stage's train state as a run does (`common.build_step`:
student and discriminator TrainStates, a prediction bank of --num_examples
rows of 100 classes), fills its float arrays with random values (a trained
state's momentum and bank do not compress like the initial zeros and
one-hot rows) and saves it --repeats times
with the loop's own `checkpointing.StageCheckpoints` into a temporary
folder. Per save it times the blocking `save()` call (device-to-host copy
and the start of orbax's asynchronous write), `wait()` (orbax finishing the
write, then the sha256 pass of `checkpointing.write_checksums`), and, on
the finished folder again, `write_checksums` alone (files just written, so
mostly from the page cache, as in a run). Medians are printed with the
folder's size. The temporary folder is on the default temp filesystem
(--dir to choose another): the write figures depend on that disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from aikd_jax import banks  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--model", default="preact_resnet18", choices=models.MODEL_NAMES
  )
  parser.add_argument("--method", default="ai_kd")
  parser.add_argument("--num_examples", type=int, default=common.CIFAR_TRAIN)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dir", default="", help="parent of the temp folder")
  parser.add_argument("--out", default="", help="write figures as JSON")
  return parser.parse_args(argv)


def _folder_bytes(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(root, name))
    for root, _, files in os.walk(path)
    for name in files
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  mesh = banks.data_mesh()
  report = common.print_header(
    "checkpoint_cost",
    model=args.model,
    method=args.method,
    num_examples=args.num_examples,
    repeats=args.repeats,
  )
  bench = common.build_step(
    args.method,
    mesh=mesh,
    batch_size=mesh.devices.size,
    model_name=args.model,
    num_examples=args.num_examples,
  )
  # A trained state's floats (momentum, bank rows) are not the initial
  # zeros and one-hot rows, which orbax's compression would shrink to
  # little: random values of the same shapes, dtypes and shardings.
  rng = np.random.default_rng(0)
  state = jax.tree.map(
    lambda x: (
      jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
      if jnp.issubdtype(x.dtype, jnp.floating)
      else x
    ),
    bench.state,
  )
  state = jax.block_until_ready(state)
  params = sum(x.size for x in jax.tree.leaves(state.student.params))
  parent = tempfile.mkdtemp(dir=args.dir or None)
  times = {"save_s": [], "wait_s": [], "checksums_s": []}
  try:
    checkpoints = checkpointing.StageCheckpoints(
      os.path.join(parent, "checkpoints"), keep=args.repeats + 1
    )
    for step in range(1, args.repeats + 1):
      start = time.perf_counter()
      checkpoints.save(step, state, {"history": []})
      times["save_s"].append(time.perf_counter() - start)
      start = time.perf_counter()
      checkpoints.wait()
      times["wait_s"].append(time.perf_counter() - start)
      step_dir = os.path.join(checkpoints.directory, str(step))
      start = time.perf_counter()
      checkpointing.write_checksums(step_dir)
      times["checksums_s"].append(time.perf_counter() - start)
    size = _folder_bytes(step_dir)
    checkpoints.close()
  finally:
    shutil.rmtree(parent, ignore_errors=True)
  figures = {k: statistics.median(v) for k, v in times.items()}
  figures.update(
    {
      "runs": times,
      "student_params": params,
      "folder_bytes": size,
      "checksum_mb_per_s": size / 1e6 / figures["checksums_s"],
    }
  )
  print(
    f"{args.model}: {params / 1e6:.1f}M student params, checkpoint folder "
    f"{size / 1e6:.1f} MB"
  )
  print(
    f"per save (median of {args.repeats}): save() {figures['save_s']:.3f}s"
    f" blocking, wait() {figures['wait_s']:.3f}s (orbax finish + "
    f"checksums), checksums alone {figures['checksums_s']:.3f}s "
    f"({figures['checksum_mb_per_s']:.0f} MB/s)"
  )
  report["results"] = figures
  common.write_json(args.out, report)
  return 0


if __name__ == "__main__":
  sys.exit(main())
