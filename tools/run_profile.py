"""Run-level profile (issue 15): the wall time of a whole tfjac.run command, split into the
teacher's fit, the student's training steps, its validation, its per-epoch overhead, and the
rest (start-up, data, teacher cache, test evaluation, export).

  python tools/run_profile.py --preset=default        # the README's first command:
                                                      # tfjac.run --mode=distill --samples_per_class=10
  python tools/run_profile.py --preset=poster_cell    # CIFAR-100 10-per-class shape
  python tools/run_profile.py --preset=default -- --teacher_width=0.25   # extra tfjac flags

Each preset runs in a fresh run directory under --workdir (removed first). poster_cell writes
a folder dataset of random 32x32x3 PNGs (100 classes, 60 training + 5 test images per class)
and runs distill with --samples_per_class=10 and --validation_fraction=0.834: 1,000 training
and 5,000 validation images, as in the poster's 10-per-class cell (random images: speed
only). The phases come from results.json (fit_phases_seconds, tfjac/training/loop.py's
PhaseTimer); the table is markdown, --json writes the numbers.
"""
import json
import os
import shutil
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reproduce  # noqa: E402  (launch: the one place that starts a run)
import results_tables  # noqa: E402  (read_results: the one reader of run results)

flags.DEFINE_enum("preset", "default", ["default", "poster_cell"], "Which command.")
flags.DEFINE_string("workdir", "/tmp/tfjac_run_profile", "Scratch directory (removed first).")
flags.DEFINE_integer("epochs", 3, "poster_cell: student epochs.")
flags.DEFINE_integer("teacher_epochs", 2, "poster_cell: teacher epochs.")
flags.DEFINE_string("json", None, "Also write the numbers here.")
FLAGS = flags.FLAGS


def _poster_dataset(path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  for split, n in (("train", 60), ("test", 5)):
    for c in range(100):
      d = os.path.join(path, split, f"class{c:03d}")
      os.makedirs(d)
      for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8)).save(
            os.path.join(d, f"{i}.png"))


def _phases(summary):
  return (summary or {}).get("fit_phases_seconds") or {}


def main(argv):
  extra = argv[1:]
  if os.path.exists(FLAGS.workdir):
    shutil.rmtree(FLAGS.workdir)
  os.makedirs(FLAGS.workdir)
  run_dir = os.path.join(FLAGS.workdir, "run")
  cmd = [f"--workdir={run_dir}", "--mode=distill"]
  if FLAGS.preset == "default":  # the README's first command
    cmd += ["--samples_per_class=10"]
  else:
    data = os.path.join(FLAGS.workdir, "images")
    _poster_dataset(data)
    cmd += [f"--dataset=folder:{data}", "--samples_per_class=10",
            "--validation_fraction=0.834", f"--epochs={FLAGS.epochs}",
            f"--teacher_epochs={FLAGS.teacher_epochs}", "--batch_size=64"]
  cmd += extra
  os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
  start = time.perf_counter()
  code = reproduce.launch(cmd, run_dir)
  wall = time.perf_counter() - start
  results = results_tables.read_results(run_dir) if code == 0 else None
  if results is None:
    sys.exit(f"run_profile: python -m tfjac.run {' '.join(cmd)} failed (exit code {code}); "
             f"see {run_dir}/log.txt")
  teacher, student = results.get("teacher") or {}, results.get("student") or {}
  t, s = _phases(teacher), _phases(student)
  t_total = sum(t.values())
  rows = [("whole command", wall), ("teacher fit", t_total),
          ("student training steps", s.get("training", 0.0)),
          ("student validation", s.get("validation", 0.0)),
          ("student per-epoch overhead and tracing", s.get("other", 0.0))]
  rows.append(("rest (start-up, data, teacher cache, test, export)",
               wall - sum(v for _, v in rows[1:])))
  print(f"preset {FLAGS.preset}: -m tfjac.run {' '.join(cmd)}\n")
  print("| part | seconds | share |\n|---|---|---|")
  for name, v in rows:
    print(f"| {name} | {v:.1f} | {100 * v / wall:.0f}% |")
  print(f"\nteacher fit phases: {t}; student fit phases: {s}; student steps/epoch "
        f"{student.get('steps_per_epoch')}, epochs {student.get('epochs_run')}")
  if FLAGS.json:
    with open(FLAGS.json, "w") as f:
      json.dump({"preset": FLAGS.preset, "command": ["-m", "tfjac.run", *cmd], "wall_seconds": wall,
                 "parts": dict(rows), "teacher_phases": t, "student_phases": s}, f, indent=2)


if __name__ == "__main__":
  app.run(main)
