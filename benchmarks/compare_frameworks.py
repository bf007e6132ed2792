"""The JAX ai_kd step vs the two PyTorch references, same batch, one process.

  python benchmarks/compare_frameworks.py --batch_size=128
  python benchmarks/compare_frameworks.py --batch_size=32 --dtype=float32 \
      --repeats=3 --steps_per_run=2        # CPU

Contestants (all the `ai_kd` step of docs/method.md on synthetic CIFAR-shaped
data, PreAct ResNet-18 by default):
  jax: `aikd_jax.train_step.make_train_step` (precomputed teacher), as
    step_throughput.py builds it;
  torch ps-kd style and torch fast: torch_reference.py.
Each gets one untimed first call (compilation) and --warmup untimed runs;
then the timed runs of --steps_per_run consecutive steps are interleaved
(jax, ps-kd style, fast, jax, ...) so that drifting load hits all alike. A
run's clock stops when its work has finished (block_until_ready for JAX,
torch.cuda.synchronize for CUDA). Reported: median images/sec of each.

--dtype=auto (default) compares like with like: on a GPU, JAX float32 vs the
float32 ps-kd style reference and JAX bfloat16 vs the bf16-autocast fast
reference; on a CPU (where the fast reference runs in float32) JAX float32
vs both. An explicit --dtype uses that JAX dtype for both ratios.
Note that on NVIDIA GPUs both frameworks run float32 convolutions with TF32
by default (XLA's default precision; cudnn.allow_tf32 in PyTorch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# JAX and PyTorch share the GPU: keep JAX from taking 75% of it up front.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch_reference  # pylint: disable=g-import-not-at-top,wrong-import-position

from aikd_jax import banks  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument(
    "--model",
    default="preact_resnet18",
    choices=("preact_resnet18", "tiny_cnn"),
  )
  parser.add_argument(
    "--dtype",
    default="auto",
    choices=("auto", "float32", "bfloat16"),
    help="JAX compute dtype (auto: see the docstring)",
  )
  parser.add_argument("--num_examples", type=int, default=common.CIFAR_TRAIN)
  parser.add_argument("--steps_per_run", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument(
    "--compile",
    default="auto",
    choices=("auto", "on", "off"),
    help="torch.compile the fast reference's model "
    "(auto: on with CUDA, off on CPU)",
  )
  parser.add_argument("--out", default="", help="JSON file for the figures")
  return parser.parse_args(argv)


class _Contestant:
  """Something that runs k steps and waits for them: `run(k)`."""

  def __init__(self, name: str, run, batch_size: int, info: dict):
    self.name, self._run, self.batch_size, self.info = (
      name,
      run,
      batch_size,
      info,
    )
    self.first_call_s = None
    self.step_s_runs = []

  def run(self, k: int) -> None:
    self._run(k)


def _jax_contestant(dtype: str, args, mesh) -> _Contestant:
  bench = common.build_step(
    "ai_kd",
    mesh=mesh,
    batch_size=args.batch_size,
    model_name=args.model,
    compute_dtype=dtype,
    num_examples=args.num_examples,
  )
  run = lambda k: jax.block_until_ready(bench.run(k))
  return _Contestant(
    f"jax ai_kd ({dtype})",
    run,
    args.batch_size,
    {
      "framework": "jax",
      "dtype": dtype,
      "teacher": "precomputed",
      "device": jax.devices()[0].device_kind,
    },
  )


def _torch_contestant(variant: str, args) -> _Contestant:
  ref = torch_reference.Reference(
    variant,
    batch_size=args.batch_size,
    model_name=args.model,
    num_examples=args.num_examples,
    num_classes=common.CIFAR_CLASSES,
    compile_mode=args.compile,
    seed=0,
  )
  info = {
    "framework": "torch",
    "variant": variant,
    "dtype": ref.dtype,
    "torch_compile": ref.compiled,
    "device": str(ref.device),
  }
  return _Contestant(f"torch {variant}", ref.run, args.batch_size, info)


def main(argv=None) -> int:
  args = parse_args(argv)
  mesh = banks.data_mesh()
  on_gpu = jax.default_backend() == "gpu"
  if args.dtype == "auto":
    jax_for_pskd = "float32"
    jax_for_fast = "bfloat16" if on_gpu else "float32"
  else:
    jax_for_pskd = jax_for_fast = args.dtype
  report = common.print_header(
    "compare_frameworks",
    model=args.model,
    batch_size=args.batch_size,
    jax_dtypes=",".join(sorted({jax_for_pskd, jax_for_fast})),
    num_examples=args.num_examples,
    steps_per_run=args.steps_per_run,
    warmup=args.warmup,
    repeats=args.repeats,
    torch_compile=args.compile,
  )
  have_torch = torch_reference.available()
  if have_torch:
    import torch  # pylint: disable=g-import-not-at-top

    print(
      f"torch threads={torch.get_num_threads()} cuda="
      f"{torch.cuda.is_available()}"
    )
    if not torch.cuda.is_available():
      print("note: no CUDA for torch: its fast variant runs in float32.")
  else:
    print(torch_reference.SKIP_MESSAGE)

  contestants = {}
  for dtype in dict.fromkeys((jax_for_pskd, jax_for_fast)):
    contestants[f"jax:{dtype}"] = _jax_contestant(dtype, args, mesh)
  if have_torch:
    for variant in torch_reference.VARIANTS:
      contestants[variant] = _torch_contestant(variant, args)

  order = list(contestants.values())
  for c in order:
    start = time.perf_counter()
    c.run(1)
    c.first_call_s = time.perf_counter() - start
    print(f"  first call of {c.name}: {c.first_call_s:.1f} s", flush=True)
  for c in order:
    for _ in range(args.warmup):
      c.run(args.steps_per_run)
  for _ in range(args.repeats):
    for c in order:
      start = time.perf_counter()
      c.run(args.steps_per_run)
      c.step_s_runs.append((time.perf_counter() - start) / args.steps_per_run)

  results = {}
  for key, c in contestants.items():
    step_s = statistics.median(c.step_s_runs)
    results[key] = {
      "name": c.name,
      **c.info,
      "batch_size": c.batch_size,
      "first_call_s": c.first_call_s,
      "step_s": step_s,
      "step_s_runs": c.step_s_runs,
      "images_per_s": c.batch_size / step_s,
    }
    print(
      f"{c.name:<26} {results[key]['images_per_s']:>10.1f} images/s "
      f"({1e3 * step_s:.2f} ms/step)"
    )
  ratios = {}
  if have_torch:
    for variant, dtype, label in (
      ("ps-kd style", jax_for_pskd, "ps-kd style"),
      ("fast", jax_for_fast, "fast"),
    ):
      jax_ips = results[f"jax:{dtype}"]["images_per_s"]
      torch_result = results[variant]
      ratio = jax_ips / torch_result["images_per_s"]
      ratios[f"jax/torch({label})"] = ratio
      print(
        f"jax/torch({label}) throughput ratio: {ratio:.2f} "
        f"(jax {dtype} vs torch {torch_result['dtype']}"
        f"{', torch.compile' if torch_result.get('torch_compile') else ''}"
        f", batch {args.batch_size})"
      )
  else:
    print("jax/torch ratios skipped: PyTorch is not installed.")
  report.update({"results": results, "ratios": ratios})
  common.write_json(args.out, report)
  if args.out:
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
