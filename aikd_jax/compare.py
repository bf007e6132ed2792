"""Compares methods over seeds with one shared teacher per seed.

  python -m aikd_jax.compare --config=configs/cifar100.py \
      --methods=ce,ls,tf_kd,ps_kd,ai_kd --seeds=3 --workdir=DIR

For each seed s (config.seed = the config's seed + s), the teacher (`ce`) is
trained once in DIR/teachers/seed{s} when any method needs a pre-trained
model, then every method runs in DIR/runs/{method}/seed{s} through the same
`train.train_and_evaluate` as main.py; the methods that use a teacher load
DIR/teachers/seed{s}/teacher/checkpoints instead of training their own.
Finally DIR/report/ gets the table and figures (aikd_jax/report.py).

Every run keeps its own checkpoints and results, so rerunning the same
command skips the finished runs and resumes the interrupted one. DIR may be
moved or copied between runs: a run that recorded its seed's teacher under
DIR's old place takes it from the new one (a change its config_changes.json
records).

DIR holds config.json (the base config; every check of a resumed run applies
to it), comparison.json (the latest command's methods and seeds: what the
report covers), teachers/, runs/ and report/. The objective's weights
(alpha_T, label_smoothing, lambda_det, lambda_adv, lambda_cls) cannot be
overridden here: an override would apply to every method and turn the
baselines into others.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import sys
import time
from typing import Any, Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from aikd_jax import cli
from aikd_jax import compilation_cache
from aikd_jax import objective as objective_lib
from aikd_jax import report as report_lib
from aikd_jax import results as results_lib
from aikd_jax import run_config
from aikd_jax import train
from aikd_jax import workdir_lock

COMPARISON_FILE = report_lib.COMPARISON_FILE


@dataclasses.dataclass(frozen=True)
class Run:
  """One (method, seed) student run of the comparison."""

  method: str
  seed_index: int
  seed: int
  workdir: str  # relative to the comparison's workdir
  teacher: str | None  # the seed's teacher workdir (relative); None: unused


def parse_methods(methods: Sequence[str]) -> list[str]:
  """Known, de-duplicated method names in the given order.

  Raises:
    run_config.ConfigError: empty list or unknown name.
  """
  names = [m.strip() for m in methods if m.strip()]
  if not names:
    raise run_config.ConfigError(
      "--methods is empty; name one or more of "
      f"{', '.join(objective_lib.METHODS)}."
    )
  unknown = [m for m in names if m not in objective_lib.METHODS]
  if unknown:
    raise run_config.ConfigError(
      f"Unknown method(s) in --methods: {', '.join(unknown)}; choose from "
      f"{', '.join(objective_lib.METHODS)}."
    )
  return list(dict.fromkeys(names))


def teacher_dir(seed_index: int) -> str:
  return os.path.join("teachers", f"seed{seed_index}")


def run_dir(method: str, seed_index: int) -> str:
  return os.path.join("runs", method, f"seed{seed_index}")


def plan_runs(
  config: ml_collections.ConfigDict, methods: Sequence[str], num_seeds: int
) -> list[Run]:
  """Every run, seed-major; a run's teacher is None if its method has none."""
  runs = []
  for s in range(num_seeds):
    for method in methods:
      objective = objective_lib.resolve_objective(
        method,
        {
          "temperature": config.temperature,
          "teacher_mode": config.teacher_mode,
        },
      )
      runs.append(
        Run(
          method=method,
          seed_index=s,
          seed=config.seed + s,
          workdir=run_dir(method, s),
          teacher=teacher_dir(s) if objective.uses_teacher else None,
        )
      )
  return runs


def teacher_config(
  config: ml_collections.ConfigDict, seed: int
) -> ml_collections.ConfigDict:
  """The shared teacher's config: `ce` (what stage 1 trains), this seed."""
  result = copy.deepcopy(config)
  result.method = "ce"
  result.seed = seed
  result.teacher_checkpoint = ""
  return result


