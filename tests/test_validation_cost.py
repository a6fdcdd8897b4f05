"""Validation at the cost model selection needs: accuracy and the cheap terms on the whole
validation split every epoch, the Jacobian terms on a fixed subset and/or every N epochs."""
import keras
import numpy as np
import tensorflow as tf

from tfjac import data as data_lib
from tfjac.config import TrainConfig
from tfjac.training import callbacks, evaluation, loop
from tfjac.training.distiller import Distiller
from tests import helpers

HINTS = (("act", 1.0), ("jac", 2.0), ("ce", 1.0))
SCALES = {"act": 7.0, "jac": 0.5, "ce": 3.0}  # the terms' divisors (training/term_scales.py)


def _distiller(info):
  keras.utils.set_random_seed(3)
  distiller = Distiller(helpers.tiny_vgg(info, "student"), helpers.tiny_vgg(info, "teacher"),
                        hints=HINTS)
  distiller.compile(optimizer=keras.optimizers.SGD(0.1))
  for name, size in SCALES.items():  # scales as a training step would leave them
    distiller.term_scales.update(name, tf.constant(size))
  return distiller


def test_the_subset_is_fixed_seeded_and_distinct(digits_splits):
  val = digits_splits.validation
  a, b = evaluation.validation_subset(val, 30, 1), evaluation.validation_subset(val, 30, 1)
  np.testing.assert_array_equal(a.images, b.images)
  assert len(a) == 30 and len(np.unique(a.images.reshape(30, -1), axis=0)) == 30
  assert not np.array_equal(evaluation.validation_subset(val, 30, 2).images, a.images)
  assert evaluation.validation_subset(val, 0, 1) is val
  assert evaluation.validation_subset(val, len(val) + 5, 1) is val


def test_accuracy_on_the_whole_split_jacobian_terms_on_the_subset(digits_splits):
  info, val = digits_splits.info, digits_splits.validation
  distiller = _distiller(info)
  subset = evaluation.validation_subset(val, 24, 0)
  full_ds = data_lib.pipeline(val, 32, training=False)
  sub_ds = data_lib.pipeline(subset, 32, training=False)
  cheap = distiller.with_hints([(n, w) for n, w in HINTS if n != "jac"])
  cheap.compile(jit_compile=False)
  callback = callbacks.SplitValidation(distiller, cheap, full_ds, sub_ds, every=2, epochs=5,
                                  jacobian_hints=("jac",))
  whole = distiller.evaluate(full_ds, verbose=0, return_dict=True)
  part = distiller.evaluate(sub_ds, verbose=0, return_dict=True)
  # Accuracies by hand (numpy, the student in inference mode): the independent reference.
  def accuracy(split):
    return float(np.mean(np.argmax(distiller.student(split.images, training=False), -1) ==
                         split.labels))
  whole_accuracy, part_accuracy = accuracy(val), accuracy(subset)
  np.testing.assert_allclose(whole["accuracy"], whole_accuracy, rtol=1e-6)
  np.testing.assert_allclose(part["accuracy"], part_accuracy, rtol=1e-6)
  assert abs(whole["jac_loss"] - part["jac_loss"]) > 1e-4  # the two can be told apart
  # Far more apart than the rtol=1e-6 below: an accuracy taken on the subset would fail it.
  assert abs(whole_accuracy - part_accuracy) > 1e-3, (whole_accuracy, part_accuracy)
  for epoch in (0, 2, 4):  # the first, every 2nd, the last: the same subset each time
    logs = {"loss": 1.0}
    callback.on_epoch_end(epoch, logs)
    np.testing.assert_allclose(logs["val_accuracy"], whole_accuracy, rtol=1e-6)
    np.testing.assert_allclose(logs["val_act_loss"], whole["act_loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["val_ce_loss"], whole["ce_loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["val_jac_loss"], part["jac_loss"], rtol=1e-5)
    np.testing.assert_allclose(logs["val_student_jac_norm"], part["student_jac_norm"],
                               rtol=1e-5)
    np.testing.assert_allclose(
        logs["val_loss"], whole["act_loss"] / 7.0 + whole["ce_loss"] / 3.0
        + 2.0 * part["jac_loss"] / 0.5, rtol=1e-5)
  for epoch in (1, 3):  # no Jacobian pass: no Jacobian keys, accuracy as ever
    logs = {}
    callback.on_epoch_end(epoch, logs)
    assert "val_jac_loss" not in logs and "val_student_jac_norm" not in logs
    np.testing.assert_allclose(logs["val_accuracy"], whole["accuracy"], rtol=1e-6)
    np.testing.assert_allclose(logs["val_loss"], whole["act_loss"] / 7.0
                               + whole["ce_loss"] / 3.0, rtol=1e-5)


def test_fit_validates_the_jacobian_terms_on_the_chosen_epochs(tmp_path, digits_splits):
  distiller = _distiller(digits_splits.info)
  cfg = TrainConfig(epochs=3, batch_size=16, steps_per_epoch=2, val_jac_examples=20,
                    val_jac_every=2)
  result = loop.fit(distiller, digits_splits.sampled_train(4, 0), digits_splits.validation,
                    cfg, loop.FitDirs(str(tmp_path / "tb"), str(tmp_path)))
  h = result.history
  assert len(h["val_accuracy"]) == len(h["val_act_loss"]) == 3
  assert len(h["val_jac_loss"]) == 2  # epochs 1 and 3 (the first and the last)
  assert result.best_val_accuracy == max(h["val_accuracy"])
  assert tf.io.gfile.glob(str(tmp_path / "tb" / "validation" / "*"))  # TensorBoard has them


def test_validation_teacher_outputs_are_computed_once(digits_splits, monkeypatch):
  distiller = _distiller(digits_splits.info)
  val = digits_splits.validation
  plain = distiller.evaluate(data_lib.pipeline(val, 32), verbose=0, return_dict=True)
  cached_ds = evaluation.validation_pipeline(distiller, val, 32)

  helpers.forbid_teacher_calls(monkeypatch, distiller)
  cached = distiller.evaluate(cached_ds, verbose=0, return_dict=True)
  assert sorted(cached) == sorted(plain)
  for k in plain:  # the same numbers; the teacher did not run
    np.testing.assert_allclose(cached[k], plain[k], rtol=1e-5, err_msg=k)
