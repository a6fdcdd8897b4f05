"""Op-level profile of one Distiller training step (issue 15): which ops the double-backprop
step spends its time in.

`python tools/profile_step.py --hints=act,jac,ce --batch_size=64` builds tools/benchkit.py's
networks (VGG-9 teacher -> VGG-4 student, 32x32x3, 100 classes, random data), runs --warmup
steps, records --steps steps with the TensorFlow profiler (tf.profiler.experimental; the trace
stays in --logdir for TensorBoard's profile plugin) and prints markdown tables: op time by op
type, and by phase of the step (teacher forward, teacher input-gradient, student forward,
student input-gradient, weight gradients of the forward, weight gradients through the
input-gradient = second order, optimizer), each as ms per step and share of all op time.
Op time is summed over TensorFlow's executor threads: with inter-op parallelism it can exceed
the wall time, which is printed too.
"""
import collections
import glob
import os
import re
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app, flags  # noqa: E402

import benchkit  # noqa: E402  (the synthetic step; imports no TensorFlow)

flags.DEFINE_string("hints", "act,jac,ce", "Hint set, comma-separated.")
flags.DEFINE_string("teacher_model", benchkit.POSTER["teacher_model"], "Teacher architecture.")
flags.DEFINE_string("model", benchkit.POSTER["model"], "Student architecture.")
flags.DEFINE_integer("image_size", benchkit.POSTER["image_size"], "Image height and width.")
flags.DEFINE_integer("channels", benchkit.POSTER["channels"], "Image channels.")
flags.DEFINE_integer("num_classes", benchkit.POSTER["num_classes"], "Classes.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_enum("jac_bn_policy", "batch_stats", ["batch_stats", "inference"], "BatchNorm "
                  "policy of the student's Jacobian.")
flags.DEFINE_boolean("teacher_cache", False, "Feed the teacher's outputs computed once.")
flags.DEFINE_boolean("jit_compile", False, "XLA (speed only: refused by tfjac.run with "
                     "double backprop unless the networks make it exact).")
flags.DEFINE_integer("warmup", 3, "Untimed steps first.")
flags.DEFINE_integer("steps", 5, "Profiled steps.")
flags.DEFINE_integer("top", 15, "Op types shown.")
flags.DEFINE_string("logdir", "/tmp/tfjac_profile", "Where the trace is written.")
flags.DEFINE_enum("mixed_precision", "float32", ["float32", "mixed_bfloat16"],
                  "Keras dtype policy of the networks (as tfjac.run's --mixed_precision).")
FLAGS = flags.FLAGS

PHASES = (  # (name, test on the op's full name), first match wins
    ("optimizer", lambda n: "/SGD/" in n or "/Adam" in n or "AssignVariable" in n or
     "ResourceApply" in n),
    ("second order (weights through the student's input-gradient)",
     lambda n: "gradient_tape/gradient_tape/" in n),
    ("teacher input-gradient", lambda n: "gradient_tape/teacher" in n or
     re.search(r"gradient_tape/vgg9", n) is not None),
    ("weight gradients / student input-gradient", lambda n: "gradient_tape/" in n),
    ("teacher forward", lambda n: "teacher" in n or "vgg9" in n),
    ("student forward", lambda n: "student" in n or "vgg4" in n),
    ("other (losses, selection, metrics)", lambda n: True),
)


def op_events(logdir):
  """[(full op name, op type, duration ms)] of the newest trace under logdir."""
  from tensorflow.tsl.profiler.protobuf import xplane_pb2  # pylint: disable=g-import-not-at-top
  path = max(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True),
             key=os.path.getmtime)
  space = xplane_pb2.XSpace()
  with open(path, "rb") as f:
    space.ParseFromString(f.read())
  events = []
  for plane in space.planes:
    if not plane.name.startswith("/host:CPU") and not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if plane.name.startswith("/host:CPU") and not line.name.startswith("tf_Compute"):
        continue  # the executor threads; python/Eigen lines hold wrappers and sub-tasks
      for e in line.events:
        name = plane.event_metadata[e.metadata_id].name
        if ":" not in name or "::" in name or " " in name.split(":")[-1]:
          continue
        full, kind = name.rsplit(":", 1)
        events.append((full, kind.replace("_Mkl", "").replace("Native", ""),
                       e.duration_ps / 1e9))
  return events


def tables(events, steps, top):
  total = sum(ms for _, _, ms in events) or 1.0
  by_type = collections.Counter()
  by_phase = collections.Counter()
  for full, kind, ms in events:
    by_type[kind] += ms
    by_phase[next(p for p, test in PHASES if test(full))] += ms
  out = ["| op type | ms/step | share |", "|---|---|---|"]
  out += [f"| {k} | {v / steps:.1f} | {100 * v / total:.1f}% |"
          for k, v in by_type.most_common(top)]
  out += ["", "| phase | ms/step | share |", "|---|---|---|"]
  out += [f"| {k} | {v / steps:.1f} | {100 * v / total:.1f}% |"
          for k, v in by_phase.most_common()]
  return "\n".join(out), total / steps


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  import keras  # pylint: disable=g-import-not-at-top
  keras.mixed_precision.set_global_policy(FLAGS.mixed_precision)
  teacher, student = benchkit.networks(
      teacher_model=FLAGS.teacher_model, model=FLAGS.model, image_size=FLAGS.image_size,
      channels=FLAGS.channels, num_classes=FLAGS.num_classes)
  distiller = benchkit.distiller(student, teacher, FLAGS.hints, jit_compile=FLAGS.jit_compile,
                                 jac_bn_policy=FLAGS.jac_bn_policy, num_classes=FLAGS.num_classes)
  x, y = benchkit.batch(FLAGS.batch_size, FLAGS.image_size, FLAGS.channels, FLAGS.num_classes)
  dataset = benchkit.repeated(benchkit.element(distiller, x, y, FLAGS.teacher_cache))
  distiller.fit(dataset, epochs=1, steps_per_epoch=FLAGS.warmup, verbose=0)
  iterator = iter(dataset)
  tf.profiler.experimental.start(FLAGS.logdir)
  start = time.perf_counter()
  for _ in range(FLAGS.steps):
    float(np.asarray(distiller.train_function(iterator)["loss"]))
  wall = (time.perf_counter() - start) / FLAGS.steps * 1000
  tf.profiler.experimental.stop()
  text, op_ms = tables(op_events(FLAGS.logdir), FLAGS.steps, FLAGS.top)
  print(f"hints={FLAGS.hints} batch={FLAGS.batch_size} teacher_cache={FLAGS.teacher_cache} "
        f"precision={FLAGS.mixed_precision} "
        f"jit_compile={FLAGS.jit_compile} {FLAGS.teacher_model}->{FLAGS.model} "
        f"{FLAGS.image_size}x{FLAGS.image_size}x{FLAGS.channels}: {wall:.0f} ms/step wall "
        f"(profiler on), {op_ms:.0f} ms/step of op time\n")
  print(text)


if __name__ == "__main__":
  app.run(main)
