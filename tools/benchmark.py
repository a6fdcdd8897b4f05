"""Speed and memory of one Distiller training step, over hint sets, Jacobian targets, BatchNorm
policies, cached vs per-batch teacher outputs, XLA, batch sizes, replicas and precisions.

`python tools/benchmark.py` times the compiled train step (Distiller.train_step through keras'
train function) of a VGG-9 teacher -> VGG-4 student on random 32x32x3 images, 100 classes
(the poster's shapes), and prints a markdown table: median ms/step, images/s, ratio to the
`ce` step of the same batch size / XLA / replicas / precision, peak memory; --json writes
every number. Each configuration runs in a fresh subprocess so that its peak memory is its own.

--grid=sweep (default) varies one dimension at a time around a base configuration (--base_hints
with the first value of every other list), plus a `ce` row for every batch size / XLA /
replicas / precision it uses; --grid=product measures the full cross product (large).
teacher_cache on: the teacher's outputs are computed once before timing (Distiller.teacher_pass)
and fed with the batch, as --teacher_cache does; only where that is valid (a teacher hint, no
noise hint, a target not drawn per step). replicas 2: MirroredStrategy over 2 logical CPU
devices on a CPU (same cores: this measures the overhead of the replication, not a speed-up),
or over 2 GPUs when there are (skipped with one GPU).

CPU: peak RSS of the subprocess, and 'step peak' = VmHWM at the end minus VmRSS right before the
first step (graph tracing included). GPU: the allocator's peak over the steps. Random data:
this measures speed, not accuracy.

--peer=torch: the same step written plainly in PyTorch eager (tools/torch_peer.py), timed in
the same run, one subprocess per hint set and precision (torch.autocast for the mixed ones),
with tfjac's images/s over torch's.

--jac_estimators: how the Jacobian terms are computed (backprop, jvp, fd; hints/estimators.py),
with --jac_probes and --jac_fd_eps; with --jac_targets=label,all the column 'ratio to label
backprop' gives each row's cost against today's default (the label row by backprop, all else
equal). --matmul_peak (default on): the float32 and bfloat16 square-matmul rates of this
device, measured in their own subprocesses, and each row's arithmetic rate (the hand count
below) as a share of the peak of its precision.
"""
import itertools
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import benchkit  # noqa: E402  (the synthetic step and its strategy; imports no TensorFlow)

flags.DEFINE_multi_string("hints_sets", ["ce", "act,ce", "kd,ce", "act,jac,ce", "act,jac",
                                         "jac_ce,ce", "noise,ce"],
                          "Hint sets to measure, each comma-separated; several per flag "
                          "separated by ';', or repeat the flag.")
flags.DEFINE_string("base_hints", "act,jac,ce", "--grid=sweep: the hint set whose Jacobian "
                    "targets, BatchNorm policies, XLA, batch sizes, replicas and precisions "
                    "are varied.")
flags.DEFINE_enum("grid", "sweep", ["sweep", "product"], "sweep: one dimension at a time "
                  "around the base configuration; product: every combination.")
flags.DEFINE_string("teacher_model", benchkit.POSTER["teacher_model"], "Teacher architecture "
                    "(tfjac.models).")
flags.DEFINE_string("model", benchkit.POSTER["model"], "Student architecture (tfjac.models).")
flags.DEFINE_float("width", 1.0, "Student channel-width multiplier.")
flags.DEFINE_integer("image_size", benchkit.POSTER["image_size"], "Image height and width.")
flags.DEFINE_integer("channels", benchkit.POSTER["channels"], "Image channels.")
flags.DEFINE_integer("num_classes", benchkit.POSTER["num_classes"], "Number of classes.")
flags.DEFINE_list("batch_sizes", ["128"], "Global batch sizes to measure.")
flags.DEFINE_integer("steps", 10, "Timed steps (the median is reported).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first (the first one traces the graph).")
flags.DEFINE_integer("rounds", 1, "Rounds per configuration: each round runs the tfjac step "
                     "and then its torch peer (--peer=torch), each in a fresh subprocess, so "
                     "the two sides alternate; a row reports the round of median ms/step of "
                     "each side, and with several rounds the range of tfjac / torch over the "
                     "rounds (the machine's drift between runs shows there, not in one ratio).")
