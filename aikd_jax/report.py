"""The comparison's table and figures, rebuilt from the runs' results files.

  python -m aikd_jax.report --workdir=DIR

DIR is a workdir of `aikd_jax.compare`: its comparison.json names the methods
and seeds, and each run's student/results.json holds the numbers. Nothing is
trained or evaluated here; the report reads only those files, so it can be
rebuilt at any time (and is, at the end of every `compare`). It writes into
DIR/report/:

- results.md and results.csv: PS-KD's table layout (a row per method; top-1
  and top-5 error, NLL, ECE, AURC, E-AURC) for the last and the best epoch,
  as mean +- sample standard deviation (ddof=1) over the seeds;
- reliability_<method>.png: the last epoch's reliability diagram, bins
  pooled over seeds;
- test_error.png, loss_terms.png, discriminator_accuracy.png: per-epoch
  curves, averaged over seeds.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
from absl import logging
from matplotlib import ticker
from matplotlib.figure import Figure
import numpy as np

from aikd_jax import results as results_lib

COMPARISON_FILE = "comparison.json"
REPORT_DIR = "report"

# (key in results.json, column title); the values are stored in these units.
METRICS = (
  ("top1_err", "Top-1 err. (%)"),
  ("top5_err", "Top-5 err. (%)"),
  ("nll", "NLL"),
  ("ece", "ECE (%)"),
  ("aurc", "AURC (x1000)"),
  ("eaurc", "E-AURC (x1000)"),
)
UNITS = {
  "top1_err": "%",
  "top5_err": "%",
  "nll": "nats",
  "ece": "%",
  "aurc": "x1000",
  "eaurc": "x1000",
}
_DECIMALS = {"nll": 3}  # everything else: 2, as PS-KD prints
WHICH = ("last", "best")
# The standard deviation over seeds is the sample one.
STD_DDOF = 1

# Fixed sizes (inches) at a fixed dpi: each PNG is figsize * DPI pixels.
DPI = 100
FIGSIZES = {
  "reliability": (5.0, 5.0),
  "test_error": (8.0, 5.0),
  "loss_terms": (12.0, 7.0),
  "discriminator_accuracy": (11.0, 4.5),
}

DISPLAY_NAMES = {
  "ce": "CE",
  "ls": "LS",
  "cs_kd": "CS-KD",
  "tf_kd": "TF-KD",
  "ps_kd": "PS-KD",
  "ai_kd": "AI-KD",
  "ai_kd_no_adv": "AI-KD w/o adv.",
  "ai_kd_no_det": "AI-KD w/o det.",
  "ai_kd_no_prog": "AI-KD w/o prog.",
  "ai_kd_online": "AI-KD (online teacher)",
}


class ReportError(ValueError):
  """The workdir holds no comparison, or no finished run to report."""


def figure_pixels(name: str) -> tuple[int, int]:
  """(width, height) in pixels of the PNG drawn with FIGSIZES[name]."""
  width, height = FIGSIZES[name]
  return int(round(width * DPI)), int(round(height * DPI))


def display_name(method: str) -> str:
  return DISPLAY_NAMES.get(method, method)


def load_comparison(workdir: str) -> dict[str, Any]:
  """The comparison's settings that `compare` saved (comparison.json)."""
  path = os.path.join(workdir, COMPARISON_FILE)
  if not os.path.exists(path):
    raise ReportError(
      f"{workdir!r} is not a comparison workdir (no {COMPARISON_FILE}); "
      "run `python -m aikd_jax.compare --workdir=...` first."
    )
  with open(path) as f:
    return json.load(f)


def load_runs(workdir: str, comparison: dict) -> dict[str, list[dict]]:
  """Per method, one entry per seed: {seed_index, seed, workdir, results}.

  `results` is the run's student/results.json, or None while it is missing
  or incomplete.
  """
  runs = {method: [] for method in comparison["methods"]}
  for run in comparison["runs"]:
    results = results_lib.finished_results(
      os.path.join(workdir, run["workdir"], "student")
    )
    runs[run["method"]].append({**run, "results": results})
  for entries in runs.values():
    entries.sort(key=lambda r: r["seed_index"])
  return runs


