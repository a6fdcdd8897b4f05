"""The Keras callbacks of a fit: per-epoch student checkpoints (last and best on validation
accuracy), early stopping and best-so-far that survive a restart, a NaN/Inf guard that names
the term, the train_steps stop, the cheaper split validation, phase timing and a log line
per epoch. training/loop.py puts them together."""
import math
import os
import sys
import time

import keras
import numpy as np
from absl import logging

from tfjac import atomic
from tfjac.errors import NonFiniteLossError, NonFiniteWeightsError
from tfjac.training import resume as resume_lib


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


class EpochPosition:
  """For a callback that needs a batch's place in its epoch. Keras numbers the batches of each
  fit() call from 0; a fit() call that finishes an interrupted epoch starts `step` steps into
  it, which `starts_at(step)` says before that call (training/loop.py)."""

  batch_offset = 0

  def starts_at(self, step: int):
    self.batch_offset = int(step)
    return self


class NonFiniteGuard(EpochPosition, keras.callbacks.Callback):
  """Stops at the first batch where a logged term is NaN or Inf, naming the term (its batch
  counted from the start of the epoch: EpochPosition)."""

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    # Hint terms before the total, so that the message names the term that broke.
    for name, value in sorted((logs or {}).items(), key=lambda kv: kv[0] == "loss"):
      v = float(value)
      if not math.isfinite(v):
        raise NonFiniteLossError(name, getattr(self, "_epoch", 0), self.batch_offset + batch, v)


class StepBudget(EpochPosition, keras.callbacks.Callback):
  """Stops the fit once `total_steps` optimizer steps have run (the last epoch of a
  train_steps budget is shorter); Keras then still validates and ends that epoch."""

  def __init__(self, total_steps, steps_per_epoch):
    super().__init__()
    self.total_steps, self.steps_per_epoch = total_steps, steps_per_epoch
    self._epoch = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if self._epoch * self.steps_per_epoch + self.batch_offset + batch + 1 >= self.total_steps:
      self.model.stop_training = True


class SplitValidation(keras.callbacks.Callback):
  """Validation at the cost model selection needs (issue 15): every epoch, accuracy and the
  hints without Jacobians on the whole validation split (`cheap`: a Distiller on those hints
  sharing the networks); the Jacobian hints' terms (and Jacobian norms) on `jacobian_ds`, a
  fixed subset, on the first, every `every`-th and the last epoch. Writes the usual val_*
  logs, before the callbacks that read them (checkpoint, early stopping, TensorBoard,
  backup). val_loss is the cheap terms' weighted sum on the whole split plus the Jacobian
  terms' on the subset; on epochs without Jacobian terms it is the cheap part alone."""

  def __init__(self, distiller, cheap, full_ds, jacobian_ds, *, every, epochs, jacobian_hints,
               timer=None):
    super().__init__()
    self.timer = timer  # a PhaseTimer: the seconds spent here count as validation
    self.distiller, self.cheap, self.full_ds, self.jacobian_ds = (distiller, cheap, full_ds,
                                                                  jacobian_ds)
    self.every, self.epochs, self.jacobian_hints = every, epochs, jacobian_hints
    self.cheap_names = {n for n, _ in cheap.hint_weights}

  def jacobian_epoch(self, epoch):
    return epoch % self.every == 0 or epoch + 1 == self.epochs

  def on_epoch_end(self, epoch, logs=None):
    start = time.perf_counter()
    try:
      self._validate(epoch, logs)
    finally:
      if self.timer is not None:
        self.timer.add("validation", time.perf_counter() - start)

  def _validate(self, epoch, logs):
    if logs is None:
      return
    measured = self.cheap.evaluate(self.full_ds, verbose=0, return_dict=True)
    for name, value in measured.items():
      if name.endswith("_loss") and name[:-len("_loss")] not in self.cheap_names:
        continue  # the placeholder ce of a cheap model without hints
      logs[f"val_{name}"] = float(np.asarray(value))
    if not self.jacobian_epoch(epoch):
      return
    weights = dict(self.distiller.hint_weights)
    jacobian = self.distiller.evaluate(self.jacobian_ds, verbose=0, return_dict=True)
    for name, value in jacobian.items():
      hint = name[:-len("_loss")] if name.endswith("_loss") else None
      if hint in self.jacobian_hints:
        logs[f"val_{name}"] = float(np.asarray(value))
        # Weighted as the Distiller weighs it: over its scale (training/term_scales.py).
        scale = float(self.distiller.term_scales.scale(hint))
        logs["val_loss"] += weights[hint] / scale * logs[f"val_{name}"]
      elif name.endswith("_jac_norm"):
        logs[f"val_{name}"] = float(np.asarray(value))


