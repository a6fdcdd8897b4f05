"""The mode registry: --mode's name -> the module that is the mode.

A mode is one module. Besides `run`, it declares what it is; run.py and checks.py ask it, and
nothing else spells a mode's name:

  DEFAULT_HINTS        --hints when the flag is not given (None: the flag's own default)
  ALWAYS_HINTS         hints put first when --hints leaves them out (transfer: ce)
  DEFAULT_JAC_TARGET   --jac_target when the flag is not given (None: the flag's default)
  NEEDS_TEACHER        --teacher is required
  BUILDS_STUDENT       the mode builds the --model network (an outside one is tried early)
  TEACHER_CACHE        the mode may fit a student against cached teacher outputs
  HINTS_READ_TEACHER   the hints read the teacher's outputs (a probability teacher is checked)
  TOP_K_AMONG          "dataset" or "teacher": whose classes --jac_target=top_k picks among
  check(config)        the mode's own rules, raising ConfigError (no data read)
  run(config, splits, strategy) -> results dict
  summary_lines(results) -> the summary lines between the header and the run's outputs

This module imports nothing, so that the flag definitions can list the names cheaply.
"""
import importlib

MODES = {name: f"tfjac.modes.{name}" for name in (
    "teacher", "distill", "regularize", "transfer", "finetune", "conditions")}

ATTRIBUTES = ("DEFAULT_HINTS", "ALWAYS_HINTS", "DEFAULT_JAC_TARGET", "NEEDS_TEACHER",
              "BUILDS_STUDENT", "TEACHER_CACHE", "HINTS_READ_TEACHER", "TOP_K_AMONG", "check",
              "run", "summary_lines")


def load(name: str):
  """The module of mode `name` (a name of MODES; checks.validate refuses any other)."""
  return importlib.import_module(MODES[name])
