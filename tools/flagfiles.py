"""Writes the flagfiles of the paper's experiments (flags/*.cfg, one per cell of a table, and
the table's teacher) from the grid of tools/reproduce.py, so that a grid and its flagfiles
cannot drift apart: a row, a column or a column's flags is stated once, in TABLES / PRESETS.

  python tools/flagfiles.py           # rewrites every generated flags/*.cfg
  python tools/flagfiles.py --check   # exit 1 naming each file that differs (tests do this)

A cell's file holds the preset's flags (its base flagfile), the row's, the column's, and the
run directory a user would want; reproduce.py runs the same cells with its own run directories,
seeds and tuned settings. Kept by hand (HAND_KEPT): the base files with each experiment's
shared settings, which the presets include by --flagfile, and the digits demo's teacher and
conditions runs. Presets without an entry in EXPERIMENTS (the digits and Fashion-MNIST distill
tables) have no flagfiles: `tools/reproduce.py` runs them directly.
"""
import collections
import os
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from absl import app, flags  # noqa: E402

import reproduce  # noqa: E402  (the grid: TABLES, PRESETS)
from tfjac import atomic  # noqa: E402
from tfjac.config import TrainConfig  # noqa: E402

FLAGS_DIR = os.path.join(REPO, "flags")

HAND_KEPT = ("cifar100_base.cfg", "indoor67_base.cfg", "digits_transfer_base.cfg",
             "digits_transfer_teacher.cfg", "digits_transfer_conditions.cfg")

# One table with a preset whose cells get flagfiles: the preset's key, the files' name prefix,
# the runs' directory, the first words of each file's description, what the user adds on the
# command line, the table's teacher (the flagfile this tool writes from the preset's teacher
# flags, a flagfile kept by hand, or None: the user gives --teacher=PATH), whether a file is
# per column (else per row, at the base file's samples per class), and a column's note.
Experiment = collections.namedtuple(
    "Experiment", "table dataset prefix runs title usage teacher teacher_note per_column "
                  "column_note")


def _cifar100_column(size, steps):
  if size == "full":
    return ("N=500 is the full training split: CIFAR-100 has 500 training images per class, "
            "and tfjac holds 10% of each class out for validation, so --samples_per_class=500 "
            "would be rejected; 0 takes all 450 that remain (45,000 images, one pass = 352 "
            "steps of 128).")
  return (f"{100 * int(size)} training images: --steps_per_epoch={steps} (one pass over the "
          "full 45,000-image training split at batch 128) gives every cell of the table the "
          "same number of updates.")


def _indoor67_column(size, steps):
  del size, steps  # the same for every column
  return ("Every cell gets as many updates as one pass over the full training split (72 "
          "images per category after the 10% validation hold-out, 4,824 images: 76 steps at "
          "batch 64).")


EXPERIMENTS = (
    Experiment("distill", "cifar100", "cifar100_distill", "runs/cifar100",
               "Poster's CIFAR-100 table", "--data_dir=DIR",
               teacher=("cifar100_teacher.cfg", True),
               teacher_note="Trains the VGG-9 teacher on CIFAR-100 (CE, whole training split)",
               per_column=True, column_note=_cifar100_column),
    Experiment("transfer", "mit_indoor67", "indoor67", "runs/indoor67",
               "Poster's transfer table", "--data_dir=DIR --teacher=PATH", teacher=None,
               teacher_note=None, per_column=True, column_note=_indoor67_column),
    Experiment("transfer", "digits", "digits_transfer", "runs/digits_transfer",
               "Transfer demo", "", teacher=("digits_transfer_teacher.cfg", False),
               teacher_note=None, per_column=False, column_note=None),
)

# Said after a row's label in its files' description.
ROW_NOTES = {
    "none": "the student from scratch, CE only",
    "oracle": "the teacher's network with a new head, fine-tuned",
}

GENERATED_BY = ("Written by tools/flagfiles.py from the grid in tools/reproduce.py (TABLES, "
                "PRESETS): change the grid and rerun it rather than editing this file.")


def _comment(text):
  return textwrap.wrap(text, width=94, initial_indent="# ", subsequent_indent="# ",
                       break_on_hyphens=False)


def _file(name, usage, description, args):
  command = f"python -m tfjac.run --flagfile=flags/{name}" + (f" {usage}" if usage else "")
  lines = [f"# {command}", *_comment(description), *_comment(GENERATED_BY)]
  for arg in args:
    lines.extend(_comment(arg[1:]) if arg.startswith("#") else [arg])
  return "\n".join(lines) + "\n"


def _teacher_workdir(e):
  return f"{e.runs}/teacher"


