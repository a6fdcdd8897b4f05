"""The poster's tables for any dataset in one command: every cell is an ordinary run of
`python -m tfjac.run` with its own run directory; this tool only schedules and collects.

  python tools/reproduce.py --table=distill --samples_per_class=10,50,full --seeds=3 --tune
  python tools/reproduce.py --table=transfer --seeds=3
  python tools/reproduce.py --table=distill --dataset=cifar100 --data_dir=DIR -- --epochs=100

One teacher serves the whole table (trained first in <out>/teacher unless --teacher is given).
At a given seed every row of a column trains on the same N-per-class subset and starts from
the same student weights (both are seeded by --seed in tfjac.run). `--tune` chooses, per row and
column, the hint weights (and any other value of --tune_space) on the first seed by the best
*validation* accuracy (results.json's best_val_accuracy): the test split is never read for a
choice. The chosen values are written to tuning.json and used for every seed.

Interrupted and rerun with the same command, finished cells (those with a results.json) are
skipped and an interrupted cell resumes inside tfjac.run. Writes <out>/results.md (mean +- std
per cell, the best of each column in bold, the poster's numbers beside ours for CIFAR-100 / MIT
Indoor 67), results.csv, results.png, tuning.json and the log of every cell.
Arguments after `--` are passed to every run (teacher included), after the table's own flags.
"""
import collections
import concurrent.futures
import csv
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

from tfjac import atomic  # noqa: E402

Row = collections.namedtuple("Row", "key label args")

# The rows of the poster's two tables: key (used in directory names and the poster's data),
# label, and the tfjac.run flags that make the row.
TABLES = {
    "distill": (
        Row("ce", "CE", ("--mode=distill", "--hints=ce")),
        Row("act_ce", "act + CE", ("--mode=distill", "--hints=act,ce")),
        Row("act_jac_ce", "act + jac + CE", ("--mode=distill", "--hints=act,jac,ce")),
        Row("act", "act", ("--mode=distill", "--hints=act")),
        Row("act_jac", "act + jac", ("--mode=distill", "--hints=act,jac")),
    ),
    "transfer": (
        Row("none", "no transfer", ("--mode=transfer", "--hints=ce")),
        Row("oracle", "fine-tuning oracle", ("--mode=finetune", "--hints=ce")),
        Row("lwf", "LwF", ("--mode=transfer", "--hints=ce,lwf")),
        Row("lwf_jac", "LwF + jac", ("--mode=transfer", "--hints=ce,lwf,jac")),
        Row("lwf_at", "LwF + AT", ("--mode=transfer", "--hints=ce,lwf,at")),
        Row("lwf_at_jac", "LwF + AT + jac", ("--mode=transfer", "--hints=ce,lwf,at,jac")),
    ),
}

Preset = collections.namedtuple("Preset",
                                "run_args teacher_args sizes poster_columns size_args")

# Settings of the known datasets: flags of every cell, flags of the teacher's run, default
# columns, how a column maps to the poster's ('full' is the whole training split), and flags
# of a column (as in the flagfiles: every cell of the paper's tables gets as many updates as
# one pass over the full training split).
PRESETS = {
    ("distill", "digits"): Preset((), ("--mode=teacher",), ("10", "50", "full"), {}, {}),
    ("distill", "cifar100"): Preset(
        ("--flagfile=flags/cifar100_base.cfg",),
        ("--flagfile=flags/cifar100_base.cfg", "--mode=teacher"), ("10", "50", "full"),
        {"full": "500"}, {"10": ("--steps_per_epoch=352",), "50": ("--steps_per_epoch=352",)}),
    ("transfer", "digits"): Preset(
        ("--flagfile=flags/digits_transfer_base.cfg",),
        ("--flagfile=flags/digits_transfer_teacher.cfg",), ("10", "50", "full"), {}, {}),
    ("transfer", "mit_indoor67"): Preset(
        ("--flagfile=flags/indoor67_base.cfg",), None, ("25", "50", "full"), {},
        {"25": ("--steps_per_epoch=76",), "50": ("--steps_per_epoch=76",)}),
}

# What --tune searches by default: for each hint of a row, the flag and its candidate values
# (the defaults of tfjac.run are among them). A row searches the product over its hints.
TUNE_SPACE = {
    "act": ("act_weight", ("0.1", "1")),
    "jac": ("jac_weight", ("1", "10")),
    "kd": ("kd_temperature", ("2", "4")),
    "lwf": ("lwf_weight", ("0.3", "1")),
    "at": ("at_weight", ("100", "1000")),
}


