"""tools/gpu_check.py's wiring, on a CPU: the plan names real files and flags, the parsers read
what the sections print, the budget and timeouts are reported, one table is written. The slow
test runs the whole --smoke check."""
import json
import os
import re
import sys

import pytest

from tests import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "tools"))
import gpu_check  # noqa: E402  pylint: disable=g-import-not-at-top


def _plan(tmp_path, *extra, torch_device="not installed"):
  return gpu_check.plan(gpu_check.parse_args([f"--out_dir={tmp_path}", *extra]), torch_device)


def _defined_flags(tool):
  with open(os.path.join(helpers.REPO, "tools", tool)) as f:
    text = f.read()
  return set(re.findall(r'flags\.DEFINE_\w+\(\s*"(\w+)"', text))


@pytest.mark.parametrize("smoke", [False, True])
def test_the_plan_names_real_files_and_flags(tmp_path, smoke):
  sections = _plan(tmp_path, *(["--smoke"] if smoke else []), "--data_dir=/nowhere")
  assert [s.name for s in sections] == ["tests", "exactness", "benchmark", "fashion_mnist",
                                        "benchmark_xla"]
  for path in gpu_check.TEST_FILES:
    assert os.path.isfile(os.path.join(helpers.REPO, path))
  flags_of = {"benchmark.py": _defined_flags("benchmark.py"),
              "reproduce.py": _defined_flags("reproduce.py")}
  for section in sections:
    tool = next((os.path.basename(a) for a in section.command if a.endswith(".py")), None)
    if tool not in flags_of:
      continue
    for arg in section.command:
      if arg.startswith("--"):
        name = arg[2:].split("=")[0]
        assert name in flags_of[tool] or (name.startswith("no") and name[2:] in
                                          flags_of[tool]), (tool, arg)
  assert gpu_check.BUDGET_S <= 8.5 * 60  # about 8 minutes on the device, all sections
  assert all(0 < s.timeout_s <= gpu_check.BUDGET_S for s in sections if s.command)


def test_peer_only_with_cuda(tmp_path):
  no_cuda = next(s for s in _plan(tmp_path) if s.name == "benchmark")
  cuda = next(s for s in _plan(tmp_path, torch_device="cuda") if s.name == "benchmark")
  assert "--peer=torch" not in no_cuda.command and "--peer=torch" in cuda.command
  rows = no_cuda.parse(BENCHMARK_OUTPUT, 0)
  assert ["benchmark", "torch peer", "skipped", "torch is not installed: no peer column"] in rows


BENCHMARK_OUTPUT = """CPU: test
| hints | jac_target | estimator | bn_policy | teacher cache | jac_every | jit | batch | \
replicas | precision | ms/step | images/s | ratio to ce | ratio to label backprop | \
peak RSS MiB | step peak MiB | GFLOP/s (count) | % of matmul peak |
|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|
| act,jac,ce | all | jvp x1 | batch_stats | off | 1 | false | 8 | 1 | float32 | 22.8 | 351 | \
3.47 | 1.10 | 788 | 156 | - | - |
| act,jac,ce | label | backprop | batch_stats | off | 1 | false | 8 | 1 | float32 | 20.7 | \
386 | 3.15 | 1.00 | 756 | 91 | 21 | 24% |

Matmul peak (256 x 256, tf.matmul): bfloat16 111 GFLOP/s, float32 86 GFLOP/s. 'GFLOP/s ...
"""


