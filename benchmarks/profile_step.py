"""Names what limits the train step's throughput, from a device profile.

  python benchmarks/profile_step.py --batch_sizes=128,2048 --out=prof.json \
      --trace_dir=traces                  # keeps the traces
  python benchmarks/profile_step.py --model=tiny_cnn --batch_sizes=32,64 \
      --num_examples=2048 --steps=3 --dtype=float32       # CPU smoke run

Step throughput alone cannot say why a step takes what it takes: the device
may wait on the host's dispatch, or its kernels may be slow, and then either
matrix kernels or memory-bound fusions. For each batch size this builds the
step as step_throughput.py does (common.build_step), compiles and warms it,
then traces --steps consecutive steps with `jax.profiler.trace` (one
block_until_ready at the end, inside the trace) and reads the trace JSON
the profiler writes (`*.trace.json.gz`, else `perfetto_trace.json.gz`, else
the `*.xplane.pb` through `jax.profiler.ProfileData`). Device events are the
complete ("X") events of processes whose name looks like a device
("/device:", "GPU", "stream"; "/host:" never), restricted to threads named
like a stream when there are any (so derived "XLA Ops"-style lines are not
counted twice).

Figures: wall span of the traced steps (host clock, dispatch to the final
block); kernel time summed; device busy time (union of kernel intervals, so
overlapping streams count once); busy fraction = busy / wall; kernels per
step; per-step time of matrix kernels (gemm|conv|cutlass|cudnn|xmma|sm90|
wgmma|nvjet, not "convert"), memory copies/memsets (memcpy|memset|copy) and
other kernels (fusions, elementwise, reductions), each the union of its
kernels as a share of busy time (the shares add to over 100% when copies
overlap compute); the top 12 kernels. FLOPs per step are
common.step_flops'; bytes accessed come from XLA's cost analysis of the
lowered step (before fusion, so an upper bound on memory traffic and the
intensity a lower bound); achieved TFLOP/s = FLOPs per step / busy time
per step.

The limit line (also printed with the prefix `profile:`):
  * busy fraction < 0.8: "host dispatch": the device idles between kernels
    waiting for the host to issue work;
  * otherwise "device kernels", then what the kernels are bound by:
    compute-bound when the busy-time TFLOP/s reach half the dense bf16 peak;
    else memory-bound when non-matrix kernels take at least half the busy
    time, or the arithmetic intensity is below the device's ridge point
    (peak / HBM bandwidth); else "matrix kernels below peak".
The profiler's per-kernel tracing slows the dispatch a little, so the busy
fraction under the trace is a lower bound of that of an untraced run.

Without device events (a CPU backend, or a GPU profiler that failed to
start) it summarises the host events that are XLA ops/thunks instead. A
trace that cannot be found or read gives a one-line message; the script
still exits 0 and writes what it measured.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import inspect
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

from aikd_jax import banks  # pylint: disable=g-import-not-at-top,wrong-import-position

# HBM bandwidth in TB/s per device, by a substring of device_kind, beside
# common.PEAK_BF16_TFLOPS (989 dense bf16 TFLOP/s for both): the ridge point
# of the roofline is peak / bandwidth, in FLOP per byte.
HBM_TB_PER_S = (
  ("H100 PCIe", None),  # Not in the table, as in common.PEAK_BF16_TFLOPS.
  ("H100", 3.35),  # SXM
  ("H200", 4.8),
)

BUSY_FRACTION_LIMIT = 0.8
TOP_KERNELS = 12
MATRIX_RE = re.compile(
  r"gemm|conv(?!ert)|cutlass|cudnn|xmma|sm90|wgmma|nvjet", re.I
)
MEMORY_RE = re.compile(r"memcpy|memset|copy", re.I)
DEVICE_PROCESS_RE = re.compile(r"/device:|gpu|stream", re.I)
STREAM_THREAD_RE = re.compile(r"stream", re.I)
# Lines a trace converter may derive from the kernels (same time twice).
DERIVED_THREAD_RE = re.compile(
  r"xla modules|xla ops|framework|tensorflow|source|steps|launch stats|"
  r"name scope",
  re.I,
)
HOST_XLA_RE = re.compile(
  r"fusion|thunk|convolution|\bdot|custom.call|copy|reduce|gemm|"
  r"while|conditional|scatter|gather|transpose",
  re.I,
)


def hbm_tb_per_s(device_kind: str) -> float | None:
  for name, bandwidth in HBM_TB_PER_S:
    if name in device_kind:
      return bandwidth
  return None


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  common.add_step_flags(parser, batch_sizes="128,2048", dtype="bfloat16")
  parser.add_argument("--method", default="ai_kd", help="objective preset")
  parser.add_argument(
    "--steps", type=int, default=20, help="consecutive steps traced"
  )
  parser.add_argument(
    "--warmup",
    type=int,
    default=3,
    help="untimed steps after the first (compiling) call",
  )
  parser.add_argument(
    "--trace_dir",
    default="",
    help="keep the traces here (one folder per batch size); "
    "default: a temporary folder, removed",
  )
  parser.add_argument(
    "--out", default="", help="write all figures to this JSON file"
  )
  return parser.parse_args(argv)


# ---------------------------------------------------------------------------
# Tracing and reading the trace.


def _reset_profiler() -> None:
  """Clears a profiler session left open by a failed stop_trace.

  jax's stop_trace resets its state only after writing the perfetto file,
  so a failure there would make every later trace refuse to start.
  """
  try:
    from jax._src import profiler as profiler_src

    profiler_src._profile_state.reset()  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except
    pass


def trace_steps(bench: common.StepBench, steps: int, log_dir: str) -> dict:
  """Traces `steps` steps, blocked at the end inside the trace."""
  kwargs = {}
  try:
    params = inspect.signature(jax.profiler.trace).parameters
    if "create_perfetto_trace" in params:
      kwargs["create_perfetto_trace"] = True
  except (TypeError, ValueError):
    pass
  result = {"trace_error": None}
  start = end = None
  try:
    with jax.profiler.trace(log_dir, **kwargs):
      start = time.perf_counter()
      jax.block_until_ready(bench.run(steps))
      end = time.perf_counter()
  except Exception as e:  # pylint: disable=broad-except
    # The steps may have run: a failure of the trace's writing is reported,
    # and the files it did write are still read.
    result["trace_error"] = f"{type(e).__name__}: {e}"
    _reset_profiler()
  result["wall_s"] = None if end is None else end - start
  return result


def find_trace(log_dir: str) -> str | None:
  """The trace file to read: trace JSON first, else the XSpace protobuf."""
  for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz", "*.xplane.pb"):
    found = glob.glob(os.path.join(log_dir, "**", pattern), recursive=True)
    if found:
      return max(found, key=os.path.getmtime)
  return None


def load_trace(path: str):
  """Complete events, process names by pid and thread names by (pid, tid).

  Events are dicts with name, pid, tid, ts and dur (microseconds) and args.
  """
  if path.endswith(".xplane.pb"):
    return _load_xplane(path)
  with gzip.open(path, "rb") as f:
    trace = json.load(f)
  raw = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
  processes, threads, events = {}, {}, []
  for e in raw:
    ph = e.get("ph")
    if ph == "M":
      name = (e.get("args") or {}).get("name")
      if e.get("name") == "process_name" and name is not None:
        processes[e.get("pid")] = str(name)
      elif e.get("name") == "thread_name" and name is not None:
        threads[(e.get("pid"), e.get("tid"))] = str(name)
    elif ph == "X" and "ts" in e:
      events.append(
        {
          "name": str(e.get("name", "")),
          "pid": e.get("pid"),
          "tid": e.get("tid"),
          "ts": float(e["ts"]),
          "dur": float(e.get("dur", 0.0)),
          "args": e.get("args") or {},
        }
      )
  return events, processes, threads


def _load_xplane(path: str):
  """As load_trace, from the XSpace: a plane is a process, a line a thread."""
  data = jax.profiler.ProfileData.from_file(path)
  processes, threads, events = {}, {}, []
  for pid, plane in enumerate(data.planes):
    processes[pid] = plane.name
    for tid, line in enumerate(plane.lines):
      threads[(pid, tid)] = line.name
      for event in line.events:
        try:
          args = dict(event.stats)
        except Exception:  # pylint: disable=broad-except
          args = {}
        events.append(
          {
            "name": event.name,
            "pid": pid,
            "tid": tid,
            "ts": event.start_ns / 1e3,
            "dur": event.duration_ns / 1e3,
            "args": args,
          }
        )
  return events, processes, threads


def device_events(events, processes, threads):
  """The kernel/copy events of device streams, and the threads kept."""
  device_pids = {
    pid
    for pid, name in processes.items()
    if DEVICE_PROCESS_RE.search(name) and not name.startswith("/host:")
  }
  device_threads = {
    key: name for key, name in threads.items() if key[0] in device_pids
  }
  streams = {
    key for key, name in device_threads.items() if STREAM_THREAD_RE.search(name)
  }
  if streams:
    keep = streams
  else:
    keep = {
      key
      for key, name in device_threads.items()
      if not DERIVED_THREAD_RE.search(name)
    }
  selected = [
    e
    for e in events
    if e["pid"] in device_pids
    and ((e["pid"], e["tid"]) in keep or (e["pid"], e["tid"]) not in threads)
  ]
  return selected, sorted(device_threads[k] for k in keep)


def union_us(events) -> float:
  """Length of the union of the events' [ts, ts + dur) intervals."""
  total, end = 0.0, None
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
    if end is None or start > end:
      total += stop - start
      end = stop
    elif stop > end:
      total += stop - end
      end = stop
  return total


