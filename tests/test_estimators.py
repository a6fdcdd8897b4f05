"""The Jacobian estimators (hints/estimators.py): jvp and fd against exact Jacobians taken
independently (tf.GradientTape.jacobian) on small float64 networks; unbiasedness of the raw
term, fd's O(eps^2) bias, per-example sketches under BatchNorm, the term reaching the student's
weights, two replicas, the checks, and the compiled step (XLA included for fd)."""
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import checks
from tfjac.config import Config, HintConfig, TrainConfig
from tfjac.errors import ConfigError
from tfjac.hints import estimators
from tfjac.models import holding_batch_statistics
from tfjac.models.layers import (JacobianSafeBatchNorm, recording_batch_statistics,
                                 reusing_batch_statistics)
from tfjac.training.distiller import Distiller
from tests import helpers

B, SIDE, C = 4, 5, 4


@pytest.fixture
def float64():
  """Networks and inputs in float64 (Keras' Input casts to floatx, so both are set)."""
  floatx, policy = keras.backend.floatx(), keras.mixed_precision.global_policy()
  keras.backend.set_floatx("float64")
  keras.mixed_precision.set_global_policy("float64")
  yield
  keras.backend.set_floatx(floatx)
  keras.mixed_precision.set_global_policy(policy)


def _net(name, seed, pool=False):
  """conv -> JacobianSafeBatchNorm -> tanh (-> max-pool) -> dense: smooth unless pool."""
  keras.utils.set_random_seed(seed)
  inputs = keras.Input((SIDE, SIDE, 1))
  h = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="conv")(inputs)
  h = JacobianSafeBatchNorm(name="bn")(h)
  h = keras.layers.Activation("tanh")(h)
  if pool:
    h = keras.layers.MaxPooling2D(2)(h)
  h = keras.layers.Flatten()(h)
  return keras.Model(inputs, keras.layers.Dense(C, name="logits")(h), name=name)


def _batch(dtype=tf.float64):
  rng = np.random.default_rng(1)
  return tf.constant(rng.random((B, SIDE, SIDE, 1)), dtype), tf.constant([0, 1, 2, 3])


def _distiller(estimator, *, probes=1, eps=1e-4, normalize=False, target="all", probe="gaussian",
               pool=False, hints=("jac",), policy="batch_stats"):
  settings = HintConfig(hints=hints, jac_estimator=estimator, jac_probes=probes,
                        jac_probe=probe, jac_fd_eps=eps, jac_normalize=normalize,
                        jac_target=target, jac_bn_policy=policy)
  return Distiller(_net("student", 1, pool), _net("teacher", 2, pool), hints=settings)


def _exact_all_class_jacobians(model, x, training):
  """[B, C, D]: each example's Jacobian of every output (batch statistics held in training),
  by tf.GradientTape.jacobian (not tfjac's jacobians_of), the diagonal blocks of [B, C, B, D]."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    if training:
      with holding_batch_statistics(tape):
        logits = model(x, training=True)
    else:
      logits = model(x, training=False)
  full = tf.reshape(tape.jacobian(logits, x), [B, C, B, -1]).numpy()
  return np.stack([full[i, :, i] for i in range(B)])


def _exact_sketch(jacobian, directions):
  u = directions.numpy().reshape(directions.shape[0], B, -1)
  return np.einsum("bkd,pbd->bkp", jacobian, u) / np.sqrt(u.shape[0])


# --- exactness and per-example sketches ------------------------------------------------------

@pytest.mark.parametrize("estimator", ["jvp", "fd"])
@pytest.mark.parametrize("policy", ["batch_stats", "inference"])
def test_sketches_are_per_example_directional_derivatives(float64, estimator, policy):
  """Student (training step, BatchNorm in training mode) and teacher sketches equal J_ii u_i
  with each example's own Jacobian: no cross-example term through the batch statistics."""
  d = _distiller(estimator, probes=3, policy=policy)
  x, y = _batch()
  directions = d._probe_directions(x, 0)  # pylint: disable=protected-access
  # Before the step: its training pass moves the statistics the inference policy reads.
  want_s = _exact_sketch(_exact_all_class_jacobians(d.student, x, policy == "batch_stats"),
                         directions)
  t = d.teacher_pass(x, y, 0)
  _, _, sketches = d.student_pass(x, y, t.selection, 0, training=True)
  tol = 1e-10 if estimator == "jvp" else 1e-6  # fd: O(eps^2) with eps 1e-4, smooth nets
  want_t = _exact_sketch(_exact_all_class_jacobians(d.teacher, x, False), directions)
  assert sketches["logits"].shape == (B, C, 3)
  np.testing.assert_allclose(sketches["logits"].numpy(), want_s, atol=tol * np.abs(want_s).max())
  np.testing.assert_allclose(t.jacobians["logits"].numpy(), want_t, atol=tol * np.abs(want_t).max())


