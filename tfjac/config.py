"""Frozen run configuration: plain dataclasses and the enum tuples of their fields.

`run.py` is the only module that reads flags; it builds a `Config` and everything else takes
plain values from it. This module is a leaf: it imports nothing from tfjac (errors at most). The
checks are in `checks.py` (`validate` runs before any data is read or any model is built),
the modes' names in `modes/__init__.py`, runtime set-up (strategy, TF_CONFIG) in `runtime.py`.
"""
import dataclasses
import math
from typing import List, Mapping, Optional, Tuple

STRATEGIES = ("auto", "default", "mirrored", "multi_worker")
TEACHER_CACHE = ("auto", "on", "off")
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", "auto")
OPTIMIZERS = ("sgd", "adam", "adamw")
WEIGHT_DECAY_KINDS = ("decoupled", "l2")
LR_SCHEDULES = ("constant", "cosine", "step")
AUGMENTATIONS = ("crop", "flip")
BN_POLICIES = ("batch_stats", "inference")
LOSS_SCALINGS = ("none", "initial", "running")  # training/term_scales.SCALINGS
JAC_ESTIMATORS = ("backprop", "jvp", "fd")  # hints/estimators.py
JAC_PROBES = ("rademacher", "gaussian")
# Config.choose_on_validation (training/selection.py): auto, on or off; the alternative it
# fits beside the settings given: the Jacobian weight x ALT_JAC_FACTOR and the learning rate x
# ALT_LR_FACTOR. Fashion-MNIST's tuned setting (jac 10, 3e-3) as factors of the defaults,
# screened on validation: ahead on Fashion-MNIST distillation, behind on its transfer, within
# noise on the digits (docs/results/lr_jac_candidates.md), hence a choice and not a default.
CHOOSE_ON_VALIDATION = ("auto", "on", "off")
ALT_JAC_FACTOR = 10.0
ALT_LR_FACTOR = 3.0
# mixed_precision's default: "auto" picks mixed_bfloat16 where the CPU has bfloat16 units
# (runtime.cpu_has_bfloat16) and float32 elsewhere, logged. Measured on a Zen 4 CPU with
# avx512_bf16 (issue 22): act,jac,ce steps 1.58x float32's speed, and test accuracy within
# the spread of float32's over 3 seeds on the digits and Fashion-MNIST at 10 per class
# (docs/results/variants_*_verdicts.md).
DEFAULT_MIXED_PRECISION = "auto"

# teacher_width when it is not given, by (dataset, teacher model); 1 for every other pair.
# A width-1 VGG-9 has 4.7 M parameters, sized for 32x32 images; on the 64 pixels of the
# embedded digits width 0.25 (0.3 M) trains 1.9x faster on an AVX-512 CPU and 3x with AVX2
# only (docs/results/run_profile.md) and keeps the poster's ordering
# (docs/results/lazy_digits.md).
DEFAULT_TEACHER_WIDTHS = {("digits", "vgg9"): 0.25}


def non_finite(settings, path=()) -> List[Tuple[Tuple[str, ...], float]]:
  """(path, value) of every NaN or infinite float in the (nested) dataclass `settings`: a
  field's path is its names from the top, a weight's ends in its hint ('weights', 'act'), a
  tuple's entries share their field's path. What checks.validate refuses by flag name and the
  Distiller by argument name, before any work."""
  found = []
  for field in dataclasses.fields(settings):
    value = getattr(settings, field.name)
    where = path + (field.name,)
    if dataclasses.is_dataclass(value):
      found.extend(non_finite(value, where))
    elif isinstance(value, float):
      if not math.isfinite(value):
        found.append((where, value))
    elif isinstance(value, tuple):
      for item in value:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
          name, item = item  # (hint, weight)
          if isinstance(item, float) and not math.isfinite(item):
            found.append((where + (name,), item))
        elif isinstance(item, float) and not math.isfinite(item):
          found.append((where, item))
  return found


