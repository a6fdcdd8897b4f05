"""Fault injection: what a kill -9, a NaN, a corrupt image or an unsafe teacher file does to a
run. Marked `faults` (python -m pytest -q -m faults); all of it runs in well under two minutes.

Kills are real SIGKILLs of real processes: the CLI run is killed when its backup shows the
point we want, and the export is killed from inside at a chosen stage (a wrapper around one
call sends SIGKILL to its own process), so nothing gets a chance to clean up.
"""
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfjac import checks, data, export, hints, run
from tfjac.config import (Config, DataConfig, HintConfig, ModelConfig, TeacherConfig,
                          TrainConfig)
from tfjac.errors import ConfigError, DataError, NonFiniteLossError, SettingError
from tfjac.models import teachers
from tfjac.training import loop
from tfjac.training import resume as resume_lib
from tfjac.training.distiller import Distiller
from tests import helpers


def _load_teacher(path, shape, num_classes, safe_mode=True):
  """The teacher at `path` as a run loads it (teachers.load_teacher), fed `shape` images."""
  config = Config(teacher=TeacherConfig(path=path, unsafe_loading=not safe_mode))
  return teachers.load_teacher(config, types.SimpleNamespace(image_shape=shape),
                               num_classes=num_classes).adapted

pytestmark = pytest.mark.faults

# A run whose two fits (teacher: 2 x 36 steps, student: 3 x 7 steps) last a few seconds each,
# with backups every 2 steps, augmentation on, so that order and augmentation are both tested.
RUN = ["--samples_per_class=20", "--epochs=3", "--teacher_epochs=2", "--teacher_model=vgg4",
       "--width=0.25", "--teacher_width=0.25", "--batch_size=32", "--backup_every_steps=2",
       "--augment=crop,flip"]


def _start(workdir, log):
  """The run in a child process; its output goes to files (a full pipe would block it)."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
    return helpers.start_cli(f"--workdir={workdir}", *RUN, stdout=out, stderr=err)


def _tail(log):
  with open(f"{log}.err") as f:
    return f.read()[-3000:]


def _kill_when(workdir, role, reached, log, candidate=None):
  """Starts the run, SIGKILLs it once <role>'s backup (of `candidate`'s fit, with
  choose_on_validation) satisfies reached(state)."""
  proc = _start(workdir, log)
  fit_dir = os.path.join(workdir, "candidates", candidate) if candidate else workdir
  path = os.path.join(fit_dir, "checkpoints", role, resume_lib.BACKUP_DIR,
                      resume_lib.STATE_FILE)
  deadline, state = time.time() + 300, None
  while proc.poll() is None and time.time() < deadline:
    try:
      with open(path) as f:
        state = json.load(f)
    except (OSError, ValueError):
      state = None
    if state and reached(state):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.02)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, f"not killed mid-{role}:\n{_tail(log)}"
  return state


def _finish(workdir, log):
  proc = _start(workdir, log)
  assert proc.wait(timeout=300) == 0, _tail(log)
  with open(f"{log}.out") as f:
    stdout = f.read()
  with open(os.path.join(workdir, "results.json")) as f:
    return stdout, json.load(f)


def _student_weights(workdir):
  model = keras.saving.load_model(os.path.join(workdir, "student", export.KERAS_FILE))
  return model.get_weights()


def test_kill_during_training_then_rerun_gives_the_uninterrupted_result(tmp_path):
  reference, killed, logs = (str(tmp_path / d) for d in ("reference", "killed", "logs"))
  _, expected = _finish(reference, f"{logs}/reference")

  # Mid-epoch in the teacher's second epoch, then mid-epoch in the second or third epoch of
  # the student's second candidate (choose_on_validation's default: the first one finished).
  at = _kill_when(killed, "teacher", lambda s: s["epoch"] == 1 and s["step"] > 0,
                  f"{logs}/kill1")
  assert not os.path.exists(os.path.join(killed, "teacher", export.KERAS_FILE))
  at_student = _kill_when(killed, "student", lambda s: s["epoch"] >= 1 and s["step"] > 0,
                          f"{logs}/kill2", candidate="alternative")
  assert at["step"] > 0 and at_student["step"] > 0
  stdout, got = _finish(killed, f"{logs}/rerun")

  assert "chosen on validation" in stdout
  resumed = {c["name"]: c["resumed_from"] for c in got["student"]["choice"]["candidates"]}
  assert resumed["alternative"]["steps_done"] > 0  # continued mid-epoch
  assert resumed["given"]["epochs_done"] == 3  # finished before the kill: not trained again
  assert got["teacher"]["source"] == "reused"
  assert got["student"]["choice"] == dict(expected["student"]["choice"],
                                          candidates=got["student"]["choice"]["candidates"])
  for a, b in zip(got["student"]["choice"]["candidates"],
                  expected["student"]["choice"]["candidates"]):
    for key in ("best_val_accuracy", "test_accuracy", "best_epoch"):
      assert a[key] == b[key], (a["name"], key)
  # Bit for bit: same data order and augmentation from (seed, epoch, step), same optimizer
  # state and metric totals from the backup, deterministic CPU kernels.
  for a, b in zip(_student_weights(reference), _student_weights(killed)):
    np.testing.assert_array_equal(a, b)
  assert got["student"]["test_accuracy"] == expected["student"]["test_accuracy"]
  assert got["teacher"]["test_accuracy"] == expected["teacher"]["test_accuracy"]
  for key in ("best_epoch", "epochs_run", "best_val_accuracy", "final_epoch_metrics"):
    assert got["student"][key] == expected["student"][key], key
  # The run is complete: its backups are gone, so the next run starts afresh.
  for fit_dir in (os.path.join(killed, "candidates", c) for c in ("given", "alternative")):
    assert not os.path.exists(os.path.join(fit_dir, "checkpoints", "student", "backup"))
  assert not os.path.exists(os.path.join(killed, "checkpoints", "teacher", "backup"))


# --- kill during export ----------------------------------------------------------------------

_EXPORT_CHILD = textwrap.dedent("""
    import os, signal, sys
    import numpy as np, keras
    from tfjac import export
    directory, stage = sys.argv[1], sys.argv[2]
    keras.utils.set_random_seed(1)
    inputs = keras.Input((8, 8, 1), name="image")
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
    model.layers[-1].kernel.assign(np.full((64, 10), 2.0, np.float32))  # the new version
    die = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
    if stage == "writing":  # the SavedModel written, the .keras file not yet: mid-staging
      keras.Model.save = die
    else:  # the two-rename swap (no renameat2), killed between its renames
      export._EXCHANGE = None
      replace = os.replace
      def replace_then_die(src, dst):
        replace(src, dst)
        if os.path.abspath(src) == os.path.abspath(directory):
          die()
      os.replace = replace_then_die
    export.export_model(model, directory, np.zeros((2, 8, 8, 1), np.float32))
