"""The poster's tables for any dataset in one command: every cell is an ordinary run of
`python -m tfjac.run` with its own run directory; this tool only schedules and collects.

  python tools/reproduce.py --table=distill --samples_per_class=10,50,full --seeds=3 --tune
  python tools/reproduce.py --table=transfer --seeds=3
  python tools/reproduce.py --table=lazy --seeds=3 --tune     # --jac_every=K at 3 and 10/class
  python tools/reproduce.py --table=distill --dataset=cifar100 --data_dir=DIR -- --epochs=100
  python tools/reproduce.py --table=robustness --seeds=3 --docs=docs/results/robustness_digits.md

One teacher serves the whole table (trained first in <out>/teacher unless --teacher is given).
At a given seed every row of a column trains on the same N-per-class subset and starts from
the same student weights (both are seeded by --seed in tfjac.run), and every column gets the
same number of optimizer steps (--train_steps, or the preset's --steps_per_epoch). `--tune`
chooses, per row and column, the learning rate and the hint weights on the first seed by the
best *validation* accuracy (results.json's best_val_accuracy): the test split is never read
for a choice. Every row gets the same number of trials (WEIGHT_LEVELS says how). The chosen
values are written to tuning.json and used for every seed.

Interrupted and rerun with the same command, finished cells (those with a results.json) are
skipped and an interrupted cell resumes inside tfjac.run. Writes <out>/results.md (mean +- std
per cell, the best of each column in bold, the poster's numbers beside ours for CIFAR-100 / MIT
Indoor 67), results.csv, results.png (rendered by tools/results_tables.py), tuning.json and
the log of every cell.
Arguments after `--` are passed to every run (teacher included), after the table's own flags.

--table=robustness is of another shape (RobustnessTable): students without a teacher
(--mode=regularize) whose columns are test noise levels (--sigmas), one size of
--samples_per_class (default 50); it writes <out>/results.{md,csv} and, with --docs, the same
two files there. Every table launches its runs through `launch` and reads them with
`results_tables.read_results`.
"""
import collections
import concurrent.futures
import csv
import itertools
import os
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

import results_tables  # noqa: E402  (tools/: results.md, .csv, .png)
from results_tables import read_results, setting_name  # noqa: E402
from tfjac import atomic  # noqa: E402

# The grid: TABLES x PRESETS x columns. tools/flagfiles.py writes the paper's flagfiles
# (flags/*.cfg) from it: rerun it after a change here (tests/test_flagfiles.py checks).
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

# Lazy Jacobian matching (issue 15): the distill rows that show the poster's ordering, and
# act + jac + CE with the Jacobian terms on every K-th step (weight x K), at equal budgets.
_BASE = {r.key: r for r in TABLES["distill"]}
TABLES["lazy"] = (
    _BASE["ce"], _BASE["act_ce"], _BASE["act_jac_ce"],
    *(Row(f"act_jac_ce_k{k}", f"act + jac + CE, jac every {k}th step",
          (*_BASE["act_jac_ce"].args, f"--jac_every={k}")) for k in (4, 16)))

# How the Jacobian term is computed and in what precision (issue 22), at equal budgets: the
# default act + jac + CE (label row, double backprop, float32) beside the estimators covering
# every output along one random probe (forward mode, central differences) and the default in
# bfloat16. Row keys of the distill rows are shared, so a --out holding a distill table's cells
# reuses them.
TABLES["variants"] = (
    _BASE["act_ce"], _BASE["act_jac_ce"],
    Row("act_jac_ce_jvp", "act + jac + CE, jvp (all outputs, 1 probe)",
        (*_BASE["act_jac_ce"].args, "--jac_estimator=jvp", "--jac_target=all")),
    Row("act_jac_ce_fd", "act + jac + CE, fd (all outputs, 1 probe)",
        (*_BASE["act_jac_ce"].args, "--jac_estimator=fd", "--jac_target=all")),
    Row("act_jac_ce_bf16", "act + jac + CE, bfloat16",
        (*_BASE["act_jac_ce"].args, "--mixed_precision=mixed_bfloat16")),
)

