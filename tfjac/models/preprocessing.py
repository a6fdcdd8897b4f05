"""How a teacher wants its input: family preprocessing (keras.applications' preprocess_input,
KerasHub's image converter) as one differentiable layer on the dataset's [0, 1] pixels."""
import inspect
import re
from typing import Sequence

import keras
import numpy as np

from tfjac.errors import SettingError, mention


# Family preprocessing, from [0, 1] dataset pixels x, as keras.applications.<family>.
# preprocess_input does from x * 255 (tests/test_networks.py checks each against Keras):
#   caffe      RGB -> BGR, then 255 x - ImageNet mean (BGR, 0-255 units)
#   torch      (x - ImageNet mean) / ImageNet std (0-1 units)
#   tf         2 x - 1
#   pixels255  255 x (the model carries its own preprocessing: EfficientNet, ConvNeXt, ...)
#   none       x as it comes (times teacher.input.scale plus teacher.input.offset)
PREPROCESSING = ("auto", "caffe", "torch", "tf", "pixels255", "none")
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_FAMILY = (  # application name pattern -> its preprocessing
    (r"ResNet(50|101|152)$|VGG(16|19)$", "caffe"),
    (r"ResNet\d+V2$|MobileNet(V2)?$|Inception|Xception|NASNet", "tf"),
    (r"DenseNet", "torch"),
    (r"EfficientNet|ConvNeXt|MobileNetV3|RegNet", "pixels255"),
)


def own_preprocessing(app: str) -> str:
  """How keras.applications.<app> preprocesses inside itself: 'switch' (it does unless
  include_preprocessing=False: EfficientNetV2, ConvNeXt, MobileNetV3), 'always' (it always
  does, no such argument: EfficientNet B0-B7), 'none' (it takes preprocessed input)."""
  if family_preprocessing(app) != "pixels255":
    return "none"
  parameters = inspect.signature(getattr(keras.applications, app)).parameters
  return "switch" if "include_preprocessing" in parameters else "always"


def family_preprocessing(app: str) -> str:
  for pattern, mode in _FAMILY:
    if re.match(pattern, app):
      return mode
  return "none"


@keras.saving.register_keras_serializable(package="tfjac")
class ChannelAffine(keras.layers.Layer):
  """x -> (optionally x[..., ::-1]) * scale + offset, per channel: family preprocessing as a
  differentiable layer, so that Jacobians stay with respect to the dataset's pixels."""

  def __init__(self, scale=1.0, offset=0.0, reverse_channels=False, **kwargs):
    super().__init__(**kwargs)
    self.scale = [float(s) for s in np.atleast_1d(scale)]
    self.offset = [float(o) for o in np.atleast_1d(offset)]
    self.reverse_channels = bool(reverse_channels)

  def call(self, x):
    if self.reverse_channels:
      x = keras.ops.flip(x, axis=-1)
    return x * np.asarray(self.scale, np.float32) + np.asarray(self.offset, np.float32)

  def get_config(self):
    return {**super().get_config(), "scale": self.scale, "offset": self.offset,
            "reverse_channels": self.reverse_channels}


def preprocessing_layer(mode: str, *, mean: Sequence[float] = (), std: Sequence[float] = (),
                        scale=1.0, offset=0.0, name="teacher_preprocess"):
  """The ChannelAffine of a resolved mode (not 'auto'), or None for the identity. `mean`/`std`
  (0-1 pixel units, per channel) replace the family's own with torch, or apply after
  scale/offset with none."""
  if mode == "auto":
    raise ValueError("resolve 'auto' first (resolve_preprocessing)")
  if (mean or std) and mode not in ("torch", "none"):
    raise SettingError("teacher.input.mean", f"per-channel mean/std apply with "
                       f"{mention('teacher.input.preprocessing', 'torch')} or none, not {mode}")
  if mode not in ("none",) and (scale != 1.0 or offset != 0.0):
    raise SettingError("teacher.input.scale", "applies with "
                       f"{mention('teacher.input.preprocessing', 'none')}; {mode} fixes the "
                       "teacher's input range itself")
  if mode == "caffe":
    return ChannelAffine(255.0, [-m for m in _CAFFE_MEAN_BGR], True, name=name)
  if mode == "tf":
    return ChannelAffine(2.0, -1.0, name=name)
  if mode == "pixels255":
    return ChannelAffine(255.0, 0.0, name=name)
  if mode == "torch":
    mean, std = mean or _TORCH_MEAN, std or _TORCH_STD
  mean = np.asarray(mean or (0.0,), np.float64)
  std = np.asarray(std or (1.0,), np.float64)
  a, b = scale / std, (offset - mean) / std  # ((x * scale + offset) - mean) / std
  if np.all(a == 1.0) and np.all(b == 0.0):
    return None
  return ChannelAffine(a, b, name=name)



def kerashub_preprocessing(scale, offset):
  """The converter's affine map on [0, 255] pixels, as a map of [0, 1] pixels."""
  scale = np.atleast_1d(1.0 if scale is None else np.asarray(scale, np.float64))
  offset = np.atleast_1d(0.0 if offset is None else np.asarray(offset, np.float64))
  return ChannelAffine(255.0 * scale, offset, name="teacher_preprocess")

