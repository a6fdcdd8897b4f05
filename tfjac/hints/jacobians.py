"""Input Jacobians of selected outputs, and the registry of what to select (the targets).

A target maps (labels, reference logits, seed) to *selection weights* of shape [batch, K, C]:
K combinations of the C outputs per example, each of whose input-gradient is taken. One-hot
rows select a class (label, teacher_top1, random, top_k, all); Gaussian rows scaled by 1/sqrt(K)
give random projections v^T J, whose squared norms summed over the K rows are an unbiased
estimate of the squared Frobenius norm of the whole Jacobian. Losses sum over the K rows, so
`all` gives Frobenius norms exactly and `projection` estimates them. A new target is one more
entry in TARGETS; the training step does not change.

The reference logits are the teacher's when there is a teacher, else the student's (held
constant): `teacher_top1` / `top_k` then mean the network's own predictions.
"""
import dataclasses
from typing import Callable, Dict

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class TargetOptions:
  num_classes: int
  top_k: int = 5
  projections: int = 1


def _one_hot(index, num_classes):  # [B, K] int -> [B, K, C]
  return tf.one_hot(index, num_classes, dtype=tf.float32)


def _label(*, labels, reference_logits, seed, options):
  del reference_logits, seed
  return _one_hot(tf.cast(labels, tf.int32)[:, None], options.num_classes)


def _teacher_top1(*, labels, reference_logits, seed, options):
  del labels, seed
  return _one_hot(tf.argmax(reference_logits, -1, output_type=tf.int32)[:, None],
                  options.num_classes)


def _random(*, labels, reference_logits, seed, options):
  del reference_logits
  index = tf.random.stateless_uniform(tf.shape(labels)[:1], seed=seed, minval=0,
                                      maxval=options.num_classes, dtype=tf.int32)
  return _one_hot(index[:, None], options.num_classes)


def _top_k(*, labels, reference_logits, seed, options):
  del labels, seed
  return _one_hot(tf.math.top_k(reference_logits, k=options.top_k).indices, options.num_classes)


def _all(*, labels, reference_logits, seed, options):
  del reference_logits, seed
  eye = tf.eye(options.num_classes, dtype=tf.float32)
  return tf.tile(eye[None], [tf.shape(labels)[0], 1, 1])


def _projection(*, labels, reference_logits, seed, options):
  del reference_logits
  k = options.projections
  shape = tf.stack([tf.shape(labels)[0], k, options.num_classes])
  return tf.random.stateless_normal(shape, seed=seed) / tf.sqrt(float(k))


@dataclasses.dataclass(frozen=True)
class Target:
  select: Callable
  count: Callable[[TargetOptions], int]  # K, static
  needs_reference: bool
  one_hot: bool
  help: str
  # Draws its outputs from the step's seed: the teacher's Jacobians change from step to step,
  # so they cannot be computed once per example (teacher_cache).
  seeded_by_step: bool = False


TARGETS: Dict[str, Target] = {
    "label": Target(_label, lambda o: 1, False, True, "the ground-truth class"),
    "teacher_top1": Target(_teacher_top1, lambda o: 1, True, True,
                           "the teacher's top-1 class (the student's own without a teacher)"),
    "random": Target(_random, lambda o: 1, False, True, "a random class per example (drawn "
                     "anew at every step)", seeded_by_step=True),
    "top_k": Target(_top_k, lambda o: o.top_k, True, True,
                    "the teacher's jac_top_k classes (k backward passes)"),
    "all": Target(_all, lambda o: o.num_classes, False, True,
                  "every class (C backward passes: exact Frobenius norms, costly)"),
    "projection": Target(_projection, lambda o: o.projections, False, False,
                         "jac_projections random Gaussian projections v^T J (one backward "
                         "pass each; unbiased for the squared Frobenius norm; drawn anew at "
                         "every step)", seeded_by_step=True),
}
JACOBIAN_TARGETS = TARGETS  # the name the flags and config use

OUTPUTS: Dict[str, Callable] = {
    "logits": lambda logits: logits,
    "probabilities": lambda logits: tf.nn.softmax(logits, axis=-1),
    # d log S_k = dS_k / S_k: the stable form of the division in the poster's CE expansion.
    "log_probabilities": lambda logits: tf.nn.log_softmax(logits, axis=-1),
}


def select(outputs, weights):
  """[B, C] outputs, [B, K, C] weights -> [B, K] selected combinations."""
  return tf.einsum("bc,bkc->bk", outputs, tf.cast(weights, outputs.dtype))


def flatten(jacobian):
  return tf.reshape(jacobian, [tf.shape(jacobian)[0], -1])


def selections(outputs_wanted, logits, weights):
  """{output: K tensors [B]}: the selected combinations, one per row. Call inside the tape
  that watches the input: the rows must be recorded to be differentiated."""
  k = weights.shape[1]
  if k is None:
    raise ValueError("the number of Jacobian targets per example must be static")
  return {o: tf.unstack(select(OUTPUTS[o](logits), weights), num=k, axis=1)
          for o in outputs_wanted}


def jacobians_of(tape, selected, x):
  """{output: [B, K, D]}: one gradient of each batch-summed row of `selections`.

  `tape` must have watched x and be persistent when there are several rows or outputs. Each
  gradient is the stack of per-example Jacobians as long as examples do not interact in the
  network (see models/layers.py for BatchNorm).
  """
  return {output: tf.stack([flatten(tape.gradient(row, x)) for row in rows], axis=1)
          for output, rows in selected.items()}


def selected_jacobians(model, x, weights, *, outputs=("logits",), training=False):
  """({output: [B, K, D]}, logits) of `model` at x, in one forward pass."""
  with tf.GradientTape(persistent=True) as tape:
    tape.watch(x)
    logits = model(x, training=training)
    selected = selections(outputs, logits, weights)
  jacs = jacobians_of(tape, selected, x)
  del tape
  return jacs, logits
