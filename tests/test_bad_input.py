"""Bad input fails fast: a clear error, a non-zero exit, the workdir intact.

Each case runs main.py in a subprocess and checks the exit status, the
message's key words, that nothing trained (no step or epoch line; for config
and workdir errors not even the dataset was placed on the devices), that it
took seconds, and that the workdir is exactly as before: sha256 of every
file of an existing workdir, or a fresh --workdir path still absent.

Tests run as root, for whom chmod does not deny writing; the unwritable
workdirs are paths that no user can create: a path below a regular file
(ENOTDIR for everyone) and a path in /proc (procfs refuses mkdir).

The cases run two at a time (module fixture `outcomes`): each costs ~6 s of
imports, and this machine has two cores. The time bound is therefore loose;
the absence of any training line is the real proof that nothing ran.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import hashlib
import os
import re
import shutil
import signal
from typing import Callable

import e2e_util as u
import numpy as np
import pytest

# Every test here runs main.py in a subprocess.
pytestmark = pytest.mark.slow

# A student-only run (no teacher): its checkpoints sit in student/.
BASE = ("--config.method=ce",) + u.SHORT_DIGITS
SPE = u.STEPS_PER_EPOCH
# Loose on purpose (two cases at a time, a shared machine); a run that
# trains compiles for 15 s or more and logs steps, which is checked too.
FAST_S = 45.0
DATA_PLACED = r"\d+ train / \d+ test examples"


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> str:
  """A workdir stopped mid-run: SIGTERM in epoch 2 (checkpoints 22, 30+)."""
  workdir = str(tmp_path_factory.mktemp("interrupted") / "run")
  proc = u.MainProcess(workdir, *BASE)
  proc.wait_until(
    lambda: any(s >= 30 for s in u.logged_steps(proc.snapshot())), timeout=300
  )
  assert proc.send(signal.SIGTERM)
  run = proc.finish()
  assert run.returncode == 0, run.tail()
  steps = u.checkpoint_steps(workdir, "student")
  assert len(steps) == 2 and steps[0] == SPE and steps[1] % SPE, steps
  return workdir


def _largest_file(pattern: str) -> str:
  files = [f for f in glob.glob(pattern) if os.path.isfile(f)]
  return max(files, key=os.path.getsize)


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


# How each corruption case damages the latest step folder.
CORRUPTIONS: dict[str, Callable[[str], None]] = {
  # orbax writes this marker last: without it the save is partial.
  "partial_save": lambda step_dir: os.remove(
    os.path.join(step_dir, "_CHECKPOINT_METADATA")
  ),
  "truncated_array_file": lambda step_dir: _truncate(
    _largest_file(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  ),
  "truncated_progress": lambda step_dir: _truncate(
    os.path.join(step_dir, "progress", "metadata")
  ),
  # Same size, one bit off: only the checksums can tell.
  "flipped_bit": lambda step_dir: _flip_a_bit(
    _largest_file(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*"))
  ),
}


def _flip_a_bit(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x04]))


def _image_folder(root: str, fault: str) -> str:
  """A small image folder with one fault: a corrupt PNG or an empty class
  folder. Returns the path the error must name."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  for name in ("ant", "cat", "dog"):
    os.makedirs(os.path.join(root, "train", name))
    for i in range(12):
      pixels = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(
        os.path.join(root, "train", name, f"{i}.png")
      )
  if fault == "corrupt_png":
    bad = os.path.join(root, "train", "cat", "7.png")
    with open(bad, "r+b") as f:
      f.seek(40)
      f.write(b"\0" * 40)
    return bad
  empty = os.path.join(root, "train", "bee")
  os.makedirs(empty)
  return empty


@dataclasses.dataclass
class Case:
  id: str
  overrides: tuple[str, ...] = ()
  keywords: tuple[str, ...] = ()  # in the error message ({workdir}, {step_dir})
  workdir: str = "fresh"  # fresh | existing | file | under_file |
  # under_executable_file | proc | a CORRUPTIONS key
  num_devices: int | None = None
  before_data: bool = True  # the error comes before the dataset is placed
  image_folder: str = ""  # "" (digits) or a fault of _image_folder


