"""Tables side by side: the rows of several tools/reproduce.py outputs (their results.csv) in
one markdown table, and the verdicts of chosen comparisons, all worded by
results_tables.verdict, the one rule of the docs (docs/results.md): a difference counts only
where it exceeds the larger of the two standard deviations over seeds; otherwise it is
"within noise".

  python tools/compare_tables.py --out=docs/results/defaults_digits.md \
      --table="defaults=runs/defaults_digits" --table="tuned=docs/results/lazy_digits.csv" \
      --compare="defaults:act_jac_ce>defaults:act_ce" --compare="defaults:act_jac_ce~tuned:act_jac_ce"

A --table is NAME=PATH (a results.csv, or a directory holding one); a --compare is A>B (is A
ahead of B?) or A~B (is A within noise of B?), each side NAME:ROW; each is checked in every
column both tables have. --header adds a paragraph (the commands, the CPU) above the table.
"""
import csv
import os
import statistics
import sys

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

sys.path.insert(0, os.path.join(REPO, "tools"))

from results_tables import compared, read_results, verdict  # noqa: E402  (the one rule)
from tfjac import atomic  # noqa: E402

flags.DEFINE_multi_string("table", [], "NAME=PATH of a results.csv (or its directory).")
flags.DEFINE_enum("metric", "test", ["test", "validation"], "test: the tables' results.csv "
                  "(test accuracy); validation: best validation accuracy, read from the runs "
                  "under each table's cells/ (a table must then be a reproduce output directory).")
flags.DEFINE_integer("seeds", 0, "With --metric=validation: only seeds 0..N-1 (0: all), so "
                     "tables run with more seeds compare at equal counts.")
flags.DEFINE_list("rows", [], "Only these rows (default: every row of every table).")
flags.DEFINE_list("columns", [], "Only these columns, e.g. 3,10 (default: all).")
flags.DEFINE_multi_string("compare", [], "NAME:ROW>NAME:ROW or NAME:ROW~NAME:ROW.")
flags.DEFINE_multi_string("header", [], "Paragraphs above the table (markdown).")
flags.DEFINE_string("title", "Defaults and tuned side by side", "The page's title.")
flags.DEFINE_string("out", None, "The markdown file to write; default: print only.")
FLAGS = flags.FLAGS


def read_table(path):
  """{(row, column): (mean, std, seeds)} of a results.csv."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.csv")
  cells = {}
  with open(path) as f:
    for r in csv.DictReader(f):
      if r["test_mean"]:
        cells[(r["row"], r["samples_per_class"])] = (float(r["test_mean"]),
                                                    float(r["test_std"]), int(r["seeds"]))
  return cells


def read_cells(directory, seeds=0):
  """{(row, column): (mean, std, seeds)} of the best validation accuracy (%) of the runs under
  `directory`/cells/<row>/n<column>/seed<k>/results.json, seeds 0..seeds-1 (0: all)."""
  values = {}
  cells = os.path.join(directory, "cells")
  for row in sorted(os.listdir(cells)):
    for column in sorted(os.listdir(os.path.join(cells, row))):
      for seed_dir in sorted(os.listdir(os.path.join(cells, row, column))):
        results = read_results(os.path.join(cells, row, column, seed_dir))
        if results is None or (seeds and int(seed_dir[4:]) >= seeds):
          continue
        acc = results["student"]["best_val_accuracy"]
        values.setdefault((row, column[1:]), []).append(100 * acc)
  return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))
          for k, v in values.items()}


def parse_side(text, tables):
  name, _, row = text.partition(":")
  if name not in tables or not row:
    raise ValueError(f"--compare: {text!r} is not NAME:ROW with NAME among {sorted(tables)}")
  return name, row


def render(tables, comparisons, title, header=(), metric="Test"):
  columns = []
  for cells in tables.values():
    for _, col in cells:
      if col not in columns:
        columns.append(col)
  label = lambda c: "full" if c in ("full", "0") else f"{c}/class"  # noqa: E731
  lines = [f"# {title}", "", *[p + "\n" for p in header],
           f"{metric} accuracy (%), mean +- std over seeds.", "",
           "| table | row | " + " | ".join(label(c) for c in columns) + " |",
           "|---|---|" + "---|" * len(columns)]
  for name, cells in tables.items():
    rows = []
    for row, _ in cells:
      if row not in rows:
        rows.append(row)
    for row in rows:
      values = [cells.get((row, c)) for c in columns]
      lines.append(f"| {name} | {row} | " + " | ".join(
          "" if v is None else f"{v[0]:.2f} +- {v[1]:.2f}" for v in values) + " |")
  if comparisons:
    lines += ["", "Verdicts (a difference counts only where it exceeds the larger std):", ""]
  for text in comparisons:
    op = ">" if ">" in text else "~"
    a, b = (parse_side(s, tables) for s in text.split(op))
    for c in columns:
      va, vb = tables[a[0]].get((a[1], c)), tables[b[0]].get((b[1], c))
      if va is None or vb is None:
        continue
      v = verdict(va[0], va[1], vb[0], vb[1])
      wanted = "ahead" if op == ">" else "within noise"
      lines.append(f"- {label(c)}: {a[0]} {a[1]} vs {b[0]} {b[1]}: "
                   f"{compared(va[0], va[1], vb[0], vb[1])}"
                   + ("" if v == wanted or (op == "~" and v == "ahead") else
                      f" (asked: {'ahead' if op == '>' else 'within noise or ahead'})"))
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  tables = {}
  for spec in FLAGS.table:
    name, _, path = spec.partition("=")
    tables[name] = (read_cells(path, FLAGS.seeds) if FLAGS.metric == "validation"
                    else read_table(path))
  for name, cells in tables.items():
    tables[name] = {k: v for k, v in cells.items()
                    if (not FLAGS.rows or k[0] in FLAGS.rows)
                    and (not FLAGS.columns or k[1] in FLAGS.columns)}
  text = render(tables, FLAGS.compare, FLAGS.title, FLAGS.header,
                "Best validation" if FLAGS.metric == "validation" else "Test")
  if FLAGS.out:
    atomic.write_text(FLAGS.out, text)
  print(text)


if __name__ == "__main__":
  app.run(main)
