"""One source of defaults (issue 23): every flag of tfjac.run that fills a config field has the
default of that field in `config.Config()`, so a Python API user and a command-line user get the
same run; and each flag fills exactly the fields this file's own table (FIELDS) says."""
import dataclasses
import typing

import pytest
from absl import flags

from tfjac import config, flagdefs, hints, modes
from tfjac.modes import defaults as mode_defaults

# Flag -> the field(s) of config.Config() it fills in run.config_from_flags, as attribute paths.
# The flags shared by the student's and the teacher's fits fill both TrainConfigs.
_SHARED_TRAIN = ("batch_size", "steps_per_epoch", "optimizer", "momentum", "weight_decay",
                 "lr_schedule", "lr_decay_epochs", "lr_decay_factor", "early_stopping_patience",
                 "jit_compile", "backup_every_steps", "weight_decay_kind", "nesterov",
                 "lr_decay_steps")
FIELDS = {
    "mode": ("mode",), "workdir": ("workdir",), "strategy": ("strategy",),
    "teacher": ("teacher.path",),
    "source_dataset": ("source",),  # None: no source data; given, a DataConfig is built
    "robustness_sigmas": ("robustness_sigmas",),
    "conditions_examples": ("conditions_examples",), "resume": ("resume",),
    "deterministic": ("deterministic",), "choose_on_validation": ("choose_on_validation",),
    "unsafe_teacher_loading": ("teacher.unsafe_loading",),
    "teacher_cache": ("teacher.cache",), "mixed_precision": ("mixed_precision",),
    # data
    **{name: (f"data.{name}",) for name in (
        "dataset", "data_dir", "samples_per_class", "validation_fraction", "augment",
        "crop_padding", "seed", "image_size", "skip_bad_images", "classes")},
    # networks
    "model": ("student.name",), "width": ("student.width",),
    "student_weights": ("student.weights",), "teacher_model": ("teacher.model.name",),
    "teacher_model_weights": ("teacher.model.weights",),
    # None: config.resolved fills in the dataset's default (DEFAULT_TEACHER_WIDTHS)
    "teacher_width": ("teacher.model.width",),
    # optimisation
    "epochs": ("train.epochs",), "learning_rate": ("train.learning_rate",),
    "train_steps": ("train.train_steps",), "jac_every": ("hints.jac_every",),
    "val_jac_examples": ("train.val_jac_examples",), "val_jac_every": ("train.val_jac_every",),
    "teacher_epochs": ("teacher.train.epochs",),
    "teacher_learning_rate": ("teacher.train.learning_rate",),
    **{name: (f"train.{name}", f"teacher.train.{name}") for name in _SHARED_TRAIN},
    # hints (the <hint>_weight flags are paired below)
    **{name: (f"hints.{name}",) for name in (
        "hints", "kd_temperature", "jac_target", "jac_normalize", "jac_bn_policy", "jac_top_k",
        "jac_projections", "jac_estimator", "jac_probes", "jac_probe", "jac_fd_eps",
        "noise_sigma", "noise_samples", "lwf_match", "teacher_layers", "student_layers",
        "loss_scaling")},
    # the teacher's inputs
    "teacher_resize": ("teacher.input.resize",), "teacher_input_scale": ("teacher.input.scale",),
    "teacher_input_offset": ("teacher.input.offset",),
    "teacher_preprocessing": ("teacher.input.preprocessing",),
    "teacher_mean": ("teacher.input.mean",), "teacher_std": ("teacher.input.std",),
    "teacher_outputs": ("teacher.input.outputs",), "teacher_weights": ("teacher.input.weights",),
    "teacher_image_size": ("teacher.input.image_size",),
}


def _get(obj, path):
  for name in path.split("."):
    obj = getattr(obj, name)
  return obj


def _as_field_value(value, like=None):
  """A flag's default as its field holds it: a list flag's strings as the field's tuple."""
  if not isinstance(value, list):
    return value
  kind = type(like[0]) if like else str
  return tuple(kind(v) for v in value)


def _flag_names():
  return sorted(f.name for f in flags.FLAGS.get_key_flags_for_module(flagdefs))


def _pairs():
  default = config.Config()
  pairs = [(name, path, _get(default, path)) for name, paths in FIELDS.items() for path in paths]
  pairs += [(f"{h}_weight", f"hints.weight({h!r})", default.hints.weight(h)) for h in hints.HINTS]
  # The source DataConfig (--source_dataset given) takes its classes from --source_classes.
  pairs += [("source_classes", "source: DataConfig().classes", config.DataConfig().classes)]
  return pairs


def test_every_flag_is_paired():
  paired = {name for name, _, _ in _pairs()}
  assert set(_flag_names()) == paired, (
      "flags not paired with a config field in FIELDS: "
      f"{sorted(set(_flag_names()) - paired)}; pairs naming no flag: "
      f"{sorted(paired - set(_flag_names()))}")


