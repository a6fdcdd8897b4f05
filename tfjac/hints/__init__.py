"""The hint registry: name -> per-example loss on a HintInputs, plus what the hint needs.

A new hint is one function in losses.py and one entry here; the training step reads the
declared needs (teacher, Jacobians of which outputs, class targets) to decide which passes to
run, and otherwise only calls `loss`.
"""
import dataclasses
from typing import Callable, Dict, Optional, Tuple

import tensorflow as tf

from tfjac.config import HintConfig
from tfjac.errors import SettingError
from tfjac.hints import attention, estimators, jacobians, losses
from tfjac.hints.jacobians import JACOBIAN_TARGETS, TargetOptions  # noqa: F401

_DEFAULT = HintConfig()


@dataclasses.dataclass(frozen=True)
class HintParams:
  """What the hint losses read besides their inputs: the loss-parameter fields of
  config.HintConfig, under the same names and with its defaults (read from it, not copied)."""
  kd_temperature: float = _DEFAULT.kd_temperature
  jac_normalize: bool = _DEFAULT.jac_normalize
  lwf_match: str = _DEFAULT.lwf_match  # kd (soft targets, LwF's own) or act (squared error)
  noise_sigma: float = _DEFAULT.noise_sigma
  noise_samples: int = _DEFAULT.noise_samples
  # hints/estimators.py: the Jacobians are sketches unless backprop
  jac_estimator: str = _DEFAULT.jac_estimator

  @classmethod
  def from_config(cls, settings) -> "HintParams":
    """The parameters of a config.HintConfig (or anything with these fields), field by
    field: a parameter cannot be silently dropped on the way."""
    return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class HintInputs:
  """What a hint may read. `student_logits` is the student's own (target) head, used with the
  labels; `student_matching_logits` is what is matched to the teacher (LwF's teacher-shaped
  head in transfer, else the same logits). Jacobians are {kind: [batch, K, D]}: 'logits' etc.
  for the K selected outputs, 'attention' for the L attention pairs. `student_fn` /
  `teacher_fn` run the networks to matching logits (student in the step's mode)."""
  x: tf.Tensor
  labels: tf.Tensor
  student_logits: tf.Tensor
  student_matching_logits: tf.Tensor
  student_fn: Callable
  student_target_fn: Callable
  seed: tf.Tensor
  teacher_logits: Optional[tf.Tensor] = None
  teacher_fn: Optional[Callable] = None
  selection: Optional[tf.Tensor] = None  # [batch, K, C]
  student_jacobians: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)
  teacher_jacobians: Dict[str, tf.Tensor] = dataclasses.field(default_factory=dict)
  student_features: Tuple[tf.Tensor, ...] = ()
  teacher_features: Tuple[tf.Tensor, ...] = ()


@dataclasses.dataclass(frozen=True)
class Hint:
  loss: Callable[[HintInputs, HintParams], tf.Tensor]
  help: str
  needs_teacher: bool = False
  student_jacobians: Tuple[str, ...] = ()  # output kinds, see jacobians.OUTPUTS
  teacher_jacobians: Tuple[str, ...] = ()
  uses_noise: bool = False  # needs noise_sigma > 0
  needs_class_targets: bool = False  # selections must be one-hot classes
  needs_features: bool = False  # paired feature maps (attention transfer)
  # Runs the teacher itself, on inputs drawn at every step (noise): its outputs cannot be
  # computed once per example (teacher_cache).
  runs_teacher_per_step: bool = False
  # Runs the student on noisy copies of the batch (student_fn / student_target_fn): BatchNorm
  # must be tfjac's, which normalises them with the clean batch's statistics.
  noisy_student_passes: bool = False
  # Reads the teacher's logits themselves, not up to a per-example constant: refused with a
  # teacher that outputs probabilities (models.outputs.probability_blockers).
  reads_teacher_logits: bool = False


def _jac(i: HintInputs, p: HintParams):
  teacher, student = i.teacher_jacobians["logits"], i.student_jacobians["logits"]
  if p.jac_normalize and p.jac_estimator != "backprop":
    # Sketches [B, K, P]: each example's whole sketch normalised (hints/estimators.py).
    teacher, student = estimators.whole_sketch(teacher), estimators.whole_sketch(student)
  return losses.jacobian_matching(teacher_jacobian=teacher, student_jacobian=student,
                                  normalize=p.jac_normalize)


def _jac_ce(i: HintInputs, p: HintParams):
  t_prob = jacobians.select(tf.nn.softmax(i.teacher_logits), i.selection)
  s_logp = jacobians.select(tf.nn.log_softmax(i.student_matching_logits), i.selection)
  return losses.jacobian_cross_entropy(
      teacher_probabilities=t_prob, student_log_probabilities=s_logp,
      teacher_probability_jacobian=i.teacher_jacobians["probabilities"],
      student_log_probability_jacobian=i.student_jacobians["log_probabilities"],
      sigma=p.noise_sigma)