def category(name: str) -> str:
  if MATRIX_RE.search(name):
    return "matrix"
  if MEMORY_RE.search(name):
    return "memory"
  return "other"


def top_events(events, total_us: float, count: int = TOP_KERNELS):
  """The `count` names with the most total time: name, count, ms, share."""
  by_name = collections.defaultdict(lambda: [0, 0.0])
  for e in events:
    by_name[e["name"][:80]][0] += 1
    by_name[e["name"][:80]][1] += e["dur"]
  rows = sorted(by_name.items(), key=lambda item: -item[1][1])[:count]
  return [
    {
      "name": name,
      "count": n,
      "total_ms": us / 1e3,
      "share": us / total_us if total_us else None,
    }
    for name, (n, us) in rows
  ]


def host_xla_events(events, processes):
  """Host events that are XLA ops or thunks (on a CPU, the computation)."""
  selected = []
  for e in events:
    if processes.get(e["pid"], "").startswith("/device:"):
      continue
    name = e["name"]
    if "hlo_op" in e["args"]:
      selected.append(e)
    elif not name.startswith(("end:", "$")) and "::" not in name:
      if HOST_XLA_RE.search(name):
        selected.append(e)
  return selected


# ---------------------------------------------------------------------------
# Figures and the limit.


def step_bytes(bench: common.StepBench) -> tuple[float | None, str]:
  """Bytes accessed by one step over all devices (XLA cost analysis)."""
  lowered = common.lower_one_step(bench)
  devices = bench.state.prediction_bank.sharding.mesh.devices.size
  value, stage = common.xla_cost(lowered, "bytes accessed")
  if value is None:
    return None, "unavailable"
  label = {
    "lowered": "lowered step, before fusion",
    "compiled": "compiled step",
  }
  return value * devices, label[stage]


