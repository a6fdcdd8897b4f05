"""--jac_every=K (lazy Jacobian matching): the Jacobian hints on every K-th step with weight
times K, no Jacobian pass on the others."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac.config import HintConfig
from tfjac.hints import jacobians
from tfjac.training.distiller import Distiller
from tests import helpers

HINTS = (("act", 1.0), ("jac", 0.5), ("ce", 1.0))


def _distiller(info, hints=HINTS, **kw):
  keras.utils.set_random_seed(3)
  student, teacher = helpers.tiny_vgg(info, "student"), helpers.tiny_vgg(info, "teacher")
  distiller = Distiller(student, teacher, hints=HintConfig.of(hints, **kw))
  distiller.compile(optimizer=keras.optimizers.SGD(0.1))
  return distiller


def _batch(digits_splits):
  return (tf.constant(digits_splits.train.images[:16], tf.float32),
          tf.constant(digits_splits.train.labels[:16]))


def _grads(distiller, data, step):
  grads = distiller.step_gradients(data, tf.constant(step, tf.int64))[0]
  return [None if g is None else g.numpy() for g in grads]


def _assert_same(a, b, what):
  assert len(a) == len(b)
  for i, (x, y) in enumerate(zip(a, b)):
    x = np.zeros_like(y) if x is None else x
    y = np.zeros_like(x) if y is None else y
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7, err_msg=f"{what}: variable {i}")


def test_lazy_steps_have_the_gradients_of_their_hints(digits_splits):
  info, data = digits_splits.info, _batch(digits_splits)
  lazy = _distiller(info, jac_every=2)
  doubled = _distiller(info, hints=(("act", 1.0), ("jac", 1.0), ("ce", 1.0)))
  without = _distiller(info, hints=(("act", 1.0), ("ce", 1.0)))
  _assert_same(_grads(lazy, data, 0), _grads(doubled, data, 0), "step 0: jac weight x 2")
  _assert_same(_grads(lazy, data, 1), _grads(without, data, 1), "step 1: no jac")
  _assert_same(_grads(lazy, data, 4), _grads(doubled, data, 4), "step 4: jac weight x 2")
  diff = max(np.abs(a - b).max() for a, b in zip(_grads(doubled, data, 0),
                                                 _grads(without, data, 0)))
  assert diff > 1e-4  # the jac term changes the gradient: the comparison can fail


def _by_hand(W, b, V, c, x, y, jac_weight):
  """Gradients of mean(act + jac_weight * raw jac + ce) of the linear student S = x W + b
  against the linear teacher T = x V + c, Jacobian target the label, in numpy (float64):
  act = ||T - S||^2, raw jac = ||V[:, y] - W[:, y]||^2 (the Jacobian of a linear model is its
  weight column), ce = -log softmax(S)[y]."""
  n = len(y)
  xf = x.reshape(n, -1).astype(np.float64)
  S, T = xf @ W + b, xf @ V + c
  p = np.exp(S - S.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  dS = (-2 * (T - S) + p - np.eye(W.shape[1])[y]) / n  # act and ce through the logits
  gW, gb = xf.T @ dS, dS.sum(0)
  for i, k in enumerate(y):
    gW[:, k] += jac_weight * -2 * (V[:, k] - W[:, k]) / n
  return gW, gb


def test_lazy_training_applies_the_gradients_computed_by_hand():
  """Independent of the Distiller's code paths: two SGD steps of fit() with jac_every=2 on
  linear networks (step 0: act + 2 x 0.5 jac + ce; step 1: act + ce) against numpy."""
  rng = np.random.default_rng(0)
  shape, classes, lr = (2, 2, 1), 3, 0.1
  W, V = rng.normal(size=(4, classes)), rng.normal(size=(4, classes))
  b, c = rng.normal(size=classes), rng.normal(size=classes)
  x = rng.uniform(size=(6, *shape)).astype(np.float32)
  y = np.array([0, 1, 2, 0, 1, 2])
  student = helpers.linear_model(W, b, shape, "student")
  teacher = helpers.linear_model(V, c, shape, "teacher")
  settings = HintConfig(
      hints=("act", "jac", "ce"), jac_normalize=False,
      weights=(("act", 1.0), ("jac", 0.5), ("ce", 1.0)), loss_scaling="none",
      jac_every=2)  # raw weights: the hand computation's
  d = Distiller(student, teacher, hints=settings)
  d.compile(optimizer=keras.optimizers.SGD(lr))
  ds = tf.data.Dataset.from_tensors((x, y)).repeat()
  d.fit(ds, epochs=1, steps_per_epoch=2, verbose=0)
  W64, b64 = W.copy(), b.copy()
  for jac_weight in (2 * 0.5, 0.0):  # the Jacobian step (weight x K), then the one without
    gW, gb = _by_hand(W64, b64, V, c, x, y, jac_weight)
    W64, b64 = W64 - lr * gW, b64 - lr * gb
  kernel, bias = student.get_layer("logits").get_weights()
  np.testing.assert_allclose(kernel, W64, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(bias, b64, rtol=1e-4, atol=1e-5)
  # The same two steps with the Jacobian term on both or on neither end elsewhere.
  for weights in ((1.0, 1.0), (0.0, 0.0), (0.0, 1.0)):
    W2, b2 = W.copy(), b.copy()
    for jac_weight in weights:
      gW, gb = _by_hand(W2, b2, V, c, x, y, jac_weight)
      W2, b2 = W2 - lr * gW, b2 - lr * gb
    assert np.abs(W2 - W64).max() > 1e-3, weights


def test_an_epoch_without_a_jacobian_step_logs_no_jacobian_terms(tmp_path, digits_splits):
  """jac_every=4, 2 steps per epoch: Jacobian steps 0 and 4, in epochs 1 and 3; epoch 2 logs
  no jac_loss and no Jacobian norms (not Keras' Mean of nothing, 0), in the history
  (results.json's) and TensorBoard, through fit() of the Python API and of the command line."""
  from tensorboard.backend.event_processing import event_accumulator
  from tfjac.config import TrainConfig
  from tfjac.training import loop
  info = digits_splits.info
  result = loop.fit(_distiller(info, jac_every=4), digits_splits.sampled_train(4, 0),
                    digits_splits.validation,
                    TrainConfig(epochs=3, batch_size=16, steps_per_epoch=2),
                    loop.FitDirs(str(tmp_path / "tb"), str(tmp_path / "ck")))
  h = result.history
  assert len(h["act_loss"]) == len(h["val_jac_loss"]) == 3
  for key in ("jac_loss", "student_jac_norm", "teacher_jac_norm"):
    assert len(h[key]) == 2 and min(h[key]) > 0, (key, h[key])
  ea = event_accumulator.EventAccumulator(str(tmp_path / "tb" / "train"),
                                          size_guidance={event_accumulator.TENSORS: 0})
  ea.Reload()
  assert [e.step for e in ea.Tensors("epoch_jac_loss")] == [0, 2]
  assert [e.step for e in ea.Tensors("epoch_act_loss")] == [0, 1, 2]
  assert "jac_loss" in result.final_metrics
  # A last epoch without a Jacobian step: results.json's final_epoch_metrics have no jac_loss
  # (not the previous epoch's, nor 0).
  from tfjac.modes import common
  short = loop.fit(_distiller(info, jac_every=4), digits_splits.sampled_train(4, 0),
                   digits_splits.validation,
                   TrainConfig(epochs=2, batch_size=16, steps_per_epoch=2),
                   loop.FitDirs(str(tmp_path / "tb2"), str(tmp_path / "ck2")))
  final = common.fit_summary(short, {})["final_epoch_metrics"]
  assert "jac_loss" not in final and "student_jac_norm" not in final
  assert "act_loss" in final and "val_jac_loss" in final
  # The Python API's own fit, with Keras' validation (which resets the metrics first).
  ds = tf.data.Dataset.from_tensors(_batch(digits_splits)).repeat()
  history = _distiller(info, jac_every=4).fit(ds, epochs=3, steps_per_epoch=2, verbose=0,
                                              validation_data=ds.take(1)).history
  assert len(history["jac_loss"]) == 2 and min(history["jac_loss"]) > 0
  assert len(history["val_jac_loss"]) == len(history["act_loss"]) == 3


def test_skipped_steps_run_no_jacobian_pass(digits_splits, monkeypatch):
  """A variable counts the Jacobian passes executed (not traced) in the compiled step."""
  calls = tf.Variable(0, dtype=tf.int64, trainable=False)
  real = jacobians.jacobians_of

  def counting(tape, selected, x):
    out = real(tape, selected, x)
    with tf.control_dependencies([calls.assign_add(1)]):
      return {k: tf.identity(v) for k, v in out.items()}

  monkeypatch.setattr(jacobians, "jacobians_of", counting)
  info = digits_splits.info
  ds = tf.data.Dataset.from_tensors(_batch(digits_splits)).repeat()
  counts = {}
  for k in (1, 2, 3):
    distiller = _distiller(info, jac_every=k)
    calls.assign(0)
    logs = distiller.fit(ds, epochs=1, steps_per_epoch=6, verbose=0).history
    counts[k] = int(calls.numpy())
    assert np.isfinite(logs["jac_loss"][-1]) and logs["jac_loss"][-1] > 0
  # Two passes per Jacobian step (teacher and student): 6, 3 and 2 Jacobian steps.
  assert counts == {1: 12, 2: 6, 3: 4}, counts


def test_jac_every_needs_a_hint_without_jacobians(digits_splits):
  with pytest.raises(ValueError, match="hints.jac_every: 2 needs a hint without Jacobians"):
    _distiller(digits_splits.info, hints=(("jac", 1.0),), jac_every=2)
  _distiller(digits_splits.info, hints=(("jac", 1.0),), jac_every=1)
  _distiller(digits_splits.info, hints=(("act", 1.0), ("ce", 1.0)), jac_every=2)  # no jac: ok


@pytest.mark.parametrize("train,hints,message", [
    ({}, dict(jac_every=0), "--jac_every: must be > 0"),
    ({}, dict(jac_every=2, hints=("jac",)), "--jac_every: 2 needs a hint without Jacobians"),
    (dict(val_jac_every=0), {}, "--val_jac_every: must be > 0"),
    (dict(val_jac_examples=-1), {}, "--val_jac_examples: must be >= 0"),
])
def test_bad_speed_flags_are_clear_errors(tmp_path, train, hints, message):
  """The lazy period is a hint setting (HintConfig.jac_every), validation's a fit's."""
  from tfjac import checks
  from tfjac import config as config_lib
  from tfjac.errors import ConfigError
  cfg = config_lib.Config(workdir=str(tmp_path), train=config_lib.TrainConfig(**train),
                          hints=config_lib.HintConfig(**{"hints": ("act", "jac", "ce"),
                                                         **hints}))
  with pytest.raises(ConfigError) as err:
    checks.validate(cfg)
  assert message in str(err.value)
