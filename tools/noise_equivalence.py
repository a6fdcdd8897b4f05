"""The poster's equivalence, measured: E_xi[||T(x+xi) - S(x+xi)||^2] against
||T(x) - S(x)||^2 + sigma^2 ||J_T(x) - J_S(x)||_F^2, xi ~ N(0, sigma^2 I), for a sweep of sigma.

(a) On random linear models, where the two sides are equal and differ only by Monte-Carlo error.
(b) On the trained teacher/student pair of a run directory (`--run_dir`), where they agree while
    sigma is small enough for the networks to stay close to linear around each input.

  python tools/noise_equivalence.py --run_dir=runs/default --out=runs/default/equivalence

Writes a table to stdout, `equivalence.json` and `equivalence.png` (both curves against sigma).
"""
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tools/

import numpy as np  # noqa: E402
import results_tables  # noqa: E402  (read_results: the one reader of run results)
from absl import app, flags  # noqa: E402

flags.DEFINE_string("run_dir", None, "A run directory of `python -m tfjac.run --mode=distill` "
                    "(it holds results.json and student/); omit for the linear check only.")
flags.DEFINE_list("sigmas", ["0.003", "0.01", "0.03", "0.1", "0.3", "1.0"], "Noise std values.")
flags.DEFINE_integer("samples", 512, "Monte-Carlo noise draws per example.")
flags.DEFINE_integer("examples", 100, "Test images of the run's dataset used in (b).")
flags.DEFINE_string("out", None, "Directory for equivalence.json and .png (default: "
                    "<run_dir>/equivalence, or ./equivalence).")
flags.DEFINE_integer("seed", 0, "Seed of the noise and of the linear models.")
FLAGS = flags.FLAGS


class ToolError(Exception):
  pass


