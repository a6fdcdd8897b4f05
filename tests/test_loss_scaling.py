"""Loss-term scaling (training/term_scales.py): each term over a detached measure of its own size,
so that a hint's weight means relative importance. Checked against numpy hand computations of
the batch means; invariance to a term's units; lazy Jacobian steps; 1 vs 2 replicas."""
import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import hints as hints_lib
from tfjac.config import HintConfig
from tfjac.training import term_scales
from tfjac.training.distiller import Distiller
from tests import helpers


def _batch(digits_splits, n=16, start=0):
  return (tf.constant(digits_splits.train.images[start:start + n]),
          tf.constant(digits_splits.train.labels[start:start + n]))


def _pair(info, seed=3):
  keras.utils.set_random_seed(seed)
  student = helpers.tiny_vgg(info, "student")
  teacher = helpers.tiny_vgg(info, "teacher")
  return student, teacher


@pytest.mark.parametrize("kind", ["initial", "running"])
def test_the_first_step_divides_each_term_by_its_own_batch_mean(digits_splits, kind):
  student, teacher = _pair(digits_splits.info)
  d = Distiller(student, teacher, hints=HintConfig.of({"act": 2.0, "ce": 0.5}, loss_scaling=kind))
  x, y = _batch(digits_splits)
  raw = {n: v.numpy() for n, v in d.per_example_terms(x, y, training=True, step=0)[0].items()}
  loss, terms, total, *_ = d.compute_total_loss(x, y, training=True, step=0)
  for name in ("act", "ce"):  # by hand: the scale is the mean of the raw per-example values
    np.testing.assert_allclose(d.term_scales.scale(name).numpy(), raw[name].mean(), rtol=1e-5)
  expected = 2.0 * raw["act"] / raw["act"].mean() + 0.5 * raw["ce"] / raw["ce"].mean()
  np.testing.assert_allclose(total.numpy(), expected, rtol=1e-5)
  np.testing.assert_allclose(loss.numpy(), 2.5, rtol=1e-5)  # each term starts at its weight


def test_initial_averages_the_first_steps_then_freezes_and_running_is_a_corrected_ema():
  layer = keras.layers.Layer()
  initial = term_scales.TermScales(layer, ("a", "b"), "initial", warmup=3)
  running = term_scales.TermScales(layer, ("a", "b"), "running", decay=0.5)
  values = [4.0, 8.0, 3.0, 100.0, 7.0]
  ema = 0.0
  for i, v in enumerate(values):
    initial.update("a", tf.constant(v))
    running.update("a", tf.constant(v))
    ema = 0.5 * ema + 0.5 * v
    np.testing.assert_allclose(running.scale("a").numpy(), ema / (1 - 0.5 ** (i + 1)),
                               rtol=1e-6)
    np.testing.assert_allclose(initial.scale("a").numpy(), np.mean(values[:min(i + 1, 3)]),
                               rtol=1e-6)
  assert float(initial.scale("b")) == 1.0  # never updated: the raw term
  negative = term_scales.TermScales(layer, ("a", "b"), "initial")
  negative.update("a", tf.constant(-2.0))  # jac_ce can be negative: its size, not its sign
  assert float(negative.scale("a")) == 2.0


def test_a_single_hint_is_never_scaled(digits_splits):
  student, teacher = _pair(digits_splits.info)
  d = Distiller(student, teacher, hints=HintConfig.of({"act": 1.0}, loss_scaling="initial"))
  assert d.term_scales.kind == "none" and not d.term_scales.variables


def test_an_unknown_scaling_names_the_argument(digits_splits):
  student, teacher = _pair(digits_splits.info)
  with pytest.raises(ValueError, match="hints.loss_scaling: unknown value .bogus.; valid: initial, none, running"):
    Distiller(student, teacher, hints=HintConfig.of({"act": 1.0, "ce": 1.0}, loss_scaling="bogus"))


def _train(digits_splits, scaling, act_factor, monkeypatch, steps=4, hints=None):
  """The student's weights after `steps` SGD steps of act+ce with act multiplied by
  `act_factor` (a term in other units)."""
  act = hints_lib.HINTS["act"]
  scaled = dataclasses.replace(act, loss=lambda i, p: act_factor * act.loss(i, p))
  monkeypatch.setitem(hints_lib.HINTS, "act", scaled)
  student, teacher = _pair(digits_splits.info)
  d = Distiller(student, teacher,
                hints=HintConfig.of(hints or {"act": 1.0, "ce": 1.0}, loss_scaling=scaling))
  d.compile(optimizer=keras.optimizers.SGD(0.05))
  x, y = digits_splits.train.images[:16 * steps], digits_splits.train.labels[:16 * steps]
  d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1, verbose=0)
  return student.get_weights()


