"""Speed without changing the numbers: the teacher cache, mixed precision with double backprop,
XLA where it is exact. (The checks of --teacher_cache and --jit_compile: test_config.py; of
TF_CONFIG: test_distribute.py.)"""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import data as data_lib
from tfjac import checks, runtime
from tfjac.config import Config, DataConfig, TrainConfig
from tfjac.training import loop, teacher_cache
from tfjac.training.distiller import Distiller
from tests import helpers

HINTS = (("act", 1.0), ("jac", 1.0), ("ce", 1.0))
CFG = TrainConfig(epochs=1, batch_size=16, steps_per_epoch=4, learning_rate=1e-2)


def _networks(info, seed=3):
  keras.utils.set_random_seed(seed)
  return helpers.tiny_vgg(info, "student"), helpers.tiny_vgg(info, "teacher")


def _fit(tmp_path, digits_splits, name, *, use_cache, hints=HINTS):
  info = digits_splits.info
  student, teacher = _networks(info)
  distiller = Distiller(student, teacher, hints=hints, seed=1)
  loop.fit(distiller, digits_splits.sampled_train(8, 0), digits_splits.validation, CFG,
           loop.FitDirs(str(tmp_path / name / "tb"), str(tmp_path / name)),
           data=DataConfig(seed=1), teacher_cache=use_cache)
  return student.get_weights()


def test_cached_teacher_outputs_train_to_the_same_weights(tmp_path, digits_splits):
  off = _fit(tmp_path, digits_splits, "off", use_cache=False)
  on = _fit(tmp_path, digits_splits, "on", use_cache=True)
  keras.utils.set_random_seed(3)
  init = _networks(digits_splits.info)[0].get_weights()
  assert max(np.abs(a - b).max() for a, b in zip(off, init)) > 1e-3  # it trained
  # The teacher sees each example in a batch of other examples with and without the cache;
  # in inference mode its per-example outputs do not depend on the batch mathematically, but
  # CPU kernels may round differently for another batch composition: float32 tolerance.
  for a, b in zip(off, on):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_cached_step_never_runs_the_teacher(digits_splits, monkeypatch):
  info = digits_splits.info
  student, teacher = _networks(info)
  distiller = Distiller(student, teacher, hints=HINTS)
  distiller.compile(optimizer=keras.optimizers.SGD(0.01))
  train = digits_splits.sampled_train(4, 0)
  cache = teacher_cache.compute(distiller, train, 16)
  assert sorted(cache) == ["jacobian.logits", "logits", "selection"]
  assert cache["jacobian.logits"].shape == (len(train), 1, int(np.prod(info.image_shape)))

  helpers.forbid_teacher_calls(monkeypatch, distiller)
  batches = lambda **kw: data_lib.training_batches(train, 16, seed=0, epochs=1, **kw)  # noqa: E731
  distiller.fit(batches(extras=cache), epochs=1, steps_per_epoch=2, verbose=0)
  distiller.compile(optimizer=keras.optimizers.SGD(0.01))  # a fresh train function: retrace
  with pytest.raises(helpers.TeacherCalled):  # the same step without the cache does call it
    distiller.fit(batches(), epochs=1, steps_per_epoch=2, verbose=0)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_double_backprop_reaches_the_weights(digits_splits, policy):
  info = digits_splits.info
  x = tf.constant(digits_splits.train.images[:16], tf.float32)
  y = tf.constant(digits_splits.train.labels[:16])

  def one_step(dtype_policy):
    keras.mixed_precision.set_global_policy(dtype_policy)
    try:
      student, teacher = _networks(info, seed=4)
      distiller = Distiller(student, teacher, hints=HINTS)
      distiller.compile(optimizer=keras.optimizers.SGD(0.1))
      with tf.GradientTape() as tape:  # the Jacobian term alone
        t = distiller.teacher_pass(x, y, 0)
        terms = distiller.per_example_terms(x, y, training=True, step=0, teacher_outputs=t)[0]
        jac = tf.reduce_mean(terms["jac"])
      grads = tape.gradient(jac, distiller.trained_variables)
      before = [v.numpy() for v in student.trainable_variables]
      # mixed_float16: the dynamic loss scale starts at 2**15, where the double-backprop
      # gradients overflow; such steps are skipped (weights unchanged) and the scale halved.
      for skipped in range(20):
        distiller.train_on_batch(x, y)
        if int(distiller.optimizer.iterations) > 0:
          break
      delta = [v.numpy() - b for v, b in zip(student.trainable_variables, before)]
      return grads, delta, distiller, skipped
    finally:
      keras.mixed_precision.set_global_policy("float32")

  grads, delta, distiller, skipped = one_step(policy)
  assert distiller.student.layers[-1].compute_dtype == "float32"  # logits stay float32
  assert any(l.compute_dtype != "float32" for l in distiller.student.layers)
  kernels = [g for g in grads if g is not None]
  assert kernels and all(np.isfinite(g.numpy()).all() for g in kernels)
  assert max(float(tf.reduce_max(tf.abs(g))) for g in kernels) > 0  # jac reaches the weights
  if policy == "mixed_float16":
    assert isinstance(distiller.optimizer, keras.optimizers.LossScaleOptimizer)
    print(f"mixed_float16: {skipped} step(s) skipped, loss scale now "
          f"{float(distiller.optimizer.dynamic_scale)}")
  else:
    assert skipped == 0
  _, reference, _, none_skipped = one_step("float32")
  assert none_skipped == 0
  # One SGD step in low precision is the float32 step up to rounding; without loss scaling
  # the float16 step would be 2**15 times too small.
  diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(delta, reference)))
  norm = np.sqrt(sum(np.sum(b ** 2) for b in reference))
  assert norm > 0 and diff / norm < 0.1, (diff, norm)


