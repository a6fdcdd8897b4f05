"""Issue 13: why the Jacobian term does not align on Fashion-MNIST at 10 images per class.

Every run is an ordinary `python -m tfjac.run --mode=distill` (under `nice -n 15`) with the
shared settings below plus the run's own flags, in <out>/<run>/seed<k>; a run with a
results.json is skipped, so rerunning the same command resumes. The teachers are trained first
(also by tfjac.run) in <out>/teachers/<name>.

  python tools/fmnist_investigation.py --runs=ce,act_ce,act_jac_ce --seeds=0,1
  python tools/fmnist_investigation.py --report_only --docs=docs/results/fmnist_investigation.md

--runs names entries of RUNS (or `all`); --report_only writes the table of every finished run
under <out> (validation/test accuracy, final train and validation act/jac losses, teacher and
student Jacobian norms, steps, wall time, the command) to <out>/results.md and into --docs
between its runs markers (the text around them is kept).
"""
import json
import os
import platform
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

from tfjac import atomic  # noqa: E402

# Teachers, each trained once by tfjac.run (mode, flags). The base teacher is a VGG-4 at half
# width, 3 epochs of CE at batch 128 on the 58,800 training images (89.6% test, 4 minutes on
# 2 shared cores); `w05_jacnorm` is the same network trained with CE + sigma^2 ||dS/dx||^2 at
# sigma 0.1 (--mode=regularize), whose input gradients are smaller and smoother.
TEACHERS = {
    "w05": ["--mode=teacher", "--teacher_model=vgg4", "--teacher_width=0.5",
            "--teacher_epochs=3", "--batch_size=128"],
    "w05_jacnorm": ["--mode=regularize", "--model=vgg4", "--width=0.5", "--epochs=3",
                    "--batch_size=128", "--hints=ce,jacnorm", "--noise_sigma=0.1",
                    "--samples_per_class=0"],
}
TEACHER_FILE = {"w05": "teacher/model.keras", "w05_jacnorm": "student/model.keras"}

# Shared by every student run (flags given in a run's entry override these: later flags win).
BASE = ["--mode=distill", "--dataset=fashion_mnist", "--samples_per_class=10",
        "--validation_fraction=0.02"]

# name -> (teacher, flags). Steps: 240 is what tfjac's defaults give 100 images (60 epochs of
# 4 steps at batch 32); here the budget is set with --train_steps and 40-step epochs (6
# validation passes over the 1,200 validation images instead of 60, the best of them kept), so
# that validation stays a small part of the time.
S240 = ["--train_steps=240", "--steps_per_epoch=40"]
S1000 = ["--train_steps=1000", "--steps_per_epoch=40"]
RUNS = {
    # The issue's setting: defaults, 240 steps.
    "ce_240": ("w05", ["--hints=ce", *S240]),
    "act_ce_240": ("w05", ["--hints=act,ce", *S240]),
    "act_jac_ce_240": ("w05", ["--hints=act,jac,ce", *S240]),
    # Probes: a 1e-6 jac weight (zero is refused) measures how aligned the Jacobians of a
    # student trained without the term are.
    "ce_240_jacprobe": ("w05", ["--hints=jac,ce", "--jac_weight=1e-6", *S240]),
    "act_ce_240_jacprobe": ("w05", ["--hints=act,jac,ce", "--jac_weight=1e-6", *S240]),
    # Longer budget.
    "ce_1000": ("w05", ["--hints=ce", *S1000]),
    "act_ce_1000": ("w05", ["--hints=act,ce", *S1000]),
    "act_jac_ce_1000": ("w05", ["--hints=act,jac,ce", *S1000]),
    # Scale of the terms: act ~100x CE at the start; jac is bounded by 4.
    "act_jac_ce_240_jw10": ("w05", ["--hints=act,jac,ce", "--jac_weight=10", *S240]),
    "act_jac_ce_240_jw100": ("w05", ["--hints=act,jac,ce", "--jac_weight=100", *S240]),
    "act_jac_ce_240_aw0.01": ("w05", ["--hints=act,jac,ce", "--act_weight=0.01", *S240]),
    "act_jac_ce_240_jw30": ("w05", ["--hints=act,jac,ce", "--jac_weight=30", *S240]),
    "act_jac_ce_240_jw300": ("w05", ["--hints=act,jac,ce", "--jac_weight=300", *S240]),
    "act_jac_ce_240_jw1000": ("w05", ["--hints=act,jac,ce", "--jac_weight=1000", *S240]),
    "act_ce_240_aw10": ("w05", ["--hints=act,ce", "--act_weight=10", *S240]),
    "act_ce_240_aw0.1": ("w05", ["--hints=act,ce", "--act_weight=0.1", *S240]),
    "act_ce_240_aw0.01": ("w05", ["--hints=act,ce", "--act_weight=0.01", *S240]),
    "act_jac_ce_240_aw0.01_jw10": ("w05", ["--hints=act,jac,ce", "--act_weight=0.01",
                                           "--jac_weight=10", *S240]),
    "act_jac_ce_240_aw0.01_jw100": ("w05", ["--hints=act,jac,ce", "--act_weight=0.01",
                                            "--jac_weight=100", *S240]),
    # The Jacobian term without logit matching.
    "jac_ce_240": ("w05", ["--hints=jac,ce", *S240]),
    "jac_ce_240_jw10": ("w05", ["--hints=jac,ce", "--jac_weight=10", *S240]),
    "jac_ce_240_jw100": ("w05", ["--hints=jac,ce", "--jac_weight=100", *S240]),
    # Longer budget with a heavier Jacobian term.
    "act_jac_ce_1000_jw10": ("w05", ["--hints=act,jac,ce", "--jac_weight=10", *S1000]),
    "act_jac_ce_1000_jw100": ("w05", ["--hints=act,jac,ce", "--jac_weight=100", *S1000]),
    # Learning rate.
    "act_jac_ce_240_lr3e-3": ("w05", ["--hints=act,jac,ce", "--learning_rate=3e-3", *S240]),
    # Target, normalisation, BatchNorm policy.
    "act_jac_ce_240_top1": ("w05", ["--hints=act,jac,ce", "--jac_target=teacher_top1", *S240]),
    "act_jac_ce_240_nonorm": ("w05", ["--hints=act,jac,ce", "--nojac_normalize", *S240]),
    "act_jac_ce_240_bninf": ("w05", ["--hints=act,jac,ce", "--jac_bn_policy=inference", *S240]),
    # Teacher's Jacobian quality: a teacher trained with a Jacobian-norm penalty.
    "ce_240_smooth": ("w05_jacnorm", ["--hints=ce", *S240]),
    "act_ce_240_smooth": ("w05_jacnorm", ["--hints=act,ce", *S240]),
    "act_jac_ce_240_smooth": ("w05_jacnorm", ["--hints=act,jac,ce", *S240]),
    "act_jac_ce_240_smooth_jw100": ("w05_jacnorm", ["--hints=act,jac,ce", "--jac_weight=100",
                                                    *S240]),
}


