"""The reproduction tool's outputs: results.md (mean +- std per cell, the best of each column in
bold, the poster's numbers beside ours), results.csv and results.png of one table; no scheduling.

`results_markdown` and `budget_line` read a table's settings from `h`, anything with the
attributes of tools/reproduce.py's Harness that they name (table, dataset, rows, sizes, seeds,
tune, tune_override, train_steps, preset.poster_columns, failures).
"""
import collections
import csv
import json
import math
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tfjac import atomic  # noqa: E402


def read_results(workdir):
  """A run directory's results.json as a dict, or None if the run has not finished: the one
  reader of run results for every tool."""
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def setting_name(setting):
  return "_".join(f"{k}={v}" for k, v in sorted(setting.items())) or "default"


def mean_std(values):
  if not values:
    return None, None
  m = sum(values) / len(values)
  if len(values) < 2:
    return m, 0.0
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def verdict(a_mean, a_std, b_mean, b_std):
  """'ahead', 'behind' or 'within noise': A against B by the docs' one rule (docs/results.md):
  a difference counts only where it exceeds the larger of the two standard deviations over
  seeds. Every generated table words its comparisons with this function."""
  diff = a_mean - b_mean
  if abs(diff) <= max(a_std, b_std):
    return "within noise"
  return "ahead" if diff > 0 else "behind"


def compared(a_mean, a_std, b_mean, b_std):
  """'+4.00 (stds 1.00, 2.00): **ahead**': the difference, the spreads and `verdict`."""
  return (f"{a_mean - b_mean:+.2f} (stds {a_std:.2f}, {b_std:.2f}): "
          f"**{verdict(a_mean, a_std, b_mean, b_std)}**")


def verdict_lines(rows, columns, cell, seeds, label=None):
  """Markdown lines comparing every row after the first with the first (the table's baseline)
  in every column, worded by `verdict`; `cell(row_key, column)` -> (mean, std) or (None, _).
  `label(column)`: the column's name (default: column_label). None with a single seed: no
  spread to compare with."""
  label = label or column_label
  if seeds < 2 or len(rows) < 2:
    return []
  base = rows[0]
  lines = ["", f"Against {base.label} (a difference counts only where it exceeds the larger "
           "std):", ""]
  for column in columns:
    b = cell(base.key, column)
    for row in rows[1:]:
      a = cell(row.key, column)
      if a[0] is not None and b[0] is not None:
        lines.append(f"- {label(column)}: {row.label} vs {base.label}: "
                     f"{compared(a[0], a[1], b[0], b[1])}")
  return lines


def load_poster(table, dataset):
  with open(os.path.join(REPO, "tools", "poster_tables.json")) as f:
    return json.load(f).get(table, {}).get(dataset)


def poster_value(poster, row, size, columns):
  if not poster:
    return None
  return poster.get(row, {}).get(columns.get(size, size))


def column_label(size):
  return "full" if size == "full" else f"{size}/class"


