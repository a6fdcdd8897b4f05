"""The benchmark's PyTorch peer (tools/torch_peer.py) computes tfjac's step: same networks and
losses, checked on tiny shared weights. Skipped without torch (an optional extra)."""
import os
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(helpers.REPO, "tools"))
import torch_peer  # noqa: E402  pylint: disable=g-import-not-at-top

from tfjac import models  # noqa: E402
from tfjac.models.vgg import LAYOUTS  # noqa: E402
from tfjac.training.distiller import Distiller  # noqa: E402

SHAPE, CLASSES, MEAN, STD = (8, 8, 3), 5, [0.4, 0.5, 0.6], [0.2, 0.3, 0.25]


def _pair(name, width, seed):
  keras.utils.set_random_seed(seed)
  k = models.build(name, SHAPE, CLASSES, mean=MEAN, std=STD, width=width)
  rng = np.random.default_rng(seed)
  for layer in k.layers:  # moving statistics away from 0 / 1, so that eval mode uses them
    if "BatchNorm" in layer.__class__.__name__:
      g, b, m, v = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, g.shape), rng.normal(0, 0.1, b.shape),
                         rng.normal(0, 0.3, m.shape), rng.uniform(0.5, 2.0, v.shape)])
  t = torch_peer.VGG(LAYOUTS[name], SHAPE[0], SHAPE[2], CLASSES, mean=MEAN, std=STD,
                     width=width)
  torch_peer.copy_from_keras(t, k)
  return k, t


@pytest.mark.parametrize("training", [False, True])
def test_torch_peer_computes_tfjacs_terms(training):
  k_teacher, t_teacher = _pair("vgg9", 0.1, 1)
  k_student, t_student = _pair("vgg4", 0.1, 2)
  rng = np.random.default_rng(0)
  x = rng.random((6, *SHAPE), np.float32)
  y = np.array([0, 1, 2, 3, 4, 0])
  hints = ("ce", "act", "jac", "kd")
  distiller = Distiller(k_student, k_teacher, hints=[(h, 1.0) for h in hints])
  terms = distiller.per_example_terms(tf.constant(x), tf.constant(y), training=training,
                                      step=0)[0]
  peer = torch_peer.per_example_terms(
      t_student, t_teacher, torch.from_numpy(np.transpose(x, (0, 3, 1, 2)).copy()),
      torch.from_numpy(y), hints, training=training)
  # In training mode tfjac holds the batch statistics constant for the student's Jacobian
  # (--jac_bn_policy=batch_stats), the plain PyTorch step does not: jac differs there.
  compared = [h for h in hints if not (training and h == "jac")]
  for h in compared:
    np.testing.assert_allclose(peer[h].detach().numpy(), terms[h].numpy(), rtol=2e-4,
                               atol=1e-5, err_msg=h)
  assert float(tf.reduce_min(terms["jac"])) > 1e-3  # the Jacobians are not trivially equal


def test_torch_peer_autocast_bfloat16_is_close_and_does_round():
  """The peer's mixed_bfloat16 (torch.autocast) computes the float32 terms up to bfloat16
  rounding (the tolerances of tests/test_precision.py's loss and jac term), and differs."""
  _, t_teacher = _pair("vgg9", 0.1, 1)
  _, t_student = _pair("vgg4", 0.1, 2)
  rng = np.random.default_rng(0)
  x = torch.from_numpy(np.transpose(rng.random((6, *SHAPE), np.float32), (0, 3, 1, 2)).copy())
  y = torch.from_numpy(np.array([0, 1, 2, 3, 4, 0]))
  hints = ("ce", "act", "jac")
  full = torch_peer.per_example_terms(t_student, t_teacher, x, y, hints, training=True)
  low = torch_peer.per_example_terms(t_student, t_teacher, x, y, hints, training=True,
                                     precision=torch.bfloat16)
  for h in hints:
    assert low[h].dtype == torch.float32
    a, b = low[h].detach().numpy(), full[h].detach().numpy()
    np.testing.assert_allclose(a.mean(), b.mean(), rtol=5e-2, err_msg=h)
  assert any(not np.array_equal(low[h].detach().numpy(), full[h].detach().numpy())
             for h in hints)


def test_torch_peer_times_a_bfloat16_step():
  cfg = dict(hints="act,jac,ce", jac_target="label", teacher_model="vgg9", model="vgg4",
             width=0.1, image_size=8, channels=3, num_classes=5, batch_size=4, steps=1,
             warmup=1, mixed_precision="mixed_bfloat16")
  result = torch_peer.time_step(cfg)
  assert result["precision"] == "mixed_bfloat16" and result["images_per_s"] > 0
  assert result["device"] == torch_peer.device()
  assert "skipped" in torch_peer.time_step(dict(cfg, jac_estimator="jvp"))
