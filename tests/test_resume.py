"""Resuming a fit in-process: interrupted by an exception at a chosen step, fitted again with
the same settings, it ends where the uninterrupted fit ends. (The kill -9 version of this, with
the command line, is in test_faults.py.)"""
import json
import re
import os

import keras
import numpy as np
import pytest

from tfjac.config import DataConfig, HintConfig, TrainConfig
from tfjac import checks
from tfjac.errors import NonFiniteWeightsError, SettingError
from tfjac.training import loop
from tfjac.training import resume as resume_lib
from tfjac.training.distiller import Distiller
from tests import helpers

CFG = TrainConfig(epochs=3, batch_size=16, steps_per_epoch=3, backup_every_steps=1,
                  early_stopping_patience=2)


class _Interrupt(keras.callbacks.Callback):
  """Raises at (epoch, batch), before the backup of that step: like a kill just before it."""

  def __init__(self, epoch, batch):
    super().__init__()
    self.at = (epoch, batch)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if (self._epoch, batch) == self.at:
      raise KeyboardInterrupt


@pytest.fixture
def fit(tmp_path, digits_splits):
  info = digits_splits.info
  train = digits_splits.sampled_train(4, 0)

  def run(name, *, settings=None, extra=(), resume=True, cfg=CFG,
          loss_scaling=HintConfig.loss_scaling):
    keras.utils.set_random_seed(7)
    student, teacher = helpers.tiny_vgg(info), helpers.tiny_vgg(info)
    # act and ce only, to keep this quick: the Jacobian term is resumed in test_faults.py.
    distiller = Distiller(
        student, teacher, hints=HintConfig.of([("act", 1.0), ("ce", 1.0)],
                                              loss_scaling=loss_scaling))
    result = loop.fit(distiller, train, digits_splits.validation, cfg,
                      loop.FitDirs(str(tmp_path / name / "tb"), str(tmp_path / name),
                                   resume=resume, settings=settings or {"lr": 1e-3},
                                   keep_backup=True),
                      data=DataConfig(seed=1, augment=("flip",)), extra_callbacks=extra)
    return distiller, result

  return run


def test_interrupted_fit_resumes_to_the_same_weights_and_history(fit, tmp_path):
  reference, expected = fit("reference")
  with pytest.raises(KeyboardInterrupt):
    fit("interrupted", extra=[_Interrupt(epoch=1, batch=1)])
  state = json.loads((tmp_path / "interrupted" / "backup" / "state.json").read_text())
  assert (state["epoch"], state["step"]) == (1, 1)
  # A later epoch's best checkpoint written just before the kill must not survive the resume.
  (tmp_path / "interrupted" / "best.weights.h5").write_bytes(b"written after the backup")
  resumed, got = fit("interrupted")
  assert got.resumed_from == {"epochs_done": 1, "steps_done": 1}
  for a, b in zip(reference.student.get_weights(), resumed.student.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert got.history == expected.history
  assert (got.best_epoch, got.best_val_accuracy) == (expected.best_epoch,
                                                     expected.best_val_accuracy)
  best = json.loads((tmp_path / "interrupted" / "best.json").read_text())
  assert best["epoch"] == expected.best_epoch


@pytest.mark.parametrize("scaling", ["initial", "running"])
def test_an_interrupted_fit_resumes_with_the_loss_scales_it_had(fit, scaling):
  # Resumed from epoch 0, step 1: inside the first 10 steps that 'initial' averages over.
  reference, _ = fit("reference", loss_scaling=scaling)
  with pytest.raises(KeyboardInterrupt):
    fit("interrupted", extra=[_Interrupt(epoch=0, batch=1)], loss_scaling=scaling)
  resumed, got = fit("interrupted", loss_scaling=scaling)
  assert got.resumed_from == {"epochs_done": 0, "steps_done": 1}
  for a, b in zip(reference.term_scales.variables, resumed.term_scales.variables):
    np.testing.assert_array_equal(a.numpy(), b.numpy())
  for a, b in zip(reference.student.get_weights(), resumed.student.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_a_finished_fit_is_not_trained_again(fit):
  first, expected = fit("run")
  again, got = fit("run")  # its backup says done: outputs were missing, not epochs
  assert got.history == expected.history and got.resumed_from["epochs_done"] == 3
  for a, b in zip(first.student.get_weights(), again.student.get_weights()):
    np.testing.assert_array_equal(a, b)


def test_a_backup_of_other_settings_is_refused_or_discarded(fit, tmp_path):
  with pytest.raises(KeyboardInterrupt):
    fit("run", extra=[_Interrupt(epoch=0, batch=1)])
  # The library names its argument (resume=False); the command line's face names the flag.
  with pytest.raises(SettingError, match=r"resume: .*backup of an interrupted run with other "
                     r"settings \(lr: 0.001 then, 0.1 now\).*pass resume=False") as e:
    fit("run", settings={"lr": 0.1})
  assert re.search(r"--resume: .*backup of an interrupted run with other settings \(lr: 0.001 "
                   r"then, 0.1 now\).*--noresume", str(checks.as_flag_error(e.value)))
  _, result = fit("run", settings={"lr": 0.1}, resume=False)
  assert result.resumed_from is None and result.epochs_run == 3


def test_an_unreadable_backup_says_how_to_start_over(tmp_path):
  directory = tmp_path / "backup"
  directory.mkdir()
  (directory / "state.json").write_text("{ truncated")
  with pytest.raises(SettingError, match=r"resume: the backup .*state.json cannot be read.*"
                     r"resume=False") as e:
    resume_lib.read(str(directory), {})
  assert re.search(r"--resume: the backup .*state.json cannot be read.*--noresume",
                   str(checks.as_flag_error(e.value)))
  resume_lib.discard(str(directory))
  assert not os.path.exists(directory)
  assert resume_lib.read(str(directory), {}) is None


class _Overflow(keras.callbacks.Callback):
  """NaN into a student kernel after a step whose losses were finite: a gradient overflow."""

  def __init__(self, batch):
    super().__init__()
    self.batch = batch

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_end(self, batch, logs=None):
    if (self._epoch, batch) == (1, self.batch):
      kernel = self.model.student.get_layer("logits").kernel
      kernel.assign(np.full(kernel.shape, np.nan, np.float32))


@pytest.mark.parametrize("every_steps, batch, when", [
    (1, 0, "epoch 2, step 1"),  # the mid-epoch backup refuses
    (0, 2, "the end of epoch 2"),  # after the epoch's last step: the checkpoint refuses
])
def test_non_finite_weights_are_never_backed_up(fit, tmp_path, every_steps, batch, when):
  cfg = TrainConfig(**{**CFG.__dict__, "backup_every_steps": every_steps})
  with pytest.raises(NonFiniteWeightsError, match=rf"student variable .*logits/kernel.* became "
                     rf"NaN or Inf by {when} although every loss term was finite"):
    fit("run", extra=[_Overflow(batch)], cfg=cfg)
  state = json.loads((tmp_path / "run" / "backup" / "state.json").read_text())
  assert (state["epoch"], state["step"]) == (1, 0)  # the backup before the overflow
  best = tmp_path / "run" / "best.weights.h5"
  assert json.loads((tmp_path / "run" / "best.json").read_text())["epoch"] == 1 and best.exists()
