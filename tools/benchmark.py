"""Speed and memory of one Distiller training step per hint set (the poster's shapes by default).

`python tools/benchmark.py` times the compiled train step (Distiller.train_step through
keras' train function) of a VGG-9 teacher -> VGG-4 student on random 32x32x3 images, 100
classes, batch 128, for `ce`, `act,ce` and `act,jac,ce`, and prints a markdown table: median
ms/step, images/s, ratio to `ce`, peak memory. Each configuration runs in a fresh subprocess so
that its peak memory is its own. CPU: peak RSS of the subprocess, and 'step peak' = VmHWM at the
end minus VmRSS right before the first step (graph tracing included). GPU: the allocator's peak
over the steps. Random data: this measures speed, not accuracy.
"""
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

flags.DEFINE_multi_string("hints_sets", ["ce", "act,ce", "act,jac,ce"],
                          "Hint sets to measure, each comma-separated; several per flag "
                          "separated by ';', or repeat the flag.")
flags.DEFINE_string("teacher_model", "vgg9", "Teacher architecture (tfjac.models).")
flags.DEFINE_string("model", "vgg4", "Student architecture (tfjac.models).")
flags.DEFINE_float("width", 1.0, "Student channel-width multiplier.")
flags.DEFINE_integer("image_size", 32, "Image height and width.")
flags.DEFINE_integer("channels", 3, "Image channels.")
flags.DEFINE_integer("num_classes", 100, "Number of classes.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one traces the graph).")
flags.DEFINE_list("jac_bn_policy", ["batch_stats"], "BatchNorm policies of the student's "
                  "Jacobian (batch_stats, inference); only hint sets with 'jac' use it.")
flags.DEFINE_list("jac_targets", ["label"], "Jacobian targets to measure (label, teacher_top1, "
                  "random, top_k, all, projection); only hint sets with Jacobians use them.")
flags.DEFINE_integer("jac_top_k", 5, "k of the top_k target.")
flags.DEFINE_integer("jac_projections", 1, "Projections of the projection target.")
flags.DEFINE_list("jit_compile", ["false"], "XLA settings to measure: false, true or both.")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.DEFINE_string("single", None, "Internal: run one configuration (JSON) and print it.")
FLAGS = flags.FLAGS

MARKER = "BENCHMARK_RESULT "


def _uses_jacobians(hints):  # jac, jac_ce, jacnorm, at_jac: the BatchNorm policy matters
  return any("jac" in h for h in hints.split(","))


def _proc_status_kib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return None


def _device(tf):
  gpus = tf.config.list_physical_devices("GPU")
  if gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    return f"{len(gpus)} GPU(s): {details.get('device_name', gpus[0].name)}"
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"CPU: {model}, {os.cpu_count()} cores visible"


