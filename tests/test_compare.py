"""The method comparison (aikd_jax.compare) and its report (aikd_jax.report).

One shortened comparison on the digits config (ps_kd without a teacher,
ai_kd with one; 2 seeds) is shared by the end-to-end tests; the report's
own rules (pooling, one seed, no discriminator) are checked on synthetic
results files without training.
"""

import csv
import json
import os
import shutil

import e2e_util as u
import numpy as np
from PIL import Image
import pytest

from aikd_jax import metrics as metrics_lib
from aikd_jax import report as report_lib

METRICS = ("top1_err", "top5_err", "nll", "ece", "aurc", "eaurc")
METHODS = ("ps_kd", "ai_kd")
SEEDS = 2
SHORT = ("--config.num_epochs=3", "--config.teacher_num_epochs=2")


def run_module(module, *args, timeout=600):
  """`python -m module` in a subprocess: (the finished run, its seconds)."""
  run = u.run_module(module, *args, timeout=timeout)
  return run, run.seconds


def compare_args(workdir, methods=",".join(METHODS)):
  return (
    "--config=configs/digits.py",
    f"--methods={methods}",
    f"--seeds={SEEDS}",
    f"--workdir={workdir}",
    *SHORT,
  )


def read_json(*parts):
  with open(os.path.join(*parts)) as f:
    return json.load(f)


def run_results(workdir, method, seed):
  return read_json(
    workdir, "runs", method, f"seed{seed}", "student", "results.json"
  )


def read_csv(workdir):
  with open(os.path.join(workdir, "report", "results.csv"), newline="") as f:
    return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("compare") / "cmp")
  proc, elapsed = run_module("aikd_jax.compare", *compare_args(workdir))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return workdir, proc, elapsed


@pytest.mark.slow
def test_runs_every_method_and_seed_and_writes_the_report(comparison):
  workdir, proc, _ = comparison
  for method in METHODS:
    for seed in range(SEEDS):
      results = run_results(workdir, method, seed)
      assert results["complete"] is True
      assert results["method"] == method
      assert results["num_epochs"] == 3 and len(results["history"]) == 3
      saved = read_json(workdir, "runs", method, f"seed{seed}", "config.json")
      assert saved["seed"] == seed and saved["method"] == method
      assert f"{method} seed{seed}: done" in proc.stdout
  # Different seeds are different runs, not copies.
  for method in METHODS:
    assert (
      run_results(workdir, method, 0)["history"]
      != run_results(workdir, method, 1)["history"]
    )
  saved = read_json(workdir, "comparison.json")
  assert saved["methods"] == list(METHODS)
  assert [s["seed"] for s in saved["seeds"]] == [0, 1]
  report_dir = os.path.join(workdir, "report")
  expected = {
    "results.md",
    "results.csv",
    "test_error.png",
    "loss_terms.png",
    "discriminator_accuracy.png",
    *(f"reliability_{m}.png" for m in METHODS),
  }
  assert expected <= set(os.listdir(report_dir))


@pytest.mark.slow
def test_one_teacher_per_seed_shared_by_the_runs_that_need_it(comparison):
  workdir, proc, _ = comparison
  assert sorted(os.listdir(os.path.join(workdir, "teachers"))) == [
    "seed0",
    "seed1",
  ]
  for seed in range(SEEDS):
    teacher_dir = os.path.join(workdir, "teachers", f"seed{seed}")
    teacher = read_json(teacher_dir, "teacher", "results.json")
    assert teacher["complete"] and teacher["method"] == "ce"
    assert teacher["num_epochs"] == 2
    assert read_json(teacher_dir, "config.json")["seed"] == seed
    # Trained exactly once, before the seed's runs.
    assert proc.stdout.count(f"teacher seed{seed}: training") == 1
    lines = proc.stdout.splitlines()
    first_run = min(
      i
      for i, line in enumerate(lines)
      if line.endswith(
        f"seed{seed}: training in {workdir}/runs/ps_kd/seed{seed}"
      )
    )
    teacher_line = next(
      i
      for i, line in enumerate(lines)
      if line.startswith(f"teacher seed{seed}: training")
    )
    assert teacher_line < first_run
    checkpoints = os.path.join(
      os.path.abspath(teacher_dir), "teacher", "checkpoints"
    )
    for method in METHODS:
      run_dir = os.path.join(workdir, "runs", method, f"seed{seed}")
      assert not os.path.exists(os.path.join(run_dir, "teacher"))
      saved = read_json(run_dir, "config.json")
      if method == "ai_kd":
        assert saved["teacher_checkpoint"] == checkpoints
        assert os.path.isdir(os.path.join(run_dir, "teacher_logits"))
      else:  # ps_kd uses no pre-trained model.
        assert saved["teacher_checkpoint"] == ""
        assert not os.path.exists(os.path.join(run_dir, "teacher_logits"))


