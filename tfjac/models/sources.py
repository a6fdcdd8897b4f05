"""Networks from outside tfjac's builders, one loader per source: keras.applications by name,
a KerasHub preset directory, a network file (.keras, a SavedModel, a tfjac export directory).

Nothing here downloads: keras.applications are built with weights=None and given weights from a
file (or the file Keras keeps in its cache after a download elsewhere).
"""
import dataclasses
import glob
import os
import re
from typing import List, Optional

import keras
import tensorflow as tf
from absl import logging

from tfjac import export
from tfjac.errors import SettingError, mention
from tfjac.models import preprocessing

APPLICATIONS_PREFIX = "keras.applications:"
KERASHUB_PREFIX = "kerashub:"
PREFIXES = (APPLICATIONS_PREFIX, KERASHUB_PREFIX)
RANDOM_WEIGHTS = "none"  # weights="none": random initialisation (tests)


def application_names() -> List[str]:
  return sorted(n for n in dir(keras.applications) if n[0].isupper() and
                callable(getattr(keras.applications, n)))


def is_outside(name: Optional[str]) -> bool:
  """A name that this module resolves (not one of tfjac's builders)."""
  return bool(name) and (name.startswith(PREFIXES) or name.endswith((".keras", ".h5")) or
                         os.sep in name)


def check_application(setting: str, name: str) -> str:
  """The keras.applications name in `name` (after the prefix); a SettingError naming `setting`
  (where the name was given) lists the valid."""
  app = name[len(APPLICATIONS_PREFIX):]
  if app not in application_names():
    raise SettingError(setting, f"unknown keras.applications model {app!r}; valid: "
                       f"{', '.join(application_names())}")
  return app


# The smallest square input Keras builds these classifiers at (its own check; teachers). The
# headless bodies (students) of the two Inceptions need it too (their strided stems leave no
# pixel for a later valid convolution); Xception's body takes 32x32.
MIN_IMAGE_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}


def needs_size(app):
  n = MIN_IMAGE_SIZE.get(app)
  return f" (it needs images of at least {n}x{n})" if n else ""


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


def application_weights(app: str, weights: str,
                        setting="teacher.input.weights") -> Optional[str]:
  """The weights file of a keras.applications teacher: `weights` is a FILE, none (random), or
  empty (the ImageNet file in Keras' cache directory). Never a download. Errors name
  `setting`."""
  if weights == RANDOM_WEIGHTS:
    return None
  if weights:
    if not os.path.exists(weights):
      raise SettingError(setting, f"{weights!r} does not exist")
    return weights
  cached = _keras_cache_weights(app)
  if len(cached) == 1:
    return cached[0]
  if len(cached) > 1:
    raise SettingError(setting, f"several weight files for {app} in Keras' cache: {cached}; "
                       "name one")
  raise SettingError(setting, f"keras.applications:{app} would need its ImageNet weights "
                     f"downloaded, and tfjac never downloads: pass {mention(setting, 'FILE')} "
                     "(e.g. the .h5 Keras saved in ~/.keras/models on a machine with network "
                     f"access; copy it there), or {mention(setting, RANDOM_WEIGHTS)} for random "
                     "weights")


def load_weights(model, path, setting, what):
  try:
    model.load_weights(path)
  except Exception as e:  # shapes or layer names that do not match
    raise SettingError(setting, f"{path!r} does not hold weights of {what}: {e}") from e


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
    raise SettingError("teacher.input.image_size", f"keras.applications.{app} cannot be built "
                       f"at {image_size}x{image_size}{needs_size(app)}: {e}") from e
  if weights:
    load_weights(model, weights, "teacher.input.weights", f"keras.applications.{app}")
  return model


def kerashub_teacher(directory: str):
  """A KerasHub ImageClassifier from a preset directory on disk (keras-hub: pip install
  -e .[hub]); returns (model, its image converter's scale, offset), None when it has none."""
  if not os.path.isdir(directory):
    raise SettingError("teacher.path", f"kerashub:{directory}: no such directory")
  missing = [f for f in ("config.json", "metadata.json") if not os.path.exists(
      os.path.join(directory, f))]
  if missing:
    raise SettingError("teacher.path", f"kerashub:{directory} is not a KerasHub preset "
                       f"directory (no {', '.join(missing)}; write one with "
                       "model.save_to_preset(DIR))")
  try:
    import keras_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise SettingError("teacher.path", "kerashub: teachers need the optional keras-hub package: "
                      "pip install -e .[hub] (docs/networks.md)") from e
  try:
    model = keras_hub.models.ImageClassifier.from_preset(directory)
  except Exception as e:
    raise SettingError("teacher.path", f"cannot load an ImageClassifier from the KerasHub preset "
                      f"{directory!r}: {e}") from e
  converter = getattr(getattr(model, "preprocessor", None), "image_converter", None)
  scale = offset = None
  if converter is not None:
    scale, offset = converter.scale, converter.offset
  # The task object carries its preprocessor; the training step needs the graph alone.
  network = keras.Model(model.inputs, model.outputs[0], name="kerashub_teacher")
  return network, scale, offset



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