def results_markdown(h, stats, poster, tuning, teacher):
  lines = [f"# {h.table} table on {h.dataset}", "",
           f"Test accuracy (%), mean +- std over {h.seeds} seed(s); the best mean of each column "
           "in bold." + (" Settings chosen per cell on the validation split of seed 0 "
                         "(tuning.json)." if h.tune else "")
           + (" In brackets: the poster's number." if poster else ""), ""]
  if teacher is not None:
    lines += [f"Teacher ({teacher['teacher'].get('model', '')}): test accuracy "
              f"{100 * teacher['teacher']['test_accuracy']:.2f}% on the test split of its own "
              "training data.", ""]
  lines.append("| row | " + " | ".join(column_label(s) for s in h.sizes) + " |")
  lines.append("|---|" + "---|" * len(h.sizes))
  best = {}
  for size in h.sizes:  # ties: the first row in the table's order
    top = None
    for r in h.rows:
      m = mean_std(stats[(r.key, size)]["test"])[0]
      if m is not None and (top is None or m > top[0]):
        top = (m, r.key)
    if top:
      best[size] = top[1]
  for row in h.rows:
    cells = []
    for size in h.sizes:
      values = stats[(row.key, size)]["test"]
      m, s = mean_std(values)
      text = "failed" if m is None else f"{m:.2f} +- {s:.2f}"
      if m is not None and len(values) < h.seeds:
        text += f" ({len(values)} of {h.seeds} seeds)"
      if best.get(size) == row.key:
        text = f"**{text}**"
      p = poster_value(poster, row.key, size, h.preset.poster_columns)
      if p is not None:
        text += f" [{p:.2f}]"
      cells.append(text)
    lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
  lines += verdict_lines(h.rows, h.sizes, lambda key, size: mean_std(stats[(key, size)]["test"]),
                         h.seeds)
  lines += ["", budget_line(h, stats, tuning)]
  lines += choice_lines(h, stats)
  lines += cost_lines(h, stats)
  if tuning:
    lines += ["", "Chosen on validation (seed 0):", ""]
    for key, t in sorted(tuning.items()):
      tried = ", ".join(
          f"{setting_name(x['setting'])}: "
          + ("failed" if x["best_val_accuracy"] is None else
             f"{100 * x['best_val_accuracy']:.1f}") for x in t["trials"])
      lines.append(f"- {key}: **{setting_name(t['chosen'])}** (validation accuracy: {tried})")
  seconds = sum(sum(v["seconds"]) for v in stats.values())
  lines += ["", f"Runs' own time, summed: {seconds / 60:.1f} min (tuning trials other than the "
            "chosen one not included)."]
  if h.failures:
    lines += ["", "Failed runs: " + "; ".join(f"{w} ({d}/log.txt)" for w, d in h.failures)]
  return "\n".join(lines) + "\n"


def chosen_on_validation(h, stats):
  """Whether the table's runs chose the student on validation (tfjac.run's
  choose_on_validation): every finished run recorded a choice."""
  runs = [(len(stats[(r.key, s)].get("kept", ())), len(stats[(r.key, s)]["test"]))
          for r in h.rows for s in h.sizes]
  return any(k for k, _ in runs) and all(k == n for k, n in runs)


def choice_lines(h, stats):
  """How often each cell's runs kept the alternative (jac weight x10, learning rate x3) over
  the settings given, when the runs chose on validation."""
  if not chosen_on_validation(h, stats):
    return []
  lines = ["", "Each run fitted the student twice (tfjac.run's default choose_on_validation: the "
           "settings given, and the jac weight x10 with the learning rate x3) and kept the "
           "alternative only when its best validation accuracy was higher by more than one "
           "standard error. Runs that kept the alternative, of the seeds:", "",
           "| row | " + " | ".join(column_label(s) for s in h.sizes) + " |",
           "|---|" + "---|" * len(h.sizes)]
  for row in h.rows:
    cells = [f"{stats[(row.key, s)]['kept'].count('alternative')} of "
             f"{len(stats[(row.key, s)]['kept'])}" for s in h.sizes]
    lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
  if all(stats[(r.key, s)].get(f"{c}_test") for r in h.rows for s in h.sizes
         for c in ("given", "alternative")):
    lines += ["", "Each fit alone, for the record (test accuracy, %, mean +- std over seeds: the "
              "settings given / the alternative; the choice above read validation only):", "",
              "| row | " + " | ".join(column_label(s) for s in h.sizes) + " |",
              "|---|" + "---|" * len(h.sizes)]
    for row in h.rows:
      cells = [" / ".join("{:.2f} +- {:.2f}".format(*mean_std(stats[(row.key, s)][f"{c}_test"]))
                          for c in ("given", "alternative")) for s in h.sizes]
      lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
  return lines