def test_parsers_read_the_sections_outputs():
  rows = gpu_check.parse_benchmark(BENCHMARK_OUTPUT, 0)
  assert rows[0][:3] == ["benchmark", "act,jac,ce all jvp x1 float32 jit=false batch=8",
                         "351 img/s"]
  assert "to label backprop 1.10" in rows[0][3] and "memory 156 MiB" in rows[0][3]
  assert "24% of the matmul peak" in rows[1][3]
  assert rows[2] == ["benchmark", "matmul peak", "bfloat16 111 GFLOP/s, float32 86 GFLOP/s", ""]
  assert gpu_check.parse_benchmark("boom", 2)[0][2] == "FAILED (exit 2)"
  ok = gpu_check.parse_pytest("....\nFAILED tests/x.py::t - boom\n3 passed, 1 failed in 2s", 1)
  assert ok[0][2] == "FAILED (exit 1)" and "3 passed, 1 failed" in ok[0][3]
  assert "tests/x.py::t" in ok[0][3]
  marker = gpu_check.MARKER + json.dumps([["exactness", "a", "exact", "n"]])
  assert gpu_check.parse_marker("log\n" + marker, 0) == [["exactness", "a", "exact", "n"]]
  assert gpu_check.parse_marker("Traceback\nValueError: x", 1)[0][2] == "FAILED (exit 1)"


def test_run_plan_writes_one_table_and_reports_budget_and_timeouts(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_check, "FASHION_DIRS", ())  # this machine may have the data
  sections = _plan(tmp_path, "--data_dir=/nowhere")
  calls = []

  def runner(command, timeout_s):
    calls.append((command, timeout_s))
    if "pytest" in command:
      return "...\n5 passed in 3s", 0
    if "--section=exactness" in command:
      return gpu_check.MARKER + json.dumps([["exactness", "XLA", "exact", ""]]), 0
    if any("benchmark.py" in a for a in command):
      return "slow\ntimed out", 124
    return "", 0

  rows = gpu_check.run_plan(sections, str(tmp_path), budget_s=1000, runner=runner)
  assert ["tests", "pytest test_estimators.py test_jacobians.py test_precision.py", "ok",
          "5 passed"] in rows
  assert ["exactness", "XLA", "exact", ""] in rows
  assert any(r[0] == "benchmark" and r[2] == "TIMED OUT" for r in rows)
  assert any(r[0] == "fashion_mnist" and r[2] == "skipped" for r in rows)  # no data there
  assert os.path.isfile(tmp_path / "tests.log")
  text = gpu_check.render(rows, "# head")
  assert text.count("| section | check | result | note |") == 1
  # A budget too small for any section: each is reported as skipped, none is run.
  calls.clear()
  rows = gpu_check.run_plan(sections, str(tmp_path), budget_s=10, runner=runner)
  assert not calls and all(r[2] == "skipped" for r in rows)


def test_the_smoke_check_has_a_cpus_budget():
  assert gpu_check.parse_args(["--out_dir=x"]).budget_s == gpu_check.BUDGET_S
  assert gpu_check.parse_args(["--out_dir=x", "--smoke"]).budget_s == gpu_check.SMOKE_BUDGET_S
  assert gpu_check.parse_args(["--out_dir=x", "--smoke", "--budget_s=60"]).budget_s == 60


@pytest.mark.slow
def test_smoke_check_runs_on_cpu(tmp_path):
  """The whole --smoke check in a child process (a few minutes on 2 CPU cores)."""
  result = helpers.run_cli("--smoke", f"--out_dir={tmp_path}", tool="gpu_check", timeout=1800)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  table = (tmp_path / "gpu_check.md").read_text()
  for needed in ("| tests |", "XLA vs graph, fd", "mixed_bfloat16 vs float32",
                 "act,jac,ce all jvp", "benchmark (XLA)", "fashion_mnist"):
    assert needed in table, needed
  assert "FAILED" not in table and "TIMED OUT" not in table


def test_the_fashion_mnist_row_reads_the_cell_through_reproduce(tmp_path):
  cell = tmp_path / "cells" / "act_jac_ce" / "n10" / "seed0"
  cell.mkdir(parents=True)
  (cell / "results.json").write_text(json.dumps({"student": {"test": {"accuracy": 0.875}}}))
  rows = gpu_check.parse_reproduce("done", 0, out=str(tmp_path))
  assert rows[0][:3] == ["fashion_mnist", "act + jac + CE, 10/class, seed 0", "87.50% test"]
