"""Bad input: a clear error naming the flag or file, before any long work."""
import types

import keras
import numpy as np
import pytest

from tfjac import export, run
from tfjac.config import Config, TeacherConfig
from tfjac.errors import ConfigError
from tfjac.models import teachers
from tests import helpers

def _config_error(*argv):
  with helpers.parsed_flags(*argv):
    with pytest.raises(ConfigError) as info:
      run.run(run.config_from_flags())
  return str(info.value)


@pytest.mark.parametrize("argv, expected", [
    (["--hints=act,jacobian"], "--hints: unknown value 'jacobian'; valid: act, at, at_jac, ce, jac, jac_ce, jacnorm, kd, lwf, noise, noisy_ce"),
    (["--hints=ce,ce"], "--hints: lists a hint twice"),
    (["--dataset=mnist"], "--dataset: unknown dataset 'mnist'"),
    (["--epochs=0"], "--epochs: must be > 0"),
    (["--teacher_epochs=-3"], "--teacher_epochs: must be > 0"),
    (["--batch_size=-1"], "--batch_size: must be > 0"),
    (["--jac_weight=0"], "--jac_weight: must be > 0"),
    (["--act_weight=-1"], "--act_weight: must be > 0"),
    (["--learning_rate=0"], "--learning_rate: must be > 0"),
    (["--samples_per_class=-5"], "--samples_per_class: must be >= 0"),
    (["--width=0"], "--width: must be > 0"),
    (["--lr_schedule=step"], "--lr_decay_epochs: --lr_schedule=step needs"),
    (["--samples_per_class=500"], "smallest class: 110 examples"),
    (["--teacher=/no/such/teacher.keras"], "--teacher: '/no/such/teacher.keras' does not exist"),
    (["--hints=noise,ce", "--noise_sigma=0"], "--noise_sigma: must be > 0 for the hint(s) noise"),
    (["--mode=regularize", "--noise_sigma=-1"], "--noise_sigma: must be > 0 for the hint(s) "
     "jacnorm"),
    (["--hints=jac_ce", "--jac_target=projection"], "--jac_target: 'projection' is not a class"),
    (["--jac_target=top_k", "--jac_top_k=11"], "--jac_top_k: 11 is more than the dataset's 10"),
    (["--mode=regularize", "--hints=act,ce"], "--hints: --mode=regularize has no teacher, but "
     "['act'] need one; valid: ce, jacnorm, noisy_ce"),
    (["--noise_samples=0", "--hints=noise"], "--noise_samples: must be > 0"),
    (["--robustness_sigmas=0.1,-2"], "--robustness_sigmas: must be > 0"),
])
def test_bad_flags(tmp_path, argv, expected):
  message = _config_error(f"--workdir={tmp_path}", *argv)
  assert expected in message


def test_unwritable_workdir(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  assert "--workdir: run directory" in _config_error(f"--workdir={blocker}/run")


def test_teacher_that_is_not_a_model(tmp_path):
  bogus = tmp_path / "teacher.keras"
  bogus.write_text("garbage")
  assert "--teacher: cannot load a model from" in _config_error(
      f"--workdir={tmp_path}", f"--teacher={bogus}")


def _tiny_model(input_shape, classes):
  inputs = keras.Input(input_shape)
  return keras.Model(inputs, keras.layers.Dense(classes)(keras.layers.Flatten()(inputs)))


@pytest.mark.parametrize("shape, classes, expected", [
    ((8, 8, 1), 3, "gives outputs of shape (3,) but the dataset has 10 classes"),
    ((32, 32, 3), 10, "--teacher_resize: the teacher takes 32x32 images and the dataset has 8x8"),
])
def test_teacher_that_does_not_fit_the_dataset(tmp_path, shape, classes, expected):
  path = str(tmp_path / "t.keras")
  _tiny_model(shape, classes).save(path)
  assert expected in _config_error(f"--workdir={tmp_path}", f"--teacher={path}")


def test_savedmodel_teacher_is_loaded_and_differentiable(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  model = _tiny_model((8, 8, 1), 10)
  export.export_model(model, str(tmp_path / "t"), np.zeros((2, 8, 8, 1), np.float32))
  config = Config(teacher=TeacherConfig(path=str(tmp_path / "t" / "saved_model")))
  teacher = teachers.load_teacher(config, types.SimpleNamespace(image_shape=(8, 8, 1)),
                                  num_classes=10).adapted
  x = tf.constant(np.random.default_rng(0).random((2, 8, 8, 1), np.float32))
  with tf.GradientTape() as tape:
    tape.watch(x)
    out = teacher(x)[:, 3]
  np.testing.assert_allclose(tf.reshape(tape.gradient(out, x), [2, -1])[0],
                             model.layers[-1].kernel.numpy()[:, 3], rtol=1e-5)


@pytest.mark.parametrize("argv, expected", [
    (["--mode=finetun"], "flag --mode=finetun: value should be one of <teacher|distill|"
     "regularize|transfer|finetune|conditions>"),
    (["--flagfile=flags/no_such_experiment.cfg"], "no_such_experiment.cfg"),
    (["--hints=act,jacobian"], "tfjac: error: --hints: unknown value 'jacobian'"),
    (["--dataset=cifar100", "--data_dir=/nonexistent"],
     "tfjac: error: Dataset 'cifar100' is not prepared in /nonexistent"),
])
def test_command_line_errors_are_one_message_not_a_trace(tmp_path, argv, expected):
  result = helpers.run_cli(f"--workdir={tmp_path}/run", *argv, timeout=300)
  assert result.returncode != 0
  assert expected in result.stderr
  assert "Traceback" not in result.stderr
