"""Test set-up: two logical CPU devices (for the 1-vs-2-replica tests) must be configured
before TensorFlow runs any op, so this happens at import, before any test module."""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()])


@pytest.fixture(autouse=True)
def _float32_by_default(monkeypatch):
  """--mixed_precision's default (auto) resolves as on a CPU without bfloat16 units, so the
  suite's numbers are float32 on every machine; the tests of bfloat16 and of auto's choice
  name the precision or pass their own cpuinfo (tests/test_precision.py)."""
  from tfjac import runtime  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(runtime, "_proc_cpuinfo", lambda: "")


@pytest.fixture(autouse=True)
def _seed():
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  yield


@pytest.fixture(scope="session")
def digits_splits():
  from tfjac import data  # pylint: disable=g-import-not-at-top
  from tfjac.config import DataConfig  # pylint: disable=g-import-not-at-top
  return data.prepare(DataConfig())