def _finished(entries: list[dict]) -> list[dict]:
  return [e for e in entries if e["results"] is not None]


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
  if not values:
    return None, None
  array = np.asarray(values, np.float64)
  std = float(np.std(array, ddof=STD_DDOF)) if len(array) > 1 else None
  return float(np.mean(array)), std


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
  """summary[method][which][metric] = {mean, std, values, seed_indices}.

  which is 'last' or 'best' (results.json's entries); values are in the
  units of METRICS, one per finished seed; std is None with one seed.
  """
  summary = {}
  for method, entries in runs.items():
    done = _finished(entries)
    summary[method] = {}
    for which in WHICH:
      summary[method][which] = {}
      for metric, _ in METRICS:
        values = [float(e["results"][which][metric]) for e in done]
        mean, std = _mean_std(values)
        summary[method][which][metric] = {
          "mean": mean,
          "std": std,
          "values": values,
          "seed_indices": [e["seed_index"] for e in done],
        }
    summary[method]["best_epochs"] = [
      int(e["results"]["best"]["epoch"]) for e in done
    ]
  return summary


def _format(metric: str, mean: float | None, std: float | None) -> str:
  if mean is None:
    return "n/a"
  decimals = _DECIMALS.get(metric, 2)
  if std is None:
    return f"{mean:.{decimals}f}"
  return f"{mean:.{decimals}f} ± {std:.{decimals}f}"


def _markdown_table(summary: dict, runs: dict, which: str) -> list[str]:
  header = ["Method"] + [title for _, title in METRICS] + ["Seeds"]
  if which == "best":
    header.append("Best epoch per seed")
  lines = [
    "| " + " | ".join(header) + " |",
    "| " + " | ".join(["---"] + ["---:"] * (len(header) - 1)) + " |",
  ]
  for method, entries in runs.items():
    cells = [f"{display_name(method)} (`{method}`)"]
    for metric, _ in METRICS:
      entry = summary[method][which][metric]
      cells.append(_format(metric, entry["mean"], entry["std"]))
    cells.append(f"{len(_finished(entries))}/{len(entries)}")
    if which == "best":
      cells.append(
        ", ".join(str(e + 1) for e in summary[method]["best_epochs"]) or "n/a"
      )
    lines.append("| " + " | ".join(cells) + " |")
  return lines


def _epochs_text(runs: dict) -> str:
  epochs = sorted(
    {
      e["results"]["num_epochs"]
      for entries in runs.values()
      for e in _finished(entries)
    }
  )
  return " / ".join(str(e) for e in epochs)


def _teacher_line(workdir: str, comparison: dict) -> str | None:
  teachers = comparison.get("teachers") or {}
  values, epochs = [], set()
  for path in teachers.values():
    results = results_lib.finished_results(
      os.path.join(workdir, path, "teacher")
    )
    if results:
      values.append(results["last"]["top1_err"])
      epochs.add(results["num_epochs"])
  if not teachers:
    return None
  if not values:
    return (
      f"- Teachers (`ce`, one per seed, shared by every method that "
      f"uses a pre-trained model): {len(teachers)}, none finished yet."
    )
  mean, std = _mean_std(values)
  return (
    f"- Teachers (`ce`, one per seed, shared by every method that uses "
    f"a pre-trained model): {'/'.join(str(e) for e in sorted(epochs))} "
    f"epochs, last-epoch test top-1 error "
    f"{_format('top1_err', mean, std)}% over {len(values)} seed(s)."
  )