""")


def _exported_model(value):
  inputs = keras.Input((8, 8, 1), name="image")
  model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(inputs)))
  model.layers[-1].kernel.assign(np.full((64, 10), value, np.float32))
  return model


def _assert_holds_version(directory, value):
  x = np.ones((1, 8, 8, 1), np.float32)
  expected = 64 * value
  served = tf.saved_model.load(os.path.join(directory, export.SAVED_MODEL))
  np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, rtol=1e-6)
  reloaded = keras.saving.load_model(os.path.join(directory, export.KERAS_FILE))
  np.testing.assert_allclose(reloaded(x).numpy(), expected, rtol=1e-6)


def _leftovers(directory):
  parent, name = os.path.split(directory)
  return sorted(f for f in os.listdir(parent) if f.startswith(f".{name}."))


def test_kill_during_export_leaves_the_previous_export_loadable(tmp_path):
  directories = {stage: str(tmp_path / stage / "student") for stage in ("writing", "swap")}
  for directory in directories.values():
    export.export_model(_exported_model(1.0), directory, np.zeros((2, 8, 8, 1), np.float32))
  children = {stage: subprocess.Popen([sys.executable, "-c", _EXPORT_CHILD, d, stage],
                                      cwd=helpers.REPO, env=helpers.cli_env(),
                                      stderr=subprocess.PIPE, text=True)
              for stage, d in directories.items()}
  for stage, child in children.items():
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL, f"{stage}: {stderr[-2000:]}"

  # Killed while writing: the previous export is in place; a staging directory is left over.
  writing = directories["writing"]
  _assert_holds_version(writing, 1.0)
  assert _leftovers(writing) and all(".tmp-" in f for f in _leftovers(writing))
  # Killed inside a non-atomic swap: the previous export sits aside until the next reader or
  # exporter puts it back (load_teacher, obtain_teacher and export_model all do).
  swap = directories["swap"]
  assert not os.path.exists(swap)
  teacher = _load_teacher(swap, (8, 8, 1), 10)
  np.testing.assert_allclose(teacher(np.ones((1, 8, 8, 1), np.float32)).numpy(), 64.0, rtol=1e-6)
  _assert_holds_version(swap, 1.0)
  # The next export succeeds and clears every leftover.
  for directory in directories.values():
    export.export_model(_exported_model(3.0), directory, np.zeros((2, 8, 8, 1), np.float32))
    _assert_holds_version(directory, 3.0)
    assert _leftovers(directory) == []


def test_failed_export_and_failed_results_write_leave_the_old_files(tmp_path, monkeypatch):
  directory = str(tmp_path / "student")
  export.export_model(_exported_model(1.0), directory, np.zeros((2, 8, 8, 1), np.float32))
  results = str(tmp_path / "results.json")
  export.atomic_write_json(results, {"version": 1})

  def broken(*args, **kwargs):
    raise OSError("disk full (injected)")

  monkeypatch.setattr(keras.Model, "save", broken)
  with pytest.raises(OSError, match="injected"):
    export.export_model(_exported_model(2.0), directory, np.zeros((2, 8, 8, 1), np.float32))
  monkeypatch.setattr(json, "dumps", broken)
  with pytest.raises(OSError, match="injected"):
    export.atomic_write_json(results, {"version": 2})
  monkeypatch.undo()
  _assert_holds_version(directory, 1.0)
  assert _leftovers(directory) == []
  with open(results) as f:
    assert json.load(f) == {"version": 1}
  assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")] == []


# --- NaN in one loss term --------------------------------------------------------------------

class _Poison(keras.callbacks.Callback):
  """Multiplies one hint's loss by NaN from (epoch, batch) on: the injected fault."""

  def __init__(self, scale, epoch, batch):
    super().__init__()
    self.scale, self.at = scale, (epoch, batch)

  def on_epoch_begin(self, epoch, logs=None):
    self._epoch = epoch

  def on_train_batch_begin(self, batch, logs=None):
    if (self._epoch, batch) == self.at:
      self.scale.assign(float("nan"))