def kernel_figures(kernels, steps: int, wall_s: float | None) -> dict:
  """Busy time, categories and top kernels of the device events."""
  busy_us = union_us(kernels)
  summed_us = sum(e["dur"] for e in kernels)
  per_category = {}
  for name in ("matrix", "memory", "other"):
    members = [e for e in kernels if category(e["name"]) == name]
    # Union within a category too: streams may overlap.
    cat_us = union_us(members)
    per_category[name] = {
      "kernels": len(members),
      "ms_per_step": cat_us / 1e3 / steps,
      "share_of_busy": cat_us / busy_us if busy_us else None,
    }
  return {
    "device_kernels": len(kernels),
    "kernels_per_step": len(kernels) / steps,
    "kernel_time_summed_s": summed_us / 1e6,
    "device_busy_s": busy_us / 1e6,
    "device_busy_per_step_s": busy_us / 1e6 / steps,
    "device_span_s": (
      (max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels))
      / 1e6
    ),
    "busy_fraction": busy_us / 1e6 / wall_s if wall_s else None,
    "categories": per_category,
    "top_kernels": top_events(kernels, busy_us),
  }


def kernels_bound(fig: dict, peak: float | None) -> str:
  """What the kernels are bound by (the docstring's rule)."""
  tflops, intensity, ridge = (
    fig.get("tflops_during_busy"),
    fig.get("intensity_flop_per_byte"),
    fig.get("ridge_flop_per_byte"),
  )
  matrix_share = fig["categories"]["matrix"]["share_of_busy"] or 0.0
  if peak and tflops is not None and tflops >= 0.5 * peak:
    return f"compute-bound ({100 * tflops / peak:.0f}% of the bf16 peak)"
  if 1.0 - matrix_share >= 0.5:
    return (
      f"memory-bound (non-matrix kernels {100 * (1 - matrix_share):.0f}% "
      "of busy time)"
    )
  if intensity is not None and ridge is not None and intensity < ridge:
    return (
      f"memory-bound (intensity {intensity:.0f} FLOP/byte, before fusion, "
      f"< ridge {ridge:.0f})"
    )
  if peak and tflops is not None:
    return f"matrix kernels below peak ({100 * tflops / peak:.0f}% of it)"
  return "bound unknown (no peak for this device)"


