"""Errors that the command line turns into one clear message instead of a stack trace.

The library speaks in the caller's terms: a SettingError names the argument or Config setting
(`teacher.input.resize`, `teacher_outputs`) and names others in its message through `mention`.
Only the command line (tfjac/checks.py, flag_errors) turns those names into flags."""
import contextlib
import contextvars
import re

_UNSET = object()
_MENTION = re.compile(r"\[\[([\w.]+)(?:=(.*?))?\]\](?!\])")  # a value may end in "]"


class TfjacError(Exception):
  """Base class: the message is meant for the user, as it is (its mentions of settings written
  as a Python caller writes them; `template` keeps them for the command line)."""

  def __init__(self, message=""):
    self.template = message
    super().__init__(render(message))


class ConfigError(TfjacError):
  """A flag value that cannot work (the command line's face); the message names the flag and
  what is valid."""

  def __init__(self, flag, message):
    self.flag = flag
    super().__init__(f"--{flag}: {message}")


def mention(setting: str, value=_UNSET) -> str:
  """`setting` (set to `value`) inside a SettingError's message, written as the caller writes
  it: `teacher.input.outputs='logits'` in Python, `--teacher_outputs=logits` on the command
  line."""
  if value is _UNSET:
    return f"[[{setting}]]"
  placeholder = isinstance(value, str) and value.isupper()  # N, DIR, FILE: written bare
  return f"[[{setting}={value if placeholder else repr(value)}]]"


def render(message: str, name=None) -> str:
  """`message` with its mentions written by `name(setting, value repr or None)`; by default as
  a Python caller writes them (setting=value)."""
  name = name or (lambda setting, value: setting if value is None else f"{setting}={value}")
  return _MENTION.sub(lambda m: name(m.group(1), m.group(2)), message)


# How say() writes mentions now: None (as a Python caller writes them) or the command line's
# writer, set by its flag_errors() block (tfjac/checks.py) around a command-line run.
_FACE = contextvars.ContextVar("tfjac_face", default=None)


@contextlib.contextmanager
def face(name):
  """Within this block say() writes mentions with `name(setting, value repr or None)`."""
  token = _FACE.set(name)
  try:
    yield
  finally:
    _FACE.reset(token)


def say(message: str) -> str:
  """`message` (a log line with mentions) in the terms of whoever runs the library: flags
  inside a command-line run, the settings' own names otherwise."""
  return render(message, _FACE.get())


class SettingError(TfjacError, ValueError):
  """An argument or setting value that cannot work, in the caller's terms: `setting` is the
  argument or the Config field's path; a ValueError, as Keras raises for a bad argument."""

  def __init__(self, setting, message):
    self.setting = setting
    super().__init__(f"{setting}: {message}")
    self.template = message  # with mentions, for the command line to rewrite


class DataError(TfjacError):
  """The data asked for is missing or unusable; the message says how to provide it."""


_AFTER_NON_FINITE = (
    "The checkpoints and the resume backup written before this step are intact. Lower the "
    f"learning rate or this term's weight (then run with {mention('resume', False)}: the "
    "backup is of the old settings), or check the input data.")


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
