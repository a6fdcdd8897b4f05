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
  h = keras.layers.ReLU()(keras.layers.Conv2D(4, 3, padding="same")(inputs))
  h = keras.layers.Flatten()(pool()(h))
  return keras.Model(inputs, keras.layers.Dense(3)(h))


def _double_backprop_gradients(model, jit):
  x = tf.random.stateless_uniform((5, 6, 6, 2), seed=[1, 2])
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

  return [g.numpy() for g in grads()]


def _relative_difference(a, b):
  return (np.sqrt(sum(np.sum((p - q) ** 2) for p, q in zip(a, b))) /
          np.sqrt(sum(np.sum(q ** 2) for q in b)))


def test_xla_double_backprop_is_exact_with_window_max_pool():
  window = _net(WindowMaxPool)
  graph = _double_backprop_gradients(window, jit=False)
  assert _relative_difference(_double_backprop_gradients(window, jit=True), graph) < 1e-5
  keras_pool = _net(lambda: keras.layers.MaxPooling2D(2))
  keras_pool.set_weights(window.get_weights())
  # The same function and gradient in graph mode: the two poolings agree there ...
  assert _relative_difference(_double_backprop_gradients(keras_pool, jit=False), graph) < 1e-5
  # ... and XLA's MaxPoolGradGrad is what differs (README, Speed): the check can fail.
  assert _relative_difference(_double_backprop_gradients(keras_pool, jit=True), graph) > 1e-3
