"""--mode=distill: teacher (given, reused or trained) -> student on N samples per class with
the hints of --hints; the student is evaluated on the test split and exported alone."""
from tfjac.modes import common

DEFAULT_HINTS = None  # the --hints flag's default
ALWAYS_HINTS = ()
DEFAULT_JAC_TARGET = None
NEEDS_TEACHER = False  # given, reused from the run directory or trained here
BUILDS_STUDENT = True
TEACHER_CACHE = True
HINTS_READ_TEACHER = True
TOP_K_AMONG = "dataset"


def check(config):
  del config  # the checks of every mode are all distill has


def summary_lines(results):
  return common.summary_lines(results)


def run(config, splits, strategy):
  teacher, teacher_summary = common.obtain_teacher(config, splits, strategy)
  return {"teacher": teacher_summary,
          "student": common.train_student(config, splits, strategy, teacher)}
