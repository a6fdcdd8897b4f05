"""Every command-line flag of tfjac.run, generated from config's dataclasses and the registries.

A flag is one row of TABLE: its name, the Config field(s) it fills (attribute paths), its help
and, for a choice, the registry it chooses from. Its type and default are read off the field
(`Config()`, the one source of defaults), so the command line and the Python API cannot
disagree; `run.config_from_flags` fills the fields from the table and `checks.flag_of` names
a setting's flag from it. Imported by the command line's modules only (run.py, checks.py; never
__main__ itself, so that `python -m tfjac.run` and `import tfjac.run` cannot define a flag
twice). Defaults suit the embedded digits dataset; flagfiles under flags/ set the paper's
experiments.
"""
import dataclasses
import types
import typing
from typing import Dict, Optional, Sequence, Tuple

from absl import flags

from tfjac import config, hints, models, modes
from tfjac.errors import ConfigError
from tfjac.models import outputs, preprocessing

_DEFAULT = config.Config()
_WEIGHTS = "hints.weights."  # a <hint>_weight flag's path: this and the hint's name


@dataclasses.dataclass(frozen=True)
class Flag:
  """One flag: `paths` are the Config fields it fills, the first giving its type and default;
  `choices` makes it an enum; `creates`: the flag brings its optional group into being (given,
  Config.source is a DataConfig; its default None leaves the group out)."""
  name: str
  paths: Tuple[str, ...]
  help: str
  choices: Optional[Sequence[str]] = None
  creates: bool = False


def _both_fits(field):
  """A setting of the student's fit (train) that the teacher's fit (teacher.train) shares."""
  return (f"train.{field}", f"teacher.train.{field}")


