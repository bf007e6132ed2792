"""Resuming main.py: kills, signals, stage-aware reruns, config memory, NaN.

Every test drives `main.py` in a subprocess on the shortened digits demo
(e2e_util.SHORT_DIGITS: 2 teacher epochs, 3 student epochs, 22 steps per
epoch) and compares what a stopped-and-resumed run leaves behind with one
uninterrupted run of the same command (the `reference` fixture): every
array of the final checkpoints of all three stages, bit for bit, and the
results files.

The stops share one workdir (the `stopped_run` fixture) because each run
costs ~15-25 s of JIT compilation: kill -9 in stage 1, during a checkpoint
save, in stage 2 and in stage 3, SIGINT during an end-of-epoch evaluation and
SIGTERM mid-epoch, each followed by a rerun of the same command. The
fixture only records; the tests below judge one aspect each.

Some tests start from a copy of the reference run's finished `teacher` and
`teacher_logits` folders and config.json: exactly the workdir a run stopped
right after stage 2 leaves behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import signal
import time

import e2e_util as u
import numpy as np
import pytest

# Every test here runs main.py in a subprocess.
pytestmark = pytest.mark.slow

FLAGS = u.SHORT_DIGITS
SPE = u.STEPS_PER_EPOCH
TEACHER_STEPS = u.TEACHER_EPOCHS * SPE
STUDENT_STEPS = u.STUDENT_EPOCHS * SPE
SEED = 20251125  # the stop moments are random, and reproducible
# The student's progress lines, told apart from the teacher's.
STUDENT_MARK = "] student epoch"
EPOCH_LINE = r"(teacher|student) epoch \d+/\d+ done in "
STEP_LINE = u.STEP_LINE_PATTERN
_STOP_MESSAGE = (
  r"(?P<signal>SIG\w+) received: saved a checkpoint at step "
  r"(?P<step>\d+) of the (?P<stage>\w+) stage\. Rerun the same "
  r"command with the same --workdir to resume\."
)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
  """The uninterrupted run every resumed run must reproduce."""
  workdir = str(tmp_path_factory.mktemp("reference") / "run")
  run = u.run_main(workdir, *FLAGS)
  assert run.returncode == 0, run.tail()
  assert u.checkpoint_steps(workdir, "student")[-1] == STUDENT_STEPS
  return workdir


@pytest.fixture(scope="module")
def reference_arrays(reference) -> dict[str, np.ndarray]:
  return u.final_arrays(reference)


def _after_stage2(reference: str, workdir: str) -> str:
  """A workdir holding the reference run's finished stages 1 and 2."""
  return u.copy_workdir(
    reference, workdir, stages=("teacher", "teacher_logits")
  )


def _assert_same_as_reference(
  workdir: str, reference: str, reference_arrays: dict
) -> None:
  assert not u.tmp_checkpoint_dirs(workdir)
  diffs = u.bitwise_differences(u.final_arrays(workdir), reference_arrays)
  assert not diffs, "final checkpoints differ from the reference:\n" + (
    "\n".join(diffs[:30])
  )
  # The comparison covers every array the requirement names.
  names = " ".join(reference_arrays)
  for part in (
    "student['student']['params']",
    "student['student']['batch_stats']",
    "student['student']['opt_state']",
    "student['discriminator']['params']",
    "student['discriminator']['opt_state']",
    "student['prediction_bank']",
    "teacher['student']['params']",
    "teacher_logits['teacher_bank']",
  ):
    assert part in names, part
  # The results files: everything but the per-epoch training-loss means,
  # which a separate test compares.
  assert _without_train_means(u.comparable_results(workdir)) == (
    _without_train_means(u.comparable_results(reference))
  )


def _without_train_means(results: dict) -> dict:
  results = json.loads(json.dumps(results))
  for stage in results.values():
    for entry in stage.get("history", []):
      entry.pop("train", None)
  return results


def _train_means(results: dict) -> dict:
  return {
    stage: [entry["train"] for entry in payload.get("history", [])]
    for stage, payload in results.items()
  }


def _expected_resume_lines(workdir: str) -> list[str]:
  """What a rerun must log, given the workdir it starts from."""
  expected = []
  for stage in u.STAGES:
    if u.stage_complete(workdir, stage):
      expected.append(f"{stage}: finished earlier")
      continue
    steps = u.checkpoint_steps(workdir, stage)
    if steps and stage != "teacher_logits":
      expected.append(f"{stage}: resumed from step {steps[-1]} ")
    break
  return expected