flags.DEFINE_list("jac_bn_policy", ["batch_stats", "inference"], "BatchNorm policies of the "
                  "student's Jacobian (batch_stats, inference); only hint sets with 'jac' use "
                  "it. The first is the base.")
flags.DEFINE_list("jac_targets", ["label", "teacher_top1", "random", "top_k", "projection"],
                  "Jacobian targets to measure (label, teacher_top1, random, top_k, all, "
                  "projection; 'all' takes one backward pass per class: slow); only hint sets "
                  "with Jacobians use them.")
flags.DEFINE_list("jac_estimators", ["backprop"], "How the Jacobian terms are computed "
                  "(backprop, jvp, fd; --jac_estimator of tfjac.run); only hint sets with "
                  "Jacobians use them. The first is the base.")
flags.DEFINE_integer("jac_probes", 1, "Probes of the jvp and fd estimators.")
flags.DEFINE_float("jac_fd_eps", 1e-3, "Step of the fd estimator.")
flags.DEFINE_boolean("matmul_peak", True, "Also measure the device's float32 and bfloat16 "
                     "matmul rates (--matmul_size square matrices) and report each row's share.")
flags.DEFINE_integer("matmul_size", 4096, "Side of the square matrices of --matmul_peak.")
flags.DEFINE_integer("jac_top_k", 5, "k of the top_k target.")
flags.DEFINE_integer("jac_projections", 1, "Projections of the projection target.")
flags.DEFINE_list("teacher_cache", ["off", "on"], "Teacher outputs per batch (off) or cached "
                  "(on; where valid).")
flags.DEFINE_list("jit_compile", ["false", "true"], "XLA settings to measure: false, true.")
flags.DEFINE_list("replicas", ["1", "2"], "Replicas to measure (1, 2).")
flags.DEFINE_list("jac_every", ["1"], "Lazy Jacobian matching periods to measure (--jac_every "
                  "of tfjac.run); K > 1 reports the mean step over whole periods of K steps, "
                  "only for hint sets with Jacobians and a hint without.")
flags.DEFINE_list("mixed_precision", ["float32"], "Keras dtype policies to measure: float32, "
                  "mixed_float16, mixed_bfloat16 (float16 is emulated on CPU: slow).")
flags.DEFINE_enum("peer", "none", ["none", "torch"], "torch: also time the same step written "
                  "plainly in PyTorch eager (tools/torch_peer.py: same networks, losses, "
                  "label-class Jacobians by backprop, optimizer, batch; the teacher runs every "
                  "step), in this run, for every hint set it has (ce, act, kd, jac) at replicas "
                  "1, in the row's precision (torch.autocast for mixed_bfloat16 / "
                  "mixed_float16), on CUDA when torch sees a GPU, else the CPU; adds its "
                  "images/s and tfjac's ratio to it. Needs torch (pip install -e .[bench]).")
flags.DEFINE_string("json", None, "Also write the results to this JSON file.")
flags.DEFINE_string("single", None, "Internal: run one configuration (JSON) and print it.")
flags.DEFINE_string("single_peer", None, "Internal: time one configuration (JSON) with the "
                    "torch peer and print it.")
flags.DEFINE_string("single_matmul", None, "Internal: measure the matmul rate of one dtype "
                    "(JSON {dtype, size, steps}) and print it.")
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


def _double_backprop(hints):
  from tfjac import hints as hints_lib  # pylint: disable=g-import-not-at-top
  return any(hints_lib.HINTS[h].student_jacobians for h in hints.split(","))


def _cacheable(hints, target, estimator="backprop"):
  """Where --teacher_cache can be on (the benchmark never augments)."""
  from tfjac.training import teacher_cache  # pylint: disable=g-import-not-at-top
  return teacher_cache.hints_blocker(hints.split(","), target, estimator) is None