TABLE = (
    # What to run.
    Flag("mode", ("mode",),
         "teacher: train and export a teacher. distill: teacher -> student with --hints. "
         "regularize: a student without teacher, with --hints among ce, jacnorm, "
         "noisy_ce (default ce,jacnorm). transfer: Learning without Forgetting from a "
         "--teacher trained on other data (CE on the labels always on; default hints "
         "ce,lwf; --hints=ce is the no-transfer baseline). finetune: the fine-tuning "
         "oracle (the teacher's network with a new head). conditions: the poster's "
         "three conditions for transfer to help, measured (no training).",
         choices=list(modes.MODES)),
    Flag("workdir", ("workdir",),
         "Run directory: flags.cfg, results.json, tensorboard/, checkpoints/, teacher/ "
         "and student/ (SavedModel + .keras). A teacher found here is reused."),
    Flag("strategy", ("strategy",),
         "tf.distribute strategy. auto: MirroredStrategy when several GPUs are "
         "visible, else the default (one device) strategy. mirrored: "
         "MirroredStrategy over this machine's devices. multi_worker: "
         "MultiWorkerMirroredStrategy over the machines listed in the environment "
         "variable TF_CONFIG; start the same command on every machine, each with its "
         "own task in TF_CONFIG; the chief (task chief, else worker 0) writes "
         "--workdir, the others write under <workdir>/workers/<type>_<index>.",
         choices=config.STRATEGIES),
    # Data.
    Flag("dataset", ("data.dataset",),
         "digits (embedded, 8x8 UCI handwritten digits, no network), cifar10, "
         "cifar100, mit_indoor67 (--data_dir=DIR with DIR/Images/ and the official "
         "TrainImages.txt / TestImages.txt), fashion_mnist (the four IDX files of "
         "Debian's dataset-fashion-mnist, in /usr/share/datasets/fashion-mnist or "
         "--data_dir; else tensorflow-datasets' fashion_mnist in --data_dir), "
         "tfds:NAME for a tensorflow-datasets "
         "image dataset, or folder:PATH for image files in "
         "PATH/train/<class>/*.jpg|jpeg|png and PATH/test/<class>/... (classes "
         "sorted by folder name)."),
    Flag("data_dir", ("data.data_dir", "source.data_dir"),
         "mit_indoor67: its folder. tfds datasets: the data_dir "
         "holding prepared data "
         "(see tools/prepare_data.py). Nothing is downloaded during a run."),
    Flag("samples_per_class", ("data.samples_per_class",),
         "Student training examples per class (seeded subset); 0: all of them."),
    Flag("validation_fraction", ("data.validation_fraction",),
         "Fraction of each class of the training split "
         "held out for model selection (the test split is never used for it)."),
    Flag("augment", ("data.augment",),
         "Training augmentations: crop (reflect-pad and random crop), "
         "flip (random horizontal flip). Empty: none."),
    Flag("crop_padding", ("data.crop_padding",),
         "Padding for --augment=crop; 0: image size // 8."),
    Flag("classes", ("data.classes",),
         "Use only these classes of --dataset, relabelled 0..n-1 in "
         "this order (e.g. a teacher on digits 0-4, a transfer target on 5-9)."),
    Flag("image_size", ("data.image_size", "source.image_size"),
         "folder:PATH datasets: resize every image to "
         "image_size x image_size (aspect ratio not kept); 0: every image must "
         "have the same size."),
    Flag("skip_bad_images", ("data.skip_bad_images",),
         "folder:PATH datasets: skip unreadable or "
         "truncated image files (logged, counted in results.json) instead of "
         "stopping with an error that names the file."),
    Flag("seed", ("data.seed", "source.seed"),
         "Seed of the validation split, the N-per-class subset, weight "
         "initialisation and shuffling. Same seed: same images for every hint set."),
    # Networks.
    Flag("model", ("student.name",),
         "Student architecture: one of " + ", ".join(models.MODELS)
                    + ", keras.applications:NAME (its body and a new Dense head, random init "
         "or --student_weights), or a .keras file (docs/networks.md)."),
    Flag("width", ("student.width",),
         "Student channel-width multiplier."),
    Flag("teacher_model", ("teacher.model.name",),
         "Teacher architecture when the teacher is "
         "trained here: the names of --model."),
    Flag("teacher_model_weights", ("teacher.model.weights",),
         "--teacher_model=keras.applications:NAME or FILE.keras: the initial weights of "
         "the teacher trained here (model.load_weights), as --student_weights for the "
         "student; empty: random init (or the file's own)."),
    Flag("teacher_width", ("teacher.model.width",),
         "Teacher channel-width multiplier. Default: sized for "
         "the data's images (config.DEFAULT_TEACHER_WIDTHS): 0.25 for the default "
         "vgg9 on the embedded 8x8 digits, 1 otherwise."),
    Flag("teacher", ("teacher.path",),
         "Pre-trained teacher: a .keras file, a SavedModel directory, "
         "a directory written by --mode=teacher, keras.applications:NAME (weights "
         "from --teacher_weights) or kerashub:DIR (a KerasHub preset directory; "
         "pip install -e .[hub]). Default: the teacher in --workdir, trained there "
         "first if absent."),
    Flag("unsafe_teacher_loading", ("teacher.unsafe_loading",),
         "Let a .keras teacher run the Python "
         "code it carries (Lambda layers). Keras safe mode refuses such files by "
         "default: that code can do anything your account can. Only for files "
         "from people you trust."),
    # Hints (the <hint>_weight flags follow the table).
    Flag("hints", ("hints.hints",),
         "Loss terms of the student, summed with their "
         "weights: " + "; ".join(f"{k}: {h.help}" for k, h in hints.HINTS.items()) +
         ". The poster's rows: ce | act,ce | act,jac,ce | act | act,jac."),
    Flag("loss_scaling", ("hints.loss_scaling",),
         "How the hints' terms are put on one scale before their weights apply. "
         "initial: each term divided by its own mean over the first 10 training steps "
         "(detached), so every term starts at its --<hint>_weight and a weight means "
         "relative importance, whatever the term's units (act sums over the classes, "
         "the normalised jac is at most 4). running: divided by a running mean of its "
         "own instead (each keeps its weight's share as it shrinks). none: the raw "
         "w * term, where the right weight depends on the dataset. With one hint "
         "nothing is scaled.",
         choices=config.LOSS_SCALINGS),
    Flag("choose_on_validation", ("choose_on_validation",),
         "Fit the student twice from the same initial weights, with the settings given and "
         f"with the jac weight x{config.ALT_JAC_FACTOR:g} and the learning rate "
         f"x{config.ALT_LR_FACTOR:g}, and keep the one whose best validation accuracy is "
         "higher by more than one standard error of the difference (ties: the settings "
         "given); the test split is never read for it. Costs a second fit. auto: in modes "
         "distill, transfer and finetune, when no --<hint>_weight "
         "is set away from 1 and --learning_rate is the default (set them and you get "
         "exactly them). on: around the settings given. off: one fit. Both candidates are in "
         "<workdir>/candidates/, results.json records both (docs/distillation.md).",
         choices=config.CHOOSE_ON_VALIDATION),
    Flag("kd_temperature", ("hints.kd_temperature",),
         "Softmax temperature of the 'kd' hint and of "
         "--lwf_match=kd; both multiply the KL by tau^2 (Hinton et al.)."),
    Flag("jac_target", ("hints.jac_target",),
         "Which outputs' input-gradients are used: " + "; ".join(
         f"{k}: {t.help}" for k, t in hints.JACOBIAN_TARGETS.items()) + ".",
         choices=list(hints.JACOBIAN_TARGETS)),
    Flag("jac_top_k", ("hints.jac_top_k",),
         "k of --jac_target=top_k."),
    Flag("jac_projections", ("hints.jac_projections",),
         "Number of random projections of "
         "--jac_target=projection."),
    Flag("jac_estimator", ("hints.jac_estimator",),
         "How the Jacobian hints (jac, jac_ce, jacnorm) are computed. backprop: the "
         "--jac_target rows of the input Jacobian by reverse mode, the student's by "
         "double backprop. jvp: their directional derivatives J u along --jac_probes "
         "random probes u by forward mode (tf.autodiff.ForwardAccumulator). fd: the "
         "same by central differences (f(x + eps u) - f(x - eps u)) / (2 eps), eps = "
         "--jac_fd_eps: forward passes and first-order gradients only, bias O(eps^2) "
         "(exact inside a ReLU network's linear region); allowed with --jit_compile. "
         "Raw terms (--nojac_normalize) are unbiased estimates of backprop's; with "
         "--jac_target=all, of ||J_T - J_S||_F^2 over every output. The normalised "
         "jac term normalises each example's whole sketch (its rows and probes): "
         "consistent as probes grow, biased for few (docs/hints.md, Jacobian estimators).",
         choices=list(config.JAC_ESTIMATORS)),
    Flag("jac_probes", ("hints.jac_probes",),
         "Random probes per example of --jac_estimator=jvp|fd."),
    Flag("jac_probe", ("hints.jac_probe",),
         "Distribution of the "
         "probes' entries: rademacher (+-1) or gaussian (N(0, 1)); both E[u u^T] = I.",
         choices=list(config.JAC_PROBES)),
    Flag("jac_fd_eps", ("hints.jac_fd_eps",),
         "Step of --jac_estimator=fd in [0, 1] pixel units "
         "(each pixel moves by eps times its probe entry). Smaller: less smoothing "
         "over ReLU and max-pool kinks, more float32 rounding (1/eps); on the digits' "
         "VGGs 1e-3 put the raw term within 1.5% of jvp's, 1e-2 within 9%."),
    Flag("noise_sigma", ("hints.noise_sigma",),
         "Std of the Gaussian input noise (in [0, 1] pixel units) "
         "of the hints noise, noisy_ce, and the sigma of jac_ce and jacnorm."),
    Flag("noise_samples", ("hints.noise_samples",),
         "Noisy copies per example for noise and noisy_ce."),
    Flag("lwf_match", ("hints.lwf_match",),
         "How the lwf hint matches the "
         "student's teacher-shaped head to the teacher: kd (soft targets, as in Li & "
         "Hoiem's LwF, but by default at --kd_temperature=4 and times tau^2 = 16, "
         "Hinton's form; Li & Hoiem use T=2 and no tau^2 factor: their exact loss, up "
         "to the teacher's entropy, a constant, is --kd_temperature=2 "
         "--lwf_weight=0.25 --loss_scaling=none) or act (squared error of logits).",
         choices=list(hints.LWF_MATCHES)),
    Flag("teacher_layers", ("hints.teacher_layers",),
         "Teacher layers whose feature maps feed at/at_jac, by "
         "name; default: the layer that ends each block/stage, one per resolution "
         "(never padding; deepest ones paired; docs/transfer.md)."),
    Flag("student_layers", ("hints.student_layers",),
         "Student layers paired one to one with "
         "--teacher_layers; default: the layer that ends each block/stage."),
    Flag("teacher_resize", ("teacher.input.resize",),
         "Resize target images to the teacher's input "
         "size (bilinear, differentiable) when they differ."),
    Flag("teacher_input_scale", ("teacher.input.scale",),
         "The teacher sees x * scale + offset (x in "
         "[0, 1]): e.g. 255 for a teacher trained on [0, 255] pixels."),
    Flag("teacher_input_offset", ("teacher.input.offset",),
         "See --teacher_input_scale."),
    Flag("source_dataset", ("source.dataset",),
         "--mode=conditions: the teacher's own training "
         "data (same names as --dataset), for its loss and the source/target distance.",
         creates=True),
    Flag("source_classes", ("source.classes",),
         "--mode=conditions: class subset of --source_dataset."),
    Flag("conditions_examples", ("conditions_examples",),
         "--mode=conditions: target (and source) test "
         "images used for the estimates: a class-stratified sample drawn with --seed "
         "(the source halves split every class in two)."),
    Flag("robustness_sigmas", ("robustness_sigmas",),
         "After training, test accuracy of teacher and student "
         "under Gaussian input noise of each of these std (results.json); empty: none."),
    Flag("jac_normalize", ("hints.jac_normalize",),
         "L2-normalise each example's Jacobians before "
         "matching (the paper's loss); --nojac_normalize matches them raw."),
    Flag("jac_bn_policy", ("hints.jac_bn_policy",),
         "BatchNorm in the student's Jacobian pass during training. batch_stats: one "
         "pass, batch statistics held constant for the input gradient. inference: a "
         "second pass with moving statistics. Both give per-example Jacobians; "
         "batch_stats is the cheaper: no second pass (docs/hints.md).",
         choices=config.BN_POLICIES),
    # Optimisation.
    Flag("epochs", ("train.epochs",),
         "Student epochs."),
    Flag("teacher_epochs", ("teacher.train.epochs",),
         "Teacher epochs (when trained here)."),
    Flag("batch_size", _both_fits("batch_size"),
         "Global batch size (split over replicas)."),
    Flag("steps_per_epoch", _both_fits("steps_per_epoch"),
         "Steps per epoch (the data repeats); 0: one pass."),
    Flag("optimizer", _both_fits("optimizer"),
         "Optimizer.",
         choices=config.OPTIMIZERS),
    Flag("learning_rate", ("train.learning_rate",),
         "Student peak learning rate. Set away from its default, the student is fitted once "
         "with it (--choose_on_validation=auto turns off)."),
    Flag("teacher_learning_rate", ("teacher.train.learning_rate",),
         "Teacher peak learning rate."),
    Flag("momentum", _both_fits("momentum"),
         "SGD momentum (Nesterov unless --nonesterov)."),
    Flag("weight_decay", _both_fits("weight_decay"),
         "Weight decay of the optimizer, of the kind "
         "--weight_decay_kind says."),
    Flag("weight_decay_kind", _both_fits("weight_decay_kind"),
         "decoupled: Keras's weight_decay, w <- w - lr * wd * w beside the update, "
         "outside momentum (AdamW's kind). l2: wd * w added to every trained "
         "variable's gradient before momentum / Adam moments, i.e. the penalty wd/2 "
         "||w||^2 (PyTorch SGD's weight_decay, the attention-transfer reference; with "
         "SGD momentum m the effective decay is about 1/(1-m) times the decoupled "
         "one). Not with --optimizer=adamw.",
         choices=config.WEIGHT_DECAY_KINDS),
    Flag("nesterov", _both_fits("nesterov"),
         "--optimizer=sgd: Nesterov momentum; --nonesterov: plain "
         "(heavy-ball) momentum, as PyTorch SGD's default and the attention-transfer "
         "reference. Keras's momentum form (v <- m v - lr g; w <- w + v) equals "
         "PyTorch's (v <- m v + g; w <- w - lr v) at a constant learning rate; after "
         "a schedule changes the rate, Keras's velocity still carries the old rate "
         "for about 1/(1-m) steps."),
    Flag("lr_schedule", _both_fits("lr_schedule"),
         "Learning-rate schedule.",
         choices=config.LR_SCHEDULES),
    Flag("lr_decay_epochs", _both_fits("lr_decay_epochs"),
         "Epochs at which --lr_schedule=step multiplies the "
         "learning rate by --lr_decay_factor."),
    Flag("lr_decay_factor", _both_fits("lr_decay_factor"),
         "Factor of --lr_schedule=step."),
    Flag("train_steps", ("train.train_steps",),
         "Student budget in optimizer steps; 0 (default): "
         "--epochs epochs, so that a run on fewer images takes fewer steps (60 "
         "epochs of 100 images at batch 32 are 240 steps). N > 0: exactly N steps "
         "whatever the data size; epochs are then derived: --steps_per_epoch steps "
         "each (0: one pass, ceil(training images / --batch_size), but at least N / 100 "
         "steps, so that a few-shot run validates at most about 100 times), as many as N "
         "needs, the last one cut at step N; validation and checkpoints at every "
         "epoch end as usual. The cosine schedule decays over the N steps; "
         "--lr_schedule=step takes --lr_decay_steps. tools/reproduce.py gives every "
         "column of a table the same N."),
    Flag("lr_decay_steps", _both_fits("lr_decay_steps"),
         "Optimizer steps at which --lr_schedule=step "
         "multiplies the learning rate by --lr_decay_factor (instead of "
         "--lr_decay_epochs; the only kind taken with --train_steps)."),
    Flag("early_stopping_patience", _both_fits("early_stopping_patience"),
         "Stop after this many epochs without a "
         "better validation accuracy; 0: off. The best epoch is kept either way."),
    Flag("resume", ("resume",),
         "Continue an interrupted run: each fit backs up its full "
         "state to <workdir>/checkpoints/<role>/backup at every epoch end (and every "
         "--backup_every_steps steps); rerunning the same command continues from "
         "there and ends with the same weights (bit-identical on CPU with the same "
         "thread count). A backup of other settings is an error; --noresume "
         "discards it and starts over."),
    Flag("backup_every_steps", _both_fits("backup_every_steps"),
         "Also back up within an epoch, every this many "
         "steps; 0: at epoch ends only."),
    Flag("deterministic", ("deterministic",),
         "tf.config.experimental.enable_op_determinism(): "
         "deterministic kernels, for bit-identical reruns and resumes on GPUs. Not "
         "needed on CPU, where runs with the same thread count are bit-identical "
         "already; there it changes the numbers and costs speed (docs/"
         "reliability.md)."),
    Flag("jit_compile", _both_fits("jit_compile"),
         "XLA-compile the training step. Refused with "
         "hints that take the student's Jacobian (jac, jac_ce, jacnorm, at_jac) by "
         "--jac_estimator=backprop or jvp: XLA's second-order gradient through "
         "max-pooling is wrong (forward mode runs through it too); allowed with fd, "
         "which needs first-order gradients only. Default off "
         "(measure with tools/benchmark.py --jit_compile=false,true before "
         "turning it on; docs/speed.md). Refused with "
         "--strategy=mirrored or multi_worker (XLA cannot reach the other "
         "replicas' variables); under --strategy=auto with several GPUs it is "
         "turned off with a logged reason."),
    # Speed and scale.
    Flag("teacher_cache", ("teacher.cache",),
         "Teacher outputs (logits, Jacobians of the --jac_target outputs, feature "
         "maps) computed once per training example before the student's fit and fed "
         "with the data, so a step runs only the student. The teacher is frozen, so "
         "the numbers are the same either way. auto: on unless the teacher must run "
         "per batch, i.e. with --augment, with a --jac_target drawn per step (random, "
         "projection) or with the noise hint (the log says which); on: insist (an "
         "error when it cannot be honoured); off: run the teacher at every step. "
         "Memory: the Jacobians take K x image size floats per example.",
         choices=config.TEACHER_CACHE),
    Flag("mixed_precision", ("mixed_precision",),
         "Keras dtype policy of the networks built here. auto: mixed_bfloat16 where "
         "the CPU has bfloat16 units (avx512_bf16 or amx_bf16 in /proc/cpuinfo) and no "
         "GPU is visible, float32 elsewhere, logged. mixed_float16: float16 "
         "compute with dynamic loss scaling (for GPUs); mixed_bfloat16: bfloat16 "
         "compute, no loss scaling (GPUs with bfloat16, TPUs, recent CPUs). The logits "
         "layer, the variables, the inputs and so the Jacobians stay float32; the "
         "input-gradient is computed through low-precision layers and can underflow "
         "in deep networks. Default auto: on a CPU with bfloat16 units the act,jac,ce "
         "step ran 1.58x float32's speed with test accuracy within float32's spread "
         "(docs/speed.md); float16 on CPU is emulated and slow.",
         choices=config.PRECISIONS),
    # Cost of the Jacobian hints (student fit only).
    Flag("jac_every", ("hints.jac_every",),
         "Lazy Jacobian matching: the Jacobian hints (jac, jac_ce, "
         "jacnorm, at_jac) on every K-th optimizer step with their weights times K "
         "(as StyleGAN2's lazy R1); the steps in between take only the other hints "
         "and compute no Jacobian. 1: every step (the paper's loss)."),
    Flag("val_jac_examples", ("train.val_jac_examples",),
         "Validation computes accuracy and the hints "
         "without Jacobians on the whole validation split every epoch, and the "
         "Jacobian hints' terms on a fixed subset of this many validation examples "
         "(seeded by --seed, the same every epoch); 0: on the whole split. Model "
         "selection uses validation accuracy, which is always on the whole split."),
    Flag("val_jac_every", ("train.val_jac_every",),
         "Validation's Jacobian terms every this many epochs "
         "(the first, every N-th, and the last); 1: every epoch."),
    # Your own networks (tfjac/models/: sources, teachers; docs/networks.md).
    Flag("teacher_preprocessing", ("teacher.input.preprocessing",),
         "How the dataset's [0, 1] pixels are prepared for the teacher, inside the "
         "differentiable adapter (Jacobians stay w.r.t. the dataset's pixels), as "
         "keras.applications.<family>.preprocess_input does on 0-255 pixels. caffe: "
         "RGB->BGR and ImageNet mean subtraction (ResNet50, VGG); torch: ImageNet "
         "per-channel mean/std (DenseNet); tf: [-1, 1] (MobileNet, Inception, "
         "ResNetV2); pixels255: [0, 255], for models that carry their own "
         "(EfficientNet, ConvNeXt, MobileNetV3); none: as they are, times "
         "--teacher_input_scale plus --teacher_input_offset. auto: the "
         "keras.applications family's, a KerasHub preset's image converter, else none.",
         choices=list(preprocessing.PREPROCESSING)),
    Flag("teacher_mean", ("teacher.input.mean",),
         "Per-channel mean (in [0, 1] pixel units) replacing "
         "torch's ImageNet mean, or subtracted with --teacher_preprocessing=none."),
    Flag("teacher_std", ("teacher.input.std",),
         "Per-channel std to go with --teacher_mean."),
    Flag("teacher_outputs", ("teacher.input.outputs",),
         "What the teacher returns. auto: a final softmax (Dense, Activation or "
         "Softmax layer) is seen and removed, so the hints get logits; a teacher with "
         "no visible softmax (a SavedModel) whose outputs look like probabilities is "
         "an error asking for this flag. probabilities: their logs stand for the "
         "logits (exact for kd, lwf with kd, jac_ce, at, at_jac; act, jac, noise "
         "are refused).",
         choices=list(outputs.OUTPUT_KINDS)),
    Flag("teacher_weights", ("teacher.input.weights",),
         "--teacher=keras.applications:NAME: its weights "
         "file (.h5 or .weights.h5); none: random weights; empty: the ImageNet "
         "file in Keras' cache directory (~/.keras/models), if a download elsewhere "
         "left it there. tfjac never downloads."),
    Flag("teacher_image_size", ("teacher.input.image_size",),
         "--teacher=keras.applications:NAME: build it "
         "for this square input size; 0: its default (224 for most)."),
    Flag("student_weights", ("student.weights",),
         "--model=keras.applications:NAME or FILE.keras: "
         "initial weights from this file (model.load_weights); empty: random "
         "init (or the file's own)."),
)
TABLE += tuple(
    Flag(f"{name}_weight", (_WEIGHTS + name,),
         f"Weight of the '{name}' hint: its importance relative to the other hints' under the "
         "default --loss_scaling=initial (1: the same share of the loss at the start as every "
         "other hint of weight 1); a raw multiplier under --loss_scaling=none" + (
             " (attention transfer's reference weight in raw units: 1e3)"
             if name == "at" else "") + ". Set away from 1, the student is fitted once with "
         "exactly the weights given (--choose_on_validation=auto turns off).")
    for name in hints.HINTS)


