"""The checks of a run's settings that need no data: when the teacher cache turns itself off
(and --teacher_cache=on is refused), and when --jit_compile is refused."""
import dataclasses
import json
import re
from typing import Optional

import pytest

from tfjac import checks, errors
from tfjac.config import Config, DataConfig, HintConfig, TrainConfig
from tfjac.errors import ConfigError
from tfjac.training import teacher_cache


def _config(**kw):
  hints = kw.pop("hints", HintConfig())
  data = kw.pop("data", DataConfig())
  return Config(hints=hints, data=data, **kw)


def _with_cache(cfg, cache):
  return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, cache=cache))


@pytest.mark.parametrize("change,flag,setting", [
    (dict(data=DataConfig(augment=("flip",))), "--augment (flip)", "data.augment (flip)"),
    (dict(hints=HintConfig(jac_target="random")), "--jac_target=random",
     "hints.jac_target='random'"),
    (dict(hints=HintConfig(jac_target="projection")), "--jac_target=projection",
     "hints.jac_target='projection'"),
    (dict(hints=HintConfig(hints=("noise", "ce"))), "noise", "noise"),
])
def test_teacher_cache_auto_turns_off_and_on_refuses(tmp_path, change, flag, setting):
  """The reason is logged in the caller's terms: the settings' names, flags in a command-line
  run (inside checks.flag_errors); --teacher_cache=on is refused with it."""
  cfg = _config(workdir=str(tmp_path), **change)
  use, reason = teacher_cache.use_teacher_cache(cfg, True)
  assert not use and setting in errors.say(reason) and "--" not in errors.say(reason)
  with checks.flag_errors():
    assert flag in errors.say(reason)
  with pytest.raises(ConfigError, match="--teacher_cache.*" + re.escape(flag)):
    checks.validate(_with_cache(cfg, "on"))


def test_teacher_cache_auto_is_on_for_the_default_distillation(tmp_path):
  cfg = _config(workdir=str(tmp_path))
  assert teacher_cache.use_teacher_cache(cfg, True)[0]
  assert not teacher_cache.use_teacher_cache(_with_cache(cfg, "off"),
                                         True)[0]
  checks.validate(_with_cache(cfg, "on"))
  # A mode that fits no student against a teacher (its Mode entry) never caches.
  use, reason = teacher_cache.use_teacher_cache(cfg, False)
  assert not use and "fits no student against a teacher" in reason
  # jac_target=random does not matter when no hint takes Jacobians
  cfg = _config(workdir=str(tmp_path), hints=HintConfig(hints=("act", "ce"),
                                                        jac_target="random"))
  assert teacher_cache.use_teacher_cache(cfg, True)[0]


@pytest.mark.parametrize("strategy", ["mirrored", "multi_worker"])
def test_jit_compile_with_several_replicas_is_refused(tmp_path, monkeypatch, strategy):
  monkeypatch.setenv("TF_CONFIG", json.dumps(
      {"cluster": {"worker": ["localhost:1", "localhost:2"]}, "task": {"type": "worker",
                                                                        "index": 0}}))
  cfg = _config(workdir=str(tmp_path), strategy=strategy, train=TrainConfig(jit_compile=True),
                hints=HintConfig(hints=("act", "ce")))
  with pytest.raises(ConfigError, match="--jit_compile.*XLA cannot compile a step under"):
    checks.validate(cfg)
  checks.validate(dataclasses.replace(cfg, train=TrainConfig()))


@pytest.mark.parametrize("hints", [("act", "jac", "ce"), ("ce", "jacnorm"), ("jac_ce",)])
def test_jit_compile_with_double_backprop_is_refused(tmp_path, hints):
  mode = "regularize" if "jacnorm" in hints else "distill"
  cfg = _config(workdir=str(tmp_path), mode=mode, hints=HintConfig(hints=hints),
                train=TrainConfig(jit_compile=True))
  with pytest.raises(ConfigError, match="--jit_compile: refused .*max-pooling"):
    checks.validate(cfg)
  checks.validate(dataclasses.replace(cfg, train=TrainConfig()))


@pytest.mark.parametrize("argv,width", [
    ((), 0.25),  # the default command: a VGG-9 sized for the 8x8 digits
    (("--teacher_width=1",), 1.0),  # given: kept
    (("--teacher_model=resnet20",), 1.0),  # another architecture: not resized
    (("--dataset=cifar100",), 1.0),  # 32x32 images: the paper's width
    (("--flagfile=flags/cifar100_base.cfg",), 1.0),
])
def test_teacher_width_default_is_sized_for_the_dataset(argv, width, monkeypatch):
  from tests.helpers import REPO, parsed_flags  # pylint: disable=g-import-not-at-top
  from tfjac import run  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(REPO)
  with parsed_flags(*argv):
    assert run.config_from_flags().teacher.model.width == width


