"""Resuming an interrupted fit: a backup of everything the rest of the fit depends on, written
atomically at epoch ends (and every N steps), read back when the same command runs again.

<checkpoint_dir>/backup/ holds
  state.json            the commit point: position (epochs done, steps done in the next epoch),
                        whether the fit had finished, callback states (best checkpoint, early
                        stopping), the history so far, the run's settings, and the names of:
  arrays-E-S.npz        student weights, optimizer variables (moments, iteration count) and the
                        metric totals of the epoch so far, at position (E, S)
  best-E-S.weights.h5   a copy of the best-validation student weights as of (E, S)
A save writes new files under new names, replaces state.json (os.replace), then deletes the
files state.json no longer names: a kill at any moment leaves a state.json whose files exist.

Why not keras.callbacks.BackupAndRestore (Keras 3.15): its mid-epoch backups (save_freq=N)
restore to the *start* of the recorded epoch with the mid-epoch weights, so the epoch's first
batches are trained twice; it writes the weights and then the metadata in place, so a kill
between the two resumes with weights and epoch that disagree; and it needs a built model,
which a subclassed Distiller is not. The data side of resuming is data.training_batches, a
pure function of (seed, epoch, step).
"""
import dataclasses
import json
import math
import os
import shutil
import time
from typing import Dict, Optional

import keras
import numpy as np

from tfjac import atomic
from tfjac.errors import NonFiniteWeightsError, SettingError, mention

BACKUP_DIR = "backup"
STATE_FILE = "state.json"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Restored:
  """A backup read from disk."""
  directory: str
  epoch: int  # epochs done: the next epoch to run (0-based)
  step: int  # steps of that epoch already done
  done: bool  # the fit had finished (last epoch or early stop): only outputs are missing
  state: dict

  def path(self, name):
    return os.path.join(self.directory, name)


def _flatten(obj, prefix=""):
  if isinstance(obj, dict):
    out = {}
    for k, v in obj.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: obj}