def run_single(cfg):
  """Builds and times one configuration in this process; returns its results dict."""
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tfjac import models  # pylint: disable=g-import-not-at-top
  from tfjac.training.distiller import Distiller  # pylint: disable=g-import-not-at-top

  keras.utils.set_random_seed(0)
  shape = (cfg["image_size"], cfg["image_size"], cfg["channels"])
  stats = dict(mean=[0.5] * cfg["channels"], std=[0.25] * cfg["channels"])
  teacher = models.build(cfg["teacher_model"], shape, cfg["num_classes"], model_name="teacher",
                         **stats)
  student = models.build(cfg["model"], shape, cfg["num_classes"], width=cfg["width"],
                         model_name="student", **stats)
  hints = [(h, 1.0) for h in cfg["hints"].split(",")]
  # The teacher is passed for every hint set, as --mode=distill does.
  distiller = Distiller(student, teacher, hints=hints, bn_policy=cfg["bn_policy"],
                        num_classes=cfg["num_classes"], jac_target=cfg["jac_target"],
                        jac_top_k=cfg["jac_top_k"], jac_projections=cfg["jac_projections"])
  distiller.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                    jit_compile=cfg["jit_compile"])
  rng = np.random.default_rng(0)
  x = tf.constant(rng.random((cfg["batch_size"], *shape), np.float32))
  y = tf.constant(rng.integers(0, cfg["num_classes"], cfg["batch_size"]), tf.int32)
  gpu = bool(tf.config.list_physical_devices("GPU"))
  if gpu:
    tf.config.experimental.reset_memory_stats("GPU:0")
  rss_before = _proc_status_kib("VmRSS")
  times = []
  for i in range(cfg["warmup"] + cfg["steps"]):
    start = time.perf_counter()
    logs = distiller.train_on_batch(x, y, return_dict=True)  # returns numpy: synchronised
    if i >= cfg["warmup"]:
      times.append(time.perf_counter() - start)
  if not np.isfinite(logs["loss"]):
    raise RuntimeError(f"non-finite loss {logs['loss']} for {cfg}")
  ms = 1000 * statistics.median(times)
  result = dict(cfg, ms_per_step=ms, images_per_s=cfg["batch_size"] / ms * 1000,
                ms_per_step_all=[1000 * t for t in times],
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                step_peak_mib=(_proc_status_kib("VmHWM") - rss_before) / 1024,
                device=_device(tf), tensorflow=tf.__version__, keras=keras.__version__)
  if gpu:
    result["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
  return result


def configurations():
  hint_sets = [s.strip() for flag in FLAGS.hints_sets for s in flag.split(";") if s.strip()]
  jits = [v.strip().lower() in ("true", "1", "yes") for v in FLAGS.jit_compile]
  common = dict(teacher_model=FLAGS.teacher_model, model=FLAGS.model, width=FLAGS.width,
                image_size=FLAGS.image_size, channels=FLAGS.channels,
                num_classes=FLAGS.num_classes, batch_size=FLAGS.batch_size, steps=FLAGS.steps,
                warmup=FLAGS.warmup, jac_top_k=FLAGS.jac_top_k,
                jac_projections=FLAGS.jac_projections)
  for jit in dict.fromkeys(jits):
    for hints in hint_sets:
      # The policy only changes the step when the student's Jacobian is taken.
      jac = _uses_jacobians(hints)
      for target in (FLAGS.jac_targets if jac else FLAGS.jac_targets[:1]):
        for policy in (FLAGS.jac_bn_policy if jac else FLAGS.jac_bn_policy[:1]):
          yield dict(common, hints=hints, bn_policy=policy, jit_compile=jit, jac_target=target)


def run_in_subprocess(cfg):
  cmd = [sys.executable, os.path.abspath(__file__), "--single=" + json.dumps(cfg)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stderr[-4000:])
    sys.exit(f"benchmark: configuration {cfg} failed (exit code {proc.returncode}); its "
             "stderr is above")
  return json.loads(lines[-1][len(MARKER):])


def table(results):
  gpu = any("gpu_peak_mib" in r for r in results)
  head = ["hints", "jac_target", "bn_policy", "jit", "ms/step", "images/s", "ratio to ce", "peak RSS MiB",
          "step peak MiB"] + (["GPU peak MiB"] if gpu else [])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    ce = next((c for c in results if c["hints"] == "ce" and c["jit_compile"] == r["jit_compile"]),
              None)
    ratio = f"{r['ms_per_step'] / ce['ms_per_step']:.2f}" if ce else "n/a"
    jac = _uses_jacobians(r["hints"])
    target = {"top_k": f"top_{r['jac_top_k']}",
              "projection": f"projection x{r['jac_projections']}"}.get(r["jac_target"],
                                                                      r["jac_target"])
    cells = [r["hints"], target if jac else "-", r["bn_policy"] if jac else "-", str(r["jit_compile"]).lower(), f"{r['ms_per_step']:.1f}",
             f"{r['images_per_s']:.0f}", ratio, f"{r['peak_rss_mib']:.0f}",
             f"{r['step_peak_mib']:.0f}"] + ([f"{r.get('gpu_peak_mib', 0):.0f}"] if gpu else [])
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.single:
    print(MARKER + json.dumps(run_single(json.loads(FLAGS.single))), flush=True)
    return
  results = []
  for cfg in configurations():
    print(f"measuring hints={cfg['hints']} jac_target={cfg['jac_target']} bn_policy={cfg['bn_policy']} "
          f"jit_compile={cfg['jit_compile']} ...", file=sys.stderr, flush=True)
    results.append(run_in_subprocess(cfg))
  first = results[0]
  print(f"{first['device']}; TensorFlow {first['tensorflow']}, Keras {first['keras']}; "
        f"{first['teacher_model']} teacher -> {first['model']} student (width {first['width']}), "
        f"input {first['image_size']}x{first['image_size']}x{first['channels']}, "
        f"{first['num_classes']} classes, batch {first['batch_size']}; median of "
        f"{first['steps']} steps after {first['warmup']} warm-up steps\n")
  print(table(results))
  if FLAGS.json:
    keys = ("device", "tensorflow", "keras", "teacher_model", "model", "width", "image_size",
            "channels", "num_classes", "batch_size", "steps", "warmup")
    with open(FLAGS.json, "w") as f:
      json.dump({**{k: first[k] for k in keys}, "results": results}, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  app.run(main)