def define_flags():
  """Called only when run as a script: the tests import this module beside tfjac's own flags
  (--dataset, --seeds ... would be defined twice)."""
  flags.DEFINE_enum("table", "distill", list(TABLES), "Which of the poster's tables.")
  flags.DEFINE_string("dataset", "digits", "--dataset of every run (digits: the embedded one).")
  flags.DEFINE_string("data_dir", None, "--data_dir of every run (real datasets).")
  flags.DEFINE_list("samples_per_class", [], "Columns: images per class, 'full' for the whole "
                    "training split. Default: the dataset's preset (digits: 10,50,full).")
  flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 of every cell.")
  flags.DEFINE_list("rows", [], "Rows to run (default: all of --table). Keys: distill: "
                    + ",".join(r.key for r in TABLES["distill"]) + "; transfer: "
                    + ",".join(r.key for r in TABLES["transfer"]) + ".")
  flags.DEFINE_string("teacher", None, "A trained teacher for every cell; default: train one "
                      "in <out>/teacher with the preset's teacher flags (required for a transfer "
                      "table on a dataset without a preset).")
  flags.DEFINE_string("out", None,
                      "Output directory; default runs/reproduce/<table>_<dataset>.")
  flags.DEFINE_boolean("tune", False, "Choose each row's weights on the validation split of the "
                       "first seed, per column, among --tune_space, before running the seeds.")
  flags.DEFINE_string("tune_space", None, "Override the search: 'flag=v1,v2;flag2=v3,v4' (e.g. "
                      "'jac_weight=1,10,100;learning_rate=0.001,0.003'). Flags of a row's "
                      "hints default to the built-in space; a flag given here is searched in "
                      "every row.")
  flags.DEFINE_integer("jobs", 1, "Runs at a time (within a phase: the tuning trials, then the "
                       "cells). A small network leaves CPU cores idle; on one GPU keep 1.")
  flags.DEFINE_boolean("dry_run", False, "Print the commands of every run and exit.")


FLAGS = flags.FLAGS


class ReproduceError(Exception):
  pass


def size_arg(size):
  return "0" if size == "full" else size


def parse_sizes(values):
  sizes = []
  for v in values:
    v = v.strip().lower()
    if v != "full" and not (v.isdigit() and int(v) > 0):
      raise ReproduceError(f"--samples_per_class: {v!r} is neither a positive integer nor "
                           "'full'")
    sizes.append(v)
  return tuple(sizes)


def parse_tune_space(text):
  """'a=1,2;b=3' -> {'a': ('1', '2'), 'b': ('3',)}."""
  space = {}
  for part in filter(None, (p.strip() for p in (text or "").split(";"))):
    name, sep, values = part.partition("=")
    values = tuple(v.strip() for v in values.split(",") if v.strip())
    if not sep or not name.strip() or not values:
      raise ReproduceError(f"--tune_space: {part!r} is not 'flag=value1,value2'")
    space[name.strip().lstrip("-")] = values
  return space


def row_hints(row):
  return next(a.split("=", 1)[1] for a in row.args if a.startswith("--hints=")).split(",")


def candidates(row, override=None):
  """The settings --tune tries for `row`: a list of {flag: value} (one empty dict: nothing to
  tune)."""
  space = {}
  for hint in row_hints(row):
    if hint in TUNE_SPACE:
      flag, values = TUNE_SPACE[hint]
      space[flag] = values
  for flag, values in (override or {}).items():
    space[flag] = values
  names = sorted(space)
  return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]


def setting_args(setting):
  return tuple(f"--{k}={v}" for k, v in sorted(setting.items()))


def setting_name(setting):
  return "_".join(f"{k}={v}" for k, v in sorted(setting.items())) or "default"


