"""The Distiller's one settings object, a config.HintConfig, from the forms the Python API takes
(a HintConfig, or {name: weight}, (name, weight) pairs or names), checked before any network is
touched: every name against its registry, every float finite, and every rule between the
settings (check_rules, which the command line's checks ask too). Errors name the setting
(hints.<field>), with what is valid."""
from tfjac import hints as hints_lib
from tfjac.config import BN_POLICIES, HintConfig, non_finite
from tfjac.errors import SettingError, mention
from tfjac.hints import estimators, jacobians
from tfjac.training.term_scales import SCALINGS


def hint_settings(hints) -> HintConfig:
  """The one settings object of a Distiller, a config.HintConfig, checked: `hints` is a
  HintConfig (a run's, config.hints), or the short form {name: weight} / (name, weight) pairs /
  names with every other setting at HintConfig's defaults (HintConfig.of)."""
  settings = hints if isinstance(hints, HintConfig) else HintConfig.of(hints)
  check_choices(settings)
  for path, value in non_finite(settings):  # a NaN passes every range check: refuse it here
    if path[0] == "weights":
      raise SettingError("hints", f"the weight of {path[1]!r} must be a finite number, got "
                         f"{value}")
    raise SettingError(f"hints.{path[0]}", f"must be a finite number, got {value}")
  check_rules(settings)
  return settings


# What check_choices reads: (HintConfig's field, its registry's names).
def _choices():
  return (("hints", tuple(hints_lib.HINTS)), ("jac_target", tuple(jacobians.TARGETS)),
          ("jac_estimator", estimators.ESTIMATORS), ("jac_bn_policy", BN_POLICIES),
          ("loss_scaling", SCALINGS), ("lwf_match", hints_lib.LWF_MATCHES),
          ("jac_probe", estimators.PROBES))


def check_choices(settings: HintConfig):
  """Refuses a name that is not in its registry, by the setting that carries it (`hints`
  itself, or hints.<field>) and with the valid names, before any network is touched: the
  registry lookups further on would raise a bare KeyError."""
  for field, valid in _choices():
    values = getattr(settings, field)
    for value in (values if field == "hints" else (values,)):
      if value not in valid:
        raise SettingError("hints" if field == "hints" else f"hints.{field}",
                           f"unknown value {value!r}; valid: {', '.join(sorted(valid))}")


def check_rules(settings: HintConfig, num_classes: int = 2):
  """Every rule between a HintConfig's values, in one place: hint_settings asks it for the
  Distiller, checks.validate for the command line (whose errors then name flags), both before
  any network is touched. The classes are not known yet: 2 stands for 'more than one' (rules
  on jac_top_k against the classes: hints.check_top_k). SettingErrors name hints.<field>."""
  h, names = settings, settings.hints
  if not names:
    raise SettingError("hints", f"needs at least one hint; valid: {', '.join(hints_lib.HINTS)}")
  if len(set(names)) != len(names):
    raise SettingError("hints", f"lists a hint twice: {','.join(names)}")
  for field in ("kd_temperature", "jac_top_k", "jac_projections", "noise_samples"):
    if not getattr(h, field) > 0:
      raise SettingError(f"hints.{field}", f"must be > 0, got {getattr(h, field)}")
  chosen = {name: hints_lib.HINTS[name] for name in names}
  if h.loss_scaling == "running" and "jac_ce" in names:
    raise SettingError("hints.loss_scaling", "running cannot scale jac_ce: the term is "
                       "unbounded below, its running mean can cross zero and its scale with "
                       f"it; use {mention('hints.loss_scaling', 'initial')} or none")
  noisy = [name for name, hint in chosen.items() if hint.uses_noise]
  if noisy and not h.noise_sigma > 0:
    raise SettingError("hints.noise_sigma", f"must be > 0 for the hint(s) {','.join(noisy)}, "
                       f"got {h.noise_sigma}")
  if any(hint.needs_class_targets for hint in chosen.values()) and not jacobians.TARGETS[
      h.jac_target].one_hot:
    raise SettingError("hints.jac_target", f"{h.jac_target!r} is not a class; jac_ce needs "
                       "class targets: " + ", ".join(n for n, t in jacobians.TARGETS.items()
                                                     if t.one_hot))
  jacobian_hints = [n for n in names if hints_lib.HINTS[n].student_jacobians
                    or hints_lib.HINTS[n].teacher_jacobians]
  if h.jac_every < 1:
    raise SettingError("hints.jac_every", f"must be > 0, got {h.jac_every}")
  if h.jac_every > 1 and jacobian_hints and len(jacobian_hints) == len(names):
    raise SettingError("hints.jac_every", f"{h.jac_every} needs a hint without Jacobians for "
                       f"the steps in between; the hints ({','.join(names)}) are all "
                       "Jacobian hints. Add one (e.g. act or ce) or use "
                       f"{mention('hints.jac_every', 1)}.")
  for field in ("jac_probes", "jac_fd_eps"):
    if getattr(h, field) <= 0:
      raise SettingError(f"hints.{field}", f"must be > 0, got {getattr(h, field)}")
  if h.jac_estimator == "backprop":
    return
  attention = [n for n in names if "attention" in hints_lib.HINTS[n].student_jacobians]
  if attention:
    raise SettingError("hints.jac_estimator", f"{h.jac_estimator}: {','.join(attention)} "
                       "takes its Jacobians by backprop only; use "
                       f"{mention('hints.jac_estimator', 'backprop')}")
  target = jacobians.TARGETS[h.jac_target]
  rows = target.count(jacobians.TargetOptions(num_classes, h.jac_top_k, h.jac_projections))
  if rows * h.jac_probes == 1 and "jac" in names and h.jac_normalize:
    raise SettingError("hints.jac_probes", f"{h.jac_probes} with "
                       f"{mention('hints.jac_target', h.jac_target)} and the normalised jac "
                       "term: one output along one probe is a scalar, and normalised scalars "
                       f"only compare signs (0 or 4, no gradient). Use {mention('hints.jac_probes')}"
                       f" >= 2, {mention('hints.jac_target', 'all')}, or "
                       f"{mention('hints.jac_normalize', False)}")