HINTS: Dict[str, Hint] = {
    "ce": Hint(lambda i, p: losses.cross_entropy(labels=i.labels,
                                                 student_logits=i.student_logits),
               help="softmax cross-entropy on the labels"),
    "act": Hint(lambda i, p: losses.activation_matching(
        teacher_logits=i.teacher_logits, student_logits=i.student_matching_logits),
                help="squared error between teacher and student logits", needs_teacher=True,
                reads_teacher_logits=True),
    "kd": Hint(lambda i, p: losses.soft_target_distillation(
        teacher_logits=i.teacher_logits, student_logits=i.student_matching_logits,
        temperature=p.kd_temperature),
               help="Hinton soft targets: KL at temperature kd_temperature, times tau^2",
               needs_teacher=True),
    "jac": Hint(_jac,
                help="Jacobian matching of the jac_target outputs, L2-normalised per example "
                "unless jac_normalize=False (jac_estimator: how it is computed)",
                needs_teacher=True,
                student_jacobians=("logits",), teacher_jacobians=("logits",),
                reads_teacher_logits=True),
    "jac_ce": Hint(_jac_ce, help="the poster's CE form: -T_s log S_s - sigma^2 grad T_s . grad "
                   "S_s / S_s over the jac_target classes (jac_target=all: every class); a "
                   "truncation: the noisy soft-target CE's curvature terms of the same order "
                   "are dropped. Unbounded below: the student lowers it without limit by "
                   "growing its input gradient along the teacher's, so use it beside ce with a "
                   "small sigma^2 * weight (docs/results-noise.md)",
                   needs_teacher=True, student_jacobians=("log_probabilities",),
                   teacher_jacobians=("probabilities",), uses_noise=True,
                   needs_class_targets=True),
    "noise": Hint(lambda i, p: losses.noise_matching(
        teacher_fn=i.teacher_fn, student_fn=i.student_fn, x=i.x, sigma=p.noise_sigma,
        samples=p.noise_samples, seed=i.seed),
                  help="logit matching on noise_samples Gaussian-noised copies of each input "
                  "(std noise_sigma): the equivalent of act + sigma^2 raw jac over all classes "
                  "(BatchNorm: the copies use the clean batch's statistics, which alone update "
                  "the moving statistics)",
                  needs_teacher=True, uses_noise=True, runs_teacher_per_step=True,
                  noisy_student_passes=True, reads_teacher_logits=True),
    "jacnorm": Hint(lambda i, p: losses.jacobian_norm(
        student_jacobian=i.student_jacobians["logits"], sigma=p.noise_sigma),
                    help="sigma^2 ||dS/dx||^2 of the jac_target outputs (no teacher): the "
                    "noise term of *squared error* on noisy inputs; beside ce, the squared-error "
                    "analogue of noisy_ce, not its second-order expansion",
                    student_jacobians=("logits",), uses_noise=True),
    "noisy_ce": Hint(lambda i, p: losses.noisy_cross_entropy(
        student_fn=i.student_target_fn, x=i.x, labels=i.labels, sigma=p.noise_sigma,
        samples=p.noise_samples, seed=i.seed),
                     help="cross-entropy on Gaussian-noised inputs (no teacher); to second "
                     "order CE + sigma^2/2 tr(Hessian_x CE), a cousin of ce,jacnorm (whose "
                     "equivalence holds for squared error), not its twin (BatchNorm as noise)",
                     uses_noise=True, noisy_student_passes=True),
    "lwf": Hint(lambda i, p: _LWF_MATCH[p.lwf_match](i, p),
                help="Learning without Forgetting: the student's teacher-shaped head matched "
                "to the teacher on the target images (lwf_match: act = squared error, kd = "
                "soft targets); with CE on the labels, always on in mode=transfer",
                needs_teacher=True),
    "at": Hint(lambda i, p: attention.attention_transfer(
        teacher_features=i.teacher_features, student_features=i.student_features),
               help="attention transfer: normalised channel-mean squared activations of "
               "paired layers (teacher_layers/student_layers), squared difference averaged "
               "over pixels, summed over pairs (reference weight 1e3)",
               needs_teacher=True, needs_features=True),
    "at_jac": Hint(lambda i, p: losses.jacobian_matching(
        teacher_jacobian=i.teacher_jacobians["attention"],
        student_jacobian=i.student_jacobians["attention"], normalize=p.jac_normalize),
                   help="Jacobian of each attention map at the teacher's largest pixel, matched "
                   "like jac", needs_teacher=True, needs_features=True,
                   student_jacobians=("attention",), teacher_jacobians=("attention",)),
}


def uses_jac_target(hint: Hint) -> bool:
  """Whether `hint` takes Jacobians of the outputs the Jacobian target selects (not of the
  attention maps, whose rows are picked at the teacher's largest pixel)."""
  return any(kind in jacobians.OUTPUTS for kind in hint.student_jacobians +
             hint.teacher_jacobians)


def check_top_k(settings: HintConfig, num_classes: int, whose: str, note: str = ""):
  """The one rule on jac_top_k: with jac_target='top_k' and a hint that takes Jacobians of the
  selected outputs, k is at most the `num_classes` the top-k picks among (`whose`: the
  dataset's, the teacher's in transfer, where the student's second head has its shape)."""
  uses = any(uses_jac_target(HINTS[n]) for n in settings.hints)
  if uses and settings.jac_target == "top_k" and settings.jac_top_k > num_classes:
    raise SettingError("hints.jac_top_k", f"{settings.jac_top_k} is more than {whose} {num_classes} "
                       f"classes{note}; use 1..{num_classes}")


_LWF_MATCH = {"act": HINTS["act"].loss, "kd": HINTS["kd"].loss}
LWF_MATCHES = tuple(_LWF_MATCH)
