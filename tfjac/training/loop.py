"""Fit a Distiller with Keras callbacks: TensorBoard, per-epoch student checkpoints (last and
best on validation accuracy), a NaN/Inf guard that names the term, optional early stopping,
and a backup from which a killed run resumes (training/resume.py). The student returned
carries the weights of its best validation epoch: selection never looks at the test split."""
import dataclasses
import math
import os
import warnings
from typing import Dict, List, Optional

import keras
import numpy as np
from absl import logging

from tfjac import atomic
from tfjac import data as data_lib
from tfjac.config import TrainConfig
from tfjac.errors import NonFiniteLossError, NonFiniteWeightsError
from tfjac.training import resume as resume_lib


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
  last.weights.h5, and as best.weights.h5 (epoch and value in best.json) when `monitor`
  improves. Its best-so-far survives a restart through the backup (get_state/set_state)."""

  def __init__(self, student, directory, monitor="val_accuracy"):
    super().__init__()
    self.student, self.directory, self.monitor = student, directory, monitor
    self.best, self.best_epoch = -math.inf, -1
    os.makedirs(directory, exist_ok=True)

  @property
  def best_path(self):
    return os.path.join(self.directory, "best.weights.h5")

  def on_epoch_end(self, epoch, logs=None):
    broken = [f"student variable {w.path}" for w in self.student.weights
              if not np.isfinite(keras.ops.convert_to_numpy(w)).all()]
    if broken:  # finite losses, overflowed gradient: keep the last good files
      raise NonFiniteWeightsError(broken, epoch)
    _atomic_save_weights(self.student, os.path.join(self.directory, "last.weights.h5"))
    value = float((logs or {}).get(self.monitor, -math.inf))
    if value > self.best:
      self.best, self.best_epoch = value, epoch
      _atomic_save_weights(self.student, self.best_path)
      self._write_best_json()

  def _write_best_json(self):
    atomic.write_json(os.path.join(self.directory, "best.json"),
                      {"epoch": self.best_epoch + 1, self.monitor: self.best})

  def get_state(self):
    return {"best": resume_lib.finite_or_none(self.best), "best_epoch": self.best_epoch}

  def set_state(self, state):
    self.best = -math.inf if state["best"] is None else float(state["best"])
    self.best_epoch = int(state["best_epoch"])

  def backup_files(self):
    return {"best": self.best_path}

  def restore_files(self, files):
    """best.weights.h5 as of the backup: a later epoch may have replaced it before the kill."""
    if "checkpoint.best" in files:
      atomic.copy_file(files["checkpoint.best"], self.best_path)
      self._write_best_json()


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
  """keras EarlyStopping whose counters survive a restart (get_state/set_state) and a second
  fit() call (Keras resets them in on_train_begin)."""

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    self._carried = None

  def on_train_begin(self, logs=None):
    carried = self._carried
    super().on_train_begin(logs)
    if carried:
      self.wait, self.best_epoch = int(carried["wait"]), int(carried["best_epoch"])
      self.best = carried["best"]

  def on_epoch_end(self, epoch, logs=None):
    super().on_epoch_end(epoch, logs)
    self._carried = self.get_state()

  def get_state(self):
    return {"wait": int(self.wait), "best_epoch": int(self.best_epoch),
            "best": None if self.best is None else float(self.best)}

  def set_state(self, state):
    self._carried = dict(state)


class NonFiniteGuard(keras.callbacks.Callback):
  """Stops at the first batch where a logged term is NaN or Inf, naming the term.
  `batch_offset`: set by fit() when a fit() call runs only the rest of an epoch."""

  batch_offset = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    # Hint terms before the total, so that the message names the term that broke.
    for name, value in sorted((logs or {}).items(), key=lambda kv: kv[0] == "loss"):
      v = float(value)
      if not math.isfinite(v):
        raise NonFiniteLossError(name, getattr(self, "_epoch", 0), self.batch_offset + batch, v)


@dataclasses.dataclass
class FitResult:
  history: Dict[str, List[float]]
  best_epoch: int
  best_val_accuracy: float
  epochs_run: int
  seconds: float
  steps_per_epoch: int
  resumed_from: Optional[Dict[str, int]] = None  # {"epochs_done", "steps_done"} of the backup


def resolve_jit_compile(jit_compile: bool, replicas: int) -> bool:
  """--jit_compile as it can be honoured: off, with a logged reason, over several replicas
  (reached with --strategy=auto and several GPUs; explicit strategies are a ConfigError)."""
  if jit_compile and replicas > 1:
    logging.warning("--jit_compile turned off: XLA cannot compile a step over %d replicas "
                    "(their variables live on other devices; Keras disables XLA under "
                    "tf.distribute too)", replicas)
    return False
  return jit_compile


def fit(distiller, train_split, validation_split, cfg: TrainConfig, *, seed, augment=(),
        crop_padding=0, log_dir, checkpoint_dir, extra_callbacks=(), resume=False,
        settings=None, keep_backup=False, teacher_cache=False) -> FitResult:
  """Compiles and fits `distiller`, then loads the best-validation student weights into it.

  A backup in <checkpoint_dir>/backup (left by a killed fit with the same `settings`) is
  continued from where it stopped when `resume`, else discarded. keep_backup: leave the
  finished fit's backup in place, for a caller that still has outputs to write and discards
  it afterwards (modes/common.py); a kill before then resumes with no epoch left to run.
  teacher_cache: compute the teacher's outputs once per example first and feed them with the
  data (training/teacher_cache.py; the caller checks that this is valid, config.py).
  """
  steps = cfg.steps_per_epoch or max(1, math.ceil(len(train_split) / cfg.batch_size))
  backup_dir = os.path.join(checkpoint_dir, resume_lib.BACKUP_DIR)
  restored = None
  if resume:
    restored = resume_lib.read(backup_dir, settings)
  else:
    resume_lib.discard(backup_dir)
  jit = resolve_jit_compile(cfg.jit_compile, distiller.distribute_strategy.num_replicas_in_sync)
  with distiller.distribute_strategy.scope():  # the optimizer's variables are per replica
    distiller.compile(optimizer=make_optimizer(cfg, steps), jit_compile=jit)
  extras = None
  if teacher_cache:
    from tfjac.training import teacher_cache as cache_lib  # pylint: disable=g-import-not-at-top
    extras = cache_lib.compute(distiller, train_split, cfg.batch_size)
    logging.info("teacher outputs cached for %d training examples (%.1f MiB): %s",
                 len(train_split), cache_lib.size_mib(extras), ", ".join(sorted(extras)))
  checkpoint = StudentCheckpoint(distiller.student, checkpoint_dir)
  guard = NonFiniteGuard()
  stateful = {"checkpoint": checkpoint}
  callbacks = [guard, checkpoint, keras.callbacks.TensorBoard(log_dir=log_dir,
                                                              update_freq="epoch")]
  if cfg.early_stopping_patience:
    stateful["early_stopping"] = ResumableEarlyStopping(
        monitor="val_accuracy", mode="max", patience=cfg.early_stopping_patience)
    callbacks.append(stateful["early_stopping"])
  callbacks.extend(extra_callbacks)
  backup = resume_lib.TrainingBackup(backup_dir, stateful=stateful, epochs=cfg.epochs,
                                     steps_per_epoch=steps, every_steps=cfg.backup_every_steps,
                                     settings=settings)
  callbacks.append(backup)
  epoch, step, done = 0, 0, False
  if restored:
    backup.restore(restored)
    epoch, step, done = restored.epoch, restored.step, restored.done
    logging.info("resuming from %s: %d epoch(s) and %d step(s) done%s", backup_dir, epoch,
                 step, "; the fit had finished" if done else "")

  # Keras warns that shuffle=True is ignored for a tf.data input; the pipeline shuffles itself.
  warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
  val_ds = data_lib.pipeline(validation_split, cfg.batch_size, training=False)

  def run(first_epoch, first_step, last_epoch):
    for cb in (guard, backup):
      cb.batch_offset = first_step
    batches = data_lib.training_batches(
        train_split, cfg.batch_size, seed=seed, epochs=cfg.epochs,
        steps_per_epoch=cfg.steps_per_epoch, start_epoch=first_epoch, start_step=first_step,
        augment=augment, crop_padding=crop_padding, extras=extras)
    distiller.fit(batches, validation_data=val_ds, initial_epoch=first_epoch,
                  epochs=last_epoch, steps_per_epoch=steps - first_step, callbacks=callbacks,
                  verbose=progress_verbosity())
    return bool(distiller.stop_training)

  if not done and step:  # Keras runs whole epochs: finish the interrupted one on its own
    done = run(epoch, step, epoch + 1)
    epoch, step = epoch + 1, 0
  if not done and epoch < cfg.epochs:
    run(epoch, 0, cfg.epochs)
  distiller.student.load_weights(checkpoint.best_path)
  if not keep_backup:
    resume_lib.discard(backup_dir)
  hist = backup.history
  return FitResult(history=hist, best_epoch=checkpoint.best_epoch + 1,
                   best_val_accuracy=float(checkpoint.best),
                   epochs_run=len(hist.get("loss", [])), seconds=backup.seconds,
                   steps_per_epoch=steps,
                   resumed_from=({"epochs_done": restored.epoch, "steps_done": restored.step}
                                 if restored else None))


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


def progress_verbosity() -> int:
  """Keras' progress bar (1) when stdout is a terminal; else 0, and EpochLogger's one line per
  epoch is the progress (a bar's carriage returns make a log file unreadable)."""
  import sys  # pylint: disable=g-import-not-at-top
  return 1 if getattr(sys.stdout, "isatty", lambda: False)() else 0


class EpochLogger(keras.callbacks.Callback):
  """One absl log line per epoch, so a long run shows progress without Keras' progress bar
  (silent when the bar is shown: progress_verbosity)."""

  def __init__(self, role, epochs):
    super().__init__()
    self.role, self.epochs = role, epochs

  def on_epoch_end(self, epoch, logs=None):
    from absl import logging  # pylint: disable=g-import-not-at-top
    if progress_verbosity():
      return
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted((logs or {}).items()))
    logging.info("%s epoch %d/%d: %s", self.role, epoch + 1, self.epochs, shown)
