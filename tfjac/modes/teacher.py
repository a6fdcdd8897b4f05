"""--mode=teacher: train a network on the full training split with CE and export it."""
from tfjac.modes import common


def run(config, splits, strategy):
  _, summary = common.train_teacher(config, splits, strategy)
  return {"teacher": summary}
