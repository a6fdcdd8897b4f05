"""Input Jacobians of one selected output per example, and the registry of what to select.

A target function maps (labels, teacher_logits, num_classes, seed) to one class index per
example; a new target is one more entry in JACOBIAN_TARGETS and nothing else changes.
`selected_output_jacobian` differentiates the batch sum of the selected outputs: that is the
stack of per-example Jacobians only when examples do not interact, which the student step
ensures for BatchNorm (see models/layers.py and training/distiller.py).
"""
from typing import Callable, Dict

import tensorflow as tf


def _label_target(*, labels, teacher_logits, num_classes, seed):
  del teacher_logits, num_classes, seed
  return tf.cast(labels, tf.int32)


def _teacher_top1_target(*, labels, teacher_logits, num_classes, seed):
  del labels, num_classes, seed
  return tf.argmax(teacher_logits, axis=-1, output_type=tf.int32)


def _random_target(*, labels, teacher_logits, num_classes, seed):
  del teacher_logits
  return tf.random.stateless_uniform(tf.shape(labels), seed=seed, minval=0, maxval=num_classes,
                                     dtype=tf.int32)


JACOBIAN_TARGETS: Dict[str, Callable] = {
    "label": _label_target,
    "teacher_top1": _teacher_top1_target,
    "random": _random_target,
}
TARGETS_NEEDING_TEACHER = frozenset({"teacher_top1"})


def select(logits, target):
  """logits[b, target[b]] for each example b."""
  return tf.gather(logits, target, axis=1, batch_dims=1)


def flatten(jacobian):
  return tf.reshape(jacobian, [tf.shape(jacobian)[0], -1])


def selected_output_jacobian(model, x, target, *, training=False):
  """d model(x)[b, target[b]] / d x[b], flattened to [batch, D], plus the logits."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = model(x, training=training)
    selected = tf.reduce_sum(select(logits, target))
  return flatten(tape.gradient(selected, x)), logits