def _valid(cfg):
  """Whether tfjac.run would take the configuration: the hint settings' own rules
  (training/settings.check_rules, the Distiller's and the command line's), then the run's."""
  from tfjac.config import HintConfig  # pylint: disable=g-import-not-at-top
  from tfjac.errors import SettingError  # pylint: disable=g-import-not-at-top
  from tfjac.training import settings  # pylint: disable=g-import-not-at-top
  estimator = cfg.get("jac_estimator", "backprop")
  try:
    settings.check_rules(HintConfig(
        hints=tuple(cfg["hints"].split(",")), jac_target=cfg["jac_target"],
        jac_top_k=cfg["jac_top_k"], jac_projections=cfg["jac_projections"],
        jac_estimator=estimator, jac_probes=cfg.get("jac_probes", 1),
        jac_fd_eps=cfg.get("jac_fd_eps", 1e-3), jac_every=cfg.get("jac_every", 1),
        loss_scaling="none"), cfg["num_classes"])
  except SettingError:
    return False
  if estimator == "fd" and cfg["mixed_precision"] != "float32":
    return False  # refused by tfjac.run (the differences are lost in low precision)
  return not cfg["teacher_cache"] or _cacheable(cfg["hints"], cfg["jac_target"], estimator)


def run_single(cfg):
  """Builds and times one configuration in this process; returns its results dict."""
  strategy = benchkit.strategy(cfg["replicas"])  # before any op runs
  import keras  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from tfjac import models  # pylint: disable=g-import-not-at-top

  gpus = tf.config.list_physical_devices("GPU")
  if strategy is None:
    return dict(cfg, skipped=f"{len(gpus)} GPU(s) for {cfg['replicas']} replicas")
  keras.mixed_precision.set_global_policy(cfg["mixed_precision"])
  with strategy.scope():
    teacher, student = benchkit.networks(
        teacher_model=cfg["teacher_model"], model=cfg["model"], image_size=cfg["image_size"],
        channels=cfg["channels"], num_classes=cfg["num_classes"], width=cfg["width"],
        sync_bn=cfg["replicas"] > 1)
    # The teacher is passed for every hint set, as --mode=distill does.
    # Raw terms, the loss the torch peer computes (the default scaling adds a few scalar ops).
    distiller = benchkit.distiller(
        student, teacher, cfg["hints"], jit_compile=cfg["jit_compile"],
        jac_bn_policy=cfg["bn_policy"], loss_scaling="none", num_classes=cfg["num_classes"],
        jac_target=cfg["jac_target"], jac_top_k=cfg["jac_top_k"],
        jac_projections=cfg["jac_projections"], jac_every=cfg.get("jac_every", 1),
        jac_estimator=cfg.get("jac_estimator", "backprop"),
        jac_probes=cfg.get("jac_probes", 1), jac_fd_eps=cfg.get("jac_fd_eps", 1e-3))
  x, y = benchkit.batch(cfg["batch_size"], cfg["image_size"], cfg["channels"],
                        cfg["num_classes"])
  # Teacher outputs computed once, outside the timed steps, as before a fit.
  dataset = benchkit.repeated(benchkit.element(distiller, x, y, cfg["teacher_cache"]))
  if gpus:
    tf.config.experimental.reset_memory_stats("GPU:0")
  rss_before = _proc_status_kib("VmRSS")
  # fit builds what a strategy needs (optimizer slots, metrics) and runs the warm-up steps.
  distiller.fit(dataset, epochs=1, steps_per_epoch=cfg["warmup"], verbose=0)
  iterator = iter(strategy.experimental_distribute_dataset(dataset)
                  if cfg["replicas"] > 1 else dataset)
  times = []
  every = cfg.get("jac_every", 1)
  steps = -(-cfg["steps"] // every) * every  # whole periods of the lazy Jacobian steps
  if every > 1:  # start the timed steps on a Jacobian step
    while int(distiller.optimizer.iterations) % every:
      distiller.train_function(iterator)
  for _ in range(steps):
    start = time.perf_counter()
    logs = distiller.train_function(iterator)
    loss = float(np.asarray(logs["loss"]))  # to numpy: synchronised
    times.append(time.perf_counter() - start)
  if not np.isfinite(loss):
    raise RuntimeError(f"non-finite loss {loss} for {cfg}")
  ms = 1000 * (statistics.median(times) if every == 1 else statistics.mean(times))
  result = dict(cfg, ms_per_step=ms, images_per_s=cfg["batch_size"] / ms * 1000,
                teacher_macs=models.multiply_accumulates(teacher),
                student_macs=models.multiply_accumulates(student),
                ms_per_step_all=[1000 * t for t in times],
                peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                step_peak_mib=(_proc_status_kib("VmHWM") - rss_before) / 1024,
                device=_device(tf), tensorflow=tf.__version__, keras=keras.__version__)
  if gpus:
    result["gpu_peak_mib"] = tf.config.experimental.get_memory_info("GPU:0")["peak"] / 2**20
  return result


def _lists():
  truthy = lambda v: v.strip().lower() in ("true", "1", "yes", "on")  # noqa: E731
  return dict(
      hints=[s.strip() for flag in FLAGS.hints_sets for s in flag.split(";") if s.strip()],
      jac_target=list(FLAGS.jac_targets), bn_policy=list(FLAGS.jac_bn_policy),
      teacher_cache=list(dict.fromkeys(truthy(v) for v in FLAGS.teacher_cache)),
      jit_compile=list(dict.fromkeys(truthy(v) for v in FLAGS.jit_compile)),
      batch_size=[int(v) for v in FLAGS.batch_sizes], replicas=[int(v) for v in FLAGS.replicas],
      mixed_precision=list(FLAGS.mixed_precision),
      jac_every=[int(v) for v in FLAGS.jac_every],
      jac_estimator=list(FLAGS.jac_estimators))


_RATIO_KEYS = ("batch_size", "jit_compile", "replicas", "mixed_precision")


def configurations():
  common = dict(teacher_model=FLAGS.teacher_model, model=FLAGS.model, width=FLAGS.width,
                image_size=FLAGS.image_size, channels=FLAGS.channels,
                num_classes=FLAGS.num_classes, steps=FLAGS.steps, warmup=FLAGS.warmup,
                jac_top_k=FLAGS.jac_top_k, jac_projections=FLAGS.jac_projections,
                jac_probes=FLAGS.jac_probes, jac_fd_eps=FLAGS.jac_fd_eps)
  lists = _lists()
  if FLAGS.grid == "product":
    chosen = [dict(zip(lists, values)) for values in itertools.product(*lists.values())]
  else:
    base = {k: v[0] for k, v in lists.items()}
    base["hints"], base["teacher_cache"] = FLAGS.base_hints, False
    chosen = [base]
    for key, values in lists.items():
      for value in values:
        chosen.append(dict(base, **{key: value}))
    for hints in lists["hints"]:  # every hint set with and without the cache
      for cache in lists["teacher_cache"]:
        chosen.append(dict(base, hints=hints, teacher_cache=cache))
    for cfg in list(chosen):  # the ce step each row's ratio refers to
      chosen.append(dict(base, hints="ce", **{k: cfg[k] for k in _RATIO_KEYS}))
  seen = set()
  for cfg in chosen:
    jac = _uses_jacobians(cfg["hints"])  # target and policy only matter with Jacobians
    if not jac:
      cfg = dict(cfg, jac_target=lists["jac_target"][0], bn_policy=lists["bn_policy"][0],
                 jac_estimator=lists["jac_estimator"][0])
    from tfjac import hints as hints_lib  # pylint: disable=g-import-not-at-top
    names = cfg["hints"].split(",")
    lazy_ok = any(hints_lib.HINTS[h].student_jacobians or hints_lib.HINTS[h].teacher_jacobians
                  for h in names) and not all(hints_lib.HINTS[h].student_jacobians or
                                              hints_lib.HINTS[h].teacher_jacobians
                                              for h in names)
    if cfg.get("jac_every", 1) > 1 and not lazy_ok:
      cfg = dict(cfg, jac_every=1)
    cfg = dict(common, **cfg)
    if not _valid(cfg):
      continue
    key = json.dumps(cfg, sort_keys=True)
    if key not in seen:
      seen.add(key)
      yield cfg


def _peer_row(cfg):  # the rows the torch peer is compared with (autocast for mixed ones)
  return cfg["replicas"] == 1


def _peer_key(cfg):
  return (cfg["hints"], cfg["jac_target"], cfg["batch_size"], cfg["mixed_precision"],
          cfg.get("jac_estimator", "backprop"))


def run_in_subprocess(cfg, flag="single"):
  cmd = [sys.executable, os.path.abspath(__file__), f"--{flag}=" + json.dumps(cfg)]
  proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith(MARKER)]
  if proc.returncode or not lines:
    sys.stderr.write(proc.stderr[-4000:])
    sys.exit(f"benchmark: configuration {cfg} failed (exit code {proc.returncode}); its "
             "stderr is above")
  return json.loads(lines[-1][len(MARKER):])


