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
# act_weight=1 and learning_rate=0.003 and whose test accuracy prefers act_weight=0.1 and any
# other learning rate, and logs every call. Its optimizer steps: --train_steps, else 60 epochs
# of ceil(images / 32) steps (10 classes; 'full': 1132 images).
FAKE_RUN = textwrap.dedent("""
    import json, math, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[3:] if "=" in a)
    with open(os.environ["CALLS"], "a") as f:
      f.write(json.dumps(args) + "\\n")
    if args.get("hints") == "act,jac" and args.get("jac_weight") == "10":
      sys.exit(3)  # a failed trial
    w = float(args.get("act_weight", 1))
    lr = 0.05 if args.get("learning_rate") == "0.003" else 0.0
    seed = int(args["seed"])
    n = 10 * int(args.get("samples_per_class", 0)) or 1132
    steps = int(args.get("train_steps", 0)) or 60 * math.ceil(n / 32)
    results = {"total_seconds": 1.0,
               "teacher": {"test_accuracy": 0.9, "model": "vgg9"},
               "student": {"best_val_accuracy": 0.5 + 0.1 * w + lr, "train_steps": steps,
                           "fit_phases_seconds": {"training": 2.0 + seed},
                           "test_accuracy": 0.5 - 0.1 * w - lr + 0.01 * seed
                                            + (0.05 if args.get("hints") == "ce" else 0)}}
    if "robustness_sigmas" in args:  # --table=robustness: accuracy 1 - sigma + seed / 100
      results["student"]["test"] = {"accuracy_under_noise": {
          f"{float(s):g}": 1 - float(s) + 0.01 * seed
          for s in args["robustness_sigmas"].split(",")}}
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


def _weights(row, setting):
  """Every hint weight of `row` under `setting` (tfjac.run's default 1 where not set) and the
  learning rate."""
  hints = reproduce.row_hints(row)
  return float(setting["learning_rate"]), [float(setting.get(f"{h}_weight", 1)) for h in hints]


@pytest.mark.parametrize("table", list(reproduce.TABLES))
def test_every_row_gets_the_same_trials_and_none_is_a_reroll(table):
  trials = reproduce.trials_per_row(table)
  assert trials == {"distill": 4, "lazy": 4, "variants": 4, "transfer": 8}[table]
  shared = {"0.001", "0.003"}
  for row in reproduce.TABLES[table]:
    got = reproduce.candidates(row, trials=trials)
    assert len(got) == trials, row.key
    assert shared <= {g["learning_rate"] for g in got}, row.key  # the same grid in every row
    # Under Adam (and SGD) multiplying every weight of the loss by c is a reroll of the same
    # setting (SGD: with the learning rate divided by c). With the anchor at 1, two settings
    # are equivalent only if equal: no pair of trials may have proportional weight vectors
    # at the same learning rate, or weights c times at learning rate 1/c.
    for i, a in enumerate(got):
      for b in got[i + 1:]:
        (lr_a, wa), (lr_b, wb) = _weights(row, a), _weights(row, b)
        ratios = {round(y / x, 9) for x, y in zip(wa, wb)}
        assert not (len(ratios) == 1 and (lr_a == lr_b or
                                          round(lr_a / lr_b, 9) == ratios.pop())), (row.key,
                                                                                   a, b)
    # Balanced: every level of every tuned flag appears equally often.
    for flag in got[0]:
      counts = {}
      for g in got:
        counts[g[flag]] = counts.get(g[flag], 0) + 1
      assert len(set(counts.values())) == 1, (row.key, flag, counts)


def test_the_learning_rate_grid_follows_the_preset_and_an_override_replaces_the_design():
  row = _rows("act_jac_ce")[0]
  assert reproduce.candidates(row, trials=4) == [
      {"learning_rate": "0.001", "act_weight": "0.1", "jac_weight": "10"},
      {"learning_rate": "0.001", "act_weight": "1", "jac_weight": "100"},
      {"learning_rate": "0.003", "act_weight": "0.1", "jac_weight": "100"},
      {"learning_rate": "0.003", "act_weight": "1", "jac_weight": "10"}]
  assert [c["learning_rate"] for c in reproduce.candidates(_rows("ce")[0], trials=4,
                                                           learning_rate=0.1)] == [
      "0.03", "0.1", "0.3", "1"]
  override = {"learning_rate": ("0.001", "0.003"), "jac_weight": ("1", "10")}
  assert reproduce.candidates(_rows("ce")[0], override) == [
      {"learning_rate": "0.001"}, {"learning_rate": "0.003"}]  # ce has no jac weight
  assert len(reproduce.candidates(row, override)) == 4


def test_tuning_searches_relative_weights_unless_the_runs_are_raw():
  row = _rows("act_jac_ce")[0]
  assert reproduce.weight_levels(()) is reproduce.SCALED_WEIGHT_LEVELS
  assert reproduce.weight_levels(("--loss_scaling=initial",)) is reproduce.SCALED_WEIGHT_LEVELS
  assert reproduce.weight_levels(("--loss_scaling=none",)) is reproduce.WEIGHT_LEVELS
  scaled = reproduce.candidates(row, trials=4,
                                level_table=reproduce.weight_levels(("--seeds=1",)))
  assert [(c["act_weight"], c["jac_weight"]) for c in scaled] == [
      ("0.3", "1"), ("1", "3"), ("0.3", "3"), ("1", "1")]


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
  # Raw runs: the raw weight levels (WEIGHT_LEVELS), which the fake run's choices below follow.
  h = reproduce.Harness("distill", "digits", ("10", "full"), 2, _rows("ce", "act_ce", "act_jac"),
                        str(out), tune=True, python=python, extra_args=("--loss_scaling=none",))
  h.run()
  runs = calls()
  teacher = [c for c in runs if c.get("mode") == "teacher"]
  assert len(teacher) == 1
  cells = [c for c in runs if c.get("mode") == "distill"]
  # Every cell uses the table's teacher; seeds and sizes as asked; only seed 0 is tuned.
  assert {c["teacher"] for c in cells} == {str(out / "teacher" / "teacher")}
  assert {c["samples_per_class"] for c in cells} == {"10", "0"}
  assert all(c["seed"] == "0" for c in cells if "act_weight" in c and "cells" not in c["workdir"])
  # Every row: 4 trials (act,jac: two of them fail) + 1 more seed, per size.
  per_row = lambda hints: [c for c in cells if c["hints"] == hints]  # noqa: E731
  assert len(per_row("ce")) == len(per_row("act,ce")) == len(per_row("act,jac")) == 10
  tuning = json.loads((out / "tuning.json").read_text())
  assert {k: len(t["trials"]) for k, t in tuning.items()} == {
      f"{r}/n{n}": 4 for r in ("ce", "act_ce", "act_jac") for n in ("10", "full")}
  # Chosen on validation (act_weight=1, learning_rate=0.003), although test would prefer
  # act_weight=0.1 and another learning rate.
  assert tuning["act_ce/n10"]["chosen"] == {"act_weight": "1", "learning_rate": "0.003"}
  assert tuning["act_jac/n10"]["chosen"] == {"jac_weight": "100", "learning_rate": "0.003"}
  assert tuning["ce/nfull"]["chosen"] == {"learning_rate": "0.003"}
  assert [(c["act_weight"], c["learning_rate"]) for c in per_row("act,ce")
          if c["seed"] == "1"] == [("1", "0.003")] * 2
  failed = [t for t in tuning["act_jac/nfull"]["trials"] if t["best_val_accuracy"] is None]
  assert len(failed) == 2 and h.failures  # the failing trials are reported, not chosen
  # The same optimizer steps for every size: the digits preset's budget.
  assert {c["train_steps"] for c in cells} == {"2160"}
  md = (out / "results.md").read_text()
  # act,ce at act_weight=1, lr 0.003: test 0.35 (seed 0) and 0.36 (seed 1): 35.50 +- 0.71
  assert "| act + CE | 35.50 +- 0.71 | 35.50 +- 0.71 |" in md
  assert "| CE | **40.50 +- 0.71** | **40.50 +- 0.71** |" in md
  # Cost per run: training steps (2 s at seed 0, 3 s at seed 1) / the whole run (1 s).
  assert "| act + CE | 2.5 / 1.0 | 2.5 / 1.0 |" in md
  assert ("Budget: optimizer steps per student run (--train_steps=2160 for every cell): "
          "10/class: 2160; full: 2160. Tuning: 4 trial(s) per row and column on seed 0") in md
  with open(out / "results.csv") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 6 and {r["seeds"] for r in rows} == {"2"}
  assert (out / "results.png").stat().st_size > 1000
  # Rerun: everything is finished, nothing runs again.
  before = len(calls())
  reproduce.Harness("distill", "digits", ("10", "full"), 2, _rows("ce", "act_ce", "act_jac"),
                    str(out), tune=True, python=python,
                    extra_args=("--loss_scaling=none",)).run()
  assert len(calls()) == before + 4  # only the failed act,jac trials (2 per column) run again


def test_a_finished_cell_of_other_settings_is_refused_not_reused(tmp_path, fake_python):
  """A rerun whose tuning chooses differently (a trial that failed before now finishes) must
  not take a seed's results made with the old choice."""
  python, calls = fake_python
  out = tmp_path / "out"
  harness = lambda: reproduce.Harness("distill", "digits", ("10",), 2, _rows("act_ce"),  # noqa: E731
                                      str(out), tune=True, python=python)
  harness().run()
  log = out / "cells" / "act_ce" / "n10" / "seed1" / "log.txt"
  text = log.read_text()
  assert "--act_weight=1 " in text
  log.write_text(text.replace("--act_weight=1 ", "--act_weight=0.1 "))
  before = len(calls())
  with pytest.raises(reproduce.ReproduceError, match="seed1 holds the results of another"):
    harness().run()
  assert len(calls()) == before
  log.write_text(text)
  harness().run()  # the same command: reused
  assert len(calls()) == before


def test_without_a_step_budget_results_md_shows_the_unequal_steps(tmp_path, fake_python):
  python, calls = fake_python
  out = tmp_path / "out"
  reproduce.Harness("distill", "digits", ("10", "full"), 1, _rows("ce"), str(out),
                    python=python, train_steps=0).run()
  assert not any("train_steps" in c for c in calls())
  md = (out / "results.md").read_text()
  assert ("Budget: optimizer steps per student run (each run's --epochs and --steps_per_epoch "
          "(the preset's flags)): 10/class: 240; full: 2160. No tuning") in md
  with pytest.raises(reproduce.ReproduceError, match="--train_steps: no preset"):
    reproduce.Harness("distill", "kmnist", ("10",), 1, _rows("ce"), str(out))


def test_the_paper_presets_give_every_column_one_full_pass_per_epoch():
  """CIFAR-100 (45,000 training images at batch 128) and MIT Indoor 67 (4,824 at batch 64):
  the small columns' --steps_per_epoch is the full column's one pass."""
  for (table, dataset), full in ((("distill", "cifar100"), 45000),
                                 (("transfer", "mit_indoor67"), 4824)):
    preset = reproduce.PRESETS[(table, dataset)]
    batch = 128 if dataset == "cifar100" else 64
    for size in preset.sizes[:-1]:
      assert preset.size_args[size] == (f"--steps_per_epoch={-(-full // batch)}",)
    assert preset.sizes[-1] == "full" and "full" not in preset.size_args


def test_robustness_table_runs_every_row_and_seed_and_reports_the_spread(tmp_path,
                                                                         fake_python):
  python, calls = fake_python
  docs = tmp_path / "docs" / "robustness.md"
  table = reproduce.RobustnessTable(str(tmp_path / "out"), seeds=3, sigmas=("0.1", "0.5"),
                           python=python, docs=str(docs))
  md = table.run("python tools/reproduce.py --table=robustness --seeds=3")
  runs = calls()
  assert sorted((c["hints"], c["seed"]) for c in runs) == sorted(
      (h, str(k)) for h in ("ce", "ce,jacnorm", "noisy_ce") for k in range(3))
  assert all(c["mode"] == "regularize" and c["robustness_sigmas"] == "0.1,0.5"
             and c["noise_sigma"] == "0.3" and c["samples_per_class"] == "50" for c in runs)
  # ce: clean 0.45 + seed/100, sigma 0.5: 0.5 + seed/100 -> 46.00 +- 1.00 and 51.00 +- 1.00
  assert "| CE | 46.00 +- 1.00 | 91.00 +- 1.00 | 51.00 +- 1.00 |" in md
  assert "`python tools/reproduce.py --table=robustness --seeds=3`" in md
  assert docs.read_text() == md and (tmp_path / "docs" / "robustness.csv").exists()
  before = len(calls())
  table.run()  # finished runs are not run again
  assert len(calls()) == before


def test_the_robustness_table_is_a_table_of_the_one_scheduler():
  """`reproduce.py --table=robustness` reaches RobustnessTable and names its bad arguments."""
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", "reproduce.py"),
                         "--table=robustness", "--samples_per_class=10,50"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "the robustness table takes one positive integer, got 10,50" in proc.stderr


def test_generated_tables_word_every_comparison_by_the_one_rule(tmp_path, fake_python):
  """results.md (reproduce) and the robustness table compare each row with the first by
  results_tables.verdict: a gap beyond the larger std is ahead/behind, else within noise."""
  python, _ = fake_python
  out = tmp_path / "out"
  # ce: 46 +- 1 (the fake's +0.05 for ce), act + CE: 41 +- 1 at every seed count of 3.
  reproduce.Harness("distill", "digits", ("10",), 3, _rows("ce", "act_ce"), str(out),
                    python=python).run()
  md = (out / "results.md").read_text()
  assert "- 10/class: act + CE vs CE: -5.00 (stds 1.00, 1.00): **behind**" in md
  table = reproduce.RobustnessTable(str(tmp_path / "rob"), seeds=3, sigmas=("0.1",), python=python)
  md = table.run()
  assert "- clean: CE on noisy inputs (`noisy_ce`) vs CE: -5.00 (stds 1.00, 1.00): **behind**" in md
  assert "- sigma 0.1: CE on noisy inputs (`noisy_ce`) vs CE: +0.00 (stds 1.00, 1.00): " \
         "**within noise**" in md
  # One seed: no spread, so no verdicts.
  one = reproduce.RobustnessTable(str(tmp_path / "rob1"), seeds=1, sigmas=("0.1",), python=python)
  assert "**within noise**" not in one.run() and "vs CE" not in one.run()


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
       "--rows=ce,act_jac", "--samples_per_class=5", "--seeds=1", f"--out={out}",
       "--train_steps=3", "--",
       "--teacher_epochs=1", "--model=vgg4", "--width=0.25",
       "--teacher_model=vgg4", "--teacher_width=0.25"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for row in ("ce", "act_jac"):
    res = json.loads((out / "cells" / row / "n5" / "seed0" / "results.json").read_text())
    assert res["student"]["train_examples"] == 50
    # 3 steps of 32 over 50 images (2 per epoch): 2 epochs, the second cut after one step.
    assert (res["student"]["train_steps"], res["student"]["epochs_run"]) == (3, 2)
    assert res["config"]["hints"]["hints"] == (["ce"] if row == "ce" else ["act", "jac"])
  assert "| act + jac |" in proc.stdout and "[1/3] teacher" in proc.stderr
  assert "(--train_steps=3 for every cell): 5/class: 3." in proc.stdout
  # The cells chose on validation (tfjac.run's default): the table says how often each kept
  # the alternative, and its cost column counts both fits.
  kept = {row: json.loads((out / "cells" / row / "n5" / "seed0" / "results.json").read_text())[
      "student"]["choice"]["kept"] for row in ("ce", "act_jac")}
  for row, label in (("ce", "CE"), ("act_jac", "act + jac")):
    assert f"| {label} | {int(kept[row] == 'alternative')} of 1 |" in proc.stdout
  assert "the student's two fits" in proc.stdout
  assert "Each fit alone, for the record" in proc.stdout


def test_tuning_trials_and_fixed_setting_tables_fit_once(tmp_path, fake_python):
  """--tune's trials (and the seeds of the chosen setting) and the lazy/variants tables are
  one fit each (--choose_on_validation=off); the untuned distill table runs the default."""
  python, calls = fake_python
  row = [r for r in reproduce.TABLES["distill"] if r.key == "act_ce"]
  reproduce.Harness("distill", "digits", ("3",), 2, row, str(tmp_path / "tuned"),
                    python=python, tune=True).run()
  tuned = [c for c in calls() if c.get("mode") == "distill"]
  assert len(tuned) == 5 and {c.get("choose_on_validation") for c in tuned} == {"off"}
  reproduce.Harness("variants", "digits", ("10",), 1, list(reproduce.TABLES["variants"]),
                    str(tmp_path / "variants"), python=python).run()
  variants = [c for c in calls() if "/variants/cells/" in c["workdir"]]
  assert len(variants) == 5 and {c.get("choose_on_validation") for c in variants} == {"off"}
  reproduce.Harness("distill", "digits", ("3",), 1, row, str(tmp_path / "plain"),
                    python=python).run()
  plain = [c for c in calls() if "/plain/cells/" in c["workdir"]]
  assert plain and {c.get("choose_on_validation") for c in plain} == {None}


def test_the_tables_render_without_the_scheduler():
  """tools/results_tables.py (results.md, .csv, .png) imports neither reproduce.py nor absl."""
  code = ("import sys; sys.path.insert(0, 'tools'); import results_tables; "
          "assert 'reproduce' not in sys.modules and 'absl.flags' not in sys.modules, "
          "sorted(sys.modules)")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                        timeout=60)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_lazy_table_gives_each_period_its_flag_and_the_same_budget(tmp_path, fake_python):
  python, calls = fake_python
  reproduce.Harness("lazy", "digits", ("3",), 1, list(reproduce.TABLES["lazy"]),
                    str(tmp_path / "out"), python=python).run()
  cells = [c for c in calls() if c.get("mode") == "distill"]
  assert sorted((c["hints"], c.get("jac_every", "1")) for c in cells) == [
      ("act,ce", "1"), ("act,jac,ce", "1"), ("act,jac,ce", "16"), ("act,jac,ce", "4"),
      ("ce", "1")]
  assert {c["train_steps"] for c in cells} == {"2160"}
  assert {c["samples_per_class"] for c in cells} == {"3"}


def test_the_tables_run_here_pin_float32():
  """--mixed_precision's default (auto) changes with the CPU: the presets of the datasets run
  here pin float32, teacher and students, so a rerun gives the published tables anywhere."""
  for (table, dataset), preset in reproduce.PRESETS.items():
    if dataset in ("digits", "fashion_mnist") and table != "transfer" or (
        (table, dataset) == ("transfer", "fashion_mnist")):
      assert "--mixed_precision=float32" in preset.run_args, (table, dataset)
      assert "--mixed_precision=float32" in preset.teacher_args, (table, dataset)


def test_fashion_mnist_transfer_keeps_source_and_target_classes_apart():
  preset = reproduce.PRESETS[("transfer", "fashion_mnist")]

  def classes(args):
    return [a.split("=", 1)[1] for a in args if a.startswith("--classes=")]
  assert classes(preset.teacher_args) == ["5,6,7,8,9"]
  assert classes(preset.run_args) == ["0,1,2,3,4"]
  assert "--teacher_model=vgg9" in preset.teacher_args and "--model=vgg4" in preset.run_args
  assert preset.train_steps == 500 and preset.sizes == ("10", "50")
