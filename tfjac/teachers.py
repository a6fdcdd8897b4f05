"""The teacher of a run, settled once for every mode that takes one: where it comes from
(--teacher: a .keras file, a SavedModel, a run directory, keras.applications:NAME,
kerashub:DIR), what it outputs (logits; a final softmax is removed; probabilities only when
--teacher_outputs says so) and how the dataset's [0, 1] pixels reach it (family preprocessing,
resize, grey to RGB), all inside one differentiable adapter. `load_network` reads a network
file (.keras, SavedModel, a tfjac export directory) and `check_outputs` probes it; only
`load_teacher` puts a teacher together, for every mode and tool."""
import dataclasses
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfjac import export, networks
from tfjac.errors import ConfigError
from tfjac.models import views

UNSAFE_FLAG = "unsafe_teacher_loading"


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


def _load_source(config, image_shape, path=None):
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
  return load_network(path, image_shape, safe_mode=not config.unsafe_teacher_loading), None, None


def load_teacher(config, data_info, *, num_classes: Optional[int] = None, path=None) -> Teacher:
  """The teacher of `config` for the dataset described by `data_info` (its image_shape), with
  `num_classes` outputs when given (distill), any number otherwise (transfer)."""
  image_shape = tuple(data_info.image_shape)
  ti = config.teacher_input
  path = path or config.teacher_path
  net, family, hub_affine = _load_source(config, image_shape, path)
  net.trainable = False
  mode = ti.preprocessing
  if mode == "auto":
    mode = family or ("auto" if hub_affine is not None else "none")
  adapt = make_adapter(ti, image_shape, mode, hub_affine)
  shown = "the KerasHub preset's image converter" if mode == "auto" else mode
  raw_adapted = adapt(net)
  check_outputs(raw_adapted, image_shape, path=path)  # fails early on a wrong input
  logits_net, kind, how = networks.teacher_logits(net, ti.outputs, raw_adapted, image_shape,
                                                  path=path)
  if kind == "probabilities":
    networks.check_probability_hints(config.hints.hints, config.hints.lwf_match,
                                     f"{path} outputs probabilities")
  logits_net.trainable = False
  adapted = adapt(logits_net)
  outputs = check_outputs(adapted, image_shape, num_classes, path)
  logging.info("teacher %s: %d outputs, %s (%s); preprocessing %s", path, outputs, kind, how,
               shown)
  return Teacher(network=logits_net, adapted=adapted, path=path, outputs=kind, outputs_how=how,
                 preprocessing=shown, num_outputs=outputs, _adapt=adapt)


class _SavedModelTeacher(keras.layers.Layer):
  """A SavedModel's serving function as a (frozen) Keras layer, differentiable w.r.t. input."""

  def __init__(self, path, loaded, fn, **kwargs):
    super().__init__(trainable=False, **kwargs)
    self._path = path
    self._loaded = loaded  # owns the variables that `fn` reads: keep it alive
    self._fn = fn

  def call(self, x):
    out = self._fn(x)
    if isinstance(out, dict):
      out = next(iter(out.values()))
    return out


def _refused_by_safe_mode(e) -> bool:
  return "safe_mode" in str(e) or "unsafe_deserialization" in str(e)


def load_network(path: str, image_shape, *, safe_mode=True) -> keras.Model:
  """A network from a .keras file (safe mode: no Lambda code), a SavedModel directory, or a
  directory written by tfjac (holding model.keras). A SavedModel becomes a Keras model around
  its serving function, on its own input signature if it has one, else on `image_shape`.

  safe_mode: Keras safe mode, which refuses to deserialise Python code (Lambda layers); a
  refused file is a ConfigError that names the file and --unsafe_teacher_loading."""
  if not os.path.exists(path):
    # An export cut mid-swap: put the previous one back.
    export.recover_export(path, remove_stale=False)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, export.KERAS_FILE)):
    path = os.path.join(path, export.KERAS_FILE)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, export.SAVED_MODEL)):
    path = os.path.join(path, export.SAVED_MODEL)
  try:
    if path.endswith(".keras") or path.endswith(".h5"):
      model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    elif os.path.exists(os.path.join(path, "saved_model.pb")):
      loaded = tf.saved_model.load(path)
      fn = getattr(loaded, "serve", None) or loaded.signatures.get("serving_default")
      if fn is None:
        raise ConfigError("teacher", f"SavedModel {path!r} has no 'serve' function nor "
                          "'serving_default' signature to call")
      shape = tuple(image_shape)
      signature = getattr(fn, "input_signature", None)
      if signature and len(signature[0].shape) == 4:
        shape = tuple(d if d is not None else s for d, s in
                      zip(signature[0].shape[1:], image_shape))
      inputs = keras.Input(shape=shape, name="image")
      model = keras.Model(inputs, _SavedModelTeacher(path, loaded, fn, name="saved_model")(inputs),
                          name="teacher")
    else:
      raise ConfigError("teacher", f"{path!r} is neither a .keras file nor a SavedModel "
                        "directory (no saved_model.pb)")
  except ConfigError:
    raise
  except Exception as e:  # unreadable, corrupt, unsafe: say which file and why
    if safe_mode and _refused_by_safe_mode(e):
      raise ConfigError("teacher", f"{path!r} contains Python code (e.g. a Lambda layer) that "
                        "Keras safe mode will not run: loading it could execute anything. If "
                        f"you trust whoever wrote the file, pass --{UNSAFE_FLAG}") from e
    raise ConfigError("teacher", f"cannot load a model from {path!r}: {e}") from e
  model.trainable = False
  return model


def check_outputs(model: keras.Model, image_shape, num_classes=None, path="--teacher"):
  """Calls `model` on one zero image of `image_shape`; returns its number of outputs."""
  try:
    out = model(np.zeros((1, *image_shape), np.float32), training=False)
  except Exception as e:
    raise ConfigError("teacher", f"teacher {path!r} cannot take the dataset's images of shape "
                      f"{tuple(image_shape)}: {e}") from e
  if isinstance(out, dict):
    out = out["logits"]
  if num_classes is not None and tuple(out.shape) != (1, num_classes):
    raise ConfigError("teacher", f"teacher {path!r} gives outputs of shape {tuple(out.shape[1:])}"
                      f" but the dataset has {num_classes} classes")
  return int(out.shape[-1])