def test_a_sketch_depends_on_its_own_probe_only(float64):
  """d sketch_i / d u_j = 0 for j != i: the other examples' probes change nothing."""
  d = _distiller("jvp", probes=2)
  x, y = _batch()
  for estimator in ("jvp", "fd"):
    def sketch(directions):
      with recording_batch_statistics() as stats:
        out = d.student(x, training=True)

      def probed(z):
        with reusing_batch_statistics(stats):
          return {"matching_logits": d.student(z, training=True)}
      return estimators.directional_rows(
          probed, x, directions, estimator=estimator, eps=1e-4, outputs=("logits",),
          select=lambda logits: tf.tile(tf.eye(C, dtype=tf.float64)[None], [B, 1, 1]),
          clean_logits=out)[0]["logits"].numpy()
    u = estimators.probe_directions(x, probes=2, kind="gaussian", seed=[0, 1])
    mask = np.zeros(u.shape)
    mask[:, 1] = 1.0  # keep example 1's probes only
    np.testing.assert_allclose(sketch(u * mask)[1], sketch(u)[1], rtol=1e-6, atol=1e-9)


# --- unbiasedness and bias -------------------------------------------------------------------

@pytest.mark.parametrize("estimator,probe", [("jvp", "rademacher"), ("jvp", "gaussian"),
                                             ("fd", "rademacher")])
def test_raw_term_is_unbiased_for_the_all_class_frobenius_norm(float64, estimator, probe):
  """mean over many probes of the raw jac term = ||J_T - J_S||_F^2 per example, every output."""
  d = _distiller(estimator, probes=200, probe=probe)
  x, y = _batch()
  exact = np.sum((_exact_all_class_jacobians(d.teacher, x, False) -
                  _exact_all_class_jacobians(d.student, x, True)) ** 2, axis=(1, 2))
  draws = np.stack([d.per_example_terms(x, y, training=True, step=s)[0]["jac"].numpy()
                    for s in range(12)])  # 12 steps x 200 probes, independent draws
  mean, error = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
  assert np.all(np.abs(mean - exact) < 5 * error + 1e-9), (mean, exact, error)
  np.testing.assert_allclose(mean, exact, rtol=0.05)
  assert draws.std(0).min() > 0  # the draws do differ from step to step


def test_fd_bias_shrinks_as_eps_squared(float64):
  """Central differences on a smooth network: error against jvp's exact J u is O(eps^2)."""
  x, y = _batch()
  jvp = _distiller("jvp", probes=2)
  t_exact = jvp.teacher_pass(x, y, 0).jacobians["logits"].numpy()
  errors = []
  for eps in (1e-1, 1e-2, 1e-3):
    fd = _distiller("fd", probes=2, eps=eps)
    errors.append(np.abs(fd.teacher_pass(x, y, 0).jacobians["logits"].numpy() - t_exact).max())
  assert errors[0] > 1e-6  # the bias is there to shrink
  assert errors[1] < errors[0] / 30 and errors[2] < errors[1] / 30, errors


# --- the term reaches the student's weights ---------------------------------------------------

