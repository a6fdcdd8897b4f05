"""Per-epoch overhead of a student fit (issue 15): where the seconds between training steps go.

`python tools/epoch_overhead.py` fits the default command's student shape (VGG-4 on the
embedded digits, act,jac,ce, batch 32, --epochs of --steps_per_epoch steps; the teacher is an
untrained VGG-9 at --teacher_width: its weights do not change the cost) through
tfjac.training.loop.fit, and times every callback's epoch-end work and the validation by
wrapping them; prints seconds per epoch for each.
"""
import collections
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import benchkit  # noqa: E402  (the Distiller of the timed step)

flags.DEFINE_integer("epochs", 20, "Student epochs.")
flags.DEFINE_integer("steps_per_epoch", 4, "Steps per epoch (the default command: 4).")
flags.DEFINE_float("teacher_width", 1.0, "Teacher width.")
flags.DEFINE_integer("samples_per_class", 10, "Training examples per class.")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import keras  # pylint: disable=g-import-not-at-top
  from tfjac import data as data_lib  # pylint: disable=g-import-not-at-top
  from tfjac import models  # pylint: disable=g-import-not-at-top
  from tfjac.config import DataConfig, TrainConfig  # pylint: disable=g-import-not-at-top
  from tfjac.training import callbacks, loop, resume  # pylint: disable=g-import-not-at-top
  from tfjac.training.distiller import Distiller  # pylint: disable=g-import-not-at-top
  splits = data_lib.prepare(DataConfig())
  info = splits.info
  keras.utils.set_random_seed(0)
  student = models.build("vgg4", info.image_shape, info.num_classes, mean=info.mean,
                         std=info.std)
  teacher = models.build("vgg9", info.image_shape, info.num_classes, mean=info.mean,
                         std=info.std, width=FLAGS.teacher_width)
  distiller = benchkit.distiller(student, teacher, "act,jac,ce", compile=False)  # fit compiles
  spent = collections.Counter()

  def timed(name, fn):
    def wrapper(*a, **k):
      start = time.perf_counter()
      try:
        return fn(*a, **k)
      finally:
        spent[name] += time.perf_counter() - start
    return wrapper

  originals = {}
  for cls, method in ((callbacks.StudentCheckpoint, "on_epoch_end"),
                      (resume.TrainingBackup, "on_epoch_end"),
                      (keras.callbacks.TensorBoard, "on_epoch_end"),
                      (keras.callbacks.TensorBoard, "on_train_begin"),
                      (callbacks.EpochLogger, "on_epoch_end"),
                      (Distiller, "evaluate"),
                      (data_lib, "training_batches")):
    originals[(cls, method)] = getattr(cls, method)
    setattr(cls, method, timed(f"{getattr(cls, '__name__', cls)}.{method}",
                               getattr(cls, method)))
  cfg = TrainConfig(epochs=FLAGS.epochs, batch_size=32, steps_per_epoch=FLAGS.steps_per_epoch)
  with tempfile.TemporaryDirectory() as tmp:
    start = time.perf_counter()
    result = loop.fit(distiller, splits.sampled_train(FLAGS.samples_per_class, 0),
                      splits.validation, cfg,
                      loop.FitDirs(os.path.join(tmp, "tb"), os.path.join(tmp, "ck")),
                      teacher_cache=True,
                      extra_callbacks=[callbacks.EpochLogger("student", FLAGS.epochs)])
    wall = time.perf_counter() - start
  for (cls, method), fn in originals.items():
    setattr(cls, method, fn)
  e = FLAGS.epochs
  print(f"student fit: {e} epochs x {FLAGS.steps_per_epoch} steps, {len(splits.validation)} "
        f"validation images: {wall:.1f} s in all ({wall / e:.2f} s/epoch); phases "
        f"{result.phases}\n")
  print("| part | s in all | s/epoch |\n|---|---|---|")
  for name, s in spent.most_common():
    print(f"| {name} | {s:.2f} | {s / e:.3f} |")


if __name__ == "__main__":
  app.run(main)