def read_results(workdir):
  path = os.path.join(workdir, "results.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def mean_std(values):
  if not values:
    return None, None
  m = sum(values) / len(values)
  if len(values) < 2:
    return m, 0.0
  return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


class Progress:
  """A line on stderr as each run starts: which cell, how many have started, and the time left,
  estimated from the runs this process actually ran (divided among `jobs` at a time)."""

  def __init__(self, total, jobs=1):
    self.total, self.jobs = total, jobs
    self.started = self.done = self.ran = 0
    self.ran_seconds = 0.0
    self.lock = threading.Lock()

  def begin(self, what):
    with self.lock:
      self.started += 1
      eta = ""
      if self.ran:
        left = (self.total - self.done) * self.ran_seconds / self.ran / self.jobs
        eta = f", about {left / 60:.0f} min left"
      print(f"[{self.started}/{self.total}{eta}] {what}", file=sys.stderr, flush=True)

  def end(self, seconds, ran):
    with self.lock:
      self.done += 1
      if ran:
        self.ran += 1
        self.ran_seconds += seconds


class Harness:
  """Schedules the runs of one table into `out` and collects their results."""

  def __init__(self, table, dataset, sizes, seeds, rows, out, *, data_dir=None, teacher=None,
               extra_args=(), tune=False, tune_override=None, dry_run=False, jobs=1,
               python=sys.executable):
    self.table, self.dataset, self.sizes, self.seeds = table, dataset, sizes, seeds
    self.rows, self.out = rows, os.path.abspath(out)
    self.preset = PRESETS.get((table, dataset), Preset((), ("--mode=teacher",), sizes, {}, {}))
    self.data_dir, self.teacher = data_dir, teacher
    self.extra_args = tuple(extra_args)
    self.tune, self.tune_override, self.dry_run = tune, tune_override, dry_run
    self.python, self.jobs = python, jobs
    self.failures = []
    if table == "transfer" and teacher is None and self.preset.teacher_args is None:
      raise ReproduceError(f"--teacher: the transfer table on {dataset!r} needs a teacher "
                           "trained on the source data (a .keras file or SavedModel)")
    if teacher is not None and not os.path.exists(teacher):
      raise ReproduceError(f"--teacher: {teacher} does not exist")

  # --- commands -----------------------------------------------------------------------

  def common_args(self):
    args = [f"--dataset={self.dataset}"]
    if self.data_dir:
      args.append(f"--data_dir={self.data_dir}")
    return args

  def teacher_path(self):
    return self.teacher or os.path.join(self.out, "teacher", "teacher")

  def teacher_command(self):
    return ([*self.preset.teacher_args, *self.common_args(), "--seed=0",
             f"--workdir={os.path.join(self.out, 'teacher')}", *self.extra_args])

  def cell_command(self, row, size, seed, setting, workdir):
    return [*self.preset.run_args, *self.common_args(), *row.args,
            *self.preset.size_args.get(size, ()), f"--samples_per_class={size_arg(size)}",
            f"--seed={seed}", f"--teacher={self.teacher_path()}", f"--workdir={workdir}",
            *setting_args(setting), *self.extra_args]

  def execute(self, args, workdir, what, progress):
    """Runs tfjac.run unless `workdir` holds its results already; returns results or None."""
    progress.begin(what)
    done = read_results(workdir)
    if done is not None or self.dry_run:
      if self.dry_run:
        print(" ".join(["python -m tfjac.run", *args]))
      progress.end(0, False)
      return done
    os.makedirs(workdir, exist_ok=True)
    start = time.time()
    with open(os.path.join(workdir, "log.txt"), "a") as log:
      log.write("$ python -m tfjac.run " + " ".join(args) + "\n")
      log.flush()
      code = subprocess.call([self.python, "-m", "tfjac.run", *args], cwd=REPO, stdout=log,
                             stderr=subprocess.STDOUT)
    progress.end(time.time() - start, True)
    if code != 0:
      self.failures.append((what, workdir))
      print(f"  failed (exit {code}); see {workdir}/log.txt", file=sys.stderr, flush=True)
      return None
    return read_results(workdir)

  # --- the table ------------------------------------------------------------------------

  def cell_dir(self, row, size, seed):
    return os.path.join(self.out, "cells", row.key, f"n{size}", f"seed{seed}")

  def tune_dir(self, row, size, setting):
    return os.path.join(self.out, "tune", row.key, f"n{size}", setting_name(setting))

  def run(self):
    """Teacher first; then every tuning trial; then every remaining cell. Runs of one phase
    are independent and go `jobs` at a time."""
    os.makedirs(self.out, exist_ok=True)
    spaces = {row.key: candidates(row, self.tune_override) if self.tune else [{}]
              for row in self.rows}
    tuned = [(size, row) for size in self.sizes for row in self.rows
             if len(spaces[row.key]) > 1]
    total = ((self.teacher is None) + len(self.sizes) * len(self.rows) * self.seeds +
             sum(len(spaces[row.key]) - 1 for _, row in tuned))
    progress = Progress(total, self.jobs)
    if self.teacher is None:
      if self.execute(self.teacher_command(), os.path.join(self.out, "teacher"), "teacher",
                      progress) is None and not self.dry_run:
        raise ReproduceError(f"the teacher's run failed: {self.out}/teacher/log.txt")
    trials = {(size, row.key, setting_name(setting)): (
        self.cell_command(row, size, 0, setting, self.tune_dir(row, size, setting)),
        self.tune_dir(row, size, setting), f"tune {row.key} n={size} {setting_name(setting)}")
              for size, row in tuned for setting in spaces[row.key]}
    trial_results = self.execute_all(trials, progress)
    tuning, chosen, cells, jobs = {}, {}, {}, {}
    for size, row in tuned:
      trials = []
      for setting in spaces[row.key]:
        res = trial_results[(size, row.key, setting_name(setting))]
        trials.append({"setting": setting, "workdir": self.tune_dir(row, size, setting),
                       "best_val_accuracy": res and res["student"]["best_val_accuracy"]})
      finished = [t for t in trials if t["best_val_accuracy"] is not None]
      # By validation accuracy only; ties: the first in the search order (max keeps the first).
      # The chosen trial is the cell's seed-0 run.
      best = max(finished, key=lambda t: t["best_val_accuracy"]) if finished else None
      chosen[(size, row.key)] = best["setting"] if best else None
      cells[(row.key, size, 0)] = read_results(best["workdir"]) if best else None
      tuning[f"{row.key}/n{size}"] = {"chosen": chosen[(size, row.key)], "trials": trials}
    for size in self.sizes:
      for row in self.rows:
        setting = chosen.get((size, row.key), {})
        if setting is None:  # every trial failed: nothing to run the other seeds with
          continue
        for seed in range(self.seeds):
          if (row.key, size, seed) in cells:
            continue
          workdir = self.cell_dir(row, size, seed)
          jobs[(row.key, size, seed)] = (
              self.cell_command(row, size, seed, setting, workdir), workdir,
              f"{row.key} n={size} seed={seed} {setting_name(setting)}")
    cells.update(self.execute_all(jobs, progress))
    if self.dry_run:
      return None
    atomic.write_json(os.path.join(self.out, "tuning.json"), tuning)
    return self.collect(cells, tuning)

  def execute_all(self, jobs, progress):
    """{key: (args, workdir, what)} -> {key: results or None}, `self.jobs` runs at a time."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=self.jobs) as pool:
      futures = {k: pool.submit(self.execute, *job, progress) for k, job in jobs.items()}
      return {k: f.result() for k, f in futures.items()}

  # --- outputs ----------------------------------------------------------------------------

  def collect(self, cells, tuning):
    stats = {}
    for (row, size, seed), res in cells.items():
      entry = stats.setdefault((row, size), {"test": [], "val": [], "seconds": []})
      if res is not None:
        entry["test"].append(100 * res["student"]["test_accuracy"])
        entry["val"].append(100 * res["student"]["best_val_accuracy"])
        entry["seconds"].append(res["total_seconds"])
    poster = load_poster(self.table, self.dataset)
    teacher = read_results(os.path.join(self.out, "teacher")) if self.teacher is None else None
    write_csv(os.path.join(self.out, "results.csv"), self.rows, self.sizes, stats, poster,
              self.preset.poster_columns)
    markdown = results_markdown(self, stats, poster, tuning, teacher)
    atomic.write_text(os.path.join(self.out, "results.md"), markdown)
    plot(os.path.join(self.out, "results.png"), self.rows, self.sizes, stats,
         f"{self.table} on {self.dataset}")
    return markdown


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


def main(argv):
  try:
    table = TABLES[FLAGS.table]
    keys = FLAGS.rows or [r.key for r in table]
    unknown = [k for k in keys if k not in {r.key for r in table}]
    if unknown:
      raise ReproduceError(f"--rows: unknown {unknown}; valid: {[r.key for r in table]}")
    rows = [r for r in table if r.key in keys]
    if FLAGS.seeds < 1 or FLAGS.jobs < 1:
      raise ReproduceError(f"--seeds and --jobs must be at least 1, got {FLAGS.seeds} and "
                           f"{FLAGS.jobs}")
    preset = PRESETS.get((FLAGS.table, FLAGS.dataset))
    sizes = parse_sizes(FLAGS.samples_per_class or (preset.sizes if preset else []))
    if not sizes:
      raise ReproduceError(f"--samples_per_class: no preset for {FLAGS.dataset!r}; give the "
                           "columns, e.g. --samples_per_class=10,50,full")
    out = FLAGS.out or os.path.join("runs", "reproduce", f"{FLAGS.table}_{FLAGS.dataset}")
    harness = Harness(FLAGS.table, FLAGS.dataset, sizes, FLAGS.seeds, rows, out,
                      data_dir=FLAGS.data_dir, teacher=FLAGS.teacher, extra_args=argv[1:],
                      tune=FLAGS.tune, tune_override=parse_tune_space(FLAGS.tune_space),
                      dry_run=FLAGS.dry_run, jobs=FLAGS.jobs)
    start = time.time()
    markdown = harness.run()
  except ReproduceError as e:
    print(f"reproduce: error: {e}", file=sys.stderr)
    sys.exit(2)
  if markdown is None:
    return
  print(markdown)
  print(f"wall time of this invocation: {(time.time() - start) / 60:.1f} min; outputs in "
        f"{harness.out}/results.{{md,csv,png}}")
  if harness.failures:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
