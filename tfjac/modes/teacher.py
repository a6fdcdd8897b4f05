"""--mode=teacher: train a network on the full training split with CE and export it."""
from tfjac.errors import ConfigError
from tfjac.modes import Mode, common

DEFAULT_HINTS = ("ce",)


def check(config):
  if config.hints.hints != DEFAULT_HINTS:
    raise ConfigError("hints", "--mode=teacher trains on labels alone: use --hints=ce")
  if config.teacher.path:
    raise ConfigError("teacher", "--mode=teacher trains a teacher; it takes no --teacher")


def run(config, splits, strategy):
  _, summary = common.train_teacher(config, splits, strategy)
  return {"teacher": summary}


MODE = Mode(run=run, summary_lines=common.summary_lines, check=check,
            default_hints=DEFAULT_HINTS, builds_student=False)  # no student
