"""Mode regularize: a student trained without a teacher, with Jacobian-norm regularisation
(hints ce,jacnorm: CE + sigma^2 ||dS/dx||^2) or CE on noisy inputs (hints noisy_ce). The
poster's equivalence of the two is for squared error; for CE the noisy expectation is, to second
order, CE + sigma^2/2 tr(Hessian_x CE), so the two are related losses, not the same one."""
from tfjac import hints as hints_lib
from tfjac.errors import SettingError, mention
from tfjac.modes import Mode, common


def check(config):
  with_teacher = [name for name in config.hints.hints if hints_lib.HINTS[name].needs_teacher]
  if with_teacher:
    raise SettingError("hints.hints", f"{mention('mode', 'regularize')} has no teacher, but "
                       f"{with_teacher} need one; valid: " + ", ".join(
                           n for n, hint in hints_lib.HINTS.items() if not hint.needs_teacher))
  if config.teacher.path:
    raise SettingError("teacher.path", f"{mention('mode', 'regularize')} trains without a "
                       "teacher")


def run(config, splits, strategy):
  return {"student": common.train_student(config, splits, strategy, teacher=None)}


MODE = Mode(run=run, summary_lines=common.summary_lines, check=check,
            default_hints=("ce", "jacnorm"))  # no teacher