def student_config(
  config: ml_collections.ConfigDict, run: Run, workdir: str
) -> ml_collections.ConfigDict:
  """The run's config: its method and seed, and its seed's teacher."""
  result = copy.deepcopy(config)
  result.method = run.method
  result.seed = run.seed
  result.teacher_checkpoint = (
    os.path.join(
      os.path.abspath(workdir), run.teacher, "teacher", train.CHECKPOINT_DIR
    )
    if run.teacher
    else ""
  )
  return result


def moved_teachers(
  config: ml_collections.ConfigDict, workdir: str, runs: Sequence[Run]
) -> dict[str, list[str]]:
  """Run folder -> [recorded, current] teacher_checkpoint, for the runs
  whose recorded teacher is their seed's teacher of this comparison at the
  place the comparison was moved (or copied) from: the same
  teachers/seed{s}/teacher/checkpoints below another folder."""
  moved = {}
  for run in runs:
    if not run.teacher:
      continue
    folder = os.path.join(workdir, run.workdir)
    saved = run_config.saved_config(folder)
    recorded = (saved or {}).get("teacher_checkpoint") or ""
    current = student_config(config, run, workdir).teacher_checkpoint
    tail = os.path.join(run.teacher, "teacher", train.CHECKPOINT_DIR)
    if recorded != current and recorded.endswith(os.sep + tail):
      moved[folder] = [recorded, current]
  return moved


def check_comparison(
  config: ml_collections.ConfigDict,
  workdir: str,
  methods: Sequence[str],
  num_seeds: int,
) -> tuple[list[Run], dict[str, list[str]]]:
  """Every check that must pass before anything is trained or written.

  Validates the flags, the config, the data, and each existing teacher and
  run folder against its saved config, so that a resumed comparison cannot
  fail on its last run's folder after hours of training.

  Returns:
    The planned runs, and the runs whose teacher moved with the comparison
    (`moved_teachers`).
  Raises:
    run_config.ConfigError (and the other errors cli treats as the input's
    fault) naming what to change.
  """
  methods = parse_methods(methods)
  if num_seeds < 1:
    raise run_config.ConfigError(
      f"--seeds must be at least 1, got {num_seeds}."
    )
  weights = objective_lib.METHOD_WEIGHTS
  overridden = [f for f in weights if config.get(f) is not None]
  if overridden:
    raise run_config.ConfigError(
      f"--config.{overridden[0]} would apply to every method of the "
      "comparison and turn the baselines into other methods; leave "
      f"{', '.join(weights)} unset here (run main.py for a single modified "
      "method)."
    )
  if config.teacher_checkpoint:
    raise run_config.ConfigError(
      "config.teacher_checkpoint must be empty: the comparison trains one "
      "teacher per seed (DIR/teachers/seed<s>) and points the runs at it."
    )
  train.check_config(config, workdir)
  # The comparison's own config.json: the base config the runs derive from.
  notes = run_config.compare_with_saved(
    config, workdir, ignore=frozenset({"method", run_config.OBJECTIVE_FIELD})
  )
  runs = plan_runs(config, methods, num_seeds)
  teachers = sorted(
    {(r.seed_index, r.seed, r.teacher) for r in runs if r.teacher}
  )
  for _, seed, path in teachers:
    cfg = teacher_config(config, seed)
    folder = os.path.join(workdir, path)
    notes += train.check_run_folder(cfg, folder, run_config.STUDENT_ONLY_FIELDS)
  moved = moved_teachers(config, workdir, runs)
  for run in runs:
    cfg = student_config(config, run, workdir)
    folder = os.path.join(workdir, run.workdir)
    # The teacher's folder may not exist yet; validate() checks it is one.
    unchecked = copy.deepcopy(cfg)
    unchecked.teacher_checkpoint = ""
    run_config.validate(unchecked)
    ignore = frozenset({"teacher_checkpoint"} if folder in moved else ())
    notes += train.check_run_folder(cfg, folder, ignore)
  notes += [
    f"  {folder}: the comparison's teacher moved from {old!r} to {new!r}"
    for folder, (old, new) in moved.items()
  ]
  for note in notes:
    logging.warning("Config change accepted on resume:%s", note)
  return runs, moved


