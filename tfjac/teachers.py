"""The teacher of a run, settled once for every mode that takes one: where it comes from
(--teacher: a .keras file, a SavedModel, a run directory, keras.applications:NAME,
kerashub:DIR), what it outputs (logits; a final softmax is removed; probabilities only when
--teacher_outputs says so) and how the dataset's [0, 1] pixels reach it (family preprocessing,
resize, grey to RGB), all inside one differentiable adapter."""
import dataclasses
from typing import Optional

import keras
from absl import logging

from tfjac import export, networks
from tfjac.errors import ConfigError
from tfjac.models import views


@dataclasses.dataclass
class Teacher:
  network: keras.Model  # logits (log-probabilities if outputs == 'probabilities'), own input
  adapted: keras.Model  # the same, fed from the dataset's images
  path: str
  outputs: str  # logits | probabilities
  outputs_how: str
  preprocessing: str  # the resolved mode (networks.PREPROCESSING)
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
      layer = networks.ChannelAffine.from_config(hub_affine.get_config())
      return views.adapt_input(model, image_shape, resize=ti.resize, preprocess=layer,
                               name=name)
    if mode == "none" and not ti.mean and not ti.std:  # the plain x * scale + offset
      return views.adapt_input(model, image_shape, resize=ti.resize, scale=ti.scale,
                               offset=ti.offset, name=name)
    layer = networks.preprocessing_layer(mode, mean=ti.mean, std=ti.std, scale=ti.scale,
                                         offset=ti.offset)
    return views.adapt_input(model, image_shape, resize=ti.resize, preprocess=layer, name=name)

  return adapt


def load_network(config, image_shape, path=None):
  """(the raw network, its family preprocessing or None, a KerasHub converter layer or None)."""
  ti = config.teacher_input
  path = path or config.teacher_path
  if path.startswith(networks.APPLICATIONS_PREFIX):
    app = networks.check_application("teacher", path)
    weights = networks.application_weights(app, ti.weights)
    logging.info("teacher keras.applications.%s, weights %s", app, weights or "random (none)")
    return (networks.application_teacher(app, weights=weights, image_size=ti.image_size),
            networks.family_preprocessing(app), None)
  if path.startswith(networks.KERASHUB_PREFIX):
    net, scale, offset = networks.kerashub_teacher(path[len(networks.KERASHUB_PREFIX):])
    return net, None, networks.kerashub_preprocessing(scale, offset)
  if ti.weights:
    raise ConfigError("teacher_weights", "applies to --teacher=keras.applications:NAME only; "
                      f"{path!r} carries its own weights")
  return export.load_network(path, image_shape, safe_mode=not config.unsafe_teacher_loading), \
      None, None


def load_teacher(config, data_info, *, num_classes: Optional[int] = None, path=None) -> Teacher:
  """The teacher of `config` for the dataset described by `data_info` (its image_shape), with
  `num_classes` outputs when given (distill), any number otherwise (transfer)."""
  image_shape = tuple(data_info.image_shape)
  ti = config.teacher_input
  path = path or config.teacher_path
  net, family, hub_affine = load_network(config, image_shape, path)
  net.trainable = False
  mode = ti.preprocessing
  if mode == "auto":
    mode = family or ("auto" if hub_affine is not None else "none")
  adapt = make_adapter(ti, image_shape, mode, hub_affine)
  shown = "the KerasHub preset's image converter" if mode == "auto" else mode
  raw_adapted = adapt(net)
  export.check_outputs(raw_adapted, image_shape, path=path)  # fails early on a wrong input
  logits_net, kind, how = networks.teacher_logits(net, ti.outputs, raw_adapted, image_shape,
                                                  path=path)
  if kind == "probabilities":
    networks.check_probability_hints(config.hints.hints, config.hints.lwf_match,
                                     f"{path} outputs probabilities")
  logits_net.trainable = False
  adapted = adapt(logits_net)
  outputs = export.check_outputs(adapted, image_shape, num_classes, path)
  logging.info("teacher %s: %d outputs, %s (%s); preprocessing %s", path, outputs, kind, how,
               shown)
  return Teacher(network=logits_net, adapted=adapted, path=path, outputs=kind, outputs_how=how,
                 preprocessing=shown, num_outputs=outputs, _adapt=adapt)
