"""The one training step of tfjac: a keras.Model whose train_step/test_step compose the hints.

Teacher: frozen, always `training=False`, run outside the weight tape (its Jacobian needs no
second-order graph). Student: its input Jacobian is taken *inside* the weight tape, so the
Jacobian term reaches the student's weights by double backprop.

BatchNorm policy for the student's Jacobian in training (`bn_policy`):
  batch_stats  one forward pass in training mode; the input-gradient tape sees the batch
               mean/variance as constants (models/layers.py), the weight tape sees them fully.
               Per-example Jacobians of the function being trained, no extra pass.
  inference    a second forward pass with BatchNorm in inference mode (moving statistics) for
               the Jacobian: the Jacobian of the function that will be evaluated and exported.
Both give per-example Jacobians: d S_i / d x_j = 0 for j != i (tests/test_jacobians.py).

Every term is a per-example vector, reduced once, over the *global* batch: each replica divides
its sum by the global number of examples, and the optimizer sums gradients over replicas, so 1
and N replicas give the same loss and gradients (tests/test_distribute.py).
"""
from typing import Dict, Optional, Sequence, Tuple

import keras
import tensorflow as tf

from tfjac import hints as hints_lib
from tfjac.hints import jacobians
from tfjac.models.layers import holding_batch_statistics