def limit_line(batch: int, fig: dict, peak: float | None) -> str:
  if not fig.get("device_kernels"):
    return (
      f"limit at batch {batch}: not measured (no device kernel events in "
      "the trace"
      + (
        ""
        if fig.get("host_xla_busy_fraction") is None
        else f"; host XLA ops busy {100 * fig['host_xla_busy_fraction']:.0f}%"
        " of the wall time"
      )
      + ")"
    )
  busy = fig["busy_fraction"]
  if busy is None:
    return f"limit at batch {batch}: not measured (no wall time)"
  if busy < BUSY_FRACTION_LIMIT:
    return (
      f"limit at batch {batch}: host dispatch (device busy {100 * busy:.0f}% "
      "of the wall time)"
    )
  cats = fig["categories"]
  tflops = fig.get("tflops_in_matrix_kernels")
  at = "" if tflops is None else f" at {tflops:.1f} TFLOP/s"
  return (
    f"limit at batch {batch}: device kernels (busy {100 * busy:.0f}%); "
    f"matrix kernels {100 * (cats['matrix']['share_of_busy'] or 0):.0f}% "
    f"of busy time{at}, other fusions "
    f"{100 * (cats['other']['share_of_busy'] or 0):.0f}%, copies "
    f"{100 * (cats['memory']['share_of_busy'] or 0):.0f}%; kernels "
    + kernels_bound(fig, peak)
  )


def _ms(value) -> str:
  return "n/a" if value is None else f"{1e3 * value:.3f} ms"


def _pct(value) -> str:
  return "n/a" if value is None else f"{100 * value:.0f}%"


def print_top(rows, title: str) -> None:
  print(title)
  print(f"  {'name':<80} {'count':>6} {'total ms':>10} {'share':>6}")
  for row in rows:
    print(
      f"  {row['name']:<80} {row['count']:>6} {row['total_ms']:>10.3f} "
      f"{_pct(row['share']):>6}"
    )


