"""A Config's derived defaults, filled in one place for the command line and the Python API:
the teacher width of the dataset (config.resolved) and the mode's hints (Mode.default_hints,
always_hints, default_jac_target)."""
import dataclasses

from tfjac import config as config_lib
from tfjac import modes


def resolved(config):
  """`config` with every derived default filled in, as a run has it: config.resolved's (the
  teacher width), and the mode's hints. A HintConfig left at HintConfig() (no hint setting
  chosen) takes the mode's default hints and Jacobian target, as the command line does for
  a mode given without them; the mode's always_hints are put first when left out.
  run.config_from_flags, run.run and checks.validate all go through here, so Config(mode=...)
  and the command line's mode agree."""
  config = config_lib.resolved(config)
  if config.mode not in modes.MODES:  # checks.validate names the valid ones
    return config
  mode, h = modes.load(config.mode), config.hints
  if h == config_lib.HintConfig():
    h = dataclasses.replace(h, hints=mode.default_hints or h.hints,
                            jac_target=mode.default_jac_target or h.jac_target)
  h = dataclasses.replace(h, hints=tuple(n for n in mode.always_hints if n not in h.hints)
                          + h.hints)
  return config if h == config.hints else dataclasses.replace(config, hints=h)
