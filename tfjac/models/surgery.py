"""Model surgery: the fine-tuning oracle's network (a teacher with a new head) and the check
that it starts from the teacher's values."""
import keras
import numpy as np

from tfjac.errors import SettingError, TfjacError
from tfjac.models import views
from tfjac.models.layers import all_layers


def oracle_network(teacher: keras.Model, image_shape, num_classes, teacher_input, path,
                   adapt=None):
  """A copy of `teacher` with a new Dense head of `num_classes`, fed from the target images
  (by `adapt(network, name)`, models.teachers.Teacher.adapt, when given: family preprocessing)."""
  if any(type(layer).__name__ == "_SavedModelTeacher" for layer in teacher.layers):
    raise SettingError("teacher.path", f"the fine-tuning oracle rebuilds the teacher with a new "
                       f"head and needs its layers: {path!r} is a SavedModel; give its .keras file")
  try:
    body = keras.models.clone_model(teacher)
    body.set_weights(teacher.get_weights())
    features = views.penultimate(body)
  except ValueError as e:
    raise SettingError("teacher.path", f"cannot rebuild {path!r} with a new head: {e}") from e
  body.trainable = True
  for layer in body.layers:  # the clone keeps each layer's frozen flag from the loaded teacher
    layer.trainable = True
  head = keras.layers.Dense(num_classes, dtype="float32", name="oracle_logits")(features)
  # A single input tensor (not a list): the exported signature then takes one image batch.
  network = keras.Model(body.inputs[0], head, name="oracle")
  initialised_from_teacher(teacher, network)
  if adapt is not None:
    return adapt(network, "oracle")
  return views.adapt_input(network, image_shape, resize=teacher_input.resize,
                           scale=teacher_input.scale, offset=teacher_input.offset,
                           name="oracle")


def initialised_from_teacher(teacher: keras.Model, network: keras.Model):
  """Checks that every layer of `teacher` but its final Dense (the head the oracle replaces)
  holds, in the layer of the same name in `network`, exactly the teacher's values: trainable
  weights and BatchNorm statistics alike. Returns {"layers", "parameters"} checked; raises
  TfjacError naming the first layer whose values differ or that is missing."""
  by_name = {}
  for layer in all_layers(network):  # through the input adapter's nesting
    by_name.setdefault(layer.name, layer)
  layers = parameters = 0
  for layer in teacher.layers[:-1]:
    expected = layer.get_weights()
    if not expected:
      continue
    twin = by_name.get(layer.name)
    if twin is None:
      raise TfjacError(f"fine-tuning oracle: the teacher's layer {layer.name!r} has no "
                       f"counterpart in {network.name}")
    got = twin.get_weights()
    if len(got) != len(expected) or not all(
        g.shape == e.shape and np.array_equal(g, e) for g, e in zip(got, expected)):
      raise TfjacError(f"fine-tuning oracle: layer {layer.name!r} does not hold the teacher's "
                       "weights after initialisation")
    layers += 1
    parameters += sum(int(e.size) for e in expected)
  return {"layers": layers, "parameters": parameters}