def run_matmul(spec):
  """{dtype, size, gflops}: the median rate of a size x size matmul chain in `dtype`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  n, dtype = spec["size"], getattr(tf, spec["dtype"])
  a = tf.random.stateless_uniform([n, n], seed=[0, 1], dtype=tf.float32)
  a, b = tf.cast(a, dtype), tf.cast(tf.transpose(a), dtype)

  @tf.function
  def chain():
    c = a
    for _ in range(4):
      c = tf.matmul(c, b) * tf.constant(1e-3, dtype)
    return tf.reduce_sum(tf.cast(c, tf.float32))

  chain()
  times = []
  for _ in range(spec.get("steps", 5)):
    start = time.perf_counter()
    float(chain())
    times.append(time.perf_counter() - start)
  return dict(spec, gflops=4 * 2 * n ** 3 / statistics.median(times) / 1e9, device=_device(tf))


_PEAK_DTYPE = {"float32": "float32", "mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}


def arithmetic_macs(r):
  """Multiply-accumulates per image of the row's step by the hand count of main()'s note, or
  None where it has none (other targets and estimators, noise, attention, lazy steps)."""
  hints = set(r["hints"].split(","))
  t = 0 if r["teacher_cache"] else r["teacher_macs"]
  s = r["student_macs"]
  if r.get("jac_every", 1) != 1:
    return None
  if hints == {"ce"}:
    return 3 * s
  if hints in ({"act", "ce"}, {"kd", "ce"}, {"act"}):
    return t + 3 * s
  if hints in ({"act", "jac", "ce"}, {"act", "jac"}) and r["jac_target"] in (
      "label", "teacher_top1", "random") and r.get("jac_estimator", "backprop") == "backprop":
    return 2 * t + 6 * s
  return None


def _label_backprop_of(r, results):
  keys = _RATIO_KEYS + ("hints", "bn_policy", "teacher_cache", "jac_every")
  return next((c for c in results if "skipped" not in c and c["jac_target"] == "label" and
               c.get("jac_estimator", "backprop") == "backprop" and
               all(c.get(k) == r.get(k) for k in keys)), None)


def _ce_of(r, results):
  return next((c for c in results if c["hints"] == "ce" and "skipped" not in c and
               all(c[k] == r[k] for k in _RATIO_KEYS)), None)


def table(results, peaks=None):
  """The markdown table; `peaks`: {dtype: matmul GFLOP/s} (--matmul_peak)."""
  gpu = any("gpu_peak_mib" in r for r in results)
  head = ["hints", "jac_target", "estimator", "bn_policy", "teacher cache", "jac_every", "jit",
          "batch", "replicas",
          "precision", "ms/step", "images/s", "ratio to ce", "ratio to label backprop",
          "peak RSS MiB", "step peak MiB"] + (["GPU peak MiB"] if gpu else [])
  if peaks:
    head += ["GFLOP/s (count)", "% of matmul peak"]
  peer = any("peer" in r for r in results)
  if peer:
    head += ["torch images/s", "tfjac / torch"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in results:
    jac = _uses_jacobians(r["hints"])
    target = {"top_k": f"top_{r['jac_top_k']}",
              "projection": f"projection x{r['jac_projections']}"}.get(r["jac_target"],
                                                                      r["jac_target"])
    estimator = r.get("jac_estimator", "backprop")
    if estimator != "backprop":
      estimator += f" x{r.get('jac_probes', 1)}" + (
          f" eps {r.get('jac_fd_eps', 1e-3):g}" if estimator == "fd" else "")
    cells = [r["hints"], target if jac else "-", estimator if jac else "-",
             r["bn_policy"] if jac else "-",
             "on" if r["teacher_cache"] else "off", str(r.get("jac_every", 1)),
             str(r["jit_compile"]).lower(),
             str(r["batch_size"]), str(r["replicas"]), r["mixed_precision"]]
    if "skipped" in r:
      rows.append("| " + " | ".join(cells + [f"skipped: {r['skipped']}"] +
                                    [""] * (len(head) - len(cells) - 1)) + " |")
      continue
    ce = _ce_of(r, results)
    ratio = f"{r['ms_per_step'] / ce['ms_per_step']:.2f}" if ce else "n/a"
    label = _label_backprop_of(r, results) if jac else None
    to_label = f"{r['ms_per_step'] / label['ms_per_step']:.2f}" if label else "-"
    cells += [f"{r['ms_per_step']:.1f}", f"{r['images_per_s']:.0f}", ratio, to_label,
              f"{r['peak_rss_mib']:.0f}", f"{r['step_peak_mib']:.0f}"] + (
                  [f"{r.get('gpu_peak_mib', 0):.0f}"] if gpu else [])
    if peaks:
      macs = arithmetic_macs(r)
      peak = peaks.get(_PEAK_DTYPE.get(r["mixed_precision"]))
      rate = None if macs is None else 2 * macs * r["images_per_s"] / 1e9
      cells += ["-" if rate is None else f"{rate:.0f}",
                "-" if rate is None or not peak else f"{100 * rate / peak:.0f}%"]
    if peer:
      p = r.get("peer") or {}
      spread = r.get("peer_ratio_range")
      cells += ([f"{p['images_per_s']:.0f} ({p.get('device', 'cpu')})",
                 f"{r['images_per_s'] / p['images_per_s']:.2f}" + (
                     f" ({spread[0]:.2f}-{spread[1]:.2f})" if spread else "")]
                if "images_per_s" in p else [p.get("skipped", "-"), "-"])
    rows.append("| " + " | ".join(cells) + " |")
  return "\n".join(rows)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if FLAGS.single:
    print(MARKER + json.dumps(run_single(json.loads(FLAGS.single))), flush=True)
    return
  if FLAGS.single_peer:
    import torch_peer  # pylint: disable=g-import-not-at-top
    print(MARKER + json.dumps(torch_peer.time_step(json.loads(FLAGS.single_peer))), flush=True)
    return
  if FLAGS.single_matmul:
    print(MARKER + json.dumps(run_matmul(json.loads(FLAGS.single_matmul))), flush=True)
    return
  if FLAGS.peer == "torch":
    try:
      import torch  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      raise app.UsageError("--peer=torch needs torch: pip install -e .[bench]") from None
  results, peers = [], {}
  configs = list(configurations())
  for i, cfg in enumerate(configs):
    print(f"[{i + 1}/{len(configs)}] hints={cfg['hints']} jac_target={cfg['jac_target']} "
          f"bn_policy={cfg['bn_policy']} teacher_cache={cfg['teacher_cache']} "
          f"jit_compile={cfg['jit_compile']} batch={cfg['batch_size']} "
          f"replicas={cfg['replicas']} precision={cfg['mixed_precision']} "
          f"estimator={cfg.get('jac_estimator', 'backprop')} ...",
          file=sys.stderr, flush=True)
    ours, theirs = [], []
    peer = FLAGS.peer == "torch" and _peer_row(cfg)
    for _ in range(max(1, FLAGS.rounds)):
      ours.append(run_in_subprocess(cfg))
      if peer and (FLAGS.rounds > 1 or _peer_key(cfg) not in peers):
        print(f"    torch peer: hints={cfg['hints']} batch={cfg['batch_size']} ...",
              file=sys.stderr, flush=True)
        theirs.append(run_in_subprocess(cfg, flag="single_peer"))
    results.append(benchkit.median_round(ours))
    if peer:
      if theirs:  # with one round, one torch run per hint set, target and batch size
        peers[_peer_key(cfg)] = benchkit.median_round(theirs)
      results[-1]["peer"] = peers[_peer_key(cfg)]
      if len(theirs) > 1:
        ratios = [a["images_per_s"] / b["images_per_s"] for a, b in zip(ours, theirs)]
        results[-1]["peer_ratio_range"] = [min(ratios), max(ratios)]
  for r in results:
    ce = _ce_of(r, results)
    if ce and "skipped" not in r:
      r["ratio_to_ce"] = r["ms_per_step"] / ce["ms_per_step"]
  peaks = {}
  if FLAGS.matmul_peak:
    for dtype in sorted({_PEAK_DTYPE[r["mixed_precision"]] for r in results} |
                        {"float32", "bfloat16"}):
      print(f"matmul peak: {dtype} ...", file=sys.stderr, flush=True)
      peaks[dtype] = run_in_subprocess({"dtype": dtype, "size": FLAGS.matmul_size},
                                       flag="single_matmul")["gflops"]
  first = next(r for r in results if "skipped" not in r)
  print(f"{first['device']}; TensorFlow {first['tensorflow']}, Keras {first['keras']}; "
        f"{first['teacher_model']} teacher -> {first['model']} student (width {first['width']}), "
        f"input {first['image_size']}x{first['image_size']}x{first['channels']}, "
        f"{first['num_classes']} classes; median of {first['steps']} steps after "
        f"{first['warmup']} warm-up steps" + (
            f"; the median of {FLAGS.rounds} rounds, tfjac and torch alternating, "
            "'tfjac / torch' from the two medians with the range of the rounds' own ratios"
            if FLAGS.rounds > 1 else "") + "\n")
  print(table(results, peaks))
  if peaks:
    print(f"\nMatmul peak ({FLAGS.matmul_size} x {FLAGS.matmul_size}, tf.matmul): " +
          ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in sorted(peaks.items())) +
          ". 'GFLOP/s (count)': 2 x the hand-counted multiply-accumulates below x images/s, "
          "against the peak of the row's precision.")
  t_macs, s_macs = first["teacher_macs"], first["student_macs"]
  print(f"\nMultiply-accumulates per image (tfjac.models.multiply_accumulates): teacher "
        f"{t_macs / 1e6:.1f} M, student {s_macs / 1e6:.1f} M. By arithmetic a ce step is about "
        f"3 x student and act,jac,ce with the teacher every step about 2 x teacher + 6 x student"
        f" (teacher forward and input-gradient; student forward, input-gradient and the "
        f"backward of both): {(2 * t_macs + 6 * s_macs) / (3 * s_macs):.1f}x ce; cached, "
        f"2.0x.")
  if any(r["jit_compile"] and _double_backprop(r["hints"]) and
         r.get("jac_estimator", "backprop") != "fd" for r in results):
    print("\nXLA rows with a double-backprop hint (backprop or jvp) measure speed only: "
          "tfjac.run refuses that combination (XLA's second-order gradient through max-pooling "
          "is wrong; docs/speed.md); fd rows are allowed (first-order gradients only).")
  if FLAGS.json:
    keys = ("device", "tensorflow", "keras", "teacher_model", "model", "width", "image_size",
            "channels", "num_classes", "steps", "warmup")
    with open(FLAGS.json, "w") as f:
      json.dump({**{k: first[k] for k in keys}, "grid": FLAGS.grid, "matmul_peaks": peaks,
                 "results": results}, f, indent=2)
      f.write("\n")


if __name__ == "__main__":
  app.run(main)
