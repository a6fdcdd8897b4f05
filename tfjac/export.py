"""Writing a trained network (student or teacher) out, atomically, and loading a teacher back.

`export_model` writes `<dir>/saved_model` (a SavedModel whose `serve` / `serving_default`
signature maps a float32 [batch, H, W, C] image batch in [0, 1] to logits) and `<dir>/model.keras`
into a temporary sibling directory, checks that the reloaded SavedModel gives the Keras model's
logits, and only then swaps it into place: a kill during export leaves the previous export whole.
Only the network passed in is written: exporting a student never includes the teacher.
"""
import ctypes
import glob
import os
import shutil
import tempfile

import keras
import numpy as np
import tensorflow as tf

from tfjac import atomic
from tfjac.errors import ConfigError

SAVED_MODEL = "saved_model"
KERAS_FILE = "model.keras"
UNSAFE_FLAG = "unsafe_teacher_loading"

# Kept under these names for the callers that write run outputs (run.py).
atomic_write_text = atomic.write_text
atomic_write_json = atomic.write_json


def _renameat2_exchange():
  """Linux renameat2(RENAME_EXCHANGE): swaps two paths in one atomic step; None elsewhere."""
  try:
    fn = ctypes.CDLL(None, use_errno=True).renameat2
  except (OSError, AttributeError):
    return None
  at_fdcwd, rename_exchange = -100, 2

  def exchange(a, b):
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
      err = ctypes.get_errno()
      raise OSError(err, os.strerror(err), a)

  return exchange


_EXCHANGE = _renameat2_exchange()


def _staging_pattern(directory, kind):
  parent, name = os.path.split(os.path.abspath(directory))
  return os.path.join(parent, f".{name}.{kind}-")


def recover_export(directory, remove_stale=True):
  """Repairs what a kill during `export_model` can leave: if the swap was cut between its two
  renames (filesystems without an atomic exchange), the previous export is moved back into
  place; with remove_stale, leftover staging directories are deleted (only when no other
  process is exporting to `directory`)."""
  olds = sorted(glob.glob(_staging_pattern(directory, "old") + "*"), key=os.path.getmtime)
  if not os.path.exists(directory) and olds:
    os.replace(olds.pop(), directory)
  if remove_stale:
    for stale in olds + glob.glob(_staging_pattern(directory, "tmp") + "*"):
      shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(staging, directory):
  """Makes `staging` the new `directory`; the previous one (if any) is deleted afterwards."""
  if not os.path.exists(directory):
    os.replace(staging, directory)
    return
  if _EXCHANGE is not None:
    try:
      _EXCHANGE(staging, directory)  # one step: `directory` is always a whole export
      shutil.rmtree(staging, ignore_errors=True)
      return
    except OSError:
      pass  # e.g. a filesystem without RENAME_EXCHANGE: two renames, repaired by recover_export
  old = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(directory)),
                         prefix=os.path.basename(_staging_pattern(directory, "old")))
  os.rmdir(old)
  os.replace(directory, old)
  os.replace(staging, directory)
  shutil.rmtree(old, ignore_errors=True)


def _export_inference(model: keras.Model, path: str):
  """model.export with the call pinned to training=False: a plain model.export traces the
  call without a training argument, and a nested network with trainable BatchNorm behind an
  input adapter (the fine-tuning oracle of a resized teacher) was then exported with batch
  statistics (measured: 2.6-8.7 off the Keras model's logits)."""
  archive = keras.export.ExportArchive()
  archive.track(model)
  spec = tf.TensorSpec([None, *model.input_shape[1:]], tf.float32, name="image")
  archive.add_endpoint("serve", lambda x: model(x, training=False), input_signature=[spec])
  archive.write_out(path, verbose=False)


def export_model(model: keras.Model, directory: str, sample_images: np.ndarray,
                 metadata=None, atol=1e-4) -> str:
  """Writes model to `directory` atomically; returns the SavedModel path."""
  parent = os.path.dirname(os.path.abspath(directory))
  os.makedirs(parent, exist_ok=True)
  recover_export(directory)
  staging = tempfile.mkdtemp(dir=parent,
                             prefix=os.path.basename(_staging_pattern(directory, "tmp")))
  try:
    _export_inference(model, os.path.join(staging, SAVED_MODEL))
    model.save(os.path.join(staging, KERAS_FILE))
    if metadata is not None:
      atomic_write_json(os.path.join(staging, "model.json"), metadata)
    reloaded = tf.saved_model.load(os.path.join(staging, SAVED_MODEL))
    expected = model(sample_images, training=False).numpy()
    got = reloaded.serve(tf.constant(sample_images, tf.float32)).numpy()
    if not np.allclose(expected, got, atol=atol):
      raise RuntimeError(f"exported SavedModel differs from the Keras model by "
                         f"{np.abs(expected - got).max():.3g}; export aborted")
    _swap_into_place(staging, directory)
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


def _refused_by_safe_mode(e) -> bool:
  return "safe_mode" in str(e) or "unsafe_deserialization" in str(e)


def load_network(path: str, image_shape, *, safe_mode=True) -> keras.Model:
  """A network from a .keras file (safe mode: no Lambda code), a SavedModel directory, or a
  directory written by tfjac (holding model.keras). A SavedModel becomes a Keras model around
  its serving function, on its own input signature if it has one, else on `image_shape`.

  safe_mode: Keras safe mode, which refuses to deserialise Python code (Lambda layers); a
  refused file is a ConfigError that names the file and --unsafe_teacher_loading."""
  if not os.path.exists(path):
    recover_export(path, remove_stale=False)  # an export cut mid-swap: put the previous back
  if os.path.isdir(path) and os.path.exists(os.path.join(path, KERAS_FILE)):
    path = os.path.join(path, KERAS_FILE)
  if os.path.isdir(path) and os.path.exists(os.path.join(path, SAVED_MODEL)):
    path = os.path.join(path, SAVED_MODEL)
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


def load_teacher(path: str, image_shape, num_classes=None, teacher_input=None, *,
                 safe_mode=True) -> keras.Model:
  """load_network, fed from the dataset's images as `teacher_input` (config.TeacherInput)
  says, and checked to give `num_classes` outputs (any number when None)."""
  from tfjac.models import views  # pylint: disable=g-import-not-at-top
  model = load_network(path, image_shape, safe_mode=safe_mode)
  if teacher_input is not None:
    model = views.adapt_input(model, image_shape, resize=teacher_input.resize,
                              scale=teacher_input.scale, offset=teacher_input.offset)
  check_outputs(model, image_shape, num_classes, path)
  return model
