"""Teacher outputs computed once per training example, to travel with the data (--teacher_cache).

The teacher is frozen and runs in inference mode, so without augmentation and with a Jacobian
target that does not depend on the step, its logits, Jacobians and feature maps are a function
of the example alone. They are computed here by the training step's own `Distiller.teacher_pass`
and fed as a third element of each batch (data.training_batches(extras=...)); train_step then
skips the teacher. The stream stays a pure function of (seed, epoch, step): resume is unchanged.
"""
from typing import Dict

import numpy as np
import tensorflow as tf

from tfjac import data as data_lib
from tfjac.training.distiller import pack_teacher_outputs


def compute(distiller, split: data_lib.ArraySplit, batch_size: int) -> Dict[str, np.ndarray]:
  """{name: [len(split), ...]} of the packed TeacherOutputs of every example of `split`."""
  @tf.function(reduce_retracing=True)
  def teacher_batch(x, labels):
    # Step 0: the targets allowed here (config.teacher_cache_blocker) do not read the seed.
    return pack_teacher_outputs(distiller.teacher_pass(tf.cast(x, tf.float32), labels, 0))

  parts = [teacher_batch(x, y) for x, y in data_lib.pipeline(split, batch_size)]
  return {k: np.concatenate([p[k].numpy() for p in parts]) for k in parts[0]}


def size_mib(cache: Dict[str, np.ndarray]) -> float:
  return sum(v.nbytes for v in cache.values()) / 2**20