def _write_markdown(
  path: str,
  workdir: str,
  comparison: dict,
  runs: dict,
  summary: dict,
  figures: dict,
  disc_methods: list[str],
  num_test: int | None,
) -> None:
  config = comparison.get("config", {})
  seeds = comparison["seeds"]
  test_text = f", test split of {num_test} examples" if num_test else ""
  lines = [
    f"# Method comparison: {config.get('dataset', '?')}",
    "",
    f"- Dataset: `{config.get('dataset', '?')}`{test_text}; model "
    f"`{config.get('model', '?')}`; students trained for "
    f"{_epochs_text(runs)} epochs (batch {config.get('batch_size', '?')}, "
    f"lr {config.get('learning_rate', '?')}).",
  ]
  teacher = _teacher_line(workdir, comparison)
  if teacher:
    lines.append(teacher)
  lines += [
    f"- Seeds: {len(seeds)} (config.seed = "
    f"{', '.join(str(s['seed']) for s in seeds)}: initialisation, example "
    "ids, shuffling and augmentation; the data split, data_seed = "
    f"{config.get('data_seed', '?')}, is shared). Cells are mean ± "
    "standard deviation over seeds (sample standard deviation, ddof=1); "
    "with one seed, the value alone.",
    "- Units (PS-KD's conventions): top-1/top-5 error and ECE in %, NLL "
    "in nats per test example, AURC and E-AURC x1000. Lower is better "
    "everywhere.",
    "- Best epoch: the epoch of lowest test top-1 error within each run "
    "(chosen on the test split, as PS-KD reports it; optimistic).",
    "",
    "## Last epoch",
    "",
    *_markdown_table(summary, runs, "last"),
    "",
    "## Best epoch",
    "",
    *_markdown_table(summary, runs, "best"),
    "",
    "## Figures",
    "",
  ]
  for name, figure_path in figures.items():
    lines.append(f"- [{name}]({os.path.basename(figure_path)})")
  if not disc_methods:
    lines.append(
      "- No discriminator accuracy plot: no method in this "
      "comparison trains a discriminator (lambda_adv = 0 for all)."
    )
  missing = [
    e["workdir"]
    for entries in runs.values()
    for e in entries
    if e["results"] is None
  ]
  if missing:
    lines += ["", "## Unfinished runs (not in the table)", ""]
    lines += [f"- `{m}`" for m in missing]
  lines.append("")
  results_lib.write_text(path, "\n".join(lines))


def _write_csv(path: str, comparison: dict, summary: dict) -> None:
  seed_columns = [f"seed{s['index']}" for s in comparison["seeds"]]
  with io.StringIO(newline="") as f:
    writer = csv.writer(f)
    writer.writerow(
      [
        "method",
        "which",
        "metric",
        "unit",
        "mean",
        "std",
        "n_seeds",
        *seed_columns,
      ]
    )
    for method in comparison["methods"]:
      for which in WHICH:
        for metric, _ in METRICS:
          entry = summary[method][which][metric]
          per_seed = dict(zip(entry["seed_indices"], entry["values"]))
          writer.writerow(
            [
              method,
              which,
              metric,
              UNITS[metric],
              "" if entry["mean"] is None else repr(entry["mean"]),
              "" if entry["std"] is None else repr(entry["std"]),
              len(entry["values"]),
              *[
                "" if s["index"] not in per_seed else repr(per_seed[s["index"]])
                for s in comparison["seeds"]
              ],
            ]
          )
    results_lib.write_text(path, f.getvalue())


# ----------------------------------------------------------------- figures


def _colors(methods: Sequence[str]) -> dict[str, Any]:
  palette = matplotlib.colormaps["tab10"].colors
  return {m: palette[i % len(palette)] for i, m in enumerate(methods)}


def _new_figure(name: str, **kwargs) -> Figure:
  return Figure(figsize=FIGSIZES[name], dpi=DPI, layout="constrained", **kwargs)


def _save(fig: Figure, path: str) -> None:
  # No bbox_inches='tight': the PNG keeps exactly figsize * dpi pixels.
  fig.savefig(path, dpi=DPI, format="png")


def pooled_reliability(entries: list[dict]) -> dict[str, np.ndarray]:
  """The last epoch's reliability bins summed over seeds.

  Returns counts, accuracy and confidence per bin (empty bins: 0) and the
  ECE (%) of the pooled predictions, which is what ECE gives on the union
  of every seed's test predictions.
  """
  counts, correct, confidence = 0.0, 0.0, 0.0
  for entry in _finished(entries):
    bins = entry["results"]["history"][-1]["reliability"]
    n = np.asarray(bins["counts"], np.float64)
    counts = counts + n
    correct = correct + n * np.asarray(bins["accuracy"], np.float64)
    confidence = confidence + n * np.asarray(bins["confidence"], np.float64)
  counts = np.asarray(counts, np.float64)
  safe = np.maximum(counts, 1.0)
  accuracy, mean_conf = correct / safe, confidence / safe
  ece = 100.0 * float(
    np.sum(np.abs(accuracy - mean_conf) * counts) / max(counts.sum(), 1.0)
  )
  return {
    "counts": counts,
    "accuracy": accuracy,
    "confidence": mean_conf,
    "ece": ece,
  }


