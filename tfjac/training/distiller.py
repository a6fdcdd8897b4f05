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

BatchNorm in the noisy passes (`noise`, `noisy_ce`, training mode): the noisy copies are
normalised with the *clean* batch's statistics, recorded in the student's clean pass, and do not
update the moving statistics (models/layers.py); the clean pass updates them once, as in a `ce`
step, with `noisy_ce` alone too. Why: (1) the noisy pass then evaluates the same function S
(batch statistics as constants) as the clean pass and as the `batch_stats` Jacobian, so `noise`
is E[(T - S)^2(x + xi)] of that S and tends to act + sigma^2 ||J_T - J_S||^2 as sigma shrinks,
and `noisy_ce` is E[CE(S(x + xi))] of that S. The noisy batch's own statistics would add a bias
of order sigma^2 (the noise inflates the batch variance). (2) The exported student is evaluated
on clean inputs: its moving statistics describe clean batches, not a blend of clean and noisy
ones. (tests/test_equivalences.py)

Every term is a per-example vector, reduced once, over the *global* batch: each replica divides
its sum by the global number of examples, and the optimizer sums gradients over replicas.
Deterministic hints (every target but `random` and `projection`, every hint but `noise` and
`noisy_ce`): 1 and N replicas give the same loss and gradients (tests/test_distribute.py).
Random draws (`random`, `projection`, `noise`, `noisy_ce`) are seeded per step *and* per replica
(the replica id is folded into the seed), so replicas draw independently: N replicas compute
the same estimator, with the same distribution, as 1 replica, but not the same numbers.
"""
import collections
import dataclasses
from typing import Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import keras
import tensorflow as tf
from absl import logging

from tfjac import hints as hints_lib
from tfjac.config import HintConfig
from tfjac.hints import attention, estimators, jacobians
from tfjac.models import views
from tfjac.models.layers import (JacobianSafeBatchNorm, holding_batch_statistics, recording_batch_statistics,
                                 reusing_batch_statistics)
from tfjac.training import lazy
from tfjac.training.settings import hint_settings
from tfjac.training.term_scales import TermScales

TeacherOutputs = collections.namedtuple(
    "TeacherOutputs", "logits selection jacobians features pixels")
NO_TEACHER = TeacherOutputs(None, None, {}, (), None)
ATTENTION = "attention"


class Terms(NamedTuple):
  """A batch's hint terms (Distiller.per_example_terms)."""
  terms: Dict[str, tf.Tensor]  # {hint: [batch] per-example loss}
  total: tf.Tensor  # [batch] weighted sum of the terms
  student_logits: tf.Tensor
  inputs: hints_lib.HintInputs  # what the hints read (the Jacobians among it)


class Loss(NamedTuple):
  """Terms with the batch's scalar loss in front (Distiller.compute_total_loss)."""
  loss: tf.Tensor  # the global-batch mean of the total, plus the student's regularisers
  terms: Dict[str, tf.Tensor]
  total: tf.Tensor
  student_logits: tf.Tensor
  inputs: hints_lib.HintInputs


def pack_teacher_outputs(t: TeacherOutputs):
  """TeacherOutputs -> a flat {name: per-example tensor}, the form that travels with the data
  (training/teacher_cache.py); unpack_teacher_outputs inverts it."""
  packed = {"logits": t.logits}
  if t.selection is not None:
    packed["selection"] = t.selection
  if t.pixels is not None:
    packed["pixels"] = t.pixels
  packed.update({f"jacobian.{kind}": j for kind, j in t.jacobians.items()})
  packed.update({f"feature.{i}": f for i, f in enumerate(t.features)})
  return packed


def unpack_teacher_outputs(packed) -> TeacherOutputs:
  features = sorted((int(k[len("feature."):]), v) for k, v in packed.items()
                    if k.startswith("feature."))
  return TeacherOutputs(
      packed["logits"], packed.get("selection"),
      {k[len("jacobian."):]: v for k, v in packed.items() if k.startswith("jacobian.")},
      tuple(v for _, v in features), packed.get("pixels"))


