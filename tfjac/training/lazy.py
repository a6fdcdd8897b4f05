"""Lazy Jacobian matching (`jac_every`=K > 1): the Jacobian hints on every K-th optimizer step
only, with their weights times K, and the steps in between without any Jacobian pass.

Why: a Jacobian hint costs a double backprop, several times a plain step; taking it every K-th
step at K times its weight keeps its average share of the gradient (issue 15,
docs/results/lazy_digits.md). How: two twin Distillers that share every network, view, variable
and loss scale of the Distiller being fitted: `full` (every hint, the Jacobian hints' weights
times K) and `cheap` (the hints without Jacobians). On one replica a tf.cond inside the one
compiled step picks a twin by the optimizer's step; on several, tf.cond cannot hold a
cross-replica sum (synchronized BatchNorm's, in the Jacobian pass), so the step is two compiled
functions chosen in Python (LazySteps.train_function).

The twins live in this plain object, which Keras does not track: tracked, they would be
sub-models whose metric trackers and shared variables Keras would list, build and save again
in the fitted Distiller's weights and checkpoints.
"""
import tensorflow as tf


class LazySteps:
  """The twins of one Distiller under jac_every=K > 1, and how a step picks one."""

  def __init__(self, distiller, jac_every: int):
    jacobian_hints = distiller.jacobian_hints
    # At least one, by the rule the Distiller checked (training/settings.check_rules).
    cheap = [(n, w) for n, w in distiller.hint_weights if n not in jacobian_hints]
    self.cheap = distiller.with_hints(cheap)
    self.full = distiller.with_hints(
        [(n, w * jac_every if n in jacobian_hints else w) for n, w in distiller.hint_weights])

  def step_gradients(self, distiller, measure, step, jac_step=None):
    """(gradients, student logits, {tracker: (per-example values, sample weights)}) of one
    step of `distiller`: `measure(model)` is the measured step of the twin `model` (the
    closure of Distiller.step_gradients).
    step % K == 0 (Distiller.is_jacobian_step) takes `full`, the other steps `cheap`; under
    tf.cond the branch not taken, and so every Jacobian pass of it, does not run. `jac_step`
    True/False: that twin, no cond (the two functions of several replicas)."""
    variables = distiller.trained_variables

    def branch(model):
      def fn():
        grads, s_logits, values, weights = measure(model)
        # tf.cond needs one structure: zeros where the other branch has a gradient
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, variables)]
        return grads, s_logits, values, weights
      return fn

    if jac_step is not None:
      return branch(self.full if jac_step else self.cheap)()
    return tf.cond(distiller.is_jacobian_step(tf.cast(step, tf.int64)), branch(self.full),
                   branch(self.cheap))

  def train_function(self, distiller):
    """Several replicas: the Jacobian step and the one without as two compiled functions
    (Keras' own _make_function, so each is distributed and compiled as Keras' step is), the
    one to run chosen by the optimizer's step, read once per step."""
    if getattr(distiller, "steps_per_execution", 1) not in (None, 1):
      raise ValueError("jac_every > 1 on several replicas needs steps_per_execution=1")

    def jacobian_step(data):
      return distiller.train_step(data, jac_step=True)

    def step_without_jacobians(data):
      return distiller.train_step(data, jac_step=False)

    full = distiller._make_function(jacobian_step)  # pylint: disable=protected-access
    cheap = distiller._make_function(step_without_jacobians)  # pylint: disable=protected-access

    def train_function(iterator):
      step = int(distiller.optimizer.iterations.numpy())
      return (full if distiller.is_jacobian_step(step) else cheap)(iterator)

    return train_function