def analyse(path: str, steps: int, wall_s: float | None) -> dict:
  """Reads the trace at `path` and prints and returns its figures."""
  events, processes, threads = load_trace(path)
  names = sorted(set(processes.values()))
  print(
    f"trace: {path} ({len(events)} complete events); processes: "
    + ", ".join(repr(n) for n in names[:10])
    + (f" (+{len(names) - 10} more)" if len(names) > 10 else "")
  )
  kernels, kept_threads = device_events(events, processes, threads)
  fig = {
    "trace_file": path,
    "trace_events": len(events),
    "process_names": names,
    "device_threads": kept_threads,
    "device_kernels": len(kernels),
  }
  if kept_threads:
    print(
      "device threads read: "
      + ", ".join(repr(n) for n in kept_threads[:10])
      + (f" (+{len(kept_threads) - 10} more)" if len(kept_threads) > 10 else "")
    )
  if kernels:
    fig.update(kernel_figures(kernels, steps, wall_s))
    return fig
  host = host_xla_events(events, processes)
  host_us = union_us(host)
  fig["host_xla_ops"] = len(host)
  fig["host_xla_busy_s"] = host_us / 1e6
  fig["host_xla_busy_fraction"] = host_us / 1e6 / wall_s if wall_s else None
  fig["top_host_xla_ops"] = top_events(host, host_us)
  return fig


def profile_batch(args, mesh, batch: int, log_dir: str, peak, bandwidth):
  """Builds, warms, traces and analyses one batch size; prints as it goes."""
  fig = {"batch_size": batch, "method": args.method, "model": args.model}
  bench = common.build_step(
    args.method,
    mesh=mesh,
    batch_size=batch,
    **common.step_flag_kwargs(args),
  )
  fig.update(common.first_call(bench))
  jax.block_until_ready(bench.run(args.warmup))
  fig.update(trace_steps(bench, args.steps, log_dir))
  wall_s = fig["wall_s"]
  # After the trace: lowering the step traces it again.
  flops, fig["flops_source"] = common.step_flops(bench)
  fig["flops_per_step"] = flops
  try:
    step_b, fig["bytes_source"] = step_bytes(bench)
  except Exception as e:  # pylint: disable=broad-except
    step_b, fig["bytes_source"] = None, f"failed: {type(e).__name__}"
  fig["bytes_accessed_per_step"] = step_b
  fig["intensity_flop_per_byte"] = flops / step_b if flops and step_b else None
  fig["ridge_flop_per_byte"] = (
    peak * 1e12 / (bandwidth * 1e12) if peak and bandwidth else None
  )
  del bench
  print(
    f"batch {batch}: {args.steps} steps traced in {_ms(wall_s)} wall "
    f"({_ms(None if wall_s is None else wall_s / args.steps)} per step); "
    f"first call {fig['first_call_s']:.1f} s"
  )
  if fig["trace_error"]:
    print(f"trace raised (files it wrote are still read): {fig['trace_error']}")
  path = find_trace(log_dir)
  if path is None:
    print(f"no trace file found under {log_dir}; nothing to analyse")
    return fig
  try:
    fig.update(analyse(path, args.steps, wall_s))
  except Exception as e:  # pylint: disable=broad-except
    print(f"could not read the trace {path}: {type(e).__name__}: {e}")
    fig["analyse_error"] = f"{type(e).__name__}: {e}"
    return fig
  if flops:
    print(
      f"FLOPs per step: {flops / 1e9:.2f} GFLOP ({fig['flops_source']}); "
      "bytes accessed per step: "
      + (
        "n/a"
        if step_b is None
        else f"{step_b / 1e9:.3f} GB ({fig['bytes_source']})"
      )
      + "; intensity: "
      + (
        "n/a"
        if fig["intensity_flop_per_byte"] is None
        else f"{fig['intensity_flop_per_byte']:.1f} FLOP/byte"
      )
      + "; ridge: "
      + (
        "n/a"
        if fig["ridge_flop_per_byte"] is None
        else f"{fig['ridge_flop_per_byte']:.0f} FLOP/byte "
        f"({peak:g} TFLOP/s / {bandwidth:g} TB/s)"
      )
    )
  if not fig.get("device_kernels"):
    print(
      "no device kernel events in the trace (CPU backend); host-side XLA "
      f"ops: {fig.get('host_xla_ops', 0)}, busy "
      f"{_ms(fig.get('host_xla_busy_s'))} = "
      f"{_pct(fig.get('host_xla_busy_fraction'))} of the wall time"
    )
    print_top(fig.get("top_host_xla_ops", []), "top host XLA ops:")
    return fig
  return device_report(fig, flops, mesh.devices.size, peak)


