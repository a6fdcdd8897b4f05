"""1 vs 2 replicas (2 logical CPU devices, see conftest.py): same loss, same gradients; the
checks of TF_CONFIG and which worker is the chief (the two-process run: test_multi_worker.py)."""
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import checks, runtime
from tfjac.config import Config, HintConfig
from tfjac.errors import ConfigError
from tfjac.training.distiller import Distiller
from tests import helpers

HINTS = (("act", 1.0), ("jac", 1.0), ("ce", 1.0))


def _one_step(strategy, digits_splits, weights, teacher_weights, policy, jac_every=1,
              steps=1, learning_rate=0.5):
  info = digits_splits.info
  with strategy.scope():
    student = helpers.tiny_vgg(info, "student", sync_bn=True)
    teacher = helpers.tiny_vgg(info, "teacher", sync_bn=True)
    student.set_weights(weights)
    teacher.set_weights(teacher_weights)
    # Raw terms: a per-replica mean (the wrong run below) would cancel in scaled weights.
    d = Distiller(
        student, teacher, hints=HintConfig.of(HINTS, jac_bn_policy=policy, jac_every=jac_every,
                                              loss_scaling="none"))
    d.compile(optimizer=keras.optimizers.SGD(learning_rate))
  ds = tf.data.Dataset.from_tensor_slices(
      (digits_splits.train.images[:16 * steps], digits_splits.train.labels[:16 * steps])).batch(16)
  logs = d.fit(ds, epochs=1, verbose=0).history
  return {k: v[0] for k, v in logs.items()}, student.get_weights()


def _start(info):
  """Initial student and teacher, and the 1- and 2-replica strategies to compare."""
  init = helpers.tiny_vgg(info)
  keras.utils.set_random_seed(5)
  t_init = helpers.tiny_vgg(info)
  return (init, t_init, tf.distribute.OneDeviceStrategy("/cpu:0"),
          tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]))


@pytest.mark.parametrize("policy", ["batch_stats", "inference"])
def test_one_and_two_replicas_agree(digits_splits, policy):
  assert len(tf.config.list_logical_devices("CPU")) == 2
  init, t_init, one, two = _start(digits_splits.info)
  assert two.num_replicas_in_sync == 2
  logs1, w1 = _one_step(one, digits_splits, init.get_weights(), t_init.get_weights(), policy)
  logs2, w2 = _one_step(two, digits_splits, init.get_weights(), t_init.get_weights(), policy)
  for key in ("loss", "ce_loss", "act_loss", "jac_loss"):
    np.testing.assert_allclose(logs1[key], logs2[key], rtol=1e-4, err_msg=key)
  moved = max(np.abs(a - b).max() for a, b in zip(w1, init.get_weights()))
  assert moved > 1e-3
  for a, b in zip(w1, w2):
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
  # The tolerance tells a wrong 2-replica run apart: one that averaged each replica's loss
  # over its own 8 examples (the gradients, summed over replicas, twice as large) ends where
  # one replica does with twice the learning rate.
  _, wrong = _one_step(one, digits_splits, init.get_weights(), t_init.get_weights(), policy,
                       learning_rate=1.0)
  assert not all(np.allclose(a, b, rtol=1e-3, atol=1e-5) for a, b in zip(w1, wrong))


def _differ(a, b, rtol, atol):
  return not all(np.allclose(x, y, rtol=rtol, atol=atol) for x, y in zip(a, b))


def test_lazy_jacobians_agree_on_one_and_two_replicas(digits_splits):
  """--jac_every=2 under MirroredStrategy: every replica takes the Jacobian step on the same
  optimizer steps (0 and 2 of 3), so 1 and 2 replicas end with the same weights, and those
  differ from the every-step run's (the schedule is live, not ignored)."""
  init, t_init, one, two = _start(digits_splits.info)
  args = (digits_splits, init.get_weights(), t_init.get_weights(), "batch_stats")
  kw = dict(steps=3, learning_rate=0.02)
  _, w1 = _one_step(one, *args, jac_every=2, **kw)
  _, w2 = _one_step(two, *args, jac_every=2, **kw)
  for a, b in zip(w1, w2):  # float32 sums in another order over 3 steps
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  moved = max(np.abs(a - b).max() for a, b in zip(w1, init.get_weights()))
  _, every = _one_step(one, *args, jac_every=1, **kw)
  assert max(np.abs(a - b).max() for a, b in zip(w1, every)) > 1e-2 * moved
  # The tolerance above tells wrong schedules apart: the Jacobian term on every step, and
  # the Jacobian steps shifted by one (steps 1 of 3, as a replica off by one step would).
  assert _differ(w1, every, 1e-3, 1e-4)
  original = Distiller.is_jacobian_step
  try:
    Distiller.is_jacobian_step = lambda self, step: step % self.jac_every == 1
    _, shifted = _one_step(one, *args, jac_every=2, **kw)
  finally:
    Distiller.is_jacobian_step = original
  assert _differ(w1, shifted, 1e-3, 1e-4)