def test_flag_defaults_are_the_config_defaults():
  disagreements = [f"--{name}={flags.FLAGS[name].default!r} but Config().{path} = {value!r}"
                   for name, path, value in _pairs()
                   if _as_field_value(flags.FLAGS[name].default, value) != value]
  assert not disagreements, "\n".join(disagreements)


def test_the_two_fits_default_apart_only_where_their_flags_do():
  """The teacher's fit has its own epochs flag; everything else a TrainConfig holds defaults
  alike, except the student-only val_jac_examples no teacher flag fills (the teacher takes no
  Jacobian hints; its validation keeps the whole split)."""
  train, teacher = config.Config().train, config.Config().teacher.train
  assert train == config.TrainConfig() and teacher == config.TEACHER_TRAIN
  differ = {f.name for f in dataclasses.fields(config.TrainConfig)
            if getattr(train, f.name) != getattr(teacher, f.name)}
  assert differ == {"epochs", "val_jac_examples"}, differ


def test_hint_params_default_to_the_hint_config():
  assert hints.HintParams() == hints.HintParams.from_config(config.HintConfig())
  for field in dataclasses.fields(hints.HintParams):
    assert field.default == getattr(config.HintConfig(), field.name), field.name


def test_the_python_api_with_hints_by_name_gets_the_command_line_defaults():
  """hints=("act", "jac", "ce") (no weights) is the command line's default run: the same
  HintConfig, every setting and weight from config.py."""
  from tfjac.training import settings  # pylint: disable=g-import-not-at-top
  api = settings.hint_settings(("act", "jac", "ce"))
  assert api == config.HintConfig()
  assert all(api.weight(h) == config.HintConfig().weight(h) for h in api.hints)
  mixed = settings.hint_settings({"act": None, "jac": 3, "ce": 1})
  assert mixed.weight("act") == 1.0 and mixed.weight("jac") == 3.0


@pytest.mark.parametrize("dataset,mode", [("digits", "distill"), ("fashion_mnist", "distill")] +
                         [("digits", m) for m in modes.MODES if m != "distill"])
def test_the_default_command_and_config_make_the_same_run(dataset, mode):
  """With no flags but the dataset and the mode, the command line's Config is the Python API's
  Config(data=..., mode=...) once the derived defaults are filled in (modes/defaults.resolved, which
  run.run and checks.validate apply): the teacher width the dataset's default (0.25 for
  digits' VGG-9, not 1), the mode's default hints and Jacobian target (transfer: ce,lwf at
  teacher_top1, not act,jac,ce at label)."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tfjac import run  # pylint: disable=g-import-not-at-top,unused-import  (the flags)
  with helpers.parsed_flags(f"--dataset={dataset}", f"--mode={mode}"):
    from_flags = run.config_from_flags()
  api = mode_defaults.resolved(config.Config(data=config.DataConfig(dataset=dataset), mode=mode))
  # The flags list every hint's weight; Config() lists none (each 1): the same weights.
  assert all(api.hints.weight(h) == from_flags.hints.weight(h) for h in hints.HINTS)
  unweighted = lambda c: dataclasses.replace(c, hints=dataclasses.replace(c.hints, weights=()))  # noqa: E731
  assert unweighted(api) == unweighted(from_flags)
  assert from_flags.teacher.model.width == config.default_teacher_width(dataset, "vgg9")


def test_a_hand_made_model_config_is_what_its_flag_builds():
  """ModelConfig("vgg9") as the teacher is --teacher_model=vgg9 (the dataset's default width,
  0.25 on digits), as the student --model=vgg9 (width 1)."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tfjac import run  # pylint: disable=g-import-not-at-top,unused-import  (the flags)
  with helpers.parsed_flags("--teacher_model=vgg9", "--model=vgg9"):
    from_flags = run.config_from_flags()
  api = mode_defaults.resolved(config.Config(
      student=config.ModelConfig("vgg9"),
      teacher=config.TeacherConfig(model=config.ModelConfig("vgg9"))))
  assert (api.student, api.teacher.model) == (from_flags.student, from_flags.teacher.model)
  assert (api.student.width, api.teacher.model.width) == (1.0, 0.25)


# Config fields no flag fills: the teacher takes no Jacobian hints and no step budget; the
# source data (--mode=conditions) takes only its dataset, classes and the shared data_dir,
# image_size and seed.
NO_FLAG = {"teacher.train.train_steps", "teacher.train.val_jac_examples",
           "teacher.train.val_jac_every", "source.samples_per_class",
           "source.validation_fraction", "source.augment", "source.crop_padding",
           "source.skip_bad_images"}