def _plot_reliability(path: str, method: str, entries: list[dict]) -> None:
  pooled = pooled_reliability(entries)
  num_bins = len(pooled["counts"])
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  centers = (edges[:-1] + edges[1:]) / 2
  width = 1.0 / num_bins
  present = pooled["counts"] > 0
  fig = _new_figure("reliability")
  ax = fig.add_subplot()
  ax.bar(
    centers[present],
    pooled["accuracy"][present],
    width=width,
    color="tab:blue",
    edgecolor="black",
    linewidth=0.6,
    label="accuracy",
  )
  ax.hlines(
    pooled["confidence"][present],
    edges[:-1][present],
    edges[1:][present],
    colors="tab:red",
    linewidth=2.5,
    label="mean confidence",
  )
  ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xlabel("confidence (max softmax probability)")
  ax.set_ylabel("accuracy")
  ax.legend(loc="upper left", fontsize=8)
  seeds = len(_finished(entries))
  per_seed = [e["results"]["last"]["ece"] for e in _finished(entries)]
  mean, std = _mean_std(per_seed)
  ax.set_title(
    f"{display_name(method)}, last epoch, {seeds} seed(s) pooled\n"
    f"ECE {pooled['ece']:.2f}% (pooled bins); per seed "
    f"{_format('ece', mean, std)}%",
    fontsize=10,
  )
  _save(fig, path)


def _stack(entries: list[dict], getter) -> np.ndarray | None:
  """[seeds, epochs] of getter(history entry); None if any run lacks it."""
  rows = []
  for entry in _finished(entries):
    values = [getter(h) for h in entry["results"]["history"]]
    if any(v is None for v in values):
      return None
    rows.append(values)
  if not rows:
    return None
  epochs = min(len(r) for r in rows)
  return np.asarray([r[:epochs] for r in rows], np.float64)


def _plot_mean(
  ax, values: np.ndarray, color, label: str, linestyle: str = "-"
) -> None:
  epochs = np.arange(1, values.shape[1] + 1)
  ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  mean = values.mean(axis=0)
  ax.plot(epochs, mean, linestyle, color=color, label=label, linewidth=1.4)
  if values.shape[0] > 1:
    std = values.std(axis=0, ddof=STD_DDOF)
    ax.fill_between(
      epochs, mean - std, mean + std, color=color, alpha=0.15, linewidth=0
    )


def _plot_test_error(path: str, runs: dict, colors: dict) -> None:
  fig = _new_figure("test_error")
  ax = fig.add_subplot()
  for method, entries in runs.items():
    values = _stack(entries, lambda h: h["test"]["top1_err"])
    if values is not None:
      _plot_mean(
        ax,
        values,
        colors[method],
        f"{display_name(method)} ({values.shape[0]} seeds)",
      )
  ax.set_yscale("log")
  # Plain numbers on the log axis (1, 2, 5, 10, 20, 50), not 10^x.
  ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
  ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
  ax.yaxis.set_minor_formatter(ticker.NullFormatter())
  ax.set_xlabel("epoch")
  ax.set_ylabel("test top-1 error (%, log scale)")
  ax.set_title("Test top-1 error: mean over seeds (band: ± 1 std)")
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  _save(fig, path)


def _terms_present(runs: dict) -> list[str]:
  """Every loss term the runs' steps logged ("loss/..."), first seen first."""
  present = {}
  for entries in runs.values():
    for entry in _finished(entries):
      for h in entry["results"]["history"]:
        present.update((k, None) for k in h["train"] if k.startswith("loss/"))
  return list(present)