# Tables whose rows compare one mechanism at fixed settings (how the Jacobian is computed, how
# often): each cell is one fit (--choose_on_validation=off), as they were made before the
# choice existed; the distill and transfer tables run the product's default.
ONE_FIT = ("lazy", "variants")

# Robustness to Gaussian input noise (docs/results-noise.md): students trained without a teacher
# (--mode=regularize) with CE, CE + Jacobian-norm penalty and CE on noisy inputs; the columns
# are the test noise levels. RobustnessTable runs it.
ROBUSTNESS_ROWS = (
    Row("ce", "CE", ("--hints=ce",)),
    Row("ce_jacnorm", "CE + sigma^2 ‖dS/dx‖^2 (`ce,jacnorm`)", ("--hints=ce,jacnorm",)),
    Row("noisy_ce", "CE on noisy inputs (`noisy_ce`)", ("--hints=noisy_ce",)),
)
ROBUSTNESS_SIGMAS = ("0.05", "0.1", "0.2", "0.3", "0.5")

Preset = collections.namedtuple("Preset",
                                "run_args teacher_args sizes poster_columns size_args "
                                "train_steps learning_rate")

# Settings of the known datasets: flags of every cell, flags of the teacher's run, default
# columns, how a column maps to the poster's ('full' is the whole training split), flags of a
# column, the --train_steps of every cell, and the learning rate of its runs (the centre of
# the tuning grid: Adam's 1e-3 for the digits, the flagfiles' SGD rates). Every column of a table gets the same number of
# optimizer steps: the paper's flagfiles by giving each epoch as many steps as one pass over
# the full training split (--steps_per_epoch), the digits presets by --train_steps = 60
# epochs of the full column (1132 training images of digits at batch 32: 36 steps per epoch;
# 564 of digits 5-9 in the transfer demo: 18).
# The tables run here (digits, Fashion-MNIST) pin float32: --mixed_precision's default, auto,
# picks bfloat16 on CPUs with bfloat16 units, so without the pin a table would change with the
# CPU that reruns it. bfloat16 has its own row (the variants table).
FLOAT32 = ("--mixed_precision=float32",)
PRESETS = {
    ("distill", "digits"): Preset(FLOAT32, ("--mode=teacher", *FLOAT32), ("10", "50", "full"),
                                  {}, {}, 2160, 0.001),
    ("distill", "cifar100"): Preset(
        ("--flagfile=flags/cifar100_base.cfg",),
        ("--flagfile=flags/cifar100_base.cfg", "--mode=teacher"), ("10", "50", "full"),
        {"full": "500"}, {"10": ("--steps_per_epoch=352",), "50": ("--steps_per_epoch=352",)},
        0, 0.1),
    # Fashion-MNIST (Debian's dataset-fashion-mnist or tfds): the poster's shape, a VGG-9
    # teacher larger than the VGG-4 student: VGG-9 x0.5 (1.18 M parameters, 37 M
    # multiply-accumulates per image) against the student's VGG-4 x1 (0.37 M, 29 M); 3 epochs
    # (93.0% test, 11 min on 2 CPU cores), 2% of the training split for validation (1,200
    # images), 500 steps in every column (5 validations of 100 steps); 'full' is 58,800 images,
    # so the full column gets a third of a pass: the budget of the 10-per-class column, not a
    # converged run.
    ("distill", "fashion_mnist"): Preset(
        ("--validation_fraction=0.02", "--steps_per_epoch=100", *FLOAT32),
        ("--mode=teacher", "--validation_fraction=0.02", "--teacher_model=vgg9",
         "--teacher_width=0.5", "--teacher_epochs=3", "--batch_size=128", *FLOAT32),
        ("10", "50", "full"), {}, {}, 500, 0.001),
    ("lazy", "digits"): Preset(FLOAT32, ("--mode=teacher", *FLOAT32), ("3", "10"), {}, {}, 2160,
                               0.001),
    ("transfer", "digits"): Preset(
        ("--flagfile=flags/digits_transfer_base.cfg",),
        ("--flagfile=flags/digits_transfer_teacher.cfg",), ("10", "50", "full"), {}, {}, 1080,
        0.001),
    # Fashion-MNIST transfer (issue 21 point 3): a VGG-9 x0.5 teacher trained on classes 5-9
    # (sandal, shirt, sneaker, bag, ankle boot; 3 epochs), VGG-4 x1 students on classes 0-4
    # (relabelled 0-4), 500 steps in every cell, 2% of the training split for validation.
    ("transfer", "fashion_mnist"): Preset(
        ("--classes=0,1,2,3,4", "--model=vgg4",
         "--validation_fraction=0.02", "--steps_per_epoch=100", *FLOAT32),
        ("--mode=teacher", "--classes=5,6,7,8,9",
         "--validation_fraction=0.02", "--teacher_model=vgg9", "--teacher_width=0.5",
         "--teacher_epochs=3", "--batch_size=128", *FLOAT32),
        ("10", "50"), {}, {}, 500, 0.001),
    ("transfer", "mit_indoor67"): Preset(
        ("--flagfile=flags/indoor67_base.cfg",), None, ("25", "50", "full"), {},
        {"25": ("--steps_per_epoch=76",), "50": ("--steps_per_epoch=76",)}, 0, 0.01),
}
# The variants table: the distill presets' cells at 10 per class.
PRESETS.update({(("variants", d)): PRESETS[("distill", d)]._replace(sizes=("10",))
                for d in ("digits", "fashion_mnist")})

