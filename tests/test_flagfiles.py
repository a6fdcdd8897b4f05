"""Every flagfile under flags/ parses with the real flag definitions and passes every check
that needs no data: a typo in a flag name, a value out of range or a combination the checks
refuse fails here, not after a user has prepared CIFAR-100."""
import glob
import os

import pytest
from absl import flags

from tfjac import checks, modes, run
from tfjac.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGFILES = sorted(glob.glob(os.path.join(REPO, "flags", "*.cfg")))


def test_there_are_flagfiles():
  assert len(FLAGFILES) > 40


@pytest.mark.parametrize("path", FLAGFILES, ids=os.path.basename)
def test_flagfile_parses_and_validates(path, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)  # flagfiles include their base file by a path from the repo root
  argv = ["tfjac", f"--flagfile={os.path.relpath(path, REPO)}", f"--workdir={tmp_path / 'run'}"]
  flags.FLAGS(argv)
  # The teacher a previous cell writes, or the one the user gives (the MIT Indoor rows): a
  # stand-in file, since the checks only ask that it exists.
  if flags.FLAGS["teacher"].present or modes.load(flags.FLAGS.mode).NEEDS_TEACHER:
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
