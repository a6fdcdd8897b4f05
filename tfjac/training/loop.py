"""Fit a Distiller: the step budget, the optimizer, the callbacks (training/callbacks.py:
TensorBoard, per-epoch student checkpoints (last and best on validation accuracy), a NaN/Inf
guard that names the term, optional early stopping) and a backup from which a killed run
resumes (training/resume.py). The student returned carries the weights of its best validation
epoch: selection never looks at the test split."""
import dataclasses
import math
import os
import time
import warnings
from typing import Dict, List, Optional

import keras
from absl import logging

from tfjac import data as data_lib
from tfjac import errors
from tfjac.config import DataConfig, TrainConfig
from tfjac.training import callbacks as callbacks_lib
from tfjac.training import evaluation
from tfjac.training import optimizers
from tfjac.training import resume as resume_lib


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
  # The last epoch's logs: only the terms that epoch computed (history's lists hold the
  # epochs that logged each term, so a lazy Jacobian term's last entry may be older).
  final_metrics: Optional[Dict[str, float]] = None


@dataclasses.dataclass(frozen=True)
class FitDirs:
  """Where a fit writes, and whether it continues a killed one."""
  log_dir: str  # TensorBoard
  checkpoint_dir: str  # the student's last and best weights, and the resume backup (backup/)
  # Continue a backup left by a killed fit with the same `settings` (else it is discarded).
  resume: bool = False
  settings: Optional[dict] = None  # what a backup must have been written under to continue
  # Leave the finished fit's backup in place, for a caller that still has outputs to write
  # and discards it afterwards (modes/common.py); a kill before then resumes with no epoch
  # left to run.
  keep_backup: bool = False


def resolve_jit_compile(jit_compile: bool, replicas: int, setting: str = "train") -> bool:
  """<setting>.jit_compile as it can be honoured: off, with a logged reason, over several
  replicas (reached with the auto strategy and several GPUs; explicit strategies are refused).
  `setting`: the fit's TrainConfig in Config ('train', or 'teacher.train')."""
  if jit_compile and replicas > 1:
    logging.warning("%s turned off: XLA cannot compile a step over %d replicas "
                    "(their variables live on other devices; Keras disables XLA under "
                    "tf.distribute too)", errors.say(errors.mention(f"{setting}.jit_compile")),
                    replicas)
    return False
  return jit_compile


