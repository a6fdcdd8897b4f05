"""Writing a trained network (student or teacher) out, atomically (models/sources.py loads one back).

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

SAVED_MODEL = "saved_model"
KERAS_FILE = "model.keras"

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
