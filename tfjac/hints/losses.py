"""Per-example loss terms of knowledge transfer (method.md). Each returns a [batch] vector;
one place (the training step) reduces them over the global batch.

Jacobians are [batch, K, D]: K selected outputs per example (see jacobians.py), each flattened
over the D input dimensions. Sums run over K and D (a per-pixel mean would silently divide a
hint's weight by D, 3072 on CIFAR).
"""
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


def _rows(jacobian):
  jacobian = tf.convert_to_tensor(jacobian)
  return jacobian[:, None, :] if jacobian.shape.rank == 2 else jacobian


def jacobian_matching(*, teacher_jacobian, student_jacobian, normalize=True):
  """sum_k || J_T,k/||J_T,k|| - J_S,k/||J_S,k|| ||^2, or sum_k ||J_T,k - J_S,k||^2 raw.

  Takes [batch, K, D] (or [batch, D] for one output). With every class selected, the raw form
  is ||J_T - J_S||_F^2, the term of the noise expansion.
  """
  teacher_jacobian, student_jacobian = _rows(teacher_jacobian), _rows(student_jacobian)
  if normalize:
    teacher_jacobian, student_jacobian = _unit(teacher_jacobian), _unit(student_jacobian)
  return tf.reduce_sum(tf.square(teacher_jacobian - student_jacobian), axis=[1, 2])


def jacobian_cross_entropy(*, teacher_probabilities, student_log_probabilities,
                           teacher_probability_jacobian, student_log_probability_jacobian,
                           sigma):
  """The poster's CE form, summed over the selected classes s:
  -T_s log S_s - sigma^2 (grad T_s . grad S_s) / S_s, with grad S_s / S_s = grad log S_s.

  Probabilities are [batch, K] (the selected classes), Jacobians [batch, K, D].

  A truncation, not the second-order expansion: with f_s = -T_s log S_s,
  E_xi[f_s(x+xi)] = f_s - sigma^2 grad T_s . grad log S_s
                    - sigma^2/2 (log S_s lap T_s + T_s lap log S_s) + O(sigma^4),
  (lap: the Laplacian in x), and the poster's form drops the last (curvature) terms, which are
  of the same order (tests/test_equivalences.py measures them). It is unbounded below: the
  student lowers -sigma^2 grad T_s . grad log S_s without limit by growing its input gradient
  along the teacher's, and the dropped -sigma^2/2 T_s lap log S_s (>= 0 summed over classes for
  a linear student) is what would bound the real noisy cross-entropy. In practice ce beside it
  and a small sigma^2 * weight keep it bounded (docs/results-noise.md,
  docs/results/jac_ce_boundedness.json).
  """
  first = -tf.reduce_sum(teacher_probabilities * student_log_probabilities, axis=-1)
  second = tf.reduce_sum(teacher_probability_jacobian * student_log_probability_jacobian,
                         axis=[1, 2])
  return first - sigma ** 2 * second


def jacobian_norm(*, student_jacobian, sigma):
  """sigma^2 * sum_k ||dS_k/dx||^2: Jacobian-norm regularisation (no teacher)."""
  return sigma ** 2 * tf.reduce_sum(tf.square(_rows(student_jacobian)), axis=[1, 2])


def _noisy_copies(x, sigma, samples, seed):
  """[samples * batch, ...]: `samples` Gaussian-noised copies of x (sample-major)."""
  tiled = tf.tile(x, tf.concat([[samples], tf.ones([tf.rank(x) - 1], tf.int32)], axis=0))
  return tiled + sigma * tf.random.stateless_normal(tf.shape(tiled), seed=seed, dtype=x.dtype)


def _mean_over_samples(per_copy, samples):
  return tf.reduce_mean(tf.reshape(per_copy, [samples, -1]), axis=0)


def noise_matching(*, teacher_fn, student_fn, x, sigma, samples, seed):
  """Monte-Carlo E_xi[sum_i (T_i(x+xi) - S_i(x+xi))^2], xi ~ N(0, sigma^2 I), `samples` draws."""
  noisy = _noisy_copies(x, sigma, samples, seed)
  t = tf.stop_gradient(teacher_fn(noisy))
  return _mean_over_samples(activation_matching(teacher_logits=t,
                                                student_logits=student_fn(noisy)), samples)


def noisy_cross_entropy(*, student_fn, x, labels, sigma, samples, seed):
  """Monte-Carlo E_xi[CE(y, S(x+xi))]. To second order CE(y, S(x)) + sigma^2/2 tr(d^2 CE/dx^2):
  a cousin of Jacobian-norm regularisation, whose equivalence with noise holds for squared
  error (E[(y - S(x+xi))^2] ~ (y - S(x))^2 + sigma^2 ||dS/dx||^2), not for cross-entropy."""
  noisy = _noisy_copies(x, sigma, samples, seed)
  tiled_labels = tf.tile(tf.cast(labels, tf.int32), [samples])
  return _mean_over_samples(cross_entropy(labels=tiled_labels, student_logits=student_fn(noisy)),
                            samples)
