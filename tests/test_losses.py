"""Each loss against a hand computation, and the Jacobian term reaching the student's weights."""
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import linear_model
from tfjac.config import HintConfig
from tfjac.hints import HintParams, losses
from tfjac.training.distiller import Distiller
from tests import helpers

T = np.array([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]], np.float32)
S = np.array([[1.0, 0.0, 0.5], [1.0, 1.0, 1.0]], np.float32)


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_cross_entropy_by_hand():
  labels = np.array([0, 2])
  expected = -_log_softmax(S)[[0, 1], labels]
  np.testing.assert_allclose(losses.cross_entropy(labels=labels, student_logits=S), expected,
                             rtol=1e-6)


def test_activation_matching_by_hand():
  # Example 0: (2-1)^2 + (-1-0)^2 + 0 = 2; example 1: 1 + 4 + 9 = 14.
  np.testing.assert_allclose(losses.activation_matching(teacher_logits=T, student_logits=S),
                             [2.0, 14.0])


def test_soft_targets_by_hand():
  tau = 2.0
  p, log_p, log_q = np.exp(_log_softmax(T / tau)), _log_softmax(T / tau), _log_softmax(S / tau)
  expected = (p * (log_p - log_q)).sum(-1) * tau ** 2
  got = losses.soft_target_distillation(teacher_logits=T, student_logits=S, temperature=tau)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  assert np.all(got.numpy() >= 0)
  np.testing.assert_allclose(
      losses.soft_target_distillation(teacher_logits=T, student_logits=T, temperature=tau),
      [0, 0], atol=1e-6)


def test_jacobian_matching_by_hand():
  jt = np.array([[3.0, 4.0], [1.0, 0.0]], np.float32)
  js = np.array([[0.0, 2.0], [0.0, 5.0]], np.float32)
  # Normalised: [0.6, 0.8] vs [0, 1] -> 0.36 + 0.04 = 0.4; [1, 0] vs [0, 1] -> 2.
  np.testing.assert_allclose(
      losses.jacobian_matching(teacher_jacobian=jt, student_jacobian=js), [0.4, 2.0], rtol=1e-5)
  # Raw: (3^2 + 2^2) = 13; (1 + 25) = 26. Summed over D, not averaged.
  np.testing.assert_allclose(
      losses.jacobian_matching(teacher_jacobian=jt, student_jacobian=js, normalize=False),
      [13.0, 26.0])


def test_zero_jacobian_gives_no_nan():
  js = tf.Variable(np.zeros((2, 4), np.float32))
  jt = tf.constant(np.zeros((2, 4), np.float32))
  with tf.GradientTape() as tape:
    value = losses.jacobian_matching(teacher_jacobian=jt, student_jacobian=js)
  grad = tape.gradient(value, js)
  assert np.all(np.isfinite(value.numpy())) and np.all(np.isfinite(grad.numpy()))
  np.testing.assert_allclose(value, [0.0, 0.0])


# A linear model's input Jacobian for output k is column k of its weight matrix (D = 4 inputs).
W_T = np.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0], [2.0, 0.0, -1.0], [0.0, 3.0, 1.0]], np.float32)
W_S = np.array([[0.5, 1.0, 0.0], [1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 0.0, 2.0]], np.float32)
X = np.arange(8, dtype=np.float32).reshape(2, 2, 2, 1) / 8.0
Y = np.array([0, 2], np.int32)


def _distiller(hints, normalize=True, target="label"):
  return Distiller(
      linear_model(W_S, name="student"), linear_model(W_T, name="teacher"),
      hints=HintConfig.of(hints, jac_normalize=normalize, jac_target=target))


def test_linear_jacobians_are_weight_columns():
  d = _distiller([("jac", 1.0)])
  _, selection, t_jacs = d.teacher_pass(tf.constant(X), tf.constant(Y), step=0)[:3]
  _, _, s_jacs = d.student_pass(tf.constant(X), tf.constant(Y), selection, 0, training=True)
  np.testing.assert_array_equal(np.argmax(selection[:, 0], -1), Y)
  np.testing.assert_allclose(t_jacs["logits"][:, 0], W_T[:, Y].T)
  np.testing.assert_allclose(s_jacs["logits"][:, 0], W_S[:, Y].T)