@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_term_reaches_the_student_weights(float64, estimator):
  """The weight gradient of the jac term (training step) equals finite differences of the
  same term in the conv kernel, and is not zero: the student's sketch is inside the tape."""
  d = _distiller(estimator, probes=2, eps=1e-3)
  x, y = _batch()
  t = d.teacher_pass(x, y, 0)

  def term():
    return tf.reduce_mean(d.per_example_terms(x, y, training=True, step=0,
                                              teacher_outputs=t)[0]["jac"])

  kernel = d.student.get_layer("conv").kernel
  with tf.GradientTape() as tape:
    value = term()
  grad = tape.gradient(value, kernel).numpy()
  numeric = helpers.finite_difference_gradient(term, kernel, eps=1e-6)
  assert np.abs(grad).max() > 1e-3
  np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-6 * np.abs(numeric).max())


# --- the normalised form ---------------------------------------------------------------------

def _normalised_exact(d, x):
  tj = _exact_all_class_jacobians(d.teacher, x, False).reshape(B, -1)
  sj = _exact_all_class_jacobians(d.student, x, True).reshape(B, -1)
  unit = lambda j: j / np.linalg.norm(j, axis=1, keepdims=True)  # noqa: E731
  return np.sum((unit(tj) - unit(sj)) ** 2, axis=1)


@pytest.mark.slow
def test_normalised_form_bias_shrinks_with_probes(float64):
  """The normalised estimate is consistent, not unbiased: its mean over draws tends to the
  exact normalised all-class form as the probes grow. Prints the measured bias."""
  x, y = _batch()
  biases = []
  rng = np.random.default_rng(0)
  for probes in (1, 4, 16, 64):
    d = _distiller("jvp", probes=probes, normalize=True)
    # A student near its teacher (as after some training): small terms, where it matters.
    d.student.set_weights([w * (1 + 0.3 * rng.standard_normal(w.shape)) if w.ndim > 1 else w
                           for w in d.teacher.get_weights()])
    exact = _normalised_exact(d, x)
    draws = np.stack([d.per_example_terms(x, y, training=True, step=s)[0]["jac"].numpy()
                      for s in range(100)])
    biases.append(np.mean(draws.mean(0) - exact))
    error = draws.mean(1).std(ddof=1) / np.sqrt(len(draws))
    print(f"probes {probes}: exact {exact.mean():.4f} mean estimate {draws.mean():.4f} "
          f"+- {error:.4f}, bias {biases[-1]:+.4f} (relative {biases[-1] / exact.mean():+.1%})")
  assert abs(biases[-1]) < abs(biases[0]) / 4, biases


def test_normalised_form_is_the_whole_sketch_cosine(float64):
  """One probe, every output: 2 - 2 cos(J_T u, J_S u) per example."""
  d = _distiller("jvp", probes=1, normalize=True)
  x, y = _batch()
  terms, _, _, inputs = d.per_example_terms(x, y, training=True, step=0)
  t = inputs.teacher_jacobians["logits"].numpy()[:, :, 0]
  s = inputs.student_jacobians["logits"].numpy()[:, :, 0]
  cos = np.sum(t * s, 1) / np.linalg.norm(t, axis=1) / np.linalg.norm(s, axis=1)
  np.testing.assert_allclose(terms["jac"].numpy(), 2 - 2 * cos, rtol=1e-8)


# --- several replicas -------------------------------------------------------------------------

