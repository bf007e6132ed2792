"""Helpers shared by the benchmarks: environment header, timing, synthetic data.

Every benchmark drives the library's own stage, built as a run builds it
(`stage.build_stage`, `stage.create_train_state`, `stage.make_train_step`)
from configs/default.py (PS-KD's CIFAR-100 recipe) on a synthetic dataset
placed with `device_data.place_dataset`; nothing here reimplements the step.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from typing import Any, Callable, Sequence

_HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(_HERE)
for _path in (REPO_ROOT, _HERE):
  if _path not in sys.path:
    sys.path.insert(0, _path)

import jax  # pylint: disable=g-import-not-at-top
import ml_collections  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from aikd_jax import banks  # pylint: disable=g-import-not-at-top
from aikd_jax import data as data_lib  # pylint: disable=g-import-not-at-top
from aikd_jax import device_data  # pylint: disable=g-import-not-at-top
from aikd_jax import models  # pylint: disable=g-import-not-at-top
from aikd_jax import run_config  # pylint: disable=g-import-not-at-top
from aikd_jax import stage as stage_lib  # pylint: disable=g-import-not-at-top
from aikd_jax import train_step as step_lib  # pylint: disable=g-import-not-at-top
from configs import default  # pylint: disable=g-import-not-at-top

CIFAR_SHAPE = (32, 32, 3)
CIFAR_CLASSES = 100
CIFAR_TRAIN = 50_000
CIFAR_TEST = 10_000


# ---------------------------------------------------------------------------
# Environment and output.


def _version(module: str) -> str:
  try:
    return getattr(importlib.import_module(module), "__version__", "?")
  except ImportError:
    return "absent"


def environment() -> dict[str, Any]:
  """Backend, devices and library versions, as a JSON-able dict."""
  devices = jax.local_devices()
  env = {
    "backend": jax.default_backend(),
    "device_kind": devices[0].device_kind,
    "local_device_count": len(devices),
    "device_count": jax.device_count(),
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
    # Other processes on the host slow every figure: report the load.
    "load_average_1min": os.getloadavg()[0],
    "python": platform.python_version(),
    "jax": jax.__version__,
    "jaxlib": _version("jaxlib"),
    "flax": _version("flax"),
    "optax": _version("optax"),
  }
  # The torch version from its metadata: importing torch here would cost
  # seconds and, on a GPU, a CUDA context in a JAX-only benchmark.
  try:
    env["torch"] = importlib.metadata.version("torch")
  except importlib.metadata.PackageNotFoundError:
    env["torch"] = "absent"
  return env


def print_header(title: str, **settings: Any) -> dict[str, Any]:
  """Prints the environment and the run's settings; returns both."""
  env = environment()
  print(f"== {title}")
  print(
    f"backend={env['backend']} device_kind={env['device_kind']!r} "
    f"local_devices={env['local_device_count']} "
    f"cpus={env['cpu_count']} "
    f"load_average_1min={env['load_average_1min']:.2f}"
  )
  print(
    f"jax={env['jax']} jaxlib={env['jaxlib']} flax={env['flax']} "
    f"optax={env['optax']} torch={env['torch']}"
  )
  if settings:
    print("settings: " + " ".join(f"{k}={v}" for k, v in settings.items()))
  sys.stdout.flush()
  return {"environment": env, "settings": settings}


def write_json(path: str | None, payload: Any) -> None:
  """Writes `payload` to `path` (atomically); no-op for an empty path."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(payload, f, indent=2, default=str)
  os.replace(tmp, path)


def add_step_flags(
  parser: argparse.ArgumentParser, *, batch_sizes: str, dtype: str
) -> None:
  """The flags of the benchmarks that build steps with `build_step`."""
  parser.add_argument(
    "--batch_sizes",
    default=batch_sizes,
    help="global batch sizes, comma-separated",
  )
  parser.add_argument(
    "--dtype",
    default=dtype,
    choices=("float32", "bfloat16"),
    help="compute dtype (parameters stay float32)",
  )
  parser.add_argument(
    "--bank_dtype", default="float32", choices=("float32", "bfloat16")
  )
  parser.add_argument(
    "--model", default="preact_resnet18", choices=models.MODEL_NAMES
  )
  parser.add_argument(
    "--image_size",
    type=int,
    default=32,
    help="height and width of the synthetic images",
  )
  parser.add_argument(
    "--num_examples",
    type=int,
    default=CIFAR_TRAIN,
    help="synthetic training-set size (bank rows)",
  )


def step_flag_kwargs(args: argparse.Namespace) -> dict[str, Any]:
  """`build_step`'s keyword arguments from `add_step_flags`' flags."""
  return {
    "model_name": args.model,
    "compute_dtype": args.dtype,
    "bank_dtype": args.bank_dtype,
    "num_examples": args.num_examples,
    "image_shape": (args.image_size, args.image_size, 3),
  }


def int_list(text: str) -> list[int]:
  return [int(x) for x in text.split(",") if x.strip()]


def str_list(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


# ---------------------------------------------------------------------------
# Timing.


def timed_runs(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
  """Seconds of each of `repeats` calls of `fn`, after `warmup` calls.

  Each call's result is passed to `jax.block_until_ready` before the clock
  stops, so asynchronous dispatch is included in the call that issued it.
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> float:
  """Median seconds of `repeats` blocked calls of `fn` after `warmup` ones."""
  return statistics.median(timed_runs(fn, warmup, repeats))


