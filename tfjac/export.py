"""Writing a trained network (student or teacher) out, atomically, and loading a teacher back.

`export_model` writes `<dir>/saved_model` (a SavedModel whose `serve` / `serving_default`
signature maps a float32 [batch, H, W, C] image batch in [0, 1] to logits) and `<dir>/model.keras`
into a temporary sibling directory, checks that the reloaded SavedModel gives the Keras model's
logits, and only then swaps it into place: a kill during export leaves the previous export whole.
Only the network passed in is written: exporting a student never includes the teacher.
"""
import json
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfjac.errors import ConfigError

SAVED_MODEL = "saved_model"
KERAS_FILE = "model.keras"


def atomic_write_text(path, text):
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_json(path, obj):
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def export_model(model: keras.Model, directory: str, sample_images: np.ndarray,
                 metadata=None, atol=1e-4) -> str:
  """Writes model to `directory` atomically; returns the SavedModel path."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.tmp-")
  try:
    model.export(os.path.join(staging, SAVED_MODEL), verbose=False)
    model.save(os.path.join(staging, KERAS_FILE))
    if metadata is not None:
      atomic_write_json(os.path.join(staging, "model.json"), metadata)
    reloaded = tf.saved_model.load(os.path.join(staging, SAVED_MODEL))
    expected = model(sample_images, training=False).numpy()
    got = reloaded.serve(tf.constant(sample_images, tf.float32)).numpy()
    if not np.allclose(expected, got, atol=atol):
      raise RuntimeError(f"exported SavedModel differs from the Keras model by "
                         f"{np.abs(expected - got).max():.3g}; export aborted")
    old = None
    if os.path.exists(directory):
      old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(directory)}.old-")
      os.rmdir(old)
      os.replace(directory, old)
    os.replace(staging, directory)
    if old:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return os.path.join(directory, SAVED_MODEL)


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


def load_network(path: str, image_shape) -> keras.Model:
  """A network from a .keras file (safe mode: no Lambda code), a SavedModel directory, or a
  directory written by tfjac (holding model.keras). A SavedModel becomes a Keras model around
  its serving function, on its own input signature if it has one, else on `image_shape`."""
  if os.path.isdir(path) and os.path.exists(os.path.join(path, KERAS_FILE)):
    path = os.path.join(path, KERAS_FILE)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, SAVED_MODEL)):
    path = os.path.join(path, SAVED_MODEL)
  try:
    if path.endswith(".keras") or path.endswith(".h5"):
      model = keras.saving.load_model(path, compile=False, safe_mode=True)
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


def load_teacher(path: str, image_shape, num_classes=None, teacher_input=None) -> keras.Model:
  """load_network, fed from the dataset's images as `teacher_input` (config.TeacherInput)
  says, and checked to give `num_classes` outputs (any number when None)."""
  from tfjac.models import views  # pylint: disable=g-import-not-at-top
  model = load_network(path, image_shape)
  if teacher_input is not None:
    model = views.adapt_input(model, image_shape, resize=teacher_input.resize,
                              scale=teacher_input.scale, offset=teacher_input.offset)
  check_outputs(model, image_shape, num_classes, path)
  return model
