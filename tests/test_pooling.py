"""models/layers.WindowMaxPool: MaxPooling2D's values, with a double-backprop gradient that XLA
computes exactly (issue 15)."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac.models.layers import WindowMaxPool


@pytest.mark.parametrize("shape", [(2, 6, 6, 3), (3, 7, 5, 2), (1, 2, 2, 1)])
def test_window_max_pool_has_max_pooling_values(shape):
  x = tf.random.normal(shape, seed=1)
  np.testing.assert_array_equal(WindowMaxPool()(x), keras.layers.MaxPooling2D(2)(x))


def _net(pool):
  keras.utils.set_random_seed(0)
  inputs = keras.Input((6, 6, 2))
  # A positive bias: a blank image region gives equal positive values, ties in every window
  # there (as the digits' blank borders do after BatchNorm).
  h = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, padding="same",
                                              bias_initializer="ones")(inputs))
  h = keras.layers.Flatten()(pool()(h))
  return keras.Model(inputs, keras.layers.Dense(3)(h))


def _double_backprop_gradients(model, jit):
  x = tf.random.stateless_uniform((5, 6, 6, 2), seed=[1, 2])
  x = x * tf.pad(tf.zeros([4, 4]), [[2, 0], [2, 0]], constant_values=1.0)[None, :, :, None]
  target = tf.random.stateless_normal((5, 6, 6, 2), seed=[3, 4])

  @tf.function(jit_compile=jit)
  def grads():
    with tf.GradientTape() as outer:
      with tf.GradientTape() as inner:
        inner.watch(x)
        out = model(x)[:, 0]
      jac = inner.gradient(out, x)
      loss = tf.reduce_sum(tf.square(jac - target))
    return outer.gradient(loss, model.trainable_variables)

  return [g.numpy() for g in grads() if g is not None]  # biases: no second-order path


def _relative_difference(a, b):
  return (np.sqrt(sum(np.sum((p - q) ** 2) for p, q in zip(a, b))) /
          np.sqrt(sum(np.sum(q ** 2) for q in b)))


def test_xla_double_backprop_is_exact_with_window_max_pool():
  window = _net(WindowMaxPool)
  graph = _double_backprop_gradients(window, jit=False)
  assert _relative_difference(_double_backprop_gradients(window, jit=True), graph) < 1e-5
  # MaxPooling2D's XLA gradient differs from its graph gradient at ties (docs/speed.md): the
  # same check fails there.
  keras_pool = _net(lambda: keras.layers.MaxPooling2D(2))
  keras_pool.set_weights(window.get_weights())
  keras_graph = _double_backprop_gradients(keras_pool, jit=False)
  assert _relative_difference(_double_backprop_gradients(keras_pool, jit=True),
                              keras_graph) > 1e-3
  # At ties the two poolings take different subgradients (MaxPooling2D: one element; the
  # window: shared), so their Jacobians differ there: WindowMaxPool is not a drop-in default.
  assert _relative_difference(keras_graph, graph) > 1e-3
