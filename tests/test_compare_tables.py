"""tools/compare_tables.py: the one rule that words every comparison of the docs."""
import os
import sys

from tests import helpers

sys.path.insert(0, os.path.join(helpers.REPO, "tools"))
import compare_tables  # noqa: E402


def test_a_difference_counts_only_beyond_the_larger_spread():
  assert compare_tables.verdict(90.0, 1.0, 86.0, 2.0) == "ahead"
  assert compare_tables.verdict(86.0, 2.0, 90.0, 1.0) == "behind"
  assert compare_tables.verdict(90.0, 1.0, 88.5, 2.0) == "within noise"  # 1.5 < 2 (larger)
  assert compare_tables.verdict(90.0, 0.5, 89.0, 0.4) == "ahead"  # 1.0 > 0.5


def test_tables_side_by_side_with_their_verdicts(tmp_path):
  header = "row,samples_per_class,seeds,test_mean,test_std,val_mean,test_values,poster\n"
  (tmp_path / "a.csv").write_text(header + "act_ce,3,3,86.0,2.0,,,\nact_jac_ce,3,3,90.0,1.0,,,\n")
  (tmp_path / "b.csv").write_text(header + "act_jac_ce,3,3,89.5,1.2,,,\n")
  tables = {"defaults": compare_tables.read_table(str(tmp_path / "a.csv")),
            "tuned": compare_tables.read_table(str(tmp_path / "b.csv"))}
  text = compare_tables.render(tables, ["defaults:act_jac_ce>defaults:act_ce",
                                        "defaults:act_jac_ce~tuned:act_jac_ce"], "T")
  assert "| defaults | act_jac_ce | 90.00 +- 1.00 |" in text
  assert "3/class: defaults act_jac_ce vs defaults act_ce: +4.00 (stds 1.00, 2.00): **ahead**" in text
  assert "vs tuned act_jac_ce: +0.50 (stds 1.00, 1.20): **within noise**\n" in text