def test_replicas_draw_their_own_classes_and_noise():
  # The same examples on both replicas: with the replica id folded into the per-step seed the
  # random classes and the noise differ between replicas (one shared seed would repeat them).
  from tests.helpers import linear_model  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  two = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  with two.scope():
    d = Distiller(
        linear_model(rng.normal(size=(4, 5)), name="student"),
        linear_model(rng.normal(size=(4, 5)), name="teacher"),
        hints=HintConfig.of([("jac", 1.0), ("noise", 1.0)], jac_target="random", noise_sigma=0.5,
                            noise_samples=2))
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


# --- TF_CONFIG and the chief (--strategy=multi_worker) --------------------------------------

@pytest.mark.parametrize("tf_config,message", [
    (None, "needs the environment variable TF_CONFIG"),
    ("{not json", "not valid JSON"),
    ('{"task": {"type": "worker", "index": 0}}', "no \"cluster\""),
    ('{"cluster": {"worker": ["localhost:1"]}}', "no \"task\""),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "worker", "index": 1}}',
     "index 1 is out of range"),
    ('{"cluster": {"worker": ["localhost:1"]}, "task": {"type": "chief", "index": 0}}',
     "not a job of the cluster"),
    ('{"cluster": {"worker": "localhost:1"}, "task": {"type": "worker", "index": 0}}',
     "non-empty list"),
])
def test_malformed_tf_config_is_a_clear_error(tmp_path, monkeypatch, tf_config, message):
  if tf_config is None:
    monkeypatch.delenv("TF_CONFIG", raising=False)
  else:
    monkeypatch.setenv("TF_CONFIG", tf_config)
  with pytest.raises(ConfigError, match="TF_CONFIG") as err:
    checks.validate(Config(workdir=str(tmp_path), strategy="multi_worker"))
  assert message in str(err.value)


def test_chief_is_the_chief_task_or_worker_zero():
  assert runtime.is_chief({"worker": ["a:1", "b:1"]}, "worker", 0)
  assert not runtime.is_chief({"worker": ["a:1", "b:1"]}, "worker", 1)
  assert not runtime.is_chief({"chief": ["c:1"], "worker": ["a:1"]}, "worker", 0)
  assert runtime.is_chief({"chief": ["c:1"], "worker": ["a:1"]}, "chief", 0)


def test_command_line_names_tf_config_when_it_is_malformed(tmp_path):
  env = helpers.cli_env(TF_CONFIG="{not json", CUDA_VISIBLE_DEVICES="")
  proc = helpers.run_cli("--strategy=multi_worker", f"--workdir={tmp_path}", env=env,
                         timeout=120)
  assert proc.returncode == 2
  assert "tfjac: error: --strategy: TF_CONFIG is not valid JSON" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("value, expected", [
    ({"cluster": {"worker": ["a:1", "b:2"]}, "task": {"type": "worker", "index": 1}},
     ({"worker": ["a:1", "b:2"]}, "worker", 1)),
    ({"cluster": {"chief": ["c:3"], "worker": ["a:1"]}, "task": {"type": "chief", "index": 0}},
     ({"chief": ["c:3"], "worker": ["a:1"]}, "chief", 0)),
])
def test_a_valid_tf_config_reads_as_written(monkeypatch, tmp_path, value, expected):
  """runtime.parse_tf_config's (cluster, task type, index), from TFConfigClusterResolver, are
  the TF_CONFIG's own values; a non-chief worker then writes its own directory."""
  monkeypatch.setenv("TF_CONFIG", json.dumps(value))
  assert runtime.parse_tf_config() == expected
  config = runtime.worker_config(Config(workdir=str(tmp_path), strategy="multi_worker"))
  chief = runtime.is_chief(*expected)
  assert config.workdir == (str(tmp_path) if chief else
                            os.path.join(str(tmp_path), "workers", "worker_1"))
