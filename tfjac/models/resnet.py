"""CIFAR-style pre-activation-free ResNet-(6n+2) (He et al. 2016, section 4.2): 3 stages of n
basic blocks with 16/32/64 filters (times width), stride 2 between stages, global pool, dense."""
import keras

from tfjac.models.layers import JacobianSafeBatchNorm


def _block(x, filters, stride, bn_momentum, sync_bn, name):
  shortcut = x
  y = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                          name=f"{name}_conv1")(x)
  y = JacobianSafeBatchNorm(momentum=bn_momentum, synchronized=sync_bn, name=f"{name}_bn1")(y)
  y = keras.layers.ReLU(name=f"{name}_relu1")(y)
  y = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
  y = JacobianSafeBatchNorm(momentum=bn_momentum, synchronized=sync_bn, name=f"{name}_bn2")(y)
  if stride != 1 or shortcut.shape[-1] != filters:
    shortcut = keras.layers.Conv2D(filters, 1, strides=stride, use_bias=False,
                                   name=f"{name}_proj")(shortcut)
    shortcut = JacobianSafeBatchNorm(momentum=bn_momentum, synchronized=sync_bn, name=f"{name}_proj_bn")(shortcut)
  y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
  return keras.layers.ReLU(name=f"{name}_out")(y)


def build_resnet(depth, inputs, num_classes, *, width=1.0, bn_momentum=0.9, sync_bn=False, name="resnet"):
  if (depth - 2) % 6:
    raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
  n = (depth - 2) // 6
  filters = [max(1, int(round(f * width))) for f in (16, 32, 64)]
  x = keras.layers.Conv2D(filters[0], 3, padding="same", use_bias=False, name="stem_conv")(inputs)
  x = JacobianSafeBatchNorm(momentum=bn_momentum, synchronized=sync_bn, name="stem_bn")(x)
  x = keras.layers.ReLU(name="stem_relu")(x)
  for stage, f in enumerate(filters, start=1):
    for b in range(n):
      stride = 2 if (stage > 1 and b == 0) else 1
      x = _block(x, f, stride, bn_momentum, sync_bn, f"stage{stage}_block{b + 1}")
  x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
  return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