def save_comparison(
  config: ml_collections.ConfigDict,
  workdir: str,
  methods: Sequence[str],
  num_seeds: int,
  runs: Sequence[Run],
  moved: dict[str, list[str]],
) -> None:
  """Writes DIR/config.json and DIR/comparison.json (what report reads),
  and records in each moved run's folder where its teacher is now."""
  os.makedirs(workdir, exist_ok=True)
  run_config.save(config, workdir)
  for folder, change in moved.items():
    run_config.record_changes(folder, {"teacher_checkpoint": change})
  teachers = {str(r.seed_index): r.teacher for r in runs if r.teacher}
  payload = {
    "methods": list(methods),
    "seeds": [{"index": s, "seed": config.seed + s} for s in range(num_seeds)],
    "teachers": teachers,
    "runs": [dataclasses.asdict(r) for r in runs],
    "config": json.loads(config.to_json()),
  }
  results_lib.write_json(os.path.join(workdir, COMPARISON_FILE), payload)


def _finished(folder: str, stage: str, num_epochs: int) -> bool:
  """Whether the stage finished with (at least) `num_epochs` epochs.

  The same rule as train.py's: a stage whose num_epochs was extended is not
  finished; train_and_evaluate resumes it.
  """
  return (
    results_lib.finished_results(os.path.join(folder, stage), num_epochs)
    is not None
  )


class _StopBetweenRuns(Exception):
  """SIGTERM/SIGINT outside a training stage (which handles its own)."""


class _StopOnSignal:
  """Outside a training stage, SIGTERM/SIGINT stop the comparison at once.

  Inside one, train.py's handler takes over (it saves a checkpoint and
  raises train.Preempted) and restores this one afterwards.
  """

  def __enter__(self):
    self._previous = {
      sig: signal.signal(sig, self._handle)
      for sig in (signal.SIGTERM, signal.SIGINT)
    }
    return self

  def _handle(self, signum, frame):
    del frame
    raise _StopBetweenRuns(
      f"{signal.Signals(signum).name} received between training stages: "
      "finished runs are kept and an interrupted one resumes from its last "
      "checkpoint. Rerun the same command with the same --workdir to "
      "continue."
    )

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def _say(message: str, *args) -> None:
  logging.info(message, *args)
  print(message % args, flush=True)


def run_comparison(
  config: ml_collections.ConfigDict,
  workdir: str,
  methods: Sequence[str],
  num_seeds: int,
) -> dict[str, Any]:
  """Trains (or resumes, or skips) every teacher and run; builds the report.

  Returns:
    Dict with `trained` and `skipped` (run folders), `failed` (run folder ->
    error message, for runs whose loss became non-finite; the others still
    run) and `report` (report.build_report's result, or None if no run
    finished).
  Raises:
    The input errors of check_comparison; train.Preempted after a signal.
  """
  methods = parse_methods(methods)
  run_config.check_workdir(workdir)
  # One comparison per DIR at a time; each run's own folder is locked too.
  lock = workdir_lock.WorkdirLock(workdir)
  lock.acquire()
  accepted = False
  try:
    runs, moved = check_comparison(config, workdir, methods, num_seeds)
    save_comparison(config, workdir, methods, num_seeds, runs, moved)
    accepted = True
    return _train_and_report(config, workdir, runs)
  finally:
    lock.release(undo_creation=not accepted)


