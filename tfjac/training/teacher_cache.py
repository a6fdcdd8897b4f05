"""Teacher outputs computed once per training example, to travel with the data (teacher.cache).

The teacher is frozen and runs in inference mode, so without augmentation and with a Jacobian
target that does not depend on the step, its logits, Jacobians and feature maps are a function
of the example alone. They are computed here by the training step's own `Distiller.teacher_pass`
and fed as a third element of each batch (data.training_batches(extras=...)); train_step then
skips the teacher. The stream stays a pure function of (seed, epoch, step): resume is unchanged.
The policy, when the cache can be used (`teacher_cache_blocker`, `use_teacher_cache`), is here
too; it asks whether the mode fits against a teacher (its caller says) and the hints'
declared needs. Its reasons name settings through errors.mention: the command line writes them
as flags (checks.flag_errors), a Python caller as settings (errors.say, errors.render).
"""
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow as tf

from tfjac import data as data_lib
from tfjac import hints
from tfjac.config import Config
from tfjac.errors import mention
from tfjac.training.distiller import pack_teacher_outputs


def compute(distiller, split: data_lib.ArraySplit, batch_size: int) -> Dict[str, np.ndarray]:
  """{name: [len(split), ...]} of the packed TeacherOutputs of every example of `split`."""
  @tf.function(reduce_retracing=True)
  def teacher_batch(x, labels):
    # Step 0: the targets allowed here (teacher_cache_blocker) do not read the seed.
    return pack_teacher_outputs(distiller.teacher_pass(tf.cast(x, tf.float32), labels, 0))

  parts = [teacher_batch(x, y) for x, y in data_lib.pipeline(split, batch_size)]
  return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def size_mib(cache: Dict[str, np.ndarray]) -> float:
  return sum(v.nbytes for v in cache.values()) / 2**20


def teacher_cache_blocker(config: Config, mode_caches: bool) -> Optional[str]:
  """Why the student's fit cannot use teacher outputs computed once per example, or None.
  `mode_caches`: whether config.mode fits a student against a teacher at all (its Mode entry's
  teacher_cache). The teacher is frozen and runs in inference mode, so its outputs are a
  function of the example alone unless the example or the outputs asked for change from step
  to step."""
  if not mode_caches:
    return f"{mention('mode', config.mode)} fits no student against a teacher"
  reads_teacher = any(hints.HINTS[name].needs_teacher for name in config.hints.hints)
  if reads_teacher and config.data.augment:
    return (f"{mention('data.augment')} ({', '.join(config.data.augment)}) changes every "
            "example at every step, so the teacher must see each augmented batch")
  return hints_blocker(config.hints.hints, config.hints.jac_target,
                       config.hints.jac_estimator)


def hints_blocker(hint_names, jac_target, jac_estimator="backprop") -> Optional[str]:
  """The part of teacher_cache_blocker that depends on the hints and the Jacobian target alone
  (tools/benchmark.py asks it too)."""
  chosen = {name: hints.HINTS[name] for name in hint_names}
  if not any(hint.needs_teacher for hint in chosen.values()):
    return f"no hint in {mention('hints.hints')} reads the teacher"
  per_step = [name for name, hint in chosen.items() if hint.runs_teacher_per_step]
  if per_step:
    return f"the hint(s) {','.join(per_step)} run the teacher on new noisy inputs at every step"
  uses_target = any(h.student_jacobians or h.teacher_jacobians for h in chosen.values())
  if uses_target and hints.JACOBIAN_TARGETS[jac_target].seeded_by_step:
    return (f"{mention('hints.jac_target', jac_target)} draws new outputs at every step "
            "(seeded by the step)")
  if uses_target and jac_estimator != "backprop":
    return (f"{mention('hints.jac_estimator', jac_estimator)} draws new probe directions at "
            "every step (seeded by the step)")
  return None


def use_teacher_cache(config: Config, mode_caches: bool) -> Tuple[bool, str]:
  """(whether the student's fit uses cached teacher outputs, the reason, for the log, with
  mentions: errors.say writes it); `mode_caches` as in teacher_cache_blocker."""
  blocker = teacher_cache_blocker(config, mode_caches)
  if config.teacher.cache == "off":
    return False, mention("teacher.cache", "off")
  if blocker:
    return False, blocker
  return True, (f"{mention('teacher.cache', config.teacher.cache)}: no augmentation, "
                "deterministic targets")