def device_report(fig: dict, flops, devices: int, peak) -> dict:
  """Adds the achieved TFLOP/s to `fig` and prints the device figures."""
  busy_step = fig["device_busy_per_step_s"]
  fig["tflops_during_busy"] = (
    flops / (busy_step * devices) / 1e12 if flops and busy_step else None
  )
  matrix_s = fig["categories"]["matrix"]["ms_per_step"] / 1e3
  fig["tflops_in_matrix_kernels"] = (
    flops / (matrix_s * devices) / 1e12 if flops and matrix_s else None
  )
  print(
    f"device: {fig['device_kernels']} kernels "
    f"({fig['kernels_per_step']:.0f} per step), summed "
    f"{_ms(fig['kernel_time_summed_s'])}, busy {_ms(fig['device_busy_s'])} "
    f"= {_pct(fig['busy_fraction'])} of the wall time; busy per step "
    f"{_ms(busy_step)}"
  )
  for name in ("matrix", "memory", "other"):
    cat = fig["categories"][name]
    print(
      f"  {name:<6} {cat['ms_per_step']:9.3f} ms/step "
      f"{_pct(cat['share_of_busy']):>5} of busy ({cat['kernels']} kernels)"
    )
  tflops = fig["tflops_during_busy"]
  print(
    "achieved per device during busy time: "
    + ("n/a" if tflops is None else f"{tflops:.1f} TFLOP/s")
    + (
      ""
      if fig["tflops_in_matrix_kernels"] is None
      else f" (FLOPs / matrix-kernel time: "
      f"{fig['tflops_in_matrix_kernels']:.1f} TFLOP/s)"
    )
    + ("" if peak is None else f"; dense bf16 peak {peak:g} TFLOP/s")
  )
  print_top(fig["top_kernels"], f"top {TOP_KERNELS} kernels:")
  return fig


def main(argv=None) -> int:
  args = parse_args(argv)
  batch_sizes = common.int_list(args.batch_sizes)
  mesh = banks.data_mesh()
  report = common.print_header(
    "profile_step",
    model=args.model,
    method=args.method,
    image_size=args.image_size,
    dtype=args.dtype,
    bank_dtype=args.bank_dtype,
    batch_sizes=args.batch_sizes,
    num_examples=args.num_examples,
    steps=args.steps,
    warmup=args.warmup,
    mesh_devices=mesh.devices.size,
  )
  kind = report["environment"]["device_kind"]
  peak = common.peak_tflops(kind)
  bandwidth = hbm_tb_per_s(kind)
  print(
    f"device {kind!r}: dense bf16 peak "
    + ("n/a" if peak is None else f"{peak:g} TFLOP/s")
    + ", HBM "
    + ("n/a" if bandwidth is None else f"{bandwidth:g} TB/s")
    + " per device"
  )
  report.update(
    peak_bf16_tflops_per_device=peak,
    hbm_tb_per_s=bandwidth,
    busy_fraction_limit=BUSY_FRACTION_LIMIT,
    results=[],
  )
  root = args.trace_dir or tempfile.mkdtemp(prefix="profile_step_")
  try:
    for batch in batch_sizes:
      log_dir = os.path.join(root, f"batch{batch}")
      try:
        fig = profile_batch(args, mesh, batch, log_dir, peak, bandwidth)
      except Exception as e:  # pylint: disable=broad-except
        traceback.print_exc()
        print(f"batch {batch} failed: {type(e).__name__}: {e}")
        fig = {"batch_size": batch, "error": f"{type(e).__name__}: {e}"}
        line = f"limit at batch {batch}: not measured ({type(e).__name__})"
      else:
        line = limit_line(batch, fig, peak)
      fig["limit"] = line
      report["results"].append(fig)
      print(line)
      print(f"profile: {line}", flush=True)
      common.write_json(args.out, report)
  finally:
    if not args.trace_dir:
      shutil.rmtree(root, ignore_errors=True)
  common.write_json(args.out, report)
  if args.out:
    print(f"wrote {args.out}")
  if args.trace_dir:
    print(f"traces kept under {args.trace_dir}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
