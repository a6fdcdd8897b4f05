"""--train_steps: a budget in optimizer steps whatever the data size (issue 13). Exactly N steps
run, the schedule spans them, and a fit killed anywhere, even between the last step and the end
of its (shortened) last epoch, resumes to the uninterrupted weights."""
import keras
import numpy as np
import pytest

from tfjac.checks import validate
from tfjac.config import Config, DataConfig, TrainConfig
from tfjac.errors import ConfigError
from tfjac.training import loop, optimizers
from tfjac.training.distiller import Distiller
from tests import helpers

# 40 images at batch 16: 3 steps per epoch (one pass, last batch partial); 7 steps = 3 epochs,
# the last one of a single step.
BUDGET = TrainConfig(epochs=99, train_steps=7, batch_size=16, backup_every_steps=1)


def test_budget_derives_epochs_from_steps():
  assert optimizers.budget(TrainConfig(epochs=60, batch_size=32), 100) == optimizers.Budget(4, 60, 240)
  # 100 images are 4 steps a pass, but 1000 steps are at most 100 epochs: 10 steps each.
  assert optimizers.budget(TrainConfig(epochs=60, batch_size=32, train_steps=1000), 100) == (
      optimizers.Budget(10, 100, 1000))
  assert optimizers.budget(TrainConfig(batch_size=32, train_steps=2160), 30) == optimizers.Budget(22, 99, 2160)
  # 1132 images: 36 steps per epoch, 28 epochs of which the last has 1000 - 27 * 36 = 28 steps.
  assert optimizers.budget(TrainConfig(batch_size=32, train_steps=1000), 1132) == (
      optimizers.Budget(36, 28, 1000))
  assert optimizers.budget(TrainConfig(steps_per_epoch=50, train_steps=120), 10) == (
      optimizers.Budget(50, 3, 120))


def test_the_schedule_spans_the_step_budget():
  cosine = optimizers.make_optimizer(TrainConfig(learning_rate=0.1, train_steps=7), 3, 7)
  assert float(cosine.learning_rate) == pytest.approx(0.1)
  schedule = cosine._learning_rate  # pylint: disable=protected-access
  assert float(schedule(7)) == pytest.approx(0.0, abs=1e-7)  # ends at N, not at epochs x 3
  assert float(schedule(3.5)) == pytest.approx(0.05, rel=1e-5)
  step = optimizers.make_optimizer(TrainConfig(learning_rate=0.1, lr_schedule="step",
                                         lr_decay_steps=(4, 6), lr_decay_factor=0.5,
                                         train_steps=7), 3, 7)._learning_rate
  assert [float(step(s)) for s in (4, 5, 6, 7)] == pytest.approx([0.1, 0.05, 0.05, 0.025])


@pytest.mark.parametrize("train, flag", [
    (TrainConfig(train_steps=-1), "--train_steps"),
    (TrainConfig(train_steps=100, lr_schedule="step", lr_decay_epochs=(10,)),
     "--lr_decay_epochs: not taken: with --train_steps"),
    (TrainConfig(train_steps=100, lr_schedule="step"), "--lr_decay_steps: --lr_schedule=step"),
    (TrainConfig(train_steps=100, lr_schedule="step", lr_decay_steps=(50, 100)),
     "--lr_decay_steps: 100 is not below --train_steps=100"),
    (TrainConfig(lr_schedule="step", lr_decay_steps=(50, 20)), "--lr_decay_steps: must be"),
])
def test_bad_budgets_are_named(tmp_path, train, flag):
  with pytest.raises(ConfigError, match=flag):
    validate(Config(workdir=str(tmp_path), train=train))


class _Interrupt(keras.callbacks.Callback):
  """Raises in the validation that ends epoch `epoch`: after that epoch's last step (and its
  mid-epoch backup, if one was written), before its epoch-end backup."""

  def __init__(self, epoch):
    super().__init__()
    self.at, self._epoch = epoch, None

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_test_begin(self, logs=None):
    if self._epoch == self.at:
      raise KeyboardInterrupt


@pytest.fixture
def fit(tmp_path, digits_splits):
  info = digits_splits.info
  train = digits_splits.sampled_train(4, 0)

  def run(name, *, extra=(), cfg=BUDGET):
    keras.utils.set_random_seed(7)
    student, teacher = helpers.tiny_vgg(info), helpers.tiny_vgg(info)
    distiller = Distiller(student, teacher, hints=[("act", 1.0), ("ce", 1.0)])
    result = loop.fit(distiller, train, digits_splits.validation, cfg,
                      loop.FitDirs(str(tmp_path / name / "tb"), str(tmp_path / name),
                                   resume=True, settings={"budget": 7}, keep_backup=True),
                      data=DataConfig(seed=1), extra_callbacks=extra)
    return distiller, result

  return run


def test_exactly_the_budget_runs_and_a_kill_at_its_end_resumes_to_the_same_weights(fit):
  reference, expected = fit("reference")
  assert int(reference.optimizer.iterations) == 7  # not 3 epochs x 3 steps = 9
  assert (expected.epochs_run, expected.steps_per_epoch, expected.total_steps) == (3, 3, 7)
  with pytest.raises(KeyboardInterrupt):
    fit("killed", extra=[_Interrupt(epoch=2)])  # after step 7, before the epoch-end backup
  resumed, got = fit("killed")
  assert got.resumed_from == {"epochs_done": 2, "steps_done": 0}
  assert int(resumed.optimizer.iterations) == 7
  for a, b in zip(reference.student.get_weights(), resumed.student.get_weights()):
    np.testing.assert_array_equal(a, b)
  assert got.history == expected.history


def test_a_few_shot_budget_validates_in_epochs_of_several_passes(fit, monkeypatch):
  """40 images at batch 16 are 3 steps a pass; 60 steps at most 4 epochs (MAX_BUDGET_EPOCHS
  patched to 4): epochs of 15 steps, each several passes of the stream, 60 steps in all."""
  monkeypatch.setattr(optimizers, "MAX_BUDGET_EPOCHS", 4)
  cfg = TrainConfig(epochs=99, train_steps=60, batch_size=16, backup_every_steps=0)
  distiller, result = fit("passes", cfg=cfg)
  assert int(distiller.optimizer.iterations) == 60
  assert (result.epochs_run, result.steps_per_epoch, result.total_steps) == (4, 15, 60)


def test_a_fit_call_that_finishes_an_epoch_counts_its_batches_from_where_it_starts():
  """A resumed fit finishes an interrupted epoch in a fit() call of its own, whose batch 0 is
  step `starts_at` of the epoch: the step budget stops at the budget's last step and the NaN
  guard names the step of the epoch, not of the call."""
  import types  # pylint: disable=g-import-not-at-top
  from tfjac.errors import NonFiniteLossError  # pylint: disable=g-import-not-at-top
  from tfjac.training import callbacks  # pylint: disable=g-import-not-at-top
  for first_step, stops in ((1, True), (0, False)):  # budget 5 = epoch 1 (of 3 steps), step 2
    model = types.SimpleNamespace(stop_training=False)
    stopper = callbacks.StepBudget(5, 3).starts_at(first_step)
    stopper.set_model(model)
    stopper.on_epoch_begin(1)
    stopper.on_train_batch_end(0)
    assert model.stop_training is stops
  guard = callbacks.NonFiniteGuard().starts_at(2)
  guard.on_epoch_begin(0)
  with pytest.raises(NonFiniteLossError) as broken:
    guard.on_train_batch_end(0, {"loss": float("nan"), "jac_loss": float("nan")})
  assert (broken.value.term, broken.value.epoch, broken.value.step) == ("jac_loss", 0, 2)