def default_teacher_width(dataset: str, model: str) -> float:
  return DEFAULT_TEACHER_WIDTHS.get((dataset, model), 1.0)


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = "digits"
  data_dir: Optional[str] = None
  samples_per_class: int = 0  # 0: every training example
  validation_fraction: float = 0.1
  augment: Tuple[str, ...] = ()
  crop_padding: int = 0  # 0: image size // 8
  seed: int = 0
  classes: Tuple[int, ...] = ()  # a subset of the classes, relabelled 0..n-1 in this order
  image_size: int = 0  # folder datasets: resize to this square size; 0: all images one size
  skip_bad_images: bool = False  # folder datasets: skip and count unreadable image files


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The student's fit by default; the teacher's is TEACHER_TRAIN."""
  epochs: int = 60
  batch_size: int = 32
  steps_per_epoch: int = 0  # 0: one pass over the training set
  optimizer: str = "adam"
  learning_rate: float = 1e-3
  momentum: float = 0.9
  weight_decay: float = 0.0
  lr_schedule: str = "cosine"
  lr_decay_epochs: Tuple[int, ...] = ()
  lr_decay_factor: float = 0.2
  early_stopping_patience: int = 0  # 0: off; the best validation epoch is kept either way
  jit_compile: bool = False
  backup_every_steps: int = 0  # resume backups within an epoch too; 0: at epoch ends only
  weight_decay_kind: str = "decoupled"  # l2: wd * w added to the gradient (PyTorch's form)
  nesterov: bool = True  # SGD: Nesterov momentum (the behaviour before the flag existed)
  # Budget in optimizer steps (0: `epochs` epochs). Epochs are then derived: steps_per_epoch
  # (or one pass, ceil(n_train / batch_size)) each, the last one cut at train_steps.
  train_steps: int = 0
  lr_decay_steps: Tuple[int, ...] = ()  # lr_schedule=step boundaries in optimizer steps
  # Speed of the Jacobian hints in validation (issue 15); the lazy period is HintConfig's.
  val_jac_examples: int = 1000  # validation's Jacobian terms on a fixed subset; 0: whole split
  val_jac_every: int = 1  # validation's Jacobian terms every N epochs (and the last)


# The teacher's fit by default: teacher_epochs and teacher_learning_rate read it, the other
# optimisation flags are shared with the student's. No flag sets its train_steps or val_jac_*
# (the teacher takes no Jacobian hints): they stay as command-line runs always had them.
TEACHER_TRAIN = TrainConfig(epochs=30, val_jac_examples=0)


@dataclasses.dataclass(frozen=True)
class HintConfig:
  hints: Tuple[str, ...] = ("act", "jac", "ce")
  weights: Tuple[Tuple[str, float], ...] = ()  # (hint, weight) pairs; a hint not listed: 1
  kd_temperature: float = 4.0
  jac_target: str = "label"
  jac_normalize: bool = True
  jac_bn_policy: str = "batch_stats"
  jac_top_k: int = 5
  jac_projections: int = 1
  # How the Jacobian terms are computed (hints/estimators.py): backprop (the rows themselves,
  # double backprop), jvp (forward mode) or fd (central differences) along jac_probes random
  # probes of kind jac_probe; fd steps eps * u in [0, 1] pixel units (1e-3: the raw term within
  # 1.5% of jvp's on the digits' VGGs; 1e-2: 9%, kinks of ReLU and max-pool crossed).
  jac_estimator: str = "backprop"
  jac_probes: int = 1
  jac_probe: str = "rademacher"
  jac_fd_eps: float = 1e-3
  noise_sigma: float = 0.1
  noise_samples: int = 4
  lwf_match: str = "kd"
  teacher_layers: Tuple[str, ...] = ()  # attention transfer; empty: the defaults
  student_layers: Tuple[str, ...] = ()
  # How the terms are brought to one scale before weighting (training/term_scales.py):
  # none (raw w * term), initial (each term over its own mean of the first training steps),
  # running (over a running mean of its own). initial: chosen on validation accuracy against
  # none and running on the digits and Fashion-MNIST (docs/results/loss_scaling_candidates.md);
  # every weight then means relative importance and defaults to 1.
  loss_scaling: str = "initial"
  # Lazy Jacobian matching (training/lazy.py): the Jacobian hints on every K-th optimizer step,
  # their weights times K; 1: every step (the paper's loss).
  jac_every: int = 1

  def weight(self, hint):
    return dict(self.weights).get(hint, 1.0)

  @classmethod
  def of(cls, hints, **settings) -> "HintConfig":
    """The Python API's short form: the hints and their weights from {name: weight}, (name,
    weight) pairs or names (a weight None or not given: 1), every other field by its own name:
    HintConfig.of({"act": 1, "jac": 10, "ce": 1}, jac_target="all")."""
    if isinstance(hints, str):  # iterating it would give one hint per character
      raise ValueError(f"hints= takes hint names, {{name: weight}} or (name, weight) pairs, not "
                       f"the string {hints!r}: hints=[{hints!r}]?")
    items = tuple(hints.items() if isinstance(hints, Mapping) else
                  ((h, None) if isinstance(h, str) else h for h in hints))
    unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)} - {"hints",
                                                                                 "weights"})
    if unknown or "hints" in settings or "weights" in settings:
      fields = ", ".join(f.name for f in dataclasses.fields(cls)[2:])
      raise TypeError(f"HintConfig.of takes the hints and their weights first, then any of "
                      f"{fields}; got {', '.join(unknown or ['hints/weights again'])}")
    return cls(hints=tuple(name for name, _ in items),
               weights=tuple((name, float(w)) for name, w in items if w is not None), **settings)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = "vgg4"  # a builder's name, keras.applications:NAME or a .keras file
  # None: a student's 1, a teacher's the width DEFAULT_TEACHER_WIDTHS gives the run's dataset
  # and this model (resolved(), for the command line and the Python API alike), so that
  # ModelConfig("vgg9") as a teacher is what --teacher_model=vgg9 builds.
  width: Optional[float] = None
  weights: str = ""  # outside networks: a weights file (model.load_weights); empty: random


@dataclasses.dataclass(frozen=True)
class TeacherInput:
  """How target images are fed to a teacher trained on other data: x * scale + offset, then
  resized to the teacher's input size when `resize`."""
  resize: bool = False
  scale: float = 1.0
  offset: float = 0.0
  # Outside teachers (models/sources.py, models/teachers.py).
  preprocessing: str = "auto"  # models.preprocessing.PREPROCESSING; auto: the family's, else none
  mean: Tuple[float, ...] = ()  # per channel, in [0, 1] pixel units (torch / none)
  std: Tuple[float, ...] = ()
  outputs: str = "auto"  # auto (a final softmax is seen and removed), logits, probabilities
  weights: str = ""  # keras.applications: FILE, none (random), empty: Keras' cache file
  image_size: int = 0  # keras.applications: build at this square size; 0: its default


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
  """Everything about the teacher, in one place: where it comes from (`path`, or else `model`
  built and trained here with `train`), how the target images reach it (`input`), whether a
  .keras file may run its own code, and whether its outputs are computed once per example."""
  # A trained teacher: a .keras file, a SavedModel, keras.applications:NAME or kerashub:PRESET
  # (models/sources.py); None: `model` is built and trained first (mode=distill).
  path: Optional[str] = None
  model: ModelConfig = ModelConfig(name="vgg9", width=None)
  train: TrainConfig = TEACHER_TRAIN
  input: TeacherInput = TeacherInput()
  unsafe_loading: bool = False  # let a .keras teacher run its Lambda code
  cache: str = "auto"  # teacher outputs computed once per example: auto, on, off