CASES = (
  Case(
    "unknown_method",
    ("--config.method=distill_all",),
    ("Unknown method 'distill_all'", "choose one of", "ai_kd"),
  ),
  Case(
    "unknown_model",
    ("--config.model=resnet9000",),
    ("Unknown model 'resnet9000'", "tiny_cnn"),
    workdir="existing",
  ),
  Case(
    "unknown_dataset",
    ("--config.dataset=mnist",),
    ("Unknown dataset 'mnist'", "digits"),
  ),
  Case(
    "negative_lambda_adv",
    ("--config.lambda_adv=-1",),
    ("lambda_adv", "non-negative", "-1"),
    workdir="existing",
  ),
  Case(
    "alpha_T_above_1", ("--config.alpha_T=1.5",), ("alpha_T", "[0, 1]", "1.5")
  ),
  Case(
    "temperature_zero",
    ("--config.temperature=0",),
    ("temperature", "positive", "0"),
    workdir="existing",
  ),
  Case(
    "batch_not_divisible_by_devices",
    ("--config.batch_size=63",),
    ("batch_size=63", "not divisible", "2 devices"),
    num_devices=2,
  ),
  Case(
    "workdir_is_a_file",
    (),
    ("--workdir", "{workdir}", "is a file"),
    workdir="file",
  ),
  Case(
    "workdir_below_a_file",
    (),
    ("--workdir", "{workdir}", "writ"),
    workdir="under_file",
  ),
  Case(
    "workdir_below_an_executable_file",
    (),
    ("--workdir", "{workdir}", "writ"),
    workdir="under_executable_file",
  ),
  Case(
    "workdir_in_proc", (), ("--workdir", "{workdir}", "writ"), workdir="proc"
  ),
  Case(
    "unknown_config_field",
    ("--config.foo=1",),
    ("--config.foo: the config has no field 'foo'",),
  ),
  Case(
    "misspelt_config_field",
    ("--config.num_epoch=1",),
    ("--config.num_epoch", "closest: num_epochs"),
    workdir="existing",
  ),
  Case(
    "missing_config_file",
    ("--config=configs/no_such_config.py",),
    ("--config=configs/no_such_config.py: no such file",),
  ),
  Case(
    "batch_larger_than_the_training_set",
    ("--config.batch_size=4096",),
    ("batch_size=4096", "larger than the 1438 training examples"),
    before_data=False,
  ),
  Case(
    "corrupt_image_in_folder",
    (),
    ("Cannot read {image_folder} as an image",),
    before_data=False,
    image_folder="corrupt_png",
  ),
  Case(
    "empty_class_folder",
    (),
    ("Class folder {image_folder} holds no image",),
    image_folder="empty_class",
  ),
  Case(
    "flipped_bit_in_latest_checkpoint",
    (),
    (
      "{step_dir}",
      "corrupted or incomplete",
      "does not match its checksum",
      "mv {step_dir} {step_dir}.bad",
    ),
    workdir="flipped_bit",
  ),
  Case(
    "partial_latest_checkpoint",
    (),
    (
      "{step_dir}",
      "corrupted or incomplete",
      "previous",
      "mv {step_dir} {step_dir}.bad",
    ),
    workdir="partial_save",
  ),
  Case(
    "truncated_array_in_latest_checkpoint",
    (),
    (
      "{step_dir}",
      "corrupted or incomplete",
      "previous",
      "mv {step_dir} {step_dir}.bad",
    ),
    workdir="truncated_array_file",
    before_data=False,
  ),
  Case(
    "truncated_progress_in_latest_checkpoint",
    (),
    (
      "{step_dir}",
      "corrupted or incomplete",
      "previous",
      "mv {step_dir} {step_dir}.bad",
    ),
    workdir="truncated_progress",
    before_data=False,
  ),
)