@pytest.mark.slow
def test_table_numbers_equal_the_runs_results(comparison):
  workdir, _, _ = comparison
  rows = {(r["method"], r["which"], r["metric"]): r for r in read_csv(workdir)}
  assert len(rows) == len(METHODS) * 2 * len(METRICS)
  with open(os.path.join(workdir, "report", "results.md")) as f:
    markdown = f.read()
  assert "digits" in markdown and "3 epochs" in markdown
  assert "ddof=1" in markdown
  for method in METHODS:
    runs = [run_results(workdir, method, s) for s in range(SEEDS)]
    for which in ("last", "best"):
      for metric in METRICS:
        values = [r[which][metric] for r in runs]
        row = rows[(method, which, metric)]
        assert int(row["n_seeds"]) == SEEDS
        assert [float(row[f"seed{s}"]) for s in range(SEEDS)] == values
        assert float(row["mean"]) == pytest.approx(np.mean(values), rel=1e-12)
        assert float(row["std"]) == pytest.approx(
          np.std(values, ddof=1), rel=1e-12
        )
    # The Markdown rows print the same numbers (errors to 2 decimals).
    last = [r["last"]["top1_err"] for r in runs]
    best = [r["best"]["top1_err"] for r in runs]
    cell_last = f"{np.mean(last):.2f} ± {np.std(last, ddof=1):.2f}"
    cell_best = f"{np.mean(best):.2f} ± {np.std(best, ddof=1):.2f}"
    rows_md = [
      line
      for line in markdown.splitlines()
      if line.startswith(f"| {report_lib.display_name(method)} ")
    ]
    assert len(rows_md) == 2  # last-epoch table, then best-epoch table
    assert cell_last in rows_md[0] and cell_best in rows_md[1]
  # The units of docs/method.md are the stored ones: errors in %, AURC x1000.
  assert rows[("ai_kd", "last", "aurc")]["unit"] == "x1000"
  assert rows[("ps_kd", "best", "ece")]["unit"] == "%"


@pytest.mark.slow
def test_pictures_are_images_of_the_expected_size(comparison):
  workdir, _, _ = comparison
  report_dir = os.path.join(workdir, "report")
  kinds = {
    "test_error.png": "test_error",
    "loss_terms.png": "loss_terms",
    "discriminator_accuracy.png": "discriminator_accuracy",
    **{f"reliability_{m}.png": "reliability" for m in METHODS},
  }
  for name, kind in kinds.items():
    with Image.open(os.path.join(report_dir, name)) as image:
      assert image.format == "PNG"
      assert image.size == report_lib.figure_pixels(kind), name
      colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
      assert len(colours) > 20, (name, len(colours))  # not blank
  assert report_lib.figure_pixels("loss_terms") == (1200, 700)


@pytest.mark.slow
def test_rerun_trains_nothing(comparison):
  workdir, _, first_elapsed = comparison
  results_files = [
    os.path.join(root, name)
    for root, _, files in os.walk(workdir)
    for name in files
    if name == "results.json"
  ]
  # Per seed: the teacher, ps_kd, and ai_kd with its teacher_logits stage.
  assert len(results_files) == SEEDS * 4
  mtimes = {path: os.stat(path).st_mtime_ns for path in results_files}
  proc, elapsed = run_module("aikd_jax.compare", *compare_args(workdir))
  assert proc.returncode == 0, proc.stderr[-4000:]
  for method in METHODS:
    for seed in range(SEEDS):
      assert f"{method} seed{seed}: skipped (finished)" in proc.stdout
  for seed in range(SEEDS):
    assert f"teacher seed{seed}: skipped (finished)" in proc.stdout
  assert "training" not in proc.stdout
  assert " epoch 1/" not in proc.stderr  # no epoch ran
  assert {p: os.stat(p).st_mtime_ns for p in results_files} == mtimes
  assert elapsed < first_elapsed / 2, (elapsed, first_elapsed)