def _differences(saved, now):
  a, b = _flatten(saved or {}), _flatten(now)
  return [f"{k}: {a.get(k, '(absent)')!r} then, {b.get(k, '(absent)')!r} now"
          for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def read(directory, settings) -> Optional[Restored]:
  """The backup in `directory`, or None; SettingError (resume) if it belongs to other settings
  or cannot be used."""
  path = os.path.join(directory, STATE_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      state = json.load(f)
    missing = [n for n in [state["arrays"], *state["files"].values()]
               if not os.path.exists(os.path.join(directory, n))]
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise SettingError("resume", f"the backup {path} cannot be read ({e}); pass " + mention("resume", False) +
                      " to discard it and start over") from e
  if state.get("format") != FORMAT or missing:
    raise SettingError("resume", f"the backup in {directory} is unusable (format "
                      f"{state.get('format')}, missing files {missing}); pass " + mention("resume", False) +
                      " to discard it and start over")
  diffs = _differences(state.get("settings"), json.loads(json.dumps(settings)))
  if diffs:
    raise SettingError(
        "resume", f"{directory} holds the backup of an interrupted run with other settings "
        f"({'; '.join(diffs[:6])}{' ...' if len(diffs) > 6 else ''}). Rerun with the same "
        "settings to continue it, or pass " + mention("resume", False) + " to discard it and "
        "start over")
  return Restored(directory, int(state["epoch"]), int(state["step"]), bool(state["done"]),
                  state)


def discard(directory):
  """Deletes a backup: state.json first, so that a kill midway leaves no backup at all."""
  state = os.path.join(directory, STATE_FILE)
  if os.path.exists(state):
    os.remove(state)
  shutil.rmtree(directory, ignore_errors=True)


def _variable_groups(distiller) -> Dict[str, list]:
  return {"student": list(distiller.student.weights),
          "optimizer": list(distiller.optimizer.variables),
          "metrics": [v for m in distiller.metrics for v in m.variables],
          "scales": list(distiller.term_scales.variables)}


def _assign(variables, arrays, group, source):
  if len(variables) != len(arrays):
    raise SettingError("resume", f"the backup {source} holds {len(arrays)} {group} variables, "
                      f"the model has {len(variables)}; pass " + mention("resume", False) +
                       " to start over")
  for v, a in zip(variables, arrays):
    if tuple(v.shape) != a.shape:
      raise SettingError("resume", f"the backup {source} does not fit the model ({group} "
                        f"variable {v.path}: {a.shape} vs {tuple(v.shape)}); pass " +
                        mention("resume", False) + " to start over")
    v.assign(a)


class TrainingBackup(keras.callbacks.Callback):
  """Backs up the fit at every epoch end and every `every_steps` steps, atomically.

  Goes last in the callback list: at an epoch end the checkpoint and early-stopping callbacks
  have already updated the state it saves; at a batch end NonFiniteGuard (first) has already
  stopped a step whose loss is not finite, so a backup never holds NaN weights.
  `stateful`: name -> callback with get_state() / set_state(dict), and optionally
  backup_files() -> {key: path} / restore_files({key: path}) for files to keep with the state.
  `starts_at(step)`: before a fit() call that runs only the rest of an epoch, from `step`.
  """

  def __init__(self, directory, *, stateful, epochs, steps_per_epoch, every_steps, settings,
               total_steps=None):
    super().__init__()
    self.directory, self.stateful = directory, dict(stateful)
    self.epochs, self.steps_per_epoch, self.every_steps = epochs, steps_per_epoch, every_steps
    # A train_steps budget ends inside the last epoch: no mid-epoch backup at or after its
    # end (the epoch-end backup follows at once), so a resumed fit has a step left to run.
    self.total_steps = total_steps or epochs * steps_per_epoch
    self.settings = settings
    self.batch_offset = 0
    self.history: Dict[str, list] = {}
    # The last epoch's logs as they were: a term no step of it computed (lazy Jacobian
    # matching) is absent, where history's list would show an earlier epoch's value last.
    self.last_logs: Dict[str, float] = {}
    self._seconds_before, self._started = 0.0, None
    self._arrays_to_load, self._metrics_to_load = None, None
    self._restore_metrics = False
    self._epoch = 0

  def starts_at(self, step: int):
    """The next fit() call's batch 0 is step `step` of its epoch (callbacks.EpochPosition)."""
    self.batch_offset = int(step)
    return self

  # --- restoring ------------------------------------------------------------------------

  def restore(self, restored: Restored):
    """Applies a backup: callback states and files now, variables at on_train_begin (once the
    optimizer can be built)."""
    state = restored.state
    for name, callback in self.stateful.items():
      callback.set_state(state["callbacks"][name])
      if hasattr(callback, "restore_files"):
        callback.restore_files({k: restored.path(v) for k, v in state["files"].items()
                                if k.startswith(f"{name}.")})
    self.history = {k: list(v) for k, v in state["history"].items()}
    self.last_logs = dict(state.get("last_logs", {}))
    self._seconds_before = float(state["seconds"])
    self._arrays_to_load = restored.path(state["arrays"])
    # Metric totals carry over only into the rest of an interrupted epoch: a backup at an
    # epoch end holds that epoch's (and its validation's) totals, not the next epoch's.
    self._restore_metrics = restored.step > 0

  def on_train_begin(self, logs=None):
    if self._started is None:
      self._started = time.time()
    if self._arrays_to_load is None:
      return
    distiller, path = self.model, self._arrays_to_load
    self._arrays_to_load = None
    with distiller.distribute_strategy.scope():
      if not distiller.optimizer.built:
        distiller.optimizer.build(distiller.student.trainable_variables)
    with np.load(path) as f:
      arrays = {g: [f[f"{g}.{i}"] for i in range(int(f[f"{g}.count"]))]
                for g in ("student", "optimizer", "metrics", "scales")
                if f"{g}.count" in f}
    arrays.setdefault("scales", [])  # a backup written before loss scaling existed
    groups = _variable_groups(distiller)
    for group in ("student", "optimizer", "scales"):
      _assign(groups[group], arrays[group], group, path)
    self._metrics_to_load = arrays["metrics"] if self._restore_metrics else None

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch
    if self._metrics_to_load is not None:  # after fit()'s reset_metrics(): the epoch so far
      _assign(_variable_groups(self.model)["metrics"], self._metrics_to_load, "metrics",
              self.directory)
      self._metrics_to_load = None

  # --- saving ---------------------------------------------------------------------------

  @property
  def seconds(self):
    return self._seconds_before + (time.time() - self._started if self._started else 0.0)

  def on_train_batch_end(self, batch, logs=None):
    step = self.batch_offset + batch + 1
    if (self.every_steps and step % self.every_steps == 0 and step < self.steps_per_epoch
        and self._epoch * self.steps_per_epoch + step < self.total_steps):
      self.save(self._epoch, step, done=False)

  def on_epoch_end(self, epoch, logs=None):
    for k, v in (logs or {}).items():
      self.history.setdefault(k, []).append(float(v))
    self.last_logs = {k: float(v) for k, v in (logs or {}).items()}
    self.save(epoch + 1, 0, done=bool(self.model.stop_training) or epoch + 1 >= self.epochs)

  def save(self, epoch, step, *, done):
    os.makedirs(self.directory, exist_ok=True)
    tag = f"{epoch:05d}-{step:06d}"
    arrays, broken = {}, []
    for group, variables in _variable_groups(self.model).items():
      arrays[f"{group}.count"] = np.asarray(len(variables))
      for i, v in enumerate(variables):
        arrays[f"{group}.{i}"] = np.asarray(keras.ops.convert_to_numpy(v))
        if group != "metrics" and not np.isfinite(arrays[f"{group}.{i}"]).all():
          broken.append(f"{group} variable {v.path}")
    if broken:  # never replace a good backup with a poisoned one
      raise NonFiniteWeightsError(broken, self._epoch if step else epoch - 1, step or None)
    arrays_name = f"arrays-{tag}.npz"
    atomic.write_with(os.path.join(self.directory, arrays_name),
                      lambda f: np.savez(f, **arrays), mode="wb")
    files = {}
    for name, callback in self.stateful.items():
      for key, path in (callback.backup_files() if hasattr(callback, "backup_files")
                        else {}).items():
        if os.path.exists(path):
          files[f"{name}.{key}"] = f"{name}.{key}-{tag}{_extension(path)}"
          atomic.copy_file(path, os.path.join(self.directory, files[f"{name}.{key}"]))
    state = {"format": FORMAT, "epoch": epoch, "step": step, "done": done,
             "settings": self.settings, "seconds": self.seconds, "arrays": arrays_name,
             "files": files, "history": self.history, "last_logs": self.last_logs,
             "callbacks": {n: c.get_state() for n, c in self.stateful.items()}}
    atomic.write_json(os.path.join(self.directory, STATE_FILE), state)
    keep = {STATE_FILE, arrays_name, *files.values()}
    for name in os.listdir(self.directory):
      if name not in keep:
        _remove(os.path.join(self.directory, name))


def _extension(path):
  name = os.path.basename(path)
  return name[name.index("."):] if "." in name else ""


def _remove(path):
  if os.path.isdir(path):
    shutil.rmtree(path, ignore_errors=True)
  elif os.path.exists(path):
    os.remove(path)


def finite_or_none(value):
  """JSON keeps +-inf/nan only as non-standard tokens: store them as None."""
  return None if value is None or not math.isfinite(value) else float(value)
