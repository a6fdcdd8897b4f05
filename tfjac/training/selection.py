"""The student's settings chosen on the run's own validation split (Config.choose_on_validation).

Why: under the default loss scaling every weight means relative importance, and the defaults
(every weight 1, Adam at 1e-3) match the tuned tables on the digits and on Fashion-MNIST
transfer; on Fashion-MNIST distillation they stay 2-3 points behind, where a heavier Jacobian
share with a higher learning rate is ahead (docs/results/lr_jac_candidates.md), and no single
fixed setting serves both (that alternative is behind on Fashion-MNIST transfer; a longer budget
does not close the gap: budget_check_fashion_mnist.md). So a run fits two candidates from the
same initial weights and data, the settings as given and the alternative (the Jacobian weights
x ALT_JAC_FACTOR, the learning rate x ALT_LR_FACTOR), and keeps the alternative only when its
best validation accuracy is higher by more than one standard error of the difference of two
accuracies measured on the validation images (`margin`): on a small validation split a lucky
epoch does not switch it. The test split is never read for the choice.

auto (the default) chooses where the settings are the product's own: in modes that learn from a
teacher (Mode.chooses_on_validation), with no hint weight set away from 1 and the default
learning rate (every run has a validation split: data.validation_fraction is in (0, 1)). Set any of them and the run fits exactly what was set; `on`
chooses around the settings given, `off` never chooses.
"""
import dataclasses
import math
from typing import Sequence, Tuple

from tfjac.config import (ALT_JAC_FACTOR, ALT_LR_FACTOR, CHOOSE_ON_VALIDATION, Config,
                          HintConfig, TrainConfig)

# The hints whose weight the alternative multiplies: the Jacobian-matching term of the rows it
# was measured on (distillation and transfer); jac_ce and at_jac keep their weights.
JACOBIAN_HINTS = ("jac",)
DEFAULTS, ALTERNATIVE = "given", "alternative"


@dataclasses.dataclass(frozen=True)
class Candidate:
  name: str  # DEFAULTS or ALTERNATIVE: also its run subdirectory (candidates/<name>)
  hints: HintConfig
  train: TrainConfig

  def describe(self):
    weights = ", ".join(f"{n} {self.hints.weight(n):g}" for n in self.hints.hints)
    return f"{self.name} (weights {weights}; learning rate {self.train.learning_rate:g})"


def wanted(config: Config, chooses: bool) -> Tuple[bool, str]:
  """(whether the student's fit is chosen between two candidates, why), for the log and the
  results. `chooses`: the mode's Mode.chooses_on_validation."""
  choice = config.choose_on_validation
  if choice not in CHOOSE_ON_VALIDATION:  # checks.validate refuses it first
    raise ValueError(f"choose_on_validation={choice!r}; valid: {CHOOSE_ON_VALIDATION}")
  if choice == "off":
    return False, "choose_on_validation=off"
  if choice == "on":
    return True, "choose_on_validation=on"
  if not chooses:
    return False, f"auto: mode {config.mode} does not learn from a teacher"
  given = [f"{n} {w:g}" for n, w in config.hints.weights if w != 1.0]
  if given:
    return False, f"auto: hint weights set ({', '.join(given)}): fitting exactly those"
  if config.train.learning_rate != TrainConfig.learning_rate:
    return False, (f"auto: learning rate set ({config.train.learning_rate:g}): fitting exactly "
                   "that")
  return True, "auto: the default weights and learning rate"


def candidates(config: Config) -> Tuple[Candidate, Candidate]:
  """The settings given, and the alternative: Jacobian weights x ALT_JAC_FACTOR (hints in
  JACOBIAN_HINTS that the run has), learning rate x ALT_LR_FACTOR. A run without a Jacobian
  hint gets the learning rate alone, so every row of a table gets the same two-fit budget."""
  h, t = config.hints, config.train
  weights = dict(h.weights)
  for name in h.hints:
    if name in JACOBIAN_HINTS:
      weights[name] = h.weight(name) * ALT_JAC_FACTOR
  order = list(h.hints) + [n for n in weights if n not in h.hints]
  alt_hints = dataclasses.replace(h, weights=tuple((n, float(weights[n])) for n in order
                                                   if n in weights))
  alt_train = dataclasses.replace(t, learning_rate=t.learning_rate * ALT_LR_FACTOR)
  return Candidate(DEFAULTS, h, t), Candidate(ALTERNATIVE, alt_hints, alt_train)


def margin(accuracy_given: float, accuracy_alternative: float, examples: int) -> float:
  """One standard error of the difference of two accuracies on `examples` validation images:
  sqrt(2 p (1 - p) / n) with p their mean (binomial, the two taken as independent)."""
  if examples <= 0:
    raise ValueError(f"margin needs validation examples, got {examples}")
  p = min(max((accuracy_given + accuracy_alternative) / 2, 0.0), 1.0)
  return math.sqrt(2 * p * (1 - p) / examples)


def choose(best_val: Sequence[float], examples: int) -> int:
  """The index of the kept candidate: 1 (the alternative) only if its best validation accuracy
  exceeds the given settings' by more than `margin`; else 0 (ties and near-ties keep what was
  given)."""
  given, alternative = best_val
  return int(alternative - given > margin(given, alternative, examples))
