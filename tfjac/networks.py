"""Networks from outside tfjac: keras.applications by name, KerasHub preset directories, .keras
files; what a teacher outputs (logits or probabilities), how it wants its input (family
preprocessing), and students with the standard BatchNormalization made Jacobian-safe.

Nothing here downloads: keras.applications are built with weights=None and given weights from a
file (or the file Keras keeps in its cache after a download elsewhere).
"""
import glob
import inspect
import os
import re
from typing import List, Optional, Sequence, Tuple

import keras
import numpy as np
from absl import logging

from tfjac.errors import ConfigError
from tfjac.models.layers import JacobianSafeBatchNorm

APPLICATIONS_PREFIX = "keras.applications:"
KERASHUB_PREFIX = "kerashub:"
PREFIXES = (APPLICATIONS_PREFIX, KERASHUB_PREFIX)
OUTPUT_KINDS = ("auto", "logits", "probabilities")
RANDOM_WEIGHTS = "none"  # --teacher_weights=none: random initialisation (tests)

# Family preprocessing, from [0, 1] dataset pixels x, as keras.applications.<family>.
# preprocess_input does from x * 255 (tests/test_networks.py checks each against Keras):
#   caffe      RGB -> BGR, then 255 x - ImageNet mean (BGR, 0-255 units)
#   torch      (x - ImageNet mean) / ImageNet std (0-1 units)
#   tf         2 x - 1
#   pixels255  255 x (the model carries its own preprocessing: EfficientNet, ConvNeXt, ...)
#   none       x as it comes (times --teacher_input_scale plus --teacher_input_offset)
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


def application_names() -> List[str]:
  return sorted(n for n in dir(keras.applications) if n[0].isupper() and
                callable(getattr(keras.applications, n)))


def is_outside(name: Optional[str]) -> bool:
  """A name that this module resolves (not one of tfjac's builders)."""
  return bool(name) and (name.startswith(PREFIXES) or name.endswith((".keras", ".h5")) or
                         os.sep in name)


def check_application(flag: str, name: str) -> str:
  """The keras.applications name in `name` (after the prefix); ConfigError listing the valid."""
  app = name[len(APPLICATIONS_PREFIX):]
  if app not in application_names():
    raise ConfigError(flag, f"unknown keras.applications model {app!r}; valid: "
                      f"{', '.join(application_names())}")
  return app


# The smallest square input Keras builds these classifiers at (its own check; teachers). The
# headless bodies (students) of the two Inceptions need it too (their strided stems leave no
# pixel for a later valid convolution); Xception's body takes 32x32.
MIN_IMAGE_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def _needs_size(app):
  n = MIN_IMAGE_SIZE.get(app)
  return f" (it needs images of at least {n}x{n})" if n else ""


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
    raise ConfigError("teacher_mean", f"per-channel mean/std apply with "
                      f"--teacher_preprocessing=torch or none, not {mode}")
  if mode not in ("none",) and (scale != 1.0 or offset != 0.0):
    raise ConfigError("teacher_input_scale", f"applies with --teacher_preprocessing=none; "
                      f"{mode} fixes the teacher's input range itself")
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


# --- what a teacher outputs ------------------------------------------------------------------

def _is_softmax(layer) -> bool:
  if isinstance(layer, keras.layers.Softmax):
    return True
  activation = getattr(layer, "activation", None)
  return getattr(activation, "__name__", None) == "softmax"


def _output_layer(model):
  history = getattr(model.outputs[0], "_keras_history", None) if getattr(
      model, "outputs", None) else None
  return history[0] if history else None


def without_softmax(model: keras.Model, _depth=0) -> Tuple[keras.Model, Optional[str]]:
  """(model returning the pre-softmax logits, how) when its output comes out of a softmax
  (Dense(activation='softmax'), Activation('softmax'), Softmax), else (model, None).
  A final softmax Dense is rebuilt linear with the same weights; an Activation/Softmax layer
  is skipped (its input is the output). A nested model in last place is looked into."""
  layer = _output_layer(model)
  if layer is None or len(model.outputs) != 1:
    return model, None
  how = None
  if isinstance(layer, keras.layers.Dense) and _is_softmax(layer):
    config = {**layer.get_config(), "activation": None, "name": f"{layer.name}_logits"}
    linear = keras.layers.Dense.from_config(config)
    out = linear(layer.input)
    linear.set_weights(layer.get_weights())
    how = f"final Dense {layer.name!r} rebuilt without its softmax"
  elif isinstance(layer, (keras.layers.Activation, keras.layers.Softmax)) and _is_softmax(layer):
    out = layer.input
    how = f"output taken before the softmax layer {layer.name!r}"
  elif isinstance(layer, keras.Model) and _depth < 4 and getattr(layer, "outputs", None):
    inner, how = without_softmax(layer, _depth + 1)
    if how is None:
      return model, None
    out = inner(layer.input)
    how = f"{how} (in {layer.name!r})"
  else:
    return model, None
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # one-tensor signature
  rebuilt = keras.Model(inputs, out, name=model.name)
  rebuilt.trainable = model.trainable
  return rebuilt, how


