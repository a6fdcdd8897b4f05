"""Candidate speed-ups of the act,jac,ce double-backprop step, before/after in one run
(issue 15): max-pooling (keras.layers.MaxPooling2D or models/layers.WindowMaxPool), XLA, the
oneDNN kernels (TF_ENABLE_ONEDNN_OPTS=0), the student's BatchNorm policy.

`python tools/step_variants.py` times every --variant in its own subprocess, --rounds
times in turn (ABAB...: load drifting on a shared machine hits every variant alike), and
prints the median ms/step of each with its ratio to the first variant. --check also compares
each variant's weight gradients of one step with the first variant's, on the same weights and
batch (the relative L2 difference): a variant is exact when that is float32 rounding.

A variant is 'pool=keras|window,jit=0|1,onednn=0|1,bn=batch_stats|inference'.
"""
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import benchkit  # noqa: E402  (the synthetic step; imports no TensorFlow)

flags.DEFINE_multi_string("variant", ["pool=keras+jit=0", "pool=window+jit=0",
                                      "pool=keras+jit=1", "pool=window+jit=1",
                                      "pool=keras+jit=0+onednn=0", "pool=keras+bn=inference"],
                          "One variant per flag, its keys joined by '+' (or ','): "
                          "pool=keras|window, jit=0|1, onednn=0|1, bn=batch_stats|inference. "
                          "The first is the reference.")
flags.DEFINE_string("hints", "act,jac,ce", "Hint set.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("image_size", benchkit.POSTER["image_size"], "Image size.")
flags.DEFINE_integer("num_classes", benchkit.POSTER["num_classes"], "Classes.")
flags.DEFINE_string("teacher_model", benchkit.POSTER["teacher_model"], "Teacher.")
flags.DEFINE_string("model", benchkit.POSTER["model"], "Student.")
flags.DEFINE_boolean("teacher_cache", False, "Teacher outputs fed with the data.")
flags.DEFINE_integer("steps", 6, "Timed steps per round.")
flags.DEFINE_integer("warmup", 2, "Untimed steps per round (after tracing).")
flags.DEFINE_integer("rounds", 2, "Rounds over the variants.")
flags.DEFINE_boolean("check", True, "Compare each variant's gradients with the first's.")
flags.DEFINE_string("single", None, "Internal: run one variant (JSON).")
FLAGS = flags.FLAGS
MARKER = "VARIANT_RESULT "


def parse(text):
  v = dict(pool="keras", jit="0", onednn="1", bn="batch_stats")
  for item in text.replace("+", ",").split(","):
    key, _, value = item.partition("=")
    if key not in v:
      raise app.UsageError(f"unknown variant key {key!r} in {text!r}; keys: {', '.join(v)}")
    v[key] = value
  return v


def _build(v, cfg):
  teacher, student = benchkit.networks(
      teacher_model=cfg["teacher_model"], model=cfg["model"], image_size=cfg["image_size"],
      channels=3, num_classes=cfg["num_classes"], pool=v["pool"])
  return benchkit.distiller(student, teacher, cfg["hints"], jit_compile=v["jit"] == "1",
                            jac_bn_policy=v["bn"], num_classes=cfg["num_classes"])


def run_single(v, cfg):
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  distiller = _build(v, cfg)
  x, y = benchkit.batch(cfg["batch_size"], cfg["image_size"], 3, cfg["num_classes"])
  element = benchkit.element(distiller, x, y, cfg["teacher_cache"])
  out = {}
  if cfg["check"]:  # one step's gradients at the initial weights, before any update
    fn = tf.function(lambda: distiller.step_gradients(element, tf.constant(0, tf.int64))[0],
                     jit_compile=v["jit"] == "1")
    out["grads"] = [None if g is None else np.asarray(g).tolist() for g in fn()]
  dataset = benchkit.repeated(element)
  distiller.fit(dataset, epochs=1, steps_per_epoch=cfg["warmup"] + 1, verbose=0)
  iterator = iter(dataset)
  times = []
  for _ in range(cfg["steps"]):
    start = time.perf_counter()
    float(np.asarray(distiller.train_function(iterator)["loss"]))
    times.append(time.perf_counter() - start)
  out["ms"] = [1000 * t for t in times]
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  cfg = dict(hints=FLAGS.hints, batch_size=FLAGS.batch_size, image_size=FLAGS.image_size,
             num_classes=FLAGS.num_classes, teacher_model=FLAGS.teacher_model,
             model=FLAGS.model, teacher_cache=FLAGS.teacher_cache, steps=FLAGS.steps,
             warmup=FLAGS.warmup, check=False)
  if FLAGS.single:
    job = json.loads(FLAGS.single)
    print(MARKER + json.dumps(run_single(job["variant"], job["cfg"])), flush=True)
    return
  import numpy as np  # pylint: disable=g-import-not-at-top
  texts = FLAGS.variant
  variants = [parse(t) for t in texts]
  times = {t: [] for t in texts}
  grads = {}
  for r in range(FLAGS.rounds):
    for text, v in zip(texts, variants):
      env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                 TF_ENABLE_ONEDNN_OPTS="0" if v["onednn"] == "0" else "1")
      job = dict(variant=v, cfg=dict(cfg, check=FLAGS.check and r == 0))
      print(f"round {r + 1}/{FLAGS.rounds}: {text} ...", file=sys.stderr, flush=True)
      proc = subprocess.run([sys.executable, os.path.abspath(__file__),
                             "--single=" + json.dumps(job)], env=env, capture_output=True,
                            text=True, check=False)
      lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
      if proc.returncode or not lines:
        sys.stderr.write(proc.stderr[-3000:])
        sys.exit(f"step_variants: {text} failed (exit code {proc.returncode})")
      result = json.loads(lines[-1][len(MARKER):])
      times[text] += result["ms"]
      if "grads" in result:
        grads[text] = [None if g is None else np.asarray(g) for g in result["grads"]]
  base = texts[0]
  base_ms = statistics.median(times[base])
  print(f"hints={FLAGS.hints} batch={FLAGS.batch_size} {FLAGS.teacher_model}->{FLAGS.model} "
        f"{FLAGS.image_size}x{FLAGS.image_size}x3, {FLAGS.num_classes} classes, teacher_cache="
        f"{FLAGS.teacher_cache}; median of {FLAGS.rounds} x {FLAGS.steps} steps\n")
  print("| variant | ms/step | images/s | ratio to the first | gradient rel. diff to the "
        "first |\n|---|---|---|---|---|")
  for text in texts:
    ms = statistics.median(times[text])
    diff = "-"
    if text in grads and base in grads:
      a = [g for g in grads[text] if g is not None]
      b = [g for g in grads[base] if g is not None]
      num = np.sqrt(sum(np.sum((p - q) ** 2) for p, q in zip(a, b)))
      den = np.sqrt(sum(np.sum(q ** 2) for q in b))
      diff = f"{num / den:.1e}"
    print(f"| {text} | {ms:.0f} | {FLAGS.batch_size / ms * 1000:.0f} | {ms / base_ms:.2f} | "
          f"{diff} |")


if __name__ == "__main__":
  app.run(main)