@dataclasses.dataclass(frozen=True)
class Config:
  mode: str = "distill"
  workdir: str = "runs/default"
  strategy: str = "auto"
  data: DataConfig = DataConfig()
  student: ModelConfig = ModelConfig(width=1.0)
  teacher: TeacherConfig = TeacherConfig()
  train: TrainConfig = TrainConfig()
  # HintConfig() exactly (nothing chosen): the mode's default hints and Jacobian target
  # (modes/defaults.resolved; e.g. transfer: ce,lwf at teacher_top1), as --mode without --hints.
  hints: HintConfig = HintConfig()
  robustness_sigmas: Tuple[float, ...] = ()
  source: Optional[DataConfig] = None  # mode=conditions: the teacher's own (source) data
  conditions_examples: int = 500
  resume: bool = True  # continue an interrupted fit from its backup (same settings only)
  deterministic: bool = False  # tf.config.experimental.enable_op_determinism()
  # keras dtype policy of the networks built here; auto: runtime.resolve_precision
  mixed_precision: str = DEFAULT_MIXED_PRECISION
  # The student fitted twice, with the settings given and with a heavier Jacobian share and a
  # higher learning rate, keeping the one better on validation (training/selection.py). auto:
  # where a mode learns from a teacher and neither a hint weight nor the learning rate is set.
  choose_on_validation: str = "auto"

  def to_dict(self):
    return dataclasses.asdict(self)


def resolved(config: "Config") -> "Config":
  """`config` with its derived defaults filled in: a width of None becomes 1 for the student
  and, for the teacher, the width DEFAULT_TEACHER_WIDTHS gives the dataset and teacher model.
  The command line (run.py) and a Python run (run.run, checks.validate) both go through here
  (modes/defaults.resolved), so Config() and the flags' defaults make the same networks."""
  student, teacher = config.student, config.teacher.model
  if student.width is None:
    config = dataclasses.replace(config, student=dataclasses.replace(student, width=1.0))
  if teacher.width is None:
    width = default_teacher_width(config.data.dataset, teacher.name)
    config = dataclasses.replace(config, teacher=dataclasses.replace(
        config.teacher, model=dataclasses.replace(teacher, width=width)))
  return config
