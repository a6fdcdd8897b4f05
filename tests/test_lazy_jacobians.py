"""--jac_every=K (lazy Jacobian matching): the Jacobian hints on every K-th step with weight
times K, no Jacobian pass on the others."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac.hints import jacobians
from tfjac.training.distiller import Distiller
from tests import helpers

HINTS = (("act", 1.0), ("jac", 0.5), ("ce", 1.0))


def _distiller(info, hints=HINTS, **kw):
  keras.utils.set_random_seed(3)
  student, teacher = helpers.tiny_vgg(info, "student"), helpers.tiny_vgg(info, "teacher")
  distiller = Distiller(student, teacher, hints=hints, **kw)
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
  every = _distiller(info)
  doubled = _distiller(info, hints=(("act", 1.0), ("jac", 1.0), ("ce", 1.0)))
  without = _distiller(info, hints=(("act", 1.0), ("ce", 1.0)))
  for step in (0, 1):  # jac_every=1: the step of today, at every step
    _assert_same(_grads(every, data, step),
                 [None if g is None else g.numpy() for g in every._gradients(  # pylint: disable=protected-access
                     data[0], data[1], step, None, every.optimizer)[0]], "jac_every=1")
  _assert_same(_grads(lazy, data, 0), _grads(doubled, data, 0), "step 0: jac weight x 2")
  _assert_same(_grads(lazy, data, 1), _grads(without, data, 1), "step 1: no jac")
  _assert_same(_grads(lazy, data, 4), _grads(doubled, data, 4), "step 4: jac weight x 2")
  diff = max(np.abs(a - b).max() for a, b in zip(_grads(doubled, data, 0),
                                                 _grads(without, data, 0)))
  assert diff > 1e-4  # the jac term changes the gradient: the comparison can fail


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
  with pytest.raises(ValueError, match="jac_every=2 needs a hint without Jacobians"):
    _distiller(digits_splits.info, hints=(("jac", 1.0),), jac_every=2)
  _distiller(digits_splits.info, hints=(("jac", 1.0),), jac_every=1)
  _distiller(digits_splits.info, hints=(("act", 1.0), ("ce", 1.0)), jac_every=2)  # no jac: ok


@pytest.mark.parametrize("train,hints,message", [
    (dict(jac_every=0), ("act", "jac", "ce"), "--jac_every: must be > 0"),
    (dict(jac_every=2), ("jac",), "--jac_every: 2 needs a hint without Jacobians"),
    (dict(val_jac_every=0), ("act", "jac", "ce"), "--val_jac_every: must be > 0"),
    (dict(val_jac_examples=-1), ("act", "jac", "ce"), "--val_jac_examples: must be >= 0"),
])
def test_bad_speed_flags_are_clear_errors(tmp_path, train, hints, message):
  from tfjac import checks
  from tfjac import config as config_lib
  from tfjac.errors import ConfigError
  cfg = config_lib.Config(workdir=str(tmp_path), train=config_lib.TrainConfig(**train),
                          hints=config_lib.HintConfig(hints=hints))
  with pytest.raises(ConfigError) as err:
    checks.validate(cfg)
  assert message in str(err.value)
