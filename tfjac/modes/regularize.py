"""--mode=regularize: a student trained without a teacher, with Jacobian-norm regularisation
(--hints=ce,jacnorm: CE + sigma^2 ||dS/dx||^2) or its twin, CE on noisy inputs
(--hints=noisy_ce), to compare the two sides of the poster's equivalence."""
from tfjac.modes import common


def run(config, splits, strategy):
  return {"student": common.train_student(config, splits, strategy, teacher=None)}
