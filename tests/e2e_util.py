"""Shared test helpers, above all for end-to-end tests in subprocesses.

The one home of the paths (REPO_ROOT) and of running the project's commands
the way a person would: main.py to its end (`run_main`) or in the background
while its log is watched (to kill or signal it at a chosen moment,
`MainProcess`), any module or snippet (`run_module`, `run_python`). Every
subprocess gets `subprocess_env`: CPU only, one device unless asked for more
(the fake devices of tests/conftest.py are this process's JAX config and do
not leak). Also: fingerprints of every file of a workdir, a stage's
checkpoints read back with orbax for bitwise comparisons, results files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Callable

import jax
import numpy as np

from aikd_jax import checkpointing
from configs import digits

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
STAGES = ("teacher", "teacher_logits", "student")
TMP_MARKER = ".orbax-checkpoint-tmp"

# The digits demo shortened: 22 steps per epoch (1438 examples, batch 64),
# a 2-epoch teacher and a 3-epoch student; a whole run is ~45 s on 2 cores,
# most of it JIT compilation.
STEPS_PER_EPOCH = 22
TEACHER_EPOCHS = 2
STUDENT_EPOCHS = 3
SHORT_DIGITS = (
  "--config.num_epochs=3",
  "--config.teacher_num_epochs=2",
  "--config.log_every_steps=5",
)

# A training log line: "<stage> epoch <e>/<E> | step <step>/<total> | ..."
# (progress.ConsoleReport).
STEP_LINE_PATTERN = r"\] \w+ epoch \d+/\d+ \| step \d+/"
_LOSS_LINE = re.compile(r"\] \w+ epoch \d+/\d+ \| step (\d+)/")


def main_command(
  workdir: str, *overrides: str, config: str = "configs/digits.py"
) -> list[str]:
  """The command line of a run: main.py, the config, --workdir, overrides."""
  return [
    PYTHON,
    "main.py",
    f"--config={config}",
    f"--workdir={workdir}",
    *overrides,
  ]


def subprocess_env(num_devices: int | None = None) -> dict[str, str]:
  """CPU only, unbuffered; `num_devices` fake CPU devices if given, else 1."""
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"
  env.pop("XLA_FLAGS", None)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  # The session's persistent compilation cache (conftest.py), not the user's.
  if jax.config.jax_compilation_cache_dir:
    env["JAX_COMPILATION_CACHE_DIR"] = jax.config.jax_compilation_cache_dir
  if num_devices is not None:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={num_devices}"
  return env


@dataclasses.dataclass
class Finished:
  """What a finished run left behind: exit status, output, wall time.

  `output` is stdout and stderr interleaved as written, unless the streams
  were captured apart: then `stdout` and `stderr` hold them and `output` is
  the one followed by the other.
  """

  returncode: int
  output: str
  seconds: float
  stdout: str | None = None
  stderr: str | None = None

  def lines(self, pattern: str) -> list[str]:
    return [
      line for line in self.output.splitlines() if re.search(pattern, line)
    ]

  def tail(self, chars: int = 6000) -> str:
    return self.output[-chars:]


def _run(
  command: list[str],
  num_devices: int | None,
  timeout: float,
  separate_streams: bool,
  env: dict[str, str] | None = None,
) -> Finished:
  start = time.monotonic()
  proc = subprocess.run(
    command,
    cwd=REPO_ROOT,
    env=env or subprocess_env(num_devices),
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE if separate_streams else subprocess.STDOUT,
    text=True,
    timeout=timeout,
    check=False,
  )
  seconds = time.monotonic() - start
  if not separate_streams:
    return Finished(proc.returncode, proc.stdout, seconds)
  return Finished(
    proc.returncode,
    proc.stdout + proc.stderr,
    seconds,
    stdout=proc.stdout,
    stderr=proc.stderr,
  )


def run_main(
  workdir: str,
  *overrides: str,
  config: str = "configs/digits.py",
  num_devices: int | None = None,
  timeout: float = 300.0,
  separate_streams: bool = False,
) -> Finished:
  """Runs main.py to the end; stdout and stderr together in `output`
  (and apart in `stdout`, `stderr` if `separate_streams`)."""
  return _run(
    main_command(workdir, *overrides, config=config),
    num_devices,
    timeout,
    separate_streams,
  )


def run_python(
  *args: str, num_devices: int | None = None, timeout: float = 600.0
) -> Finished:
  """`python *args` in the repository root (also first on PYTHONPATH, for
  `-c` snippets and `-m` modules), streams captured apart."""
  env = subprocess_env(num_devices)
  env["PYTHONPATH"] = os.pathsep.join(
    [REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  )
  return _run(
    [PYTHON, *args], num_devices, timeout, separate_streams=True, env=env
  )


def run_module(
  module: str,
  *args: str,
  num_devices: int | None = None,
  timeout: float = 600.0,
) -> Finished:
  """`python -m module *args` in the repository root, streams apart."""
  return run_python(
    "-m", module, *args, num_devices=num_devices, timeout=timeout
  )


class MainProcess:
  """main.py running in the background, its output collected line by line.

  Each line is stored with the monotonic time it was read, so a test can
  measure how long the run took to reach a given point.
  """

  def __init__(
    self, workdir: str, *overrides: str, num_devices: int | None = None
  ):
    self.workdir = workdir
    self.start = time.monotonic()
    self.proc = subprocess.Popen(
      main_command(workdir, *overrides),
      cwd=REPO_ROOT,
      env=subprocess_env(num_devices),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      bufsize=1,
    )
    self.lines: list[tuple[float, str]] = []
    self._lock = threading.Lock()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()

  def _read(self) -> None:
    for line in self.proc.stdout:
      with self._lock:
        self.lines.append((time.monotonic(), line.rstrip("\n")))

  def snapshot(self) -> list[str]:
    with self._lock:
      return [line for _, line in self.lines]

  def first_time(self, pattern: str, after: float = 0.0) -> float | None:
    """Seconds from start to the first line matching `pattern` that was
    read at least `after` seconds from start."""
    with self._lock:
      for t, line in self.lines:
        if t - self.start >= after and re.search(pattern, line):
          return t - self.start
    return None

  def running(self) -> bool:
    return self.proc.poll() is None

  def wait_until(
    self,
    condition: Callable[[], bool],
    timeout: float = 240.0,
    poll: float = 0.001,
  ) -> bool:
    """Polls `condition` until true (True) or the process ends (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
      if condition():
        return True
      if not self.running():
        return condition()
      time.sleep(poll)
    raise TimeoutError(
      f"condition not met in {timeout}s; output:\n"
      + "\n".join(self.snapshot()[-40:])
    )

  def send(self, sig: int) -> bool:
    """Sends `sig`; False if the process had already exited."""
    if not self.running():
      return False
    try:
      os.kill(self.proc.pid, sig)
    except ProcessLookupError:
      return False
    return True

  def finish(self, timeout: float = 300.0) -> Finished:
    """Waits for the exit; returns the whole output."""
    returncode = self.proc.wait(timeout=timeout)
    self._reader.join(timeout=30)
    with self._lock:
      output = "\n".join(line for _, line in self.lines)
    return Finished(returncode, output, time.monotonic() - self.start)


def logged_steps(
  lines: list[str], marker: str | None = None, exclude: str | None = None
) -> list[int]:
  """Steps of the training-log lines (STEP_LINE_PATTERN), in order.

  `marker` keeps only lines containing it, `exclude` drops lines containing
  it (e.g. "] student epoch").
  """
  steps = []
  for line in lines:
    if marker is not None and marker not in line:
      continue
    if exclude is not None and exclude in line:
      continue
    match = _LOSS_LINE.search(line)
    if match:
      steps.append(int(match.group(1)))
  return steps


def tmp_checkpoint_dirs(workdir: str) -> list[str]:
  """Orbax's unfinished step folders under any stage's checkpoints."""
  found = []
  for stage in STAGES:
    directory = os.path.join(workdir, stage, "checkpoints")
    try:
      names = os.listdir(directory)
    except FileNotFoundError:
      continue
    found += [os.path.join(directory, n) for n in names if TMP_MARKER in n]
  return found


def checkpoint_steps(workdir: str, stage: str) -> list[int]:
  """The finished checkpoints of a stage (orbax's tmp folders excluded)."""
  directory = os.path.join(workdir, stage, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def stage_complete(workdir: str, stage: str) -> bool:
  """Whether the stage wrote its results file (it does so when it ends)."""
  path = os.path.join(workdir, stage, "results.json")
  return os.path.exists(path)


def file_digests(root: str) -> dict[str, str]:
  """sha256 of every file under `root`, by relative path (dirs as 'dir')."""
  digests = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      rel = os.path.relpath(os.path.join(dirpath, name), root)
      digests[rel] = "dir"
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        digests[os.path.relpath(path, root)] = hashlib.sha256(
          f.read()
        ).hexdigest()
  return digests


def copy_workdir(
  source: str, target: str, stages: tuple[str, ...] = STAGES
) -> str:
  """Copies config.json and the named stages' folders of a workdir."""
  os.makedirs(target)
  shutil.copy2(os.path.join(source, "config.json"), target)
  for stage in stages:
    if os.path.isdir(os.path.join(source, stage)):
      shutil.copytree(os.path.join(source, stage), os.path.join(target, stage))
  return target


def load_checkpoint(
  workdir: str, stage: str, step: int | None = None
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """A stage's checkpoint (the latest if `step` is None) as host arrays.

  Returns the `state` item flattened to {"path": np.ndarray} and the
  `progress` item as saved.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  directory = os.path.abspath(os.path.join(workdir, stage, "checkpoints"))
  manager = ocp.CheckpointManager(directory, item_names=("state", "progress"))
  try:
    if step is None:
      step = manager.latest_step()
    assert step is not None, f"no checkpoint in {directory}"
    restored = manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), progress=ocp.args.JsonRestore()
      ),
    )
  finally:
    manager.close()
  flat = {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(restored["state"])
  }
  return flat, restored["progress"]


def final_arrays(workdir: str) -> dict[str, np.ndarray]:
  """Every array of the final checkpoints of all three stages."""
  arrays = {}
  for stage in STAGES:
    flat, _ = load_checkpoint(workdir, stage)
    arrays.update({f"{stage}{path}": leaf for path, leaf in flat.items()})
  return arrays


def bitwise_differences(
  a: dict[str, np.ndarray], b: dict[str, np.ndarray]
) -> list[str]:
  """Names of the leaves that differ in presence, shape, dtype or any bit."""
  diffs = sorted(set(a) ^ set(b))
  for name in sorted(set(a) & set(b)):
    x, y = a[name], b[name]
    if x.dtype != y.dtype or x.shape != y.shape:
      diffs.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
    elif x.tobytes() != y.tobytes():
      # tobytes(): bitwise, so NaN payloads and -0.0 count as they should.
      count = int(np.sum(x != y))
      diffs.append(f"{name}: {count} of {x.size} elements differ")
  return diffs


def read_results(workdir: str, stage: str) -> dict[str, Any]:
  """A stage's results.json."""
  with open(os.path.join(workdir, stage, "results.json")) as f:
    return json.load(f)


def comparable_results(workdir: str) -> dict[str, Any]:
  """The results files minus what may differ between equal runs (timing)."""
  results = {}
  for stage in STAGES:
    payload = read_results(workdir, stage)
    payload.pop("seconds", None)
    results[stage] = payload
  return results


def kill_if_running(process: MainProcess) -> None:
  """SIGKILLs our own child (by its pid) if it is still running."""
  if process.running():
    os.kill(process.proc.pid, signal.SIGKILL)
  process.proc.wait(timeout=60)


def final_student(workdir: str) -> tuple[int, dict, dict]:
  """The student's newest checkpoint (step, arrays by tree path) and its
  results.json without the wall time: what two equal runs share bit for
  bit."""
  directory = os.path.join(workdir, "student", checkpointing.CHECKPOINT_DIR)
  step, state = checkpointing.load_arrays(directory)
  flat = {
    jax.tree_util.keystr(path): np.asarray(leaf)
    for path, leaf in jax.tree_util.tree_leaves_with_path(state)
  }
  with open(os.path.join(workdir, "student", "results.json")) as f:
    results = json.load(f)
  results.pop("seconds", None)
  return step, flat, results


def digits_config(**fields):
  """The bundled digits config with `fields` set."""
  config = digits.get_config()
  for name, value in fields.items():
    config[name] = value
  return config


def edit_saved_config(workdir: str, edit: Callable[[dict], None]) -> None:
  """Rewrites the workdir's config.json through `edit` (a config.json as an
  older version, or another preset, would have written it)."""
  path = os.path.join(workdir, "config.json")
  with open(path) as f:
    saved = json.load(f)
  edit(saved)
  with open(path, "w") as f:
    json.dump(saved, f)