@pytest.mark.slow
def test_a_moved_comparison_resumes_with_its_teachers_new_place(
  comparison, tmp_path
):
  original, _, _ = comparison
  moved = str(tmp_path / "moved")
  shutil.copytree(original, moved)
  run_dir = os.path.join(moved, "runs", "ai_kd", "seed0")
  # As if stopped after its last save, before its results file.
  os.remove(os.path.join(run_dir, "student", "results.json"))
  proc, _ = run_module("aikd_jax.compare", *compare_args(moved))
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert "ai_kd seed0: training" in proc.stdout
  assert "ai_kd seed1: skipped (finished)" in proc.stdout
  for seed in range(SEEDS):
    folder = os.path.join("runs", "ai_kd", f"seed{seed}")
    place = os.path.join("teachers", f"seed{seed}", "teacher", "checkpoints")
    changes = read_json(moved, folder, "config_changes.json")
    assert changes[-1]["fields"] == {
      "teacher_checkpoint": [
        os.path.join(original, place),
        os.path.join(moved, place),
      ]
    }
  resumed, before = (
    u.final_student(run_dir),
    u.final_student(os.path.join(original, "runs", "ai_kd", "seed0")),
  )
  assert resumed[0] == before[0] and resumed[2] == before[2]


@pytest.mark.slow
def test_report_rebuilds_the_same_table_from_disk(comparison):
  workdir, _, _ = comparison
  report_dir = os.path.join(workdir, "report")
  before = {}
  for name in ("results.md", "results.csv"):
    with open(os.path.join(report_dir, name)) as f:
      before[name] = f.read()
  shutil.rmtree(report_dir)
  proc, _ = run_module("aikd_jax.report", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  for name, text in before.items():
    with open(os.path.join(report_dir, name)) as f:
      assert f.read() == text, name
  assert {f"reliability_{m}.png" for m in METHODS} <= set(
    os.listdir(report_dir)
  )


@pytest.mark.slow
def test_unknown_method_fails_before_anything_is_written(tmp_path):
  workdir = tmp_path / "cmp"
  proc, _ = run_module(
    "aikd_jax.compare", *compare_args(workdir, methods="ps_kd,ai-kd")
  )
  assert proc.returncode == 2
  assert "Unknown method(s) in --methods: ai-kd" in proc.stdout
  assert "ai_kd" in proc.stdout  # the message lists the valid names
  assert not workdir.exists()


@pytest.mark.slow
def test_report_needs_a_comparison_workdir(tmp_path):
  proc, _ = run_module("aikd_jax.report", f"--workdir={tmp_path}")
  assert proc.returncode == 2
  assert "comparison.json" in proc.stdout


# ------------------------------------------------- report on synthetic runs


def _fake_results(method, rng, num_epochs=4, num_test=200, lambda_adv=0.0):
  """A results.json as train.py writes it, from random logits."""
  history = []
  for epoch in range(num_epochs):
    logits = rng.normal(size=(num_test, 5)) * (1 + epoch)
    labels = rng.integers(0, 5, num_test)
    train = {
      "loss/prog": 2.0 / (epoch + 1),
      "loss/student": 2.0 / (epoch + 1),
      "train/train_acc": 0.5,
    }
    if lambda_adv:
      train.update(
        {
          "loss/adv": 0.7,
          "loss/disc": 1.38,
          "train/disc_real_acc": 0.6,
          "train/disc_fake_acc": 0.4,
        }
      )
    history.append(
      {
        "epoch": epoch,
        "train": train,
        "test": metrics_lib.classification_report(logits, labels),
        "reliability": metrics_lib.reliability_diagram(logits, labels),
        "logits": logits.tolist(),
        "labels": labels.tolist(),
      }
    )
  best = min(history, key=lambda h: h["test"]["top1_err"])
  return {
    "stage": "student",
    "method": method,
    "objective": {"lambda_adv": lambda_adv},
    "num_epochs": num_epochs,
    "steps_per_epoch": 3,
    "complete": True,
    "last": {"epoch": history[-1]["epoch"], **history[-1]["test"]},
    "best": {"epoch": best["epoch"], **best["test"]},
    "history": history,
  }


def _fake_comparison(workdir, methods, num_seeds, lambda_adv=None):
  rng = np.random.default_rng(0)
  runs = []
  for s in range(num_seeds):
    for method in methods:
      path = os.path.join("runs", method, f"seed{s}")
      os.makedirs(os.path.join(workdir, path, "student"))
      results = _fake_results(
        method, rng, lambda_adv=(lambda_adv or {}).get(method, 0.0)
      )
      with open(
        os.path.join(workdir, path, "student", "results.json"), "w"
      ) as f:
        json.dump(results, f)
      runs.append(
        {
          "method": method,
          "seed_index": s,
          "seed": s,
          "workdir": path,
          "teacher": None,
        }
      )
  with open(os.path.join(workdir, "comparison.json"), "w") as f:
    json.dump(
      {
        "methods": list(methods),
        "seeds": [{"index": s, "seed": s} for s in range(num_seeds)],
        "teachers": {},
        "runs": runs,
        "config": {"dataset": "fake", "model": "m"},
      },
      f,
    )


def test_report_with_one_seed_and_no_discriminator(tmp_path):
  workdir = str(tmp_path)
  _fake_comparison(workdir, ("ce", "ls"), num_seeds=1)
  # A discriminator plot left by an earlier report must not survive.
  os.makedirs(os.path.join(workdir, "report"))
  open(
    os.path.join(workdir, "report", "discriminator_accuracy.png"), "w"
  ).close()
  report = report_lib.build_report(workdir)
  assert report["discriminator_methods"] == []
  assert "discriminator_accuracy" not in report["figures"]
  assert not os.path.exists(
    os.path.join(workdir, "report", "discriminator_accuracy.png")
  )
  with open(report["markdown"]) as f:
    markdown = f.read()
  assert "No discriminator accuracy plot" in markdown
  assert "±" not in markdown.split("## Last epoch")[1].split("## Figures")[0]
  results = read_json(workdir, "runs", "ce", "seed0", "student", "results.json")
  assert f"| {results['last']['top1_err']:.2f} |" in markdown
  rows = read_csv(workdir)
  assert all(r["std"] == "" and r["n_seeds"] == "1" for r in rows)
  # Only the terms the runs logged get a panel: loss/prog, loss/student.
  with Image.open(report["figures"]["loss_terms"]) as image:
    assert image.size == report_lib.figure_pixels("loss_terms")


def test_pooled_reliability_is_the_ece_of_all_seeds_predictions(tmp_path):
  workdir = str(tmp_path)
  _fake_comparison(workdir, ("ai_kd",), num_seeds=3, lambda_adv={"ai_kd": 0.1})
  report = report_lib.build_report(workdir)
  assert report["discriminator_methods"] == ["ai_kd"]
  runs = report_lib.load_runs(workdir, report_lib.load_comparison(workdir))
  pooled = report_lib.pooled_reliability(runs["ai_kd"])
  logits = np.concatenate(
    [np.asarray(r["results"]["history"][-1]["logits"]) for r in runs["ai_kd"]]
  )
  labels = np.concatenate(
    [np.asarray(r["results"]["history"][-1]["labels"]) for r in runs["ai_kd"]]
  )
  expected = metrics_lib.reliability_diagram(logits, labels)
  np.testing.assert_array_equal(pooled["counts"], expected["counts"])
  np.testing.assert_allclose(
    pooled["accuracy"], expected["accuracy"], atol=1e-12
  )
  np.testing.assert_allclose(
    pooled["confidence"], expected["confidence"], atol=1e-12
  )
  assert pooled["ece"] == pytest.approx(
    metrics_lib.classification_report(logits, labels)["ece"], abs=1e-9
  )
  with Image.open(report["figures"]["discriminator_accuracy"]) as image:
    assert image.size == report_lib.figure_pixels("discriminator_accuracy")