def define_flags():
  flags.DEFINE_list("runs", [], "Entries of RUNS to run (`all`: every one), in this order.")
  flags.DEFINE_list("seeds", ["0"], "--seed of every run.")
  flags.DEFINE_string("out", "runs/fmnist_investigation", "Run directories.")
  flags.DEFINE_string("docs", None, "Also write the table here (.md).")
  flags.DEFINE_bool("report_only", False, "Only write the table of the finished runs.")
  flags.DEFINE_integer("nice", 15, "nice -n of every run (the CPU is shared).")


def run_cli(args, workdir, niceness):
  """Runs tfjac.run with `args` into `workdir` (skipped when its results.json exists)."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return
  os.makedirs(workdir, exist_ok=True)
  command = ["nice", "-n", str(niceness), sys.executable, "-m", "tfjac.run", *args,
             f"--workdir={workdir}"]
  env = dict(os.environ, PYTHONPATH=REPO)
  start = time.time()
  with open(os.path.join(workdir, "log.txt"), "a") as log:
    log.write("$ python -m tfjac.run " + " ".join(args) + f" --workdir={workdir}\n")
    log.flush()
    code = subprocess.call(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  atomic.write_text(os.path.join(workdir, "wall.json"), json.dumps(
      {"wall_seconds": round(time.time() - start, 1), "returncode": code,
       "args": args}))
  if code != 0:
    print(f"FAILED ({code}): {workdir}/log.txt", file=sys.stderr, flush=True)


def teacher_path(out, name, niceness):
  workdir = os.path.join(out, "teachers", name)
  run_cli(["--dataset=fashion_mnist", "--validation_fraction=0.02", "--seed=0",
           *TEACHERS[name]], workdir, niceness)
  return os.path.join(workdir, TEACHER_FILE[name])


def run_dir(out, name, seed):
  return os.path.join(out, name, f"seed{seed}")


def student_args(out, name, seed, niceness):
  teacher, extra = RUNS[name]
  return [*BASE, f"--teacher={teacher_path(out, teacher, niceness)}", *extra, f"--seed={seed}"]


def _load(path):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _f(value, fmt):
  return "" if value is None else format(value, fmt)


def _mean_std(values):
  if not values:
    return ""
  m = sum(values) / len(values)
  sd = (sum((v - m) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0
  return f"{m:.2f} +- {sd:.2f}"


def report(out):
  """Markdown table of every finished run under `out`."""
  cpu = next((line.split(":", 1)[1].strip() for line in
              subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
              if line.startswith("Model name")), platform.processor())
  lines = ["## Every run (Fashion-MNIST, 10 images per class)",
           "", f"CPU: {cpu}, {os.cpu_count()} cores shared with other jobs; every run under "
           "`nice -n 15`, one at a time, so wall times are only indicative.", "",
           "### Teachers", "",
           "| teacher | test acc | val acc | wall (s) | command |", "|---|---|---|---|---|"]
  for name in TEACHERS:
    workdir = os.path.join(out, "teachers", name)
    res, wall = _load(os.path.join(workdir, "results.json")), _load(
        os.path.join(workdir, "wall.json"))
    if res is None:
      continue
    summary = res.get("teacher") or res.get("student")
    lines.append(f"| {name} | {100 * summary['test']['accuracy']:.2f} | "
                 f"{100 * summary['best_val_accuracy']:.2f} | "
                 f"{_f(wall and wall['wall_seconds'], '.0f')} | "
                 f"`python -m tfjac.run {' '.join(wall['args']) if wall else ''}` |")
  lines += ["", "### Students (VGG-4, 100 training images)", "",
            "Losses are unweighted final-epoch values (train / validation); jac is the "
            "normalised loss 2 - 2 cos (orthogonal = 2) unless --nojac_normalize. "
            "‖J_T‖, ‖J_S‖: mean per-example L2 norm of the matched Jacobians (train, last epoch).",
            "", "| run | seed | teacher | steps | val acc | test acc | train acc | act tr/val | "
            "jac tr/val | ce tr/val | ‖J_T‖ | ‖J_S‖ | wall (s) | flags |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  per_run = {}
  for name, (teacher, extra) in RUNS.items():
    directory = os.path.join(out, name)
    if not os.path.isdir(directory):
      continue
    for seed_dir in sorted(os.listdir(directory)):
      workdir = os.path.join(directory, seed_dir)
      res = _load(os.path.join(workdir, "results.json"))
      wall = _load(os.path.join(workdir, "wall.json"))
      if res is None:
        continue
      s = res["student"]
      m = s["final_epoch_metrics"]

      def pair(key):
        tr, va = m.get(key), m.get("val_" + key)
        return "" if tr is None else f"{tr:.3g} / {_f(va, '.3g')}"

      per_run.setdefault(name, []).append(
          (100 * s["best_val_accuracy"], 100 * s["test"]["accuracy"], m.get("val_jac_loss")))
      lines.append(
          f"| {name} | {seed_dir[4:]} | {teacher} | {s.get('train_steps')} | "
          f"{100 * s['best_val_accuracy']:.2f} | {100 * s['test']['accuracy']:.2f} | "
          f"{_f(m.get('accuracy') and 100 * m['accuracy'], '.1f')} | {pair('act_loss')} | "
          f"{pair('jac_loss')} | {pair('ce_loss')} | {_f(m.get('teacher_jac_norm'), '.3g')} | "
          f"{_f(m.get('student_jac_norm'), '.3g')} | "
          f"{_f(wall and wall['wall_seconds'], '.0f')} | `{' '.join(extra)}` |")
  lines += ["", "### Mean +- std over seeds (runs with more than one seed)", "",
            "| run | seeds | val acc | test acc | final val jac |", "|---|---|---|---|---|"]
  for name, values in per_run.items():
    if len(values) > 1:
      cells = [_mean_std([v[i] for v in values if v[i] is not None]) for i in range(3)]
      lines.append(f"| {name} | {len(values)} | " + " | ".join(cells) + " |")
  lines += ["", "Every student command: `python -m tfjac.run " + " ".join(BASE) +
            " --teacher=<teacher's model.keras> <flags> --seed=<seed> --workdir=<run dir>`."]
  return "\n".join(lines) + "\n"


BEGIN, END = "<!-- runs: tools/fmnist_investigation.py --report_only -->", "<!-- /runs -->"


def splice(path, markdown):
  """The text of `path` with the part between BEGIN and END replaced by `markdown` (the
  hand-written conclusions around it are kept); appended if it has no such part."""
  block = f"{BEGIN}\n{markdown}{END}\n"
  if not os.path.exists(path):
    return block
  with open(path) as f:
    text = f.read()
  if BEGIN not in text or END not in text:
    return text.rstrip("\n") + "\n\n" + block
  head, rest = text.split(BEGIN, 1)
  return head + block + rest.split(END, 1)[1].lstrip("\n")


def main(argv):
  del argv
  f = flags.FLAGS
  out = os.path.abspath(f.out)
  if not f.report_only:
    names = list(RUNS) if f.runs == ["all"] else f.runs
    unknown = [n for n in names if n not in RUNS]
    if unknown:
      raise app.UsageError(f"--runs: unknown {unknown}; valid: all, {', '.join(RUNS)}")
    for name in names:
      for seed in f.seeds:
        print(f"{time.strftime('%H:%M:%S')} {name} seed {seed}", file=sys.stderr, flush=True)
        run_cli(student_args(out, name, seed, f.nice)[:-1] + [f"--seed={seed}"],
                run_dir(out, name, seed), f.nice)
  markdown = report(out)
  atomic.write_text(os.path.join(out, "results.md"), markdown)
  if f.docs:
    atomic.write_text(f.docs, splice(f.docs, markdown))
  print(markdown)


if __name__ == "__main__":
  define_flags()
  app.run(main)