@pytest.mark.parametrize("normalize", [True, False])
def test_jacobian_term_on_linear_models_by_hand(normalize):
  d = _distiller([("jac", 1.0)], normalize=normalize)
  terms, total, _, _ = d.per_example_terms(tf.constant(X), tf.constant(Y), training=True, step=0)
  jt, js = W_T[:, Y].T, W_S[:, Y].T
  if normalize:
    jt = jt / np.linalg.norm(jt, axis=1, keepdims=True)
    js = js / np.linalg.norm(js, axis=1, keepdims=True)
  expected = ((jt - js) ** 2).sum(1)
  np.testing.assert_allclose(terms["jac"], expected, rtol=1e-5)
  np.testing.assert_allclose(total, expected, rtol=1e-5)


def _student_kernel_grad(distiller):
  kernel = distiller.student.get_layer("logits").kernel
  with tf.GradientTape() as tape:
    loss, *_ = distiller.compute_total_loss(tf.constant(X), tf.constant(Y), training=True,
                                            step=0)
  return tape.gradient(loss, kernel)


def test_jacobian_term_reaches_student_weights_by_double_backprop():
  # Raw jac loss on linear models: L = mean_b ||W_T[:, y_b] - W_S[:, y_b]||^2, so
  # dL/dW_S[:, k] = -2/B * sum_{b: y_b = k} (W_T[:, k] - W_S[:, k]) and 0 for other columns.
  # A Jacobian taken outside the weight tape (or stop_gradient-ed) gives None or zeros here.
  grad = _student_kernel_grad(_distiller([("jac", 1.0)], normalize=False))
  assert grad is not None
  expected = np.zeros_like(W_S)
  for k in Y:
    expected[:, k] = -2.0 / len(Y) * (W_T[:, k] - W_S[:, k])
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6)


def test_jacobian_term_changes_weight_gradients_of_a_conv_student(digits_splits):
  info = digits_splits.info
  x = tf.constant(digits_splits.train.images[:16])
  y = tf.constant(digits_splits.train.labels[:16])
  keras.utils.set_random_seed(1)
  teacher, student = helpers.tiny_vgg(info), helpers.tiny_vgg(info)
  grads = {}
  for hints in ((("act", 1.0), ("ce", 1.0)), (("act", 1.0), ("jac", 1.0), ("ce", 1.0))):
    d = Distiller(student, teacher, hints=hints)
    with tf.GradientTape() as tape:
      loss, *_ = d.compute_total_loss(x, y, training=True, step=0)
    grads[len(hints)] = tape.gradient(loss, student.trainable_variables)
  first_conv = [i for i, v in enumerate(student.trainable_variables) if "conv" in v.path][0]
  diff = np.abs(grads[3][first_conv].numpy() - grads[2][first_conv].numpy()).max()
  assert diff > 1e-4, "the Jacobian term did not change the first conv layer's gradient"


def test_attention_transfer_reaches_the_student_weights():
  # float64 conv nets; the at term's gradient w.r.t. the student's conv kernel is not zero and
  # equals central finite differences of the loss; its value equals a numpy hand computation.
  from tfjac.models import views  # pylint: disable=g-import-not-at-top
  keras.backend.set_floatx("float64")
  try:
    def net(seed, name):
      keras.utils.set_random_seed(seed)
      inputs = keras.Input((4, 4, 1), dtype="float64")
      h = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="conv",
                              dtype="float64")(inputs)
      h = keras.layers.GlobalAveragePooling2D(dtype="float64")(h)
      return keras.Model(inputs, keras.layers.Dense(2, dtype="float64", name="logits")(h),
                         name=name)
    teacher, student = net(1, "teacher"), net(2, "student")
    d = Distiller(student, teacher, hints=[("at", 1.0)],
                  student_view=views.make_view(student, feature_layers=["conv"]),
                  teacher_view=views.make_view(teacher, feature_layers=["conv"]))
    x = tf.constant(np.random.default_rng(0).random((3, 4, 4, 1)))
    y = tf.constant([0, 1, 0])

    def loss():
      return d.compute_total_loss(x, y, training=True, step=0)[0]

    def q(model):  # the normalised attention map, by hand
      feats = keras.Model(model.inputs, model.get_layer("conv").output)(x).numpy()
      a = (feats ** 2).mean(-1).reshape(3, -1)
      return a / np.linalg.norm(a, axis=1, keepdims=True)
    np.testing.assert_allclose(float(loss()), ((q(student) - q(teacher)) ** 2).mean(1).mean(),
                               rtol=1e-6)
    kernel = student.get_layer("conv").kernel
    with tf.GradientTape() as tape:
      value = loss()
    grad = tape.gradient(value, kernel).numpy()
    assert np.abs(grad).max() > 1e-4
    numeric = helpers.finite_difference_gradient(loss, kernel)
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-9)
  finally:
    keras.backend.set_floatx("float32")