# --- 1-2. One workdir, stopped six times ------------------------------------


@dataclasses.dataclass
class Stop:
  """One run of the chain and what stopped it."""

  kind: str  # the planned moment
  how: str  # SIGKILL, SIGTERM, SIGINT, or "" (ran to its end)
  target: int | None  # the logged step that triggered the stop
  delay: float  # seconds between the trigger and the signal
  expected_lines: list[str]  # stage-aware lines the run had to log
  run: u.Finished = None
  hits: tuple[str, ...] = ()  # what the stop actually hit (judged after)
  stopped_at: int | None = None  # the step a SIGTERM/SIGINT stop names
  latest_after: dict = None  # latest checkpoint step per stage afterwards
  complete_after: dict = None  # per stage: results.json says finished
  progress_after: dict | None = None  # the student's latest `progress`
  resumed_s: float | None = None  # start -> "resumed from step" line
  first_step_s: float | None = None  # start -> first step log after it


# (moment, signal). Order matters: each run resumes the previous one.
PLAN = (
  ("stage1_train", signal.SIGKILL),
  ("checkpoint_save", signal.SIGKILL),
  ("stage2", signal.SIGKILL),
  ("epoch_end_eval", signal.SIGINT),
  ("stage3_train", signal.SIGKILL),
  ("mid_epoch", signal.SIGTERM),
  ("final", None),
)


def _what_was_hit(
  workdir: str, stop: Stop, sent: bool, sig, tmp_before: set[str]
) -> tuple[str, ...]:
  """The phases a stop landed in, judged from the workdir it left.

  A kill can land in two at once: checkpoints are saved asynchronously, so
  a kill during training may also cut a save short.
  """
  if not sent:
    return ("ran to its end",)
  if sig != signal.SIGKILL:
    return (f"{sig.name} handled at step {stop.stopped_at}",)
  hits = []
  if set(u.tmp_checkpoint_dirs(workdir)) - tmp_before:
    hits.append("checkpoint_save")
  lines = stop.run.output.splitlines()
  if not u.stage_complete(workdir, "teacher"):
    trained = u.logged_steps(lines, exclude=STUDENT_MARK)
    hits.append("stage1_train" if trained else "stage1_startup")
  elif not u.stage_complete(workdir, "teacher_logits"):
    hits.append("stage2")
  elif not u.stage_complete(workdir, "student"):
    trained = u.logged_steps(lines, marker=STUDENT_MARK)
    hits.append("stage3_train" if trained else "stage3_startup")
  else:
    hits.append("after the end")
  return tuple(hits)