def _train_and_report(
  config: ml_collections.ConfigDict, workdir: str, runs: Sequence[Run]
) -> dict[str, Any]:
  """Every teacher and run in order (resumed or skipped), then the report."""
  outcome = {"trained": [], "skipped": [], "failed": {}, "report": None}
  teacher_epochs = run_config.teacher_epochs(config)
  # One teacher per seed, trained before any of that seed's runs.
  seed_teachers = {r.seed_index: r.teacher for r in runs if r.teacher}
  done_teachers = set()
  for run in runs:
    teacher = seed_teachers.get(run.seed_index)
    if teacher and teacher not in done_teachers:
      folder = os.path.join(workdir, teacher)
      if _finished(folder, "teacher", teacher_epochs):
        _say("teacher seed%d: skipped (finished)", run.seed_index)
      else:
        _say(
          "teacher seed%d: training (ce, %d epochs) in %s",
          run.seed_index,
          teacher_epochs,
          folder,
        )
        start = time.monotonic()
        results = train.train_and_evaluate(
          teacher_config(config, run.seed), folder, teacher_only=True
        )
        _say(
          "teacher seed%d: done in %.0fs, last test top-1 error %.2f%%",
          run.seed_index,
          time.monotonic() - start,
          results["last"]["top1_err"],
        )
      done_teachers.add(teacher)
    folder = os.path.join(workdir, run.workdir)
    name = f"{run.method} seed{run.seed_index}"
    if _finished(folder, "student", config.num_epochs):
      _say("%s: skipped (finished)", name)
      outcome["skipped"].append(run.workdir)
      continue
    _say("%s: training in %s", name, folder)
    start = time.monotonic()
    try:
      results = train.train_and_evaluate(
        student_config(config, run, workdir), folder
      )
    except train.NonFiniteLossError as error:
      # A diverged method is a result too; the other runs still go ahead.
      logging.error("%s: %s", name, error)
      print(f"{name}: failed: {error}", flush=True)
      outcome["failed"][run.workdir] = str(error)
      continue
    _say(
      "%s: done in %.0fs, last test top-1 error %.2f%%, best %.2f%%",
      name,
      time.monotonic() - start,
      results["last"]["top1_err"],
      results["best"]["top1_err"],
    )
    outcome["trained"].append(run.workdir)
  try:
    outcome["report"] = report_lib.build_report(workdir)
  except report_lib.ReportError as error:
    logging.error("%s", error)
  return outcome


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  methods: Sequence[str],
  num_seeds: int,
) -> int:
  """run_comparison with cli.py's exit statuses and messages."""
  try:
    with _StopOnSignal():
      outcome = run_comparison(config, workdir, methods, num_seeds)
  except (train.Preempted, _StopBetweenRuns) as stop:
    logging.warning("%s", stop)
    print(stop, flush=True)
    return 0
  except cli.INPUT_ERRORS as error:
    return cli.input_error_status(error)
  report = outcome["report"]
  if report:
    print(
      f"Report: {report['markdown']} and {report['csv']}; figures in "
      f"{report['report_dir']}",
      flush=True,
    )
  if outcome["failed"]:
    print(
      "error: the loss became non-finite in "
      f"{', '.join(outcome['failed'])}; the report leaves them out.",
      flush=True,
    )
    return 3
  return 0


def define_flags() -> None:
  flags.DEFINE_string(
    "workdir",
    None,
    "Directory of the comparison; rerun with the same one to resume.",
  )
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Training config file; its method field is ignored (see --methods).",
    lock_config=True,
  )
  flags.DEFINE_list(
    "methods",
    "ce,ls,tf_kd,ps_kd,ai_kd",
    "Comma-separated presets of aikd_jax/objective.py.",
  )
  flags.DEFINE_integer(
    "seeds", 1, "How many seeds: config.seed, config.seed + 1, ..."
  )
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  cli.log_to_file(flags.FLAGS.workdir)
  compilation_cache.enable(flags.FLAGS.config.get("compilation_cache_dir", ""))
  sys.exit(
    run(
      flags.FLAGS.config,
      flags.FLAGS.workdir,
      flags.FLAGS.methods,
      flags.FLAGS.seeds,
    )
  )


if __name__ == "__main__":
  define_flags()
  cli.set_up_logging()
  app.run(main)
