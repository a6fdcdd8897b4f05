"""Fit a Distiller with Keras callbacks: TensorBoard, per-epoch student checkpoints (last and
best on validation accuracy), a NaN/Inf guard that names the term, optional early stopping.
The student returned carries the weights of its best validation epoch: selection never looks
at the test split."""
import dataclasses
import math
import os
import time
import warnings
from typing import Dict, List

import keras
import numpy as np

from tfjac import data as data_lib
from tfjac.config import TrainConfig
from tfjac.errors import NonFiniteLossError


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
  total = max(1, cfg.epochs * steps_per_epoch)
  lr = cfg.learning_rate
  if cfg.lr_schedule == "cosine":
    lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total)
  elif cfg.lr_schedule == "step":
    lr = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=[e * steps_per_epoch for e in cfg.lr_decay_epochs],
        values=[cfg.learning_rate * cfg.lr_decay_factor ** i
                for i in range(len(cfg.lr_decay_epochs) + 1)])
  wd = cfg.weight_decay or None
  if cfg.optimizer == "sgd":
    return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                                weight_decay=wd)
  if cfg.optimizer == "adam":
    return keras.optimizers.Adam(lr, weight_decay=wd)
  return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)


def _atomic_save_weights(model, path):
  tmp = path[:-len(".weights.h5")] + ".tmp.weights.h5"
  model.save_weights(tmp)
  os.replace(tmp, path)


class StudentCheckpoint(keras.callbacks.Callback):
  """Saves the student (not the wrapper, not the teacher) after every epoch, atomically, as
  last.weights.h5, and as best.weights.h5 when `monitor` improves."""

  def __init__(self, student, directory, monitor="val_accuracy"):
    super().__init__()
    self.student, self.directory, self.monitor = student, directory, monitor
    self.best, self.best_epoch = -math.inf, -1
    os.makedirs(directory, exist_ok=True)

  @property
  def best_path(self):
    return os.path.join(self.directory, "best.weights.h5")

  def on_epoch_end(self, epoch, logs=None):
    _atomic_save_weights(self.student, os.path.join(self.directory, "last.weights.h5"))
    value = float((logs or {}).get(self.monitor, -math.inf))
    if value > self.best:
      self.best, self.best_epoch = value, epoch
      _atomic_save_weights(self.student, self.best_path)


class NonFiniteGuard(keras.callbacks.Callback):
  """Stops at the first batch where a logged term is NaN or Inf, naming the term."""

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    # Hint terms before the total, so that the message names the term that broke.
    for name, value in sorted((logs or {}).items(), key=lambda kv: kv[0] == "loss"):
      v = float(value)
      if not math.isfinite(v):
        raise NonFiniteLossError(name, getattr(self, "_epoch", 0), batch, v)


@dataclasses.dataclass
class FitResult:
  history: Dict[str, List[float]]
  best_epoch: int
  best_val_accuracy: float
  epochs_run: int
  seconds: float
  steps_per_epoch: int


def fit(distiller, train_split, validation_split, cfg: TrainConfig, *, seed, augment=(),
        crop_padding=0, log_dir, checkpoint_dir, extra_callbacks=()) -> FitResult:
  """Compiles and fits `distiller`, then loads the best-validation student weights into it."""
  one_pass = max(1, math.ceil(len(train_split) / cfg.batch_size))
  steps = cfg.steps_per_epoch or one_pass
  train_ds = data_lib.pipeline(train_split, cfg.batch_size, training=True, seed=seed,
                               augment=augment, crop_padding=crop_padding,
                               repeat=bool(cfg.steps_per_epoch))
  val_ds = data_lib.pipeline(validation_split, cfg.batch_size, training=False)
  distiller.compile(optimizer=make_optimizer(cfg, steps), jit_compile=cfg.jit_compile)
  checkpoint = StudentCheckpoint(distiller.student, checkpoint_dir)
  callbacks = [NonFiniteGuard(), checkpoint,
               keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch")]
  if cfg.early_stopping_patience:
    callbacks.append(keras.callbacks.EarlyStopping(
        monitor="val_accuracy", mode="max", patience=cfg.early_stopping_patience))
  callbacks.extend(extra_callbacks)
  start = time.time()
  # Keras warns that shuffle=True is ignored for a tf.data input; the pipeline shuffles itself.
  warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
  history = distiller.fit(train_ds, validation_data=val_ds, epochs=cfg.epochs,
                          steps_per_epoch=steps if cfg.steps_per_epoch else None,
                          callbacks=callbacks, verbose=0)
  seconds = time.time() - start
  distiller.student.load_weights(checkpoint.best_path)
  hist = {k: [float(v) for v in vs] for k, vs in history.history.items()}
  return FitResult(history=hist, best_epoch=checkpoint.best_epoch + 1,
                   best_val_accuracy=float(checkpoint.best),
                   epochs_run=len(hist.get("loss", [])), seconds=seconds, steps_per_epoch=steps)


def evaluate(distiller, split, batch_size) -> Dict[str, float]:
  ds = data_lib.pipeline(split, batch_size, training=False)
  if not distiller.compiled:  # e.g. a loaded teacher that is only evaluated
    distiller.compile(jit_compile=False)
  return {k: float(np.asarray(v)) for k, v in
          distiller.evaluate(ds, verbose=0, return_dict=True).items()}


def accuracy_under_noise(model, split, sigmas, batch_size, seed=0) -> Dict[str, float]:
  """Test accuracy of `model` (inference mode) on x + N(0, sigma^2 I), for each sigma."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  result = {}
  for j, sigma in enumerate(sigmas):
    correct = 0
    for i, (x, y) in enumerate(data_lib.pipeline(split, batch_size, training=False)):
      noise = tf.random.stateless_normal(tf.shape(x), seed=[seed, 1000 * j + i])
      logits = model(x + sigma * noise, training=False)
      correct += int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                                     tf.cast(y, tf.int32)), tf.int32)))
    result[f"{sigma:g}"] = correct / len(split)
  return result


class EpochLogger(keras.callbacks.Callback):
  """One absl log line per epoch, so a long run shows progress without Keras' progress bar."""

  def __init__(self, role, epochs):
    super().__init__()
    self.role, self.epochs = role, epochs

  def on_epoch_end(self, epoch, logs=None):
    from absl import logging  # pylint: disable=g-import-not-at-top
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted((logs or {}).items()))
    logging.info("%s epoch %d/%d: %s", self.role, epoch + 1, self.epochs, shown)