def load_network(path: str, image_shape, *, safe_mode=True, setting="teacher.path",
                 unsafe_setting: Optional[str] = "teacher.unsafe_loading",
                 saved_model=True) -> keras.Model:
  """A network from a .keras file (safe mode: no Lambda code), a SavedModel directory (when
  `saved_model`), or a directory written by tfjac (holding model.keras): the one loader of
  network files, for teachers and students. A SavedModel becomes a Keras model around its
  serving function, on its own input signature if it has one, else on `image_shape`. The
  model comes back frozen (trainable False).

  safe_mode: Keras safe mode, which refuses to deserialise Python code (Lambda layers); a
  refused file is a SettingError that names the file and `unsafe_setting` (None: no setting
  lifts it). Errors name `setting` (where `path` was given)."""
  if not os.path.exists(path):
    # An export cut mid-swap: put the previous one back.
    export.recover_export(path, remove_stale=False)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, export.KERAS_FILE)):
    path = os.path.join(path, export.KERAS_FILE)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, export.SAVED_MODEL)):
    path = os.path.join(path, export.SAVED_MODEL)
  is_keras_file = path.endswith(".keras") or path.endswith(".h5")
  try:
    if is_keras_file:
      model = keras.saving.load_model(path, compile=False, safe_mode=safe_mode)
    elif saved_model and os.path.exists(os.path.join(path, "saved_model.pb")):
      loaded = tf.saved_model.load(path)
      fn = getattr(loaded, "serve", None) or loaded.signatures.get("serving_default")
      if fn is None:
        raise SettingError(setting, f"SavedModel {path!r} has no 'serve' function nor "
                           "'serving_default' signature to call")
      shape = tuple(image_shape)
      signature = getattr(fn, "input_signature", None)
      if signature and len(signature[0].shape) == 4:
        shape = tuple(d if d is not None else s for d, s in
                      zip(signature[0].shape[1:], image_shape))
      inputs = keras.Input(shape=shape, name="image")
      model = keras.Model(inputs, _SavedModelTeacher(path, loaded, fn, name="saved_model")(inputs),
                          name="teacher")
    elif saved_model:
      raise SettingError(setting, f"{path!r} is neither a .keras file nor a SavedModel "
                         "directory (no saved_model.pb)")
    else:
      raise SettingError(setting, f"{path!r} is not a .keras file")
  except SettingError:
    raise
  except Exception as e:  # unreadable, corrupt, unsafe: say which file and why
    if safe_mode and _refused_by_safe_mode(e):
      lift = (f" If you trust whoever wrote the file, pass {mention(unsafe_setting, True)}"
              if unsafe_setting else "")
      raise SettingError(setting, f"{path!r} contains Python code (e.g. a Lambda layer) that "
                         "Keras safe mode will not run: loading it could execute anything."
                         f"{lift}") from e
    what = ", which is not a Keras model file Keras can read" if is_keras_file else ""
    raise SettingError(setting, f"cannot load a model from {path!r}{what}: {e}") from e
  model.trainable = False
  return model




# --- one loader per source ------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Source:
  """A loaded network and what its source says about its input."""
  network: keras.Model
  family: Optional[str] = None  # keras.applications: its family preprocessing
  converter: Optional[keras.layers.Layer] = None  # KerasHub: its image converter's affine map


def _from_applications(path, image_shape, teacher_input, safe_mode):
  del image_shape, safe_mode
  app = check_application("teacher.path", path)
  weights = application_weights(app, teacher_input.weights)
  logging.info("teacher keras.applications.%s, weights %s", app, weights or "random (none)")
  return Source(application_teacher(app, weights=weights, image_size=teacher_input.image_size),
                family=preprocessing.family_preprocessing(app))


def _from_kerashub(path, image_shape, teacher_input, safe_mode):
  del image_shape, teacher_input, safe_mode
  network, scale, offset = kerashub_teacher(path[len(KERASHUB_PREFIX):])
  return Source(network, converter=preprocessing.kerashub_preprocessing(scale, offset))


def _from_file(path, image_shape, teacher_input, safe_mode):
  if teacher_input.weights:
    raise SettingError("teacher.input.weights", "applies to "
                       f"{mention('teacher.path', APPLICATIONS_PREFIX + 'NAME')} only; {path!r} "
                       "carries its own weights")
  return Source(load_network(path, image_shape, safe_mode=safe_mode))


# A new source is one loader and one entry: (what it is, does a path name it, loader).
SOURCES = (
    ("keras.applications", lambda path: path.startswith(APPLICATIONS_PREFIX), _from_applications),
    ("KerasHub preset", lambda path: path.startswith(KERASHUB_PREFIX), _from_kerashub),
    ("file", lambda path: True, _from_file),  # .keras, SavedModel, tfjac export directory
)


def load_source(path: str, image_shape, teacher_input, *, safe_mode=True) -> Source:
  """The network `path` names, from the first source in SOURCES that takes it."""
  for _, takes, loader in SOURCES:
    if takes(path):
      return loader(path, image_shape, teacher_input, safe_mode)
  raise AssertionError("the file source takes every path")
