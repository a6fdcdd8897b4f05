"""1 vs 2 replicas (2 logical CPU devices, see conftest.py): same loss, same gradients."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import models
from tfjac.training.distiller import Distiller

HINTS = (("act", 1.0), ("jac", 1.0), ("ce", 1.0))


def _one_step(strategy, digits_splits, weights, teacher_weights, policy):
  info = digits_splits.info
  build = lambda name: models.build("vgg4", info.image_shape, 10, mean=info.mean, std=info.std,  # noqa: E731
                                    width=0.25, sync_bn=True, model_name=name)
  with strategy.scope():
    student, teacher = build("student"), build("teacher")
    student.set_weights(weights)
    teacher.set_weights(teacher_weights)
    d = Distiller(student, teacher, hints=HINTS, bn_policy=policy)
    d.compile(optimizer=keras.optimizers.SGD(0.5))
  ds = tf.data.Dataset.from_tensor_slices(
      (digits_splits.train.images[:16], digits_splits.train.labels[:16])).batch(16)
  logs = d.fit(ds, epochs=1, verbose=0).history
  return {k: v[0] for k, v in logs.items()}, student.get_weights()


@pytest.mark.parametrize("policy", ["batch_stats", "inference"])
def test_one_and_two_replicas_agree(digits_splits, policy):
  assert len(tf.config.list_logical_devices("CPU")) == 2
  info = digits_splits.info
  init = models.build("vgg4", info.image_shape, 10, mean=info.mean, std=info.std, width=0.25)
  keras.utils.set_random_seed(5)
  t_init = models.build("vgg4", info.image_shape, 10, mean=info.mean, std=info.std, width=0.25)
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  assert two.num_replicas_in_sync == 2
  logs1, w1 = _one_step(one, digits_splits, init.get_weights(), t_init.get_weights(), policy)
  logs2, w2 = _one_step(two, digits_splits, init.get_weights(), t_init.get_weights(), policy)
  for key in ("loss", "ce_loss", "act_loss", "jac_loss"):
    np.testing.assert_allclose(logs1[key], logs2[key], rtol=1e-4, err_msg=key)
  moved = max(np.abs(a - b).max() for a, b in zip(w1, init.get_weights()))
  assert moved > 1e-3
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


def test_replicas_draw_their_own_classes_and_noise():
  # The same examples on both replicas: with the replica id folded into the per-step seed the
  # random classes and the noise differ between replicas (one shared seed would repeat them).
  from tests.helpers import linear_model  # pylint: disable=g-import-not-at-top
  from tfjac.hints import HintParams  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with two.scope():
    d = Distiller(linear_model(rng.normal(size=(4, 5)), name="student"),
                  linear_model(rng.normal(size=(4, 5)), name="teacher"),
                  hints=[("jac", 1.0), ("noise", 1.0)], jac_target="random",
                  params=HintParams(noise_sigma=0.5, noise_samples=2))
  x = tf.constant(rng.random((16, 2, 2, 1)), tf.float32)
  y = tf.zeros([16], tf.int32)

  @tf.function
  def draws():
    def replica_fn():
      t = d.teacher_pass(x, y, tf.constant(3, tf.int64))
      terms = d.per_example_terms(x, y, training=True, step=tf.constant(3, tf.int64),
                                  teacher_outputs=t)[0]
      return t.selection, terms["noise"]
    return two.run(replica_fn)

  selections, noise = (two.experimental_local_results(v) for v in draws())
  assert not np.array_equal(selections[0].numpy(), selections[1].numpy())
  assert np.abs(noise[0].numpy() - noise[1].numpy()).min() > 1e-6
  # One replica: the seed of before (the replica id is folded in only under several).
  np.testing.assert_array_equal(d._seed(3, 1), [0, 13])  # pylint: disable=protected-access