def sides(teacher, student, x, sigma, samples, seed, chunk=64):
  """Per-example (Monte-Carlo left side, its standard error, act, sigma^2 * jac) in inference
  mode; the left side is averaged over `samples` draws taken `chunk` at a time."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfjac.hints import jacobians, losses  # pylint: disable=g-import-not-at-top
  x = tf.constant(x, tf.float32)
  draws = []
  for start in range(0, samples, chunk):
    n = min(chunk, samples - start)
    draws.append(tf.reshape(losses.noise_matching(
        teacher_fn=lambda z: teacher(z, training=False),
        student_fn=lambda z: student(z, training=False), x=tf.tile(x, [n, 1, 1, 1]),
        sigma=sigma, samples=1, seed=tf.constant([seed, start], tf.int64)), [n, -1]))
  draws = tf.concat(draws, axis=0).numpy()  # [samples, batch]
  num_classes = int(teacher.output_shape[-1])
  everything = tf.tile(tf.eye(num_classes)[None], [x.shape[0], 1, 1])
  jt, t_logits = jacobians.selected_jacobians(teacher, x, everything)
  js, s_logits = jacobians.selected_jacobians(student, x, everything)
  act = losses.activation_matching(teacher_logits=t_logits, student_logits=s_logits).numpy()
  jac = losses.jacobian_matching(teacher_jacobian=jt["logits"], student_jacobian=js["logits"],
                                 normalize=False).numpy()
  return draws.mean(0), draws.std(0) / np.sqrt(samples), act, sigma ** 2 * jac


def sweep(teacher, student, x, sigmas, samples, seed):
  rows = []
  for sigma in sigmas:
    lhs, se, act, jac = sides(teacher, student, x, sigma, samples, seed)
    left, right = float(lhs.mean()), float((act + jac).mean())
    rows.append({"sigma": sigma, "noisy_matching": left,
                 "noisy_matching_se": float(np.sqrt((se ** 2).sum()) / len(se)),
                 "act_plus_sigma2_jac": right, "act": float(act.mean()),
                 "sigma2_jac": float(jac.mean()),
                 "relative_error": abs(left - right) / max(abs(left), 1e-12)})
  return rows


def linear_pair(seed, input_shape=(8, 8, 1), num_classes=10):
  import keras  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  d = int(np.prod(input_shape))
  models = []
  for name in ("linear_teacher", "linear_student"):
    inputs = keras.Input(input_shape)
    dense = keras.layers.Dense(num_classes)
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)), name=name)
    dense.set_weights([rng.normal(0, 0.3, (d, num_classes)).astype(np.float32),
                       rng.normal(0, 1, num_classes).astype(np.float32)])
    models.append(model)
  return models, rng.random((32, *input_shape)).astype(np.float32)


def trained_pair(run_dir, examples):
  """(teacher, student, test images) of a distillation run directory."""
  import keras  # pylint: disable=g-import-not-at-top
  import tfjac.models  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  from tfjac import data, export  # pylint: disable=g-import-not-at-top
  from tfjac.models import teachers  # pylint: disable=g-import-not-at-top
  from tfjac.config import Config, DataConfig, TeacherConfig  # pylint: disable=g-import-not-at-top
  results = results_tables.read_results(run_dir)
  if results is None:
    raise ToolError(f"--run_dir: {run_dir!r} has no results.json; give the run directory of a "
                    "finished `python -m tfjac.run --mode=distill` run")
  student_path = os.path.join(run_dir, "student", export.KERAS_FILE)
  teacher_path = (results.get("teacher") or {}).get("path")
  if not os.path.exists(student_path):
    raise ToolError(f"--run_dir: {run_dir!r} has no student ({student_path} is missing)")
  if not teacher_path or not os.path.exists(teacher_path):
    raise ToolError(f"--run_dir: the run in {run_dir!r} has no teacher on disk "
                    f"({teacher_path!r}); it must be a --mode=distill run")
  cfg = results["config"]["data"]
  splits = data.prepare(DataConfig(dataset=cfg["dataset"], data_dir=cfg["data_dir"],
                                   seed=cfg["seed"]))
  config = Config(teacher=TeacherConfig(path=teacher_path))
  teacher = teachers.load_teacher(config, splits.info,
                                  num_classes=splits.info.num_classes).adapted
  student = keras.saving.load_model(student_path, compile=False)
  return teacher, student, splits.test.images[:examples]


def table(title, rows):
  lines = [title, "| sigma | E[(T-S)^2] noisy (MC +- se) | act + sigma^2 jac | act | "
           "sigma^2 jac | rel. error |", "|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['sigma']:g} | {r['noisy_matching']:.5g} +- {r['noisy_matching_se']:.2g}"
                 f" | {r['act_plus_sigma2_jac']:.5g} | {r['act']:.5g} | {r['sigma2_jac']:.5g} |"
                 f" {100 * r['relative_error']:.2f}% |")
  return "\n".join(lines)


def plot(results, path):
  """Top: both sides. Bottom: the noise-induced part alone, E[...] - (T-S)^2 against
  sigma^2 ||J_T - J_S||^2 (where the Monte-Carlo estimate of it is positive)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(2, len(results), figsize=(6 * len(results), 8), squeeze=False)
  for col, (name, rows) in enumerate(results.items()):
    s = np.array([r["sigma"] for r in rows])
    left = np.array([r["noisy_matching"] for r in rows])
    se = np.array([r["noisy_matching_se"] for r in rows])
    act = np.array([r["act"] for r in rows])
    top, bottom = axes[0][col], axes[1][col]
    top.errorbar(s, left, yerr=2 * se, marker="o",
                 label="E[(T(x+xi) - S(x+xi))^2] (Monte-Carlo, 2 se)")
    top.plot(s, [r["act_plus_sigma2_jac"] for r in rows], marker="s", linestyle="--",
             label="(T(x) - S(x))^2 + sigma^2 ||J_T - J_S||_F^2")
    top.set_title(name)
    excess = left - act
    keep = excess > 0
    bottom.errorbar(s[keep], excess[keep], yerr=2 * se[keep], marker="o",
                    label="E[(T(x+xi) - S(x+xi))^2] - (T(x) - S(x))^2")
    bottom.plot(s, [r["sigma2_jac"] for r in rows], marker="s", linestyle="--",
                label="sigma^2 ||J_T - J_S||_F^2")
    bottom.set_title(f"{name}: the part due to noise")
    for ax in (top, bottom):
      ax.set_xscale("log")
      ax.set_yscale("log")
      ax.set_xlabel("sigma (input noise std, pixels in [0, 1])")
      ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  del argv
  sigmas = [float(s) for s in FLAGS.sigmas]
  if not sigmas or min(sigmas) <= 0:
    print(f"noise_equivalence: error: --sigmas must be > 0, got {FLAGS.sigmas}", file=sys.stderr)
    return 2
  try:
    pair = trained_pair(FLAGS.run_dir, FLAGS.examples) if FLAGS.run_dir else None
  except ToolError as e:
    print(f"noise_equivalence: error: {e}", file=sys.stderr)
    return 2
  (lin_t, lin_s), lin_x = linear_pair(FLAGS.seed)
  results = {"linear models": sweep(lin_t, lin_s, lin_x, sigmas, FLAGS.samples, FLAGS.seed)}
  if pair:
    results["trained teacher/student"] = sweep(*pair, sigmas, FLAGS.samples, FLAGS.seed)
  out = FLAGS.out or os.path.join(FLAGS.run_dir or ".", "equivalence")
  os.makedirs(out, exist_ok=True)
  for name, rows in results.items():
    print(table(f"\n{name}:", rows))
  with open(os.path.join(out, "equivalence.json"), "w") as f:
    json.dump({"samples": FLAGS.samples, "run_dir": FLAGS.run_dir, "results": results}, f,
              indent=2)
  plot(results, os.path.join(out, "equivalence.png"))
  print(f"\nwrote {out}/equivalence.json and {out}/equivalence.png")
  return 0


if __name__ == "__main__":
  app.run(lambda argv: sys.exit(main(argv)))
