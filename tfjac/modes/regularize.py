"""--mode=regularize: a student trained without a teacher, with Jacobian-norm regularisation
(--hints=ce,jacnorm: CE + sigma^2 ||dS/dx||^2) or CE on noisy inputs (--hints=noisy_ce). The
poster's equivalence of the two is for squared error; for CE the noisy expectation is, to second
order, CE + sigma^2/2 tr(Hessian_x CE), so the two are related losses, not the same one."""
from tfjac.modes import common


def run(config, splits, strategy):
  return {"student": common.train_student(config, splits, strategy, teacher=None)}