class Distiller(keras.Model):
  """Trains `student` on the weighted sum of the named hints; `teacher` may be None for 'ce'."""

  def __init__(self, student: keras.Model, teacher: Optional[keras.Model] = None, *,
               hints: Sequence[Tuple[str, float]] = (("ce", 1.0),),
               params: hints_lib.HintParams = hints_lib.HintParams(),
               jac_target: str = "label", bn_policy: str = "batch_stats",
               num_classes: Optional[int] = None, seed: int = 0, **kwargs):
    super().__init__(**kwargs)
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False
    self.hint_weights = tuple((name, float(w)) for name, w in hints)
    self._hints = {name: hints_lib.HINTS[name] for name, _ in self.hint_weights}
    self.params = params
    self.needs_teacher = any(h.needs_teacher for h in self._hints.values())
    self.needs_jacobians = any(h.needs_jacobians for h in self._hints.values())
    if self.needs_teacher and teacher is None:
      raise ValueError(f"hints {[n for n, h in self._hints.items() if h.needs_teacher]} "
                       "need a teacher")
    if self.needs_jacobians and jac_target in jacobians.TARGETS_NEEDING_TEACHER and not teacher:
      raise ValueError(f"jac_target={jac_target!r} needs a teacher")
    self.jac_target = jac_target
    self._target_fn = jacobians.JACOBIAN_TARGETS[jac_target]
    self.bn_policy = bn_policy
    self.num_classes = num_classes or int(student.output_shape[-1])
    self.seed = seed
    self._trackers = {"loss": keras.metrics.Mean(name="loss")}
    for name, _ in self.hint_weights:
      self._trackers[name] = keras.metrics.Mean(name=f"{name}_loss")
    self._trackers["accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    if self.needs_jacobians:
      self._trackers["teacher_jac_norm"] = keras.metrics.Mean(name="teacher_jac_norm")
      self._trackers["student_jac_norm"] = keras.metrics.Mean(name="student_jac_norm")

  def call(self, x, training=False):
    return self.student(x, training=training)

  @property
  def metrics(self):
    return list(self._trackers.values())

  # --- the passes -------------------------------------------------------------------------

  def _targets(self, labels, teacher_logits, step):
    seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64)])
    return self._target_fn(labels=labels, teacher_logits=teacher_logits,
                           num_classes=self.num_classes, seed=seed)

  def teacher_pass(self, x, labels, step):
    """Teacher logits, the Jacobian targets, and the teacher's Jacobian (constants)."""
    if self.teacher is None:
      return None, None, None
    if not self.needs_jacobians:
      return tf.stop_gradient(self.teacher(x, training=False)), None, None
    with tf.GradientTape() as tape:
      tape.watch(x)
      logits = self.teacher(x, training=False)
      target = self._targets(labels, logits, step)
      selected = tf.reduce_sum(jacobians.select(logits, target))
    jacobian = jacobians.flatten(tape.gradient(selected, x))
    return tf.stop_gradient(logits), tf.stop_gradient(jacobian), target

  def student_pass(self, x, target, *, training):
    """Student logits (in `training` mode) and, when needed, its per-example Jacobian."""
    if not self.needs_jacobians:
      return self.student(x, training=training), None
    if training and self.bn_policy == "batch_stats":
      with tf.GradientTape() as inner:
        inner.watch(x)
        with holding_batch_statistics(inner):
          logits = self.student(x, training=True)
        selected = tf.reduce_sum(jacobians.select(logits, target))
      return logits, jacobians.flatten(inner.gradient(selected, x))
    # The inference pass comes first: after the training pass, the moving statistics would
    # already hold this batch's moments, and each Jacobian would depend on the whole batch.
    jacobian, inference_logits = jacobians.selected_output_jacobian(
        self.student, x, target, training=False)
    if not training:
      return inference_logits, jacobian
    return self.student(x, training=True), jacobian

  def per_example_terms(self, x, labels, *, training, step) -> Tuple[Dict[str, tf.Tensor], ...]:
    """{hint: [batch] loss}, the weighted per-example total, the student logits, Jacobians."""
    t_logits, t_jac, target = self.teacher_pass(x, labels, step)
    if target is None and self.needs_jacobians:
      target = self._targets(labels, None, step)
    s_logits, s_jac = self.student_pass(x, target, training=training)
    inputs = hints_lib.HintInputs(labels=labels, student_logits=s_logits,
                                  teacher_logits=t_logits, student_jacobian=s_jac,
                                  teacher_jacobian=t_jac)
    terms = {name: self._hints[name].loss(inputs, self.params) for name, _ in self.hint_weights}
    total = tf.add_n([w * terms[name] for name, w in self.hint_weights])
    return terms, total, s_logits, (t_jac, s_jac)

  @staticmethod
  def global_mean(per_example):
    """Sum over this replica's examples divided by the number of examples in the global batch."""
    n = tf.cast(tf.shape(per_example)[0], per_example.dtype)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, n)
    return tf.reduce_sum(per_example) / n

  def compute_total_loss(self, x, labels, *, training, step):
    terms, total, s_logits, jacs = self.per_example_terms(x, labels, training=training,
                                                          step=step)
    loss = self.global_mean(total)
    if self.student.losses:  # regularisers declared on layers; summed, so split over replicas
      loss += tf.add_n(self.student.losses) / tf.distribute.get_strategy().num_replicas_in_sync
    return loss, terms, total, s_logits, jacs

  # --- keras hooks ----------------------------------------------------------------------

  def _update_metrics(self, labels, terms, total, s_logits, jacs):
    self._trackers["loss"].update_state(total)
    for name, value in terms.items():
      self._trackers[name].update_state(value)
    self._trackers["accuracy"].update_state(labels, s_logits)
    if self.needs_jacobians:
      self._trackers["teacher_jac_norm"].update_state(tf.norm(jacs[0], axis=-1))
      self._trackers["student_jac_norm"].update_state(tf.norm(jacs[1], axis=-1))
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    x, labels = data[0], data[1]
    x = tf.cast(x, tf.float32)
    step = self.optimizer.iterations
    variables = self.student.trainable_variables
    with tf.GradientTape() as tape:
      loss, terms, total, s_logits, jacs = self.compute_total_loss(x, labels, training=True,
                                                                   step=step)
    grads = tape.gradient(loss, variables)
    self.optimizer.apply(grads, variables)
    return self._update_metrics(labels, terms, total, s_logits, jacs)

  def test_step(self, data):
    x, labels = data[0], data[1]
    x = tf.cast(x, tf.float32)
    _, terms, total, s_logits, jacs = self.compute_total_loss(x, labels, training=False, step=0)
    return self._update_metrics(labels, terms, total, s_logits, jacs)