@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_each_replica_takes_its_half_with_its_own_probes(digits_splits, estimator):
  """Two replicas (2 logical CPUs, conftest.py): each replica's terms are those one device
  computes on that half of the batch with the replica's folded seed; the replicas' probes
  differ."""
  info = digits_splits.info
  two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  keras.utils.set_random_seed(3)
  init, t_init = helpers.tiny_vgg(info, "s", sync_bn=True), helpers.tiny_vgg(info, "t")
  with two.scope():
    student, teacher = helpers.tiny_vgg(info, "s", sync_bn=True), helpers.tiny_vgg(info, "t")
    student.set_weights(init.get_weights())
    teacher.set_weights(t_init.get_weights())
    d = Distiller(
        student, teacher, hints=HintConfig.of([("act", 1.0), ("jac", 1.0)], jac_estimator=estimator,
                                              jac_probes=2))
  x = tf.constant(digits_splits.train.images[:8])
  y = tf.constant(digits_splits.train.labels[:8])
  step = tf.constant(5, tf.int64)

  @tf.function
  def per_replica():
    def fn():
      r = tf.distribute.get_replica_context().replica_id_in_sync_group
      xs, ys = x[4 * r:4 * r + 4], y[4 * r:4 * r + 4]
      return d.per_example_terms(xs, ys, training=False, step=step)[0]["jac"]
    return two.run(fn)

  got = [v.numpy() for v in two.experimental_local_results(per_replica())]
  single = Distiller(
      init, t_init, hints=HintConfig.of([("act", 1.0), ("jac", 1.0)], jac_estimator=estimator,
                                        jac_probes=2))
  plain_seed = single._seed  # pylint: disable=protected-access
  for r in range(2):
    single._seed = lambda s, stream, r=r: tf.random.experimental.stateless_fold_in(  # noqa
        plain_seed(s, stream), r)
    want = single.per_example_terms(x[4 * r:4 * r + 4], y[4 * r:4 * r + 4], training=False,
                                    step=step)[0]["jac"].numpy()
    np.testing.assert_allclose(got[r], want, rtol=1e-4, atol=1e-6)
  single._seed = lambda s, stream: tf.random.experimental.stateless_fold_in(  # noqa
      plain_seed(s, stream), 1)
  other = single.per_example_terms(x[:4], y[:4], training=False, step=step)[0]["jac"].numpy()
  assert np.abs(other - got[0]).max() > 1e-4  # replica 1's probes on replica 0's half differ


# --- the compiled step, XLA, the checks -------------------------------------------------------

def _step_gradients(d, x, y, jit):
  @tf.function(jit_compile=jit)
  def grads():
    with tf.GradientTape() as tape:
      loss = d.compute_total_loss(x, y, training=True, step=tf.constant(2, tf.int64))[0]
    return tape.gradient(loss, d.trained_variables)
  return [g.numpy() for g in grads() if g is not None]


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_fit_takes_a_compiled_step(digits_splits, estimator):
  info = digits_splits.info
  d = Distiller(
      helpers.tiny_vgg(info, "s"), helpers.tiny_vgg(info, "t"),
      hints=HintConfig.of([("act", 1.0), ("jac", 1.0), ("ce", 1.0)], jac_estimator=estimator,
                          jac_probes=2, jac_every=2))
  d.compile(optimizer=keras.optimizers.SGD(0.01))
  ds = tf.data.Dataset.from_tensor_slices(
      (digits_splits.train.images[:48], digits_splits.train.labels[:48])).batch(16)
  logs = d.fit(ds, epochs=1, verbose=0).history
  assert np.isfinite(logs["jac_loss"][0]) and logs["jac_loss"][0] > 0


def test_fd_step_is_the_same_under_xla(digits_splits):
  """fd needs first-order gradients only: XLA's step gradients equal the graph's on a
  max-pooling network (where backprop's second-order max-pool gradient differs). Up to float32
  rounding, which fd's differences amplify by 1/(2 eps): at eps 1e-2 the two agree to 1e-3;
  at the default 1e-3 a few elements differ by 0.5% (XLA fuses, so it rounds otherwise)."""
  info = digits_splits.info
  d = Distiller(
      helpers.tiny_vgg(info, "s"), helpers.tiny_vgg(info, "t"),
      hints=HintConfig.of([("act", 1.0), ("jac", 1.0), ("ce", 1.0)], jac_estimator="fd",
                          jac_target="all", jac_fd_eps=1e-2))
  x = tf.constant(digits_splits.train.images[:16])
  y = tf.constant(digits_splits.train.labels[:16])
  graph, xla = _step_gradients(d, x, y, False), _step_gradients(d, x, y, True)
  for g, h in zip(graph, xla):
    # atol: float32 rounding amplified by 1/(2 eps) = 50 reaches ~2e-5 of the largest entry
    # (seen in CI at 1.9e-5); backprop's max-pool error is far larger (the break below).
    np.testing.assert_allclose(h, g, rtol=1e-3, atol=1e-4 * np.abs(g).max())