@pytest.mark.parametrize("kind", ["initial", "running"])
def test_a_term_in_other_units_trains_the_same_under_scaling(digits_splits, monkeypatch, kind):
  base = _train(digits_splits, kind, 1.0, monkeypatch)
  times_1000 = _train(digits_splits, kind, 1000.0, monkeypatch)
  for a, b in zip(base, times_1000):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-5)
  raw_base = _train(digits_splits, "none", 1.0, monkeypatch)
  raw_1000 = _train(digits_splits, "none", 1000.0, monkeypatch)  # raw: a 1000x weight
  assert not all(np.allclose(a, b, rtol=2e-3, atol=2e-5)  # (diverges: NaN differs too)
                 for a, b in zip(raw_base, raw_1000))


def test_lazy_jacobian_steps_update_the_jacobian_scale_only_when_they_compute_it(digits_splits):
  student, teacher = _pair(digits_splits.info)
  d = Distiller(student, teacher, hints=HintConfig.of(
      {"act": 1.0, "jac": 1.0, "ce": 1.0}, loss_scaling="initial", jac_every=4))
  d.compile(optimizer=keras.optimizers.SGD(0.01))
  x, y = digits_splits.train.images[:16 * 5], digits_splits.train.labels[:16 * 5]
  history = d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(16), epochs=1,
                  verbose=0).history
  counts = {v.name: float(v.numpy()) for v in d.term_scales.variables if "count" in v.name}
  assert counts == {"scale_act_count": 5.0, "scale_ce_count": 5.0,
                    "scale_jac_count": 2.0}  # steps 0 and 4 of 0..4
  np.testing.assert_allclose(history["scale_jac"], [float(d.term_scales.scale("jac"))])


_REPLICAS_SCRIPT = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
import keras
import numpy as np
from tfjac import data
from tfjac.config import DataConfig, HintConfig
from tfjac.training.distiller import Distiller
from tests import helpers
splits = data.prepare(DataConfig())
info = splits.info
keras.utils.set_random_seed(5)
init, t_init = helpers.tiny_vgg(info), helpers.tiny_vgg(info)
x, y = splits.train.images[:32], splits.train.labels[:32]
out = {}
for name, devices in (("one", ["/cpu:0"]), ("two", ["/cpu:0", "/cpu:1"])):
  strategy = tf.distribute.MirroredStrategy(devices)
  with strategy.scope():
    student = helpers.tiny_vgg(info, "student", sync_bn=True)
    teacher = helpers.tiny_vgg(info, "teacher", sync_bn=True)
    student.set_weights(init.get_weights())
    teacher.set_weights(t_init.get_weights())
    d = Distiller(student, teacher,
                  hints=HintConfig.of({"act": 1.0, "ce": 1.0}, loss_scaling="initial"))
    d.compile(optimizer=keras.optimizers.SGD(0.1))
  d.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(32), epochs=1, verbose=0)
  out[name] = {"scales": {n: float(d.term_scales.scale(n)) for n in ("act", "ce")},
               "weights": [w.tolist() for w in student.get_weights()]}
probe = Distiller(init, t_init, hints=HintConfig.of({"act": 1.0, "ce": 1.0}, loss_scaling="none"))
raw = probe.per_example_terms(tf.constant(x), tf.constant(y), training=True, step=0)[0]
out["hand"] = {n: float(np.mean(raw[n].numpy())) for n in ("act", "ce")}
print("RESULT " + json.dumps(out))
"""


def test_one_and_two_replicas_measure_the_same_global_batch_mean():
  # In a process of its own: strategies made earlier in the test process share collective
  # instance keys with this one's (TF caches their shapes), which aborts its all-reduces.
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  proc = subprocess.run([sys.executable, "-c", _REPLICAS_SCRIPT], cwd=helpers.REPO,
                        capture_output=True, text=True, timeout=600, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert lines, proc.stderr[-3000:]
  got = json.loads(lines[-1][len("RESULT "):])
  # By hand: the mean over all 32 examples of the untrained pair's terms.
  for name in ("act", "ce"):
    np.testing.assert_allclose(got["one"]["scales"][name], got["hand"][name], rtol=1e-4)
    np.testing.assert_allclose(got["two"]["scales"][name], got["hand"][name], rtol=1e-4)
  for a, b in zip(got["one"]["weights"], got["two"]["weights"]):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)
