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
  """Trains `student` on the weighted sum of the named hints; `teacher` may be None when no
  hint needs one ('ce', 'jacnorm', 'noisy_ce')."""

  def __init__(self, student: keras.Model, teacher: Optional[keras.Model] = None, *,
               hints: Sequence[Tuple[str, float]] = (("ce", 1.0),),
               params: hints_lib.HintParams = hints_lib.HintParams(),
               jac_target: str = "label", jac_top_k: int = 5, jac_projections: int = 1,
               bn_policy: str = "batch_stats", num_classes: Optional[int] = None, seed: int = 0,
               **kwargs):
    super().__init__(**kwargs)
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False
    self.hint_weights = tuple((name, float(w)) for name, w in hints)
    self._hints = {name: hints_lib.HINTS[name] for name, _ in self.hint_weights}
    self.params = params
    needing_teacher = [n for n, h in self._hints.items() if h.needs_teacher]
    if needing_teacher and teacher is None:
      raise ValueError(f"hints {needing_teacher} need a teacher")
    self.student_outputs = tuple(sorted({o for h in self._hints.values()
                                         for o in h.student_jacobians}))
    self.teacher_outputs = tuple(sorted({o for h in self._hints.values()
                                         for o in h.teacher_jacobians}))
    self.needs_jacobians = bool(self.student_outputs or self.teacher_outputs)
    self.num_classes = num_classes or int(student.output_shape[-1])
    self.jac_target = jac_target
    self._target = jacobians.TARGETS[jac_target]
    self._target_options = jacobians.TargetOptions(self.num_classes, jac_top_k, jac_projections)
    if self.needs_jacobians and jac_top_k > self.num_classes and jac_target == "top_k":
      raise ValueError(f"jac_top_k={jac_top_k} is more than the {self.num_classes} classes")
    self.bn_policy = bn_policy
    self.seed = seed
    self._trackers = {"loss": keras.metrics.Mean(name="loss")}
    for name, _ in self.hint_weights:
      self._trackers[name] = keras.metrics.Mean(name=f"{name}_loss")
    self._trackers["accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    for who, outputs in (("teacher", self.teacher_outputs), ("student", self.student_outputs)):
      if outputs:
        self._trackers[f"{who}_jac_norm"] = keras.metrics.Mean(name=f"{who}_jac_norm")

  def call(self, x, training=False):
    return self.student(x, training=training)

  @property
  def metrics(self):
    return list(self._trackers.values())

  # --- the passes -------------------------------------------------------------------------

  def _seed(self, step, stream):
    return tf.stack([tf.constant(self.seed, tf.int64),
                     tf.cast(step, tf.int64) * 4 + stream])

  def _selection(self, labels, reference_logits, step):
    return self._target.select(labels=labels, reference_logits=reference_logits,
                               seed=self._seed(step, 0), options=self._target_options)

  def teacher_pass(self, x, labels, step):
    """Teacher logits, the target selection [B, K, C] and {output: Jacobian} (constants)."""
    if self.teacher is None:
      return None, None, {}
    if not self.teacher_outputs:
      logits = tf.stop_gradient(self.teacher(x, training=False))
      selection = self._selection(labels, logits, step) if self.student_outputs else None
      return logits, selection, {}
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      logits = self.teacher(x, training=False)
      selection = self._selection(labels, logits, step)
      selected = jacobians.selections(self.teacher_outputs, logits, selection)
    jacs = jacobians.jacobians_of(tape, selected, x)
    del tape
    return (tf.stop_gradient(logits), selection,
            {k: tf.stop_gradient(v) for k, v in jacs.items()})

  def student_pass(self, x, labels, selection, step, *, training):
    """Student logits (in `training` mode), the selection, and {output: Jacobian} taken so
    that the Jacobian terms reach the weights. Without a teacher the selection is made from
    the student's own (constant) logits."""
    if not self.student_outputs:
      return self.student(x, training=training), selection, {}

    def select_for(logits):
      if selection is not None:
        return selection
      return self._selection(labels, tf.stop_gradient(logits), step)

    if training and self.bn_policy == "batch_stats":
      with tf.GradientTape(persistent=True) as inner:
        inner.watch(x)
        with holding_batch_statistics(inner):
          logits = self.student(x, training=True)
        chosen = select_for(logits)
        selected = jacobians.selections(self.student_outputs, logits, chosen)
      jacs = jacobians.jacobians_of(inner, selected, x)
      del inner
      return logits, chosen, jacs
    # Inference pass first: after the training pass the moving statistics would already hold
    # this batch's moments, and each example's Jacobian would depend on the whole batch.
    with tf.GradientTape(persistent=True) as inner:
      inner.watch(x)
      inference_logits = self.student(x, training=False)
      chosen = select_for(inference_logits)
      selected = jacobians.selections(self.student_outputs, inference_logits, chosen)
    jacs = jacobians.jacobians_of(inner, selected, x)
    del inner
    if not training:
      return inference_logits, chosen, jacs
    return self.student(x, training=True), chosen, jacs

  def per_example_terms(self, x, labels, *, training, step, teacher_outputs=None):
    """({hint: [batch] loss}, weighted per-example total, student logits, HintInputs).
    `teacher_outputs`: teacher_pass's result when the caller ran it already."""
    t_logits, selection, t_jacs = teacher_outputs or self.teacher_pass(x, labels, step)
    s_logits, selection, s_jacs = self.student_pass(x, labels, selection, step,
                                                    training=training)
    teacher = self.teacher
    inputs = hints_lib.HintInputs(
        x=x, labels=labels, student_logits=s_logits, seed=self._seed(step, 1),
        student_fn=lambda z: self.student(z, training=training),
        teacher_logits=t_logits,
        teacher_fn=None if teacher is None else (lambda z: teacher(z, training=False)),
        selection=selection, student_jacobians=s_jacs, teacher_jacobians=t_jacs)
    terms = {name: self._hints[name].loss(inputs, self.params) for name, _ in self.hint_weights}
    total = tf.add_n([w * terms[name] for name, w in self.hint_weights])
    return terms, total, s_logits, inputs

  @staticmethod
  def global_mean(per_example):
    """Sum over this replica's examples divided by the number of examples in the global batch."""
    n = tf.cast(tf.shape(per_example)[0], per_example.dtype)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      n = ctx.all_reduce(tf.distribute.ReduceOp.SUM, n)
    return tf.reduce_sum(per_example) / n

  def compute_total_loss(self, x, labels, *, training, step, teacher_outputs=None):
    terms, total, s_logits, inputs = self.per_example_terms(
        x, labels, training=training, step=step, teacher_outputs=teacher_outputs)
    loss = self.global_mean(total)
    if self.student.losses:  # regularisers declared on layers; summed, so split over replicas
      loss += tf.add_n(self.student.losses) / tf.distribute.get_strategy().num_replicas_in_sync
    return loss, terms, total, s_logits, inputs

  # --- keras hooks ----------------------------------------------------------------------

  @staticmethod
  def _jacobian_norm(jacs):
    """Per-example Frobenius norm over the selected outputs of the first Jacobian kind."""
    jac = jacs.get("logits", next(iter(jacs.values())))
    return tf.sqrt(tf.reduce_sum(tf.square(jac), axis=[1, 2]))

  def _update_metrics(self, labels, terms, total, s_logits, inputs):
    self._trackers["loss"].update_state(total)
    for name, value in terms.items():
      self._trackers[name].update_state(value)
    self._trackers["accuracy"].update_state(labels, s_logits)
    for who, jacs in (("teacher", inputs.teacher_jacobians),
                      ("student", inputs.student_jacobians)):
      if jacs:
        self._trackers[f"{who}_jac_norm"].update_state(self._jacobian_norm(jacs))
    return {m.name: m.result() for m in self.metrics}

  def train_step(self, data):
    x, labels = data[0], data[1]
    x = tf.cast(x, tf.float32)
    step = self.optimizer.iterations
    variables = self.student.trainable_variables
    # The teacher runs before the weight tape opens: it records nothing there.
    teacher_outputs = self.teacher_pass(x, labels, step)
    with tf.GradientTape() as tape:
      loss, terms, total, s_logits, inputs = self.compute_total_loss(
          x, labels, training=True, step=step, teacher_outputs=teacher_outputs)
    grads = tape.gradient(loss, variables)
    self.optimizer.apply(grads, variables)
    return self._update_metrics(labels, terms, total, s_logits, inputs)

  def test_step(self, data):
    x, labels = data[0], data[1]
    x = tf.cast(x, tf.float32)
    _, terms, total, s_logits, inputs = self.compute_total_loss(x, labels, training=False,
                                                                step=0)
    return self._update_metrics(labels, terms, total, s_logits, inputs)
