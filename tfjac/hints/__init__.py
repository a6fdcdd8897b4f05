"""The hint registry: name -> per-example loss on a HintInputs, plus what the hint needs.

A new hint is one function and one entry here; the training step reads `needs_teacher` and
`needs_jacobians` to decide which passes to run and otherwise only calls `loss`.
"""
import dataclasses
from typing import Callable, Dict, Optional

import tensorflow as tf

from tfjac.hints import losses
from tfjac.hints.jacobians import (JACOBIAN_TARGETS, TARGETS_NEEDING_TEACHER,  # noqa: F401
                                   select, selected_output_jacobian)


@dataclasses.dataclass(frozen=True)
class HintParams:
  kd_temperature: float = 4.0
  jac_normalize: bool = True


@dataclasses.dataclass
class HintInputs:
  labels: tf.Tensor
  student_logits: tf.Tensor
  teacher_logits: Optional[tf.Tensor] = None
  student_jacobian: Optional[tf.Tensor] = None
  teacher_jacobian: Optional[tf.Tensor] = None


@dataclasses.dataclass(frozen=True)
class Hint:
  loss: Callable[[HintInputs, HintParams], tf.Tensor]
  needs_teacher: bool
  needs_jacobians: bool
  help: str


HINTS: Dict[str, Hint] = {
    "ce": Hint(lambda i, p: losses.cross_entropy(labels=i.labels,
                                                 student_logits=i.student_logits),
               needs_teacher=False, needs_jacobians=False,
               help="softmax cross-entropy on the labels"),
    "act": Hint(lambda i, p: losses.activation_matching(teacher_logits=i.teacher_logits,
                                                        student_logits=i.student_logits),
                needs_teacher=True, needs_jacobians=False,
                help="squared error between teacher and student logits"),
    "kd": Hint(lambda i, p: losses.soft_target_distillation(
        teacher_logits=i.teacher_logits, student_logits=i.student_logits,
        temperature=p.kd_temperature),
               needs_teacher=True, needs_jacobians=False,
               help="Hinton soft targets: KL at temperature --kd_temperature, times tau^2"),
    "jac": Hint(lambda i, p: losses.jacobian_matching(
        teacher_jacobian=i.teacher_jacobian, student_jacobian=i.student_jacobian,
        normalize=p.jac_normalize),
                needs_teacher=True, needs_jacobians=True,
                help="Jacobian matching of the --jac_target output, L2-normalised per example "
                "unless --nojac_normalize"),
}
