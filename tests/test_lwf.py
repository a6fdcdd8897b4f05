"""What the README and --lwf_match's help say about LwF's soft targets (issue 11 item 8): the
default is Hinton's form (KL at tau=4, times tau^2), and --kd_temperature=2 --lwf_weight=0.25
is Li & Hoiem's loss (cross-entropy with targets softened at T=2, no T^2 factor) up to the
teacher's entropy, a constant: the same value minus that constant, the same gradients."""
import numpy as np
import tensorflow as tf

from tfjac import hints
from tfjac.hints import losses


def _log_softmax(z):
  z = z - z.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _logits():
  rng = np.random.default_rng(3)
  return (rng.normal(size=(4, 6)) * 3).astype(np.float64), rng.normal(size=(4, 6)) * 3


def test_li_hoiem_settings_give_their_loss_and_gradients():
  teacher, student = _logits()
  # Li & Hoiem (2016), eq. 2: -sum_i y'_i log yhat'_i, y' and yhat' softmax at T = 2.
  log_pt, log_ps = _log_softmax(teacher / 2), _log_softmax(student / 2)
  theirs = -(np.exp(log_pt) * log_ps).sum(-1)
  entropy = -(np.exp(log_pt) * log_pt).sum(-1)
  their_grad = (np.exp(log_ps) - np.exp(log_pt)) / 2  # d theirs / d student logits
  s = tf.constant(student)
  with tf.GradientTape() as tape:
    tape.watch(s)
    ours = 0.25 * losses.soft_target_distillation(
        teacher_logits=tf.constant(teacher), student_logits=s, temperature=2.0)
  np.testing.assert_allclose(ours.numpy(), theirs - entropy, rtol=1e-10)
  np.testing.assert_allclose(tape.gradient(ours, s).numpy(), their_grad, rtol=1e-9)


def test_the_default_is_hintons_form_at_tau_4():
  teacher, student = _logits()
  log_pt, log_ps = _log_softmax(teacher / 4), _log_softmax(student / 4)
  kl = (np.exp(log_pt) * (log_pt - log_ps)).sum(-1)
  params = hints.HintParams()
  assert (params.lwf_match, params.kd_temperature) == ("kd", 4.0)
  inputs = hints.HintInputs(x=None, labels=None, student_logits=None,
                            student_matching_logits=tf.constant(student),
                            student_fn=None, student_target_fn=None, seed=None,
                            teacher_logits=tf.constant(teacher))
  np.testing.assert_allclose(hints.HINTS["lwf"].loss(inputs, params).numpy(), 16 * kl,
                             rtol=1e-10)