def test_nan_in_one_term_names_it_keeps_the_last_good_state_and_resumes(tmp_path, monkeypatch,
                                                                       digits_splits):
  scale = tf.Variable(1.0, trainable=False)
  act = hints.HINTS["act"]
  monkeypatch.setitem(hints.HINTS, "act", dataclasses.replace(
      act, loss=lambda i, p: act.loss(i, p) * scale))
  info = digits_splits.info

  def distiller():
    keras.utils.set_random_seed(3)
    student, teacher = helpers.tiny_vgg(info), helpers.tiny_vgg(info)
    return Distiller(student, teacher, hints=[("act", 1.0), ("ce", 1.0)])

  small = digits_splits.sampled_train(5, 0)  # 50 images: 4 steps of 16
  cfg = TrainConfig(epochs=3, batch_size=16, backup_every_steps=1)
  ck = str(tmp_path / "ck")
  dirs = loop.FitDirs(str(tmp_path / "tb"), ck, resume=True, settings={"run": "nan"})
  poisoned = distiller()
  with pytest.raises(NonFiniteLossError, match=r"loss term 'act_loss' became nan at epoch 2, "
                     r"step 3; training stopped"):
    loop.fit(poisoned, small, digits_splits.validation, cfg,
             dirs, extra_callbacks=[_Poison(scale, epoch=1, batch=2)])
  assert not all(np.isfinite(w).all() for w in poisoned.student.get_weights())  # in memory
  # On disk: the best checkpoint of epoch 1 and the backup after epoch 2, step 2 are finite.
  state = resume_lib.read(os.path.join(ck, "backup"), {"run": "nan"})
  assert (state.epoch, state.step) == (1, 2)
  with np.load(os.path.join(ck, "backup", state.state["arrays"])) as f:
    assert all(np.isfinite(f[k]).all() for k in f.files)
  best = distiller().student
  best.load_weights(os.path.join(ck, "best.weights.h5"))
  assert all(np.isfinite(w).all() for w in best.get_weights())

  # The cause removed, the same fit continues from the last good step and finishes; it ends
  # where a fit that never saw the NaN ends.
  scale.assign(1.0)
  resumed = distiller()
  result = loop.fit(resumed, small, digits_splits.validation, cfg, dirs)
  assert result.resumed_from == {"epochs_done": 1, "steps_done": 2}
  clean = distiller()
  loop.fit(clean, small, digits_splits.validation, cfg,
           dataclasses.replace(dirs, checkpoint_dir=str(tmp_path / "clean")))
  for a, b in zip(resumed.student.get_weights(), clean.student.get_weights()):
    np.testing.assert_array_equal(a, b)