def _unwrap(kind):
  """Optional[X] (or X | None) -> X."""
  args = [a for a in typing.get_args(kind) if a is not type(None)]
  union = typing.get_origin(kind) in (typing.Union, types.UnionType)
  return args[0] if union and len(args) == 1 else kind


def field_of(path) -> Tuple[type, object]:
  """(type, Config() default) of the field at `path` ('teacher.train.epochs'); a field under
  an absent optional group (source) defaults as that group's class does."""
  if path.startswith(_WEIGHTS):
    return float, _DEFAULT.hints.weight(path[len(_WEIGHTS):])
  cls, value = config.Config, _DEFAULT
  for name in path.split("."):
    kind = _unwrap(typing.get_type_hints(cls)[name])
    value = getattr(cls() if value is None else value, name)
    cls = kind
  return cls, value


def _define(flag: Flag):
  kind, default = field_of(flag.paths[0])
  for path in flag.paths[1:]:  # one flag, one default: its fields must agree
    if field_of(path)[1] != default:
      raise AssertionError(f"--{flag.name} fills {flag.paths}, whose defaults differ")
  default = None if flag.creates else default
  if typing.get_origin(kind) is tuple:
    if flag.choices is not None:  # a list flag's entries are checked by checks.validate
      raise AssertionError(f"--{flag.name}: a list flag takes no choices")
    flags.DEFINE_list(flag.name, None if default is None else [str(v) for v in default],
                      flag.help)
  elif flag.choices is not None:
    flags.DEFINE_enum(flag.name, default, list(flag.choices), flag.help)
  else:
    define = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
              float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
    define(flag.name, default, flag.help)


