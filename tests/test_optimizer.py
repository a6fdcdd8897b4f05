"""The optimizer factory against hand computations: the L2 penalty (PyTorch SGD's weight_decay,
the attention-transfer reference) and Keras's decoupled decay, momentum with and without
Nesterov, and what the CIFAR-100 flagfiles ask for."""
import keras
import numpy as np
import pytest

from tfjac import checks, run
from tfjac.config import Config, TrainConfig
from tfjac.errors import ConfigError
from tfjac.training import optimizers
from tests import helpers

W0 = np.array([1.0, -2.0, 0.5, 3.0])
GRADS = [np.array([0.3, -0.1, 0.2, 0.0]), np.array([-0.4, 0.5, 0.1, 0.2]),
         np.array([0.2, 0.2, -0.3, -0.1])]


def _steps(cfg, steps_per_epoch=1):
  """The variable after each of len(GRADS) optimizer steps of make_optimizer(cfg)."""
  opt = optimizers.make_optimizer(cfg, steps_per_epoch)
  w = keras.Variable(W0.astype(np.float32))
  out = []
  for g in GRADS:
    opt.apply([keras.ops.convert_to_tensor(g.astype(np.float32))], [w])
    out.append(keras.ops.convert_to_numpy(w).astype(np.float64))
  return out


def _torch_sgd(lrs, momentum, wd, nesterov):
  """PyTorch's SGD (dampening 0), written out: d = g + wd w; v = m v + d;
  w -= lr (d + m v if nesterov else v)."""
  w, v, out = W0.copy(), np.zeros_like(W0), []
  for lr, g in zip(lrs, GRADS):
    d = g + wd * w
    v = momentum * v + d
    w = w - lr * (d + momentum * v if nesterov else v)
    out.append(w.copy())
  return out


@pytest.mark.parametrize("nesterov", [False, True])
def test_l2_sgd_is_pytorch_sgd_with_weight_decay_at_a_constant_rate(nesterov):
  cfg = TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.2,
                    weight_decay_kind="l2", nesterov=nesterov, lr_schedule="constant")
  got = _steps(cfg)
  want = _torch_sgd([0.1] * 3, 0.9, 0.2, nesterov)
  for step, (g, w) in enumerate(zip(got, want)):
    np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-7, err_msg=f"step {step + 1}")
  # The decay term is visible: without it the weights end elsewhere.
  assert np.abs(got[-1] - _torch_sgd([0.1] * 3, 0.9, 0.0, nesterov)[-1]).max() > 1e-2


def test_l2_sgd_under_a_schedule_keeps_keras_momentum_form():
  """Documented difference: after a rate change Keras's velocity still holds the old rate
  (v = m v - lr g; w += v), PyTorch rescales it (w -= lr v). lr_decay_epochs=(1,) at one step
  per epoch: Keras's PiecewiseConstantDecay keeps the old rate while iterations <= boundary,
  so the third step is the first at the new rate."""
  cfg = TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.2,
                    weight_decay_kind="l2", nesterov=False, lr_schedule="step",
                    lr_decay_epochs=(1,), lr_decay_factor=0.2)
  got = _steps(cfg, steps_per_epoch=1)
  lrs = [0.1, 0.1, 0.02]
  w, u = W0.copy(), np.zeros_like(W0)
  for step, (lr, g) in enumerate(zip(lrs, GRADS)):
    u = 0.9 * u - lr * (g + 0.2 * w)
    w = w + u
    np.testing.assert_allclose(got[step], w, rtol=1e-6, atol=1e-7, err_msg=f"step {step + 1}")
  assert np.abs(got[-1] - _torch_sgd(lrs, 0.9, 0.2, False)[-1]).max() > 1e-3


def test_decoupled_decay_is_keras_weight_decay_outside_momentum():
  cfg = TrainConfig(optimizer="sgd", learning_rate=0.1, momentum=0.9, weight_decay=0.2,
                    weight_decay_kind="decoupled", nesterov=False, lr_schedule="constant")
  got = _steps(cfg)
  w, u = W0.copy(), np.zeros_like(W0)
  for step, g in enumerate(GRADS):
    w = w - 0.1 * 0.2 * w  # lr * wd * w, before the update, never in the velocity
    u = 0.9 * u - 0.1 * g
    w = w + u
    np.testing.assert_allclose(got[step], w, rtol=1e-6, atol=1e-7, err_msg=f"step {step + 1}")


def test_l2_adam_adds_the_penalty_to_the_gradient():
  cfg = TrainConfig(optimizer="adam", learning_rate=0.01, weight_decay=0.5,
                    weight_decay_kind="l2", lr_schedule="constant")
  got = _steps(cfg)
  w, m, v = W0.copy(), np.zeros_like(W0), np.zeros_like(W0)
  for t, g in enumerate(GRADS, 1):
    d = g + 0.5 * w
    m = 0.9 * m + 0.1 * d
    v = 0.999 * v + 0.001 * d * d
    lr = 0.01 * np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
    w = w - lr * m / (np.sqrt(v) + 1e-7)
    np.testing.assert_allclose(got[t - 1], w, rtol=1e-5, atol=1e-6, err_msg=f"step {t}")


def test_default_optimizer_is_unchanged():
  opt = optimizers.make_optimizer(TrainConfig(), 10)
  assert type(opt) is keras.optimizers.Adam and opt.weight_decay is None
  sgd = optimizers.make_optimizer(TrainConfig(optimizer="sgd", weight_decay=5e-4), 10)
  assert type(sgd) is keras.optimizers.SGD and sgd.nesterov and sgd.weight_decay == 5e-4


def test_weight_decay_kind_is_checked():
  with pytest.raises(ConfigError, match="--weight_decay_kind: l2 with --optimizer=adamw"):
    checks.validate(Config(train=TrainConfig(optimizer="adamw", weight_decay_kind="l2")))
  with pytest.raises(ConfigError, match="--weight_decay_kind: unknown value 'l1'; valid: "
                     "decoupled, l2"):
    checks.validate(Config(train=TrainConfig(weight_decay_kind="l1")))


@pytest.mark.parametrize("flagfile", ["cifar100_teacher.cfg", "cifar100_distill_act_jac_ce_n10.cfg"])
def test_cifar100_flagfiles_follow_the_reference_they_cite(flagfile, monkeypatch):
  monkeypatch.chdir(helpers.REPO)
  with helpers.parsed_flags(f"--flagfile=flags/{flagfile}"):
    cfg = run.config_from_flags()
  for train in (cfg.train, cfg.teacher.train):
    assert (train.optimizer, train.learning_rate, train.momentum) == ("sgd", 0.1, 0.9)
    assert (train.weight_decay, train.weight_decay_kind, train.nesterov) == (5e-4, "l2", False)
    opt = optimizers.make_optimizer(train, 352)
    assert isinstance(opt, optimizers.SGDWithL2) and opt.l2 == 5e-4 and not opt.nesterov
    assert opt.weight_decay is None  # no second, decoupled decay on top