def _float_settings(settings, path=()):
  """(path, a copy of `settings` with that float field (or one entry of a float tuple, or one
  hint weight) set to `bad`) for every float setting of a Config, found by walking it."""
  def cases(obj, path):
    for field in dataclasses.fields(obj):
      value, where = getattr(obj, field.name), path + (field.name,)
      if dataclasses.is_dataclass(value):
        for p, make in cases(value, where):
          yield p, (lambda bad, make=make, name=field.name, obj=obj: dataclasses.replace(
              obj, **{name: make(bad)}))
      elif field.type in (float, "float", Optional[float], "Optional[float]"):
        yield where, lambda bad, obj=obj, name=field.name: dataclasses.replace(
            obj, **{name: bad})
      elif field.name == "weights" and isinstance(obj, HintConfig):
        yield where + ("act",), lambda bad, obj=obj: dataclasses.replace(
            obj, weights=(("act", bad),))
      elif "float" in str(field.type) and "Tuple" in str(field.type):
        yield where, lambda bad, obj=obj, name=field.name: dataclasses.replace(
            obj, **{name: (bad,)})
  return list(cases(settings, path))


_FLOAT_CASES = _float_settings(Config(source=DataConfig()))


def test_every_float_setting_is_found():
  # The walk must see the float settings one can name, or the refusal below tests nothing.
  paths = {p for p, _ in _FLOAT_CASES}
  for path in [("train", "learning_rate"), ("teacher", "train", "learning_rate"),
               ("hints", "weights", "act"), ("teacher", "input", "mean"),
               ("robustness_sigmas",), ("student", "width"), ("data", "validation_fraction")]:
    assert path in paths, path
  assert len(paths) >= 20


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("path,make", _FLOAT_CASES, ids=[".".join(p) for p, _ in _FLOAT_CASES])
def test_nan_and_infinity_are_refused_by_flag_before_any_work(tmp_path, path, make, bad):
  from absl import flags
  from tfjac import flagdefs  # noqa: F401  (defines the flags)
  config = dataclasses.replace(make(bad), workdir=str(tmp_path / "never"))
  with pytest.raises(ConfigError) as e:
    checks.validate(config)
  flag = checks.flag_of(path)
  assert e.value.flag == flag and "finite" in str(e.value), (path, str(e.value))
  assert flag in flags.FLAGS, flag  # a flag the user can actually pass
  assert not (tmp_path / "never").exists()  # refused before the run directory was made


def test_learning_rate_nan_from_the_command_line_is_refused(tmp_path):
  from tests import helpers
  from tfjac import run
  with helpers.parsed_flags("--learning_rate=nan", f"--workdir={tmp_path}"):
    config = run.config_from_flags()
  with pytest.raises(ConfigError, match="--learning_rate: must be a finite number, got nan"):
    checks.validate(config)


def test_a_training_error_advises_in_the_callers_terms():
  """NonFiniteLossError's advice names the resume setting: as a Python caller writes it, and as
  a flag when raised inside a command-line run (checks.flag_errors)."""
  from tfjac.errors import NonFiniteLossError  # pylint: disable=g-import-not-at-top
  error = NonFiniteLossError("act_loss", 0, 3, float("nan"))
  assert "run with resume=False" in str(error) and "--" not in str(error)
  with pytest.raises(NonFiniteLossError, match="run with --noresume"):
    with checks.flag_errors():
      raise NonFiniteLossError("act_loss", 0, 3, float("nan"))


def test_a_mentioned_list_is_written_as_its_flag_takes_it():
  from tfjac.errors import mention  # pylint: disable=g-import-not-at-top
  with checks.flag_errors():
    said = errors.say(f"{mention('data.augment', ('flip', 'crop'))} and "
                      f"{mention('data.classes', [0, 1])}")
  assert said == "--augment=flip,crop and --classes=0,1", said
  assert checks.flag_of(("hints", "weights")) == "weights"  # no hint named: no IndexError


@pytest.mark.parametrize("role,weights_flag", [("student", "--student_weights"),
                                               ("teacher", "--teacher_model_weights")])
def test_a_networks_weights_file_is_refused_by_its_own_flag(tmp_path, role, weights_flag):
  """Initial weights for a network built here (not an outside one), or a file that is not
  there, name the weights flag of that network: the student's or the teacher's."""
  from tfjac.config import ModelConfig, TeacherConfig  # pylint: disable=g-import-not-at-top

  def config(name, weights):
    model = ModelConfig(name, 1.0, weights=weights)
    if role == "student":
      return _config(student=model, workdir=str(tmp_path))
    return _config(teacher=TeacherConfig(model=model), workdir=str(tmp_path))

  with pytest.raises(ConfigError, match=f"^{weights_flag}: applies to keras.applications"):
    checks.validate(config("vgg9", "init.weights.h5"))
  with pytest.raises(ConfigError, match=f"^{weights_flag}: 'missing.h5' is not a file"):
    checks.validate(config("keras.applications:ResNet50", "missing.h5"))
