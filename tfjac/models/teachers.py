"""The teacher of a run, settled once for every mode that takes one: where it comes from
(`teacher.path`: a .keras file, a SavedModel, a run directory, keras.applications:NAME,
kerashub:DIR; models/sources.py), what it outputs (logits; a final softmax is removed;
probabilities only when `teacher.input.outputs` says so; models/outputs.py) and how the
dataset's [0, 1] pixels reach it (family preprocessing, resize, grey to RGB), all inside one
differentiable adapter. Only `load_teacher` puts a teacher together, for every mode and tool."""
import dataclasses
from typing import Optional

import keras
import numpy as np
from absl import logging

from tfjac.errors import SettingError
from tfjac.models import outputs as outputs_lib
from tfjac.models import preprocessing, sources, views


@dataclasses.dataclass
class Teacher:
  network: keras.Model  # logits (log-probabilities if outputs == 'probabilities'), own input
  adapted: keras.Model  # the same, fed from the dataset's images
  path: str
  outputs: str  # logits | probabilities
  outputs_how: str
  preprocessing: str  # the resolved mode (preprocessing.PREPROCESSING)
  num_outputs: int
  _adapt: dataclasses.InitVar = None

  def __post_init__(self, _adapt):
    self._adapt_fn = _adapt

  def adapt(self, model: keras.Model, name=None) -> keras.Model:
    """`model` (the network or a view of it) fed from the dataset's images like the teacher."""
    return self._adapt_fn(model, name)

  def summary(self):
    return {"outputs": self.outputs, "outputs_how": self.outputs_how,
            "preprocessing": self.preprocessing}


def make_adapter(teacher_input, image_shape, mode, hub_affine=None):
  """adapt(model, name) for the resolved preprocessing `mode`."""
  ti = teacher_input

  def adapt(model, name=None):
    if hub_affine is not None and mode == "auto":
      layer = preprocessing.ChannelAffine.from_config(hub_affine.get_config())
      return views.adapt_input(model, image_shape, resize=ti.resize, preprocess=layer,
                               name=name)
    if mode == "none" and not ti.mean and not ti.std:  # the plain x * scale + offset
      return views.adapt_input(model, image_shape, resize=ti.resize, scale=ti.scale,
                               offset=ti.offset, name=name)
    layer = preprocessing.preprocessing_layer(mode, mean=ti.mean, std=ti.std, scale=ti.scale,
                                              offset=ti.offset)
    return views.adapt_input(model, image_shape, resize=ti.resize, preprocess=layer, name=name)

  return adapt


def load_teacher(config, data_info, *, num_classes: Optional[int] = None, path=None) -> Teacher:
  """The teacher of `config` for the dataset described by `data_info` (its image_shape), with
  `num_classes` outputs when given (distill), any number otherwise (transfer)."""
  image_shape = tuple(data_info.image_shape)
  ti = config.teacher.input
  path = path or config.teacher.path
  source = sources.load_source(path, image_shape, ti, safe_mode=not config.teacher.unsafe_loading)
  net, family, hub_affine = source.network, source.family, source.converter
  net.trainable = False
  mode = ti.preprocessing
  if mode == "auto":
    mode = family or ("auto" if hub_affine is not None else "none")
  adapt = make_adapter(ti, image_shape, mode, hub_affine)
  shown = "the KerasHub preset's image converter" if mode == "auto" else mode
  raw_adapted = adapt(net)
  check_outputs(raw_adapted, image_shape, path=path)  # fails early on a wrong input
  logits_net, kind, how = outputs_lib.teacher_logits(net, ti.outputs, raw_adapted, image_shape,
                                                     path=path)
  if kind == "probabilities":
    outputs_lib.check_probability_hints(config.hints.hints, config.hints.lwf_match,
                                        f"{path} outputs probabilities")
  logits_net.trainable = False
  adapted = adapt(logits_net)
  outputs = check_outputs(adapted, image_shape, num_classes, path)
  logging.info("teacher %s: %d outputs, %s (%s); preprocessing %s", path, outputs, kind, how,
               shown)
  return Teacher(network=logits_net, adapted=adapted, path=path, outputs=kind, outputs_how=how,
                 preprocessing=shown, num_outputs=outputs, _adapt=adapt)


def check_outputs(model: keras.Model, image_shape, num_classes=None, path="the teacher"):
  """Calls `model` on one zero image of `image_shape`; returns its number of outputs."""
  try:
    out = model(np.zeros((1, *image_shape), np.float32), training=False)
  except Exception as e:
    raise SettingError("teacher.path", f"teacher {path!r} cannot take the dataset's images of "
                       f"shape {tuple(image_shape)}: {e}") from e
  if isinstance(out, dict):
    out = out["logits"]
  if num_classes is not None and tuple(out.shape) != (1, num_classes):
    raise SettingError("teacher.path", f"teacher {path!r} gives outputs of shape "
                       f"{tuple(out.shape[1:])} but the dataset has {num_classes} classes")
  return int(out.shape[-1])
