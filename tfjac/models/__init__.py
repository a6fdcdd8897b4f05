"""Model builders by name. Every model is a Functional keras.Model that takes float32 images in
[0, 1] (input named 'image'), standardises them with the training split's per-channel mean and
std inside the model, and returns logits (layer 'logits'). Input Jacobians are therefore taken
with respect to [0, 1] pixels, and the exported model needs no outside preprocessing."""
import functools
from typing import Callable, Dict, Sequence

import keras
import numpy as np

from tfjac.models.layers import JacobianSafeBatchNorm, holding_batch_statistics  # noqa: F401
from tfjac.models.resnet import build_resnet
from tfjac.models.vgg import LAYOUTS, build_vgg

MODELS: Dict[str, Callable] = {
    **{name: functools.partial(build_vgg, layout) for name, layout in LAYOUTS.items()},
    **{f"resnet{d}": functools.partial(build_resnet, d) for d in (20, 32, 56)},
}


def build(name: str, input_shape: Sequence[int], num_classes: int, *, mean, std, width=1.0,
          sync_bn=False, model_name=None, **options) -> keras.Model:
  """sync_bn: BatchNorm statistics over the global batch (use under several replicas: the
  replicas then train the same function and keep identical moving statistics)."""
  if name not in MODELS:
    raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
  inputs = keras.Input(shape=tuple(input_shape), name="image")
  x = keras.layers.Normalization(mean=np.asarray(mean, np.float32),
                                 variance=np.square(np.asarray(std, np.float32)),
                                 name="standardize")(inputs)
  logits = MODELS[name](x, num_classes, width=width, sync_bn=sync_bn, **options)
  return keras.Model(inputs, logits, name=model_name or name)


def multiply_accumulates(model: keras.Model) -> int:
  """Multiply-accumulates of one image's forward pass through the Conv2D and Dense layers of
  `model` (nested models included): each kernel's size times its output's spatial size. What a
  step's cost follows where convolutions dominate: a plain step (forward, input and weight
  gradients) is about 3x this, and the double-backprop step about 2x the teacher's plus 6x
  the student's (tools/benchmark.py prints both)."""
  total = 0
  for layer in model.layers:
    if isinstance(layer, keras.Model):
      total += multiply_accumulates(layer)
    elif isinstance(layer, keras.layers.Conv2D):  # DepthwiseConv2D is not one: skipped
      spatial = int(np.prod(layer.output.shape[1:-1]))
      total += spatial * int(np.prod(layer.kernel.shape))
    elif isinstance(layer, keras.layers.Dense):
      total += int(np.prod(layer.output.shape[1:-1] or [1])) * int(np.prod(layer.kernel.shape))
  return total
