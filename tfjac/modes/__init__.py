"""The mode registry: a mode's name (Config.mode) -> the module whose `MODE` entry is the mode.

A mode is one module holding one `Mode` entry (below: what the mode is, with defaults) and its
run function. run.py and checks.py read the entry; nothing else spells a mode's name.

This module imports nothing of tfjac, so that the flag definitions can list the names cheaply.
"""
import dataclasses
import importlib
from typing import Callable, Optional, Tuple

MODES = {name: f"tfjac.modes.{name}" for name in (
    "teacher", "distill", "regularize", "transfer", "finetune", "conditions")}


def _no_rules(config):
  del config  # the checks of every mode (checks.py) are all this mode has


@dataclasses.dataclass(frozen=True)
class Mode:
  """What a mode is. Only `run` and `summary_lines` have no default."""
  run: Callable  # (config, splits, strategy) -> the results dict
  summary_lines: Callable  # results -> the summary lines between the header and the outputs
  # The hints when none are chosen (HintConfig() as it is; None: HintConfig's own default).
  default_hints: Optional[Tuple[str, ...]] = None
  always_hints: Tuple[str, ...] = ()  # first when the hints chosen leave them out (transfer: ce)
  # The Jacobian target when the hints are not chosen (None: HintConfig's own default).
  default_jac_target: Optional[str] = None
  needs_teacher: bool = False  # teacher.path is required
  builds_student: bool = True  # builds the `student` network (an outside one is tried early)
  teacher_cache: bool = False  # may fit a student against cached teacher outputs
  hints_read_teacher: bool = False  # the hints read the teacher (a probability one is checked)
  # choose_on_validation=auto fits the student twice and keeps the better on validation
  # (training/selection.py): the modes that learn from a teacher.
  chooses_on_validation: bool = False
  top_k_among: str = "dataset"  # "dataset" or "teacher": whose classes top_k picks among
  check: Callable = _no_rules  # config -> None; the mode's own rules (SettingError), no data read


def load(name: str) -> Mode:
  """The entry of mode `name` (a name of MODES; checks.validate refuses any other)."""
  return importlib.import_module(MODES[name]).MODE