def _stop_once(workdir: str, kind: str, sig, rng: random.Random) -> Stop:
  tmp_before = set(u.tmp_checkpoint_dirs(workdir))
  bank_dir = os.path.join(workdir, "teacher_logits", "checkpoints")
  bank_dir_before = os.path.isdir(bank_dir)
  stop = Stop(
    kind=kind,
    how=sig.name if sig else "",
    target=None,
    delay=0.0,
    expected_lines=_expected_resume_lines(workdir),
  )
  proc = u.MainProcess(workdir, *FLAGS)
  student = lambda: u.logged_steps(proc.snapshot(), marker=STUDENT_MARK)
  if kind == "stage1_train":
    # In epoch 2, so the rerun resumes stage 1 from its step-22 checkpoint.
    stop.target = rng.randrange(SPE + 2, TEACHER_STEPS - 2)
    stop.delay = rng.uniform(0, 0.01)
    trigger = lambda: any(
      s >= stop.target
      for s in u.logged_steps(proc.snapshot(), exclude=STUDENT_MARK)
    )
  elif kind == "checkpoint_save":
    trigger = lambda: bool(set(u.tmp_checkpoint_dirs(workdir)) - tmp_before)
  elif kind == "stage2":
    # Stage 2 opens its checkpoint folder first, then needs 0.2-1 s (eval-
    # mode pass over the train split, the save, results.json): less with
    # its program in the compilation cache, so the kill follows quickly.
    stop.delay = rng.uniform(0, 0.05)
    trigger = lambda: not bank_dir_before and os.path.isdir(bank_dir)
  elif kind == "epoch_end_eval":
    # Step 22's losses are logged just before epoch 1's test evaluation
    # (~0.25 s with its first-use compilation) and the epoch's checkpoint;
    # the loop looks for a stop right after each step, so this one is seen
    # after step 23.
    stop.target = SPE
    trigger = lambda: SPE in student()
  elif kind == "stage3_train":
    stop.target = rng.randrange(SPE + 2, 2 * SPE - 1)
    stop.delay = rng.uniform(0, 0.01)
    trigger = lambda: any(s >= stop.target for s in student())
  elif kind == "mid_epoch":
    stop.target = rng.randrange(2 * SPE + 1, 2 * SPE + 10)
    trigger = lambda: any(s >= stop.target for s in student())
  else:
    trigger = lambda: False
  fired = proc.wait_until(trigger, timeout=300)
  if fired and stop.delay:
    time.sleep(stop.delay)
  sent = fired and sig is not None and proc.send(sig)
  stop.run = proc.finish()
  stop.resumed_s = proc.first_time(r"resumed from step")
  if stop.resumed_s is not None:
    stop.first_step_s = proc.first_time(STEP_LINE, after=stop.resumed_s)
  stop.latest_after = {
    s: (u.checkpoint_steps(workdir, s) or [None])[-1] for s in u.STAGES
  }
  stop.complete_after = {s: u.stage_complete(workdir, s) for s in u.STAGES}
  message = re.search(_STOP_MESSAGE, stop.run.output)
  if message:
    stop.stopped_at = int(message["step"])
  stop.hits = _what_was_hit(workdir, stop, sent, sig, tmp_before)
  if sig in (signal.SIGTERM, signal.SIGINT) and stop.latest_after["student"]:
    _, stop.progress_after = u.load_checkpoint(workdir, "student")
  return stop


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> tuple[str, list[Stop]]:
  """One workdir run with every stop of PLAN, then to its end."""
  rng = random.Random(SEED)
  workdir = str(tmp_path_factory.mktemp("stopped") / "run")
  stops = []
  for kind, sig in PLAN:
    stop = _stop_once(workdir, kind, sig, rng)
    stops.append(stop)
    timing = (
      f"; 'resumed from step' at {stop.resumed_s:.1f}s, first step "
      f"logged at {stop.first_step_s or float('nan'):.1f}s"
      if stop.resumed_s is not None
      else ""
    )
    print(
      f"\n{kind}: {stop.how or 'no signal'} -> {'+'.join(stop.hits)} "
      f"(target {stop.target}, delay {stop.delay:.3f}s), rc "
      f"{stop.run.returncode}, {stop.run.seconds:.1f}s, latest "
      f"checkpoints {stop.latest_after}{timing}"
    )
  return workdir, stops


def _stop(stops: list[Stop], kind: str) -> tuple[Stop, Stop]:
  """The stop of `kind` and the run after it."""
  index = [s.kind for s in stops].index(kind)
  return stops[index], stops[index + 1]


def test_kill9_landed_in_every_phase(stopped_run):
  _, stops = stopped_run
  kills = [s for s in stops if s.how == "SIGKILL"]
  hits = {hit for s in kills for hit in s.hits}
  required = {"stage1_train", "checkpoint_save", "stage2", "stage3_train"}
  assert required <= hits, [(s.kind, s.hits) for s in kills]
  for stop in kills:
    if stop.hits != ("ran to its end",):
      assert stop.run.returncode == -signal.SIGKILL, stop.run.tail()


def test_every_rerun_resumes_in_the_stage_it_stopped_in(stopped_run):
  _, stops = stopped_run
  for stop in stops:
    assert "Traceback" not in stop.run.output, (stop.kind, stop.run.tail())
    for line in stop.expected_lines:
      assert line in stop.run.output, (stop.kind, line, stop.run.tail())
  # A stop inside stage 3 reruns no earlier stage.
  for stop in stops[stops.index(_stop(stops, "epoch_end_eval")[1]) :]:
    assert not re.search(r"teacher epoch \d", stop.run.output), stop.kind
    assert "teacher_logits: finished earlier" in stop.run.output, stop.kind


