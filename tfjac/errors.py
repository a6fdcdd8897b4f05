"""Errors that the command line turns into one clear message instead of a stack trace."""


class TfjacError(Exception):
  """Base class: the message is meant for the user, as it is."""


class ConfigError(TfjacError):
  """A flag value that cannot work; the message names the flag and what is valid."""

  def __init__(self, flag, message):
    self.flag = flag
    super().__init__(f"--{flag}: {message}")


class DataError(TfjacError):
  """The data asked for is missing or unusable; the message says how to provide it."""


class NonFiniteLossError(TfjacError):
  """A loss term became NaN or Inf during training."""

  def __init__(self, term, epoch, step, value):
    self.term, self.epoch, self.step, self.value = term, epoch, step, value
    super().__init__(
        f"loss term '{term}' became {value} at epoch {epoch + 1}, step {step + 1}; training "
        "stopped. The checkpoints written before this step are intact. Lower the learning rate "
        "or this term's weight, or check the input data.")
