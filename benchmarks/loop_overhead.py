"""The real training loop's cost per epoch vs its steps timed alone; eval speed.

  python benchmarks/loop_overhead.py                       # PreAct ResNet-18
  python benchmarks/loop_overhead.py --model=tiny_cnn --batch_size=64 \
      --num_examples=4096 --num_test=1024                  # quick CPU run

What runs: `aikd_jax.train.train_stage`, the epoch loop of every run, on the
student stage (`stage.build_stage` from configs/default.py with the flags
below) for --epochs epochs, on a synthetic in-memory dataset (random uint8
CIFAR-shaped images, 100 classes; an `aikd_jax.data.Dataset`) placed with
`device_data.place_dataset`, in a temporary workdir. The loop does
everything it does in a real run: on-device augmentation and bank updates
inside the step, a metric read + NaN check every --log_every_steps steps and
at each epoch's end, TensorBoard/console scalars, an evaluation on the test
split after every epoch, and an asynchronous orbax checkpoint after every
epoch (checkpoint_every_epochs=1; --checkpoint_every_minutes=1e9 saves
only at the stage's end instead, to see what the per-epoch saves cost;
--steps_per_dispatch sets the loop's K). The teacher is not trained: ai_kd reads
random logits from a teacher-logit bank (precomputed teacher), ai_kd_online
uses a freshly initialised teacher (`common.random_teacher`).

What is counted, from the loop's own `time_phase` hook (entered around its
evaluation reads, metric reads and checkpoint saves; the benchmark records
the wall-clock interval of each and the compilations so far):
  loop epoch  = wall time from the end of epoch k-1's last metric read to
                the end of epoch k's, i.e. one whole steady-state epoch:
                epoch k-1's evaluation (dispatched at its end and read
                during epoch k's steps unless a save reads it first) and
                checkpoint save (if due), all steps of epoch k (dispatch and
                execution) and every metric read. Each end waits for its
                epoch's last step (the read is finished after the next
                epoch's first call is queued, so the device has that call
                to run meanwhile; the loop's windows all carry the same
                one-call offset).
                Median over k = 2 .. E-1 (E = --epochs, default 4; epoch 0
                holds the compilations, epoch 1's window the first
                checkpoint save); compilations inside are counted and
                printed.
  steps alone = the same jitted step (`stage.make_train_step` for the same
                stage and K, from `stage.create_train_state`), run
                steps_per_epoch steps back to back, K per call, and blocked
                only at the end; median of --repeats such epochs, half timed
                before the loop and half after it, so drifting load biases
                neither.
  loop/steps time ratio = loop epoch / steps alone.
Also printed: the first epoch (initial state, compilations, steps), the tail
after the last metric read (last evaluation, final checkpoint save and wait,
results file), and the evaluation throughput: images/sec of the stage's
predict fn (`stage.make_predict_fn`, as the loop builds it) over the whole
test split, median of --repeats calls after a compiling call.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from aikd_jax import banks  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import device_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import run_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position
from aikd_jax.preemption import SignalFlag  # pylint: disable=g-import-not-at-top,wrong-import-position


class PhaseLog:
  """`train_stage`'s time_phase hook: per phase, (start, end, compilations
  counted by the end) of every time the loop entered it.

  With `trace_dir`, a device trace (jax.profiler) covers epoch 2's window:
  from the end of epoch 1's last metric read to the end of epoch 2's.
  """

  def __init__(self, counter: common.CompileCounter, trace_dir: str = ""):
    self.counter = counter
    self.events = {"eval": [], "log": [], "epoch_end": [], "checkpoint": []}
    self.trace_dir = trace_dir

  @contextlib.contextmanager
  def __call__(self, phase: str):
    start = time.perf_counter()
    yield
    self.events[phase].append((start, time.perf_counter(), self.counter.count))
    if self.trace_dir and phase == "epoch_end":
      ended = len(self.events["epoch_end"])
      if ended == 2:
        jax.profiler.start_trace(self.trace_dir)
      elif ended == 3:
        jax.profiler.stop_trace()


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument(
    "--model",
    default="preact_resnet18",
    choices=("preact_resnet18", "tiny_cnn"),
  )
  parser.add_argument("--method", default="ai_kd")
  parser.add_argument(
    "--dtype", default="float32", choices=("float32", "bfloat16")
  )
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--eval_batch_size", type=int, default=1000)
  parser.add_argument("--num_examples", type=int, default=common.CIFAR_TRAIN)
  parser.add_argument("--num_test", type=int, default=common.CIFAR_TEST)
  parser.add_argument(
    "--epochs",
    type=int,
    default=4,
    help="epochs of the loop; epochs 2..E-1 are timed",
  )
  parser.add_argument("--log_every_steps", type=int, default=100)
  parser.add_argument(
    "--repeats",
    type=int,
    default=4,
    help="timed epochs of steps alone (half before the "
    "loop, half after) and timed eval passes",
  )
  parser.add_argument(
    "--workdir",
    default="",
    help="where the loop writes (default: a temp dir, removed afterwards)",
  )
  parser.add_argument(
    "--project_epochs",
    type=int,
    default=300,
    help="epochs of each stage in the projected wall time of a whole "
    "pipeline (teacher + teacher logits + student), PS-KD's 300",
  )
  parser.add_argument(
    "--steps_per_dispatch",
    type=int,
    default=1,
    help="config.steps_per_dispatch, of the loop and of the steps alone",
  )
  parser.add_argument(
    "--checkpoint_every_minutes",
    type=float,
    default=0.0,
    help="the loop's config.checkpoint_every_minutes (0: a save after "
    "every epoch; e.g. 1e9: only the stage's last)",
  )
  parser.add_argument(
    "--trace_dir",
    default="",
    help="trace epoch 2's window with jax.profiler into this folder and "
    "print the device's busy time and longest idle gaps in it",
  )
  parser.add_argument("--out", default="", help="JSON file for the figures")
  return parser.parse_args(argv)


def projected_pipeline_s(
  objective,
  first_epoch_s: float,
  loop_epoch_s: float,
  tail_s: float,
  eval_s: float,
  num_test: int,
  num_examples: int,
  epochs: int,
) -> float:
  """Wall time of the stages `objective` runs, from measured epochs.

  Each trained stage: its first epoch (compilation included), epochs - 1
  loop epochs and the tail (last evaluation and save); a teacher's `ce`
  epochs are counted at this method's epoch time (an upper bound: `ce`
  steps are no slower). Stage 2 (precomputed teacher logits) is one
  eval-mode pass over the training split, at the measured eval speed.
  Start-up (imports, data loading) is not included.
  """
  stage = first_epoch_s + (epochs - 1) * loop_epoch_s + tail_s
  if not objective.uses_teacher:
    return stage
  logits = 0.0 if objective.teacher_mode == "online" else eval_s
  return 2 * stage + logits * num_examples / num_test


def _trace_figures(trace_dir: str, window: tuple, events: dict) -> dict:
  """Prints the device's busy time and idle gaps in the traced window, and
  where the loop's own phases fell in it (both as offsets from its start;
  the trace starts as the window does)."""
  import profile_step  # pylint: disable=g-import-not-at-top

  lo, hi = window
  phases = {
    name: [
      (round(1e3 * (a - lo)), round(1e3 * (b - lo)))
      for a, b, _ in spans
      if lo <= a < hi
    ]
    for name, spans in events.items()
  }
  path = profile_step.find_trace(trace_dir)
  kernels = []
  if path:
    trace_events, processes, threads = profile_step.load_trace(path)
    kernels, _ = profile_step.device_events(trace_events, processes, threads)
  phase_text = "; ".join(
    f"{name} " + ", ".join(f"{a}-{b}" for a, b in spans)
    for name, spans in phases.items()
    if spans
  )
  if not kernels:
    print(f"loop trace: no device kernel events in {path or trace_dir}")
    return {"trace_file": path, "phases_ms": phases}
  kernels.sort(key=lambda e: e["ts"])
  first = kernels[0]["ts"]
  gaps, reached = [], first
  for e in kernels:
    if e["ts"] > reached:
      gaps.append(((reached - first) / 1e3, (e["ts"] - reached) / 1e3))
    reached = max(reached, e["ts"] + e["dur"])
  gaps.sort(key=lambda g: -g[1])
  busy = profile_step.union_us(kernels) / 1e6
  print(
    f"loop trace (epoch 2's window, {hi - lo:.3f} s): device busy "
    f"{busy:.3f} s ({100 * busy / (hi - lo):.0f}%), {len(kernels)} kernels; "
    "longest idle gaps (ms from the first kernel: length): "
    + ", ".join(f"{at:.0f}: {length:.1f}" for at, length in gaps[:8])
  )
  print(f"loop phases in that window (ms from its start): {phase_text}")
  return {
    "trace_file": path,
    "window_s": hi - lo,
    "device_busy_s": busy,
    "kernels": len(kernels),
    "idle_gaps_ms": gaps[:20],
    "phases_ms": phases,
  }


def _config(args):
  config = common.benchmark_config(
    args.method,
    model_name=args.model,
    compute_dtype=args.dtype,
    batch_size=args.batch_size,
    num_epochs=args.epochs,
  )
  config.eval_batch_size = args.eval_batch_size
  config.log_every_steps = args.log_every_steps
  config.checkpoint_every_epochs = 1
  config.checkpoint_every_minutes = args.checkpoint_every_minutes
  config.steps_per_dispatch = args.steps_per_dispatch
  config.keep_checkpoints = 2
  return config


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.epochs < 2:
    raise SystemExit("--epochs must be at least 2 (the last one is timed).")
  if args.trace_dir and args.epochs < 3:
    raise SystemExit("--trace_dir needs --epochs of at least 3.")
  config = _config(args)
  objective = run_config.validate(config)
  mesh = banks.data_mesh()
  report = common.print_header(
    "loop_overhead",
    model=args.model,
    method=args.method,
    dtype=args.dtype,
    batch_size=args.batch_size,
    eval_batch_size=args.eval_batch_size,
    num_examples=args.num_examples,
    num_test=args.num_test,
    epochs=args.epochs,
    log_every_steps=args.log_every_steps,
    steps_per_dispatch=args.steps_per_dispatch,
    checkpoint_every_minutes=args.checkpoint_every_minutes,
    repeats=args.repeats,
    mesh_devices=mesh.devices.size,
  )
  counter = common.CompileCounter.get()

  data = device_data.place_dataset(
    common.synthetic_dataset(args.num_examples, args.num_test), mesh, config
  )
  stage = stage_lib.build_stage(
    "student", objective, args.epochs, config, data, mesh.devices.size
  )
  teacher = common.random_teacher(stage, data, mesh)
  steps_per_epoch = stage.steps_per_epoch

  workdir = args.workdir or tempfile.mkdtemp(prefix="aikd_loop_overhead_")
  try:
    # The same step, alone: another instance of the stage's step from the
    # same initial state, timed before and after the loop so that drifting
    # load biases neither side.
    per_call = args.steps_per_dispatch
    step_fn = stage_lib.make_train_step(stage, mesh, per_call)
    alone = {"state": stage_lib.create_train_state(stage, data, mesh)}
    step_data = stage_lib.step_data(stage, data, mesh, 0, teacher)

    def run_steps(num_steps):
      metrics = None
      for start in range(0, num_steps, per_call):
        if per_call > 1:  # Calls of K steps, as the loop makes them.
          count = np.int32(min(per_call, num_steps - start))
          alone["state"], metrics = step_fn(alone["state"], step_data, count)
        else:
          alone["state"], metrics = step_fn(alone["state"], step_data)
      return alone["state"], metrics

    # Compiles what an epoch runs: K > 1 has a program for full calls and
    # one for a shorter last call.
    jax.block_until_ready(run_steps(steps_per_epoch))
    steps_before = counter.count
    half = max(1, args.repeats // 2)
    epoch_runs = common.timed_runs(lambda: run_steps(steps_per_epoch), 0, half)

    phases = PhaseLog(counter, args.trace_dir)
    compiles_before = counter.count
    loop_start = time.perf_counter()
    with SignalFlag() as signals:
      state = train.train_stage(
        stage, config, data, mesh, workdir, signals, teacher, time_phase=phases
      )
    loop_end = time.perf_counter()
    loop_compiles = counter.count - compiles_before

    epoch_runs += common.timed_runs(
      lambda: run_steps(steps_per_epoch), 0, max(1, args.repeats - half)
    )
    steps_alone = statistics.median(epoch_runs)
    steps_compiles = counter.count - steps_before - loop_compiles

    # Epoch k's window: from the end of epoch k-1's last metric read to
    # the end of epoch k's (each waits for all steps before it). Steady
    # epochs: k = 2 .. E-1 (epoch 0 holds the compilations, epoch 1's
    # window the first checkpoint save); with E = 2, epoch 1.
    events = phases.events
    ends = [e[1] for e in events["epoch_end"]]
    counts = [e[2] for e in events["epoch_end"]]
    steady = list(range(2, args.epochs)) or [1]
    windows = []
    for k in steady:
      lo, hi = ends[k - 1], ends[k]
      within = lambda name: [e for e in events[name] if lo <= e[0] < hi]
      reads = within("log") + within("epoch_end")
      windows.append(
        {
          "epoch": k,
          "seconds": hi - lo,
          "eval_s": sum(e[1] - e[0] for e in within("eval")),
          "flush_s": sum(e[1] - e[0] for e in reads),
          "flushes": len(reads),
          "checkpoint_save_call_s": sum(
            e[1] - e[0] for e in within("checkpoint")
          ),
          "compiles": counts[k] - counts[k - 1],
        }
      )
    median_of = lambda key: statistics.median(w[key] for w in windows)
    loop_epoch = median_of("seconds")
    eval_s, flush_s = median_of("eval_s"), median_of("flush_s")
    save_s = median_of("checkpoint_save_call_s")
    window_compiles = sum(w["compiles"] for w in windows)
    flushes = windows[-1]["flushes"]
    first_epoch = ends[0] - loop_start
    tail = loop_end - ends[-1]

    # Evaluation throughput: the stage's predict fn over the test split.
    predict = stage_lib.make_predict_fn(
      stage, data, mesh, config.eval_batch_size
    )
    variables = state.student.variables
    start = time.perf_counter()
    jax.block_until_ready(predict(variables, data.test_images))
    eval_first = time.perf_counter() - start
    eval_s_call = common.timed(
      lambda: predict(variables, data.test_images), 1, args.repeats
    )
  finally:
    if not args.workdir:
      shutil.rmtree(workdir, ignore_errors=True)

  ratio = loop_epoch / steps_alone
  num_test = len(data.test_labels)
  figures = {
    "steps_per_epoch": steps_per_epoch,
    "flushes_per_epoch": flushes,
    "loop_total_s": loop_end - loop_start,
    "first_epoch_s": first_epoch,
    "loop_epoch_s": loop_epoch,
    "loop_epoch_windows": windows,
    "loop_epoch_eval_s": eval_s,
    "loop_epoch_flush_s": flush_s,
    "loop_epoch_checkpoint_save_call_s": save_s,
    "loop_epoch_compiles": window_compiles,
    "loop_compiles_total": loop_compiles,
    "tail_after_last_read_s": tail,
    "steps_alone_epoch_s": steps_alone,
    "steps_alone_epoch_runs_s": epoch_runs,
    "steps_alone_compiles_after_first": steps_compiles,
    "step_s_alone": steps_alone / steps_per_epoch,
    "loop_over_steps_ratio": ratio,
    "loop_minus_eval_over_steps_ratio": (loop_epoch - eval_s) / steps_alone,
    "eval_images": num_test,
    "eval_first_call_s": eval_first,
    "eval_s": eval_s_call,
    "eval_images_per_s": num_test / eval_s_call,
    "projected_epochs": args.project_epochs,
    "projected_pipeline_s": projected_pipeline_s(
      objective,
      first_epoch,
      loop_epoch,
      tail,
      eval_s_call,
      num_test,
      args.num_examples,
      args.project_epochs,
    ),
  }
  if args.trace_dir:
    figures["trace"] = _trace_figures(
      args.trace_dir, (ends[1], ends[2]), events
    )
  report["figures"] = figures
  print(
    f"steps per epoch: {steps_per_epoch} (batch {args.batch_size}); "
    f"metric fetches in the timed epoch: {figures['flushes_per_epoch']}"
  )
  print(
    f"first epoch (initial state, compilation, steps, to its last metric "
    f"read): {first_epoch:.2f} s"
  )
  window_epochs = ",".join(str(w["epoch"]) for w in windows)
  window_times = ", ".join(f"{w['seconds']:.3f}" for w in windows)
  print(
    f"loop epoch (median over epochs {window_epochs} of "
    f"0..{args.epochs - 1}: {window_times} s; "
    f"each = the previous epoch's eval and checkpoint save (if due) + "
    f"{steps_per_epoch} steps + metric reads): {loop_epoch:.3f} s; of which "
    f"reading the eval "
    f"{eval_s:.3f} s, in metric "
    f"fetches {flush_s:.3f} s (mostly waiting for the device), in "
    f"checkpoint save() calls {save_s:.3f} s; compilations in it: "
    f"{window_compiles}"
  )
  alone_times = ", ".join(f"{t:.3f}" for t in epoch_runs)
  print(
    f"steps alone ({steps_per_epoch} consecutive steps, "
    f"{args.steps_per_dispatch} per call, blocked at the end, median of "
    f"{len(epoch_runs)} runs, before and after the loop: "
    f"{alone_times} s): {steps_alone:.3f} s "
    f"({1e3 * steps_alone / steps_per_epoch:.2f} ms/step, "
    f"{args.batch_size * steps_per_epoch / steps_alone:.1f} images/s); "
    f"recompilations: {steps_compiles}"
  )
  print(
    f"tail after the last metric read (last eval, final checkpoint save + "
    f"wait, results file): {tail:.2f} s"
  )
  print(f"loop/steps time ratio: {ratio:.2f}")
  print(
    f"  (loop minus eval)/steps time ratio: "
    f"{figures['loop_minus_eval_over_steps_ratio']:.2f}"
  )
  print(
    f"eval throughput: {num_test / eval_s_call:.1f} images/s "
    f"(predict fn over {num_test} test images, eval batch "
    f"{args.eval_batch_size}, {1e3 * eval_s_call:.1f} ms per pass; first "
    f"call {eval_first:.2f} s)"
  )
  stages = f"{args.method} student {args.project_epochs} epochs"
  if objective.uses_teacher:
    stages = (
      f"teacher {args.project_epochs} epochs + "
      + ("" if objective.teacher_mode == "online" else "teacher logits + ")
      + stages
    )
  print(
    f"projected pipeline ({stages}, {args.num_examples} images, batch "
    f"{args.batch_size}): {figures['projected_pipeline_s'] / 60:.1f} min"
  )
  common.write_json(args.out, report)
  if args.out:
    print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
