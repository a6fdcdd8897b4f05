"""tools/reproduce.py: the cells it schedules, selection on validation only, skipping finished
cells, the outputs; then one real (tiny) table through tfjac.run."""
import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))

import reproduce  # noqa: E402  pylint: disable=wrong-import-position

# A stand-in for `python -m tfjac.run`: writes a results.json whose validation accuracy prefers
# act_weight=1 and whose test accuracy prefers act_weight=0.1, and logs every call.
FAKE_RUN = textwrap.dedent("""
    import json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[3:] if "=" in a)
    with open(os.environ["CALLS"], "a") as f:
      f.write(json.dumps(args) + "\\n")
    if args.get("hints") == "act,jac" and args.get("jac_weight") == "10":
      sys.exit(3)  # a failed trial
    w = float(args.get("act_weight", 1))
    seed = int(args["seed"])
    results = {"total_seconds": 1.0,
               "teacher": {"test_accuracy": 0.9, "model": "vgg9"},
               "student": {"best_val_accuracy": 0.5 + 0.1 * w,
                           "test_accuracy": 0.5 - 0.1 * w + 0.01 * seed
                                            + (0.05 if args.get("hints") == "ce" else 0)}}
    os.makedirs(args["workdir"], exist_ok=True)
    with open(os.path.join(args["workdir"], "results.json"), "w") as f:
      json.dump(results, f)
""")


@pytest.fixture
def fake_python(tmp_path, monkeypatch):
  script = tmp_path / "fake.py"
  script.write_text(FAKE_RUN)
  wrapper = tmp_path / "python"
  wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {script} \"$@\"\n")
  wrapper.chmod(0o755)
  calls = tmp_path / "calls.jsonl"
  monkeypatch.setenv("CALLS", str(calls))

  def read():
    return [json.loads(line) for line in calls.read_text().splitlines()] if calls.exists() else []
  return str(wrapper), read


def _rows(*keys):
  return [r for r in reproduce.TABLES["distill"] if r.key in keys]


def test_candidates_are_the_product_over_the_rows_hints():
  row = _rows("act_jac_ce")[0]
  got = reproduce.candidates(row)
  assert got == [{"act_weight": a, "jac_weight": j} for a in ("0.1", "1") for j in ("1", "10")]
  assert reproduce.candidates(_rows("ce")[0]) == [{}]
  assert reproduce.candidates(_rows("ce")[0], {"learning_rate": ("0.001", "0.003")}) == [
      {"learning_rate": "0.001"}, {"learning_rate": "0.003"}]


def test_bad_arguments_are_named():
  with pytest.raises(reproduce.ReproduceError, match="--samples_per_class"):
    reproduce.parse_sizes(["10", "ten"])
  with pytest.raises(reproduce.ReproduceError, match="--samples_per_class"):
    reproduce.parse_sizes(["0"])
  assert reproduce.parse_sizes(["10", "FULL"]) == ("10", "full")
  with pytest.raises(reproduce.ReproduceError, match="--tune_space"):
    reproduce.parse_tune_space("jac_weight")
  assert reproduce.parse_tune_space("jac_weight=1,10; learning_rate=0.1") == {
      "jac_weight": ("1", "10"), "learning_rate": ("0.1",)}
  with pytest.raises(reproduce.ReproduceError, match="--teacher"):
    reproduce.Harness("transfer", "mit_indoor67", ("25",), 1, [], "/tmp/x")


def test_table_schedules_tunes_on_validation_and_skips_finished_cells(tmp_path, fake_python):
  python, calls = fake_python
  out = tmp_path / "out"
  h = reproduce.Harness("distill", "digits", ("10", "full"), 2, _rows("ce", "act_ce", "act_jac"),
                        str(out), tune=True, python=python)
  h.run()
  runs = calls()
  teacher = [c for c in runs if c.get("mode") == "teacher"]
  assert len(teacher) == 1
  cells = [c for c in runs if c.get("mode") == "distill"]
  # Every cell uses the table's teacher; seeds and sizes as asked; only seed 0 is tuned.
  assert {c["teacher"] for c in cells} == {str(out / "teacher" / "teacher")}
  assert {c["samples_per_class"] for c in cells} == {"10", "0"}
  assert all(c["seed"] == "0" for c in cells if "act_weight" in c and "cells" not in c["workdir"])
  # ce: nothing to tune, 2 seeds x 2 sizes; act,ce: 2 trials + 1 more seed per size;
  # act,jac: 4 trials (one fails) + 1 more seed per size.
  per_row = lambda hints: [c for c in cells if c["hints"] == hints]  # noqa: E731
  assert len(per_row("ce")) == 4 and len(per_row("act,ce")) == 6 and len(per_row("act,jac")) == 10
  # Chosen on validation (act_weight=1), although test would prefer 0.1.
  tuning = json.loads((out / "tuning.json").read_text())
  assert tuning["act_ce/n10"]["chosen"] == {"act_weight": "1"}
  assert tuning["act_jac/n10"]["chosen"] == {"act_weight": "1", "jac_weight": "1"}
  assert [c["act_weight"] for c in per_row("act,ce") if c["seed"] == "1"] == ["1", "1"]
  failed = [t for t in tuning["act_jac/nfull"]["trials"] if t["best_val_accuracy"] is None]
  assert len(failed) == 2 and h.failures  # the failing trials are reported, not chosen
  md = (out / "results.md").read_text()
  # act,ce at act_weight=1: test 0.4 (seed 0) and 0.41 (seed 1): 40.50 +- 0.71
  assert "| act + CE | 40.50 +- 0.71 | 40.50 +- 0.71 |" in md
  assert "| CE | **45.50 +- 0.71** | **45.50 +- 0.71** |" in md
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and {r["seeds"] for r in rows} == {"2"}
  assert (out / "results.png").stat().st_size > 1000
  # Rerun: everything is finished, nothing runs again.
  before = len(calls())
  reproduce.Harness("distill", "digits", ("10", "full"), 2, _rows("ce", "act_ce", "act_jac"),
                    str(out), tune=True, python=python).run()
  assert len(calls()) == before + 4  # only the failed act,jac trials (2 per column) run again


def test_poster_numbers_beside_ours(tmp_path, fake_python):
  python, _ = fake_python
  out = tmp_path / "out"
  reproduce.Harness("distill", "cifar100", ("10", "full"), 1, _rows("ce"), str(out),
                    python=python).run()
  md = (out / "results.md").read_text()
  assert "[20.03]" in md and "[54.28]" in md  # 10/class and full = the poster's 500


def test_real_table_through_tfjac_run(tmp_path):
  """Two rows, one column, one seed, tiny epochs: the cells are real tfjac runs."""
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "reproduce.py"), "--table=distill",
       "--rows=ce,act_jac", "--samples_per_class=5", "--seeds=1", f"--out={out}", "--",
       "--epochs=2", "--teacher_epochs=1", "--model=vgg4", "--width=0.25",
       "--teacher_model=vgg4", "--teacher_width=0.25"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for row in ("ce", "act_jac"):
    res = json.loads((out / "cells" / row / "n5" / "seed0" / "results.json").read_text())
    assert res["student"]["train_examples"] == 50
    assert res["config"]["hints"]["hints"] == (["ce"] if row == "ce" else ["act", "jac"])
  assert "| act + jac |" in proc.stdout and "[1/3] teacher" in proc.stderr