def test_one_settings_object_reaches_the_distiller_as_the_short_form_does():
  """A run's HintConfig (config.hints) and the Python API's short form (HintConfig.of:
  {name: weight} and the other settings by name) give the Distiller the same hints, weights,
  loss parameters, Jacobian target options and BatchNorm policy; its twins (with_hints) keep
  every setting but the hints."""
  from tfjac.hints.jacobians import TargetOptions  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  teacher = linear_model(rng.normal(size=(4, 3)), name="t")
  student = linear_model(rng.normal(size=(4, 3)), name="s")
  params = HintParams(kd_temperature=7.0, jac_normalize=False, lwf_match="act",
                      noise_sigma=0.3, noise_samples=9)
  settings = HintConfig(hints=("ce", "jac", "kd"), weights=(("jac", 0.5), ("kd", 2.0)),
                        jac_target="top_k", jac_top_k=2, jac_projections=3,
                        jac_bn_policy="inference", **{k: getattr(params, k) for k in (
                            "kd_temperature", "jac_normalize", "lwf_match", "noise_sigma",
                            "noise_samples")})
  by_config = Distiller(student, teacher, hints=settings)
  by_keywords = Distiller(student, teacher, hints=HintConfig.of(
      {"ce": 1, "jac": 0.5, "kd": 2}, **dataclasses.asdict(params), jac_target="top_k",
      jac_top_k=2, jac_projections=3, jac_bn_policy="inference"))
  for d in (by_config, by_keywords):
    assert d.hint_weights == (("ce", 1.0), ("jac", 0.5), ("kd", 2.0))
    assert d.params == params
    assert (d.jac_target, d._target_options, d.bn_policy) == (  # pylint: disable=protected-access
        "top_k", TargetOptions(3, 2, 3), "inference")
  assert by_config.settings == settings  # ce unlisted in its weights: weight 1
  assert by_keywords.settings == dataclasses.replace(settings,
                                                     weights=(("ce", 1.0),) + settings.weights)
  # One setting of a HintConfig changed, the rest kept.
  one = Distiller(student, teacher, hints=dataclasses.replace(settings, jac_top_k=1))
  assert one._target_options == TargetOptions(3, 1, 3)  # pylint: disable=protected-access
  twin = by_config.with_hints([("kd", 4.0)])
  assert twin.hint_weights == (("kd", 4.0),) and twin.params == params
  assert twin.settings == dataclasses.replace(settings, hints=("kd",), weights=(("kd", 4.0),))
  options = twin._target_options  # pylint: disable=protected-access
  assert (twin.jac_target, options, twin.bn_policy) == ("top_k", TargetOptions(3, 2, 3),
                                                        "inference")
  # And the settings are what the losses compute with: jac_normalize=False is the raw form.
  x, labels = tf.constant(rng.random((2, 2, 2, 1), np.float32)), tf.constant([0, 1])
  terms = lambda d: d.per_example_terms(x, labels, training=False, step=0)[0]  # noqa: E731
  raw = Distiller(student, teacher, hints=HintConfig(hints=("jac",), jac_normalize=False))
  normalised = Distiller(student, teacher, hints=HintConfig(hints=("jac",)))
  np.testing.assert_allclose(
      terms(raw)["jac"],
      terms(Distiller(student, teacher, hints=HintConfig.of({"jac": 1},
                                                            jac_normalize=False)))["jac"])
  assert not np.allclose(terms(raw)["jac"], terms(normalised)["jac"])
