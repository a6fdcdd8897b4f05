"""What a teacher outputs: logits, or probabilities (a final softmax, seen in the structure and
removed, or declared); one rule for the command line and the Python API."""
from typing import List, Optional, Tuple

import keras
import numpy as np

from tfjac.errors import SettingError, mention, render

OUTPUT_KINDS = ("auto", "logits", "probabilities")


def _is_softmax(layer) -> bool:
  if isinstance(layer, keras.layers.Softmax):
    return True
  activation = getattr(layer, "activation", None)
  return getattr(activation, "__name__", None) == "softmax"


def _output_layer(model):
  history = getattr(model.outputs[0], "_keras_history", None) if getattr(
      model, "outputs", None) else None
  return history[0] if history else None


def without_softmax(model: keras.Model, _depth=0) -> Tuple[keras.Model, Optional[str]]:
  """(model returning the pre-softmax logits, how) when its output comes out of a softmax
  (Dense(activation='softmax'), Activation('softmax'), Softmax), else (model, None).
  A final softmax Dense is rebuilt linear with the same weights; an Activation/Softmax layer
  is skipped (its input is the output). A nested model in last place is looked into."""
  layer = _output_layer(model)
  if layer is None or len(model.outputs) != 1:
    return model, None
  how = None
  if isinstance(layer, keras.layers.Dense) and _is_softmax(layer):
    config = {**layer.get_config(), "activation": None, "name": f"{layer.name}_logits"}
    linear = keras.layers.Dense.from_config(config)
    out = linear(layer.input)
    linear.set_weights(layer.get_weights())
    how = f"final Dense {layer.name!r} rebuilt without its softmax"
  elif isinstance(layer, (keras.layers.Activation, keras.layers.Softmax)) and _is_softmax(layer):
    out = layer.input
    how = f"output taken before the softmax layer {layer.name!r}"
  elif isinstance(layer, keras.Model) and _depth < 4 and getattr(layer, "outputs", None):
    inner, how = without_softmax(layer, _depth + 1)
    if how is None:
      return model, None
    out = inner(layer.input)
    how = f"{how} (in {layer.name!r})"
  else:
    return model, None
  inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs  # one-tensor signature
  rebuilt = keras.Model(inputs, out, name=model.name)
  rebuilt.trainable = model.trainable
  return rebuilt, how


def looks_like_probabilities(model: keras.Model, input_shape, seed=0) -> bool:
  """Outputs >= 0 summing to 1 on every one of a few random inputs."""
  rng = np.random.default_rng(seed)
  x = rng.uniform(0, 1, (4, *input_shape)).astype(np.float32)
  out = model(x, training=False)
  if isinstance(out, dict):
    out = out["logits"]
  out = np.asarray(out)
  return bool(np.all(out >= 0) and np.allclose(out.sum(-1), 1.0, atol=1e-3))


@keras.saving.register_keras_serializable(package="tfjac")
class LogOf(keras.layers.Layer):
  """log(p): a probability output turned into logits up to a per-example constant."""

  def call(self, p):
    return keras.ops.log(keras.ops.maximum(p, 1e-30))


OUTPUTS_SETTING = "teacher.input.outputs"  # a Config's; the Distiller's argument: teacher_outputs