for _flag in TABLE:
  _define(_flag)

_WORDS = {int: "integers", float: "numbers", str: "names"}


def value_of(flag: Flag, raw):
  """A parsed flag's value as its field holds it: a list flag's strings as the field's tuple
  (ConfigError naming the flag when an entry is not of the field's kind)."""
  kind, _ = field_of(flag.paths[0])
  if typing.get_origin(kind) is not tuple or raw is None:
    return raw
  item = typing.get_args(kind)[0]
  try:
    return tuple(item(v) for v in raw)
  except ValueError as e:
    raise ConfigError(flag.name, f"expects {_WORDS.get(item, item.__name__)}, got {raw}") from e


def with_values(settings, values: Dict[str, object]):
  """`settings` (a config dataclass) with the fields at the given paths replaced; an absent
  optional group (None) is built from its class's defaults first; a path into `weights`
  ('hints.weights.act') sets that hint's weight, the weights kept in the order given."""
  by_field: Dict[str, Dict[str, object]] = {}
  changes = {}
  for path, value in values.items():
    head, _, rest = path.partition(".")
    if rest:
      by_field.setdefault(head, {})[rest] = value
    else:
      changes[head] = value
  hints_of = typing.get_type_hints(type(settings))
  for name, sub in by_field.items():
    current = getattr(settings, name)
    if isinstance(settings, config.HintConfig) and name == "weights":
      merged = dict(current)  # the weights already set stay, in their order
      merged.update((h, float(w)) for h, w in sub.items())
      changes[name] = tuple(merged.items())
      continue
    if current is None:
      current = _unwrap(hints_of[name])()
    changes[name] = with_values(current, sub)
  return dataclasses.replace(settings, **changes)