def _plot_loss_terms(path: str, runs: dict, colors: dict) -> list[str]:
  terms = _terms_present(runs)
  fig = _new_figure("loss_terms")
  ncols = min(3, max(len(terms), 1))
  nrows = -(-max(len(terms), 1) // ncols)
  axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
  for ax, term in zip(axes, terms):
    for method, entries in runs.items():
      values = _stack(entries, lambda h, t=term: h["train"].get(t))
      if values is not None:
        _plot_mean(ax, values, colors[method], display_name(method))
    ax.set_title(term)
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean over the epoch's steps")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
  for ax in axes[len(terms) :]:
    ax.set_axis_off()
  fig.suptitle("Training loss terms (mean over seeds; band: ± 1 std)")
  _save(fig, path)
  return terms


def discriminator_methods(runs: dict) -> list[str]:
  """Methods whose finished runs trained a discriminator (lambda_adv > 0)."""
  return [
    m
    for m, entries in runs.items()
    if any(
      e["results"]["objective"].get("lambda_adv", 0) > 0
      for e in _finished(entries)
    )
  ]


def _plot_discriminator(
  path: str, runs: dict, methods: list[str], colors: dict
) -> None:
  fig = _new_figure("discriminator_accuracy")
  axes = fig.subplots(1, 2, sharey=True)
  panels = (
    ("train/disc_real_acc", "real: teacher's distributions scored real"),
    ("train/disc_fake_acc", "fake: student's distributions scored fake"),
  )
  for ax, (key, title) in zip(axes, panels):
    for method in methods:
      values = _stack(runs[method], lambda h, k=key: h["train"].get(k))
      if values is not None:
        _plot_mean(ax, values, colors[method], display_name(method))
    ax.axhline(0.5, color="gray", linestyle=":", label="chance")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("epoch")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
  axes[0].set_ylabel("discriminator accuracy (train)")
  fig.suptitle("Discriminator accuracy (mean over seeds)")
  _save(fig, path)


def _remove_stale(report_dir: str, keep: set[str]) -> None:
  """Drops figures of an earlier report that this one does not draw."""
  for name in os.listdir(report_dir):
    if (
      name.endswith(".png")
      and name not in keep
      and (
        name.startswith("reliability_") or name == "discriminator_accuracy.png"
      )
    ):
      os.remove(os.path.join(report_dir, name))


def build_report(workdir: str) -> dict[str, Any]:
  """Writes DIR/report/{results.md, results.csv, *.png} from the runs.

  Returns:
    Dict with `report_dir`, `markdown`, `csv` (paths), `figures` (name ->
    path), `summary` (see `summarize`), `unfinished` (run folders without
    a complete results file) and `discriminator_methods`.

  Raises:
    ReportError: no comparison.json, or not one finished run.
  """
  comparison = load_comparison(workdir)
  runs = load_runs(workdir, comparison)
  if not any(_finished(entries) for entries in runs.values()):
    raise ReportError(
      f"No run in {workdir!r} has finished yet; nothing to report."
    )
  report_dir = os.path.join(workdir, REPORT_DIR)
  os.makedirs(report_dir, exist_ok=True)
  summary = summarize(runs)
  colors = _colors(comparison["methods"])

  figures = {}
  for method, entries in runs.items():
    if _finished(entries):
      path = os.path.join(report_dir, f"reliability_{method}.png")
      _plot_reliability(path, method, entries)
      figures[f"reliability_{method}"] = path
  figures["test_error"] = os.path.join(report_dir, "test_error.png")
  _plot_test_error(figures["test_error"], runs, colors)
  figures["loss_terms"] = os.path.join(report_dir, "loss_terms.png")
  _plot_loss_terms(figures["loss_terms"], runs, colors)
  disc_methods = discriminator_methods(runs)
  if disc_methods:
    figures["discriminator_accuracy"] = os.path.join(
      report_dir, "discriminator_accuracy.png"
    )
    _plot_discriminator(
      figures["discriminator_accuracy"], runs, disc_methods, colors
    )
  _remove_stale(report_dir, {os.path.basename(p) for p in figures.values()})

  num_test = None
  for entries in runs.values():
    for entry in _finished(entries):
      num_test = int(
        sum(entry["results"]["history"][-1]["reliability"]["counts"])
      )
      break
    if num_test:
      break
  markdown = os.path.join(report_dir, "results.md")
  _write_markdown(
    markdown,
    workdir,
    comparison,
    runs,
    summary,
    figures,
    disc_methods,
    num_test,
  )
  table = os.path.join(report_dir, "results.csv")
  _write_csv(table, comparison, summary)
  unfinished = [
    e["workdir"]
    for entries in runs.values()
    for e in entries
    if e["results"] is None
  ]
  return {
    "report_dir": report_dir,
    "markdown": markdown,
    "csv": table,
    "figures": figures,
    "summary": summary,
    "unfinished": unfinished,
    "discriminator_methods": disc_methods,
  }


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    report = build_report(flags.FLAGS.workdir)
  except ReportError as error:
    logging.error("%s", error)
    print(f"error: {error}", flush=True)
    sys.exit(2)
  print(f"Report: {report['markdown']}, {report['csv']}", flush=True)
  for path in report["figures"].values():
    print(f"  {path}", flush=True)
  if report["unfinished"]:
    print(
      f"Unfinished runs (left out): {', '.join(report['unfinished'])}",
      flush=True,
    )


def define_flags() -> None:
  flags.DEFINE_string("workdir", None, "A workdir of aikd_jax.compare.")
  flags.mark_flag_as_required("workdir")


if __name__ == "__main__":
  define_flags()
  app.run(main)
