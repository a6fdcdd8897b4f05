"""The robustness table of docs/results-noise.md: test accuracy under Gaussian input noise of
students trained without a teacher (--mode=regularize) with CE, CE + Jacobian-norm penalty and
CE on noisy inputs, over several seeds, as mean +- std. Every cell is an ordinary
`python -m tfjac.run`.

  python tools/robustness.py --seeds=3 --docs=docs/results/robustness_digits.md

writes <out>/results.md (the table and the command), results.csv (every seed's value), the
same two files as --docs (.md and .csv), and keeps each run in <out>/runs/<row>/seed<k> (rerun:
finished runs are skipped). Arguments after `--` go to every run.
"""
import collections
import csv
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "tools"))

from absl import app, flags  # noqa: E402

import reproduce  # noqa: E402  (read_results)
import results_tables  # noqa: E402  (mean_std, verdict_lines)
from tfjac import atomic  # noqa: E402

Row = collections.namedtuple("Row", "key label hints")
ROWS = (
    Row("ce", "CE", "ce"),
    Row("ce_jacnorm", "CE + sigma^2 ‖dS/dx‖^2 (`ce,jacnorm`)", "ce,jacnorm"),
    Row("noisy_ce", "CE on noisy inputs (`noisy_ce`)", "noisy_ce"),
)


def define_flags():
  flags.DEFINE_integer("seeds", 3, "Seeds 0..seeds-1 of every row.")
  flags.DEFINE_integer("samples_per_class", 50, "--samples_per_class of every run.")
  flags.DEFINE_string("dataset", "digits", "--dataset of every run.")
  flags.DEFINE_float("noise_sigma", 0.3, "--noise_sigma of the training (jacnorm, noisy_ce).")
  flags.DEFINE_list("sigmas", ["0.05", "0.1", "0.2", "0.3", "0.5"],
                    "--robustness_sigmas: the test noise levels (columns).")
  flags.DEFINE_string("out", "runs/robustness_digits", "Output directory (the runs).")
  flags.DEFINE_string("docs", None, "Also write the table to this .md file and the CSV beside "
                      "it (.csv), e.g. docs/results/robustness_digits.md.")