def cell_file(e, row, size=None):
  """(name, text) of the flagfile of `row` of experiment `e` at column `size` (None: the
  experiment's files are per row)."""
  preset = reproduce.PRESETS[(e.table, e.dataset)]
  label = row.label + (f" ({ROW_NOTES[row.key]})" if row.key in ROW_NOTES else "")
  args = [*preset.run_args, *row.args]
  if size is None:
    cell = row.key
    description = f"{e.title}, row: {label}."
  else:
    column = preset.poster_columns.get(size, size)
    cell = f"{row.key}_n{column}"
    images = ("the full training split" if size == "full" else f"{size} images per class")
    description = f"{e.title}, row: {label}; {images}."
    # The full column states its --steps_per_epoch too (0: one pass), beside the others'.
    column_args = preset.size_args.get(size, ("--steps_per_epoch=0",))
    steps = ",".join(a.split("=", 1)[1] for a in column_args if a.startswith("--steps_per_epoch="))
    args += ["#" + e.column_note(size, steps),
             f"--samples_per_class={reproduce.size_arg(size)}", *column_args]
  if "jac" in reproduce.row_hints(row):
    args.insert(0, "#--jac_weight is not set: under the default --loss_scaling=initial each "
                "term is divided by its own mean over the first 10 training steps, so weight 1 "
                "gives the Jacobian term the same share of the loss at the start as every other "
                "hint (docs/hints.md, Loss-term scaling).")
  if preset.learning_rate == TrainConfig.learning_rate:
    args.insert(0, "#The student is fitted twice, with these settings and with the jac weight x10 "
                "and the learning rate x3, and the one better on validation is kept "
                "(--choose_on_validation=auto; docs/distillation.md, The student chosen on "
                "validation).")
  else:
    args.insert(0, "#The student is fitted once: the learning rate is set (the paper's "
                "schedule), so --choose_on_validation=auto does not choose "
                "(docs/distillation.md, The student chosen on validation).")
  name = f"{e.prefix}_{cell}.cfg"
  if e.teacher is not None:
    teacher_file, generated = e.teacher
    if generated:
      description += (f" Needs the teacher of flags/{teacher_file} "
                      f"({_teacher_workdir(e)}/teacher/) first.")
      args.append(f"--teacher={_teacher_workdir(e)}/teacher")
    else:
      description += f" Needs flags/{teacher_file} first."
  args.append(f"--workdir={e.runs}/{cell}")
  return name, _file(name, e.usage, description, args)


def teacher_file(e):
  """(name, text) of the teacher's flagfile of `e`, written from its preset's teacher flags."""
  preset = reproduce.PRESETS[(e.table, e.dataset)]
  name = e.teacher[0]
  description = (f"{e.teacher_note} and exports it to {_teacher_workdir(e)}/teacher/, the "
                 f"--teacher of every flags/{e.prefix}_*.cfg.")
  return name, _file(name, e.usage, description,
                     [*preset.teacher_args, f"--workdir={_teacher_workdir(e)}"])


def generate():
  """{file name: text} of every flagfile this tool writes."""
  files = {}
  for e in EXPERIMENTS:
    preset = reproduce.PRESETS[(e.table, e.dataset)]
    if e.teacher is not None and e.teacher[1]:
      name, text = teacher_file(e)
      files[name] = text
    for row in reproduce.TABLES[e.table]:
      for size in (preset.sizes if e.per_column else (None,)):
        name, text = cell_file(e, row, size)
        files[name] = text
  clash = set(files) & set(HAND_KEPT)
  if clash:
    raise ValueError(f"tools/flagfiles.py: {sorted(clash)} are both generated and kept by hand")
  return files


def check(directory=FLAGS_DIR):
  """What differs between `directory`'s *.cfg and what this tool writes, one line per file
  (empty: nothing)."""
  files = generate()
  present = {n for n in os.listdir(directory) if n.endswith(".cfg")}
  problems = [f"{n}: kept by hand but missing" for n in HAND_KEPT if n not in present]
  for name, text in sorted(files.items()):
    path = os.path.join(directory, name)
    if name not in present:
      problems.append(f"{name}: missing (the grid has this cell)")
    else:
      with open(path) as f:
        if f.read() != text:
          problems.append(f"{name}: differs from what the grid writes")
  problems += [f"{n}: neither generated from the grid nor kept by hand (HAND_KEPT)"
               for n in sorted(present - set(files) - set(HAND_KEPT))]
  return problems


def define_flags():
  flags.DEFINE_boolean("check", False, "Write nothing; exit 1 naming every flagfile that "
                       "differs from what the grid writes.")
  flags.DEFINE_string("flags_dir", FLAGS_DIR, "Where the flagfiles are.")


def main(argv):
  del argv
  if flags.FLAGS.check:
    problems = check(flags.FLAGS.flags_dir)
    for p in problems:
      print(f"flags/{p}", file=sys.stderr)
    sys.exit(1 if problems else 0)
  for name, text in sorted(generate().items()):
    atomic.write_text(os.path.join(flags.FLAGS.flags_dir, name), text)
  for p in check(flags.FLAGS.flags_dir):  # what writing cannot fix: stale or missing files
    print(f"flags/{p}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  app.run(main)