# What --tune searches. Every row of a table gets the same number of trials, T = 2^(k - 1)
# for the table's largest number k of factors (distill 4, transfer 8). A row's factors are
# the learning rate and the weight of each of its hints but one: the anchor (ce where the row
# has it, else its first hint) stays at 1, because under Adam multiplying every weight by one
# constant changes (almost) nothing, so such trials would be rerolls. Each factor has two
# levels (WEIGHT_LEVELS, the shared learning-rate grid); a row with fewer factors gets a finer
# learning-rate grid that contains the shared one (a row with only the learning rate to tune:
# T learning rates), a row with one factor more than fits in T runs the half fraction of its
# 2^k design (the last weight's level from the parity of the others'): every level of every
# factor appears equally often, and every pair of levels of two factors once.
WEIGHT_LEVELS = {
    "act": ("0.1", "1"),
    "jac": ("10", "100"),  # the normalised jac term is bounded (~1.7 untrained, <= 4) while act
                           # starts 10-100x larger: at weight 1 it barely moves the student
                           # (docs/results/fmnist_investigation.md: 30-300 best on Fashion-MNIST)
    "lwf": ("0.3", "1"),
    "at": ("100", "1000"),
}
# The levels under a loss scaling (tfjac's default --loss_scaling=initial), where a weight is
# relative to the other hints' (1: the same share at the start): around the default 1. The
# raw levels above serve tables run with `-- --loss_scaling=none`.
SCALED_WEIGHT_LEVELS = {"act": ("0.3", "1"), "jac": ("1", "3"), "lwf": ("0.3", "1"),
                        "at": ("0.3", "1")}


def weight_levels(extra_args):
  """The weight levels --tune searches for runs given `extra_args`: raw or scaled."""
  raw = any(a.replace("-", "").replace("_", "") == "lossscaling=none" for a in extra_args)
  return WEIGHT_LEVELS if raw else SCALED_WEIGHT_LEVELS


LEARNING_RATES = {  # multiples of the preset's learning rate, by number of levels; each
    2: (1, 3),        # contains the shared grid (1 and 3 times the preset's rate)
    4: (0.3, 1, 3, 10),
    8: (0.1, 0.2, 0.5, 1, 2, 3, 5, 10),
}


