"""--mode=finetune: the fine-tuning oracle of the poster's transfer table. The teacher's own
network, initialised from its weights, with a new head for the target classes, fine-tuned on
the target data with CE. Needs a Keras teacher (.keras) that ends in a Dense layer."""
import keras
import numpy as np

from tfjac import teachers
from tfjac.errors import ConfigError
from tfjac.models import views
from tfjac.modes import common


def oracle_network(teacher: keras.Model, image_shape, num_classes, teacher_input, path,
                   adapt=None):
  """A copy of `teacher` with a new Dense head of `num_classes`, fed from the target images
  (by `adapt(network, name)`, teachers.Teacher.adapt, when given: family preprocessing)."""
  if any(type(layer).__name__ == "_SavedModelTeacher" for layer in teacher.layers):
    raise ConfigError("teacher", f"the fine-tuning oracle rebuilds the teacher with a new head "
                      f"and needs its layers: {path!r} is a SavedModel; give its .keras file")
  try:
    body = keras.models.clone_model(teacher)
    body.set_weights(teacher.get_weights())
    features = views.penultimate(body)
  except ValueError as e:
    raise ConfigError("teacher", f"cannot rebuild {path!r} with a new head: {e}") from e
  body.trainable = True
  for layer in body.layers:  # the clone keeps each layer's frozen flag from the loaded teacher
    layer.trainable = True
  head = keras.layers.Dense(num_classes, dtype="float32", name="oracle_logits")(features)
  # A single input tensor (not a list): the exported signature then takes one image batch.
  network = keras.Model(body.inputs[0], head, name="oracle")
  if adapt is not None:
    return adapt(network, "oracle")
  return views.adapt_input(network, image_shape, resize=teacher_input.resize,
                           scale=teacher_input.scale, offset=teacher_input.offset,
                           name="oracle")


def run(config, splits, strategy):
  info = splits.info
  with strategy.scope():
    loaded = teachers.load_teacher(config, info)
    teacher = loaded.network
    network = oracle_network(teacher, info.image_shape, info.num_classes, config.teacher_input,
                             config.teacher_path, adapt=loaded.adapt)
  initial = [np.array(w) for w in teacher.get_weights()]
  student = common.train_student(config, splits, strategy, teacher=None, student=network,
                                 architecture=f"oracle ({teacher.name})")
  return {"teacher": {"source": "given", "path": config.teacher_path,
                      "source_classes": int(teacher.output_shape[-1]),
                      "parameters_initialised_from_teacher": int(sum(w.size for w in initial))},
          "student": student}
