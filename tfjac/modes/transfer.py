"""--mode=transfer: Learning without Forgetting from a teacher trained on other (source) data.

The student (--model) gets a second, teacher-shaped head; the loss is CE on the target labels
plus the hints: lwf (second head matched to the teacher on target images), jac (Jacobians of
the second head and the teacher at the teacher's top-1 class: no source labels exist for target
images), at / at_jac (attention maps of paired layers). --hints=ce trains the student alone:
the poster's no-transfer baseline. The exported student is the target network alone.
"""
import keras
from absl import logging

from tfjac import config as config_lib
from tfjac import teachers
from tfjac.models import views
from tfjac.modes import common

NO_TEACHER_NEEDED = ("ce",)


def run(config, splits, strategy):
  info = splits.info
  if config.hints.hints == NO_TEACHER_NEEDED:
    logging.info("--hints=ce: the no-transfer baseline; the teacher is not used")
    return {"student": common.train_student(config, splits, strategy, teacher=None)}
  uses_features = any(h in ("at", "at_jac") for h in config.hints.hints)
  with strategy.scope():
    loaded = teachers.load_teacher(config, info)
    network, teacher, source_classes = loaded.network, loaded.adapted, loaded.num_outputs
  config_lib.check_jac_top_k(config, source_classes, "the teacher's",
                             f" ({config.teacher_path}; top-k picks among its outputs)")
  logging.info("teacher %s: %d source classes; target: %d classes", config.teacher_path,
               source_classes, info.num_classes)
  teacher_summary = {"source": "given", "path": config.teacher_path,
                     "source_classes": source_classes, **loaded.summary()}

  def make_views(student):
    teacher_layers, student_layers = (), ()
    if uses_features:
      teacher_layers, student_layers = views.attention_pairs(
          network, student, config.hints.teacher_layers, config.hints.student_layers)
      logging.info("attention pairs: %s", list(zip(teacher_layers, student_layers)))
      teacher_summary["attention_pairs"] = [list(p) for p in zip(teacher_layers,
                                                                 student_layers)]
    teacher_view = loaded.adapt(views.make_view(network, feature_layers=teacher_layers),
                                name="teacher_view")
    head = keras.layers.Dense(source_classes, dtype="float32", name="teacher_head")
    student_view = views.make_view(student, feature_layers=student_layers, second_head=head,
                                   name="student_view")
    return student_view, teacher_view

  student = common.train_student(config, splits, strategy, teacher, make_views=make_views)
  return {"teacher": teacher_summary, "student": student}