def define_flags():
  """Called only when run as a script: the tests import this module beside tfjac's own flags
  (--dataset, --seeds ... would be defined twice)."""
  flags.DEFINE_enum("table", "distill", [*TABLES, "robustness"], "Which table: the poster's "
                    "(distill, transfer), lazy, variants, or robustness (RobustnessTable).")
  flags.DEFINE_string("dataset", "digits", "--dataset of every run (digits: the embedded one).")
  flags.DEFINE_string("data_dir", None, "--data_dir of every run (real datasets).")
  flags.DEFINE_list("samples_per_class", [], "Columns: images per class, 'full' for the whole "
                    "training split. Default: the dataset's preset (digits: 10,50,full).")
  flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 of every cell.")
  flags.DEFINE_list("rows", [], "Rows to run (default: all of --table). Keys: distill: "
                    + "; ".join(f"{t}: " + ",".join(r.key for r in rows)
                                for t, rows in TABLES.items()) + ".")
  flags.DEFINE_string("teacher", None, "A trained teacher for every cell; default: train one "
                      "in <out>/teacher with the preset's teacher flags (required for a transfer "
                      "table on a dataset without a preset).")
  flags.DEFINE_string("out", None,
                      "Output directory; default runs/reproduce/<table>_<dataset>.")
  flags.DEFINE_boolean("tune", False, "Choose each row's weights on the validation split of the "
                       "first seed, per column, among --tune_space, before running the seeds.")
  flags.DEFINE_string("tune_space", None, "Replace the built-in design (the same number of "
                      "trials in every row: the module's docstring and WEIGHT_LEVELS): "
                      "'flag=v1,v2;flag2=v3,v4' (e.g. 'jac_weight=1,10,100;learning_rate="
                      "0.001,0.003'); each row then searches the product of the given flags "
                      "that apply to it (a hint's weight: rows with that hint), so rows may get "
                      "unequal trial counts; results.md gives each row's count.")
  flags.DEFINE_integer("train_steps", None, "--train_steps of every cell (the same optimizer "
                       "steps for every column). Default: the preset's (digits: 60 epochs of "
                       "the full column, 2160 steps for distill, 1080 for transfer; the "
                       "CIFAR-100 and MIT Indoor presets equalise by --steps_per_epoch in "
                       "their flagfiles instead). 0: each run's --epochs (fewer steps for "
                       "fewer images). Required for a dataset without a preset.")
  flags.DEFINE_integer("jobs", 1, "Runs at a time (within a phase: the tuning trials, then the "
                       "cells). A small network leaves CPU cores idle; on one GPU keep 1.")
  flags.DEFINE_boolean("dry_run", False, "Print the commands of every run and exit.")
  flags.DEFINE_float("noise_sigma", 0.3, "--table=robustness: --noise_sigma of the training "
                     "(jacnorm, noisy_ce).")
  flags.DEFINE_list("sigmas", list(ROBUSTNESS_SIGMAS), "--table=robustness: "
                    "--robustness_sigmas, the test noise levels (columns).")
  flags.DEFINE_string("docs", None, "--table=robustness: also write the table to this .md "
                      "file and the CSV beside it (.csv).")


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


def tuned_weights(row):
  """The hints of `row` whose weights --tune varies: all with levels but the anchor (ce if
  the row has it, else its first hint), whose weight stays at its default."""
  hints = row_hints(row)
  anchor = "ce" if "ce" in hints else hints[0]
  return [h for h in hints if h in WEIGHT_LEVELS and h != anchor]


def trials_per_row(table):
  """T of the module's design: 2^(k - 1), k the largest number of factors of a row (the
  learning rate and the tuned weights) in `table`."""
  return 2 ** max(len(tuned_weights(r)) for r in TABLES[table])


