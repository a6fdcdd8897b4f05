"""Per-example Jacobians under BatchNorm, and the Jacobian targets."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import models
from tfjac.hints import jacobians
from tfjac.models import holding_batch_statistics
from tfjac.training.distiller import Distiller

B = 6


def _net(digits_splits):
  info = digits_splits.info
  return models.build("vgg4", info.image_shape, 10, mean=info.mean, std=info.std, width=0.25)


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
    selected = jacobians.select(logits, target)
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
  d = Distiller(student, _net(digits_splits), hints=[("jac", 1.0)], bn_policy="batch_stats")
  _, jac = d.student_pass(x, y, training=True)
  np.testing.assert_allclose(jac.numpy(), full[np.arange(B), np.arange(B)], rtol=1e-4,
                             atol=1e-6)


def test_inference_policy_jacobian_does_not_depend_on_the_rest_of_the_batch(digits_splits):
  student = _net(digits_splits)
  d = Distiller(student, _net(digits_splits), hints=[("jac", 1.0)], bn_policy="inference")
  for _ in range(3):  # move the BatchNorm statistics away from their initial values
    d.student_pass(_batch(digits_splits, 50)[0], _batch(digits_splits, 50)[1], training=True)
  x, y = _batch(digits_splits)
  x_other = tf.concat([x[:1], _batch(digits_splits, 100)[0][1:]], axis=0)
  y_other = tf.concat([y[:1], _batch(digits_splits, 100)[1][1:]], axis=0)
  state = student.get_weights()  # each training pass moves the statistics: start equal

  def jac(x, y):
    student.set_weights(state)
    return d.student_pass(x, y, training=True)[1].numpy()

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


def test_targets():
  labels = tf.constant([3, 1, 4, 1])
  t_logits = tf.constant(np.eye(5, dtype=np.float32)[[0, 2, 2, 4]])
  kw = dict(labels=labels, teacher_logits=t_logits, num_classes=5)
  seed = tf.constant([0, 7], tf.int64)
  np.testing.assert_array_equal(jacobians.JACOBIAN_TARGETS["label"](seed=seed, **kw), labels)
  np.testing.assert_array_equal(jacobians.JACOBIAN_TARGETS["teacher_top1"](seed=seed, **kw),
                                [0, 2, 2, 4])
  r1 = jacobians.JACOBIAN_TARGETS["random"](seed=seed, **kw).numpy()
  r2 = jacobians.JACOBIAN_TARGETS["random"](seed=seed, **kw).numpy()
  np.testing.assert_array_equal(r1, r2)
  assert r1.min() >= 0 and r1.max() < 5
  many = jacobians.JACOBIAN_TARGETS["random"](
      labels=tf.zeros([2000], tf.int32), teacher_logits=None, num_classes=5, seed=seed).numpy()
  assert set(np.unique(many)) == set(range(5))


@pytest.mark.parametrize("target", ["teacher_top1", "random"])
def test_student_and_teacher_use_the_same_target(digits_splits, target):
  x, y = _batch(digits_splits)
  teacher = _net(digits_splits)
  d = Distiller(_net(digits_splits), teacher, hints=[("jac", 1.0)], jac_target=target)
  t_logits, t_jac, chosen = d.teacher_pass(x, y, step=3)
  expected, _ = jacobians.selected_output_jacobian(teacher, x, chosen)
  np.testing.assert_allclose(t_jac, expected, rtol=1e-5, atol=1e-7)
  if target == "teacher_top1":
    np.testing.assert_array_equal(chosen, np.argmax(t_logits, -1))
