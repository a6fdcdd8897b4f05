"""Mode distill: teacher (given, reused or trained) -> student on N samples per class with
the hints of hints.hints; the student is evaluated on the test split and exported alone."""
from tfjac.modes import Mode, common


def run(config, splits, strategy):
  teacher, teacher_summary = common.obtain_teacher(config, splits, strategy)
  return {"teacher": teacher_summary,
          "student": common.train_student(config, splits, strategy, teacher)}


MODE = Mode(run=run, summary_lines=common.summary_lines,
            # a teacher given, reused from the run directory or trained here
            teacher_cache=True, hints_read_teacher=True, chooses_on_validation=True)