def fit(distiller, train_split, validation_split, cfg: TrainConfig, dirs: FitDirs, *,
        data: DataConfig = DataConfig(), extra_callbacks=(), teacher_cache=False,
        setting: str = "train") -> FitResult:
  """Compiles and fits `distiller`, then loads the best-validation student weights into it.

  `cfg`: the optimisation and budget; `dirs`: where the fit writes and whether it continues a
  killed one (FitDirs); `data`: the training stream's seed and augmentation (its seed, augment
  and crop_padding). teacher_cache: compute the teacher's outputs once per example first and
  feed them with the data (training/teacher_cache.py; the caller checks that this is valid,
  config.py). `setting`: where `cfg` sits in Config ('train', or 'teacher.train' for the
  teacher's fit), for the messages that name its fields.
  """
  plan = optimizers.budget(cfg, len(train_split))
  steps = plan.steps_per_epoch
  # The stream's epochs: one pass each (0), unless the budget's epochs are longer than a pass.
  one_pass = max(1, math.ceil(len(train_split) / cfg.batch_size))
  stream_steps = cfg.steps_per_epoch or (steps if steps != one_pass else 0)
  backup_dir = os.path.join(dirs.checkpoint_dir, resume_lib.BACKUP_DIR)
  restored = None
  if dirs.resume:
    restored = resume_lib.read(backup_dir, dirs.settings)
  else:
    resume_lib.discard(backup_dir)
  jit = resolve_jit_compile(cfg.jit_compile, distiller.distribute_strategy.num_replicas_in_sync,
                            setting)
  with distiller.distribute_strategy.scope():  # the optimizer's variables are per replica
    distiller.compile(optimizer=optimizers.make_optimizer(cfg, steps, plan.total_steps),
                      jit_compile=jit)
  extras = None
  if teacher_cache:
    from tfjac.training import teacher_cache as cache_lib  # pylint: disable=g-import-not-at-top
    extras = cache_lib.compute(distiller, train_split, cfg.batch_size)
    logging.info("teacher outputs cached for %d training examples (%.1f MiB): %s",
                 len(train_split), cache_lib.size_mib(extras), ", ".join(sorted(extras)))
  checkpoint = callbacks_lib.StudentCheckpoint(distiller.student, dirs.checkpoint_dir)
  guard = callbacks_lib.NonFiniteGuard()
  stateful = {"checkpoint": checkpoint}
  # Keras writes val_* for validation_data; SplitValidation, first, writes them instead
  # when the Jacobian terms are validated on a subset or not every epoch.
  jacobian_hints = distiller.jacobian_hints
  timer = callbacks_lib.PhaseTimer()
  validation = []
  if jacobian_hints and (cfg.val_jac_every > 1 or 0 < cfg.val_jac_examples <
                         len(validation_split)):
    cheap_hints = [(n, w) for n, w in distiller.hint_weights if n not in jacobian_hints]
    with distiller.distribute_strategy.scope():
      cheap = distiller.with_hints(cheap_hints or [("ce", 0.0)])
      cheap.compile(jit_compile=False)
    subset = evaluation.validation_subset(validation_split, cfg.val_jac_examples, data.seed)
    val_ds = evaluation.validation_pipeline(cheap, validation_split, cfg.batch_size)
    validation = [callbacks_lib.SplitValidation(
        distiller, cheap, val_ds,
        evaluation.validation_pipeline(distiller, subset, cfg.batch_size),
        every=cfg.val_jac_every, epochs=plan.epochs, jacobian_hints=jacobian_hints,
        timer=timer)]
    logging.info("validation: accuracy and %s on the %d validation examples every epoch; "
                 "%s on %d of them every %d epoch(s)", ",".join(n for n, _ in cheap_hints)
                 or "no other hint", len(validation_split), ",".join(jacobian_hints),
                 len(subset), cfg.val_jac_every)
  else:
    val_ds = evaluation.validation_pipeline(distiller, validation_split, cfg.batch_size)
  callbacks = [timer] + validation + [guard, checkpoint,
                            keras.callbacks.TensorBoard(log_dir=dirs.log_dir, update_freq="epoch")]
  if cfg.early_stopping_patience:
    stateful["early_stopping"] = callbacks_lib.ResumableEarlyStopping(
        monitor="val_accuracy", mode="max", patience=cfg.early_stopping_patience)
    callbacks.append(stateful["early_stopping"])
  callbacks.extend(extra_callbacks)
  stopper = None
  if plan.total_steps < plan.epochs * steps:  # the budget ends inside the last epoch
    stopper = callbacks_lib.StepBudget(plan.total_steps, steps)
    callbacks.append(stopper)
  backup = resume_lib.TrainingBackup(backup_dir, stateful=stateful, epochs=plan.epochs,
                                     steps_per_epoch=steps, every_steps=cfg.backup_every_steps,
                                     settings=dirs.settings, total_steps=plan.total_steps)
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
    for cb in (guard, backup, stopper):  # this call's batch 0 is the epoch's first_step
      if cb is not None:
        cb.starts_at(first_step)
    batches = data_lib.training_batches(
        train_split, cfg.batch_size, seed=data.seed, epochs=plan.epochs,
        steps_per_epoch=stream_steps, start_epoch=first_epoch, start_step=first_step,
        augment=data.augment, crop_padding=data.crop_padding, extras=extras)
    distiller.fit(batches, validation_data=None if validation else val_ds,
                  initial_epoch=first_epoch,
                  epochs=last_epoch, steps_per_epoch=steps - first_step, callbacks=callbacks,
                  verbose=callbacks_lib.progress_verbosity())
    return bool(distiller.stop_training)

  fit_start = time.perf_counter()
  if not done and step:  # Keras runs whole epochs: finish the interrupted one on its own
    done = run(epoch, step, epoch + 1)
    epoch, step = epoch + 1, 0
  if not done and epoch < plan.epochs:
    run(epoch, 0, plan.epochs)
  fit_seconds = time.perf_counter() - fit_start
  distiller.student.load_weights(checkpoint.best_path)
  if not dirs.keep_backup:
    resume_lib.discard(backup_dir)
  hist = backup.history
  return FitResult(history=hist, best_epoch=checkpoint.best_epoch + 1,
                   best_val_accuracy=float(checkpoint.best),
                   epochs_run=len(hist.get("loss", [])), seconds=backup.seconds,
                   steps_per_epoch=steps, phases=timer.summary(fit_seconds),
                   resumed_from=({"epochs_done": restored.epoch, "steps_done": restored.step}
                                 if restored else None),
                   total_steps=plan.total_steps, final_metrics=dict(backup.last_logs))
