"""Fit a Distiller with Keras callbacks: TensorBoard, per-epoch student checkpoints (last and
best on validation accuracy), a NaN/Inf guard that names the term, optional early stopping,
and a backup from which a killed run resumes (training/resume.py). The student returned
carries the weights of its best validation epoch: selection never looks at the test split."""
import dataclasses
import math
import os
import time
import warnings
from typing import Dict, List, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from tfjac import atomic
from tfjac import data as data_lib
from tfjac.config import TrainConfig
from tfjac.errors import NonFiniteLossError, NonFiniteWeightsError
from tfjac.training import resume as resume_lib


class _L2Penalty:
  """Adds `l2 * w` to each variable's gradient before the optimizer's own update (momentum,
  Adam moments): the L2 penalty l2/2 ||w||^2 in the loss, as PyTorch's `weight_decay` and the
  attention-transfer reference code. Every trained variable is decayed (kernels, biases,
  BatchNorm scales and offsets), as there; variables without a gradient in a step are
  skipped, as in PyTorch. Not Keras's `weight_decay`, which shrinks w by lr * wd after the
  update, outside the momentum (decoupled)."""

  def __init__(self, *args, l2=0.0, **kwargs):
    super().__init__(*args, **kwargs)
    self.l2 = float(l2)

  def update_step(self, gradient, variable, learning_rate):
    if self.l2:
      gradient = keras.ops.add(gradient, keras.ops.multiply(
          keras.ops.cast(self.l2, variable.dtype), variable))
    super().update_step(gradient, variable, learning_rate)

  def get_config(self):
    return {**super().get_config(), "l2": self.l2}


@keras.saving.register_keras_serializable(package="tfjac")
class SGDWithL2(_L2Penalty, keras.optimizers.SGD):
  """keras SGD on the gradient of loss + l2/2 ||w||^2 (see _L2Penalty)."""


@keras.saving.register_keras_serializable(package="tfjac")
class AdamWithL2(_L2Penalty, keras.optimizers.Adam):
  """keras Adam on the gradient of loss + l2/2 ||w||^2 (PyTorch Adam's weight_decay)."""


@dataclasses.dataclass(frozen=True)
class Budget:
  """How long a fit runs: `epochs` epochs of `steps_per_epoch` steps, the last one cut so that
  `total_steps` optimizer steps run in all (only a --train_steps budget cuts it)."""
  steps_per_epoch: int
  epochs: int
  total_steps: int


# With --train_steps and no --steps_per_epoch, an epoch (validation, checkpoint, backup) is one
# pass, but never shorter than train_steps / MAX_BUDGET_EPOCHS steps: 3 images per class at
# batch 32 are one step per pass, and 2,160 one-step epochs would spend the run validating.
MAX_BUDGET_EPOCHS = 100


def budget(cfg: TrainConfig, num_examples: int) -> Budget:
  """--epochs epochs, or with --train_steps=N exactly N steps in as many epochs as needed.
  An epoch is --steps_per_epoch steps, or one pass over the `num_examples` (the last batch
  partial); under --train_steps=N at least ceil(N / MAX_BUDGET_EPOCHS) steps (several passes,
  the stream reshuffled at each)."""
  one_pass = max(1, math.ceil(num_examples / cfg.batch_size))
  steps = cfg.steps_per_epoch or one_pass
  if cfg.train_steps and not cfg.steps_per_epoch:
    steps = max(one_pass, math.ceil(cfg.train_steps / MAX_BUDGET_EPOCHS))
  if cfg.train_steps:
    return Budget(steps, math.ceil(cfg.train_steps / steps), cfg.train_steps)
  return Budget(steps, cfg.epochs, cfg.epochs * steps)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int,
                   total_steps: Optional[int] = None) -> keras.optimizers.Optimizer:
  """The schedule is over optimizer steps: cosine decays over `total_steps` (default
  epochs x steps_per_epoch); step boundaries are --lr_decay_steps, or --lr_decay_epochs
  converted with `steps_per_epoch`.

  Momentum is Keras's form, v <- m v - lr g; w <- w + v. PyTorch's (v <- m v + g;
  w <- w - lr v) takes the same steps while the learning rate is constant; when a schedule
  changes it, Keras's velocity still holds steps taken at the old rate (about 1 / (1 - m)
  steps, 10 at m = 0.9, after each step boundary)."""
  total = max(1, total_steps or cfg.epochs * steps_per_epoch)
  lr = cfg.learning_rate
  if cfg.lr_schedule == "cosine":
    lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total)
  elif cfg.lr_schedule == "step":
    boundaries = list(cfg.lr_decay_steps) or [e * steps_per_epoch for e in cfg.lr_decay_epochs]
    lr = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=boundaries,
        values=[cfg.learning_rate * cfg.lr_decay_factor ** i
                for i in range(len(boundaries) + 1)])
  l2 = cfg.weight_decay if cfg.weight_decay_kind == "l2" else 0.0
  wd = (cfg.weight_decay if cfg.weight_decay_kind == "decoupled" else 0.0) or None
  if cfg.optimizer == "sgd":
    if l2:
      return SGDWithL2(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, l2=l2)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=wd)
  if cfg.optimizer == "adam":
    if l2:
      return AdamWithL2(lr, l2=l2)
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


