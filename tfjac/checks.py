"""The checks of a Config: everything that can be checked before any work, and the few that
need the dataset or the teacher. Each raises ConfigError naming the flag and what would be valid.
The one place where the library's errors, which name settings (errors.SettingError), are turned
into flag names (flag_errors).

The rules ask the registries: a mode's own rules and needs come from its module (modes/), a
hint's needs from its declared fields (hints.HINTS), never from lists of names kept here.
"""
import ast
import contextlib
import os

from tfjac import flagdefs, modes
from tfjac.modes import defaults as mode_defaults
from tfjac.config import Config, ModelConfig, TrainConfig
from tfjac.config import (AUGMENTATIONS, CHOOSE_ON_VALIDATION, LR_SCHEDULES, OPTIMIZERS,
                          PRECISIONS, STRATEGIES,
                          TEACHER_CACHE, WEIGHT_DECAY_KINDS)
from tfjac import errors
from tfjac.errors import (ConfigError, DataError, NonFiniteLossError, NonFiniteWeightsError,
                          SettingError, render)

_MULTI_REPLICA = ("mirrored", "multi_worker")


# The flag of each setting (a Config field's path, as config.non_finite gives it or a
# SettingError names it), from the flags' own table.
_FLAG_OF_PATH = {tuple(path.split(".")): flag.name
                 for flag in flagdefs.TABLE for path in flag.paths}


def flag_of(path) -> str:
  """The flag that sets the Config field at `path` (a config.non_finite path). A field that no
  flag fills (teacher.train.train_steps, source.augment: set only from Python) gets its own
  name, which may also be another field's flag: no command line reaches such a field."""
  path = tuple(path)
  if path[:2] == ("hints", "weights") and len(path) > 2:  # a hint of no flag too
    return f"{path[2]}_weight"
  for n in range(len(path), 0, -1):
    if path[:n] in _FLAG_OF_PATH:
      return _FLAG_OF_PATH[path[:n]]
  return path[-1]


def _written_as_flag(setting, value):
  """A mention (errors.mention) as the command line writes it: --flag, --noflag, --flag=value."""
  flag = flag_of(tuple(setting.split(".")))
  if value is None or value == "True":
    return f"--{flag}"
  if value == "False":
    return f"--no{flag}"
  try:
    value = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    pass
  if isinstance(value, (list, tuple)):  # a list flag: comma-separated
    value = ",".join(str(v) for v in value)
  return f"--{flag}={value}"


def as_flag_error(error: SettingError) -> ConfigError:
  """The command line's face of a library error: the flag of its setting, and every setting its
  message mentions written as a flag."""
  return ConfigError(flag_of(tuple(error.setting.split("."))),
                     render(error.template, _written_as_flag))


@contextlib.contextmanager
def flag_errors():
  """Within this block a library SettingError becomes the ConfigError naming flags, and a
  DataError's mentions of settings become flags, and so do those of log lines (errors.say)."""
  try:
    with errors.face(_written_as_flag):
      yield
  except SettingError as e:
    raise as_flag_error(e) from e
  except DataError as e:
    raise DataError(render(e.template, _written_as_flag)) from e
  except (NonFiniteLossError, NonFiniteWeightsError) as e:  # the same error, advice in flags
    e.args = (render(e.template, _written_as_flag),)
    raise


def check_finite(config: Config):
  """NaN and infinity refused in every float setting, by flag, before anything else: a NaN
  compares False with everything, so it passes every range check (--learning_rate=nan used to
  start training)."""
  from tfjac.config import non_finite  # pylint: disable=g-import-not-at-top
  for path, value in non_finite(config):
    raise ConfigError(flag_of(path), f"must be a finite number, got {value}")


