"""Training views of a network: one Functional model that returns a dict

  logits           the network's own output (the student's target head; the exported model)
  matching_logits  what is matched to the teacher: a second, teacher-shaped head for Learning
                   without Forgetting, else the logits themselves
  feature_<i>      feature maps of the layers used by attention transfer (paired by position)

sharing its layers with the network, so training the view trains the network. Also: which
layers can feed attention transfer, and adapting a teacher to the target data's input.
"""
from typing import List, Optional, Sequence

import keras

from tfjac.errors import SettingError, mention

_NOT_FEATURES = (keras.layers.InputLayer, keras.layers.Normalization, keras.layers.Rescaling,
                 keras.layers.Resizing)


def feature_layer_names(model: keras.Model) -> List[str]:
  """Layers with a [batch, H, W, C] output (H * W > 1) that attention transfer can use."""
  names = []
  for layer in model.layers:
    if isinstance(layer, _NOT_FEATURES):
      continue
    shape = getattr(layer, "output", None)
    shape = getattr(shape, "shape", None)
    if shape is not None and len(shape) == 4 and (shape[1] or 0) * (shape[2] or 0) > 1:
      names.append(layer.name)
  return names


_PADDING = (keras.layers.ZeroPadding2D, keras.layers.Cropping2D)
_JOINS = (keras.layers.Add, keras.layers.Concatenate)  # residual and dense connections
_ACTIVATIONS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                keras.layers.PReLU, keras.layers.ELU)
_CONVOLUTIONS = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D,
                 keras.layers.SeparableConv2D)


def _block_id(name):
  """The leading name tokens up to the first with a digit ('block_1' of 'block_1_expand_relu',
  'block2a' of 'block2a_expand_activation'), or None: keras.applications' block naming."""
  tokens = name.split("_")
  for i, token in enumerate(tokens):
    if any(c.isdigit() for c in token):
      return "_".join(tokens[:i + 1])
  return None


def default_attention_layers(model: keras.Model) -> List[str]:
  """One layer per spatial resolution, the one that ends the block or stage there (padding
  and cropping layers are never chosen; they only widen the map for the next stride):

  - the deepest resolution: the last layer at it (the end of the network's features);
  - a resolution with residual or dense joins (Add, Concatenate): the last join, or the
    activation applied to it (the block output of a post-activation ResNet);
  - otherwise the last layer at that resolution (a VGG block's output before its pooling),
    unless it opens the next block: when the next resolution starts with a convolution of the
    same keras.applications block name (MobileNetV2's block_1_expand_relu before the strided
    block_1_depthwise), the last layer of the block before it.

  Works on any keras.Model; attention_pairs' teacher_layers / student_layers override it."""
  names = [n for n in feature_layer_names(model)
           if not isinstance(model.get_layer(n), _PADDING)]
  resolution = {n: tuple(model.get_layer(n).output.shape[1:3]) for n in names}
  groups = {}  # resolution -> its layers in order; dict order: by each one's last layer
  for name in names:
    group = groups.pop(resolution[name], [])
    groups[resolution[name]] = group + [name]
  chosen = []
  for i, group in enumerate(groups.values()):
    chosen.append(group[-1] if i == len(groups) - 1 else _stage_end(model, group, names))
  return chosen


def _stage_end(model, group, names):
  layer = model.get_layer
  joins = [n for n in group if isinstance(layer(n), _JOINS)]
  if joins:
    end = joins[-1]
    applied = True
    while applied:  # follow the activations applied to the join
      applied = [n for n in group if isinstance(layer(n), _ACTIVATIONS)
                 and layer(n).input is layer(end).output]
      end = applied[0] if applied else end
    return end
  last = group[-1]
  following = names[names.index(last) + 1:names.index(last) + 2]
  if following and isinstance(layer(following[0]), _CONVOLUTIONS):
    opening = _block_id(following[0])
    if opening is not None and _block_id(last) == opening:
      before = [n for n in group if _block_id(n) != opening]
      if before:
        return before[-1]
  return last


