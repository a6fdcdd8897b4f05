"""The main job on the embedded dataset, from the command line, and what it leaves behind."""
import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorboard.backend.event_processing import event_accumulator

from tfjac import data, export, run
from tfjac.config import DataConfig, TrainConfig
from tfjac.errors import NonFiniteLossError
from tfjac.training import loop
from tfjac.training.distiller import Distiller
from tests import helpers

TINY = ["--samples_per_class=5", "--epochs=3", "--teacher_epochs=2", "--width=0.25",
        "--teacher_width=0.25", "--batch_size=64"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  result = helpers.run_cli("--mode=distill", f"--workdir={workdir}", *TINY, check=True)
  return workdir, result.stdout


def _scalars(directory):
  acc = event_accumulator.EventAccumulator(directory,
                                           size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  return {tag: [float(tf.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)]
          for tag in acc.Tags()["tensors"]}


def test_summary_and_results(run_dir):
  workdir, stdout = run_dir
  assert "teacher: test accuracy" in stdout and "student vgg4 (act,jac,ce; 50 training" in stdout
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["teacher"]["source"] == "trained"
  for role in ("teacher", "student"):
    assert 0.0 <= results[role]["test_accuracy"] <= 1.0
  final = results["student"]["final_epoch_metrics"]
  for key in ("loss", "ce_loss", "act_loss", "jac_loss", "val_accuracy", "val_jac_loss"):
    assert np.isfinite(final[key]), key
  assert results["config"]["hints"]["hints"] == ["act", "jac", "ce"]
  assert results["total_seconds"] > 0 and results["student"]["train_seconds"] > 0


@pytest.mark.parametrize("candidate", ["given", "alternative"])
def test_tensorboard_has_every_term(run_dir, candidate):
  workdir, _ = run_dir  # the main job chooses on validation: each fit logs apart
  logs = os.path.join(workdir, "candidates", candidate, "tensorboard", "student")
  train = _scalars(os.path.join(logs, "train"))
  for tag in ("epoch_loss", "epoch_ce_loss", "epoch_act_loss", "epoch_jac_loss",
              "epoch_accuracy", "epoch_teacher_jac_norm", "epoch_student_jac_norm"):
    assert len(train.get(tag, [])) == 3, (tag, sorted(train))
  validation = _scalars(os.path.join(logs, "validation"))
  for tag in ("epoch_accuracy", "epoch_jac_loss", "epoch_loss"):
    assert len(validation.get(tag, [])) == 3, (tag, sorted(validation))


def test_saved_model_serves_the_student_alone(run_dir):
  workdir, _ = run_dir
  splits = data.prepare(DataConfig())
  x = splits.test.images[:32]
  student = keras.saving.load_model(os.path.join(workdir, "student", export.KERAS_FILE))
  served = tf.saved_model.load(os.path.join(workdir, "student", export.SAVED_MODEL))
  np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(),
                             student(x, training=False).numpy(), atol=1e-5)
  sig = served.signatures["serving_default"]
  assert list(sig(image=tf.constant(x)).values())[0].shape == (32, 10)
  saved = tf.train.list_variables(os.path.join(workdir, "student", "saved_model", "variables",
                                               "variables"))
  n_saved = sum(int(np.prod(shape)) for name, shape in saved if "OPTIMIZER" not in name
                and name.startswith("variables/"))
  assert n_saved == sum(int(np.prod(w.shape)) for w in student.weights)


def test_rerun_from_flagfile_reuses_the_teacher(run_dir):
  workdir, _ = run_dir
  flagfile = os.path.join(workdir, "flags.cfg")
  with helpers.parsed_flags(f"--flagfile={flagfile}"):
    config = run.config_from_flags()
  with open(os.path.join(workdir, "results.json")) as f:
    recorded = json.load(f)["config"]
  # results.json records the precision the run used: --mixed_precision=auto (the default), as
  # the flagfile keeps it, resolved on this machine's CPU.
  assert config.mixed_precision == "auto"
  assert recorded["mixed_precision"] in ("float32", "mixed_bfloat16")
  config = dataclasses.replace(config, mixed_precision=recorded["mixed_precision"])
  assert json.loads(json.dumps(config.to_dict())) == recorded
  helpers.run_cli(f"--flagfile={flagfile}", "--hints=ce", "--epochs=1", check=True)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  assert results["teacher"]["source"] == "reused"
  assert results["config"]["hints"]["hints"] == ["ce"]


def test_nan_in_a_term_stops_naming_it_and_keeps_the_checkpoint(tmp_path, digits_splits):
  info = digits_splits.info
  student, teacher = helpers.tiny_vgg(info), helpers.tiny_vgg(info)
  small = digits_splits.sampled_train(3, 0)
  dirs = loop.FitDirs(str(tmp_path / "tb"), str(tmp_path / "ck"))
  loop.fit(Distiller(student, teacher, hints=[("act", 1.0), ("ce", 1.0)]), small,
           digits_splits.validation, TrainConfig(epochs=1), dirs)
  good = student.get_weights()
  teacher.get_layer("logits").kernel.assign(np.full(teacher.get_layer("logits").kernel.shape,
                                                    np.nan, np.float32))
  with pytest.raises(NonFiniteLossError, match="'act_loss' became nan at epoch 1, step 1"):
    loop.fit(Distiller(student, teacher, hints=[("act", 1.0), ("ce", 1.0)]), small,
             digits_splits.validation, TrainConfig(epochs=2), dirs)
  student.load_weights(str(tmp_path / "ck" / "last.weights.h5"))
  for a, b in zip(student.get_weights(), good):
    np.testing.assert_array_equal(a, b)


def test_a_teacher_made_with_other_settings_is_not_reused(tmp_path):
  """The run directory's teacher is reused only under the teacher settings its model.json
  records; each differing one is named with both values, with the two ways out."""
  import dataclasses
  import types
  from tfjac.config import Config, HintConfig, ModelConfig, TeacherConfig
  from tfjac import checks
  from tfjac.errors import ConfigError, SettingError
  from tfjac.modes import common
  splits = types.SimpleNamespace(info=types.SimpleNamespace(
      name="digits", image_shape=(8, 8, 1), num_classes=10))
  teacher = TeacherConfig(model=ModelConfig("vgg9", 0.25), train=TrainConfig(epochs=2))
  base = Config(teacher=teacher, data=DataConfig(samples_per_class=5))
  meta = json.loads(json.dumps(common.network_metadata(base, base.teacher.model, splits,
                                                       "teacher")))
  # What the student alone uses does not matter.
  for same in (dataclasses.replace(base, data=DataConfig(samples_per_class=50)),
               dataclasses.replace(base, train=TrainConfig(epochs=7, learning_rate=0.1),
                                   hints=HintConfig(hints=("ce",)))):
    common.check_reusable_teacher(same, meta, "w/teacher")
  for changed, named in [
      (dataclasses.replace(base, teacher=dataclasses.replace(
          teacher, model=ModelConfig("vgg4", 0.25))), "--teacher_model=vgg4 here"),
      (dataclasses.replace(base, teacher=dataclasses.replace(
          teacher, model=ModelConfig("vgg9", 1.0))),
       "--teacher_width=1.0 here, 0.25 for the teacher"),
      (dataclasses.replace(base, teacher=dataclasses.replace(
          teacher, train=TrainConfig(epochs=3))),
       "--teacher_epochs=3 here, 2 for the teacher"),
      (dataclasses.replace(base, data=DataConfig(samples_per_class=5, seed=1)),
       "--seed=1 here, 0 for the teacher"),
      (dataclasses.replace(base, teacher=dataclasses.replace(
          teacher, model=ModelConfig("vgg9", 0.25, weights="init.weights.h5"))),
       "--teacher_model_weights=init.weights.h5 here, None for the teacher"),
  ]:
    with pytest.raises(ConfigError, match="--workdir: .* made with other settings") as e, \
         checks.flag_errors():  # a command-line run: flags
      common.check_reusable_teacher(changed, meta, "w/teacher")
    assert named in str(e.value) and "another --workdir" in str(e.value), str(e.value)
    assert "--teacher=w/teacher" in str(e.value)
    with pytest.raises(SettingError, match="^workdir: .* made with other settings") as e:
      common.check_reusable_teacher(changed, meta, "w/teacher")  # Python: the settings
    assert "--" not in str(e.value) and "teacher.path='w/teacher'" in str(e.value)
  old = {k: v for k, v in meta.items() if k != "teacher_settings"}  # an older tfjac's
  with pytest.raises(SettingError, match="records no teacher settings"):
    common.check_reusable_teacher(base, old, "w/teacher")


def test_a_rerun_with_another_teacher_width_is_refused(run_dir):
  workdir, _ = run_dir
  result = helpers.run_cli("--mode=distill", f"--workdir={workdir}", *TINY[:-2],
                           "--teacher_width=0.5", "--batch_size=64")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "--teacher_width=0.5 here, 0.25 for the teacher" in result.stderr