def test_packed_teacher_outputs_round_trip_with_features_and_pixels():
  from tfjac.training.distiller import (TeacherOutputs, pack_teacher_outputs,
                                        unpack_teacher_outputs)
  t = TeacherOutputs(tf.ones([2, 3]), tf.zeros([2, 1, 3]),
                     {"logits": tf.ones([2, 1, 4]), "attention": tf.zeros([2, 2, 4])},
                     tuple(tf.fill([2, 4, 4, c], float(c)) for c in range(1, 12)),
                     tf.constant([[1, 2], [3, 4]]))
  back = unpack_teacher_outputs(pack_teacher_outputs(t))
  assert sorted(back.jacobians) == ["attention", "logits"]
  assert [int(f.shape[-1]) for f in back.features] == list(range(1, 12))  # order kept past 9
  np.testing.assert_array_equal(back.pixels, t.pixels)
  np.testing.assert_array_equal(back.selection, t.selection)


def test_jit_compiled_first_order_step_matches_the_graph_step(digits_splits):
  """XLA is allowed where the step has no double backprop (act: the teacher's Jacobian, if
  any, is first order)."""
  def one_step(jit):
    student, teacher = _networks(digits_splits.info)
    distiller = Distiller(student, teacher, hints=(("act", 1.0), ("ce", 1.0)))
    # Plain SGD: Adam's first step is lr * sign(gradient), which turns rounding into +-lr.
    distiller.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit)
    distiller.train_on_batch(digits_splits.train.images[:16], digits_splits.train.labels[:16])
    return distiller, student.get_weights()

  distiller, with_xla = one_step(True)
  assert distiller.jit_compile is True
  _, without = one_step(False)
  keras.utils.set_random_seed(3)
  init = _networks(digits_splits.info)[0].get_weights()
  update = np.sqrt(sum(np.sum((b - i) ** 2) for b, i in zip(without, init)))
  diff = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(with_xla, without)))
  assert update > 1e-2 and diff / update < 1e-4, (diff, update)  # float32 rounding


def test_jit_compile_under_two_replicas_falls_back_with_a_logged_reason(caplog):
  # No fit here: a second MirroredStrategy training other shapes in this process would reuse
  # the collective keys of tests/test_distribute.py's and abort with a shape mismatch.
  with caplog.at_level("WARNING"):
    assert loop.resolve_jit_compile(True, 2) is False
    with checks.flag_errors():  # a command-line run: the log names the flag
      loop.resolve_jit_compile(True, 2)
  said = [r.getMessage() for r in caplog.records]
  assert "train.jit_compile turned off" in said[0] and "2 replicas" in said[0]
  assert "--jit_compile turned off" in said[1] and "2 replicas" in said[1]
  assert loop.resolve_jit_compile(True, 1) is True
  assert loop.resolve_jit_compile(False, 2) is False
  caplog.clear()
  with caplog.at_level("WARNING"):  # the teacher's fit names its own setting
    loop.resolve_jit_compile(True, 2, "teacher.train")
    with checks.flag_errors():
      loop.resolve_jit_compile(True, 2, "teacher.train")
  said = [r.getMessage() for r in caplog.records]
  assert "teacher.train.jit_compile turned off" in said[0]
  assert "--jit_compile turned off" in said[1]  # one flag sets both fits


def test_float16_without_a_gpu_logs_why_it_is_slow(tmp_path, caplog):
  cfg = Config(workdir=str(tmp_path), mixed_precision="mixed_float16")
  with caplog.at_level("WARNING"):
    runtime.check_precision(cfg, tf.distribute.get_strategy())
  assert any("mixed_float16 without a GPU" in r.getMessage() for r in caplog.records)


def test_multiply_accumulates_by_hand():
  """Conv 3x3, 2 -> 4 channels, 'same' on 5x5: 5*5 * 3*3*2*4 = 1800; stride 2 on that (3x3
  out), 4 -> 6 with a 1x1 kernel: 9 * 24 = 216; Dense 6 -> 3 after global pooling: 18."""
  import keras  # pylint: disable=g-import-not-at-top
  from tfjac import models  # pylint: disable=g-import-not-at-top
  inputs = keras.Input((5, 5, 2))
  x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
  x = keras.layers.Conv2D(6, 1, strides=2, padding="same")(x)
  x = keras.layers.GlobalAveragePooling2D()(x)
  inner = keras.Model(inputs, keras.layers.Dense(3)(x))
  assert models.multiply_accumulates(inner) == 1800 + 216 + 18
  outer_in = keras.Input((5, 5, 2))
  assert models.multiply_accumulates(keras.Model(outer_in, inner(outer_in))) == 2034
