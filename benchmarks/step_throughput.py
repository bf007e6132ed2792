"""Images/sec of the library's train step for several methods and batch sizes.

  python benchmarks/step_throughput.py --batch_sizes=128,512 --dtype=bfloat16
  python benchmarks/step_throughput.py --model=tiny_cnn --batch_sizes=64 \
      --num_examples=2048 --repeats=3      # quick CPU smoke run
  python benchmarks/step_throughput.py --model=resnet152 --image_size=224 \
      --num_examples=4096 --batch_sizes=64 --methods=ce,ai_kd

--model takes every name of `aikd_jax.models.MODEL_NAMES` (PS-KD's
PreAct ResNet-18, DenseNet-121, ResNeXt-29, PyramidNet-200 with and without
ShakeDrop, the ImageNet ResNet-152, the tiny test CNN). For each (batch
size, method) it builds the step with `aikd_jax.train_step.make_train_step`
on a synthetic dataset of CIFAR's shape by default (uint8 [N, 32, 32, 3],
100 classes; --image_size changes H = W, e.g. 224 for ResNet-152, whose
ImageNet-sized dataset would not fit on a device: lower --num_examples)
sharded over a `data` mesh of all local devices, then times runs of
--steps_per_run consecutive steps. The step donates its state and runs
asynchronously, so the clock stops only when the last step of a run has
finished (block_until_ready); the figure is the median
over --repeats runs, after one untimed first call (trace + compile) and
--warmup untimed runs. All methods of a batch size are built first and their
timed runs interleaved, so that drifting machine load hits them alike.
Methods: ce, ps_kd, ai_kd (teacher logits read from a precomputed bank) and
ai_kd_online (teacher forward pass inside the step). Traces and compilations
after the first call are counted (expected 0/0); --check_bank_copies also
counts whole-prediction-bank copies in each compiled step.

--steps_per_dispatch=1,4,8 also times each method with K steps per call of
the jitted step (config.steps_per_dispatch; K = 1 is the plain step), all
interleaved; --steps_per_run is rounded up to a multiple of every K. A K
written with an "a" (16a) runs every call with the program whose loop trip
count is an argument, which the loop uses only for an epoch's shorter last
call, instead of the full calls' constant-K one (train_step.StepsPerCall):
16,16a compares the two. Each
row prints the FLOPs of one step (the convolutions and matrix products of
the one-step program, common.step_flops, counted once per batch size and
method; the source is printed),
the achieved TFLOP/s and, where the device's dense bf16 peak is known
(common.PEAK_BF16_TFLOPS: H100 SXM and H200 989, A100 312), the model FLOP
utilisation against that peak, whatever the dtype; n/a otherwise (CPUs).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position

from aikd_jax import banks  # pylint: disable=g-import-not-at-top,wrong-import-position

# ce and ai_kd first, so that the ratio is known early if a run is cut short.
DEFAULT_METHODS = "ce,ai_kd,ps_kd,ai_kd_online"


def _steps(dispatch: str) -> int:
  """K of a --steps_per_dispatch entry: "16" and "16a" are 16."""
  return int(dispatch.removesuffix("a"))


def _count(value) -> str:
  return "n/a" if value is None else str(value)


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_step_flags(parser, batch_sizes="128,512", dtype="float32")
  parser.add_argument(
    "--methods",
    default=DEFAULT_METHODS,
    help="objective presets, comma-separated",
  )
  parser.add_argument(
    "--steps_per_run",
    type=int,
    default=10,
    help="consecutive steps per timed run",
  )
  parser.add_argument(
    "--warmup",
    type=int,
    default=1,
    help="untimed runs after the first (compiling) call",
  )
  parser.add_argument(
    "--repeats", type=int, default=5, help="timed runs; the median is reported"
  )
  parser.add_argument(
    "--check_bank_copies",
    action="store_true",
    help="also count whole-bank copies in each compiled "
    "step (compiles each step once more)",
  )
  parser.add_argument(
    "--steps_per_dispatch",
    default="1",
    help="steps per call of the jitted step (K), comma-separated; Ka: "
    "every call with the argument-trip-count program",
  )
  parser.add_argument(
    "--out", default="", help="write all figures to this JSON file"
  )
  return parser.parse_args(argv)


def _flops_text(figures: dict) -> str:
  flops, tflops, mfu = (
    figures["flops_per_step"],
    figures["tflops_per_s"],
    figures["mfu"],
  )
  return (
    f"{'n/a' if flops is None else f'{flops / 1e9:.1f}':>10} "
    f"{'n/a' if tflops is None else f'{tflops:.3f}':>9} "
    f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%':>6}"
  )


def main(argv=None) -> int:
  args = parse_args(argv)
  batch_sizes = common.int_list(args.batch_sizes)
  methods = common.str_list(args.methods)
  dispatches = common.str_list(args.steps_per_dispatch)
  steps_per_run = args.steps_per_run
  multiple = math.lcm(*(_steps(k) for k in dispatches))
  steps_per_run = -(-steps_per_run // multiple) * multiple
  mesh = banks.data_mesh()
  report = common.print_header(
    "step_throughput",
    model=args.model,
    image_size=args.image_size,
    dtype=args.dtype,
    bank_dtype=args.bank_dtype,
    batch_sizes=args.batch_sizes,
    methods=",".join(methods),
    steps_per_dispatch=args.steps_per_dispatch,
    num_examples=args.num_examples,
    steps_per_run=steps_per_run,
    warmup=args.warmup,
    repeats=args.repeats,
    mesh_devices=mesh.devices.size,
  )
  kind = report["environment"]["device_kind"]
  peak = common.peak_tflops(kind)
  per_device = "n/a" if peak is None else f"{peak:g} TFLOP/s per device"
  print(f"dense bf16 peak of {kind!r}: {per_device}")
  report["peak_bf16_tflops_per_device"] = peak
  report["results"] = []
  header = (
    f"{'batch':>6} {'method':<13} {'teacher':<11} {'K':>3} {'step ms':>9} "
    f"{'images/s':>10} {'GFLOP/step':>10} {'TFLOP/s':>9} {'MFU':>6} "
    f"{'first call s':>12} {'retraces/recompiles':>19}"
  )
  print(header)
  ratios = {}
  for batch in batch_sizes:
    runs = [(k, method) for k in dispatches for method in methods]
    benches = [
      common.build_step(
        method,
        mesh=mesh,
        batch_size=batch,
        steps_per_dispatch=_steps(k),
        argument_trip_count=k.endswith("a"),
        **common.step_flag_kwargs(args),
      )
      for k, method in runs
    ]
    results = common.measure_steps(
      benches,
      steps_per_run=steps_per_run,
      warmup=args.warmup,
      repeats=args.repeats,
    )
    # After the timed runs: lowering the one-step program traces it, which
    # would hide the first call's trace from the retrace count.
    flops = {}
    for (k, method), bench in zip(runs, benches):
      if method not in flops:
        flops[method] = common.step_flops(bench)
        print(
          f"FLOPs per step, batch {batch}, {method}: "
          + (
            "n/a"
            if flops[method][0] is None
            else f"{flops[method][0] / 1e9:.2f} GFLOP"
          )
          + f" ({flops[method][1]})",
          flush=True,
        )
    times = {}
    for (k, method), bench, figures in zip(runs, benches, results):
      teacher = {"ai_kd": "precomputed", "ai_kd_online": "online"}.get(
        method, "-"
      )
      times[(k, method)] = figures["step_s"]
      step_flops, source = flops[method]
      tflops = None if step_flops is None else step_flops / figures["step_s"]
      tflops = None if tflops is None else tflops / 1e12
      figures.update(
        {
          "flops_per_step": step_flops,
          "flops_source": source,
          "tflops_per_s": tflops,
          "mfu": (
            None
            if tflops is None or peak is None
            else tflops / (peak * mesh.devices.size)
          ),
        }
      )
      if args.check_bank_copies:
        figures["full_bank_copies_in_hlo"] = common.full_bank_copies(bench)
      row = {
        "batch_size": batch,
        "method": method,
        "teacher": teacher,
        "steps_per_dispatch": _steps(k),
        "trip_count": "argument" if k.endswith("a") else "constant",
        "dtype": args.dtype,
        "model": args.model,
        **figures,
      }
      report["results"].append(row)
      print(
        f"{batch:>6} {method:<13} {teacher:<11} {k:>3} "
        f"{1e3 * figures['step_s']:>9.2f} "
        f"{figures['images_per_s']:>10.1f} "
        f"{_flops_text(figures)} "
        f"{figures['first_call_s']:>12.1f} "
        f"{_count(figures['retraces_after_first_call']):>9}/"
        f"{_count(figures['recompiles_after_first_call']):<9}"
        + (
          f" full-bank copies per step: {figures['full_bank_copies_in_hlo']}"
          if args.check_bank_copies
          else ""
        ),
        flush=True,
      )
    del benches  # frees the carries and data before the next batch size
    k0 = dispatches[0]
    for other in ("ai_kd", "ps_kd", "ai_kd_online"):
      if (k0, other) in times and (k0, "ce") in times:
        ratios[f"{other}/ce@{batch}"] = times[(k0, other)] / times[(k0, "ce")]
    if (k0, "ai_kd") in times and (k0, "ce") in times:
      print(
        "ai_kd/ce step time ratio: "
        f"{times[(k0, 'ai_kd')] / times[(k0, 'ce')]:.2f} "
        f"(batch {batch}, {args.dtype}, {args.model}, K={k0})"
      )
    for other in ("ps_kd", "ai_kd_online"):
      if (k0, other) in times and (k0, "ce") in times:
        print(
          f"  {other}/ce step time ratio: "
          f"{times[(k0, other)] / times[(k0, 'ce')]:.2f} (batch {batch})"
        )
    for k in dispatches[1:]:
      for method in methods:
        speedup = times[(k0, method)] / times[(k, method)]
        ratios[f"{method}@{batch}:K={k}/K={k0}"] = speedup
        print(
          f"steps_per_dispatch speedup: {method} K={k} vs K={k0}: "
          f"{speedup:.2f}x images/s (batch {batch})"
        )
    sys.stdout.flush()
    common.write_json(args.out, {**report, "ratios": ratios})
  report["ratios"] = ratios
  common.write_json(args.out, report)
  if args.out:
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