def _validate(tmp_path, train=TrainConfig(), **hint_settings):
  checks.validate(Config(workdir=str(tmp_path), train=train,
                         hints=HintConfig(hints=("act", "jac", "ce"), **hint_settings)))


def test_checks(tmp_path):
  _validate(tmp_path, jac_estimator="fd", jac_target="all")
  _validate(tmp_path, jac_estimator="jvp", jac_probes=2)
  _validate(tmp_path, jac_estimator="jvp", jac_normalize=False)
  _validate(tmp_path, jac_estimator="fd", jac_target="all", train=TrainConfig(jit_compile=True))
  with pytest.raises(ConfigError, match="--jac_probes"):
    _validate(tmp_path, jac_estimator="jvp")  # label, one probe, normalised
  with pytest.raises(ConfigError, match="--jit_compile"):
    _validate(tmp_path, jac_estimator="jvp", jac_target="all",
              train=TrainConfig(jit_compile=True))
  with pytest.raises(ConfigError, match="--jac_estimator"):
    _validate(tmp_path, jac_estimator="reverse")
  with pytest.raises(ConfigError, match="--jac_fd_eps"):
    _validate(tmp_path, jac_estimator="fd", jac_target="all", jac_fd_eps=0.0)
  with pytest.raises(ConfigError, match="--mixed_precision"):
    checks.validate(Config(workdir=str(tmp_path), mixed_precision="mixed_bfloat16",
                           hints=HintConfig(jac_estimator="fd", jac_target="all")))
  with pytest.raises(ValueError, match="jac_probes >= 2"):
    _distiller("fd", normalize=True, target="label")
  settings = dataclasses.replace(HintConfig(), jac_estimator="fd")
  from tfjac.training import teacher_cache  # pylint: disable=g-import-not-at-top
  assert "probe" in teacher_cache.hints_blocker(settings.hints, "label", "fd")


def test_flags_reach_the_config_and_the_distiller():
  from tfjac import run  # pylint: disable=g-import-not-at-top
  with helpers.parsed_flags("--jac_estimator=fd", "--jac_probes=3", "--jac_probe=gaussian",
                            "--jac_fd_eps=0.005", "--mixed_precision=auto"):
    config = run.config_from_flags()
  h = config.hints
  assert (h.jac_estimator, h.jac_probes, h.jac_probe, h.jac_fd_eps) == ("fd", 3, "gaussian",
                                                                        0.005)
  assert config.mixed_precision == "auto"
  d = Distiller(_net("s", 1), _net("t", 2), hints=h)
  assert d.estimator == "fd" and d.settings.jac_probes == 3
  twin = d.with_hints([("jac", 1.0)])  # the lazy and validation twins keep the estimator
  assert twin.estimator == "fd" and twin.settings.jac_fd_eps == 0.005


def test_validation_runs_the_teacher_beside_the_student_under_an_estimator(digits_splits):
  """Cached validation teacher outputs would carry other probes than test_step draws (per
  batch and replica): under an estimator the Jacobian validation runs the teacher per batch;
  the validation without Jacobians keeps its cache."""
  from tfjac.training import evaluation  # pylint: disable=g-import-not-at-top
  info = digits_splits.info
  d = Distiller(
      helpers.tiny_vgg(info, "s"), helpers.tiny_vgg(info, "t"),
      hints=HintConfig.of([("act", 1.0), ("jac", 1.0)], jac_estimator="jvp", jac_target="all"))
  split = digits_splits.validation
  with_jac = evaluation.validation_pipeline(d, split, 16)
  cheap = evaluation.validation_pipeline(d.with_hints([("act", 1.0)]), split, 16)
  assert len(next(iter(with_jac))) == 2 and len(next(iter(cheap))) == 3
  d.compile()
  logs = d.evaluate(with_jac, verbose=0, return_dict=True)
  assert np.isfinite(logs["jac_loss"]) and logs["jac_loss"] > 0