# --- a corrupt image -------------------------------------------------------------------------

def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path):
  root = helpers.write_image_folder(str(tmp_path / "images"))
  good = tf.io.encode_jpeg(np.zeros((8, 8, 3), np.uint8)).numpy()
  bad = os.path.join(root, "train", "bee", "truncated.jpg")
  with open(bad, "wb") as f:
    f.write(good[:len(good) // 2])

  with pytest.raises(DataError, match=rf"cannot read image {bad}: .*--skip_bad_images"), checks.flag_errors():
    data.prepare(DataConfig(dataset=f"folder:{root}"))
  splits = data.prepare(DataConfig(dataset=f"folder:{root}", skip_bad_images=True))
  assert len(splits.info.skipped_files) == 1 and splits.info.skipped_files[0].startswith(bad)
  assert splits.info.class_names == ("ant", "bee", "cat")
  assert len(splits.train) + len(splits.validation) == 9 and len(splits.test) == 3

  results = run.run(Config(
      mode="teacher", workdir=str(tmp_path / "run"), hints=HintConfig(hints=("ce",)),
      data=DataConfig(dataset=f"folder:{root}", skip_bad_images=True, validation_fraction=0.3),
      teacher=TeacherConfig(model=ModelConfig(name="vgg4", width=0.25),
                            train=TrainConfig(epochs=1, batch_size=4))))
  with open(os.path.join(tmp_path, "run", "results.json")) as f:
    assert json.load(f)["dataset"]["skipped_images"] == 1
  assert results["dataset"]["skipped_files"][0].startswith(bad)


# --- unsafe teacher files --------------------------------------------------------------------

def test_keras_teacher_with_lambda_code_is_refused_unless_allowed(tmp_path):
  marker = tmp_path / "code_ran"
  path = str(tmp_path / "teacher.keras")
  # The Lambda's code creates a file: the evidence that loading ran it. (Built from source so
  # that the path is a constant of its code, not a closure Keras would have to serialise.)
  source = f"lambda t: t + 0.0 * len(open({str(marker)!r}, 'a').name)"
  code = eval(source)  # pylint: disable=eval-used
  inputs = keras.Input((8, 8, 1), name="image")
  x = keras.layers.Lambda(code)(inputs)
  keras.Model(inputs, keras.layers.Dense(10)(keras.layers.Flatten()(x))).save(path)
  marker.unlink()

  with pytest.raises(SettingError) as refused:  # the library's face: the setting
    _load_teacher(path, (8, 8, 1), 10)
  assert path in str(refused.value) and "teacher.unsafe_loading=True" in str(refused.value)
  assert str(refused.value).startswith("teacher.path: ") and "--" not in str(refused.value)
  with pytest.raises(ConfigError) as refused, checks.flag_errors():  # the command line's
    _load_teacher(path, (8, 8, 1), 10)
  assert path in str(refused.value) and "--unsafe_teacher_loading" in str(refused.value)
  assert str(refused.value).startswith("--teacher: ")
  assert not marker.exists()

  teacher = _load_teacher(path, (8, 8, 1), 10, safe_mode=False)
  assert marker.exists() and teacher.output_shape == (None, 10)


def test_unsafe_teacher_loading_flag_reaches_the_loader(tmp_path):
  for argv, expected in (([], False), (["--unsafe_teacher_loading"], True)):
    with helpers.parsed_flags(*argv):
      assert run.config_from_flags().teacher.unsafe_loading is expected


def test_savedmodel_teacher_without_a_serving_function_is_a_clear_error(tmp_path):
  module = tf.Module()
  module.v = tf.Variable(1.0)
  path = str(tmp_path / "no_serve")
  tf.saved_model.save(module, path)
  with pytest.raises(ConfigError, match=r"--teacher: SavedModel '.*no_serve' has no 'serve' "
                     r"function nor 'serving_default' signature"), checks.flag_errors():
    _load_teacher(path, (8, 8, 1), 10)
