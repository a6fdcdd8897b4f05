"""VGG-style CIFAR networks: 3x3 conv + BatchNorm + ReLU blocks, max-pool, global pool, dense.

The poster names VGG-9 (teacher) and VGG-4 (student) without layouts; these follow the common
CIFAR pattern (method.md): VGG-n has n-1 conv layers and one dense layer. Pools that would
shrink a feature map below 1x1 are skipped, so the same layouts run on 8x8 and 32x32 images.
"""
from typing import Sequence, Union

import keras

from tfjac.models.layers import JacobianSafeBatchNorm, WindowMaxPool

LAYOUTS = {
    "vgg4": (64, "M", 128, "M", 256, "M"),
    "vgg9": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"),
}


def build_vgg(layout: Sequence[Union[int, str]], inputs, num_classes, *, width=1.0,
              bn_momentum=0.9, sync_bn=False, pool="keras", name="vgg"):
  """pool: keras (keras.layers.MaxPooling2D) or window (layers.WindowMaxPool: the same
  values, a gradient XLA differentiates exactly)."""
  x = inputs
  size = min(int(inputs.shape[1]), int(inputs.shape[2]))
  block, conv = 1, 1
  for item in layout:
    if item == "M":
      if size >= 2:
        x = (WindowMaxPool(name=f"block{block}_pool") if pool == "window" else
             keras.layers.MaxPooling2D(2, name=f"block{block}_pool"))(x)
        size //= 2
      block, conv = block + 1, 1
      continue
    filters = max(1, int(round(item * width)))
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False,
                            name=f"block{block}_conv{conv}")(x)
    x = JacobianSafeBatchNorm(momentum=bn_momentum, synchronized=sync_bn, name=f"block{block}_bn{conv}")(x)
    x = keras.layers.ReLU(name=f"block{block}_relu{conv}")(x)
    conv += 1
  x = keras.layers.GlobalAveragePooling2D(name="global_pool")(x)
  return keras.layers.Dense(num_classes, dtype="float32", name="logits")(x)
