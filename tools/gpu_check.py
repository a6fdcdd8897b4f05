"""The device check of issue 22 in one command, for the rare session that is lent a GPU: the
Jacobian tests on the device, XLA and mixed-precision exactness of the Jacobian step per
estimator, the benchmark (tfjac against the torch peer where torch sees CUDA), and one
Fashion-MNIST 10-per-class distillation cell. It prints one markdown table and writes it, with
every section's raw output, under --out_dir.

  python tools/gpu_check.py --out_dir=runs/gpu_check             # about 8 minutes on one GPU
  python tools/gpu_check.py --out_dir=/tmp/gpu_check --smoke     # tiny sizes: the wiring, on CPU

Each section runs in its own subprocess with its own time limit, inside an overall budget
(--budget_s); a section that does not fit is reported as skipped, never silently dropped.
Sections: tests (pytest on tests/test_estimators.py, test_jacobians.py, test_precision.py),
exactness (this file's --section=exactness: step gradients under XLA against graph mode for
backprop, jvp and fd, on images with blank regions, where max-pooling has ties; mixed_bfloat16
and mixed_float16 against float32), benchmark (tools/benchmark.py: ce, act,jac,ce at the label
by backprop, and every output by backprop, jvp and fd, float32 and mixed_bfloat16, plus XLA rows
for the estimators; the torch peer column only where torch has CUDA, else it says so) and
fashion_mnist (tools/reproduce.py's act + jac + CE cell at 10 per class, seed 0, when the data
is found; skipped otherwise). --smoke shrinks every size and runs the Fashion-MNIST cell as a
dry run (its commands only).

argparse, not absl flags: the tests import this module beside tfjac's flags.
"""
import argparse
import dataclasses
import glob
import json
import os
import re
import subprocess
import sys
import time
from typing import Callable, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = "GPU_CHECK_RESULT "
FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)
TEST_FILES = ("tests/test_estimators.py", "tests/test_jacobians.py", "tests/test_precision.py")
BUDGET_S = 500  # about 8 minutes: the device session's 15 leave room for start-up and a rerun
# --smoke on a CPU tests the wiring, not the GPU's budget: its sections took 7, 33, 88 and 39 s
# on a quiet 2-core Zen 4, and CPUs differ 3-7x, so its limits are about 3-6x that.
SMOKE_BUDGET_S = 1500


@dataclasses.dataclass
class Section:
  name: str
  command: List[str]
  timeout_s: int
  parse: Callable[[str, int], List[List[str]]]  # (output, exit code) -> rows


