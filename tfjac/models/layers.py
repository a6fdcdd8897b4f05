"""BatchNormalization whose batch statistics can be held constant for an input-Jacobian pass,
and reused by the noisy passes of the noise hints.

In training mode BatchNorm makes every output of a batch depend on every input through the
batch mean and variance. The Jacobian of a batch-summed output then carries cross-example terms
(B terms of order 1/B, order one in total), which is not the per-example Jacobian that
Jacobian matching needs. Inside `holding_batch_statistics(inner_tape)` this layer computes its
moments with `inner_tape` paused: the inner (input-gradient) tape sees the statistics as
constants, so d S_i / d x_j = 0 for j != i, while the outer (weight) tape still records them,
so the usual BatchNorm gradient of every loss term is unchanged. One forward pass serves both.

Noisy passes (`noise`, `noisy_ce`): inside `recording_batch_statistics()` each layer keeps the
moments of its training-mode call (the clean batch); inside `reusing_batch_statistics(record)`
a training-mode call normalises with those recorded moments and leaves the moving statistics
alone. The noisy copies are then normalised exactly as their clean batch was (the same function
S whose batch-statistics Jacobian `jac` matches), and the moving statistics are updated once per
step, from the clean batch, as in a `ce` step (training/distiller.py says why).
"""
import contextlib
import threading
from typing import Tuple

import keras
from keras import ops

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


@contextlib.contextmanager
def recording_batch_statistics():
  """Yields a dict {layer id: (mean, variance)} filled by the JacobianSafeBatchNorm layers
  called in training mode within the block (the last call of a layer wins). Blocks nest: an
  inner block's record also reaches the enclosing one (the Jacobian estimators record the
  student's clean pass inside the step's own recording block)."""
  previous = getattr(_state, "record", None)
  record = _state.record = {}
  try:
    yield record
  finally:
    if previous is not None:
      previous.update(record)
    _state.record = previous


@contextlib.contextmanager
def reusing_batch_statistics(record):
  """Within this block, JacobianSafeBatchNorm layers in training mode normalise with the
  moments in `record` (from `recording_batch_statistics`) and do not update their moving
  statistics."""
  previous = getattr(_state, "reuse", None)
  _state.reuse = record
  try:
    yield
  finally:
    _state.reuse = previous


@keras.saving.register_keras_serializable(package="tfjac")
class JacobianSafeBatchNorm(keras.layers.BatchNormalization):
  """keras.layers.BatchNormalization plus `holding_batch_statistics` and
  `recording_batch_statistics` / `reusing_batch_statistics` support."""

  def _moments(self, inputs, mask):
    stack = getattr(_state, "tapes", None)
    if not stack:
      moments = super()._moments(inputs, mask)
    else:
      with stack[-1].stop_recording():
        moments = super()._moments(inputs, mask)
    record = getattr(_state, "record", None)
    if record is not None:
      record[id(self)] = moments
    return moments

  def call(self, inputs, training=None, mask=None):
    reuse = getattr(_state, "reuse", None)
    if reuse is None or not (training and self.trainable):
      return super().call(inputs, training=training, mask=mask)
    if id(self) not in reuse:
      raise ValueError(f"{self.name}: no batch statistics recorded for this layer; run the "
                       "clean training pass inside recording_batch_statistics() first")
    if self.renorm:
      raise ValueError(f"{self.name}: reusing batch statistics is not supported with renorm")
    compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
    inputs = ops.cast(inputs, compute_dtype)
    mean, variance = (ops.cast(m, compute_dtype) for m in reuse[id(self)])
    outputs = ops.batch_normalization(
        x=inputs, mean=mean, variance=variance, axis=self.axis,
        offset=None if not self.center else ops.cast(self.beta, compute_dtype),
        scale=None if not self.scale else ops.cast(self.gamma, compute_dtype),
        epsilon=self.epsilon)
    return ops.cast(outputs, self.compute_dtype)


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


def convert_batchnorm(model: keras.Model) -> Tuple[keras.Model, int]:
  """A copy of `model` whose standard keras.layers.BatchNormalization layers are tfjac's
  JacobianSafeBatchNorm (same config and weights), so the batch_stats policy gives
  per-example Jacobians; returns (model, number converted). A model without any is returned
  as is."""
  standard = [l for l in all_layers(model) if type(l) is keras.layers.BatchNormalization]
  if not standard:
    return model, 0

  def clone(layer):
    if type(layer) is keras.layers.BatchNormalization:
      return JacobianSafeBatchNorm.from_config(layer.get_config())
    if isinstance(layer, keras.Model) and any(
        type(l) is keras.layers.BatchNormalization for l in all_layers(layer)):
      return keras.models.clone_model(layer, clone_function=clone)
    return layer.__class__.from_config(layer.get_config())

  converted = keras.models.clone_model(model, clone_function=clone)
  converted.set_weights(model.get_weights())
  return converted, len(standard)


def all_layers(model):
  """Every layer of `model`, nested models' layers included (depth first)."""
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from all_layers(layer)


def has_standard_batchnorm(model: keras.Model) -> bool:
  return any(type(l) is keras.layers.BatchNormalization for l in all_layers(model))

