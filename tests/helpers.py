"""Small models whose Jacobians are known by hand."""
import keras
import numpy as np


def linear_model(weights, bias=None, input_shape=(2, 2, 1), name="linear"):
  """logits = flatten(x) @ weights + bias: d logits[k] / d x = weights[:, k]."""
  weights = np.asarray(weights, np.float32)
  inputs = keras.Input(shape=input_shape, name="image")
  x = keras.layers.Flatten()(inputs)
  dense = keras.layers.Dense(weights.shape[1], name="logits")
  out = dense(x)
  model = keras.Model(inputs, out, name=name)
  dense.set_weights([weights, np.zeros(weights.shape[1], np.float32) if bias is None
                     else np.asarray(bias, np.float32)])
  return model


def finite_difference_gradient(loss, variable, eps=1e-6):
  """Central differences of the scalar `loss()` with respect to each entry of `variable`
  (a Keras variable, restored afterwards): an independent reference for tape gradients."""
  base = variable.numpy()
  numeric = np.zeros_like(base)
  for idx in np.ndindex(*base.shape):
    for sign in (1, -1):
      bumped = base.copy()
      bumped[idx] += sign * eps
      variable.assign(bumped)
      numeric[idx] += sign * float(loss()) / (2 * eps)
  variable.assign(base)
  return numeric


class TeacherCalled(Exception):
  """Raised by a teacher that forbid_teacher_calls has disabled."""


def forbid_teacher_calls(monkeypatch, distiller):
  """Any call of the distiller's teacher (or its view) from now on raises TeacherCalled."""
  def explode(*args, **kwargs):
    raise TeacherCalled

  monkeypatch.setattr(distiller.teacher_view, "call", explode)
  monkeypatch.setattr(distiller.teacher, "call", explode)