@dataclasses.dataclass
class Outcome:
  run: u.Finished
  workdir: str
  watched: str  # the path whose contents must not change
  before: dict[str, str] | None  # digests of `watched` (None: absent)
  after: dict[str, str] | None
  step_dir: str = ""
  image_folder: str = ""


def _digests(path: str) -> dict[str, str] | None:
  if not os.path.lexists(path):
    return None
  if os.path.isfile(path):
    with open(path, "rb") as f:
      return {"": hashlib.sha256(f.read()).hexdigest()}
  return u.file_digests(path)


def _prepare(case: Case, interrupted: str, root: str) -> Outcome:
  os.makedirs(root)
  workdir, watched, step_dir = os.path.join(root, "run"), None, ""
  if case.workdir == "existing" or case.workdir in CORRUPTIONS:
    shutil.copytree(interrupted, workdir)
    if case.workdir in CORRUPTIONS:
      checkpoints = os.path.join(workdir, "student", "checkpoints")
      step_dir = os.path.join(
        checkpoints, str(u.checkpoint_steps(workdir, "student")[-1])
      )
      CORRUPTIONS[case.workdir](step_dir)
  elif case.workdir == "file":
    with open(workdir, "w") as f:
      f.write("not a directory\n")
  elif case.workdir in ("under_file", "under_executable_file"):
    watched = os.path.join(root, "a_file")
    with open(watched, "w") as f:
      f.write("#!/bin/sh\n")
    if case.workdir == "under_executable_file":
      os.chmod(watched, 0o755)
    workdir = os.path.join(watched, "run")
  elif case.workdir == "proc":
    workdir = f"/proc/aikd-test-workdir-{os.getpid()}"
  watched = watched or workdir
  image_folder = ""
  if case.image_folder:
    image_folder = _image_folder(
      os.path.join(root, "images"), case.image_folder
    )
  return Outcome(
    run=None,
    workdir=workdir,
    watched=watched,
    before=_digests(watched),
    after=None,
    step_dir=step_dir,
    image_folder=image_folder,
  )


def _run_case(case: Case, interrupted: str, root: str) -> Outcome:
  outcome = _prepare(case, interrupted, root)
  dataset = ()
  if case.image_folder:
    dataset = (f"--config.dataset=folder:{os.path.join(root, 'images')}",)
  outcome.run = u.run_main(
    outcome.workdir,
    *BASE,
    *dataset,
    *case.overrides,
    num_devices=case.num_devices,
    timeout=300,
  )
  outcome.after = _digests(outcome.watched)
  return outcome


@pytest.fixture(scope="module")
def outcomes(interrupted, tmp_path_factory) -> dict[str, Outcome]:
  root = str(tmp_path_factory.mktemp("bad_input"))
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    futures = {
      case.id: pool.submit(
        _run_case, case, interrupted, os.path.join(root, case.id)
      )
      for case in CASES
    }
    results = {name: future.result() for name, future in futures.items()}
  for name, outcome in results.items():
    print(
      f"\n{name}: rc {outcome.run.returncode}, "
      f"{outcome.run.seconds:.1f}s (two cases at a time)"
    )
  return results


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_fast_and_changes_nothing(case, outcomes):
  outcome = outcomes[case.id]
  run = outcome.run
  assert run.returncode == 2, run.tail()
  assert "Traceback" not in run.output, run.tail()
  errors = run.lines(r"^error: ")
  assert errors, run.tail()
  message = "\n".join(errors)
  for keyword in case.keywords:
    keyword = keyword.format(
      workdir=outcome.workdir,
      step_dir=outcome.step_dir,
      image_folder=outcome.image_folder,
    )
    assert keyword in message, (keyword, message)
  assert not run.lines(u.STEP_LINE_PATTERN), "training started"
  assert not run.lines(r"(teacher|student) epoch \d+/"), "training started"
  if case.before_data:
    assert not run.lines(DATA_PLACED), "the dataset was loaded first"
  assert run.seconds < FAST_S, run.seconds
  assert outcome.after == outcome.before, "the workdir changed"
  if case.workdir in ("fresh", "proc"):
    assert outcome.before is None and not os.path.lexists(outcome.workdir)
  if case.workdir in ("under_file", "under_executable_file"):
    assert os.path.isfile(outcome.watched)