def looks_like_probabilities(model: keras.Model, input_shape, seed=0) -> bool:
  """Outputs >= 0 summing to 1 on every one of a few random inputs."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (4, *input_shape)).astype(np.float32)
  out = model(x, training=False)
  if isinstance(out, dict):
    out = out["logits"]
  out = np.asarray(out)
  return bool(np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-3))


@keras.saving.register_keras_serializable(package="tfjac")
class LogOf(keras.layers.Layer):
  """log(p): a probability output turned into logits up to a per-example constant."""

  def call(self, p):
    return keras.ops.log(keras.ops.maximum(p, 1e-30))


def _say(value, api):
  """The setting that settles what a teacher outputs, as its caller writes it."""
  return f"teacher_outputs={value!r}" if api else f"--teacher_outputs={value}"


def _refuse(message, api):
  """The Python API's error (a ValueError naming its argument) or the command line's."""
  return ValueError(message) if api else ConfigError("teacher_outputs", message)


def teacher_logits(model: keras.Model, declared: str, probe: keras.Model, probe_shape, *,
                   path="--teacher", api=False):
  """The one rule for what a teacher outputs, for the command line and the Python API (`api`:
  errors name the argument teacher_outputs= instead of the flag). Returns (model returning
  logits, or log-probabilities when the teacher outputs probabilities, the output kind seen:
  'logits' | 'probabilities', how it was settled). A final softmax seen in the structure is
  removed; `probe` (the model fed from inputs of `probe_shape`) is tried on random inputs when
  the structure is silent, and outputs that look like probabilities are refused unless
  `declared` says what they are."""
  if declared not in OUTPUT_KINDS:
    raise _refuse(f"unknown value {declared!r}; valid: {', '.join(OUTPUT_KINDS)}", api)
  if declared == "probabilities":
    stripped, how = without_softmax(model)
    if how:  # the structure says more than the setting: use the true logits
      return stripped, "logits", how + f" ({_say('probabilities', api)} not needed)"
    out = LogOf(name="log_probabilities")(model.outputs[0])
    return (keras.Model(model.inputs, out, name=model.name), "probabilities",
            f"{_say('probabilities', api)}: log-probabilities stand for the logits")
  stripped, how = without_softmax(model)
  if how:
    if declared == "logits":
      raise _refuse(f"{path} ends in a softmax ({how}); it outputs probabilities, not "
                    f"logits: drop {_say('logits', api)}", api)
    return stripped, "logits", how
  if declared == "logits":
    return model, "logits", _say("logits", api)
  if looks_like_probabilities(probe, probe_shape):
    raise _refuse(f"cannot tell what {path} outputs: no softmax layer can be seen (e.g. a "
                  "SavedModel or a subclassed model) and its outputs are non-negative and sum "
                  f"to 1 like probabilities. Say it: {_say('probabilities', api)} or "
                  f"{_say('logits', api)}", api)
  return model, "logits", "no final softmax; outputs not probabilities"


def resolve_teacher(teacher: keras.Model, declared: str, hint_names, lwf_match, *,
                    input_shape=None):
  """The Python API's teacher (tfjac.Distiller(teacher_outputs=...)) under teacher_logits'
  rule: (the teacher returning logits, {"outputs": kind, "how": how}). `input_shape` (one
  example's, e.g. the student's) is used to probe a teacher whose own is not fully known.
  ValueErrors name the argument teacher_outputs."""
  shape = tuple(getattr(teacher, "input_shape", None) or ())[1:]
  if not shape or any(d is None for d in shape):
    shape = tuple(input_shape or ())
  if not shape or any(d is None for d in shape):
    raise ValueError(f"cannot probe what the teacher {teacher.name!r} outputs: its input shape "
                     f"is not known; pass teacher_outputs='logits' or 'probabilities'")
  model, kind, how = teacher_logits(teacher, declared, teacher, shape, path="the teacher",
                                    api=True)
  if kind == "probabilities":
    check_probability_hints(hint_names, lwf_match, "the teacher outputs probabilities",
                            api=True)
  return model, {"outputs": kind, "how": how}


def probability_blockers(hint_names, lwf_match) -> List[str]:
  """Hints that need the teacher's logits themselves (not up to a per-example constant): they
  are refused with --teacher_outputs=probabilities. kd, lwf (kd match), jac_ce, at, at_jac and
  the top-1 target are exact on log-probabilities; act, jac and noise are not."""
  from tfjac import hints  # pylint: disable=g-import-not-at-top
  bad = [n for n in hint_names if hints.HINTS[n].reads_teacher_logits]
  if "lwf" in hint_names and lwf_match == "act":
    bad.append("lwf (lwf_match=act)")
  return bad


def check_probability_hints(hint_names, lwf_match, what: str, api=False):
  """An error naming teacher_outputs (the flag, or the argument when `api`) if a hint needs
  logits that a teacher outputting probabilities (`what`: how that is known) cannot give."""
  bad = probability_blockers(hint_names, lwf_match)
  if bad:
    raise _refuse(f"{what}: {bad} need the teacher's logits (log-probabilities differ from "
                  "them by a per-example constant, which these hints do not ignore: act on "
                  "log-probabilities is not act on logits); valid with probabilities: ce, kd, "
                  "lwf (kd), jac_ce, at, at_jac", api)


# --- keras.applications and KerasHub --------------------------------------------------------

def _keras_cache_weights(app: str) -> List[str]:
  home = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
  key = app.lower()
  found = []
  for f in glob.glob(os.path.join(home, "models", "*.h5")):
    flat = re.sub(r"[^a-z0-9]", "", os.path.basename(f).lower())
    if "notop" not in flat and re.search(key + r"(?!v\d)", flat):
      found.append(f)
  return sorted(found)


def application_weights(app: str, weights: str, flag="teacher_weights") -> Optional[str]:
  """The weights file of a keras.applications teacher: --teacher_weights=FILE, none (random),
  or (empty) the ImageNet file in Keras' cache directory. Never a download."""
  if weights == RANDOM_WEIGHTS:
    return None
  if weights:
    if not os.path.exists(weights):
      raise ConfigError(flag, f"{weights!r} does not exist")
    return weights
  cached = _keras_cache_weights(app)
  if len(cached) == 1:
    return cached[0]
  if len(cached) > 1:
    raise ConfigError(flag, f"several weight files for {app} in Keras' cache: {cached}; "
                      "name one")
  raise ConfigError(flag, f"keras.applications:{app} would need its ImageNet weights "
                    "downloaded, and tfjac never downloads: pass --teacher_weights=FILE (e.g. "
                    "the .h5 Keras saved in ~/.keras/models on a machine with network access; "
                    f"copy it there), or --{flag}=none for random weights")


