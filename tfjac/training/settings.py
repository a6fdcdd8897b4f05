"""The Distiller's one settings object, a config.HintConfig, from the forms the Python API takes
(a HintConfig, or {name: weight}, (name, weight) pairs or names), checked before any network is
touched: every name against its registry, every float finite. Errors name the setting
(HintConfig's field), with the valid choices."""
from tfjac import hints as hints_lib
from tfjac.config import BN_POLICIES, HintConfig, non_finite
from tfjac.hints import estimators, jacobians
from tfjac.training.term_scales import SCALINGS


def hint_settings(hints) -> HintConfig:
  """The one settings object of a Distiller, a config.HintConfig, checked: `hints` is a
  HintConfig (a run's, config.hints), or the short form {name: weight} / (name, weight) pairs /
  names with every other setting at HintConfig's defaults (HintConfig.of)."""
  settings = hints if isinstance(hints, HintConfig) else HintConfig.of(hints)
  check_choices(settings)
  for path, value in non_finite(settings):  # a NaN passes every range check: refuse it here
    where = (f"hints: the weight of {path[1]!r}" if path[0] == "weights" else
             f"HintConfig.{path[0]}")
    raise ValueError(f"{where} must be a finite number, got {value}")
  return settings


# What check_choices reads: (HintConfig's field, what a value is, the valid names).
def _choices():
  return (("hints", "a hint", tuple(hints_lib.HINTS)),
          ("jac_target", "a Jacobian target", tuple(jacobians.TARGETS)),
          ("jac_estimator", "a Jacobian estimator", estimators.ESTIMATORS),
          ("jac_bn_policy", "a BatchNorm policy", BN_POLICIES),
          ("loss_scaling", "a loss scaling", SCALINGS),
          ("lwf_match", "an LwF match", hints_lib.LWF_MATCHES),
          ("jac_probe", "a probe kind", estimators.PROBES))


def check_choices(settings: HintConfig):
  """Refuses a name that is not in its registry, by the setting that carries it (the hints
  themselves, or HintConfig.<field>) and with the valid names, before any network is touched:
  the registry lookups further on would raise a bare KeyError."""
  for field, what, valid in _choices():
    values = getattr(settings, field)
    for value in (values if field == "hints" else (values,)):
      if value not in valid:
        name = "hints" if field == "hints" else f"HintConfig.{field}"
        raise ValueError(f"{name} must be one of {', '.join(valid)}, got {value!r}, which is "
                         f"not {what}")
