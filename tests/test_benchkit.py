"""tools/benchkit.py: the timing tools build their synthetic step and its strategy in one
place, the strategy through tfjac.runtime.make_strategy; benchmark.py times one tiny
configuration through it, replicated as well."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "tools"))
import benchkit  # noqa: E402  pylint: disable=g-import-not-at-top

TINY = dict(teacher_model="vgg9", model="vgg4", image_size=8, channels=3, num_classes=10)


def test_the_strategy_comes_from_tfjac_runtime():
  assert benchkit.strategy(1) is tf.distribute.get_strategy()
  two = benchkit.strategy(2)  # two logical CPU devices (tests/conftest.py)
  assert isinstance(two, tf.distribute.MirroredStrategy)
  assert two.num_replicas_in_sync == 2
  assert sorted(two.extended.worker_devices) == ["/job:localhost/replica:0/task:0/device:CPU:0",
                                                 "/job:localhost/replica:0/task:0/device:CPU:1"]


def test_the_synthetic_step_trains_with_and_without_cached_teacher_outputs():
  teacher, student = benchkit.networks(width=0.25, teacher_width=0.25, **TINY)
  assert (teacher.name, student.name) == ("teacher", "student")
  d = benchkit.distiller(student, teacher, "act,jac,ce", num_classes=10)
  x, y = benchkit.batch(4, 8, 3, 10)
  assert x.shape == (4, 8, 8, 3) and y.dtype == tf.int32
  assert len(benchkit.element(d, x, y)) == 2
  cached = benchkit.element(d, x, y, teacher_cache=True)
  assert len(cached) == 3 and cached[2]
  for elem in ((x, y), cached):
    history = d.fit(benchkit.repeated(elem), epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_the_timing_tools_build_no_distiller_or_strategy_of_their_own():
  for tool in ("benchmark", "profile_step", "step_variants", "epoch_overhead", "gpu_check"):
    with open(os.path.join(helpers.REPO, "tools", f"{tool}.py")) as f:
      source = f.read()
    for own in ("Distiller(", "MirroredStrategy(", "set_logical_device_configuration"):
      assert own not in source, (tool, own)
    assert "benchkit." in source, tool


def test_benchmark_times_one_configuration_replicated_through_the_kit():
  cfg = dict(TINY, width=0.25, hints="act,jac,ce", jac_target="label", bn_policy="batch_stats",
             teacher_cache=False, jit_compile=False, batch_size=8, replicas=2,
             mixed_precision="float32", jac_every=1, jac_estimator="backprop", jac_top_k=5,
             jac_projections=1, jac_probes=1, jac_fd_eps=1e-3, steps=1, warmup=1)
  proc = subprocess.run([sys.executable, os.path.join(helpers.REPO, "tools", "benchmark.py"),
                         "--single=" + json.dumps(cfg)], capture_output=True, text=True,
                        timeout=300, cwd=helpers.REPO)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("BENCHMARK_RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-3000:]
  result = json.loads(lines[-1][len("BENCHMARK_RESULT "):])
  assert result["replicas"] == 2 and result["ms_per_step"] > 0
  assert result["student_macs"] > 0 and "skipped" not in result


def test_a_row_of_several_rounds_is_the_round_of_median_time():
  rounds = [{"ms_per_step": 3.0, "k": "a"}, {"ms_per_step": 1.0, "k": "b"},
            {"ms_per_step": 2.0, "k": "c"}]
  assert benchkit.median_round(rounds)["k"] == "c"
  assert benchkit.median_round(rounds)["ms_per_step_rounds"] == [3.0, 1.0, 2.0]
  assert benchkit.median_round(rounds[:2])["k"] == "b"  # even count: the lower middle


@pytest.mark.slow
def test_benchmark_rounds_alternate_with_the_peer_and_report_the_range(tmp_path):
  """--rounds=2 --peer=torch: two tfjac runs and two torch runs of the one configuration; the
  row's ratio is the medians' with the rounds' range beside it."""
  out = tmp_path / "b.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(helpers.REPO, "tools", "benchmark.py"), "--grid=product",
       "--hints_sets=ce", "--batch_sizes=8", "--image_size=8", "--num_classes=10",
       "--width=0.25", "--steps=1", "--warmup=1", "--rounds=2", "--peer=torch",
       "--jit_compile=false", "--replicas=1", "--mixed_precision=float32",
       "--teacher_cache=off",
       "--nomatmul_peak", f"--json={out}"],
      capture_output=True, text=True, timeout=600, cwd=helpers.REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  row = json.loads(out.read_text())["results"][0]
  assert len(row["ms_per_step_rounds"]) == 2 and len(row["peer"]["ms_per_step_rounds"]) == 2
  low, high = row["peer_ratio_range"]
  assert low <= high and re.search(r"\| [0-9.]+ \([0-9.]+-[0-9.]+\) \|", proc.stdout)
