"""How a fit optimises: its length in optimizer steps (budget) and the optimizer with its
learning-rate schedule over those steps, including the L2 penalty in PyTorch's form."""
import dataclasses
import math
from typing import Optional

import keras

from tfjac.config import TrainConfig


class _L2Penalty:
  """Adds `l2 * w` to each variable's gradient before the optimizer's own update (momentum,
  Adam moments): the L2 penalty l2/2 ||w||^2 in the loss, as PyTorch's `weight_decay` and the
  attention-transfer reference code. Every trained variable is decayed (kernels, biases,
  BatchNorm scales and offsets), as there; variables without a gradient in a step are
  skipped, as in PyTorch. Not Keras's `weight_decay`, which shrinks w by lr * wd after the
  update, outside the momentum (decoupled)."""

  def __init__(self, *args, l2=0.0, **kwargs):
    super().__init__(*args, **kwargs)
    self.l2 = float(l2)

  def update_step(self, gradient, variable, learning_rate):
    if self.l2:
      gradient = keras.ops.add(gradient, keras.ops.multiply(
          keras.ops.cast(self.l2, variable.dtype), variable))
    super().update_step(gradient, variable, learning_rate)

  def get_config(self):
    return {**super().get_config(), "l2": self.l2}


@keras.saving.register_keras_serializable(package="tfjac")
class SGDWithL2(_L2Penalty, keras.optimizers.SGD):
  """keras SGD on the gradient of loss + l2/2 ||w||^2 (see _L2Penalty)."""


@keras.saving.register_keras_serializable(package="tfjac")
class AdamWithL2(_L2Penalty, keras.optimizers.Adam):
  """keras Adam on the gradient of loss + l2/2 ||w||^2 (PyTorch Adam's weight_decay)."""


@dataclasses.dataclass(frozen=True)
class Budget:
  """How long a fit runs: `epochs` epochs of `steps_per_epoch` steps, the last one cut so that
  `total_steps` optimizer steps run in all (only a train_steps budget cuts it)."""
  steps_per_epoch: int
  epochs: int
  total_steps: int


# With train_steps and no steps_per_epoch, an epoch (validation, checkpoint, backup) is one
# pass, but never shorter than train_steps / MAX_BUDGET_EPOCHS steps: 3 images per class at
# batch 32 are one step per pass, and 2,160 one-step epochs would spend the run validating.
MAX_BUDGET_EPOCHS = 100


def budget(cfg: TrainConfig, num_examples: int) -> Budget:
  """epochs epochs, or with train_steps=N exactly N steps in as many epochs as needed.
  An epoch is steps_per_epoch steps, or one pass over the `num_examples` (the last batch
  partial); under train_steps=N at least ceil(N / MAX_BUDGET_EPOCHS) steps (several passes,
  the stream reshuffled at each)."""
  one_pass = max(1, math.ceil(num_examples / cfg.batch_size))
  steps = cfg.steps_per_epoch or one_pass
  if cfg.train_steps and not cfg.steps_per_epoch:
    steps = max(one_pass, math.ceil(cfg.train_steps / MAX_BUDGET_EPOCHS))
  if cfg.train_steps:
    return Budget(steps, math.ceil(cfg.train_steps / steps), cfg.train_steps)
  return Budget(steps, cfg.epochs, cfg.epochs * steps)


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int,
                   total_steps: Optional[int] = None) -> keras.optimizers.Optimizer:
  """The schedule is over optimizer steps: cosine decays over `total_steps` (default
  epochs x steps_per_epoch); step boundaries are lr_decay_steps, or lr_decay_epochs
  converted with `steps_per_epoch`.

  Momentum is Keras's form, v <- m v - lr g; w <- w + v. PyTorch's (v <- m v + g;
  w <- w - lr v) takes the same steps while the learning rate is constant; when a schedule
  changes it, Keras's velocity still holds steps taken at the old rate (about 1 / (1 - m)
  steps, 10 at m = 0.9, after each step boundary)."""
  total = max(1, total_steps or cfg.epochs * steps_per_epoch)
  lr = cfg.learning_rate
  if cfg.lr_schedule == "cosine":
    lr = keras.optimizers.schedules.CosineDecay(cfg.learning_rate, decay_steps=total)
  elif cfg.lr_schedule == "step":
    boundaries = list(cfg.lr_decay_steps) or [e * steps_per_epoch for e in cfg.lr_decay_epochs]
    lr = keras.optimizers.schedules.PiecewiseConstantDecay(
        boundaries=boundaries,
        values=[cfg.learning_rate * cfg.lr_decay_factor ** i
                for i in range(len(boundaries) + 1)])
  l2 = cfg.weight_decay if cfg.weight_decay_kind == "l2" else 0.0
  wd = (cfg.weight_decay if cfg.weight_decay_kind == "decoupled" else 0.0) or None
  if cfg.optimizer == "sgd":
    if l2:
      return SGDWithL2(lr, momentum=cfg.momentum, nesterov=cfg.nesterov, l2=l2)
    return keras.optimizers.SGD(lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                                weight_decay=wd)
  if cfg.optimizer == "adam":
    if l2:
      return AdamWithL2(lr, l2=l2)
    return keras.optimizers.Adam(lr, weight_decay=wd)
  return keras.optimizers.AdamW(lr, weight_decay=cfg.weight_decay)