def attention_pairs(teacher: keras.Model, student: keras.Model,
                    teacher_layers: Sequence[str] = (), student_layers: Sequence[str] = ()):
  """(teacher layer names, student layer names) of equal length; defaults pair the deepest
  blocks of each network. Unknown names raise a SettingError listing the valid ones."""
  for setting, model, names in (("hints.teacher_layers", teacher, teacher_layers),
                                ("hints.student_layers", student, student_layers)):
    valid = feature_layer_names(model)
    if not valid and names:
      raise SettingError(setting, f"{model.name} exposes no feature maps (a SavedModel teacher "
                         "has no layers to tap; give a .keras teacher)")
    unknown = [n for n in names if n not in valid]
    if unknown:
      raise SettingError(setting, f"no feature layer(s) {unknown} in {model.name}; valid: "
                         f"{', '.join(valid)}")
  t = list(teacher_layers) or default_attention_layers(teacher)
  s = list(student_layers) or default_attention_layers(student)
  if teacher_layers and student_layers and len(t) != len(s):
    raise SettingError("hints.student_layers", f"pairs with {mention('hints.teacher_layers')} "
                       f"one to one: got {len(s)} student and {len(t)} teacher layers")
  n = min(len(t), len(s))
  if n == 0:
    raise SettingError("hints.teacher_layers", f"no feature maps to pair between {teacher.name} "
                       f"and {student.name} (a SavedModel teacher has no layers; use a .keras "
                       "file)")
  return t[len(t) - n:], s[len(s) - n:]


def penultimate(model: keras.Model):
  """The input tensor of the model's final Dense layer (the features a new head reads)."""
  last = model.layers[-1]
  if not isinstance(last, keras.layers.Dense):
    raise ValueError(f"{model.name} does not end in a Dense layer (it ends in "
                     f"{type(last).__name__}); it cannot take a new head")
  return last.input


def make_view(model: keras.Model, *, feature_layers: Sequence[str] = (),
              second_head: Optional[keras.layers.Layer] = None, name=None) -> keras.Model:
  outputs = {"logits": model.output}
  outputs["matching_logits"] = (second_head(penultimate(model)) if second_head is not None
                                else model.output)
  for i, layer in enumerate(feature_layers):
    outputs[f"feature_{i}"] = model.get_layer(layer).output
  return keras.Model(model.inputs, outputs, name=name or f"{model.name}_view")


def features_of(view_outputs) -> List:
  return [view_outputs[k] for k in sorted((k for k in view_outputs if k.startswith("feature_")),
                                          key=lambda k: int(k.split("_")[1]))]


def adapt_input(model: keras.Model, data_shape, *, resize=False, scale=1.0, offset=0.0,
                name=None, preprocess: Optional[keras.layers.Layer] = None) -> keras.Model:
  """`model` fed from images of `data_shape` in [0, 1]: x * scale + offset, resized to the
  model's input size when `resize`, grey repeated to 3 channels when the model wants colour.
  `preprocess` (preprocessing.ChannelAffine: a family's preprocessing) runs after grey-to-RGB.
  Differentiable, so Jacobians stay with respect to the target data's pixels. Outputs (a tensor
  or a view's dict) are passed through."""
  want = tuple(model.input_shape[1:])
  data_shape = tuple(data_shape)
  if len(want) != 3:
    raise SettingError("teacher.path", f"the teacher takes inputs of shape {want}, not images")
  size_differs = want[:2] != data_shape[:2] and None not in want[:2]
  if size_differs and not resize:
    raise SettingError("teacher.input.resize", f"the teacher takes {want[0]}x{want[1]} images "
                       f"and the dataset has {data_shape[0]}x{data_shape[1]}; pass "
                       f"{mention('teacher.input.resize', True)} to resize the target images for "
                       "the teacher")
  if want[2] not in (None, data_shape[2]) and not (data_shape[2] == 1 and want[2] == 3):
    raise SettingError("teacher.path", f"the teacher takes {want[2]}-channel images and the "
                       f"dataset has {data_shape[2]}")
  if (not size_differs and scale == 1.0 and offset == 0.0 and want[2] in (None, data_shape[2])
      and preprocess is None):
    return model
  inputs = keras.Input(data_shape, name="image")
  x = inputs
  if scale != 1.0 or offset != 0.0:
    x = keras.layers.Rescaling(scale, offset, name="teacher_rescale")(x)
  if size_differs:
    x = keras.layers.Resizing(want[0], want[1], name="teacher_resize")(x)
  if want[2] == 3 and data_shape[2] == 1:
    x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
  if preprocess is not None:
    x = preprocess(x)
  return keras.Model(inputs, model(x), name=name or f"{model.name}_adapted")