def _leaves(settings, prefix=""):
  """{path: value} of every field of a (nested) config dataclass; an absent group (None) as
  its class's defaults; weights as one leaf per hint."""
  out = {}
  kinds = typing.get_type_hints(type(settings))
  for field in dataclasses.fields(settings):
    value, path = getattr(settings, field.name), prefix + field.name
    kind = [k for k in typing.get_args(kinds[field.name]) if k is not type(None)]
    if value is None and kind and dataclasses.is_dataclass(kind[0]):
      value = kind[0]()
    if dataclasses.is_dataclass(value):
      out.update(_leaves(value, path + "."))
    elif isinstance(settings, config.HintConfig) and field.name == "weights":
      out.update({f"{path}.{h}": w for h, w in value})
    else:
      out[path] = value
  return out


def test_every_config_field_is_filled_by_a_flag():
  """A field added to a config dataclass gets a flag (a row of flagdefs.TABLE) or is listed in
  NO_FLAG: the command line cannot silently lack a setting the Python API has."""
  filled = {path for flag in flagdefs.TABLE for path in flag.paths}
  leaves = set(_leaves(config.Config())) | {f"hints.weights.{h}" for h in hints.HINTS}
  assert leaves - filled - NO_FLAG == set(), "fields without a flag"
  assert filled - leaves == set(), "flags filling no field"


def _other_value(flag):
  """(a command-line value of `flag` unlike its default, the value its fields then hold),
  the second written here, not converted by flagdefs."""
  default = flags.FLAGS[flag.name].default
  if isinstance(flag.choices, (list, tuple)):
    choice = next(c for c in flag.choices if c != default)
    return choice, choice
  if isinstance(default, bool):
    return ("false", False) if default else ("true", True)
  if isinstance(default, int):
    return str(default + 3), default + 3
  if isinstance(default, float) or flag.name.endswith("width"):
    return str((default or 0.0) + 0.5), (default or 0.0) + 0.5
  if isinstance(default, list):
    item = typing.get_args(flagdefs.field_of(flag.paths[0])[0])[0]
    return {int: ("5,6", (5, 6)), float: ("0.5,0.25", (0.5, 0.25)),
            str: ("crop,flip", ("crop", "flip"))}[item]
  return "some/value", "some/value"


@pytest.mark.parametrize("name", sorted(set(_flag_names()) - {"mode"}))
def test_each_flag_fills_exactly_its_fields(name):
  """Given alone with a value unlike its default, a flag changes exactly the fields the test's
  own table (FIELDS, written apart from flagdefs) says, to that value. The dataset and the
  teacher model also move the derived teacher width (config.resolved); the source data's
  flags are given with --source_dataset, which creates the group they fill."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tfjac import run  # pylint: disable=g-import-not-at-top
  flag = next(f for f in flagdefs.TABLE if f.name == name)
  base_args = ("--source_dataset=cifar10",)
  with helpers.parsed_flags(*base_args):
    before = _leaves(run.config_from_flags())
  value, held = _other_value(flag)
  with helpers.parsed_flags(*base_args, f"--{name}={value}"):
    after = _leaves(run.config_from_flags())
  changed = {p for p in after if after[p] != before[p]}
  if name.endswith("_weight"):
    expected = {f"hints.weights.{name[:-len('_weight')]}"}
  elif name in ("source_dataset", "source_classes"):
    expected = {f"source.{name[len('source_'):]}"}
  else:
    expected = set(FIELDS[name])
    expected |= {"source." + p[5:] for p in expected if p.startswith("data.") and
                 p[5:] in ("data_dir", "image_size", "seed")}
  derived = {"teacher.model.width"} & changed if name in ("dataset", "teacher_model") else set()
  assert changed == expected | derived
  assert {p: after[p] for p in expected} == {p: held for p in expected}


def test_source_flags_without_the_source_dataset_fill_nothing():
  """--source_classes alone: no source data (Config.source stays None), and its value is not
  even read (a bad one is no error: the group it would fill does not exist)."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  from tfjac import run  # pylint: disable=g-import-not-at-top
  with helpers.parsed_flags("--source_classes=not,numbers", "--seed=3"):
    made = run.config_from_flags()
  assert made.source is None and made.data.seed == 3


def test_the_settings_page_is_the_flags_table():
  """docs/settings.md is written from flagdefs.TABLE by the command at its top: a flag added,
  renamed or given another default without rewriting the page fails here."""
  import os  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  with open(os.path.join(helpers.REPO, "docs", "settings.md"), encoding="utf-8") as f:
    page = f.read()
  assert page == flagdefs.reference(), "rewrite docs/settings.md with the command at its top"
  assert all(f"| `--{name}` |" in page for name in _flag_names())