def candidates(row, override=None, trials=4, learning_rate=0.001, level_table=None):
  """The settings --tune tries for `row`: a list of {flag: value}, `trials` of them for the
  built-in design (see WEIGHT_LEVELS; learning rates as multiples of `learning_rate`); with
  `override` ({flag: values}), the product of the override's flags that apply to the row (one
  empty dict: nothing to tune)."""
  if override:
    hints = row_hints(row)
    space = {flag: values for flag, values in override.items()
             if not flag.endswith("_weight") or flag[:-len("_weight")] in hints}
    names = sorted(space)
    return [dict(zip(names, combo)) for combo in itertools.product(*(space[n] for n in names))]
  levels_of = level_table or WEIGHT_LEVELS
  weights = tuned_weights(row)
  if 2 ** len(weights) > trials:
    raise ReproduceError(f"row {row.key}: {len(weights) + 1} factors do not fit in {trials} "
                         "trials")
  full = 2 ** (len(weights) + 1) <= trials  # else the half fraction of the 2^k design
  free = weights if full else weights[:-1]
  rates = [f"{learning_rate * m:.3g}" for m in
           LEARNING_RATES[trials // 2 ** len(free) if full else 2]]
  settings = []
  for rate_index, rate in enumerate(rates):
    for levels in itertools.product((0, 1), repeat=len(free)):
      setting = {"learning_rate": rate}
      setting.update({f"{h}_weight": levels_of[h][i] for h, i in zip(free, levels)})
      if not full:
        last = weights[-1]
        setting[f"{last}_weight"] = levels_of[last][(rate_index + sum(levels)) % 2]
      settings.append(setting)
  return settings


def setting_args(setting):
  return tuple(f"--{k}={v}" for k, v in sorted(setting.items()))


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


COMMAND_PREFIX = "$ python -m tfjac.run "


def launch(args, workdir, python=sys.executable):
  """Runs `python -m tfjac.run ARGS` from the repository, its output and the command appended
  to `workdir`/log.txt (the command first: recorded_command reads it); returns the exit code.
  The one place where the tables start a run."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "log.txt"), "a") as log:
    log.write(COMMAND_PREFIX + " ".join(args) + "\n")
    log.flush()
    return subprocess.call([python, "-m", "tfjac.run", *args], cwd=REPO, stdout=log,
                           stderr=subprocess.STDOUT)


def recorded_command(workdir):
  """The tfjac.run arguments of the last command logged in `workdir`/log.txt, or None."""
  try:
    with open(os.path.join(workdir, "log.txt")) as f:
      lines = [line for line in f if line.startswith(COMMAND_PREFIX)]
  except FileNotFoundError:
    return None
  return lines[-1][len(COMMAND_PREFIX):].split() if lines else None


class Harness:
  """Schedules the runs of one table into `out` and collects their results."""

  def __init__(self, table, dataset, sizes, seeds, rows, out, *, data_dir=None, teacher=None,
               extra_args=(), tune=False, tune_override=None, dry_run=False, jobs=1,
               python=sys.executable, train_steps=None):
    self.table, self.dataset, self.sizes, self.seeds = table, dataset, sizes, seeds
    self.rows, self.out = rows, os.path.abspath(out)
    self.preset = PRESETS.get((table, dataset),
                              Preset((), ("--mode=teacher",), sizes, {}, {}, None, 0.001))
    self.train_steps = self.preset.train_steps if train_steps is None else train_steps
    if self.train_steps is None:
      raise ReproduceError(f"--train_steps: no preset for the {table} table on {dataset!r}: "
                           "give the optimizer steps of every cell (the same for every column), "
                           "or 0 to let each run use its --epochs")
    if self.train_steps < 0:
      raise ReproduceError(f"--train_steps must be >= 0, got {self.train_steps}")
    self.trials = trials_per_row(table)
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
    budget = (f"--train_steps={self.train_steps}",) if self.train_steps else ()
    return [*self.preset.run_args, *self.common_args(), *row.args,
            *self.preset.size_args.get(size, ()), *budget,
            f"--samples_per_class={size_arg(size)}",
            f"--seed={seed}", f"--teacher={self.teacher_path()}", f"--workdir={workdir}",
            *setting_args(setting), *self.one_fit(), *self.extra_args]

  def one_fit(self):
    """--choose_on_validation=off where a table compares fixed settings: every --tune trial
    and its seeds (a trial's settings are what is being chosen), and the tables of ONE_FIT.
    The distill and transfer tables without --tune run tfjac.run's default (auto)."""
    return (("--choose_on_validation=off",) if self.tune or self.table in ONE_FIT else ())

  def execute(self, args, workdir, what, progress):
    """Runs tfjac.run unless `workdir` holds its results already; returns results or None."""
    progress.begin(what)
    done = read_results(workdir)
    if done is not None:
      ran = recorded_command(workdir)
      if ran is not None and ran != " ".join(args).split():
        raise ReproduceError(
            f"{workdir} holds the results of another command than this table's cell "
            f"({what}): it ran `{' '.join(ran)}`, the cell is now `{' '.join(args)}` (e.g. a "
            "tuning trial that failed before and chose differently on this rerun); remove "
            "that directory to run the cell again")
    if done is not None or self.dry_run:
      if self.dry_run:
        print(" ".join(["python -m tfjac.run", *args]))
      progress.end(0, False)
      return done
    start = time.time()
    code = launch(args, workdir, self.python)
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
    spaces = {row.key: candidates(row, self.tune_override, self.trials,
                                  self.preset.learning_rate,
                                  weight_levels(self.extra_args)) if self.tune else [{}]
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
      entry = stats.setdefault((row, size), {"test": [], "val": [], "seconds": [],
                                             "steps": [], "train_seconds": [], "kept": []})
      if res is not None:
        entry["test"].append(100 * res["student"]["test_accuracy"])
        entry["val"].append(100 * res["student"]["best_val_accuracy"])
        entry["seconds"].append(res["total_seconds"])
        entry["steps"].append(res["student"].get("train_steps"))
        choice = res["student"].get("choice")
        if choice:  # chosen on validation: the cost is both fits, whole (results_tables)
          entry["kept"].append(choice["kept"])
          for candidate in choice["candidates"]:  # each fit alone, for the record
            entry.setdefault(f"{candidate['name']}_test", []).append(
                100 * candidate["test_accuracy"])
          entry["train_seconds"].append(res["student"]["train_seconds"])
          continue
        phases = res["student"].get("fit_phases_seconds") or {}
        if "training" in phases:
          entry["train_seconds"].append(phases["training"])
    poster = results_tables.load_poster(self.table, self.dataset)
    teacher = read_results(os.path.join(self.out, "teacher")) if self.teacher is None else None
    results_tables.write_csv(os.path.join(self.out, "results.csv"), self.rows, self.sizes,
                             stats, poster, self.preset.poster_columns)
    markdown = results_tables.results_markdown(self, stats, poster, tuning, teacher)
    atomic.write_text(os.path.join(self.out, "results.md"), markdown)
    results_tables.plot(os.path.join(self.out, "results.png"), self.rows, self.sizes, stats,
                        f"{self.table} on {self.dataset}")
    return markdown


class RobustnessTable:
  """Runs every (row, seed) of ROBUSTNESS_ROWS into `out`/runs/<row>/seed<k> (finished runs are
  skipped) and writes the table: test accuracy under noise, mean +- std over seeds."""

  def __init__(self, out, *, seeds=3, samples_per_class=50, dataset="digits", noise_sigma=0.3,
               sigmas=ROBUSTNESS_SIGMAS, extra_args=(), python=sys.executable, docs=None):
    self.out, self.seeds, self.samples_per_class = os.path.abspath(out), seeds, samples_per_class
    self.dataset, self.noise_sigma, self.sigmas = dataset, noise_sigma, tuple(sigmas)
    self.extra_args, self.python = tuple(extra_args), python
    self.docs = docs
    self.failures = []

  def command(self, row, seed):
    # Raw terms: scaled, ce,jacnorm's sigma^2 would cancel against jacnorm's own scale.
    return ["--mode=regularize", "--loss_scaling=none", *FLOAT32, f"--dataset={self.dataset}",
            *row.args,
            f"--samples_per_class={self.samples_per_class}", f"--noise_sigma={self.noise_sigma}",
            f"--robustness_sigmas={','.join(self.sigmas)}", f"--seed={seed}",
            f"--workdir={self.run_dir(row, seed)}", *self.extra_args]

  def run_dir(self, row, seed):
    return os.path.join(self.out, "runs", row.key, f"seed{seed}")

  def run(self, command_line=""):
    results = {}
    total, started = len(ROBUSTNESS_ROWS) * self.seeds, 0
    for row in ROBUSTNESS_ROWS:
      for seed in range(self.seeds):
        started += 1
        workdir = self.run_dir(row, seed)
        res = read_results(workdir)
        print(f"[{started}/{total}] {row.key} seed={seed}" + (" (done)" if res else ""),
              file=sys.stderr, flush=True)
        if res is None:
          code = launch(self.command(row, seed), workdir, self.python)
          res = read_results(workdir) if code == 0 else None
          if res is None:
            self.failures.append(f"{row.key} seed {seed} ({workdir}/log.txt)")
        results[(row.key, seed)] = res
    return self.write(results, command_line)

  def values(self, res):
    """[clean, sigma_1, ...] test accuracy (%) of one run."""
    student = res["student"]
    noisy = student["test"]["accuracy_under_noise"]
    return [100 * student["test_accuracy"]] + [100 * noisy[f"{float(s):g}"]
                                                for s in self.sigmas]

  def write(self, results, command_line):
    columns = ["clean"] + list(self.sigmas)
    lines = ["# Robustness to Gaussian input noise, students without a teacher", "",
             f"`{command_line}`" if command_line else "", "",
             f"--mode=regularize on {self.dataset}, {self.samples_per_class} images per class, "
             f"training noise --noise_sigma={self.noise_sigma} (jacnorm's sigma and noisy_ce's "
             "noise), tfjac.run's other defaults. Test accuracy (%) under Gaussian noise of "
             f"std sigma, mean +- std over {self.seeds} seed(s) (the same images and initial "
             "weights for every row at a seed).", "",
             "| student | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    rows_csv, spread = [], {}
    for row in ROBUSTNESS_ROWS:
      per_seed = [self.values(results[(row.key, s)]) for s in range(self.seeds)
                  if results[(row.key, s)] is not None]
      cells = []
      for j, column in enumerate(columns):
        m, sd = spread[(row.key, column)] = results_tables.mean_std([v[j] for v in per_seed])
        cells.append("failed" if m is None else f"{m:.2f} +- {sd:.2f}")
        rows_csv.append([row.key, column, len(per_seed), "" if m is None else f"{m:.4f}",
                         "" if sd is None else f"{sd:.4f}",
                         " ".join(f"{v[j]:.4f}" for v in per_seed)])
      if len(per_seed) < self.seeds:
        cells[0] += f" ({len(per_seed)} of {self.seeds} seeds)"
      lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += results_tables.verdict_lines(
        ROBUSTNESS_ROWS, columns, lambda key, column: spread[(key, column)], self.seeds,
        label=lambda c: c if c == "clean" else f"sigma {c}")
    seconds = sum(r["total_seconds"] for r in results.values() if r)
    lines += ["", f"Runs' own time, summed: {seconds / 60:.1f} min."]
    if self.failures:
      lines += ["", "Failed runs: " + "; ".join(self.failures)]
    markdown = "\n".join(lines) + "\n"

    def write_csv(f):
      w = csv.writer(f)
      w.writerow(["row", "sigma", "seeds", "test_mean", "test_std", "test_values"])
      w.writerows(rows_csv)

    targets = [os.path.join(self.out, "results")]
    if self.docs:
      targets.append(os.path.splitext(self.docs)[0])
    for target in targets:
      os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
      atomic.write_text(target + ".md", markdown)
      atomic.write_with(target + ".csv", write_csv)
    return markdown


def robustness_main(argv):
  """--table=robustness: RobustnessTable with this command's flags."""
  sizes = FLAGS.samples_per_class or ["50"]
  if len(sizes) != 1 or not sizes[0].isdigit() or int(sizes[0]) < 1:
    raise ReproduceError("--samples_per_class: the robustness table takes one positive "
                         f"integer, got {','.join(sizes)}")
  if FLAGS.seeds < 1:
    raise ReproduceError(f"--seeds must be at least 1, got {FLAGS.seeds}")
  # The former tools/robustness.py's directory: its finished runs are reused.
  out = FLAGS.out or os.path.join("runs", f"robustness_{FLAGS.dataset}")
  table = RobustnessTable(out, seeds=FLAGS.seeds, samples_per_class=int(sizes[0]),
                          dataset=FLAGS.dataset, noise_sigma=FLAGS.noise_sigma,
                          sigmas=FLAGS.sigmas, extra_args=argv[1:], docs=FLAGS.docs)
  start = time.time()
  markdown = table.run("python tools/reproduce.py " + " ".join(sys.argv[1:]))
  print(markdown)
  print(f"wall time of this invocation: {(time.time() - start) / 60:.1f} min; outputs in "
        f"{table.out}/results.{{md,csv}}")
  if table.failures:
    sys.exit(1)


def main(argv):
  try:
    if FLAGS.table == "robustness":
      return robustness_main(argv)
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
                      dry_run=FLAGS.dry_run, jobs=FLAGS.jobs, train_steps=FLAGS.train_steps)
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