def test_jacnorm_is_unbiased_too(float64):
  """jacnorm's part is quadratic in the Jacobian: the mean over probes of the estimator's
  term is backprop's term over every output (no teacher)."""
  from tfjac.hints import HintParams  # pylint: disable=g-import-not-at-top
  x, y = _batch()
  d = _distiller("jvp", probes=200, hints=("jacnorm",))
  exact = Distiller(d.student, None, hints=dataclasses.replace(d.settings,
                                                               jac_estimator="backprop"))
  p = HintParams(noise_sigma=1.0)
  want = exact._hints["jacnorm"].loss(  # pylint: disable=protected-access
      exact.per_example_terms(x, y, training=True, step=0)[3], p).numpy()
  draws = np.stack([d._hints["jacnorm"].loss(  # pylint: disable=protected-access
      d.per_example_terms(x, y, training=True, step=s)[3], p).numpy() for s in range(12)])
  mean, error = draws.mean(0), draws.std(0, ddof=1) / np.sqrt(len(draws))
  assert np.all(np.abs(mean - want) < 5 * error + 1e-9), (mean, want, error)
  np.testing.assert_allclose(mean, want, rtol=0.05)


def _exact_output_jacobians(model, x, output, training):
  """[B, C, D] Jacobians of softmax / log_softmax of the logits (batch statistics held)."""
  from tfjac.hints import jacobians  # pylint: disable=g-import-not-at-top
  with tf.GradientTape() as tape:
    tape.watch(x)
    with holding_batch_statistics(tape):
      values = jacobians.OUTPUTS[output](model(x, training=training))
  full = tf.reshape(tape.jacobian(values, x), [B, C, B, -1]).numpy()
  return np.stack([full[i, :, i] for i in range(B)])


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_jac_ce_sketches_are_those_of_its_outputs(float64, estimator):
  """jac_ce reads the teacher's probabilities and the student's log-probabilities: their
  sketches are J u of those outputs (so its bilinear term is unbiased as jac's is)."""
  d = _distiller(estimator, probes=2, hints=("jac_ce",))
  x, y = _batch()
  directions = d._probe_directions(x, 0)  # pylint: disable=protected-access
  want_s = _exact_sketch(_exact_output_jacobians(d.student, x, "log_probabilities", True),
                         directions)
  want_t = _exact_sketch(_exact_output_jacobians(d.teacher, x, "probabilities", False),
                         directions)
  inputs = d.per_example_terms(x, y, training=True, step=0)[3]
  tol = 1e-10 if estimator == "jvp" else 1e-6
  for got, want in ((inputs.student_jacobians["log_probabilities"], want_s),
                    (inputs.teacher_jacobians["probabilities"], want_t)):
    np.testing.assert_allclose(got.numpy(), want, atol=tol * np.abs(want).max())


@pytest.mark.parametrize("estimator", ["jvp", "fd"])
def test_noise_beside_an_estimator_reuses_the_clean_statistics(float64, estimator):
  """The estimators' clean pass records the batch statistics in its own block; they reach the
  step's block, where the noise hint's copies read them (models/layers.py, nested blocks)."""
  from tfjac.hints import HintParams  # pylint: disable=g-import-not-at-top
  x, y = _batch()
  d = _distiller(estimator, probes=2, hints=("jac", "noise"))
  d.params = HintParams(noise_sigma=0.1, noise_samples=2, jac_estimator=estimator,
                        jac_normalize=False)
  terms = d.per_example_terms(x, y, training=True, step=0)[0]
  assert np.all(np.isfinite(terms["noise"].numpy())) and np.all(terms["noise"].numpy() > 0)
