"""BatchNormalization whose batch statistics can be held constant for an input-Jacobian pass.

In training mode BatchNorm makes every output of a batch depend on every input through the
batch mean and variance. The Jacobian of a batch-summed output then carries cross-example terms
(B terms of order 1/B, order one in total), which is not the per-example Jacobian that
Jacobian matching needs. Inside `holding_batch_statistics(inner_tape)` this layer computes its
moments with `inner_tape` paused: the inner (input-gradient) tape sees the statistics as
constants, so d S_i / d x_j = 0 for j != i, while the outer (weight) tape still records them,
so the usual BatchNorm gradient of every loss term is unchanged. One forward pass serves both.
"""
import contextlib
import threading

import keras

_state = threading.local()


@contextlib.contextmanager
def holding_batch_statistics(tape):
  """Within this block, JacobianSafeBatchNorm layers hide their batch moments from `tape`."""
  stack = getattr(_state, "tapes", None)
  if stack is None:
    stack = _state.tapes = []
  stack.append(tape)
  try:
    yield
  finally:
    stack.pop()


@keras.saving.register_keras_serializable(package="tfjac")
class JacobianSafeBatchNorm(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization plus `holding_batch_statistics` support."""

  def _moments(self, inputs, mask):
    stack = getattr(_state, "tapes", None)
    if not stack:
      return super()._moments(inputs, mask)
    with stack[-1].stop_recording():
      return super()._moments(inputs, mask)


@keras.saving.register_keras_serializable(package="tfjac")
class WindowMaxPool(keras.layers.Layer):
  """2x2, stride-2, 'valid' max-pooling written as a reshape and a max over each window.

  Same values as keras.layers.MaxPooling2D(2). Its gradient is TensorFlow's reduce_max
  gradient (an equality mask times the incoming gradient, shared among tied maxima), made of
  elementwise ops whose own gradients are exact in graph mode and under XLA, where the
  MaxPoolGradGrad of MaxPooling2D is not at ties (issue 15). At ties its gradient differs
  from MaxPooling2D's, which sends it all to one element: both are subgradients, but where an
  image has blank regions (equal values after conv, BatchNorm and ReLU) the input Jacobian
  differs. Hence an option (models.build(..., pool="window")), not the default.
  """

  def call(self, x):
    h, w, c = (int(d) for d in x.shape[1:])
    x = x[:, :h // 2 * 2, :w // 2 * 2, :]
    x = keras.ops.reshape(x, (-1, h // 2, 2, w // 2, 2, c))
    return keras.ops.max(x, axis=(2, 4))

  def compute_output_shape(self, input_shape):
    return (input_shape[0], input_shape[1] // 2, input_shape[2] // 2, input_shape[3])
