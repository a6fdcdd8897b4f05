"""Evaluation outside the fit's own validation: test metrics of a Distiller, accuracy under
input noise, and the validation batches and fixed subset that the fit validates on."""
from typing import Dict

import numpy as np
import tensorflow as tf

from tfjac import data as data_lib


def validation_pipeline(model, split, batch_size):
  """Validation batches; with a teacher, each carries the teacher's outputs for `model`'s
  hints (teacher_pass at step 0, what test_step would compute), computed once here: the
  teacher is frozen and validation never augments, so they are the same every epoch."""
  if model.teacher is None or (model.estimator != "backprop" and model.jacobian_hints):
    # The Jacobian estimators' probes are drawn per batch and replica (Distiller._seed): the
    # teacher's sketches must be taken in test_step beside the student's, with the same draws.
    return data_lib.pipeline(split, batch_size, training=False)
  from tfjac.training import teacher_cache as cache_lib  # pylint: disable=g-import-not-at-top
  extras = cache_lib.compute(model, split, batch_size)
  ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels, extras))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def validation_subset(split, examples, seed):
  """The fixed subset of `examples` validation examples (all when 0 or more than there are):
  a seeded choice, in split order, the same at every epoch."""
  if not examples or examples >= len(split):
    return split
  rng = np.random.default_rng([seed, 15])
  return split.take(np.sort(rng.choice(len(split), examples, replace=False)))


def evaluate(distiller, split, batch_size) -> Dict[str, float]:
  ds = data_lib.pipeline(split, batch_size, training=False)
  if not distiller.compiled:  # e.g. a loaded teacher that is only evaluated
    distiller.compile(jit_compile=False)
  return {k: float(np.asarray(v)) for k, v in
          distiller.evaluate(ds, verbose=0, return_dict=True).items()}


def accuracy_under_noise(model, split, sigmas, batch_size, seed=0) -> Dict[str, float]:
  """Test accuracy of `model` (inference mode) on x + N(0, sigma^2 I), for each sigma."""
  result = {}
  for j, sigma in enumerate(sigmas):
    correct = 0
    for i, (x, y) in enumerate(data_lib.pipeline(split, batch_size, training=False)):
      noise = tf.random.stateless_normal(tf.shape(x), seed=[seed, 1000 * j + i])
      logits = model(x + sigma * noise, training=False)
      correct += int(tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1, output_type=tf.int32),
                                                     tf.cast(y, tf.int32)), tf.int32)))
    result[f"{sigma:g}"] = correct / len(split)
  return result