def parse_args(argv: Optional[Sequence[str]] = None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--out_dir", required=True, help="Where the table and raw outputs go.")
  p.add_argument("--smoke", action="store_true", help="Tiny sizes: test the wiring on a CPU.")
  p.add_argument("--budget_s", type=int, default=None, help="Overall time budget "
                 f"(seconds; default {BUDGET_S}, {SMOKE_BUDGET_S} with --smoke); sections that "
                 "do not fit are reported as skipped.")
  p.add_argument("--data_dir", default=None, help="Fashion-MNIST's IDX files, if not in "
                 + " or ".join(FASHION_DIRS) + ".")
  p.add_argument("--sections", default="tests,exactness,benchmark,fashion_mnist",
                 help="Comma-separated sections to run.")
  p.add_argument("--section", default=None, help="Internal: run one in-process section.")
  args = p.parse_args(argv)
  if args.budget_s is None:
    args.budget_s = SMOKE_BUDGET_S if args.smoke else BUDGET_S
  return args


def _python(*args):
  return [sys.executable, *args]


# --- parsers of the sections' outputs -------------------------------------------------------

def parse_pytest(output, code):
  counts = dict((k, int(v)) for v, k in re.findall(
      r"(\d+) (passed|failed|error|errors|skipped|deselected)", output.splitlines()[-1]
      if output.strip() else ""))
  failed = [l.split(" ", 1)[1] for l in output.splitlines() if l.startswith("FAILED ")]
  verdict = "ok" if code == 0 else f"FAILED (exit {code})"
  return [["tests", "pytest " + " ".join(os.path.basename(f) for f in TEST_FILES),
           verdict, ", ".join(f"{v} {k}" for k, v in counts.items()) +
           ("; " + "; ".join(failed[:5]) if failed else "")]]


def parse_marker(output, code):
  lines = [l for l in output.splitlines() if l.startswith(MARKER)]
  if code or not lines:
    return [["exactness", "in-process checks", f"FAILED (exit {code})",
             (output.strip().splitlines() or ["no output"])[-1][:200]]]
  return json.loads(lines[-1][len(MARKER):])


def parse_benchmark(output, code, section="benchmark"):
  if code:
    return [[section, "tools/benchmark.py", f"FAILED (exit {code})",
             (output.strip().splitlines() or ["no output"])[-1][:200]]]
  rows, head = [], None
  for line in output.splitlines():
    if not line.startswith("| "):
      continue
    cells = [c.strip() for c in line.strip("|").split("|")]
    if head is None:
      head = cells
      continue
    r = dict(zip(head, cells))
    what = (f"{r['hints']} {r['jac_target']} {r['estimator']} {r['precision']} "
            f"jit={r['jit']} batch={r['batch']}")
    if r.get("ms/step", "").startswith("skipped"):
      rows.append([section, what, "skipped", r["ms/step"]])
      continue
    memory = r.get("GPU peak MiB") or r.get("step peak MiB")
    note = (f"ratio to ce {r['ratio to ce']}, to label backprop {r['ratio to label backprop']}"
            f", memory {memory} MiB")
    if "% of matmul peak" in r and r["% of matmul peak"] != "-":
      note += f", {r['% of matmul peak']} of the matmul peak"
    if "tfjac / torch" in r:
      note += f", torch {r['torch images/s']}, tfjac/torch {r['tfjac / torch']}"
    rows.append([section, what, f"{r['images/s']} img/s", note])
  peak = re.search(r"Matmul peak .*?: (.*?)\.", output)
  if peak:
    rows.append([section, "matmul peak", peak.group(1), ""])
  return rows


def parse_reproduce(output, code, out=None, dry_run=False):
  if dry_run:
    commands = [l for l in output.splitlines() if "tfjac.run" in l or "--mode=" in l]
    return [["fashion_mnist", "act + jac + CE, 10/class, seed 0 (dry run)",
             "ok" if code == 0 and commands else f"FAILED (exit {code})",
             f"{len(commands)} command(s)"]]
  if code:
    return [["fashion_mnist", "act + jac + CE, 10/class, seed 0", f"FAILED (exit {code})",
             (output.strip().splitlines() or ["no output"])[-1][:200]]]
  import results_tables  # pylint: disable=g-import-not-at-top  (read_results: the one reader)
  accuracies = []
  for path in glob.glob(os.path.join(out or "", "cells", "*", "n10", "seed0", "results.json")):
    accuracies.append(results_tables.read_results(os.path.dirname(path))["student"]["test"]["accuracy"])
  value = f"{100 * accuracies[0]:.2f}% test" if accuracies else "no results.json"
  return [["fashion_mnist", "act + jac + CE, 10/class, seed 0", value,
           "tools/reproduce.py's preset (teacher VGG-4 x0.5, 3 epochs; 500 steps)"]]


# --- the plan ---------------------------------------------------------------------------------

def fashion_dir(data_dir):
  for d in ([data_dir] if data_dir else []) + list(FASHION_DIRS):
    if d and os.path.exists(os.path.join(d, "train-images-idx3-ubyte.gz")):
      return d
  return None


def torch_cuda():
  """'cuda' / 'cpu only' / 'not installed': what the torch peer would run on."""
  probe = subprocess.run(_python("-c", "import torch; print(torch.cuda.is_available())"),
                         capture_output=True, text=True, check=False)
  if probe.returncode:
    return "not installed"
  return "cuda" if probe.stdout.strip() == "True" else "cpu only"


def plan(args, torch_device: str) -> List[Section]:
  out, smoke = args.out_dir, args.smoke
  sections = []
  wanted = set(args.sections.split(","))
  if "tests" in wanted:
    select = (["-k", "test_checks or cpu_bfloat16 or auto_precision"] if smoke else [])
    sections.append(Section("tests", _python("-m", "pytest", "-q", "-p", "no:cacheprovider",
                                             *TEST_FILES, *select), 300 if smoke else 240,
                            parse_pytest))
  bench_rows = []
  if "exactness" in wanted:
    sections.append(Section("exactness", _python(os.path.abspath(__file__), "--section=exactness",
                                                 f"--out_dir={out}",
                                                 *(["--smoke"] if smoke else [])),
                            400 if smoke else 90, parse_marker))
  if "benchmark" in wanted:
    size = (["--image_size=8", "--num_classes=10", "--batch_sizes=8", "--steps=2", "--warmup=1",
             "--width=0.25", "--matmul_size=256"] if smoke else
            ["--batch_sizes=128", "--steps=10", "--warmup=3"])
    peer = ["--peer=torch"] if torch_device == "cuda" else []
    common = [os.path.join(REPO, "tools", "benchmark.py"), "--grid=product",
              "--jac_bn_policy=batch_stats", "--teacher_cache=off", "--replicas=1",
              "--jac_probes=1", *size]
    main = _python(*common, "--hints_sets=ce;act,jac,ce", "--jac_targets=label,all",
                   "--jac_estimators=backprop,jvp,fd", "--jit_compile=false",
                   "--mixed_precision=float32,mixed_bfloat16", *peer,
                   f"--json={os.path.join(out, 'benchmark.json')}")
    xla = _python(*common, "--hints_sets=ce;act,jac,ce", "--jac_targets=all",
                  "--jac_estimators=jvp,fd", "--jit_compile=true", "--mixed_precision=float32",
                  "--nomatmul_peak", f"--json={os.path.join(out, 'benchmark_xla.json')}")
    note = {"cuda": [], "cpu only": ["torch has no CUDA here: no peer column"],
            "not installed": ["torch is not installed: no peer column"]}[torch_device]

    def parse_main(output, code, note=note):
      rows = parse_benchmark(output, code)
      return rows + [["benchmark", "torch peer", "skipped", n] for n in note]
    bench_rows = [Section("benchmark", main, 500 if smoke else 220, parse_main),
                  Section("benchmark_xla", xla, 300 if smoke else 90,
                          lambda o, c: parse_benchmark(o, c, "benchmark (XLA)"))]
  sections.extend(bench_rows[:1])
  if "fashion_mnist" in wanted:
    data = fashion_dir(args.data_dir)
    cell_out = os.path.join(out, "fashion_mnist")
    command = _python(os.path.join(REPO, "tools", "reproduce.py"), "--table=distill",
                      "--dataset=fashion_mnist", "--samples_per_class=10", "--rows=act_jac_ce",
                      "--seeds=1", f"--out={cell_out}", *(["--dry_run"] if smoke else []),
                      *([f"--data_dir={data}"] if data else []))
    if data is None and not smoke:
      sections.append(Section("fashion_mnist", [], 0, lambda o, c: [[
          "fashion_mnist", "act + jac + CE, 10/class", "skipped",
          "no Fashion-MNIST IDX files in " + ", ".join(FASHION_DIRS) + " or --data_dir"]]))
    else:
      sections.append(Section("fashion_mnist", command, 60 if smoke else 180,
                              lambda o, c: parse_reproduce(o, c, cell_out, dry_run=smoke)))
  # The XLA speed rows last: the exactness section has XLA's correctness already.
  return sections + bench_rows[1:]


def run_command(command, timeout_s):
  """(output, exit code) of a command run from the repository root; 124 on timeout."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  try:
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout_s, check=False)
    return proc.stdout + proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    text = (e.stdout or b"") + (e.stderr or b"")
    return (text.decode() if isinstance(text, bytes) else text) + "\ntimed out", 124


def run_plan(sections: List[Section], out_dir, budget_s, runner=run_command):
  """Runs the sections in order within budget_s; returns the table's rows."""
  rows, start = [], time.time()
  os.makedirs(out_dir, exist_ok=True)
  for section in sections:
    left = budget_s - (time.time() - start)
    if section.command and left < min(section.timeout_s, 30):
      rows.append([section.name, "-", "skipped", f"out of budget ({left:.0f} s left)"])
      continue
    began = time.time()
    output, code = runner(section.command, min(section.timeout_s, max(1, int(left)))) \
        if section.command else ("", 0)
    with open(os.path.join(out_dir, f"{section.name}.log"), "w") as f:
      f.write(" ".join(section.command) + "\n\n" + output)
    if code == 124:
      rows.append([section.name, "-", "TIMED OUT", f"after {time.time() - began:.0f} s"])
      continue
    rows.extend(section.parse(output, code))
    print(f"[gpu_check] {section.name}: {time.time() - began:.0f} s", file=sys.stderr,
          flush=True)
  return rows


def render(rows, header):
  lines = [header, "", "| section | check | result | note |", "|---|---|---|---|"]
  lines += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
  return "\n".join(lines) + "\n"


# --- the in-process section: exactness ------------------------------------------------------

def exactness(smoke):
  """Rows: XLA against graph mode per estimator, and mixed precision against float32."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import keras  # pylint: disable=g-import-not-at-top
  import benchkit  # pylint: disable=g-import-not-at-top  (tools/: the timing tools' step)
  from tfjac import models  # pylint: disable=g-import-not-at-top

  side, classes, batch, width = (8, 10, 8, 0.25) if smoke else (32, 100, 64, 1.0)
  rng = np.random.default_rng(0)
  images = rng.random((batch, side, side, 3)).astype(np.float32)
  images[:, :, : side // 2] = 0.0  # blank regions: ties in max-pooling, as in real images
  x, y = tf.constant(images), tf.constant(rng.integers(0, classes, batch), tf.int32)
  gpus = tf.config.list_physical_devices("GPU")
  where = "GPU" if gpus else "CPU"
  stats = dict(mean=[0.5] * 3, std=[0.25] * 3)

  def gradients(policy, estimator, target, jit):
    keras.mixed_precision.set_global_policy(policy)
    try:
      keras.utils.set_random_seed(0)  # student, then teacher: the draws of its past results
      student = models.build("vgg4", (side, side, 3), classes, width=width, **stats)
      teacher = models.build("vgg9", (side, side, 3), classes, width=width / 4, **stats)
      d = benchkit.distiller(student, teacher, "act,jac,ce", compile=False,
                             jac_estimator=estimator, jac_target=target, jac_probes=2,
                             # fd at 1e-2: at the default 1e-3 float32 rounding (XLA fuses,
                             # so rounds otherwise) amplified by 1/(2 eps) moves some
                             # elements by ~0.5%.
                             jac_fd_eps=1e-2)

      @tf.function(jit_compile=jit)
      def step():
        with tf.GradientTape() as tape:
          loss = d.compute_total_loss(x, y, training=True, step=tf.constant(1, tf.int64))[0]
        return loss, [g for g in tape.gradient(loss, d.trained_variables) if g is not None]
      loss, grads = step()
      return float(loss), np.concatenate([g.numpy().ravel() for g in grads])
    finally:
      keras.mixed_precision.set_global_policy("float32")

  def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))

  rows = []
  for estimator, target in (("backprop", "label"), ("jvp", "all"), ("fd", "all")):
    try:
      _, graph = gradients("float32", estimator, target, False)
      _, xla = gradients("float32", estimator, target, True)
      error = rel(xla, graph)
      verdict = "exact" if error < 1e-4 else "differs"  # float32 rounding: ~1e-6
      allowed = ("allowed by tfjac.run; eps 1e-2" if estimator == "fd" else
                 "refused by tfjac.run")
      rows.append(["exactness", f"XLA vs graph, {estimator} ({target}), {where}", verdict,
                   f"relative gradient error {error:.2e}; {allowed}"])
    except Exception as e:  # pylint: disable=broad-except
      rows.append(["exactness", f"XLA vs graph, {estimator}, {where}", "FAILED",
                   f"{type(e).__name__}: {str(e)[:150]}"])
  policies = ["mixed_bfloat16"] + (["mixed_float16"] if gpus else [])
  for policy in policies:
    for estimator, target in (("backprop", "label"), ("jvp", "all")):
      try:
        loss32, g32 = gradients("float32", estimator, target, False)
        loss_lp, g_lp = gradients(policy, estimator, target, False)
        rows.append(["exactness", f"{policy} vs float32, {estimator} ({target}), {where}",
                     f"loss {abs(loss_lp - loss32) / abs(loss32):.1e} rel.",
                     f"relative gradient error {rel(g_lp, g32):.3f} (the CPU test's "
                     "tolerance: 0.15)"])
      except Exception as e:  # pylint: disable=broad-except
        rows.append(["exactness", f"{policy}, {estimator}, {where}", "FAILED",
                     f"{type(e).__name__}: {str(e)[:150]}"])
  return rows


def device_line():
  probe = subprocess.run(_python("-c", "import tensorflow as tf; g = tf.config.list_physical_"
                                 "devices('GPU'); print(len(g), tf.__version__, "
                                 "[tf.config.experimental.get_device_details(d).get("
                                 "'device_name', '?') for d in g])"),
                         capture_output=True, text=True, check=False,
                         env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  return probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else "unknown"


def main(argv=None):
  args = parse_args(argv)
  if args.section == "exactness":
    print(MARKER + json.dumps(exactness(args.smoke)), flush=True)
    return 0
  os.makedirs(args.out_dir, exist_ok=True)
  torch_device = torch_cuda()
  device = device_line()
  rows = run_plan(plan(args, torch_device), args.out_dir, args.budget_s)
  header = (f"# tfjac device check{' (smoke)' if args.smoke else ''}\n\nGPUs, TensorFlow, "
            f"names: {device}; torch peer: {torch_device}; {time.strftime('%Y-%m-%d %H:%M')}")
  text = render(rows, header)
  with open(os.path.join(args.out_dir, "gpu_check.md"), "w") as f:
    f.write(text)
  with open(os.path.join(args.out_dir, "gpu_check.json"), "w") as f:
    json.dump({"device": device, "torch": torch_device, "rows": rows}, f, indent=2)
  print(text)
  return 1 if any(r[2].startswith(("FAILED", "TIMED OUT")) for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
