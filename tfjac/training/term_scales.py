"""Loss-term scaling: what makes a hint's weight mean relative importance.

The hints come in units of their own: `act` sums squared logit differences over the C classes
(100-250 at the start on the digits and Fashion-MNIST), the normalised `jac` is bounded by 4
(about 2 for unrelated directions), `ce` starts near ln C. A raw weight is therefore a
multiplier whose right value depends on the classes, the teacher's logit scale and the data
(the tuned digits and Fashion-MNIST tables chose jac weights of 10 to 100 beside act at 0.1
to 1). With a scaling, each term is divided by a detached measure of its own size, so that a
weight says how much that term counts relative to the others:

  none     w_h * term_h: the raw form.
  initial  w_h * term_h / s_h, s_h the mean of term_h over the global batch, averaged over the
           first `warmup` training steps that computed it, then frozen. Every term starts at
           its weight whatever its units, and afterwards falls by its own progress.
  running  the same with s_h a bias-corrected exponential moving average of the batch means
           (decay `decay`): every term keeps its weight's share as it shrinks, like
           differentiating log(term_h).

s_h is the absolute value of the mean (jac_ce can be negative), at least TINY, and taken
with the gradient stopped, so the gradient of a term keeps its direction. With a single hint
nothing is scaled: its weight has no other term to be relative to (the teacher's fit, the CE
baseline and the `act` row are the raw runs). Scales are updated only by training steps
(validation reads them), over the global batch (the same on every replica), by the steps that
computed the term (lazy Jacobian matching: the Jacobian steps); they are variables of the
Distiller, saved in resume backups, so a resumed run continues with the same scales.
"""
from typing import Dict, Iterable

import keras
import tensorflow as tf

SCALINGS = ("none", "initial", "running")
TINY = 1e-12


class TermScales:
  """The per-hint scales of one Distiller (shared with its lazy and validation twins)."""

  def __init__(self, owner: keras.layers.Layer, names: Iterable[str], kind: str, *,
               warmup: int = 10, decay: float = 0.99):
    if kind not in SCALINGS:
      raise ValueError(f"loss_scaling must be one of {', '.join(SCALINGS)}, got {kind!r}")
    names = tuple(names)  # loss_scaling='running' with jac_ce: refused by settings.check_rules
    self.kind = kind if len(names) > 1 else "none"
    self.warmup, self.decay = int(warmup), float(decay)
    self._mean: Dict[str, keras.Variable] = {}
    self._count: Dict[str, keras.Variable] = {}
    if self.kind == "none":
      return
    for name in names:
      # ONLY_FIRST_REPLICA: every replica assigns the same all-reduced value.
      self._mean[name] = owner.add_weight(
          name=f"scale_{name}", shape=(), initializer="zeros", trainable=False,
          aggregation="only_first_replica")
      self._count[name] = owner.add_weight(
          name=f"scale_{name}_count", shape=(), initializer="zeros", trainable=False,
          aggregation="only_first_replica")

  @property
  def variables(self):
    """Every variable, in a fixed order (resume backups)."""
    return [v for name in sorted(self._mean) for v in (self._mean[name], self._count[name])]

  def scale(self, name) -> tf.Tensor:
    """s_h, the divisor of `name`'s term now; 1 before its first update or without scaling."""
    if name not in self._mean:
      return tf.constant(1.0)
    mean = tf.convert_to_tensor(self._mean[name])
    count = tf.convert_to_tensor(self._count[name])
    if self.kind == "running":  # bias correction: the first value is the first batch's mean
      mean = mean / tf.maximum(1.0 - tf.pow(self.decay, count), TINY)
    return tf.where(count > 0, tf.maximum(tf.abs(mean), TINY), 1.0)

  def update(self, name, batch_mean):
    """Takes one training step's global-batch mean of `name`'s term (a detached scalar)."""
    if name not in self._mean:
      return
    value = tf.cast(tf.stop_gradient(batch_mean), tf.float32)
    mean, count = self._mean[name], self._count[name]
    if self.kind == "initial":  # the running average of the first `warmup` steps, then frozen
      n = tf.convert_to_tensor(count)
      take = n < self.warmup
      mean.assign(tf.where(take, mean + (value - mean) / (n + 1.0), mean))
      count.assign(tf.where(take, n + 1.0, n))
    else:
      mean.assign(self.decay * mean + (1.0 - self.decay) * value)
      count.assign(count + 1.0)

  def logs(self):
    return {f"scale_{name}": self.scale(name) for name in sorted(self._mean)}