def _positive(flag, value, allow_zero=False):
  if value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(flag, f"must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _choice(flag, value, valid):
  if value not in valid:
    raise ConfigError(flag, f"unknown value {value!r}; valid: {', '.join(sorted(valid))}")


def _validate_train(prefix, train: TrainConfig):
  _positive(f"{prefix}epochs", train.epochs)
  _positive("batch_size", train.batch_size)
  _positive("steps_per_epoch", train.steps_per_epoch, allow_zero=True)
  _choice("optimizer", train.optimizer, OPTIMIZERS)
  _positive(f"{prefix}learning_rate", train.learning_rate)
  _positive("momentum", train.momentum, allow_zero=True)
  _positive("weight_decay", train.weight_decay, allow_zero=True)
  _choice("lr_schedule", train.lr_schedule, LR_SCHEDULES)
  _positive("train_steps", train.train_steps, allow_zero=True)
  if train.lr_schedule == "step" and (train.lr_decay_steps or train.train_steps):
    _validate_decay_steps(train)
  elif train.lr_schedule == "step":
    if not train.lr_decay_epochs:
      raise ConfigError("lr_decay_epochs", "--lr_schedule=step needs at least one epoch")
    if any(e <= 0 for e in train.lr_decay_epochs) or list(train.lr_decay_epochs) != sorted(
        train.lr_decay_epochs):
      raise ConfigError("lr_decay_epochs",
                        f"must be increasing positive epochs, got {list(train.lr_decay_epochs)}")
  _positive("lr_decay_factor", train.lr_decay_factor)
  _positive("early_stopping_patience", train.early_stopping_patience, allow_zero=True)
  _positive("backup_every_steps", train.backup_every_steps, allow_zero=True)
  _choice("weight_decay_kind", train.weight_decay_kind, WEIGHT_DECAY_KINDS)
  if train.optimizer == "adamw" and train.weight_decay_kind == "l2":
    raise ConfigError("weight_decay_kind", "l2 with --optimizer=adamw: AdamW's decay is "
                      "decoupled by definition; use --optimizer=adam with l2 (PyTorch Adam's "
                      "weight_decay) or --weight_decay_kind=decoupled")


def _validate_decay_steps(train: TrainConfig):
  """--lr_schedule=step boundaries in optimizer steps (--lr_decay_steps): the only kind taken
  with a --train_steps budget, where an epoch's length depends on the data size."""
  if train.lr_decay_epochs:
    what = ("with --train_steps the length of an epoch depends on the number of training "
            "images" if train.train_steps else "--lr_decay_steps is given too")
    raise ConfigError("lr_decay_epochs", f"not taken: {what}; give the boundaries in "
                      "optimizer steps with --lr_decay_steps")
  steps = list(train.lr_decay_steps)
  if not steps:
    raise ConfigError("lr_decay_steps", "--lr_schedule=step with --train_steps needs at least "
                      "one boundary in optimizer steps")
  if any(s <= 0 for s in steps) or steps != sorted(set(steps)):
    raise ConfigError("lr_decay_steps", f"must be increasing positive steps, got {steps}")
  if train.train_steps and steps[-1] >= train.train_steps:
    raise ConfigError("lr_decay_steps", f"{steps[-1]} is not below --train_steps="
                      f"{train.train_steps}: that boundary would never be reached")


def validate(config: Config):
  """Checks everything that can be checked without data; raises ConfigError."""
  # Imported here so that this module stays importable without TensorFlow.
  from tfjac import data, hints  # pylint: disable=g-import-not-at-top
  from tfjac.training import teacher_cache  # pylint: disable=g-import-not-at-top

  config = mode_defaults.resolved(config)  # derived defaults, as a run has them
  check_finite(config)
  _choice("mode", config.mode, modes.MODES)
  mode = modes.load(config.mode)
  _choice("strategy", config.strategy, STRATEGIES)
  with flag_errors():
    data.check_dataset_name(config.data.dataset)
  _positive("samples_per_class", config.data.samples_per_class, allow_zero=True)
  if not 0.0 < config.data.validation_fraction < 1.0:
    raise ConfigError("validation_fraction",
                      f"must be in (0, 1), got {config.data.validation_fraction}")
  for a in config.data.augment:
    _choice("augment", a, AUGMENTATIONS)
  _positive("crop_padding", config.data.crop_padding, allow_zero=True)
  _positive("image_size", config.data.image_size, allow_zero=True)
  if not data.is_folder_dataset(config.data.dataset):
    if config.data.image_size:
      raise ConfigError("image_size", f"applies to --dataset={data.FOLDER_PREFIX}PATH and "
                        f"mit_indoor67 only; {config.data.dataset!r} has images of one size")
    if config.data.skip_bad_images:
      raise ConfigError("skip_bad_images", f"applies to --dataset={data.FOLDER_PREFIX}PATH "
                        f"and mit_indoor67 only; {config.data.dataset!r} is not read from image "
                        "files")
  for flag, setting, m in (("model", "student.name", config.student),
                           ("teacher_model", "teacher.model.name", config.teacher.model)):
    _check_network_name(flag, setting, m)
  _positive("width", config.student.width)
  _positive("teacher_width", config.teacher.model.width)
  _validate_train("", config.train)
  _validate_train("teacher_", config.teacher.train)

  h = config.hints
  # The hint settings' names and rules: the Distiller's own checks (training/settings.py).
  from tfjac.training import settings  # pylint: disable=g-import-not-at-top
  with flag_errors():
    settings.check_choices(h)
    settings.check_rules(h)
  for name, w in h.weights:  # the command line's own: a weight of 0 is a hint left out
    _positive(f"{name}_weight", w)
  if h.jac_estimator == "fd" and config.mixed_precision not in ("float32", "auto"):
    raise ConfigError("mixed_precision", f"{config.mixed_precision} with --jac_estimator=fd: "
                      "the differences f(x + eps u) - f(x - eps u) are lost in low-precision "
                      "rounding; use float32 (auto picks it with fd) or --jac_estimator=jvp")
  for sigma in config.robustness_sigmas:
    _positive("robustness_sigmas", sigma)
  if len(set(config.data.classes)) != len(config.data.classes) or any(
      c < 0 for c in config.data.classes):
    raise ConfigError("classes", f"must be distinct class indices >= 0, got "
                      f"{list(config.data.classes)}")
  _positive("teacher_input_scale", config.teacher.input.scale)
  _positive("conditions_examples", config.conditions_examples)
  if mode.needs_teacher and not config.teacher.path:
    raise ConfigError("teacher", f"--mode={config.mode} needs --teacher (a .keras file or a "
                      "SavedModel trained on the source data)")
  with flag_errors():  # the mode's rules speak the library's words (SettingError)
    mode.check(config)

  _choice("choose_on_validation", config.choose_on_validation, CHOOSE_ON_VALIDATION)
  _choice("teacher_cache", config.teacher.cache, TEACHER_CACHE)
  if config.teacher.cache == "on":
    blocker = teacher_cache.teacher_cache_blocker(config, mode.teacher_cache)
    if blocker:
      raise ConfigError("teacher_cache", f"on cannot be honoured: "
                        f"{render(blocker, _written_as_flag)}. Use auto (it "
                        "then computes the teacher per batch) or off.")
  _choice("strategy", config.strategy, STRATEGIES)
  _choice("mixed_precision", config.mixed_precision, PRECISIONS)
  if config.strategy == "multi_worker":
    from tfjac import runtime  # pylint: disable=g-import-not-at-top
    with flag_errors():
      runtime.parse_tf_config()
  # fd needs first-order gradients only; jvp runs forward mode through max-pooling, whose
  # tangent is the same second-order op (MaxPoolGradGrad) that XLA gets wrong.
  double_backprop = [name for name in config.hints.hints if hints.HINTS[name].student_jacobians
                     and (config.hints.jac_estimator != "fd" or name == "at_jac")]
  _positive("val_jac_examples", config.train.val_jac_examples, allow_zero=True)
  _positive("val_jac_every", config.train.val_jac_every)
  if config.train.jit_compile and double_backprop:
    raise ConfigError("jit_compile", f"refused with the hint(s) {','.join(double_backprop)}: "
                      "their weight gradients come from double backprop, and XLA's "
                      "second-order gradient through max-pooling was measured wrong on CPU "
                      "(TF 2.21: 1-7% off the graph's gradient, which matches finite "
                      "differences; docs/speed.md); --jac_estimator=jvp runs through the same "
                      "op. Drop --jit_compile, or use --jac_estimator=fd (first-order "
                      "gradients only).")
  if config.strategy in _MULTI_REPLICA and (config.train.jit_compile or
                                            config.teacher.train.jit_compile):
    raise ConfigError("jit_compile", f"XLA cannot compile a step under --strategy="
                      f"{config.strategy}: the replicas' variables live on other devices "
                      "(TF's XLA known issue 'tf.Variable on a different device'; Keras "
                      "turns jit off under tf.distribute itself). Drop --jit_compile or use "
                      "--strategy=default.")

  _validate_outside_teacher(config)
  if config.teacher.path is not None and not config.teacher.path.startswith(
      ("keras.applications:", "kerashub:")) and not os.path.exists(config.teacher.path):
    raise ConfigError("teacher", f"{config.teacher.path!r} does not exist; give a .keras file "
                      "or a SavedModel directory written by --mode=teacher")
  _check_writable(config.workdir)


def _check_network_name(flag, setting, m: ModelConfig):
  """A builder's name, keras.applications:NAME (a known one) or an existing model file.
  `flag` and `setting`: how the command line and the library name m.name; its weights' flag
  is the one that fills the ModelConfig's `weights` beside it."""
  weights_flag = flag_of((*setting.split(".")[:-1], "weights"))
  from tfjac import models  # pylint: disable=g-import-not-at-top
  from tfjac.models import sources  # pylint: disable=g-import-not-at-top
  if m.name.startswith(sources.APPLICATIONS_PREFIX):
    with flag_errors():
      sources.check_application(setting, m.name)
  elif sources.is_outside(m.name):
    if not os.path.isfile(m.name):
      raise ConfigError(flag, f"{m.name!r} is not a file; valid: {', '.join(models.MODELS)}, "
                        f"{sources.APPLICATIONS_PREFIX}NAME or a .keras file")
    import zipfile  # pylint: disable=g-import-not-at-top
    if m.name.endswith(".keras") and not (zipfile.is_zipfile(m.name) and "config.json" in
                                          zipfile.ZipFile(m.name).namelist()):
      raise ConfigError(flag, f"{m.name!r} is not a Keras model file (a .keras file is a zip "
                        "archive holding config.json)")
  else:
    _choice(flag, m.name, models.MODELS)
    if m.weights:
      raise ConfigError(weights_flag, f"applies to keras.applications: or .keras networks; "
                        f"{m.name} is built here")
  if m.weights and not os.path.isfile(m.weights):
    raise ConfigError(weights_flag, f"{m.weights!r} is not a file")


def _validate_outside_teacher(config: Config):
  """--teacher_preprocessing/_outputs/_weights/_mean/_std, before any loading."""
  from tfjac.models import outputs, preprocessing, sources  # pylint: disable=g-import-not-at-top
  ti = config.teacher.input
  _choice("teacher_preprocessing", ti.preprocessing, preprocessing.PREPROCESSING)
  _choice("teacher_outputs", ti.outputs, outputs.OUTPUT_KINDS)
  _positive("teacher_image_size", ti.image_size, allow_zero=True)
  for flag, values in (("teacher_mean", ti.mean), ("teacher_std", ti.std)):
    if values and len(values) not in (1, 3):
      raise ConfigError(flag, f"one value or one per channel (3), got {list(values)}")
  if any(s <= 0 for s in ti.std):
    raise ConfigError("teacher_std", f"must be > 0, got {list(ti.std)}")
  if (ti.mean or ti.std) and ti.preprocessing not in ("auto", "torch", "none"):
    raise ConfigError("teacher_mean", "per-channel mean/std apply with "
                      f"--teacher_preprocessing=torch or none, not {ti.preprocessing}")
  path = config.teacher.path or ""
  if path.startswith(sources.APPLICATIONS_PREFIX):
    with flag_errors():
      sources.check_application("teacher.path", path)
    if ti.weights and ti.weights != sources.RANDOM_WEIGHTS and not os.path.isfile(ti.weights):
      raise ConfigError("teacher_weights", f"{ti.weights!r} is not a file")
  else:
    if ti.weights:
      raise ConfigError("teacher_weights", "applies to --teacher=keras.applications:NAME only")
    if ti.image_size:
      raise ConfigError("teacher_image_size", "applies to --teacher=keras.applications:NAME "
                        "only")
  if path.startswith(sources.KERASHUB_PREFIX) and not os.path.isdir(
      path[len(sources.KERASHUB_PREFIX):]):
    raise ConfigError("teacher", f"{path!r}: no such KerasHub preset directory")
  if ti.outputs == "probabilities" and modes.load(config.mode).hints_read_teacher:
    with flag_errors():
      outputs.check_probability_hints(config.hints.hints, config.hints.lwf_match,
                                      "probabilities")


def validate_against_data(config: Config, num_classes: int):
  """The checks that need the dataset: run once it is loaded, before any training."""
  from tfjac import hints  # pylint: disable=g-import-not-at-top
  if modes.load(config.mode).top_k_among == "dataset":  # transfer: the teacher's classes,
    with flag_errors():                                 # checked once it is loaded
      hints.check_top_k(config.hints, num_classes, "the dataset's")


def _check_writable(workdir):
  try:
    os.makedirs(workdir, exist_ok=True)
    # Per process: workers of one multi-worker job may probe the same directory at once.
    probe = os.path.join(workdir, f".tfjac_write_probe.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError("workdir", f"run directory {workdir!r} cannot be written: {e}") from e
