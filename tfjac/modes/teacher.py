"""Mode teacher: train a network on the full training split with CE and export it."""
from tfjac.errors import SettingError, mention
from tfjac.modes import Mode, common

DEFAULT_HINTS = ("ce",)


def check(config):
  if config.hints.hints != DEFAULT_HINTS:
    raise SettingError("hints.hints", f"{mention('mode', 'teacher')} trains on labels alone: "
                       f"use {mention('hints.hints', 'ce')}")
  if config.teacher.path:
    raise SettingError("teacher.path", f"{mention('mode', 'teacher')} trains a teacher; it "
                       f"takes no {mention('teacher.path')}")


def run(config, splits, strategy):
  _, summary = common.train_teacher(config, splits, strategy)
  return {"teacher": summary}


MODE = Mode(run=run, summary_lines=common.summary_lines, check=check,
            default_hints=DEFAULT_HINTS, builds_student=False)  # no student
