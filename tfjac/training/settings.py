"""The Distiller's one settings object, a config.HintConfig, from the forms the Python API takes
(a HintConfig, {name: weight}, (name, weight) pairs or names, and keyword overrides), checked
before any network is touched: every name against its registry, every float finite. Errors name
the Distiller's argument, with the valid choices."""
import dataclasses
from typing import Mapping, Optional

from tfjac import hints as hints_lib
from tfjac.config import BN_POLICIES, HintConfig, non_finite
from tfjac.hints import estimators, jacobians
from tfjac.training.term_scales import SCALINGS


def hint_settings(hints, *, params: Optional[hints_lib.HintParams] = None,
                  jac_target: Optional[str] = None, jac_top_k: Optional[int] = None,
                  jac_projections: Optional[int] = None,
                  bn_policy: Optional[str] = None, jac_estimator: Optional[str] = None,
                  jac_probes: Optional[int] = None, jac_fd_eps: Optional[float] = None,
                  loss_scaling: Optional[str] = None,
                  jac_every: Optional[int] = None) -> HintConfig:
  """The one settings object of a Distiller, a config.HintConfig. `hints`: a HintConfig (a
  run's, config.hints), or the Python API's {name: weight} / (name, weight) pairs with every
  other setting at HintConfig's defaults. The keyword arguments, where given, replace the
  settings of the same name (`params`: its loss parameters; `bn_policy`: jac_bn_policy)."""
  if isinstance(hints, HintConfig):
    settings = hints
  elif isinstance(hints, str):  # iterating it would give one hint per character
    raise ValueError(f"hints= takes hint names, {{name: weight}} or (name, weight) pairs, not "
                     f"the string {hints!r}: hints=[{hints!r}]?")
  else:  # {name: weight}, (name, weight) pairs or names; a weight None or not given: the default
    items = tuple(hints.items() if isinstance(hints, Mapping) else
                  ((h, None) if isinstance(h, str) else h for h in hints))
    settings = HintConfig(hints=tuple(name for name, _ in items),
                          weights=tuple((name, float(w)) for name, w in items if w is not None))
  overrides = dataclasses.asdict(params) if params is not None else {}
  for field, value in (("jac_target", jac_target), ("jac_top_k", jac_top_k),
                       ("jac_projections", jac_projections), ("jac_bn_policy", bn_policy),
                       ("jac_estimator", jac_estimator), ("jac_probes", jac_probes),
                       ("jac_fd_eps", jac_fd_eps), ("loss_scaling", loss_scaling),
                       ("jac_every", jac_every)):
    if value is not None:
      overrides[field] = value
  settings = dataclasses.replace(settings, **overrides)
  check_choices(settings)
  for path, value in non_finite(settings):  # a NaN passes every range check: refuse it here
    where = (f"hints: the weight of {path[1]!r}" if path[0] == "weights" else
             f"{path[0]} (in params= or hints=)")
    raise ValueError(f"{where} must be a finite number, got {value}")
  return settings


# What check_choices reads: (the Distiller's argument, HintConfig's field, what a value is,
# the valid names). A value given inside a HintConfig or HintParams is named by its field too.
def _choices():
  return (("hints", "hints", "a hint", tuple(hints_lib.HINTS)),
          ("jac_target", "jac_target", "a Jacobian target", tuple(jacobians.TARGETS)),
          ("jac_estimator", "jac_estimator", "a Jacobian estimator", estimators.ESTIMATORS),
          ("bn_policy", "jac_bn_policy", "a BatchNorm policy", BN_POLICIES),
          ("loss_scaling", "loss_scaling", "a loss scaling", SCALINGS),
          ("params.lwf_match", "lwf_match", "an LwF match", hints_lib.LWF_MATCHES),
          ("jac_probe", "jac_probe", "a probe kind", estimators.PROBES))


def check_choices(settings: HintConfig):
  """Refuses a name that is not in its registry, by the Python API argument that carries it
  (hints=, jac_target=, ...) and with the valid names, before any network is touched: the
  registry lookups further on would raise a bare KeyError."""
  for argument, field, what, valid in _choices():
    values = getattr(settings, field)
    for value in (values if field == "hints" else (values,)):
      if value not in valid:
        field_name = "" if argument == field else f" (HintConfig.{field})"
        raise ValueError(f"{argument}{field_name} must be one of {', '.join(valid)}, got "
                         f"{value!r}, which is not {what}")
