"""How long main.py takes to get going: cold, warm cache, resumed.

  python benchmarks/start_time.py                        # PreAct ResNet-18
  python benchmarks/start_time.py --model=tiny_cnn --no_cache_off
  python benchmarks/start_time.py --extra=method=ps_kd --out=start.json

A repeated or resumed run should start in seconds because its compiled
programs come from JAX's persistent compilation cache
(aikd_jax/compilation_cache.py). This runs the real command line
(`python main.py --config=... --workdir=...`) in subprocesses, each with
`--config.compilation_cache_dir` set to one fresh temporary folder:

1. cold: empty cache, new workdir A; stopped with SIGTERM once the student
   has run its first step (--stop_at), so that the loop saves and exits;
2. warm: same cache, new workdir B, run to its end (a repeated run);
3. resume: workdir A again: the same command goes on from the checkpoint
   run 1 saved (a real resume: the config is unchanged; growing num_epochs
   instead would change the student's program, whose progressive-target
   weight is a compile-time constant of num_epochs, so it would compile);
4. cache off (unless --no_cache_off): new workdir, the cache set to ""
   (its reference: every run compiles everything).

Per run: wall seconds, exit code, the seconds from process start to the
first "train step compiled and first step run" line (the start-up a user
waits for), each stage's "compiled and first step" seconds, the restore and
teacher-logits lines, and the files in the cache afterwards (and how many
the run added). Line times are taken in this process as each line of the
child's output arrives. A warm or resumed run that adds files compiled a
program the cache did not hold: for a train step, its inputs' types or
shardings differ from those of the run that filled the cache.

The children get no JAX_COMPILATION_CACHE_DIR (it would win over the
config) and XDG_CACHE_HOME in the temp folder, so nothing reaches the
user's own cache. JAX stores only programs that took longer than
jax_persistent_cache_min_compile_time_secs (1 s by default) to compile:
small programs (the tiny CNN's steps on a GPU, the metric helpers) are
compiled again by every run, so a warm start is never free;
--min_compile_secs=0 stores everything. Workdirs and cache live in a temp
folder that is removed at the end unless --keep.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# absl's line prefix ends with "] "; the messages below follow it.
_COMPILED = re.compile(
  r"\] (\w+): train step compiled and first step run in ([\d.]+)s\."
)
_RESUMED = re.compile(
  r"\] (\w+): resumed from step (\d+) \(epoch \d+\) in ([\d.]+)s\."
)
_LOGITS = re.compile(r"\] teacher_logits: \d+ rows in ([\d.]+)s")
_EARLIER = re.compile(r"\] (\w+): finished earlier")
_EPOCH_DONE = re.compile(r"\] (\w+) epoch (\d+)/\d+ done in ")
_STOPPED = re.compile(
  r"(SIG\w+) received: saved a checkpoint at step (\d+) of the (\w+) stage"
)
_DEVICES = re.compile(r"\] \w+: .* examples, \d+ classes, (\d+) devices\.")


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="configs/digits.py")
  parser.add_argument("--model", default="preact_resnet18")
  parser.add_argument("--num_epochs", type=int, default=2)
  parser.add_argument(
    "--teacher_num_epochs", type=int, default=1, help="0: num_epochs"
  )
  parser.add_argument(
    "--extra",
    default="",
    help="more config fields, 'a=b,c=d' (no commas inside values)",
  )
  parser.add_argument(
    "--override",
    action="append",
    default=[],
    help="one more config field, a=b; repeatable (values may hold commas)",
  )
  parser.add_argument("--python", default=sys.executable)
  parser.add_argument(
    "--stop_at",
    default=r"student: train step compiled and first step run",
    help="regex of the log line after which run 1 gets SIGTERM",
  )
  parser.add_argument(
    "--min_compile_secs",
    type=float,
    default=None,
    help="jax_persistent_cache_min_compile_time_secs for the runs "
    "(default: JAX's, 1 s)",
  )
  parser.add_argument("--no_cache_off", action="store_true")
  parser.add_argument("--timeout", type=float, default=900.0)
  parser.add_argument("--dir", default="", help="parent of the temp folder")
  parser.add_argument("--keep", action="store_true")
  parser.add_argument("--out", default="", help="write figures as JSON")
  return parser.parse_args(argv)


def config_overrides(args: argparse.Namespace) -> list[str]:
  """The --config.FIELD=VALUE flags every run gets (the cache's aside)."""
  fields = [f"model={args.model}", f"num_epochs={args.num_epochs}"]
  if args.teacher_num_epochs:
    fields.append(f"teacher_num_epochs={args.teacher_num_epochs}")
  fields += [f for f in args.extra.split(",") if f.strip()]
  fields += args.override
  flags = []
  for field in fields:
    if "=" not in field:
      raise SystemExit(f"error: {field!r} is not FIELD=VALUE")
    flags.append(f"--config.{field.strip()}")
  return flags


@dataclasses.dataclass
class Run:
  """One subprocess of main.py and what its output said, with times."""

  name: str
  workdir: str
  command: list[str]
  returncode: int | None = None
  seconds: float | None = None
  first_step_s: float | None = None  # start -> first "compiled" line
  first_line_s: float | None = None  # start -> first output line
  compiled: dict = dataclasses.field(default_factory=dict)  # stage -> s
  compiled_at: dict = dataclasses.field(default_factory=dict)  # stage -> t
  resumed: dict = dataclasses.field(default_factory=dict)  # stage -> info
  finished_earlier: list = dataclasses.field(default_factory=list)
  teacher_logits_s: float | None = None
  first_epoch_done_s: float | None = None
  devices: int | None = None
  signal_sent_s: float | None = None
  stopped: dict | None = None  # what the SIGTERM stop message said
  timed_out: bool = False
  cache_files: int = 0
  cache_new: int = 0  # files this run added
  cache_bytes: int = 0
  log_tail: list = dataclasses.field(default_factory=list)

  def read(self, t: float, line: str) -> None:
    """Takes what one output line says, `t` seconds after the start."""
    if self.first_line_s is None:
      self.first_line_s = t
    if m := _COMPILED.search(line):
      self.compiled[m.group(1)] = float(m.group(2))
      self.compiled_at[m.group(1)] = round(t, 3)
      if self.first_step_s is None:
        self.first_step_s = t
    elif m := _RESUMED.search(line):
      self.resumed[m.group(1)] = {
        "step": int(m.group(2)),
        "restore_s": float(m.group(3)),
        "at_s": round(t, 3),
      }
    elif m := _LOGITS.search(line):
      self.teacher_logits_s = float(m.group(1))
    elif m := _EARLIER.search(line):
      self.finished_earlier.append(m.group(1))
    elif m := _EPOCH_DONE.search(line):
      if self.first_epoch_done_s is None:
        self.first_epoch_done_s = t
    elif m := _DEVICES.search(line):
      self.devices = int(m.group(1))
    if m := _STOPPED.search(line):
      self.stopped = {
        "signal": m.group(1),
        "step": int(m.group(2)),
        "stage": m.group(3),
      }

  def summary(self) -> str:
    """The grep-able line: start-up, per-stage compile, total."""
    first = _secs(self.first_step_s)
    stages = ", ".join(f"{k} {v:.1f} s" for k, v in self.compiled.items())
    stages = f" ({stages} compile)" if stages else ""
    note = f", exit {self.returncode}" if self.returncode else ""
    return (
      f"start: {self.name} {first} s to first step{stages}, "
      f"total {_secs(self.seconds)} s{note}"
    )


def _secs(value: float | None) -> str:
  return "n/a" if value is None else f"{value:.1f}"


def child_env(xdg_dir: str, min_compile_secs: float | None) -> dict[str, str]:
  """This environment, minus what would point JAX at another cache."""
  env = dict(os.environ)
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env.pop("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", None)
  env["XDG_CACHE_HOME"] = xdg_dir
  env["PYTHONUNBUFFERED"] = "1"
  if min_compile_secs is not None:
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = str(min_compile_secs)
  return env


def folder_files(path: str) -> tuple[int, int]:
  """(files, bytes) under `path`; (0, 0) if it does not exist."""
  count = size = 0
  for root, _, names in os.walk(path):
    for name in names:
      count += 1
      try:
        size += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return count, size


def run_main(
  run: Run,
  env: dict[str, str],
  timeout: float,
  stop_at: re.Pattern | None = None,
) -> Run:
  """Runs `run.command`, timing each line of its output as it arrives.

  With `stop_at`, sends SIGTERM once a line matches it: the training loop
  then saves a checkpoint after its current step and exits 0.
  """
  print(f"--- {run.name}: {' '.join(run.command)}", flush=True)
  start = time.monotonic()
  proc = subprocess.Popen(
    run.command,
    cwd=REPO_ROOT,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
    bufsize=1,
  )
  tail: list[str] = []

  def read() -> None:
    for line in proc.stdout:
      t = time.monotonic() - start
      line = line.rstrip("\n")
      tail.append(line)
      del tail[:-60]
      run.read(t, line)
      if m := _COMPILED.search(line):
        print(f"  {t:6.1f} s  {m.group(0)[2:]}", flush=True)
      if (
        stop_at is not None
        and run.signal_sent_s is None
        and stop_at.search(line)
        and proc.poll() is None
      ):
        proc.send_signal(signal.SIGTERM)
        run.signal_sent_s = time.monotonic() - start
        print(f"  {run.signal_sent_s:6.1f} s  SIGTERM sent", flush=True)

  reader = threading.Thread(target=read, daemon=True)
  reader.start()
  try:
    run.returncode = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    run.timed_out = True
    proc.kill()
    run.returncode = proc.wait()
  run.seconds = time.monotonic() - start
  reader.join(timeout=30)
  if run.returncode != 0 or run.timed_out:
    run.log_tail = tail[-30:]
    print("\n".join(run.log_tail), flush=True)
  print(run.summary(), flush=True)
  return run


def _table(runs: list[Run]) -> str:
  stages = []
  for run in runs:
    stages += [s for s in run.compiled if s not in stages]
  head = ["run", "exit", "total s", "1st line s", "1st step s"]
  head += [f"{s} compile s" for s in stages]
  head += ["cache files", "new", "cache MB"]
  rows = [head]
  for run in runs:
    row = [
      run.name,
      str(run.returncode) + (" (timeout)" if run.timed_out else ""),
      _secs(run.seconds),
      _secs(run.first_line_s),
      _secs(run.first_step_s),
    ]
    row += [_secs(run.compiled.get(s)) for s in stages]
    row += [str(run.cache_files), str(run.cache_new)]
    row += [f"{run.cache_bytes / 1e6:.1f}"]
    rows.append(row)
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  return "\n".join(
    "  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows
  )


def _version(name: str) -> str:
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return "absent"


def main(argv=None) -> int:
  args = parse_args(argv)
  overrides = config_overrides(args)
  # JAX is not imported here: on a GPU it would take the children's memory.
  header = {
    "python": args.python,
    "host": platform.node(),
    "cpu_count": os.cpu_count(),
    "load_average_1min": os.getloadavg()[0],
    "jax": _version("jax"),
    "jaxlib": _version("jaxlib"),
    "config": args.config,
    "overrides": overrides,
    "stop_at": args.stop_at,
    "min_compile_secs": args.min_compile_secs,
  }
  print("== start_time: main.py start-up with and without the cache")
  for key, value in header.items():
    print(f"  {key}: {value}")
  root = tempfile.mkdtemp(prefix="start_time_", dir=args.dir or None)
  cache = os.path.join(root, "jax_cache")
  xdg = os.path.join(root, "xdg_cache")
  os.makedirs(xdg)
  env = child_env(xdg, args.min_compile_secs)

  def command(workdir: str, cache_setting: str) -> list[str]:
    return [
      args.python,
      "main.py",
      f"--config={args.config}",
      f"--workdir={workdir}",
      *overrides,
      f"--config.compilation_cache_dir={cache_setting}",
    ]

  work_a = os.path.join(root, "run_a")
  plan = [
    ("cold", work_a, cache, re.compile(args.stop_at)),
    ("warm", os.path.join(root, "run_b"), cache, None),
    ("resume", work_a, cache, None),
  ]
  if not args.no_cache_off:
    plan.append(("cache_off", os.path.join(root, "run_c"), "", None))
  runs: list[Run] = []
  try:
    for name, workdir, setting, stop_at in plan:
      run = Run(name, workdir, command(workdir, setting))
      run_main(run, env, args.timeout, stop_at)
      before = runs[-1].cache_files if runs else 0
      run.cache_files, run.cache_bytes = folder_files(cache)
      run.cache_new = run.cache_files - before
      runs.append(run)
      if run.returncode != 0:
        print(f"{name}: exit {run.returncode}; the runs after it are off.")
        break
    # The default cache's folder: other libraries (matplotlib) may write
    # beside it.
    xdg_files, _ = folder_files(os.path.join(xdg, "aikd_jax"))
  finally:
    if args.keep:
      print(f"kept: {root}")
    else:
      shutil.rmtree(root, ignore_errors=True)

  print("\n== summary (seconds from process start, times read here)")
  print(_table(runs))
  for run in runs:
    print(run.summary())
  notes = []
  by_name = {run.name: run for run in runs}
  cold, warm = by_name.get("cold"), by_name.get("warm")
  if cold is not None and cold.signal_sent_s is None:
    notes.append("run 1 never met --stop_at: run 3 resumed nothing")
  elif cold is not None and cold.stopped is None:
    notes.append("run 1 ended before the SIGTERM was handled")
  resume = by_name.get("resume")
  if resume is not None and not resume.resumed:
    notes.append("run 3 logged no 'resumed from step' line")
  if cold is not None and cold.cache_files == 0:
    notes.append("the cache is empty after run 1: it was not used")
  if xdg_files:
    notes.append(f"{xdg_files} files in the default cache folder")
  for note in notes:
    print(f"warning: {note}")
  for label, run in (("second start", warm), ("resume start", resume)):
    if cold and run and cold.first_step_s and run.first_step_s:
      print(
        f"{label}: {run.first_step_s:.1f} s to first step vs "
        f"{cold.first_step_s:.1f} s cold "
        f"({cold.first_step_s / run.first_step_s:.1f} x)"
      )
  if args.out:
    payload = {
      "header": header,
      "runs": [dataclasses.asdict(run) for run in runs],
      "xdg_cache_files": xdg_files,
      "warnings": notes,
    }
    with open(args.out, "w") as f:
      json.dump(payload, f, indent=2)
    print(f"wrote {args.out}")
  ok = len(runs) == len(plan) and all(r.returncode == 0 for r in runs)
  return 0 if ok else 1


if __name__ == "__main__":
  sys.exit(main())