def test_sigterm_mid_epoch_saves_a_checkpoint_and_exits_0(stopped_run):
  _, stops = stopped_run
  stop, rerun = _stop(stops, "mid_epoch")
  run = stop.run
  assert run.returncode == 0, run.tail()
  message = re.search(_STOP_MESSAGE, run.output)
  assert message, run.tail()
  assert message["signal"] == "SIGTERM" and message["stage"] == "student"
  step = stop.stopped_at
  assert stop.target <= step < STUDENT_STEPS and step % SPE, step
  assert stop.latest_after["student"] == step  # not an epoch boundary
  assert stop.progress_after["epoch_steps"] == step % SPE
  assert len(stop.progress_after["history"]) == step // SPE
  assert not stop.complete_after["student"]
  assert f"student: resumed from step {step} " in rerun.run.output


def test_sigint_at_an_epoch_end_saves_once_and_exits_0(stopped_run):
  _, stops = stopped_run
  stop, rerun = _stop(stops, "epoch_end_eval")
  run = stop.run
  assert run.returncode == 0, run.tail()
  assert "Traceback" not in run.output, run.tail()
  message = re.search(_STOP_MESSAGE, run.output)
  assert message, run.tail()
  assert message["signal"] == "SIGINT" and message["stage"] == "student"
  assert SPE <= stop.stopped_at <= SPE + 2, stop.stopped_at
  assert stop.latest_after["student"] == stop.stopped_at
  assert len(stop.progress_after["history"]) == stop.stopped_at // SPE
  assert f"student: resumed from step {stop.stopped_at} " in rerun.run.output


def test_stop_signal_before_an_epoch_ending_step_saves_once(tmp_path):
  """A stop seen at a step that also ends an epoch saves that step once.

  One step per epoch (batch 1024 of 1438 examples; `ce`, so no teacher):
  SIGINT arrives while the step compiles, the loop sees it after step 1,
  which ends epoch 0 and is checkpointed as such.
  """
  workdir = str(tmp_path / "run")
  proc = u.MainProcess(
    workdir,
    "--config.method=ce",
    "--config.num_epochs=3",
    "--config.batch_size=1024",
    "--config.log_every_steps=1",
  )
  proc.wait_until(
    lambda: any(
      "teacher and teacher_logits: skipped" in line for line in proc.snapshot()
    ),
    timeout=300,
  )
  assert proc.send(signal.SIGINT)
  run = proc.finish()
  assert run.returncode == 0, run.tail()
  assert "Traceback" not in run.output, run.tail()
  message = re.search(_STOP_MESSAGE, run.output)
  assert message, run.tail()
  assert message["signal"] == "SIGINT" and message["step"] == "1"
  assert u.checkpoint_steps(workdir, "student") == [1]
  assert not u.tmp_checkpoint_dirs(workdir)
  arrays, progress = u.load_checkpoint(workdir, "student", 1)
  assert int(arrays["['student']['step']"]) == 1
  assert len(progress["history"]) == 1 and progress["epoch_steps"] == 0


def test_stopped_run_ends_bitwise_identical_to_uninterrupted_run(
  stopped_run, reference, reference_arrays
):
  workdir, stops = stopped_run
  final = stops[-1]
  assert final.run.returncode == 0, final.run.tail()
  assert "student (ai_kd): last epoch top-1 error" in final.run.output
  _assert_same_as_reference(workdir, reference, reference_arrays)


def test_stopped_run_logs_the_same_epoch_training_means(stopped_run, reference):
  """results.json's per-epoch training-loss means, to the last bit.

  They are sums over each epoch's steps; a resumed run must add the same
  numbers in the same way, or its results file tells another story.
  """
  workdir, stops = stopped_run
  assert stops[-1].run.returncode == 0, stops[-1].run.tail()
  got = _train_means(u.comparable_results(workdir))
  want = _train_means(u.comparable_results(reference))
  differing = [
    f"{stage} epoch {epoch} {name}: {got[stage][epoch][name]!r} vs "
    f"{want[stage][epoch][name]!r}"
    for stage in want
    for epoch in range(len(want[stage]))
    for name in want[stage][epoch]
    if got[stage][epoch].get(name) != want[stage][epoch][name]
  ]
  assert not differing, "\n".join(differing)


# --- 3. Stage-aware reruns --------------------------------------------------


def _digests_without_events(workdir: str) -> dict[str, str]:
  """The workdir's files but its logs: each run adds an event file per
  stage and appends to log.txt."""
  return {
    k: v
    for k, v in u.file_digests(workdir).items()
    if "events.out.tfevents" not in k and k != "log.txt"
  }