class CompileCounter:
  """Counts traces and XLA compilations (with their seconds) via jax.monitoring.

  Registered once per process; read the counters before and after a region
  to see whether anything was traced or compiled inside it.
  """

  _instance = None

  def __init__(self):
    self.count = 0  # backend (XLA) compilations
    self.seconds = 0.0  # their total seconds
    self.traces = 0  # jaxpr traces (a retrace precedes any recompilation)
    jax.monitoring.register_event_duration_secs_listener(self._listen)

  def _listen(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1
      self.seconds += duration
    elif event == "/jax/core/compile/jaxpr_trace_duration":
      self.traces += 1

  @classmethod
  def get(cls) -> "CompileCounter":
    if cls._instance is None:
      cls._instance = cls()
    return cls._instance


# ---------------------------------------------------------------------------
# Synthetic CIFAR-shaped data and a ready-to-run step.


def synthetic_arrays(
  num_examples: int,
  num_classes: int = CIFAR_CLASSES,
  image_shape: Sequence[int] = CIFAR_SHAPE,
  seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
  """Random uint8 images [N, H, W, C] and int32 labels [N] on the host."""
  rng = np.random.default_rng(seed)
  images = rng.integers(
    0, 256, (num_examples,) + tuple(image_shape), dtype=np.uint8
  )
  labels = rng.integers(0, num_classes, num_examples).astype(np.int32)
  return images, labels


def synthetic_dataset(
  num_train: int,
  num_test: int,
  num_classes: int = CIFAR_CLASSES,
  image_shape: Sequence[int] = CIFAR_SHAPE,
) -> data_lib.Dataset:
  """A CIFAR-shaped `data.Dataset` of random images and labels."""
  train_images, train_labels = synthetic_arrays(
    num_train, num_classes, image_shape, seed=0
  )
  test_images, test_labels = synthetic_arrays(
    num_test, num_classes, image_shape, seed=1
  )
  return data_lib.Dataset(
    name="synthetic",
    train_images=train_images,
    train_labels=train_labels,
    test_images=test_images,
    test_labels=test_labels,
    num_classes=num_classes,
  )


def benchmark_config(
  method: str,
  *,
  model_name: str = "preact_resnet18",
  compute_dtype: str = "float32",
  bank_dtype: str = "float32",
  batch_size: int = 128,
  num_epochs: int = 300,
  seed: int = 0,
  channels: int = 3,
) -> ml_collections.ConfigDict:
  """configs/default.py (PS-KD's CIFAR-100 recipe) with these fields set."""
  config = default.get_config()
  config.method = method
  config.model = model_name
  config.compute_dtype = compute_dtype
  config.bank_dtype = bank_dtype
  config.batch_size = batch_size
  config.num_epochs = num_epochs
  config.seed = seed
  config.mean = tuple(config.mean)[:channels]
  config.std = tuple(config.std)[:channels]
  return config


def random_teacher(
  stage: stage_lib.Stage,
  data: device_data.DeviceDataset,
  mesh: jax.sharding.Mesh,
  seed: int = 7,
) -> step_lib.Teacher | None:
  """A stand-in for a trained teacher, of the kind the stage's objective reads.

  Precomputed: a teacher-logit bank of random logits (scale 3), sharded by
  example id as stage 2 leaves it; online: a freshly initialised model of the
  student's architecture; None when the objective uses no teacher.
  """
  objective = stage.objective
  if not objective.uses_teacher:
    return None
  if objective.teacher_mode == "online":
    variables = jax.jit(
      lambda: stage.teacher_model.init(
        jax.random.key(seed),
        np.zeros((1,) + data.image_shape, np.float32),
        train=False,
      ),
      out_shardings=banks.replicated(mesh),
    )()
    return step_lib.Teacher(variables=variables)
  rng = np.random.default_rng(seed)
  logits = 3.0 * rng.standard_normal((data.layout.num_rows, data.num_classes))
  return step_lib.Teacher(
    logits=banks.put_sharded(logits.astype(stage.bank_dtype), mesh)
  )


@dataclasses.dataclass
class StepBench:
  """A library train step with its state and data, ready to be timed.

  `run(k)` issues k consecutive steps (the state is donated, so each step
  consumes the previous one's output) and returns the last outputs without
  blocking; `timed` blocks on them.
  """

  method: str
  step_fn: Callable
  state: step_lib.TrainState
  data: step_lib.StepData
  batch_size: int
  steps_per_epoch: int
  metrics: Any = None
  # K > 1: step_fn runs up to K steps per call (the loop's grouping);
  # single_step_fn is the one-step program of the same stage, lowered (never
  # compiled) to count a step's FLOPs.
  steps_per_dispatch: int = 1
  single_step_fn: Callable | None = None
  # K > 1: every call runs the program whose trip count is an argument (the
  # loop's program for shorter calls), not the full calls' constant-K one.
  argument_trip_count: bool = False

  def run(self, num_steps: int):
    k = self.steps_per_dispatch
    if k == 1:
      for _ in range(num_steps):
        self.state, self.metrics = self.step_fn(self.state, self.data)
      return self.state, self.metrics
    program = self.step_fn.partial if self.argument_trip_count else self.step_fn
    done = 0
    while done < num_steps:
      count = min(k, num_steps - done)
      self.state, self.metrics = program(self.state, self.data, np.int32(count))
      done += count
    return self.state, self.metrics


def build_step(
  method: str,
  *,
  mesh: jax.sharding.Mesh,
  batch_size: int,
  model_name: str = "preact_resnet18",
  compute_dtype: str = "float32",
  bank_dtype: str = "float32",
  num_examples: int = CIFAR_TRAIN,
  num_classes: int = CIFAR_CLASSES,
  image_shape: Sequence[int] = CIFAR_SHAPE,
  num_epochs: int = 300,
  seed: int = 0,
  steps_per_dispatch: int = 1,
  argument_trip_count: bool = False,
) -> StepBench:
  """Builds `method`'s student stage as a run does, on synthetic data.

  The config is configs/default.py with the given fields; the data is a
  random CIFAR-shaped training set placed by example id exactly as a run
  places its dataset; the teacher is `random_teacher`'s. The state and the
  step data are those of the stage's first step.
  """
  config = benchmark_config(
    method,
    model_name=model_name,
    compute_dtype=compute_dtype,
    bank_dtype=bank_dtype,
    batch_size=batch_size,
    num_epochs=num_epochs,
    seed=seed,
    channels=image_shape[-1],
  )
  objective = run_config.validate(config)
  num_devices = mesh.devices.size
  data = device_data.place_dataset(
    synthetic_dataset(num_examples, num_devices, num_classes, image_shape),
    mesh,
    config,
  )
  stage = stage_lib.build_stage(
    "student", objective, num_epochs, config, data, num_devices
  )
  step_data = stage_lib.step_data(
    stage, data, mesh, epoch=0, teacher=random_teacher(stage, data, mesh)
  )
  single = stage_lib.make_train_step(stage, mesh)
  return StepBench(
    method=method,
    step_fn=(
      stage_lib.make_train_step(stage, mesh, steps_per_dispatch)
      if steps_per_dispatch > 1
      else single
    ),
    state=stage_lib.create_train_state(stage, data, mesh),
    data=step_data,
    batch_size=batch_size,
    steps_per_epoch=stage.steps_per_epoch,
    steps_per_dispatch=steps_per_dispatch,
    single_step_fn=single,
    argument_trip_count=argument_trip_count,
  )


# Dense bfloat16 peak TFLOP/s per device, by a substring of device_kind;
# MFU is reported against it (also for float32 runs, so say the dtype).
PEAK_BF16_TFLOPS = (
  ("H100 PCIe", None),  # Not in the table: a different peak.
  ("H100", 989.0),  # SXM
  ("H200", 989.0),
  ("A100", 312.0),
)


def peak_tflops(device_kind: str) -> float | None:
  """The device's dense bf16 peak TFLOP/s, or None when not known."""
  for name, peak in PEAK_BF16_TFLOPS:
    if name in device_kind:
      return peak
  return None


def step_flops(bench: StepBench) -> tuple[float | None, str]:
  """FLOPs of one train step over all devices, and where they came from.

  The convolutions and matrix products of the lowered one-step program
  (`matrix_flops`), the count MFU is usually quoted in; XLA's cost analysis
  only where that finds none. XLA's analysis of a compiled GPU program
  leaves out the convolutions it hands to cuDNN (PreAct ResNet-18 at batch
  128 on an H200: 3.0 GFLOP instead of about 420), and a loop program
  would count its body once. The shard_mapped program is per device, so
  its count is multiplied by the device count.
  """
  lowered = lower_one_step(bench)
  devices = bench.state.prediction_bank.sharding.mesh.devices.size
  flops = matrix_flops(lowered.as_text())
  if flops > 0:
    return flops * devices, "convolutions and matrix products of the step"
  flops, stage = xla_cost(lowered, "flops")
  if flops is None:
    return None, "unavailable"
  return flops * devices, f"XLA cost analysis of the {stage} step"


def lower_one_step(bench: StepBench):
  """The one-step program, lowered (a loop program's body counts once)."""
  fn = bench.single_step_fn or bench.step_fn
  return fn.lower(bench.state, bench.data)


def xla_cost(lowered, key: str) -> tuple[float | None, str]:
  """XLA's cost analysis figure `key` of a lowered program, per device:
  of the lowered HLO if it answers, else of the compiled program; with
  "lowered" or "compiled" (None where neither has it)."""
  for stage, get in (
    ("lowered", lowered.cost_analysis),
    ("compiled", lambda: _compiled(lowered)),
  ):
    try:
      analysis = get()
    except Exception:  # pylint: disable=broad-except
      continue
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else None
    value = (analysis or {}).get(key)
    if value and value > 0:
      return float(value), stage
  return None, "unavailable"


def _compiled(lowered):
  return lowered.compile().cost_analysis()


_NAME = r'@(?:"([^"]+)"|([\w.$-]+))'
_FUNC = re.compile(r"^\s*func\.func\s+(?:\w+\s+)*" + _NAME + r"\(")
_CALL = re.compile(r"\bcall\s+" + _NAME + r"\(")
_TYPES = re.compile(r":\s*\((tensor<[^)]*)\)\s*->\s*(tensor<[^>]*>)\s*$")
_TENSOR = re.compile(r"tensor<([^>]*)>")
_KERNEL_DIMS = re.compile(r"dim_numbers = \[[^\]]*\]x\[([^\]]*)\]")
_LHS_DILATE = re.compile(r"lhs_dilate = \[([\d, ]+)\]")
_CONTRACTING = re.compile(r"contracting_dims = \[([\d, ]*)\] x")


def _shape(tensor: str) -> list[int]:
  """[128, 32, 32, 3] from "128x32x32x3xbf16" (a scalar's is [])."""
  return [int(d) for d in tensor.split("x")[:-1]]


def _op_flops(line: str) -> float:
  """2 x multiply-adds of one stablehlo convolution or dot_general line."""
  is_conv = "stablehlo.convolution" in line
  if not is_conv and "stablehlo.dot_general" not in line:
    return 0.0
  types = _TYPES.search(line)
  if types is None:
    return 0.0
  operands = _TENSOR.findall(types.group(1))
  out = math.prod(_shape(_TENSOR.search(types.group(2)).group(1)))
  lhs, rhs = _shape(operands[0]), _shape(operands[1])
  if is_conv:  # Each output sums over the kernel's window and input features.
    kernel = _KERNEL_DIMS.search(line).group(1).replace(" ", "").split(",")
    reduced = math.prod(d for d, n in zip(rhs, kernel) if n != "o")
    # A strided conv's input gradient dilates its input with zeros: only
    # one window tap in prod(lhs_dilate) meets a value.
    dilate = _LHS_DILATE.search(line)
    if dilate:
      reduced /= math.prod(int(d) for d in dilate.group(1).split(","))
  else:
    dims = _CONTRACTING.search(line).group(1)
    reduced = math.prod(lhs[int(i)] for i in dims.split(",") if i.strip())
  return 2.0 * out * reduced


def matrix_flops(stablehlo: str) -> float:
  """FLOPs of the convolutions and dot_generals of a lowered program's
  text, each function counted once per call."""
  own: dict[str, float] = {}
  calls: dict[str, list[str]] = {}
  current = None
  for line in stablehlo.splitlines():
    match = _FUNC.match(line)
    if match:
      current = match.group(1) or match.group(2)
      own[current], calls[current] = 0.0, []
      continue
    if current is None:
      continue
    own[current] += _op_flops(line)
    calls[current] += [quoted or bare for quoted, bare in _CALL.findall(line)]

  def total(name: str, seen: tuple[str, ...] = ()) -> float:
    if name not in own or name in seen:
      return 0.0
    return own[name] + sum(total(c, seen + (name,)) for c in calls[name])

  return total("main")


def first_call(bench: StepBench) -> dict[str, float]:
  """Runs the first call (trace + compile + one call: K steps, the
  program the timed runs use), blocked; its cost."""
  counter = CompileCounter.get()
  before, seconds_before = counter.count, counter.seconds
  traces_before = counter.traces
  start = time.perf_counter()
  jax.block_until_ready(bench.run(bench.steps_per_dispatch))
  return {
    "first_call_s": time.perf_counter() - start,
    "traces_in_first_call": counter.traces - traces_before,
    # 0 with a persistent-compilation-cache hit.
    "compiles_in_first_call": counter.count - before,
    "xla_compile_s": counter.seconds - seconds_before,
  }


def measure_steps(
  benches: Sequence[StepBench], *, steps_per_run: int, warmup: int, repeats: int
) -> list[dict[str, Any]]:
  """Times runs of `steps_per_run` consecutive steps of each bench.

  Each bench first gets its compiling first call and `warmup` untimed runs;
  then the timed runs are interleaved (bench 1, 2, ..., 1, 2, ...) so that a
  change of machine load over time affects every bench alike. A run's clock
  stops when its last step has finished (block_until_ready on the state and
  metrics); the state is donated and the step asynchronous, so nothing blocks
  between the steps of a run.

  Returns, per bench: first-call seconds, the median and all per-step
  seconds, images/sec, and how many traces and compilations happened after
  the first call (0 and 0: the step never retraced or recompiled).
  """
  counter = CompileCounter.get()
  results = [first_call(bench) for bench in benches]
  before, traces_before = counter.count, counter.traces
  for bench in benches:
    for _ in range(warmup):
      jax.block_until_ready(bench.run(steps_per_run))
  runs = [[] for _ in benches]
  for _ in range(repeats):
    for i, bench in enumerate(benches):
      start = time.perf_counter()
      jax.block_until_ready(bench.run(steps_per_run))
      runs[i].append((time.perf_counter() - start) / steps_per_run)
  recompiles = counter.count - before
  retraces = counter.traces - traces_before
  if not all(r["traces_in_first_call"] for r in results):
    # The first call must trace: if nothing was seen, this JAX version emits
    # other monitoring events, and the counts below would mean nothing.
    recompiles = retraces = None
  for result, bench, per_step in zip(results, benches, runs):
    median = statistics.median(per_step)
    result.update(
      {
        "step_s": median,
        "step_s_runs": per_step,
        "images_per_s": bench.batch_size / median,
        # Counted over all benches of the call: any nonzero is a problem.
        "retraces_after_first_call": retraces,
        "recompiles_after_first_call": recompiles,
      }
    )
  return results


def measure_step(
  bench: StepBench, *, steps_per_run: int, warmup: int, repeats: int
) -> dict[str, Any]:
  """`measure_steps` for one bench."""
  return measure_steps(
    [bench], steps_per_run=steps_per_run, warmup=warmup, repeats=repeats
  )[0]


def full_bank_copies(bench: StepBench) -> int:
  """Copies of the whole prediction bank in the compiled step's HLO.

  An in-place bank update needs none; each copy is a read and a write of the
  whole bank (and a second buffer of its size) on every step.
  """
  bank = bench.state.prediction_bank
  local_shape = bank.sharding.shard_shape(bank.shape)
  dtype = {"float32": "f32", "bfloat16": "bf16"}[bank.dtype.name]
  token = f"{dtype}[{','.join(str(d) for d in local_shape)}]"
  extra = (np.int32(1),) if bench.steps_per_dispatch > 1 else ()
  lowered = bench.step_fn.lower(bench.state, bench.data, *extra)
  text = lowered.compile().as_text()
  return sum(
    1
    for line in text.splitlines()
    if " copy(" in line and line.strip().split("=")[1].strip().startswith(token)
  )
