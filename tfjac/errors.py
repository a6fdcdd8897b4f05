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


_AFTER_NON_FINITE = (
    "The checkpoints and the resume backup written before this step are intact. Lower the "
    "learning rate or this term's weight (then pass --noresume: the backup is of the old "
    "settings), or check the input data.")


class NonFiniteLossError(TfjacError):
  """A loss term became NaN or Inf during training."""

  def __init__(self, term, epoch, step, value):
    self.term, self.epoch, self.step, self.value = term, epoch, step, value
    super().__init__(
        f"loss term '{term}' became {value} at epoch {epoch + 1}, step {step + 1}; training "
        f"stopped. {_AFTER_NON_FINITE}")


class NonFiniteWeightsError(TfjacError):
  """Weights or optimizer state became NaN or Inf while every logged loss was finite (an
  overflowing gradient); found when a backup was about to be written."""

  def __init__(self, variables, epoch, step=None):
    self.variables, self.epoch, self.step = variables, epoch, step
    when = (f"the end of epoch {epoch + 1}" if step is None
            else f"epoch {epoch + 1}, step {step}")
    super().__init__(
        f"{', '.join(variables[:3])}{' ...' if len(variables) > 3 else ''} became NaN or Inf "
        f"by {when} although every loss term was finite (a gradient overflowed); training "
        f"stopped without saving them. {_AFTER_NON_FINITE}")
