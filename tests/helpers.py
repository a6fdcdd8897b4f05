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