def teacher_logits(model: keras.Model, declared: str, probe: keras.Model, probe_shape, *,
                   path="the teacher", setting=OUTPUTS_SETTING):
  """The one rule for what a teacher outputs, for a Config and the Python API (errors name
  `setting`, the argument or setting that says what the teacher outputs). Returns (model returning
  logits, or log-probabilities when the teacher outputs probabilities, the output kind seen:
  'logits' | 'probabilities', how it was settled). A final softmax seen in the structure is
  removed; `probe` (the model fed from inputs of `probe_shape`) is tried on random inputs when
  the structure is silent, and outputs that look like probabilities are refused unless
  `declared` says what they are."""
  if declared not in OUTPUT_KINDS:
    raise SettingError(setting, f"unknown value {declared!r}; valid: {', '.join(OUTPUT_KINDS)}")
  if declared == "probabilities":
    stripped, how = without_softmax(model)
    if how:  # the structure says more than the setting: use the true logits
      return stripped, "logits", how + f" ({render(mention(setting, 'probabilities'))} not needed)"
    out = LogOf(name="log_probabilities")(model.outputs[0])
    return (keras.Model(model.inputs, out, name=model.name), "probabilities",
            f"{render(mention(setting, 'probabilities'))}: log-probabilities stand for the logits")
  stripped, how = without_softmax(model)
  if how:
    if declared == "logits":
      raise SettingError(setting, f"{path} ends in a softmax ({how}); it outputs "
                         f"probabilities, not logits: drop {mention(setting, 'logits')}")
    return stripped, "logits", how
  if declared == "logits":
    return model, "logits", render(mention(setting, "logits"))
  if looks_like_probabilities(probe, probe_shape):
    raise SettingError(setting, f"cannot tell what {path} outputs: no softmax layer can be "
                       "seen (e.g. a SavedModel or a subclassed model) and its outputs are "
                       "non-negative and sum to 1 like probabilities. Say it: "
                       f"{mention(setting, 'probabilities')} or {mention(setting, 'logits')}")
  return model, "logits", "no final softmax; outputs not probabilities"


def resolve_teacher(teacher: keras.Model, declared: str, hint_names, lwf_match, *,
                    input_shape=None):
  """The Python API's teacher (tfjac.Distiller(teacher_outputs=...)) under teacher_logits'
  rule: (the teacher returning logits, {"outputs": kind, "how": how}). `input_shape` (one
  example's, e.g. the student's) is used to probe a teacher whose own is not fully known.
  Errors (SettingError, a ValueError) name the argument teacher_outputs."""
  shape = tuple(getattr(teacher, "input_shape", None) or ())[1:]
  if not shape or any(d is None for d in shape):
    shape = tuple(input_shape or ())
  if not shape or any(d is None for d in shape):
    raise SettingError("teacher_outputs", f"cannot probe what the teacher {teacher.name!r} "
                       "outputs: its input shape is not known; pass "
                       f"{mention('teacher_outputs', 'logits')} or 'probabilities'")
  model, kind, how = teacher_logits(teacher, declared, teacher, shape, path="the teacher",
                                    setting="teacher_outputs")
  if kind == "probabilities":
    check_probability_hints(hint_names, lwf_match, "the teacher outputs probabilities",
                            setting="teacher_outputs")
  return model, {"outputs": kind, "how": how}


def probability_blockers(hint_names, lwf_match) -> List[str]:
  """Hints that need the teacher's logits themselves (not up to a per-example constant): they
  are refused with a teacher that outputs probabilities. kd, lwf (kd match), jac_ce, at, at_jac and
  the top-1 target are exact on log-probabilities; act, jac and noise are not."""
  from tfjac import hints  # pylint: disable=g-import-not-at-top
  bad = [n for n in hint_names if hints.HINTS[n].reads_teacher_logits]
  if "lwf" in hint_names and lwf_match == "act":
    bad.append("lwf (lwf_match=act)")
  return bad


def check_probability_hints(hint_names, lwf_match, what: str, setting=OUTPUTS_SETTING):
  """An error naming `setting` (what says the teacher's outputs) if a hint needs
  logits that a teacher outputting probabilities (`what`: how that is known) cannot give."""
  bad = probability_blockers(hint_names, lwf_match)
  if bad:
    raise SettingError(setting, f"{what}: {bad} need the teacher's logits (log-probabilities "
                       "differ from them by a per-example constant, which these hints do not "
                       "ignore: act on log-probabilities is not act on logits); valid with "
                       "probabilities: ce, kd, lwf (kd), jac_ce, at, at_jac")