def cost_lines(h, stats):
  """What each cell cost: the student's training steps and the whole run (seconds per run,
  mean over its seeds; results.json's fit_phases_seconds and total_seconds), when every run
  reported them."""
  if not all(stats[(r.key, s)]["train_seconds"] for r in h.rows for s in h.sizes):
    return []
  student = ("the student's two fits (training steps, validation and checkpoints of both)"
             if chosen_on_validation(h, stats) else "the student's training steps")
  lines = ["", f"Cost per run, seconds (mean over seeds): {student} / the "
           "whole run (start-up, teacher cache, validation, test and export included; runs "
           f"{h.jobs} at a time).", "",
           "| row | " + " | ".join(column_label(s) for s in h.sizes) + " |",
           "|---|" + "---|" * len(h.sizes)]
  for row in h.rows:
    cells = [f"{statistics.mean(stats[(row.key, s)]['train_seconds']):.1f} / "
             f"{statistics.mean(stats[(row.key, s)]['seconds']):.1f}" for s in h.sizes]
    lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
  return lines


def budget_line(h, stats, tuning):
  """What every cell was given: optimizer steps per column (as the runs' results.json report
  them) and tuning trials per row (as tuning.json holds them)."""
  steps = []
  for size in h.sizes:
    seen = sorted({s for r in h.rows for s in stats[(r.key, size)]["steps"] if s is not None})
    steps.append(f"{column_label(size)}: {'/'.join(str(s) for s in seen) or 'unknown'}")
  how = (f"--train_steps={h.train_steps} for every cell" if h.train_steps else
         "each run's --epochs and --steps_per_epoch (the preset's flags)")
  text = f"Budget: optimizer steps per student run ({how}): " + "; ".join(steps) + "."
  if tuning:
    counts = collections.Counter()
    for key, t in tuning.items():
      counts[key.split("/")[0]] = max(counts[key.split("/")[0]], len(t["trials"]))
    per_row = sorted({n for n in counts.values()})
    text += (f" Tuning: {per_row[0]} trial(s) per row and column on seed 0" if len(per_row) == 1
             else " Tuning: unequal trials per row (--tune_space): " + ", ".join(
                 f"{k} {n}" for k, n in sorted(counts.items())))
    text += (", learning rates and weights by the built-in design (tools/reproduce.py)."
             if not h.tune_override else ", the product of --tune_space.")
  elif chosen_on_validation(h, stats):
    text += (" No tuning: one run per cell and seed with tfjac.run's defaults, each of two "
             "student fits of these steps.")
  else:
    text += " No tuning: one run per cell and seed with tfjac.run's defaults."
  return text


def write_csv(path, rows, sizes, stats, poster, columns):
  def write(f):
    w = csv.writer(f)
    w.writerow(["row", "samples_per_class", "seeds", "test_mean", "test_std",
                "val_mean", "test_values", "poster"])
    for row in rows:
      for size in sizes:
        st = stats[(row.key, size)]
        m, s = mean_std(st["test"])
        vm, _ = mean_std(st["val"])
        p = poster_value(poster, row.key, size, columns)
        w.writerow([row.key, size, len(st["test"]),
                    "" if m is None else f"{m:.4f}", "" if s is None else f"{s:.4f}",
                    "" if vm is None else f"{vm:.4f}",
                    " ".join(f"{v:.4f}" for v in st["test"]), "" if p is None else p])
  atomic.write_with(path, write)


def plot(path, rows, sizes, stats, title):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(6.4, 4.2))
  xs = list(range(len(sizes)))
  for row in rows:
    points = [(x, *mean_std(stats[(row.key, s)]["test"])) for x, s in zip(xs, sizes)]
    points = [p for p in points if p[1] is not None]
    if points:
      ax.errorbar([p[0] for p in points], [p[1] for p in points],
                  yerr=[p[2] for p in points], marker="o", capsize=3, label=row.label)
  ax.set_xticks(xs, [column_label(s) for s in sizes])
  ax.set_xlabel("training samples per class")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  atomic.write_with(path, lambda f: fig.savefig(f, format="png", dpi=120), mode="wb")
  plt.close(fig)
