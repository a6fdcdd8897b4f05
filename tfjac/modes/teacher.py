"""--mode=teacher: train a network on the full training split with CE and export it."""
from tfjac.errors import ConfigError
from tfjac.modes import common

DEFAULT_HINTS = ("ce",)
ALWAYS_HINTS = ()
DEFAULT_JAC_TARGET = None
NEEDS_TEACHER = False
BUILDS_STUDENT = False
TEACHER_CACHE = False  # no student
HINTS_READ_TEACHER = False
TOP_K_AMONG = "dataset"


def check(config):
  if config.hints.hints != DEFAULT_HINTS:
    raise ConfigError("hints", "--mode=teacher trains on labels alone: use --hints=ce")
  if config.teacher_path:
    raise ConfigError("teacher", "--mode=teacher trains a teacher; it takes no --teacher")


def summary_lines(results):
  return common.summary_lines(results)


def run(config, splits, strategy):
  _, summary = common.train_teacher(config, splits, strategy)
  return {"teacher": summary}