def _load_weights(model, path, flag, what):
  try:
    model.load_weights(path)
  except Exception as e:  # shapes or layer names that do not match
    raise ConfigError(flag, f"{path!r} does not hold weights of {what}: {e}") from e


def application_teacher(app: str, *, weights: Optional[str], image_size: int = 0):
  """keras.applications.<app> with its classifier (ImageNet's 1000 classes and its softmax, as
  Keras builds it), at image_size x image_size (0: its default, 224 for most)."""
  fn = getattr(keras.applications, app)
  kwargs = {"weights": None}
  if image_size:
    kwargs["input_shape"] = (image_size, image_size, 3)
  try:
    model = fn(**kwargs)
  except ValueError as e:
    raise ConfigError("teacher_image_size", f"keras.applications.{app} cannot be built at "
                      f"{image_size}x{image_size}{_needs_size(app)}: {e}") from e
  if weights:
    _load_weights(model, weights, "teacher_weights", f"keras.applications.{app}")
  return model


def kerashub_teacher(directory: str):
  """A KerasHub ImageClassifier from a preset directory on disk (keras-hub: pip install
  -e .[hub]); returns (model, its image converter's scale, offset), None when it has none."""
  if not os.path.isdir(directory):
    raise ConfigError("teacher", f"kerashub:{directory}: no such directory")
  missing = [f for f in ("config.json", "metadata.json") if not os.path.exists(
      os.path.join(directory, f))]
  if missing:
    raise ConfigError("teacher", f"kerashub:{directory} is not a KerasHub preset directory "
                      f"(no {', '.join(missing)}; write one with model.save_to_preset(DIR))")
  try:
    import keras_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("teacher", "kerashub: teachers need the optional keras-hub package: "
                      "pip install -e .[hub] (docs/networks.md)") from e
  try:
    model = keras_hub.models.ImageClassifier.from_preset(directory)
  except Exception as e:
    raise ConfigError("teacher", f"cannot load an ImageClassifier from the KerasHub preset "
                      f"{directory!r}: {e}") from e
  converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
  scale = offset = None
  if converter is not None:
    scale, offset = converter.scale, converter.offset
  # The task object carries its preprocessor; the training step needs the graph alone.
  network = keras.Model(model.inputs, model.outputs[0], name="kerashub_teacher")
  return network, scale, offset


