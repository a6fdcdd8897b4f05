"""Every flagfile under flags/ parses with the real flag definitions and passes every check
that needs no data: a typo in a flag name, a value out of range or a combination the checks
refuse fails here, not after a user has prepared CIFAR-100. The files of the paper's cells are
written from tools/reproduce.py's grid by tools/flagfiles.py; the committed ones must be what it
writes."""
import glob
import os
import shutil
import sys

import pytest
from absl import flags

from tfjac import checks, modes, run
from tfjac.errors import ConfigError
from tfjac.training import selection

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))
sys.path.insert(0, os.path.join(REPO, "tools"))

import flagfiles  # noqa: E402  pylint: disable=wrong-import-position
import reproduce  # noqa: E402  pylint: disable=wrong-import-position


def test_there_are_flagfiles():
  assert len(FLAGFILES) > 40


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_validates(path, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # flagfiles include their base file by a path from the repo root
  argv = ["tfjac", f"--flagfile={os.path.relpath(path, REPO)}", f"--workdir={tmp_path / 'run'}"]
  flags.FLAGS(argv)
  # The teacher a previous cell writes, or the one the user gives (the MIT Indoor rows): a
  # stand-in file, since the checks only ask that it exists.
  if flags.FLAGS["teacher"].present or modes.load(flags.FLAGS.mode).needs_teacher:
    (tmp_path / "teacher.keras").write_text("")
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv + [f"--teacher={tmp_path / 'teacher.keras'}"])
  try:
    config = run.config_from_flags()
    checks.validate(config)
  finally:
    flags.FLAGS.unparse_flags()
  name = os.path.basename(path)
  if "_distill_" in name or "_lwf" in name:
    assert config.mode in ("distill", "transfer"), name
  assert config.workdir == str(tmp_path / "run")
  # What a cell's comment says of choose_on_validation is what the run does.
  with open(path) as f:
    text = " ".join(line.lstrip("# ").rstrip() for line in f)
  chooses = selection.wanted(config, modes.load(config.mode).chooses_on_validation)[0]
  if "The student is fitted twice" in text:
    assert chooses, name
  elif "The student is fitted once" in text:
    assert not chooses, name
  else:  # teacher and conditions files, and the base files the cells include
    assert config.mode in ("teacher", "conditions") or name.endswith("_base.cfg"), name


def test_a_broken_flagfile_is_caught(tmp_path, monkeypatch):
  """The test above can fail: an unknown flag, and a value the checks refuse."""
  monkeypatch.chdir(REPO)
  bad = tmp_path / "bad.cfg"
  bad.write_text("--flagfile=flags/cifar100_base.cfg\n--epochz=3\n")
  with pytest.raises(flags.Error):
    flags.FLAGS(["tfjac", f"--flagfile={bad}"])
  flags.FLAGS.unparse_flags()
  bad.write_text("--flagfile=flags/cifar100_base.cfg\n--validation_fraction=1.5\n")
  flags.FLAGS(["tfjac", f"--flagfile={bad}", f"--workdir={tmp_path / 'run'}"])
  try:
    with pytest.raises(ConfigError, match="validation_fraction"):
      checks.validate(run.config_from_flags())
  finally:
    flags.FLAGS.unparse_flags()


def test_the_committed_flagfiles_are_what_the_grid_writes():
  """Every flags/*.cfg is either written from the grid (and equal to what it writes now) or
  kept by hand; after a change of TABLES or PRESETS, `python tools/flagfiles.py` rewrites them."""
  assert flagfiles.check() == []
  assert len(flagfiles.generate()) + len(flagfiles.HAND_KEPT) == len(FLAGFILES)


def test_the_check_names_an_edited_a_missing_and_a_stray_flagfile(tmp_path):
  directory = tmp_path / "flags"
  shutil.copytree(os.path.join(REPO, "flags"), directory)
  edited = directory / "indoor67_lwf_n25.cfg"
  edited.write_text(edited.read_text().replace("--steps_per_epoch=76", "--steps_per_epoch=77"))
  (directory / "cifar100_distill_act_n10.cfg").unlink()
  (directory / "digits_transfer_base.cfg").unlink()
  (directory / "cifar100_distill_kd_n10.cfg").write_text("--mode=distill\n")
  assert flagfiles.check(str(directory)) == [
      "digits_transfer_base.cfg: kept by hand but missing",
      "cifar100_distill_act_n10.cfg: missing (the grid has this cell)",
      "indoor67_lwf_n25.cfg: differs from what the grid writes",
      "cifar100_distill_kd_n10.cfg: neither generated from the grid nor kept by hand "
      "(HAND_KEPT)"]


def test_a_grid_change_without_its_flagfiles_is_caught(monkeypatch):
  preset = reproduce.PRESETS[("distill", "cifar100")]
  monkeypatch.setitem(reproduce.PRESETS, ("distill", "cifar100"), preset._replace(
      size_args={**preset.size_args, "10": ("--steps_per_epoch=353",)}))
  assert flagfiles.check() == sorted(
      f"cifar100_distill_{r.key}_n10.cfg: differs from what the grid writes"
      for r in reproduce.TABLES["distill"])
  monkeypatch.undo()
  row = reproduce.Row("lwf_kd", "LwF + KD", ("--mode=transfer", "--hints=ce,lwf,kd"))
  monkeypatch.setitem(reproduce.TABLES, "transfer", reproduce.TABLES["transfer"] + (row,))
  assert flagfiles.check() == sorted(
      [f"indoor67_lwf_kd_n{n}.cfg: missing (the grid has this cell)"
       for n in ("25", "50", "full")]
      + ["digits_transfer_lwf_kd.cfg: missing (the grid has this cell)"])