class StepBudget(keras.callbacks.Callback):
  """Stops the fit once `total_steps` optimizer steps have run (the last epoch of a
  --train_steps budget is shorter); Keras then still validates and ends that epoch.
  `batch_offset`: set by fit() when a fit() call runs only the rest of an epoch."""

  batch_offset = 0

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

  def __init__(self, distiller, cheap, full_ds, jacobian_ds, *, every, epochs, jacobian_hints):
    super().__init__()
    self.distiller, self.cheap, self.full_ds, self.jacobian_ds = (distiller, cheap, full_ds,
                                                                  jacobian_ds)
    self.every, self.epochs, self.jacobian_hints = every, epochs, jacobian_hints
    self.cheap_names = {n for n, _ in cheap.hint_weights}

  def jacobian_epoch(self, epoch):
    return epoch % self.every == 0 or epoch + 1 == self.epochs

  timer = None  # a PhaseTimer, set by fit()

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
        logs["val_loss"] += weights[hint] * logs[f"val_{name}"]
      elif name.endswith("_jac_norm"):
        logs[f"val_{name}"] = float(np.asarray(value))


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


def validation_pipeline(model, split, batch_size):
  """Validation batches; with a teacher, each carries the teacher's outputs for `model`'s
  hints (teacher_pass at step 0, what test_step would compute), computed once here: the
  teacher is frozen and validation never augments, so they are the same every epoch."""
  if model.teacher is None:
    return data_lib.pipeline(split, batch_size, training=False)
  from tfjac.training import teacher_cache as cache_lib  # pylint: disable=g-import-not-at-top
  extras = cache_lib.compute(model, split, batch_size)
  ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels, extras))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def validation_subset(split, examples, seed):
  """The fixed subset of `examples` validation examples (all when 0 or more than there are):
  a seeded choice, in split order, the same at every epoch."""
  if not examples or examples >= len(split):
    return split
  rng = np.random.default_rng([seed, 15])
  return split.take(np.sort(rng.choice(len(split), examples, replace=False)))


