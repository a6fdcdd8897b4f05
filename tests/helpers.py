"""The tests' shared kit: small models whose Jacobians are known by hand, the suite's tiny
VGG, a runner of the command line, an image-folder writer, and the repository root."""
import contextlib
import os
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf
from absl import flags

from tfjac import flagdefs  # noqa: F401  (defines the flags parsed_flags parses)
from tfjac import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def linear_model(weights, bias=None, input_shape=(2, 2, 1), name="linear"):
  """logits = flatten(x) @ weights + bias: d logits[k] / d x = weights[:, k]."""
  weights = np.asarray(weights, np.float32)
  inputs = keras.Input(shape=input_shape, name="image")
  x = keras.layers.Flatten()(inputs)
  dense = keras.layers.Dense(weights.shape[1], name="logits")
  out = dense(x)
  model = keras.Model(inputs, out, name=name)
  dense.set_weights([weights, np.zeros(weights.shape[1], np.float32) if bias is None
                     else np.asarray(bias, np.float32)])
  return model


def finite_difference_gradient(loss, variable, eps=1e-6):
  """Central differences of the scalar `loss()` with respect to each entry of `variable`
  (a Keras variable, restored afterwards): an independent reference for tape gradients."""
  base = variable.numpy()
  numeric = np.zeros_like(base)
  for idx in np.ndindex(*base.shape):
    for sign in (1, -1):
      bumped = base.copy()
      bumped[idx] += sign * eps
      variable.assign(bumped)
      numeric[idx] += sign * float(loss()) / (2 * eps)
  variable.assign(base)
  return numeric


class TeacherCalled(Exception):
  """Raised by a teacher that forbid_teacher_calls has disabled."""


def forbid_teacher_calls(monkeypatch, distiller):
  """Any call of the distiller's teacher (or its view) from now on raises TeacherCalled."""
  def explode(*args, **kwargs):
    raise TeacherCalled

  monkeypatch.setattr(distiller.teacher_view, "call", explode)
  monkeypatch.setattr(distiller.teacher, "call", explode)


def tiny_vgg(info, name=None, **options):
  """The suite's tiny network: VGG-4 at width 0.25 for the dataset `info` describes (its
  image shape, classes, mean and std). name: the model's name (default "vgg4"); options go to
  models.build (sync_bn=True, ...). Seed with keras.utils.set_random_seed before building."""
  return models.build("vgg4", info.image_shape, info.num_classes, mean=info.mean, std=info.std,
                      width=0.25, model_name=name, **options)


@contextlib.contextmanager
def parsed_flags(*argv):
  """The command line in this process: tfjac's flags parsed from argv inside the block (read
  them with run.config_from_flags()), unparsed after it so the next test starts clean."""
  flags.FLAGS(["tfjac", *argv])
  try:
    yield
  finally:
    flags.FLAGS.unparse_flags()


def cli_env(**extra):
  """The environment of a child process: this one's, with this checkout first on PYTHONPATH
  (the child imports the tfjac under test) and TensorFlow's C++ logs off; `extra` on top."""
  env = dict(os.environ)
  env.update(TF_CPP_MIN_LOG_LEVEL="3",
             PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def cli_command(*argv, tool=None):
  """`python -m tfjac.run ARGV`, or `python tools/<tool>.py ARGV`."""
  entry = ["-m", "tfjac.run"] if tool is None else [os.path.join(REPO, "tools", f"{tool}.py")]
  return [sys.executable, *entry, *argv]


def run_cli(*argv, tool=None, env=None, cwd=REPO, timeout=600, check=False):
  """Runs the command line (see cli_command) to its end in a child process and returns the
  subprocess.CompletedProcess, stdout and stderr as text. env: cli_env() unless given.
  check: the run must exit 0 (else the assertion shows the end of its stderr)."""
  result = subprocess.run(cli_command(*argv, tool=tool), cwd=cwd,
                          env=cli_env() if env is None else env, capture_output=True,
                          text=True, timeout=timeout, check=False)
  if check:
    assert result.returncode == 0, result.stderr[-3000:]
  return result


def start_cli(*argv, env=None, cwd=REPO, stdout=None, stderr=None):
  """Starts `python -m tfjac.run ARGV` in a child process and returns its subprocess.Popen
  without waiting (give stdout/stderr files: a full pipe would block the child)."""
  return subprocess.Popen(cli_command(*argv), cwd=cwd, env=cli_env() if env is None else env,
                          stdout=stdout, stderr=stderr)


def write_png(path, size=(8, 8), channels=3, seed=0):
  """One random PNG image of `size` (height, width) at path, folders made as needed. seed: an
  int or a numpy Generator (whose stream it draws from)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  image = np.random.default_rng(seed).integers(0, 256, (*size, channels), dtype=np.uint8)
  tf.io.write_file(path, tf.io.encode_png(image))


def write_image_folder(root, classes=("ant", "bee", "cat"), per_class=(3, 1), size=(8, 8)):
  """An image-folder dataset: root/{train,test}/<class>/<i>.png, per_class = (train, test)
  random colour images of `size` per class, all different, the same on every call. Returns
  str(root)."""
  rng = np.random.default_rng(0)
  for split, n in zip(("train", "test"), per_class):
    for c in classes:
      for i in range(n):
        write_png(os.path.join(root, split, c, f"{i}.png"), size=size, seed=rng)
  return str(root)
