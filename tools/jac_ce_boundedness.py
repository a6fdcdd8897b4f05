"""What keeps the jac_ce hint bounded in practice, measured on the embedded digits.

jac_ce = -T_s log S_s - sigma^2 grad T_s . grad log S_s is unbounded below: the student can
lower it without limit by growing its input gradient along the teacher's. This tool trains one
small teacher, then students with --hints=jac_ce (alone) and jac_ce,ce at a few (sigma, weight)
settings, and records per epoch the jac_ce term, the CE term, the student's Jacobian norm of the
selected class and the validation accuracy (from each run's TensorBoard logs):

  python tools/jac_ce_boundedness.py --out=docs/results/jac_ce_boundedness.json

Every command it runs is written into the JSON beside its measurements.
"""
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from absl import app, flags  # noqa: E402

flags.DEFINE_string("out", "docs/results/jac_ce_boundedness.json", "The JSON to write.")
flags.DEFINE_string("workdir", "runs/jac_ce_boundedness", "Run directories (one per setting).")
flags.DEFINE_integer("epochs", 12, "Student epochs.")
flags.DEFINE_integer("samples_per_class", 30, "Student training images per class.")
flags.DEFINE_list("settings", ["jac_ce:1.0:1", "jac_ce,ce:0.1:1", "jac_ce,ce:1.0:1",
                               "jac_ce,ce:1.0:10", "jac_ce,ce:3.0:1"],
                  "hints:sigma:jac_ce_weight per student run.")
FLAGS = flags.FLAGS

_COMMON = ["--dataset=digits", "--model=vgg4", "--width=0.5", "--seed=0", "--noresume"]


def _run(args):
  cmd = [sys.executable, "-m", "tfjac.run", *args]
  env = dict(os.environ, PYTHONPATH=REPO)
  done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
  if done.returncode != 0:
    raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
  return "python -m tfjac.run " + " ".join(args)


def _scalars(log_dir, tag):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  ea = event_accumulator.EventAccumulator(log_dir, size_guidance={event_accumulator.TENSORS: 0})
  ea.Reload()
  if tag not in ea.Tags()["tensors"]:
    return []
  return [round(float(tf.make_ndarray(e.tensor_proto)), 5)
          for e in sorted(ea.Tensors(tag), key=lambda e: e.step)]


def main(argv):
  del argv
  root = os.path.join(REPO, FLAGS.workdir)
  teacher_dir = os.path.join(root, "teacher")
  started = time.time()
  commands = [_run(["--mode=teacher", f"--workdir={os.path.relpath(teacher_dir, REPO)}",
                    "--teacher_model=vgg4", "--teacher_width=1.0", "--teacher_epochs=10",
                    *_COMMON])]
  rows = []
  for setting in FLAGS.settings:
    hints, sigma, weight = setting.split(":")
    name = f"{hints.replace(',', '_')}_sigma{sigma}_w{weight}"
    workdir = os.path.relpath(os.path.join(root, name), REPO)
    cmd = _run(["--mode=distill", f"--workdir={workdir}",
                f"--teacher={os.path.relpath(teacher_dir, REPO)}/teacher", f"--hints={hints}",
                f"--noise_sigma={sigma}", f"--jac_ce_weight={weight}",
                f"--epochs={FLAGS.epochs}", f"--samples_per_class={FLAGS.samples_per_class}",
                *_COMMON])
    commands.append(cmd)
    train = os.path.join(REPO, workdir, "tensorboard", "student", "train")
    val = os.path.join(REPO, workdir, "tensorboard", "student", "validation")
    with open(os.path.join(REPO, workdir, "results.json")) as f:
      test = json.load(f)["student"]["test"]
    rows.append({
        "hints": hints, "noise_sigma": float(sigma), "jac_ce_weight": float(weight),
        "command": cmd,
        "jac_ce_loss": _scalars(train, "epoch_jac_ce_loss"),
        "ce_loss": _scalars(train, "epoch_ce_loss"),
        "student_jac_norm": _scalars(train, "epoch_student_jac_norm"),
        "teacher_jac_norm": _scalars(train, "epoch_teacher_jac_norm"),
        "val_accuracy": _scalars(val, "epoch_accuracy"),
        "test_accuracy": test.get("accuracy")})
  out = os.path.join(REPO, FLAGS.out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w") as f:
    json.dump({"tool": "python tools/jac_ce_boundedness.py " + " ".join(
        f"--{k}={FLAGS[k].value if not isinstance(FLAGS[k].value, list) else ','.join(FLAGS[k].value)}"
        for k in ("out", "workdir", "epochs", "samples_per_class", "settings")),
               "seconds": round(time.time() - started, 1), "commands": commands,
               "runs": rows}, f, indent=1)
  for r in rows:
    print(f"{r['hints']:10s} sigma={r['noise_sigma']:<4} w={r['jac_ce_weight']:<4} "
          f"jac_ce {r['jac_ce_loss'][:1]}..{r['jac_ce_loss'][-1:]} "
          f"|J_S| {r['student_jac_norm'][:1]}..{r['student_jac_norm'][-1:]} "
          f"test {r['test_accuracy']}")


if __name__ == "__main__":
  app.run(main)
