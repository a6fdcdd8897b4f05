"""Students from outside tfjac's builders: a keras.applications body with a new head, or a .keras
file as saved; standard BatchNormalization made Jacobian-safe."""
import os

import keras
import numpy as np
from absl import logging

from tfjac.errors import SettingError
from tfjac.models.layers import convert_batchnorm
from tfjac.models.outputs import without_softmax
from tfjac.models.preprocessing import own_preprocessing
from tfjac.models.sources import (APPLICATIONS_PREFIX, check_application, load_network,
                                  load_weights, needs_size)


def build_student(name: str, image_shape, num_classes, *, mean, std, weights="",
                  model_name="student", safe_mode=True, setting="student") -> keras.Model:
  """`name` keras.applications:NAME (its body, include_top=False with global average
  pooling, on the dataset's standardised pixels, plus a Dense head named 'logits'; random
  init or the weights file `weights`) or FILE.keras (as saved; it must take the dataset's
  images and give num_classes outputs). Standard BatchNorm is converted (logged). Errors name
  the settings <setting>.name and <setting>.weights: `setting` is the network's ModelConfig
  in Config ('student', or 'teacher.model' for a teacher built and trained here)."""
  if name.startswith(APPLICATIONS_PREFIX):
    app = check_application(f"{setting}.name", name)
    inputs = keras.Input(shape=tuple(image_shape), name="image")
    kwargs = {}
    if own_preprocessing(app) == "always":
      # EfficientNet (B0-B7) rescales and normalises inside, with no switch to turn it off:
      # it gets the 0-255 pixels it expects (standardised pixels would reach its first
      # convolution as a near-constant image after its own /255 and ImageNet normalisation).
      x = keras.layers.Rescaling(255.0, name="pixels255")(inputs)
    else:
      x = keras.layers.Normalization(mean=np.asarray(mean, np.float32),
                                     variance=np.square(np.asarray(std, np.float32)),
                                     name="standardize")(inputs)
      if own_preprocessing(app) == "switch":
        kwargs["include_preprocessing"] = False  # fed standardised pixels already
    if image_shape[-1] == 1:
      x = keras.layers.Concatenate(name="grey_to_rgb")([x, x, x])
    try:
      body = getattr(keras.applications, app)(include_top=False, weights=None, input_tensor=x,
                                              pooling="avg", **kwargs)
    except ValueError as e:
      raise SettingError(f"{setting}.name", f"keras.applications.{app} cannot take the dataset's "
                         f"{tuple(image_shape)} images{needs_size(app)}: {e}") from e
    logits = keras.layers.Dense(num_classes, dtype="float32", name="logits")(body.output)
    model = keras.Model(inputs, logits, name=model_name)
    if weights:
      load_weights(model, weights, f"{setting}.weights", f"the {model_name} {name}")
  else:
    if not os.path.exists(name):
      raise SettingError(f"{setting}.name", f"{name!r} does not exist; valid: a built-in name, "
                         f"{APPLICATIONS_PREFIX}NAME or a .keras file")
    model = load_network(name, image_shape, safe_mode=safe_mode, setting=f"{setting}.name",
                         unsafe_setting=None, saved_model=False)
    if not isinstance(model, keras.Model) or not getattr(model, "outputs", None):
      raise SettingError(f"{setting}.name", f"{name!r} is not a Functional Keras model")
    if weights:
      load_weights(model, weights, f"{setting}.weights", f"the {model_name} {name}")
    try:
      out = model(np.zeros((1, *image_shape), np.float32), training=False)
    except Exception as e:
      raise SettingError(f"{setting}.name", f"{name!r} cannot take the dataset's images of shape "
                         f"{tuple(image_shape)}: {e}") from e
    if tuple(out.shape) != (1, num_classes):
      raise SettingError(f"{setting}.name", f"{name!r} gives outputs of shape "
                         f"{tuple(out.shape[1:])}; the dataset has {num_classes} classes")
    model.trainable = True
    model, how = without_softmax(model)
    if how:
      logging.info("student %s: %s (tfjac trains on logits)", name, how)
  model, n = convert_batchnorm(model)
  if n:
    logging.info("student %s: %d standard BatchNormalization layer(s) converted to "
                 "JacobianSafeBatchNorm with their weights (per-example Jacobians under "
                 "jac_bn_policy=batch_stats)", name, n)
  return model
