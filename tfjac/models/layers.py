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
