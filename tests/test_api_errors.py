"""The Python API refuses a misspelt name by the argument that carries it, with the valid names,
before it touches a network: never a bare KeyError, never a command-line flag."""
import keras
import pytest

import tfjac
from tfjac.config import HintConfig
from tfjac.errors import SettingError


class _NeverCalled(keras.Model):
  """A teacher whose first call fails: a bad name must be refused before it is probed."""

  def call(self, x):
    raise AssertionError("the teacher was called before the settings were checked")


def _student():
  return keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                           keras.layers.Dense(3)])


@pytest.mark.parametrize("kwargs,message", [
    (dict(hints={"ce": 1, "bogus": 1}),
     r"^hints: unknown value 'bogus'; valid: act, at, at_jac, ce, jac, .*"),
    (dict(hints=["bogus"]), r"hints: unknown value 'bogus'; valid: act, "),
    (dict(hints=[("act", 1.0), ("bogus", 1.0)]), "hints: unknown value 'bogus'"),
    (dict(hints="act"), r"hints= takes hint names.*not the string 'act': hints=\['act'\]"),
    (dict(hints=HintConfig.of({"act": 1}, jac_target="bogus")),
     r"^hints.jac_target: unknown value 'bogus'; valid: all, label, "),
    (dict(hints=HintConfig.of({"act": 1}, jac_estimator="bogus")),
     r"hints.jac_estimator: unknown value 'bogus'; valid: backprop, fd, jvp$"),
    (dict(hints=HintConfig.of({"act": 1}, jac_bn_policy="bogus")),
     r"hints.jac_bn_policy: unknown value 'bogus'; valid: batch_stats, inference$"),
    (dict(hints=HintConfig.of({"act": 1, "ce": 1}, loss_scaling="bogus")),
     r"hints.loss_scaling: unknown value 'bogus'; valid: initial, none, running$"),
    (dict(hints=HintConfig(hints=("act", "bogus"))), "hints: unknown value 'bogus'"),
    (dict(hints=HintConfig(hints=("act",), jac_target="bogus")),
     r"hints.jac_target: unknown value 'bogus'"),
    (dict(hints=HintConfig.of({"lwf": 1}, lwf_match="bogus")),
     r"hints.lwf_match: unknown value 'bogus'; valid: act, kd$"),
    (dict(hints=HintConfig.of({"jac_ce": 1}, loss_scaling="running")),
     r"^hints.loss_scaling: running cannot scale jac_ce.*use hints.loss_scaling='initial' or "
     "none$"),
    (dict(hints=HintConfig.of({"ce": 1, "ce ": 1})), r"hints: unknown value 'ce '"),
    (dict(hints=HintConfig(hints=("ce", "ce"))), r"^hints: lists a hint twice: ce,ce$"),
    (dict(hints=HintConfig.of({"kd": 1}, kd_temperature=float("nan"))),
     r"^hints.kd_temperature: must be a finite number, got nan$"),
    (dict(hints=HintConfig.of({"act": 1, "jac": 1}, jac_estimator="jvp")),
     r"^hints.jac_probes: 1 with hints.jac_target='label' and the normalised jac term.*Use "
     r"hints.jac_probes >= 2, hints.jac_target='all', or hints.jac_normalize=False$"),
])
def test_a_bad_name_is_refused_by_its_argument_with_the_valid_names(kwargs, message):
  with pytest.raises(ValueError, match=message) as e:
    tfjac.Distiller(_student(), _NeverCalled(), **kwargs)
  assert "--" not in str(e.value), str(e.value)  # the Python API's words, not the flags'


def test_a_top_k_beyond_the_classes_is_refused_by_its_argument():
  """The one top-k rule (hints.check_top_k) speaks the Python API's words in the Distiller."""
  def functional():
    x = keras.Input((4, 4, 1))
    return keras.Model(x, keras.layers.Dense(3)(keras.layers.Flatten()(x)))
  teacher = functional()
  with pytest.raises(SettingError,
                     match=r"^hints.jac_top_k: 4 is more than the matching outputs' 3 classes; "
                     r"use 1..3$") as e:
    tfjac.Distiller(functional(), teacher, hints=HintConfig.of({"jac": 1}, jac_target="top_k",
                                                               jac_top_k=4))
  assert "--" not in str(e.value)
  tfjac.Distiller(functional(), teacher, hints=HintConfig.of({"jac": 1}, jac_target="top_k",
                                                             jac_top_k=3))


def test_the_short_form_refuses_a_setting_that_is_not_a_field():
  """HintConfig.of takes every other setting by its field's name: a misspelt one (or the old
  keyword bn_policy) is refused with the valid names, not dropped."""
  with pytest.raises(TypeError, match=r"HintConfig.of takes .* jac_bn_policy.*; got bn_policy"):
    HintConfig.of({"jac": 1}, bn_policy="inference")
  with pytest.raises(TypeError, match="got hints/weights again"):
    HintConfig.of({"jac": 1}, weights=(("jac", 2.0),))
  assert HintConfig.of({"jac": 2, "ce": None}, jac_bn_policy="inference") == HintConfig(
      hints=("jac", "ce"), weights=(("jac", 2.0),), jac_bn_policy="inference")
