"""The timing tools' shared kit: the synthetic step they all time (networks, Distiller, batch,
cached teacher outputs) and its strategy, built once here for benchmark.py, profile_step.py,
step_variants.py, epoch_overhead.py and gpu_check.py (torch_peer.py times the same
configuration dicts). Random data: speed, never accuracy.

TensorFlow is imported inside the functions: the tools parse their flags (and run their
subprocess drivers) without it.
"""

# The poster's shapes: a VGG-9 teacher -> VGG-4 student on 32x32x3 images, 100 classes.
POSTER = dict(teacher_model="vgg9", model="vgg4", image_size=32, channels=3, num_classes=100)
LEARNING_RATE, MOMENTUM = 0.01, 0.9  # the SGD every timed step uses


def strategy(replicas):
  """The strategy of `replicas` replicas from tfjac.runtime.make_strategy, as tfjac.run makes
  it: the default one for 1; else a MirroredStrategy over the first `replicas` GPUs (the others
  hidden) or, without GPUs, over as many logical CPU devices (the same cores: the replication's
  overhead, not a speed-up). Call before any op runs (devices are fixed then). None when there
  are GPUs but fewer than `replicas`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfjac import runtime  # pylint: disable=g-import-not-at-top
  if replicas == 1:
    return runtime.make_strategy("default")
  gpus = tf.config.list_physical_devices("GPU")
  try:
    if gpus:
      if len(gpus) < replicas:
        return None
      tf.config.set_visible_devices(gpus[:replicas], "GPU")
    else:
      tf.config.set_logical_device_configuration(
          tf.config.list_physical_devices("CPU")[0],
          [tf.config.LogicalDeviceConfiguration()] * replicas)
  except RuntimeError:  # already initialised (a test process): use the devices it has
    pass
  made = runtime.make_strategy("mirrored")
  if made.num_replicas_in_sync != replicas:
    raise RuntimeError(f"asked for {replicas} replicas, the strategy has "
                       f"{made.num_replicas_in_sync} (devices fixed before this call?)")
  return made


def networks(*, teacher_model, model, image_size, channels, num_classes, width=1.0,
             teacher_width=1.0, sync_bn=False, **options):
  """(teacher, student) of tfjac.models at the given shapes, seeded (0), named teacher and
  student; `options` go to both builders (e.g. pool=)."""
  import keras  # pylint: disable=g-import-not-at-top
  from tfjac import models  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  shape = (image_size, image_size, channels)
  common = dict(mean=[0.5] * channels, std=[0.25] * channels, sync_bn=sync_bn, **options)
  teacher = models.build(teacher_model, shape, num_classes, width=teacher_width,
                         model_name="teacher", **common)
  student = models.build(model, shape, num_classes, width=width, model_name="student",
                         **common)
  return teacher, student


def distiller(student, teacher, hints, *, jit_compile=False, compile=True,  # pylint: disable=redefined-builtin
              num_classes=None, **settings):
  """The Distiller of `hints` ('act,jac,ce' or a sequence of names), each at weight 1, with
  the other HintConfig `settings` by name (jac_target=, jac_bn_policy=, ...), compiled with the
  timed SGD unless compile=False."""
  import keras  # pylint: disable=g-import-not-at-top
  from tfjac.config import HintConfig  # pylint: disable=g-import-not-at-top
  from tfjac.training.distiller import Distiller  # pylint: disable=g-import-not-at-top
  names = hints.split(",") if isinstance(hints, str) else list(hints)
  d = Distiller(student, teacher, hints=HintConfig.of([(h, 1.0) for h in names], **settings),
                num_classes=num_classes)
  if compile:
    d.compile(optimizer=keras.optimizers.SGD(LEARNING_RATE, momentum=MOMENTUM),
              jit_compile=jit_compile)
  return d


def batch(batch_size, image_size, channels, num_classes, seed=0):
  """(images in [0, 1), integer labels) as constants, from numpy's generator at `seed`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  x = tf.constant(rng.random((batch_size, image_size, image_size, channels), np.float32))
  y = tf.constant(rng.integers(0, num_classes, batch_size), tf.int32)
  return x, y


def element(d, x, y, teacher_cache=False):
  """The training element: (x, y), or with `teacher_cache` (x, y, the teacher's outputs
  computed once by Distiller.teacher_pass, as --teacher_cache feeds them)."""
  if not teacher_cache:
    return x, y
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tfjac.training.distiller import pack_teacher_outputs  # pylint: disable=g-import-not-at-top
  return x, y, {k: tf.constant(v) for k, v in
                pack_teacher_outputs(d.teacher_pass(x, y, 0)).items()}


def repeated(elem):
  """The element repeated forever, as a tf.data.Dataset (what the timed steps consume)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  return tf.data.Dataset.from_tensors(elem).repeat()


def median_round(rounds):
  """Of several timed runs of one configuration (dicts with ms_per_step), the run of median
  time (the lower middle one of an even count), with every run's ms/step beside it."""
  if "skipped" in rounds[0]:
    return rounds[0]
  ordered = sorted(rounds, key=lambda r: r["ms_per_step"])
  return dict(ordered[(len(ordered) - 1) // 2],
              ms_per_step_rounds=[r["ms_per_step"] for r in rounds])