def test_rerun_of_a_finished_run_skips_every_stage(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  before = _digests_without_events(workdir)
  run = u.run_main(workdir, *FLAGS)
  assert run.returncode == 0, run.tail()
  for line in (
    "teacher: finished earlier; loading its final state.",
    "teacher_logits: finished earlier; loading the bank.",
    "student: finished earlier; nothing to do.",
  ):
    assert line in run.output, run.tail()
  assert not run.lines(EPOCH_LINE), "a finished stage trained again"
  assert not run.lines(STEP_LINE)
  assert "student (ai_kd): last epoch top-1 error" in run.output
  assert _digests_without_events(workdir) == before


def test_rerun_after_a_kill_between_bank_checkpoint_and_results_file(
  reference, tmp_path
):
  """A kill after stage 2's checkpoint is committed, before results.json.

  _teacher_logits_stage saves the bank, waits for the save, then writes
  results.json; a kill -9 between the two leaves a finished bank checkpoint
  and no results file. That workdir is built here from the reference run
  (delete teacher_logits/results.json; no student folder yet). The rerun
  must get past stage 2 with the same bank.
  """
  workdir = _after_stage2(reference, str(tmp_path / "run"))
  os.remove(os.path.join(workdir, "teacher_logits", "results.json"))
  results = os.path.join(workdir, "teacher_logits", "results.json")
  proc = u.MainProcess(workdir, *FLAGS)
  # Stage 2 is what is under test; stage 3 would cost ~20 s to compile.
  reached = proc.wait_until(lambda: os.path.exists(results), timeout=300)
  u.kill_if_running(proc)
  run = proc.finish()
  assert reached and "Traceback" not in run.output, run.tail()
  bank, _ = u.load_checkpoint(workdir, "teacher_logits")
  reference_bank, _ = u.load_checkpoint(reference, "teacher_logits")
  assert not u.bitwise_differences(bank, reference_bank)


# --- 4. The workdir remembers its config ------------------------------------


def test_resume_with_result_changing_fields_is_refused(reference, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  before = u.file_digests(workdir)
  run = u.run_main(
    workdir,
    *FLAGS,
    "--config.lambda_adv=0.2",
    "--config.seed=1",
    "--config.method=ps_kd",
    "--config.batch_size=32",
    "--config.lr_decay_epochs=(1,2)",
    "--config.model=preact_resnet18",
  )
  assert run.returncode not in (0, None), run.tail()
  assert "error: The workdir" in run.output, run.tail()
  assert "holds a run with a different config" in run.output
  fields = (
    "  lambda_adv: None (saved) -> 0.2 (now)",
    "  seed: 0 (saved) -> 1 (now)",
    "  method: 'ai_kd' (saved) -> 'ps_kd' (now)",
    "  batch_size: 64 (saved) -> 32 (now)",
    "  lr_decay_epochs: [15, 23] (saved) -> [1, 2] (now)",
    "  model: 'tiny_cnn' (saved) -> 'preact_resnet18' (now)",
  )
  for field in fields:
    assert field in run.output, (field, run.tail())
  listed = set(
    re.findall(r"^  (\w+): .* \(saved\) -> .* \(now\)$", run.output, flags=re.M)
  )
  assert listed == {f.split(":")[0].strip() for f in fields}, listed
  assert "use a new --workdir" in run.output
  assert not run.lines(EPOCH_LINE)
  assert u.file_digests(workdir) == before


def test_resume_on_another_device_count_is_refused(reference, tmp_path):
  """The device count changes the result (rows per device, per-device
  batches and shuffles), so a run started on 1 device and resumed on 2
  cannot end as either uninterrupted run would: the rerun is refused before
  any compute, with the count listed like a config field.
  """
  workdir = _after_stage2(reference, str(tmp_path / "run"))
  before = u.file_digests(workdir)
  proc = u.MainProcess(workdir, *FLAGS, num_devices=2)
  run = proc.finish()
  assert run.returncode != 0, run.tail()
  assert "num_devices: 1 (saved) -> 2 (now)" in run.output, run.tail()
  assert not run.lines(EPOCH_LINE)
  assert u.file_digests(workdir) == before


def test_resume_with_neutral_fields_and_more_epochs_is_accepted(
  reference, tmp_path
):
  """Bookkeeping fields change freely; num_epochs 3 -> 4 trains epoch 4."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  teacher_before = {
    k: v
    for k, v in _digests_without_events(workdir).items()
    if k.startswith("teacher")
  }
  run = u.run_main(
    workdir,
    *FLAGS,
    "--config.log_every_steps=7",
    "--config.eval_batch_size=256",
    "--config.checkpoint_every_epochs=2",
    "--config.keep_checkpoints=3",
    "--config.num_epochs=4",
  )
  assert run.returncode == 0, run.tail()
  for note in (
    "log_every_steps: 5 (saved) -> 7 (now)",
    "eval_batch_size: 512 (saved) -> 256 (now)",
    "checkpoint_every_epochs: 1 (saved) -> 2 (now)",
    "keep_checkpoints: 2 (saved) -> 3 (now)",
    "num_epochs: 3 (saved) -> 4 (now)",
  ):
    assert note in run.output, (note, run.tail())
  assert "Config change accepted on resume" in run.output
  assert f"student: resumed from step {STUDENT_STEPS} " in run.output
  # config.json stays as the run was started; the change is listed.
  with open(os.path.join(workdir, "config.json")) as f:
    started = json.load(f)
  assert started["log_every_steps"] == 5 and started["num_epochs"] == 3
  with open(os.path.join(workdir, "config_changes.json")) as f:
    (change,) = json.load(f)
  assert change["fields"]["num_epochs"] == [3, 4]
  assert change["fields"]["log_every_steps"] == [5, 7]
  student = u.read_results(workdir, "student")
  assert student["num_epochs"] == 4
  assert [h["epoch"] for h in student["history"]] == [0, 1, 2, 3]
  reference_history = u.read_results(reference, "student")["history"]
  assert student["history"][:3] == reference_history
  assert u.checkpoint_steps(workdir, "student")[-1] == 4 * SPE
  teacher_after = {
    k: v
    for k, v in _digests_without_events(workdir).items()
    if k.startswith("teacher")
  }
  assert teacher_after == teacher_before


def test_fewer_epochs_than_reached_are_refused_and_change_nothing(
  reference, tmp_path
):
  """Also on a finished workdir, which would otherwise report its results."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  before = u.file_digests(workdir)
  for flag, message in (
    (
      "--config.num_epochs=2",
      "error: The student stage already reached epoch 3; num_epochs=2 "
      "would end before it. Rerun with --config.num_epochs=3 or more",
    ),
    (
      "--config.teacher_num_epochs=1",
      "error: The teacher stage already reached epoch 2; "
      "teacher_num_epochs=1 would end before it.",
    ),
  ):
    run = u.run_main(workdir, *FLAGS, flag)
    assert run.returncode == 2, run.tail()
    assert message in run.output, run.tail()
    assert "Traceback" not in run.output
    assert not run.lines(EPOCH_LINE)
    assert u.file_digests(workdir) == before


def test_lost_teacher_checkpoints_are_one_line_and_its_remedy_works(
  reference, reference_arrays, tmp_path
):
  """teacher/checkpoints deleted after the teacher finished: the error says
  which folder to remove; doing so retrains the same teacher."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "teacher", "checkpoints"))
  before = u.file_digests(workdir)
  run = u.run_main(workdir, *FLAGS)
  assert run.returncode == 2, run.tail()
  assert "Traceback" not in run.output, run.tail()
  (error,) = run.lines(r"^error: ")
  teacher_dir = os.path.join(workdir, "teacher")
  assert f"{teacher_dir}/checkpoints does not exist" in error, error
  assert f"remove the folder {teacher_dir} and rerun" in error, error
  assert u.file_digests(workdir) == before
  shutil.rmtree(teacher_dir)
  run = u.run_main(workdir, *FLAGS)
  assert run.returncode == 0, run.tail()
  assert "teacher_logits: finished earlier; loading the bank." in run.output
  assert "student: finished earlier; nothing to do." in run.output
  teacher, _ = u.load_checkpoint(workdir, "teacher")
  assert not u.bitwise_differences(
    {f"teacher{k}": v for k, v in teacher.items()},
    {k: v for k, v in reference_arrays.items() if k.startswith("teacher[")},
  )


def test_a_teacher_checkpoint_from_a_run_with_other_optimiser_settings(
  reference, tmp_path
):
  """Only the teacher's model variables are read, so the optimiser settings
  of either run (here the gradient clip) do not matter."""
  teacher_dir = os.path.join(reference, "teacher", "checkpoints")
  proc = u.MainProcess(
    str(tmp_path / "run"),
    *FLAGS,
    "--config.grad_clip_norm=5",
    f"--config.teacher_checkpoint={teacher_dir}",
  )
  loaded = f"teacher: loaded {teacher_dir} step {TEACHER_STEPS}."
  reached = proc.wait_until(
    lambda: any(loaded in line for line in proc.snapshot()), timeout=300
  )
  u.kill_if_running(proc)
  run = proc.finish()
  assert reached, run.tail()
  assert "error:" not in run.output and "Traceback" not in run.output


# --- 6. NaN / Inf -----------------------------------------------------------


def _non_finite_error(output: str) -> dict | None:
  """The stop message's term, step, epoch and stage, if it names them."""
  for line in output.splitlines():
    if not line.startswith("error: ") or not re.search(
      r"\b(nan|inf|not finite)\b", line, flags=re.I
    ):
      continue
    term = re.search(r"\b(loss/\w+)", line)
    step = re.search(r"\bstep (\d+)", line)
    epoch = re.search(r"\bepoch (\d+)", line)
    stage = re.search(r"\bof the (\w+) stage", line)
    if term and step and epoch and stage:
      return dict(
        term=term[1],
        step=int(step[1]),
        epoch=int(epoch[1]),
        stage=stage[1],
        line=line,
      )
  return None


def test_non_finite_loss_stops_without_saving_the_bad_state(
  reference, tmp_path
):
  """The learning rate jumps x1e30 at epoch 1: epoch 0 trains normally and
  is checkpointed at step 22, a loss term turns NaN a few steps later."""
  workdir = str(tmp_path / "run")
  run = u.run_main(
    workdir,
    *FLAGS,
    "--config.lr_decay_epochs=(1,)",
    "--config.lr_decay_factor=1e30",
  )
  assert run.returncode not in (0, None), run.tail()
  assert "Traceback" not in run.output, run.tail()
  error = _non_finite_error(run.output)
  assert error, run.tail()
  step, epoch = error["step"], error["epoch"]
  assert error["stage"] == "teacher"
  assert SPE <= step < 2 * SPE and epoch == step // SPE == 1, error["line"]
  assert "Nothing after the last checkpoint was saved" in run.output
  # The last good checkpoint is still the latest, and it is good: the very
  # state the reference run saved after epoch 0 (same schedule until then).
  assert u.checkpoint_steps(workdir, "teacher") == [SPE]
  assert not u.tmp_checkpoint_dirs(workdir)
  assert not u.stage_complete(workdir, "teacher")
  assert not os.path.exists(os.path.join(workdir, "student"))
  arrays, progress = u.load_checkpoint(workdir, "teacher", SPE)
  assert all(
    np.isfinite(v).all() for v in arrays.values() if v.dtype.kind == "f"
  )
  reference_arrays, reference_progress = u.load_checkpoint(
    reference, "teacher", SPE
  )
  assert not u.bitwise_differences(arrays, reference_arrays)
  assert progress == reference_progress


def test_divergence_first_seen_at_an_epoch_end_stops_cleanly(tmp_path):
  """One step per epoch (batch 1024 of 1438 examples), lr x1e30 at epoch 1.

  Step 2's update makes the weights ~1e27 (finite), step 3's update makes
  them non-finite; that shows first in epoch 3's test evaluation, before any
  loss term is NaN. The run must still stop with a message naming the step
  and epoch (no traceback), and no checkpoint may hold non-finite arrays.
  """
  workdir = str(tmp_path / "run")
  run = u.run_main(
    workdir,
    "--config.num_epochs=3",
    "--config.teacher_num_epochs=3",
    "--config.log_every_steps=1",
    "--config.batch_size=1024",
    "--config.lr_decay_epochs=(1,)",
    "--config.lr_decay_factor=1e30",
  )
  for step in u.checkpoint_steps(workdir, "teacher"):
    arrays, _ = u.load_checkpoint(workdir, "teacher", step)
    bad = [k for k, v in arrays.items() if not np.isfinite(v).all()]
    assert not bad, (step, bad)
  assert not u.stage_complete(workdir, "teacher")
  assert run.returncode not in (0, None), run.tail()
  assert "Traceback" not in run.output, run.tail()
  errors = run.lines(r"^error: ")
  assert (
    errors
    and re.search(r"step \d+", errors[-1])
    and re.search(r"epoch \d+", errors[-1])
  ), run.tail()