def reference() -> str:
  """docs/settings.md: every flag beside the Config field it fills and its default, from
  TABLE (tests/test_defaults.py checks the page is this)."""
  lines = [
      "# Settings: every flag and its Python field",
      "",
      "Written by `python -c \"from tfjac import flagdefs; "
      "open('docs/settings.md', 'w').write(flagdefs.reference())\"` from the flags' table "
      "(`tfjac/flagdefs.py`), the one list of settings: each flag of `python -m tfjac.run` "
      "fills the field(s) of `tfjac.config.Config` named beside it, and its default is that "
      "field's default, so `Config(...)` in Python and the command line make the same run "
      "(`--hints` and `--jac_target` left out: the mode's own, as `HintConfig()` left as it "
      "is; a default of none: not given, or for `--teacher_width` derived from the dataset, "
      "as the flag's text says). A `<hint>_weight` fills that hint's entry of "
      "`HintConfig.weights`.",
      "",
      "| flag | Python field(s) | default | what it sets |",
      "|---|---|---|---|"]
  for flag in TABLE:
    default = flags.FLAGS[flag.name].default
    if isinstance(default, list):
      default = ",".join(default) or "(empty)"
    elif default is None:
      default = "none"
    elif default == "":
      default = "(empty)"
    paths = ", ".join(f"`{p}`" for p in flag.paths)
    text = flag.help.replace("|", "\\|").replace("<", "&lt;")
    if flag.choices is not None:
      text += " Choices: " + ", ".join(f"`{c}`" for c in flag.choices) + "."
    lines.append(f"| `--{flag.name}` | {paths} | `{default}` | {text} |")
  return "\n".join(lines) + "\n"