class Table:
  """Runs every (row, seed) into `out` and writes the table."""

  def __init__(self, out, *, seeds=3, samples_per_class=50, dataset="digits", noise_sigma=0.3,
               sigmas=("0.05", "0.1", "0.2", "0.3", "0.5"), extra_args=(),
               python=sys.executable, docs=None):
    self.out, self.seeds, self.samples_per_class = os.path.abspath(out), seeds, samples_per_class
    self.dataset, self.noise_sigma, self.sigmas = dataset, noise_sigma, tuple(sigmas)
    self.extra_args, self.python = tuple(extra_args), python
    self.docs = docs
    self.failures = []

  def command(self, row, seed):
    # Raw terms: scaled, ce,jacnorm's sigma^2 would cancel against jacnorm's own scale.
    return ["--mode=regularize", "--loss_scaling=none", f"--dataset={self.dataset}",
            f"--hints={row.hints}",
            f"--samples_per_class={self.samples_per_class}", f"--noise_sigma={self.noise_sigma}",
            f"--robustness_sigmas={','.join(self.sigmas)}", f"--seed={seed}",
            f"--workdir={self.run_dir(row, seed)}", *self.extra_args]

  def run_dir(self, row, seed):
    return os.path.join(self.out, "runs", row.key, f"seed{seed}")

  def run(self, command_line=""):
    results = {}
    total, started = len(ROWS) * self.seeds, 0
    for row in ROWS:
      for seed in range(self.seeds):
        started += 1
        workdir = self.run_dir(row, seed)
        res = reproduce.read_results(workdir)
        print(f"[{started}/{total}] {row.key} seed={seed}" + (" (done)" if res else ""),
              file=sys.stderr, flush=True)
        if res is None:
          os.makedirs(workdir, exist_ok=True)
          args = self.command(row, seed)
          with open(os.path.join(workdir, "log.txt"), "a") as log:
            log.write("$ python -m tfjac.run " + " ".join(args) + "\n")
            log.flush()
            code = subprocess.call([self.python, "-m", "tfjac.run", *args], cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
          res = reproduce.read_results(workdir) if code == 0 else None
          if res is None:
            self.failures.append(f"{row.key} seed {seed} ({workdir}/log.txt)")
        results[(row.key, seed)] = res
    return self.write(results, command_line)

  def values(self, res):
    """[clean, sigma_1, ...] test accuracy (%) of one run."""
    student = res["student"]
    noisy = student["test"]["accuracy_under_noise"]
    return [100 * student["test_accuracy"]] + [100 * noisy[f"{float(s):g}"]
                                                for s in self.sigmas]

  def write(self, results, command_line):
    columns = ["clean"] + list(self.sigmas)
    lines = ["# Robustness to Gaussian input noise, students without a teacher", "",
             f"`{command_line}`" if command_line else "", "",
             f"--mode=regularize on {self.dataset}, {self.samples_per_class} images per class, "
             f"training noise --noise_sigma={self.noise_sigma} (jacnorm's sigma and noisy_ce's "
             "noise), tfjac.run's other defaults. Test accuracy (%) under Gaussian noise of "
             f"std sigma, mean +- std over {self.seeds} seed(s) (the same images and initial "
             "weights for every row at a seed).", "",
             "| student | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    rows_csv, spread = [], {}
    for row in ROWS:
      per_seed = [self.values(results[(row.key, s)]) for s in range(self.seeds)
                  if results[(row.key, s)] is not None]
      cells = []
      for j, column in enumerate(columns):
        m, sd = spread[(row.key, column)] = results_tables.mean_std([v[j] for v in per_seed])
        cells.append("failed" if m is None else f"{m:.2f} +- {sd:.2f}")
        rows_csv.append([row.key, column, len(per_seed), "" if m is None else f"{m:.4f}",
                         "" if sd is None else f"{sd:.4f}",
                         " ".join(f"{v[j]:.4f}" for v in per_seed)])
      if len(per_seed) < self.seeds:
        cells[0] += f" ({len(per_seed)} of {self.seeds} seeds)"
      lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines += results_tables.verdict_lines(
        ROWS, columns, lambda key, column: spread[(key, column)], self.seeds,
        label=lambda c: c if c == "clean" else f"sigma {c}")
    seconds = sum(r["total_seconds"] for r in results.values() if r)
    lines += ["", f"Runs' own time, summed: {seconds / 60:.1f} min."]
    if self.failures:
      lines += ["", "Failed runs: " + "; ".join(self.failures)]
    markdown = "\n".join(lines) + "\n"
    def write_csv(f):
      w = csv.writer(f)
      w.writerow(["row", "sigma", "seeds", "test_mean", "test_std", "test_values"])
      w.writerows(rows_csv)

    os.makedirs(self.out, exist_ok=True)
    targets = [os.path.join(self.out, "results")]
    if self.docs:
      targets.append(os.path.splitext(self.docs)[0])
    for target in targets:
      os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
      atomic.write_text(target + ".md", markdown)
      atomic.write_with(target + ".csv", write_csv)
    return markdown


def main(argv):
  f = flags.FLAGS
  start = time.time()
  table = Table(f.out, seeds=f.seeds, samples_per_class=f.samples_per_class, dataset=f.dataset,
                noise_sigma=f.noise_sigma, sigmas=f.sigmas, extra_args=argv[1:], docs=f.docs)
  markdown = table.run("python tools/robustness.py " + " ".join(sys.argv[1:]))
  print(markdown)
  print(f"wall time: {(time.time() - start) / 60:.1f} min; outputs in {table.out}")
  if table.failures:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