class Distiller(keras.Model):
  """Trains `student` on the weighted sum of the named hints; `teacher` may be None when no
  hint needs one ('ce', 'jacnorm', 'noisy_ce').

  `hints`: every hint setting as one object, a config.HintConfig (the hints, their weights,
  the loss parameters, the Jacobian target, estimator and BatchNorm policy, the loss scaling,
  the lazy period jac_every), or its short form {name: weight} / (name, weight) pairs / names
  with every other setting at its default (HintConfig.of({"act": 1, "jac": 1}, jac_target=
  "all") is both at once). The Distiller derives the losses' HintParams and the targets'
  options from it.

  `student_view` / `teacher_view` (models/views.py) add what some hints read: a teacher-shaped
  second head (LwF) and feature maps (attention transfer). They share the networks' layers;
  the view's trainable variables are trained, and `student` alone is what gets exported.

  `teacher_outputs`: what the teacher returns, under the command line's rule
  (models.outputs.teacher_logits): 'auto' removes a final softmax seen in its structure (logged;
  `teacher_info` says what was found) and refuses a teacher whose outputs look like
  probabilities with no softmax to see; 'logits' says it returns logits (refused if it ends in
  a softmax); 'probabilities' uses log-probabilities in place of logits (refused with the
  hints that need true logits: act, jac, noise). `self.teacher` is the teacher so settled.
  A `teacher_view` given is used as it is.
  """

  def __init__(self, student: keras.Model, teacher: Optional[keras.Model] = None, *,
               hints: Union[HintConfig, Mapping[str, float],
                            Sequence[Tuple[str, float]]] = (("ce", 1.0),),
               num_classes: Optional[int] = None, seed: int = 0,
               student_view: Optional[keras.Model] = None,
               teacher_view: Optional[keras.Model] = None, teacher_outputs: str = "auto",
               term_scales: Optional[TermScales] = None, **kwargs):
    super().__init__(**kwargs)
    settings = hint_settings(hints)
    self.teacher_info = None  # what the teacher outputs and how that was settled
    if teacher is not None:
      from tfjac.models import outputs  # pylint: disable=g-import-not-at-top
      teacher, info = outputs.resolve_teacher(teacher, teacher_outputs, settings.hints,
                                               settings.lwf_match,
                                               input_shape=student.input_shape[1:])
      if info["outputs"] == "probabilities" or "softmax" in info["how"]:
        logging.info("teacher %s: %s (%s)", teacher.name, info["outputs"], info["how"])
      self.teacher_info = info
    self.student = student
    self.teacher = teacher
    if teacher is not None:
      teacher.trainable = False
    self.student_view = student_view or views.make_view(student)
    self.teacher_view = None
    if teacher is not None:
      self.teacher_view = teacher_view or views.make_view(teacher)
      self.teacher_view.trainable = False
    self.hint_weights = tuple((name, float(settings.weight(name))) for name in settings.hints)
    self._hints = {name: hints_lib.HINTS[name] for name, _ in self.hint_weights}
    # A twin (with_hints) shares its parent's scales: one set per training run.
    self.term_scales = term_scales or TermScales(
        self, (name for name, _ in self.hint_weights), settings.loss_scaling)
    self.params = hints_lib.HintParams.from_config(settings)
    needing_teacher = [n for n, h in self._hints.items() if h.needs_teacher]
    if needing_teacher and teacher is None:
      raise ValueError(f"hints {needing_teacher} need a teacher")
    noisy = [n for n, h in self._hints.items() if h.noisy_student_passes]
    plain_bn = [layer.name for layer in student.layers
                if isinstance(layer, keras.layers.BatchNormalization)
                and not isinstance(layer, JacobianSafeBatchNorm)]
    if noisy and plain_bn:
      raise ValueError(f"hints {noisy} normalise the noisy copies with the clean batch's "
                       f"statistics, which needs tfjac.models.JacobianSafeBatchNorm; the "
                       f"student has keras BatchNormalization layers {plain_bn}")
    kinds = lambda attr: tuple(sorted({o for h in self._hints.values()  # noqa: E731
                                       for o in getattr(h, attr)}))
    self.student_outputs = tuple(k for k in kinds("student_jacobians") if k != ATTENTION)
    self.teacher_outputs = tuple(k for k in kinds("teacher_jacobians") if k != ATTENTION)
    self.attention_jacobians = ATTENTION in kinds("student_jacobians")
    self.needs_features = any(h.needs_features for h in self._hints.values())
    self._pair_sizes = []
    if self.needs_features:
      t_shapes = self._feature_shapes(self.teacher_view)
      s_shapes = self._feature_shapes(self.student_view)
      if not t_shapes or len(t_shapes) != len(s_shapes):
        raise ValueError(f"attention hints need paired feature maps: the teacher view has "
                         f"{len(t_shapes)}, the student view {len(s_shapes)}")
      self._pair_sizes = attention.pair_sizes(t_shapes, s_shapes)
    self.num_classes = num_classes or int(student.output_shape[-1])
    matching_classes = int(self.student_view.output["matching_logits"].shape[-1])
    self.jac_target = settings.jac_target
    self._target = jacobians.TARGETS[settings.jac_target]
    self._target_options = jacobians.TargetOptions(matching_classes, settings.jac_top_k,
                                                   settings.jac_projections)
    hints_lib.check_top_k(settings, matching_classes, "the matching outputs'")
    self.bn_policy = self._bn_policy_for(student, settings.jac_bn_policy)
    self.estimator = settings.jac_estimator
    self.settings = settings  # as given (bn_policy: the policy the Jacobians do take)
    self.seed = seed
    self._trackers = {"loss": keras.metrics.Mean(name="loss")}
    for name, _ in self.hint_weights:
      self._trackers[name] = keras.metrics.Mean(name=f"{name}_loss")
    self._trackers["accuracy"] = keras.metrics.SparseCategoricalAccuracy(name="accuracy")
    for who, attr in (("teacher", "teacher_jacobians"), ("student", "student_jacobians")):
      if kinds(attr):
        self._trackers[f"{who}_jac_norm"] = keras.metrics.Mean(name=f"{who}_jac_norm")
    # Lazy Jacobian matching (jac_every=K > 1): training/lazy.py.
    self.jac_every = int(settings.jac_every)
    self._lazy = (lazy.LazySteps(self, self.jac_every)
                  if self.jac_every > 1 and self.jacobian_hints else None)

  @property
  def jacobian_hints(self):
    """The hints that take input Jacobians (of the student or of the teacher)."""
    return tuple(n for n, h in self._hints.items()
                 if h.student_jacobians or h.teacher_jacobians)

  def with_hints(self, hints):
    """A Distiller on other hints that shares these networks, views and settings (the
    lazy-Jacobian steps, validation without the Jacobian terms). `hints`: (name, weight)
    pairs. A twin takes every step it is given (jac_every 1): the lazy period is its parent's."""
    pairs = tuple((name, float(w)) for name, w in hints)
    settings = dataclasses.replace(self.settings, hints=tuple(name for name, _ in pairs),
                                   weights=pairs, jac_bn_policy=self.bn_policy, jac_every=1)
    return Distiller(self.student, self.teacher, hints=settings, num_classes=self.num_classes,
                     seed=self.seed, student_view=self.student_view,
                     teacher_view=self.teacher_view, teacher_outputs="logits",  # settled here
                     term_scales=self.term_scales)

  def _bn_policy_for(self, student, bn_policy):
    """A student with the standard keras.layers.BatchNormalization cannot hold its batch
    statistics for the input-gradient pass (only JacobianSafeBatchNorm can): under
    batch_stats its Jacobians would carry cross-example terms. It gets the inference policy
    instead, logged; models.layers.convert_batchnorm(student) keeps batch_stats available."""
    from tfjac.models import layers  # pylint: disable=g-import-not-at-top
    if (bn_policy == "batch_stats" and (self.student_outputs or self.attention_jacobians)
        and layers.has_standard_batchnorm(student)):
      logging.info("student %s has standard BatchNormalization layers: its Jacobians are "
                   "taken with the inference policy (moving statistics), which keeps them "
                   "per-example; tfjac.convert_batchnorm(student) first allows batch_stats",
                   student.name)
      return "inference"
    return bn_policy

  @staticmethod
  def _feature_shapes(view):
    return [tuple(view.output[k].shape) for k in sorted(
        (k for k in view.output if k.startswith("feature_")), key=lambda k: int(k[8:]))]

  def call(self, x, training=False):
    return self.student(x, training=training)

  @property
  def metrics(self):
    return list(self._trackers.values())

  @property
  def trained_variables(self):
    """The student's variables and those of its second head, if any."""
    return self.student_view.trainable_variables

  # --- the passes -------------------------------------------------------------------------

  def _seed(self, step, stream):
    """The stateless seed of a step's draws of `stream` (0: targets, 1: noise). Under several
    replicas the replica id is folded in: each replica draws its own classes and noise (the
    same seed everywhere would repeat one replica's draws on the others' examples)."""
    seed = tf.stack([tf.constant(self.seed, tf.int64), tf.cast(step, tf.int64) * 4 + stream])
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      seed = tf.random.experimental.stateless_fold_in(seed, ctx.replica_id_in_sync_group)
    return seed

  def _selection(self, labels, reference_logits, step):
    return self._target.select(labels=labels, reference_logits=reference_logits,
                               seed=self._seed(step, 0), options=self._target_options)

  def _attention_maps(self, features):
    return [attention.flat_map(f, size) for f, size in zip(features, self._pair_sizes)]

  def teacher_pass(self, x, labels, step) -> TeacherOutputs:
    """Teacher matching logits, the target selection [B, K, C], {kind: Jacobian}, features and
    the attention peak pixels, all constants."""
    if self.teacher is None:
      return NO_TEACHER
    if self.estimator != "backprop" and self.teacher_outputs:
      return self._teacher_sketches(x, labels, step)
    if not (self.teacher_outputs or self.attention_jacobians):
      out = self.teacher_view(x, training=False)
      logits = tf.stop_gradient(out["matching_logits"])
      selection = self._selection(labels, logits, step) if self.student_outputs else None
      return TeacherOutputs(logits, selection, {}, tuple(
          tf.stop_gradient(f) for f in views.features_of(out)), None)
    with tf.GradientTape(persistent=True) as tape:
      tape.watch(x)
      out = self.teacher_view(x, training=False)
      logits = out["matching_logits"]
      selection = self._selection(labels, logits, step)
      rows = jacobians.selections(self.teacher_outputs, logits, selection)
      pixels = None
      if self.attention_jacobians:
        maps = self._attention_maps(views.features_of(out))
        pixels = attention.peak_pixels(maps)
        rows[ATTENTION] = attention.values_at(maps, pixels)
    jacs = {k: tf.stop_gradient(v) for k, v in jacobians.jacobians_of(tape, rows, x).items()}
    del tape
    return TeacherOutputs(tf.stop_gradient(logits), selection, jacs,
                          tuple(tf.stop_gradient(f) for f in views.features_of(out)), pixels)

  def _student_rows(self, out, labels, selection, pixels, step):
    if selection is None and self.student_outputs:  # no teacher: the student's own outputs
      selection = self._selection(labels, tf.stop_gradient(out["matching_logits"]), step)
    rows = jacobians.selections(self.student_outputs, out["matching_logits"], selection)
    if self.attention_jacobians:
      rows[ATTENTION] = attention.values_at(
          self._attention_maps(views.features_of(out)), pixels)
    return rows, selection

  def student_pass(self, x, labels, selection, step, *, training, pixels=None):
    """The student view's outputs (in `training` mode), the selection, and {kind: Jacobian}
    taken so that the Jacobian terms reach the weights. Without a teacher the selection is
    made from the student's own (constant) outputs."""
    if not (self.student_outputs or self.attention_jacobians):
      return self.student_view(x, training=training), selection, {}
    if self.estimator != "backprop":
      return self._student_sketches(x, labels, selection, step, training=training)
    if training and self.bn_policy == "batch_stats":
      with tf.GradientTape(persistent=True) as inner:
        inner.watch(x)
        with holding_batch_statistics(inner):
          out = self.student_view(x, training=True)
        rows, selection = self._student_rows(out, labels, selection, pixels, step)
      jacs = jacobians.jacobians_of(inner, rows, x)
      del inner
      return out, selection, jacs
    # Inference pass first: after the training pass the moving statistics would already hold
    # this batch's moments, and each example's Jacobian would depend on the whole batch.
    with tf.GradientTape(persistent=True) as inner:
      inner.watch(x)
      out = self.student_view(x, training=False)
      rows, selection = self._student_rows(out, labels, selection, pixels, step)
    jacs = jacobians.jacobians_of(inner, rows, x)
    del inner
    if not training:
      return out, selection, jacs
    return self.student_view(x, training=True), selection, jacs

  # --- the Jacobian estimators (hints/estimators.py) ------------------------------------

  def _probe_directions(self, x, step):
    """The step's probes, the same for teacher and student (stream 2 of Distiller._seed)."""
    return estimators.probe_directions(x, probes=self.settings.jac_probes,
                                       kind=self.settings.jac_probe, seed=self._seed(step, 2))

  def _teacher_sketches(self, x, labels, step) -> TeacherOutputs:
    """teacher_pass under an estimator: the teacher's sketches, outside the weight tape, from
    one call on the clean batch and its probed copies."""
    sketches, selection, logits, clean = estimators.directional_rows(
        lambda z: self.teacher_view(z, training=False), x, self._probe_directions(x, step),
        estimator=self.estimator, eps=self.settings.jac_fd_eps, outputs=self.teacher_outputs,
        select=lambda reference: self._selection(labels, reference, step))
    return TeacherOutputs(tf.stop_gradient(logits), selection,
                          {k: tf.stop_gradient(v) for k, v in sketches.items()},
                          tuple(tf.stop_gradient(f) for f in views.features_of(clean)), None)

  def _student_sketches(self, x, labels, selection, step, *, training):
    """student_pass under an estimator: the clean pass (which alone updates the moving
    statistics), then the probes' pass inside the same weight tape, per example (module doc
    of hints/estimators.py): with the clean batch's statistics under batch_stats, in
    inference mode otherwise."""
    directions = self._probe_directions(x, step)

    def select(reference):
      return selection if selection is not None else self._selection(labels, reference, step)

    kw = dict(estimator=self.estimator, eps=self.settings.jac_fd_eps,
              outputs=self.student_outputs, select=select)
    if training and self.bn_policy != "batch_stats":
      # Inference pass first: after the training pass the moving statistics would already
      # hold this batch's moments (student_pass says the same).
      sketches, selection, _, _ = estimators.directional_rows(
          lambda z: self.student_view(z, training=False), x, directions, **kw)
      return self.student_view(x, training=True), selection, sketches
    with recording_batch_statistics() as clean_statistics:
      out = self.student_view(x, training=training)

    def probed(z):
      if not training:
        return self.student_view(z, training=False)
      with reusing_batch_statistics(clean_statistics):
        return self.student_view(z, training=True)

    sketches, selection, _, _ = estimators.directional_rows(
        probed, x, directions, clean_logits=out["matching_logits"], **kw)
    return out, selection, sketches

  def per_example_terms(self, x, labels, *, training, step, teacher_outputs=None):
    """The batch's Terms. `teacher_outputs`: teacher_pass's result when the caller ran it
    already."""
    t = teacher_outputs or self.teacher_pass(x, labels, step)
    with recording_batch_statistics() as clean_statistics:
      out, selection, s_jacs = self.student_pass(x, labels, t.selection, step,
                                                 training=training, pixels=t.pixels)
    teacher_view = self.teacher_view
    noisy_student = lambda z: self._noisy_student(z, training, clean_statistics)  # noqa: E731
    inputs = hints_lib.HintInputs(
        x=x, labels=labels, student_logits=out["logits"],
        student_matching_logits=out["matching_logits"], seed=self._seed(step, 1),
        student_fn=lambda z: noisy_student(z)["matching_logits"],
        student_target_fn=lambda z: noisy_student(z)["logits"],
        teacher_logits=t.logits,
        teacher_fn=None if teacher_view is None else (
            lambda z: teacher_view(z, training=False)["matching_logits"]),
        selection=selection, student_jacobians=s_jacs, teacher_jacobians=t.jacobians,
        student_features=tuple(views.features_of(out)), teacher_features=t.features)
    terms = {name: self._hints[name].loss(inputs, self.params) for name, _ in self.hint_weights}
    return Terms(terms, self.weighted_total(terms), out["logits"], inputs)

  def weighted_total(self, terms):
    """sum_h w_h * term_h / s_h over the hints in `terms` ([batch] each); s_h: the term's
    scale (training/term_scales.py; 1 under loss_scaling='none')."""
    def weighted(name, w):  # in float32 at least: w / s can overflow float16
      term = terms[name]
      dtype = tf.float64 if term.dtype == tf.float64 else tf.float32
      return tf.cast(w / self.term_scales.scale(name), dtype) * tf.cast(term, dtype)
    return tf.add_n([weighted(name, w) for name, w in self.hint_weights if name in terms])

  @classmethod
  def global_batch_mean(cls, per_example):
    """The mean over the global batch, the same value on every replica."""
    mean = cls.global_mean(per_example)
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
      mean = ctx.all_reduce(tf.distribute.ReduceOp.SUM, mean)
    return mean

  def _noisy_student(self, z, training, clean_statistics):
    """The student view on noisy copies z of the batch: in training, BatchNorm normalises them
    with the clean batch's statistics and leaves the moving statistics alone (module doc)."""
    if not training:
      return self.student_view(z, training=False)
    with reusing_batch_statistics(clean_statistics):
      return self.student_view(z, training=True)

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
    if training and self.term_scales.kind != "none":  # this batch's sizes, then the total
      for name, value in terms.items():
        self.term_scales.update(name, self.global_batch_mean(tf.stop_gradient(value)))
      total = self.weighted_total(terms)
    loss = self.global_mean(total)
    if self.student.losses:  # regularisers declared on layers; summed, so split over replicas
      loss += tf.add_n(self.student.losses) / tf.distribute.get_strategy().num_replicas_in_sync
    return Loss(loss, terms, total, s_logits, inputs)

  # --- keras hooks ----------------------------------------------------------------------
  # Keras' private methods overridden here are pinned by tests/test_keras_private.py: a Keras
  # release that renames one or changes its signature fails that test, not a training run.

  def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    """Overridden because Keras 3.15 builds the model under a strategy from one batch that it
    averages with strategy.reduce(MEAN, axis=None); MultiWorkerMirroredStrategy cannot reduce a
    PerReplica batch that way (ValueError: Attempt to convert a value (PerReplica...)). The
    build needs only shapes, so this worker's first local replica's batch serves as well.
    (Keras resets the iterator after the build, so no training batch is lost.)"""
    strategy = self._distribute_strategy
    if iterator is not None and isinstance(strategy,
                                           tf.distribute.MultiWorkerMirroredStrategy):
      for _, _, it in iterator:
        data_batch = tf.nest.map_structure(
            lambda v: strategy.experimental_local_results(v)[0], next(it))
        break
      iterator = None
    return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

  @staticmethod
  def _jacobian_norm(jacs):
    """Per-example Frobenius norm over the selected outputs of the first Jacobian kind."""
    jac = jacs.get("logits", next(iter(jacs.values())))
    return tf.sqrt(tf.reduce_sum(tf.square(jac), axis=[1, 2]))

  def _measurements(self, terms, inputs, batch):
    """([per-example values], [per-example sample weights]) for each tracker but accuracy, in
    the trackers' order: each term, 'loss' (the weighted sum of the terms computed, under this
    Distiller's weights) and the Jacobian norms; a tracker this step did not compute gets
    zeros of weight 0 (lazy steps; one structure for both branches of their tf.cond)."""
    found = dict(terms)
    found["loss"] = self.weighted_total(terms)
    for who, jacs in (("teacher", inputs.teacher_jacobians),
                      ("student", inputs.student_jacobians)):
      if jacs:
        found[f"{who}_jac_norm"] = self._jacobian_norm(jacs)
    ones, zeros = tf.ones([batch]), tf.zeros([batch])
    names = self._measured_trackers()
    return ([found.get(n, zeros) for n in names], [ones if n in found else zeros for n in names])

  def _measured_trackers(self):
    return [n for n in self._trackers if n != "accuracy"]

  def _record(self, updates, labels, s_logits, training):
    """The one place the trackers are updated, by a training or a validation step."""
    for name, (values, weights) in updates.items():
      self._trackers[name].update_state(values, sample_weight=weights)
    self._trackers["accuracy"].update_state(labels, s_logits)
    return self._logs(training)

  def unmeasured_metrics(self):
    """The names of the term trackers (Means) that no step since the last reset updated: under
    jac_every the Jacobian terms of an epoch without a Jacobian step. Keras would log them as 0
    (a Mean of nothing); callbacks.DropUnmeasured removes them from the epoch's logs."""
    return [m.name for m in self._trackers.values()
            if isinstance(m, keras.metrics.Mean) and float(m.count.numpy()) == 0.0]

  def fit(self, *args, callbacks=None, **kwargs):
    """keras.Model.fit, with callbacks.DropUnmeasured first: an epoch logs only the terms
    that its steps computed (lazy Jacobian matching), in TensorBoard and the history too."""
    from tfjac.training import callbacks as callbacks_lib  # pylint: disable=g-import-not-at-top
    callbacks = list(callbacks or [])
    if not any(isinstance(c, callbacks_lib.DropUnmeasured) for c in callbacks):
      callbacks.insert(0, callbacks_lib.DropUnmeasured())
    return super().fit(*args, callbacks=callbacks, **kwargs)

  def _logs(self, training=False):
    results = {m.name: m.result() for m in self.metrics}
    if training:  # the scales in use (training/term_scales.py); validation only reads them
      results.update(self.term_scales.logs())
    if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
      # Keras 3.15 averages the logs over workers with strategy.reduce(MEAN, v, axis=0),
      # which fails on a scalar: give each a batch axis of one, reduced away there.
      results = {k: tf.reshape(v, [1]) for k, v in results.items()}
    return results

  @staticmethod
  def _unpack(data):
    """(float32 images, labels, the teacher cache's packed outputs or None) of a batch."""
    cached = data[2] if len(data) > 2 and isinstance(data[2], dict) else None
    return tf.cast(data[0], tf.float32), data[1], cached

  def _gradients(self, x, labels, step, cached, optimizer):
    """(gradients of the trained variables, this model's Loss on the batch). `cached`: the
    teacher cache's packed outputs, or None."""
    if cached is not None:  # the teacher cache travels with the data
      teacher_outputs = unpack_teacher_outputs(cached)
    else:  # the teacher runs before the weight tape opens: it records nothing there
      teacher_outputs = self.teacher_pass(x, labels, step)
    with tf.GradientTape() as tape:
      loss = self.compute_total_loss(x, labels, training=True, step=step,
                                     teacher_outputs=teacher_outputs)
      # mixed_float16: compile() wraps the optimizer in a LossScaleOptimizer, whose apply()
      # divides by the scale; without this the float16 gradients underflow. Identity otherwise.
      scaled = optimizer.scale_loss(loss.loss)
    return tape.gradient(scaled, self.trained_variables), loss

  def is_jacobian_step(self, step):
    """Whether optimizer step `step` (a Python int or an int64 tensor) takes the Jacobian
    hints under jac_every."""
    return step % self.jac_every == 0

  def step_gradients(self, data, step, jac_step=None):
    """What one training step applies and reports: (gradients, student logits,
    {term tracker: (per-example values, per-example sample weights)}).

    jac_every=K > 1 (training/lazy.py): step % K == 0 takes every hint with the Jacobian
    hints' weights times K, the other steps only the hints without Jacobians (`jac_step`
    True/False: that one, chosen outside). The Jacobian trackers count only the steps that
    computed them; 'loss' is the weighted sum (weights not multiplied by K) of the terms
    computed.
    """
    x, labels, cached = self._unpack(data)

    def measure(model):  # `model`: this Distiller or one of its lazy twins
      grads, loss = model._gradients(  # pylint: disable=protected-access
          x, labels, step, cached, self.optimizer)
      values, weights = self._measurements(loss.terms, loss.inputs, tf.shape(labels)[0])
      return grads, loss.student_logits, values, weights

    if self._lazy is None:
      grads, s_logits, values, weights = measure(self)
    else:
      grads, s_logits, values, weights = self._lazy.step_gradients(self, measure, step,
                                                                   jac_step)
    return grads, s_logits, dict(zip(self._measured_trackers(), zip(values, weights)))

  def train_step(self, data, jac_step=None):
    grads, s_logits, updates = self.step_gradients(data, self.optimizer.iterations, jac_step)
    self.optimizer.apply(grads, self.trained_variables)
    return self._record(updates, data[1], s_logits, training=True)

  def make_train_function(self, force=False):
    """Overridden for lazy Jacobian matching on several replicas only: two compiled steps
    chosen in Python (training/lazy.py); Keras' own everywhere else."""
    if self._lazy is None or self.distribute_strategy.num_replicas_in_sync == 1:
      return super().make_train_function(force)
    if self.train_function is None or force:
      self.train_function = self._lazy.train_function(self)
    return self.train_function

  def test_step(self, data):
    # The validation split's teacher outputs may travel with it, computed once
    # (evaluation.validation_pipeline).
    x, labels, cached = self._unpack(data)
    if cached is not None:
      cached = unpack_teacher_outputs(cached)
    loss = self.compute_total_loss(x, labels, training=False, step=0, teacher_outputs=cached)
    values, weights = self._measurements(loss.terms, loss.inputs, tf.shape(labels)[0])
    return self._record(dict(zip(self._measured_trackers(), zip(values, weights))), labels,
                        loss.student_logits, training=False)
