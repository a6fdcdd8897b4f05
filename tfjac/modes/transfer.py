"""Mode transfer: Learning without Forgetting from a teacher trained on other (source) data.

The student (`student`) gets a second, teacher-shaped head; the loss is CE on the target labels
plus the hints: lwf (second head matched to the teacher on target images), jac (Jacobians of
the second head and the teacher at the teacher's top-1 class: no source labels exist for target
images), at / at_jac (attention maps of paired layers). hints=('ce',) trains the student alone:
the poster's no-transfer baseline. The exported student is the target network alone.
"""
import keras
from absl import logging

from tfjac.models import teachers
from tfjac import hints as hints_lib
from tfjac import errors
from tfjac.errors import SettingError, mention
from tfjac.models import views
from tfjac.modes import Mode, common

DEFAULT_HINTS = ("ce", "lwf")


NO_TEACHER_NEEDED = ("ce",)


def check(config):
  h = config.hints
  uses_jac = [n for n in h.hints if hints_lib.uses_jac_target(hints_lib.HINTS[n])]
  if uses_jac and h.jac_target == "label":
    raise SettingError("hints.jac_target", "target labels are not in the teacher's label "
                       "space: use teacher_top1 (the default of "
                       f"{mention('mode', 'transfer')} when no hint setting is chosen), top_k, "
                       "all, random or projection")
  # The transfer hints: CE on the labels and LwF, and the hints that read the teacher.
  valid = DEFAULT_HINTS + tuple(n for n, hint in hints_lib.HINTS.items()
                                if hint.needs_teacher and n not in DEFAULT_HINTS)
  bad = [n for n in h.hints if n not in valid]
  if bad:
    raise SettingError("hints.hints", f"{bad} are not transfer hints; valid: "
                       f"{', '.join(valid)}")


def run(config, splits, strategy):
  info = splits.info
  if config.hints.hints == NO_TEACHER_NEEDED:
    logging.info("%s: the no-transfer baseline; the teacher is not used",
                 errors.say(mention("hints.hints", ("ce",))))
    return {"student": common.train_student(config, splits, strategy, teacher=None)}
  uses_features = any(hints_lib.HINTS[h].needs_features for h in config.hints.hints)
  with strategy.scope():
    loaded = teachers.load_teacher(config, info)
    network, teacher, source_classes = loaded.network, loaded.adapted, loaded.num_outputs
  hints_lib.check_top_k(config.hints, source_classes, "the teacher's",
                        f" ({config.teacher.path}; top-k picks among its outputs)")
  logging.info("teacher %s: %d source classes; target: %d classes", config.teacher.path,
               source_classes, info.num_classes)
  teacher_summary = {"source": "given", "path": config.teacher.path,
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


MODE = Mode(run=run, summary_lines=common.summary_lines, check=check,
            default_hints=DEFAULT_HINTS,
            always_hints=("ce",),  # LwF: CE on the target labels is always part of the loss
            default_jac_target="teacher_top1",  # target labels are not the teacher's classes
            needs_teacher=True, teacher_cache=True, hints_read_teacher=True,
            top_k_among="teacher",  # the student's second head has the teacher's shape
            chooses_on_validation=True)
