"""Per-example loss terms of knowledge transfer (method.md). Each returns a [batch] vector;
one place (the training step) reduces them over the global batch."""
import tensorflow as tf

JACOBIAN_EPS = 1e-12


def cross_entropy(*, labels, student_logits):
  """Softmax cross-entropy on integer labels."""
  return tf.nn.sparse_softmax_cross_entropy_with_logits(
      labels=tf.cast(labels, tf.int32), logits=student_logits)


def activation_matching(*, teacher_logits, student_logits):
  """sum_i (T_i(x) - S_i(x))^2 over the outputs (logits)."""
  return tf.reduce_sum(tf.square(teacher_logits - student_logits), axis=-1)


def soft_target_distillation(*, teacher_logits, student_logits, temperature):
  """Hinton et al.: KL(softmax(T/tau) || softmax(S/tau)) * tau^2."""
  t_log_p = tf.nn.log_softmax(teacher_logits / temperature, axis=-1)
  s_log_p = tf.nn.log_softmax(student_logits / temperature, axis=-1)
  return tf.reduce_sum(tf.exp(t_log_p) * (t_log_p - s_log_p), axis=-1) * temperature ** 2


def _unit(jacobian):
  # sqrt(sum + eps) instead of a norm: a zero Jacobian gives a zero vector and finite gradients.
  norm = tf.sqrt(tf.reduce_sum(tf.square(jacobian), axis=-1, keepdims=True) + JACOBIAN_EPS)
  return jacobian / norm


def jacobian_matching(*, teacher_jacobian, student_jacobian, normalize=True):
  """|| J_T/||J_T|| - J_S/||J_S|| ||^2 (or ||J_T - J_S||^2), summed over the D input dims.

  Jacobians are [batch, D] (flattened per example). The sum, not a mean, over D: a per-pixel
  mean would silently divide the hint's weight by D (3072 on CIFAR).
  """
  if normalize:
    teacher_jacobian, student_jacobian = _unit(teacher_jacobian), _unit(student_jacobian)
  return tf.reduce_sum(tf.square(teacher_jacobian - student_jacobian), axis=-1)