def kerashub_preprocessing(scale, offset):
  """The converter's affine map on [0, 255] pixels, as a map of [0, 1] pixels."""
  scale = np.atleast_1d(1.0 if scale is None else np.asarray(scale, np.float64))
  offset = np.atleast_1d(0.0 if offset is None else np.asarray(offset, np.float64))
  return ChannelAffine(255.0 * scale, offset, name="teacher_preprocess")


# --- students -------------------------------------------------------------------------------

def convert_batchnorm(model: keras.Model) -> Tuple[keras.Model, int]:
  """A copy of `model` whose standard keras.layers.BatchNormalization layers are tfjac's
  JacobianSafeBatchNorm (same config and weights), so the batch_stats policy gives
  per-example Jacobians; returns (model, number converted). A model without any is returned
  as is."""
  standard = [l for l in _all_layers(model) if type(l) is keras.layers.BatchNormalization]
  if not standard:
    return model, 0

  def clone(layer):
    if type(layer) is keras.layers.BatchNormalization:
      return JacobianSafeBatchNorm.from_config(layer.get_config())
    if isinstance(layer, keras.Model) and any(
        type(l) is keras.layers.BatchNormalization for l in _all_layers(layer)):
      return keras.models.clone_model(layer, clone_function=clone)
    return layer.__class__.from_config(layer.get_config())

  converted = keras.models.clone_model(model, clone_function=clone)
  converted.set_weights(model.get_weights())
  return converted, len(standard)


def _all_layers(model):
  for layer in model.layers:
    yield layer
    if isinstance(layer, keras.Model):
      yield from _all_layers(layer)


def has_standard_batchnorm(model: keras.Model) -> bool:
  return any(type(l) is keras.layers.BatchNormalization for l in _all_layers(model))


def build_student(name: str, image_shape, num_classes, *, mean, std, weights="",
                  model_name="student", safe_mode=True) -> keras.Model:
  """--model=keras.applications:NAME (its body, include_top=False with global average
  pooling, on the dataset's standardised pixels, plus a Dense head named 'logits'; random
  init or --student_weights) or --model=FILE.keras (as saved; it must take the dataset's
  images and give num_classes outputs). Standard BatchNorm is converted (logged)."""
  if name.startswith(APPLICATIONS_PREFIX):
    app = check_application("model", name)
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    kwargs = {}
    if own_preprocessing(app) == "always":
      # EfficientNet (B0-B7) rescales and normalises inside, with no switch to turn it off:
      # it gets the 0-255 pixels it expects (standardised pixels would reach its first
      # convolution as a near-constant image after its own /255 and ImageNet normalisation).
      x = keras.layers.Rescaling(255.0, name="pixels255")(inputs)
    else:
      x = keras.layers.Normalization(mean=np.asarray(mean, np.float32),
                                     variance=np.square(np.asarray(std, np.float32)),
                                     name="standardize")(inputs)
      if own_preprocessing(app) == "switch":
        kwargs["include_preprocessing"] = False  # fed standardised pixels already
    if image_shape[-1] == 1:
      x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    try:
      body = getattr(keras.applications, app)(include_top=False, weights=None, input_tensor=x,
                                              pooling="avg", **kwargs)
    except ValueError as e:
      raise ConfigError("model", f"keras.applications.{app} cannot take the dataset's "
                        f"{tuple(image_shape)} images{_needs_size(app)}: {e}") from e
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(body.output)
    model = keras.Model(inputs, logits, name=model_name)
    if weights:
      _load_weights(model, weights, "student_weights", f"the student {name}")
  else:
    if not os.path.exists(name):
      raise ConfigError("model", f"{name!r} does not exist; valid: a built-in name, "
                        f"{APPLICATIONS_PREFIX}NAME or a .keras file")
    try:
      model = keras.saving.load_model(name, compile=False, safe_mode=safe_mode)
    except Exception as e:
      raise ConfigError("model", f"{name!r} is not a Keras model file: {e}") from e
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
      raise ConfigError("model", f"{name!r} is not a Functional Keras model")
    if weights:
      _load_weights(model, weights, "student_weights", f"the student {name}")
    try:
      out = model(np.zeros((1, *image_shape), np.float32), training=False)
    except Exception as e:
      raise ConfigError("model", f"{name!r} cannot take the dataset's images of shape "
                        f"{tuple(image_shape)}: {e}") from e
    if tuple(out.shape) != (1, num_classes):
      raise ConfigError("model", f"{name!r} gives outputs of shape {tuple(out.shape[1:])}; "
                        f"the dataset has {num_classes} classes")
    model.trainable = True
    model, how = without_softmax(model)
    if how:
      logging.info("student %s: %s (tfjac trains on logits)", name, how)
  model, n = convert_batchnorm(model)
  if n:
    logging.info("student %s: %d standard BatchNormalization layer(s) converted to "
                 "JacobianSafeBatchNorm with their weights (per-example Jacobians under "
                 "--jac_bn_policy=batch_stats)", name, n)
  return model