class DropUnmeasured(keras.callbacks.Callback):
  """Removes from an epoch's logs the training terms that no step of the epoch computed (lazy
  Jacobian matching: an epoch without a Jacobian step), so that TensorBoard, the history and
  results.json get no value for them instead of Keras' Mean of nothing, 0. The model's
  `unmeasured_metrics()` is read before validation resets the metrics (on_test_begin) and
  again at the epoch's end when Keras does not validate; it must be the first callback, before
  any that reads or writes the logs (Distiller.fit puts it first)."""

  def on_epoch_begin(self, epoch, logs=None):
    self._unmeasured = None

  def on_test_begin(self, logs=None):
    if getattr(self, "_unmeasured", False) is None:  # inside a training epoch
      self._unmeasured = self.model.unmeasured_metrics()

  def on_epoch_end(self, epoch, logs=None):
    unmeasured = self._unmeasured
    if unmeasured is None:
      unmeasured = self.model.unmeasured_metrics()
    self._unmeasured = False
    for name in unmeasured:
      (logs or {}).pop(name, None)


class PhaseTimer(keras.callbacks.Callback):
  """Wall seconds of a fit split into training steps (first batch begin to last batch end of
  each epoch), validation (Keras' own, and SplitValidation's) and the rest ('other': graph
  tracing, per-epoch callbacks: checkpoints, backup, TensorBoard; tf.data set-up), for the run-level
  profile (tools/run_profile.py). Measures only; one perf_counter per batch."""

  def __init__(self):
    super().__init__()
    self.seconds = {"training": 0.0, "validation": 0.0}
    self._t = {}

  def on_train_batch_begin(self, batch, logs=None):
    self._t["batch"] = time.perf_counter()

  def on_train_batch_end(self, batch, logs=None):
    self.seconds["training"] += time.perf_counter() - self._t.pop("batch")

  def on_test_begin(self, logs=None):
    self._t["test"] = time.perf_counter()

  def on_test_end(self, logs=None):
    self.seconds["validation"] += time.perf_counter() - self._t.pop("test")

  def add(self, phase, seconds):
    self.seconds[phase] += seconds

  def summary(self, total):
    out = {k: round(v, 2) for k, v in self.seconds.items()}
    out["other"] = round(total - sum(self.seconds.values()), 2)
    return out


def progress_verbosity() -> int:
  """Keras' progress bar (1) when stdout is a terminal; else 0, and EpochLogger's one line per
  epoch is the progress (a bar's carriage returns make a log file unreadable)."""
  return 1 if getattr(sys.stdout, "isatty", lambda: False)() else 0


class EpochLogger(keras.callbacks.Callback):
  """One absl log line per epoch, so a long run shows progress without Keras' progress bar
  (silent when the bar is shown: progress_verbosity)."""

  def __init__(self, role, epochs):
    super().__init__()
    self.role, self.epochs = role, epochs

  def on_epoch_end(self, epoch, logs=None):
    if progress_verbosity():
      return
    shown = " ".join(f"{k}={float(v):.4g}" for k, v in sorted((logs or {}).items()))
    # fit()'s own epoch count: epochs, or the epochs derived from train_steps.
    total = (self.params or {}).get("epochs") or self.epochs
    logging.info("%s epoch %d/%d: %s", self.role, epoch + 1, total, shown)