def test_the_fallback_the_message_gives_resumes_from_the_previous_one(outcomes):
  """Doing what the partial-checkpoint message says resumes from step 22."""
  outcome = outcomes["partial_latest_checkpoint"]
  move = re.search(r"`mv (\S+) (\S+)`", outcome.run.output)
  assert move, outcome.run.tail()
  assert move[1] == outcome.step_dir
  shutil.move(move[1], move[2])
  proc = u.MainProcess(outcome.workdir, *BASE)
  # Resuming is what is under test, not the rest of the training.
  resumed = proc.wait_until(
    lambda: any(
      "student: resumed from step" in line for line in proc.snapshot()
    ),
    timeout=300,
  )
  u.kill_if_running(proc)
  run = proc.finish()
  assert resumed, run.tail()
  assert f"student: resumed from step {SPE} (epoch 1)" in run.output


def test_a_second_run_on_a_busy_workdir_is_refused_naming_the_first(
  interrupted, tmp_path
):
  """The first run holds the lock while it trains; the second exits at once
  with status 2, names it, and touches nothing; the first goes on."""
  workdir = str(tmp_path / "run")
  shutil.copytree(interrupted, workdir)
  # Long enough to outlast the second run's start-up on a busy machine.
  longer = (*BASE, "--config.num_epochs=60")
  first = u.MainProcess(workdir, *longer)
  try:
    assert first.wait_until(
      lambda: any("student: resumed from step" in x for x in first.snapshot()),
      timeout=300,
    ), first.snapshot()[-20:]
    before = _digests(os.path.join(workdir, "config.json"))
    second = u.run_main(workdir, *longer)
    assert second.returncode == 2, second.tail()
    (error,) = second.lines(r"^error: ")
    assert f"The workdir {workdir!r} is in use by another run" in error
    assert f"pid {first.proc.pid} on host " in error and "since 20" in error
    assert "Traceback" not in second.output
    assert not second.lines(u.STEP_LINE_PATTERN)
    assert _digests(os.path.join(workdir, "config.json")) == before
  finally:
    u.kill_if_running(first)
  first.finish()
  # kill -9 left the lock file; the OS released the lock itself.
  assert os.path.exists(os.path.join(workdir, ".lock"))
  proc = u.MainProcess(workdir, *longer)
  try:
    assert proc.wait_until(
      lambda: any("student: resumed from step" in x for x in proc.snapshot()),
      timeout=300,
    ), proc.snapshot()[-20:]
  finally:
    u.kill_if_running(proc)
  proc.finish()


def test_a_checkpoint_folder_that_cannot_be_written_is_one_line(tmp_path):
  """The checkpoint folder swapped for a file mid-run (what a full disk or
  lost permissions do to a save): one line naming the step, the folder and
  the cause, status 2; once fixed, the same command finishes the run."""
  workdir = str(tmp_path / "run")
  proc = u.MainProcess(workdir, *BASE)
  proc.wait_until(
    lambda: any(s >= 3 for s in u.logged_steps(proc.snapshot())), timeout=300
  )
  folder = os.path.join(workdir, "student", "checkpoints")
  os.rename(folder, folder + ".aside")
  with open(folder, "w") as f:
    f.write("in the way\n")
  run = proc.finish()
  assert run.returncode == 2, run.tail()
  assert "Traceback" not in run.output, run.tail()
  (error,) = run.lines(r"^error: ")
  assert re.search(
    rf"Could not write the checkpoint of step \d+ to {re.escape(folder)} "
    r"\(.*Not a directory",
    error,
  ), error
  os.remove(folder)
  os.rename(folder + ".aside", folder)
  rerun = u.run_main(workdir, *BASE)
  assert rerun.returncode == 0, rerun.tail()
  assert u.read_results(workdir, "student")["complete"]