@dataclasses.dataclass
class FitResult:
  history: Dict[str, List[float]]
  best_epoch: int
  best_val_accuracy: float
  epochs_run: int
  seconds: float
  steps_per_epoch: int
  # {training, validation, other} wall seconds of this fit call (PhaseTimer)
  phases: Optional[Dict[str, float]] = None
  resumed_from: Optional[Dict[str, int]] = None  # {"epochs_done", "steps_done"} of the backup
  total_steps: int = 0  # the budget in optimizer steps (fewer if early stopping stopped it)


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
  plan = budget(cfg, len(train_split))
  steps = plan.steps_per_epoch
  # The stream's epochs: one pass each (0), unless the budget's epochs are longer than a pass.
  one_pass = max(1, math.ceil(len(train_split) / cfg.batch_size))
  stream_steps = cfg.steps_per_epoch or (steps if steps != one_pass else 0)
  backup_dir = os.path.join(checkpoint_dir, resume_lib.BACKUP_DIR)
  restored = None
  if resume:
    restored = resume_lib.read(backup_dir, settings)
  else:
    resume_lib.discard(backup_dir)
  jit = resolve_jit_compile(cfg.jit_compile, distiller.distribute_strategy.num_replicas_in_sync)
  with distiller.distribute_strategy.scope():  # the optimizer's variables are per replica
    distiller.compile(optimizer=make_optimizer(cfg, steps, plan.total_steps), jit_compile=jit)
  extras = None
  if teacher_cache:
    from tfjac.training import teacher_cache as cache_lib  # pylint: disable=g-import-not-at-top
    extras = cache_lib.compute(distiller, train_split, cfg.batch_size)
    logging.info("teacher outputs cached for %d training examples (%.1f MiB): %s",
                 len(train_split), cache_lib.size_mib(extras), ", ".join(sorted(extras)))
  checkpoint = StudentCheckpoint(distiller.student, checkpoint_dir)
  guard = NonFiniteGuard()
  stateful = {"checkpoint": checkpoint}
  # Keras writes val_* for validation_data; SplitValidation, first, writes them instead
  # when the Jacobian terms are validated on a subset or not every epoch.
  jacobian_hints = distiller.jacobian_hints
  validation = []
  if jacobian_hints and (cfg.val_jac_every > 1 or 0 < cfg.val_jac_examples <
                         len(validation_split)):
    cheap_hints = [(n, w) for n, w in distiller.hint_weights if n not in jacobian_hints]
    with distiller.distribute_strategy.scope():
      cheap = distiller.with_hints(cheap_hints or [("ce", 0.0)])
      cheap.compile(jit_compile=False)
    subset = validation_subset(validation_split, cfg.val_jac_examples, seed)
    val_ds = validation_pipeline(cheap, validation_split, cfg.batch_size)
    validation = [SplitValidation(
        distiller, cheap, val_ds, validation_pipeline(distiller, subset, cfg.batch_size),
        every=cfg.val_jac_every, epochs=plan.epochs, jacobian_hints=jacobian_hints)]
    logging.info("validation: accuracy and %s on the %d validation examples every epoch; "
                 "%s on %d of them every %d epoch(s)", ",".join(n for n, _ in cheap_hints)
                 or "no other hint", len(validation_split), ",".join(jacobian_hints),
                 len(subset), cfg.val_jac_every)
  else:
    val_ds = validation_pipeline(distiller, validation_split, cfg.batch_size)
  timer = PhaseTimer()
  for v in validation:
    v.timer = timer
  callbacks = [timer] + validation + [guard, checkpoint,
                            keras.callbacks.TensorBoard(log_dir=log_dir, update_freq="epoch")]
  if cfg.early_stopping_patience:
    stateful["early_stopping"] = ResumableEarlyStopping(
        monitor="val_accuracy", mode="max", patience=cfg.early_stopping_patience)
    callbacks.append(stateful["early_stopping"])
  callbacks.extend(extra_callbacks)
  stopper = None
  if plan.total_steps < plan.epochs * steps:  # the budget ends inside the last epoch
    stopper = StepBudget(plan.total_steps, steps)
    callbacks.append(stopper)
  backup = resume_lib.TrainingBackup(backup_dir, stateful=stateful, epochs=plan.epochs,
                                     steps_per_epoch=steps, every_steps=cfg.backup_every_steps,
                                     settings=settings, total_steps=plan.total_steps)
  callbacks.append(backup)
  epoch, step, done = 0, 0, False
  if restored:
    backup.restore(restored)
    epoch, step, done = restored.epoch, restored.step, restored.done
    logging.info("resuming from %s: %d epoch(s) and %d step(s) done%s", backup_dir, epoch,
                 step, "; the fit had finished" if done else "")

  # Keras warns that shuffle=True is ignored for a tf.data input; the pipeline shuffles itself.
  warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")

  def run(first_epoch, first_step, last_epoch):
    for cb in (guard, backup, stopper):
      if cb is not None:
        cb.batch_offset = first_step
    batches = data_lib.training_batches(
        train_split, cfg.batch_size, seed=seed, epochs=plan.epochs,
        steps_per_epoch=stream_steps, start_epoch=first_epoch, start_step=first_step,
        augment=augment, crop_padding=crop_padding, extras=extras)
    distiller.fit(batches, validation_data=None if validation else val_ds,
                  initial_epoch=first_epoch,
                  epochs=last_epoch, steps_per_epoch=steps - first_step, callbacks=callbacks,
                  verbose=progress_verbosity())
    return bool(distiller.stop_training)

  fit_start = time.perf_counter()
  if not done and step:  # Keras runs whole epochs: finish the interrupted one on its own
    done = run(epoch, step, epoch + 1)
    epoch, step = epoch + 1, 0
  if not done and epoch < plan.epochs:
    run(epoch, 0, plan.epochs)
  fit_seconds = time.perf_counter() - fit_start
  distiller.student.load_weights(checkpoint.best_path)
  if not keep_backup:
    resume_lib.discard(backup_dir)
  hist = backup.history
  return FitResult(history=hist, best_epoch=checkpoint.best_epoch + 1,
                   best_val_accuracy=float(checkpoint.best),
                   epochs_run=len(hist.get("loss", [])), seconds=backup.seconds,
                   steps_per_epoch=steps, phases=timer.summary(fit_seconds),
                   resumed_from=({"epochs_done": restored.epoch, "steps_done": restored.step}
                                 if restored else None),
                   total_steps=plan.total_steps)


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
    # fit()'s own epoch count: --epochs, or the epochs derived from --train_steps.
    total = (self.params or {}).get("epochs") or self.epochs
    logging.info("%s epoch %d/%d: %s", self.role, epoch + 1, total, shown)
