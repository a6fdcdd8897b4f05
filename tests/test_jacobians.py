"""Per-example Jacobians under BatchNorm, and the Jacobian targets."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac.config import HintConfig
from tfjac.hints import jacobians
from tfjac.models import holding_batch_statistics
from tfjac.training.distiller import Distiller
from tests import helpers

B = 6


def _net(digits_splits):
  info = digits_splits.info
  return helpers.tiny_vgg(info)


def _batch(digits_splits, start=0):
  return (tf.constant(digits_splits.train.images[start:start + B]),
          tf.constant(digits_splits.train.labels[start:start + B]))


def _full_jacobian(model, x, target, hold):
  """J[i, j] = d model(x)[i, target_i] / d x_j (training mode), as [B, B, D]."""
  with tf.GradientTape() as tape:
    tape.watch(x)
    if hold:
      with holding_batch_statistics(tape):
        logits = model(x, training=True)
    else:
      logits = model(x, training=True)
    selected = tf.gather(logits, target, axis=1, batch_dims=1)
  return tf.reshape(tape.jacobian(selected, x), [B, B, -1]).numpy()


def test_training_mode_batchnorm_couples_examples_without_the_policy(digits_splits):
  # Negative control: this is what the policies prevent.
  x, y = _batch(digits_splits)
  full = _full_jacobian(_net(digits_splits), x, y, hold=False)
  off_diagonal = full[~np.eye(B, dtype=bool)]
  assert np.abs(off_diagonal).max() > 1e-3


def test_batch_stats_policy_gives_per_example_jacobians(digits_splits):
  x, y = _batch(digits_splits)
  student = _net(digits_splits)
  full = _full_jacobian(student, x, y, hold=True)
  np.testing.assert_allclose(full[~np.eye(B, dtype=bool)], 0.0, atol=1e-7)
  d = Distiller(student, _net(digits_splits), hints=HintConfig.of([("jac", 1.0)],
                                                                  jac_bn_policy="batch_stats"))
  _, _, jacs = d.student_pass(x, y, None, 0, training=True)
  np.testing.assert_allclose(jacs["logits"][:, 0].numpy(), full[np.arange(B), np.arange(B)],
                             rtol=1e-4, atol=1e-6)


def test_inference_policy_jacobian_does_not_depend_on_the_rest_of_the_batch(digits_splits):
  student = _net(digits_splits)
  d = Distiller(student, _net(digits_splits), hints=HintConfig.of([("jac", 1.0)],
                                                                  jac_bn_policy="inference"))
  for _ in range(3):  # move the BatchNorm statistics away from their initial values
    d.student_pass(*_batch(digits_splits, 50), None, 0, training=True)
  x, y = _batch(digits_splits)
  x_other = tf.concat([x[:1], _batch(digits_splits, 100)[0][1:]], axis=0)
  y_other = tf.concat([y[:1], _batch(digits_splits, 100)[1][1:]], axis=0)
  state = student.get_weights()  # each training pass moves the statistics: start equal

  def jac(x, y):
    student.set_weights(state)
    return d.student_pass(x, y, None, 0, training=True)[2]["logits"][:, 0].numpy()

  jac_a = jac(x, y)
  np.testing.assert_allclose(jac_a[0], jac(x_other, y_other)[0], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(jac_a[0], jac(x[:1], y[:1])[0], rtol=1e-5, atol=1e-7)


def test_batch_stats_policy_keeps_the_full_batchnorm_gradient_for_weights(digits_splits):
  # The held statistics are hidden from the input-gradient tape only: the weight gradient of a
  # logit-based loss is the same as without the policy.
  x, y = _batch(digits_splits)
  student = _net(digits_splits)
  grads = []
  for hold in (False, True):
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        inner.watch(x)
        if hold:
          with holding_batch_statistics(inner):
            logits = student(x, training=True)
        else:
          logits = student(x, training=True)
      loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y, logits))
    grads.append(outer.gradient(loss, student.trainable_variables))
  for a, b in zip(*grads):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _select(name, labels, reference, seed=(0, 7), **options):
  opts = jacobians.TargetOptions(num_classes=reference.shape[-1], **options)
  return jacobians.TARGETS[name].select(labels=labels, reference_logits=reference,
                                        seed=tf.constant(seed, tf.int64), options=opts).numpy()


def test_class_targets():
  labels = tf.constant([3, 1, 4, 1])
  reference = tf.constant(np.eye(5, dtype=np.float32)[[0, 2, 2, 4]] +
                          0.5 * np.eye(5, dtype=np.float32)[[1, 1, 3, 0]])
  index = lambda sel: np.argmax(sel, -1)  # noqa: E731
  np.testing.assert_array_equal(index(_select("label", labels, reference))[:, 0], [3, 1, 4, 1])
  np.testing.assert_array_equal(index(_select("teacher_top1", labels, reference))[:, 0],
                                [0, 2, 2, 4])
  np.testing.assert_array_equal(index(_select("top_k", labels, reference, top_k=2)),
                                [[0, 1], [2, 1], [2, 3], [4, 0]])
  np.testing.assert_array_equal(_select("all", labels, reference),
                                np.tile(np.eye(5)[None], [4, 1, 1]))
  r1, r2 = _select("random", labels, reference), _select("random", labels, reference)
  np.testing.assert_array_equal(r1, r2)
  many = _select("random", tf.zeros([2000], tf.int32), tf.zeros([2000, 5]))
  assert set(np.unique(index(many))) == set(range(5))


@pytest.mark.parametrize("target", ["teacher_top1", "random", "top_k", "all"])
def test_student_and_teacher_use_the_same_target(digits_splits, target):
  x, y = _batch(digits_splits)
  teacher = _net(digits_splits)
  d = Distiller(
      _net(digits_splits), teacher, hints=HintConfig.of([("jac", 1.0)], jac_target=target,
                                                        jac_top_k=3))
  t_logits, selection, t_jacs = d.teacher_pass(x, y, step=3)[:3]
  # Reference without jacobians_of: every output's input-gradient (batch_jacobian, inference
  # mode: the examples are independent), contracted with the selection in numpy.
  with tf.GradientTape() as tape:
    tape.watch(x)
    all_logits = teacher(x, training=False)
  every = tf.reshape(tape.batch_jacobian(all_logits, x), [B, all_logits.shape[-1], -1])
  expected = np.einsum("bkc,bcd->bkd", selection.numpy(), every.numpy())
  np.testing.assert_allclose(t_jacs["logits"], expected, rtol=1e-5, atol=1e-7)
  if target == "teacher_top1":
    np.testing.assert_array_equal(np.argmax(selection[:, 0], -1), np.argmax(t_logits, -1))
  # The student's pass (training mode, as in a step) returns the teacher's selection and the
  # Jacobians of the same classes: row k of example i is d S[i, c_ik] / d x_i, with c_ik the
  # class the teacher's row k selected, taken here one class at a time by tf.gather.
  student = d.student
  state = student.get_weights()
  _, s_selection, s_jacs = d.student_pass(x, y, selection, 3, training=True)
  np.testing.assert_array_equal(s_selection, selection)
  classes = np.argmax(selection.numpy(), -1)  # [B, K]
  assert s_jacs["logits"].shape == (B, classes.shape[1], 64)
  # Reference without holding_batch_statistics: the batch's moments at every BatchNorm,
  # computed in numpy from the training-mode forward pass, put in the moving statistics; the
  # network in inference mode is then the function with the batch statistics held, and its
  # per-example Jacobian (batch_jacobian) the reference.
  student.set_weights(state)  # the training pass moved the moving statistics only
  bns = [l for l in student.layers if isinstance(l, keras.layers.BatchNormalization)]
  assert bns
  inputs = keras.Model(student.inputs, [l.input for l in bns])(x, training=True)
  for layer, h in zip(bns, inputs if isinstance(inputs, (list, tuple)) else [inputs]):
    h = h.numpy().astype(np.float64)
    axes = tuple(range(h.ndim - 1))
    layer.moving_mean.assign(h.mean(axes))
    layer.moving_variance.assign(h.var(axes))
  with tf.GradientTape() as tape:
    tape.watch(x)
    logits = student(x, training=False)
  every = tf.reshape(tape.batch_jacobian(logits, x), [B, logits.shape[-1], -1]).numpy()
  for k in range(classes.shape[1]):
    reference = every[np.arange(B), classes[:, k]]
    np.testing.assert_allclose(s_jacs["logits"][:, k], reference, rtol=1e-4, atol=1e-6)
  student.set_weights(state)


@pytest.mark.parametrize("target, k", [("top_k", 3), ("all", 10)])
def test_multi_target_jacobians_equal_stacked_single_target_jacobians(digits_splits, target, k):
  x, y = _batch(digits_splits)
  teacher, student = _net(digits_splits), _net(digits_splits)
  d = Distiller(student, teacher, hints=HintConfig.of([("jac", 1.0)], jac_target=target,
                                                      jac_top_k=k))
  _, selection, t_jacs = d.teacher_pass(x, y, step=0)[:3]
  _, _, s_jacs = d.student_pass(x, y, selection, 0, training=False)
  assert t_jacs["logits"].shape == (B, k, 64)
  classes = np.argmax(selection.numpy(), -1)  # [B, k]
  for i in range(k):
    single = Distiller(student, teacher, hints=HintConfig.of([("jac", 1.0)], jac_target="label"))
    _, sel_i, t_i = single.teacher_pass(x, tf.constant(classes[:, i]), step=0)[:3]
    _, _, s_i = single.student_pass(x, tf.constant(classes[:, i]), sel_i, 0, training=False)
    np.testing.assert_allclose(t_jacs["logits"][:, i], t_i["logits"][:, 0], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(s_jacs["logits"][:, i], s_i["logits"][:, 0], rtol=1e-5,
                               atol=1e-7)


def test_projection_estimates_the_squared_frobenius_norm():
  from tests.helpers import linear_model  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  w = rng.normal(size=(4, 6)).astype(np.float32)  # D = 4 inputs, C = 6 outputs
  model = linear_model(w)
  x = tf.constant(rng.random((1, 2, 2, 1), np.float32))
  opts = jacobians.TargetOptions(num_classes=6, projections=2)
  estimates = []
  for draw in range(3000):
    sel = jacobians.TARGETS["projection"].select(
        labels=tf.zeros([1], tf.int32), reference_logits=None,
        seed=tf.constant([draw, 1], tf.int64), options=opts)
    jac, _ = jacobians.selected_jacobians(model, x, sel)
    estimates.append(float(tf.reduce_sum(tf.square(jac["logits"]))))
  exact = float((w ** 2).sum())
  mean, err = np.mean(estimates), np.std(estimates) / np.sqrt(len(estimates))
  assert abs(mean - exact) < 4 * err, (mean, exact, err)
  assert np.std(estimates) > 0.1 * exact  # it is an estimate, not the exact value


def test_batch_stats_jacobian_against_finite_differences_with_statistics_fixed_by_hand():
  # An independent reference: the batch mean/variance of every BatchNorm layer computed in numpy,
  # the function of ONE example with those constants, central differences in float64.
  from tests import helpers_bn  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x = rng.random((B, 2, 2, 2)).astype(np.float32)  # D = 8
  student = helpers_bn.bn_network(rng, x, hidden=(5, 4), classes=3, activation="tanh")
  teacher = helpers_bn.bn_network(rng, x, hidden=(3,), classes=3, activation="tanh",
                                  name="teacher")
  stats = helpers_bn.batch_statistics(student, x)
  flat = x.reshape(B, -1).astype(np.float64)
  numeric = np.zeros((B, flat.shape[1], 3))
  for i in range(B):
    for j in range(flat.shape[1]):
      step = np.zeros_like(flat[i:i + 1])
      step[0, j] = 1e-5
      numeric[i, j] = (helpers_bn.forward(student, flat[i:i + 1] + step, stats)
                       - helpers_bn.forward(student, flat[i:i + 1] - step, stats))[0] / 2e-5
  np.testing.assert_allclose(helpers_bn.jacobian(student, x, stats), numeric, rtol=1e-6,
                             atol=1e-8)  # the numpy chain rule agrees: used in other tests
  d = Distiller(student, teacher, hints=HintConfig.of([("jac", 1.0)], jac_target="all",
                                                      jac_bn_policy="batch_stats"))
  _, _, jacs = d.student_pass(tf.constant(x), tf.zeros([B], tf.int32), None, 0, training=True)
  got = np.transpose(jacs["logits"].numpy(), [0, 2, 1])  # [B, C, D] -> [B, D, C]
  np.testing.assert_allclose(got, numeric, rtol=1e-4, atol=1e-5)
