"""bfloat16 where the CPU has it: detection of the CPU's bfloat16 units, --mixed_precision=auto,
and the Jacobian step's numbers in mixed_bfloat16 against float32 with stated tolerances."""
import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac.config import HintConfig
from tfjac import models, runtime
from tfjac.training.distiller import Distiller

ZEN4 = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 avx512_vnni\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
SAPPHIRE = "flags\t\t: avx512f amx_bf16 amx_tile\n"
NEOVERSE = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_bfloat16_units_are_read_from_cpuinfo():
  assert runtime.cpu_has_bfloat16(ZEN4)
  assert runtime.cpu_has_bfloat16(SAPPHIRE)
  assert runtime.cpu_has_bfloat16(NEOVERSE)
  assert not runtime.cpu_has_bfloat16(AVX2)
  assert not runtime.cpu_has_bfloat16("")
  assert isinstance(runtime.cpu_has_bfloat16(), bool)  # this machine's, whatever it is


def test_auto_precision():
  resolve = runtime.resolve_precision
  assert resolve("auto", gpus=0, cpuinfo=ZEN4)[0] == "mixed_bfloat16"
  assert resolve("auto", gpus=0, cpuinfo=AVX2)[0] == "float32"
  assert resolve("auto", gpus=1, cpuinfo=ZEN4)[0] == "float32"
  assert resolve("auto", gpus=0, cpuinfo=ZEN4, estimator="fd")[0] == "float32"
  assert resolve("mixed_float16", gpus=0, cpuinfo=AVX2)[0] == "mixed_float16"
  policy, why = resolve("auto", gpus=0, cpuinfo=ZEN4)
  assert "bfloat16 units" in why  # what run.py logs


def test_the_default_is_bfloat16_where_the_cpu_has_it(monkeypatch):
  """--mixed_precision's default (config.Config) is auto: bfloat16 on a CPU with bfloat16 units,
  float32 on one without (the suite's conftest reads every machine as one without)."""
  from tfjac.config import Config
  default = Config().mixed_precision
  assert default == "auto"
  assert runtime.resolve_precision(default, gpus=0)[0] == "float32"  # conftest's pin
  monkeypatch.setattr(runtime, "_proc_cpuinfo", lambda: ZEN4)
  assert runtime.resolve_precision(default, gpus=0)[0] == "mixed_bfloat16"
  monkeypatch.setattr(runtime, "_proc_cpuinfo", lambda: AVX2)
  assert runtime.resolve_precision(default, gpus=0)[0] == "float32"


# Tolerances of mixed_bfloat16 against float32 for one act,jac,ce step on the digits (VGG-9
# width 0.25 teacher -> VGG-4 width 0.5 student, batch 32, the same weights), backprop (label)
# and jvp (all outputs, 2 probes) alike. Measured on an AVX-512 BF16 CPU (TF 2.21): loss 2e-4
# relative, jac term 1.5%; the step's gradients: cosine >= 0.991 per variable, 5% relative error
# over all of them; the jac term's own gradients (double backprop / forward mode through
# bfloat16 layers): cosine >= 0.970 per variable, 22% relative error. bfloat16 keeps 8 bits of
# mantissa (2^-9 = 0.2% per rounding); the margins below are about 2x.
LOSS_RTOL, JAC_RTOL = 2e-3, 5e-2
TOLERANCES = {"step": (0.97, 0.15), "jac term": (0.93, 0.40)}  # (min cosine, max rel. error)


def _step(policy, estimator, target, splits):
  info = splits.info
  x = tf.constant(splits.train.images[:32])
  y = tf.constant(splits.train.labels[:32])
  keras.mixed_precision.set_global_policy(policy)
  try:
    keras.utils.set_random_seed(0)
    student = models.build("vgg4", info.image_shape, info.num_classes, mean=info.mean,
                           std=info.std, width=0.5, model_name="s")
    teacher = models.build("vgg9", info.image_shape, info.num_classes, mean=info.mean,
                           std=info.std, width=0.25, model_name="t")
    d = Distiller(student, teacher, hints=HintConfig.of(
        [("act", 1.0), ("jac", 1.0), ("ce", 1.0)], jac_estimator=estimator, jac_target=target,
        jac_probes=2, loss_scaling="none"))  # raw: a scaled first step's loss is the weights' sum
    with tf.GradientTape(persistent=True) as tape:
      loss, terms = d.compute_total_loss(x, y, training=True, step=0)[:2]
      jac = tf.reduce_mean(terms["jac"])
    grads = tape.gradient(loss, d.trained_variables)
    jac_grads = tape.gradient(jac, d.trained_variables)
  finally:
    keras.mixed_precision.set_global_policy("float32")
  return (float(loss), float(jac), [g.numpy() for g in grads if g is not None],
          [g.numpy() for g in jac_grads if g is not None])


def _agreement(g32, g16):
  """(smallest per-variable cosine, relative error over all gradients)."""
  assert len(g32) == len(g16), "bfloat16 lost gradients that float32 has"
  cosines = [np.sum(a * b) / np.linalg.norm(a) / np.linalg.norm(b) for a, b in zip(g32, g16)
             if np.linalg.norm(a) > 0]  # (the jac term gives some variables zero gradients)
  flat32, flat16 = (np.concatenate([g.ravel() for g in gs]) for gs in (g32, g16))
  return min(cosines), np.linalg.norm(flat16 - flat32) / np.linalg.norm(flat32)


@pytest.mark.parametrize("estimator,target", [("backprop", "label"), ("jvp", "all")])
def test_bfloat16_step_within_stated_tolerances_of_float32(digits_splits, estimator, target):
  loss32, jac32, g32, j32 = _step("float32", estimator, target, digits_splits)
  loss16, jac16, g16, j16 = _step("mixed_bfloat16", estimator, target, digits_splits)
  assert loss16 != loss32  # bfloat16 did run
  np.testing.assert_allclose(loss16, loss32, rtol=LOSS_RTOL)
  np.testing.assert_allclose(jac16, jac32, rtol=JAC_RTOL)
  for name, (a, b) in (("step", (g32, g16)), ("jac term", (j32, j16))):
    cosine, error = _agreement(a, b)
    print(f"{estimator} {name}: min cosine {cosine:.4f}, relative error {error:.3f}")
    min_cosine, max_error = TOLERANCES[name]
    assert cosine > min_cosine and error < max_error, (name, cosine, error)
