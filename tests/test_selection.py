"""choose_on_validation (training/selection.py): which runs choose, the two candidates, the
margin rule against hand-computed values, and runs (1 and 2 replicas, the Python API) that
export the candidate validation keeps and record both."""
import dataclasses
import os

import keras
import numpy as np
import pytest

from tfjac import checks, export, run
from tfjac.config import Config, DataConfig, HintConfig, ModelConfig, TeacherConfig, TrainConfig
from tfjac.errors import ConfigError
from tfjac.training import selection


def _wanted(mode="distill", chooses=True, **fields):
  return selection.wanted(dataclasses.replace(Config(mode=mode), **fields), chooses)[0]


def test_auto_chooses_only_around_the_products_own_settings():
  assert _wanted()  # distill, defaults
  assert _wanted(hints=HintConfig.of({"act": 1, "jac": 1, "ce": 1}))  # weights of 1 written out
  assert not _wanted("regularize", chooses=False)  # a mode without a teacher
  assert not _wanted(hints=HintConfig.of({"act": 1, "jac": 3, "ce": 1}))  # a weight set
  assert not _wanted(hints=HintConfig.of({"act": 0.5, "ce": 1}))
  assert not _wanted(train=TrainConfig(learning_rate=0.01))  # the learning rate set
  # on chooses around whatever is set; off never.
  assert _wanted(train=TrainConfig(learning_rate=0.01), choose_on_validation="on")
  assert _wanted("regularize", chooses=False, choose_on_validation="on")
  assert not _wanted(choose_on_validation="off")


def test_the_modes_that_learn_from_a_teacher_choose():
  from tfjac import modes
  chooses = {name for name in modes.MODES if modes.load(name).chooses_on_validation}
  assert chooses == {"distill", "transfer", "finetune"}


def test_the_alternative_multiplies_the_jacobian_weight_and_the_learning_rate():
  config = Config(hints=HintConfig.of({"act": 0.5, "jac": 2, "ce": 1}),
                  train=TrainConfig(learning_rate=0.002), choose_on_validation="on")
  given, alternative = selection.candidates(config)
  assert (given.hints, given.train) == (config.hints, config.train)
  assert [(n, alternative.hints.weight(n)) for n in alternative.hints.hints] == [
      ("act", 0.5), ("jac", 20.0), ("ce", 1.0)]
  assert alternative.train.learning_rate == pytest.approx(0.006)
  assert dataclasses.replace(alternative.train, learning_rate=0.002) == config.train
  # Without the Jacobian hint only the learning rate moves (the same two-fit budget); the
  # defaults' unlisted weights (1) become 10 for jac alone.
  _, alt = selection.candidates(Config(hints=HintConfig.of(["act", "ce"])))
  assert [alt.hints.weight(n) for n in ("act", "ce")] == [1.0, 1.0]
  assert alt.train.learning_rate == pytest.approx(0.003)
  _, alt = selection.candidates(Config(hints=HintConfig.of(["act", "jac", "ce"])))
  assert dict(alt.hints.weights) == {"jac": 10.0}


def test_the_margin_is_one_standard_error_of_the_difference():
  # sqrt(2 p (1 - p) / n) with p the mean of the two, worked by hand:
  # p = 0.8, n = 1200: sqrt(0.32 / 1200) = 0.0163299; p = 0.8 from 0.9 and 0.7, n = 100:
  # sqrt(0.0032) = 0.0565685; p = 0.55, n = 50: sqrt(0.495 / 50) = 0.0994987.
  assert selection.margin(0.8, 0.8, 1200) == pytest.approx(0.0163299, abs=1e-7)
  assert selection.margin(0.9, 0.7, 100) == pytest.approx(0.0565685, abs=1e-7)
  assert selection.margin(0.5, 0.6, 50) == pytest.approx(0.0994987, abs=1e-7)
  assert selection.choose([0.80, 0.82], 1200) == 1  # +0.020 > 0.0163 (p = 0.81: 0.0160)
  assert selection.choose([0.80, 0.81], 1200) == 0  # +0.010: within one standard error
  assert selection.choose([0.5, 0.6], 50) == 1  # +0.100 > 0.0995
  assert selection.choose([0.5, 0.59], 50) == 0
  assert selection.choose([0.9, 0.9], 126) == 0  # a tie keeps the settings given
  assert selection.choose([0.9, 0.8], 126) == 0
  assert selection.choose([1.0, 1.0], 10) == 0
  with pytest.raises(ValueError, match="validation examples"):
    selection.margin(0.5, 0.5, 0)


def test_an_unknown_choice_is_refused_by_its_flag(tmp_path):
  config = Config(workdir=str(tmp_path), choose_on_validation="yes")
  with pytest.raises(ConfigError, match="--choose_on_validation: unknown value 'yes'; valid: "
                     "auto, off, on"):
    checks.validate(config)


def _small(workdir, **fields):
  return Config(mode="distill", workdir=str(workdir),
                data=DataConfig(samples_per_class=5),
                student=ModelConfig(width=0.25),
                teacher=TeacherConfig(model=ModelConfig("vgg4", width=0.25),
                                      train=TrainConfig(epochs=1, batch_size=64)),
                train=TrainConfig(epochs=3, batch_size=64, val_jac_examples=0), **fields)


def _weights_file(directory):
  """The best-validation student weights a fit left in its checkpoint directory."""
  names = [n for n in os.listdir(directory) if n.startswith("best") and
           n.endswith(".weights.h5")]
  assert len(names) == 1, os.listdir(directory)
  return os.path.join(directory, names[0])


@pytest.mark.parametrize("strategy", ["default", "mirrored"])
def test_a_run_exports_the_candidate_validation_keeps_and_records_both(tmp_path, strategy):
  results = run.run(_small(tmp_path, strategy=strategy))
  student, n_val = results["student"], results["dataset"]["validation"]
  assert results["replicas"] == (2 if strategy == "mirrored" else 1)
  choice = student["choice"]
  given, alternative = choice["candidates"]
  assert (given["name"], alternative["name"]) == ("given", "alternative")
  assert given["weights"] == {"act": 1.0, "jac": 1.0, "ce": 1.0}
  assert alternative["weights"] == {"act": 1.0, "jac": 10.0, "ce": 1.0}
  assert (given["learning_rate"], alternative["learning_rate"]) == (0.001, pytest.approx(0.003))
  kept = selection.choose([given["best_val_accuracy"], alternative["best_val_accuracy"]], n_val)
  assert choice["kept"] == ("given", "alternative")[kept]
  assert choice["validation_examples"] == n_val > 0
  # What the run reports and exports is the kept candidate: its accuracies, and the weights
  # of its best validation epoch, read back from the exported file.
  chosen = choice["candidates"][kept]
  assert student["test_accuracy"] == chosen["test_accuracy"]
  assert student["best_val_accuracy"] == chosen["best_val_accuracy"]
  exported = keras.saving.load_model(os.path.join(str(tmp_path), "student", export.KERAS_FILE))
  for name in ("given", "alternative"):
    model = keras.saving.load_model(os.path.join(str(tmp_path), "student", export.KERAS_FILE))
    model.load_weights(_weights_file(os.path.join(str(tmp_path), "candidates", name,
                                                  "checkpoints", "student")))
    same = all(np.array_equal(a, b) for a, b in zip(model.get_weights(), exported.get_weights()))
    assert same == (name == choice["kept"]), name
  # Each candidate logs apart; the finished run leaves no backup behind.
  for name in ("given", "alternative"):
    base = os.path.join(str(tmp_path), "candidates", name)
    assert os.listdir(os.path.join(base, "tensorboard", "student"))
    assert not os.path.exists(os.path.join(base, "checkpoints", "student", "backup"))
  assert student["train_seconds"] == pytest.approx(
      given["train_seconds"] + alternative["train_seconds"], abs=0.02)
  assert "chosen on validation" in run.summary(results)


def test_set_weights_or_off_fit_exactly_once(tmp_path):
  results = run.run(_small(tmp_path / "set", hints=HintConfig.of({"act": 1, "jac": 3,
                                                                  "ce": 1})))
  assert "choice" not in results["student"]
  assert not os.path.exists(tmp_path / "set" / "candidates")
  assert os.listdir(tmp_path / "set" / "tensorboard" / "student")


def _choice_results(hints, alternative_weights):
  given = {"name": "given", "weights": {h: 1.0 for h in hints}, "learning_rate": 0.001,
           "best_val_accuracy": 0.8, "test_accuracy": 0.79}
  alternative = dict(given, name="alternative", weights=alternative_weights,
                     learning_rate=0.003, best_val_accuracy=0.83)
  student = {"model": "vgg4", "train_examples": 100, "test_accuracy": 0.79, "best_epoch": 3,
             "epochs_run": 5, "saved_model": "w/student/saved_model",
             "choice": {"kept": "alternative", "validation_examples": 1200, "margin": 0.0161,
                        "candidates": [given, alternative]}}
  return {"config": {"hints": {"hints": list(hints)}}, "student": student}


def test_the_summary_says_what_was_chosen_and_what_the_alternative_changed():
  from tfjac.modes import common
  lines = common.summary_lines(_choice_results(("act", "jac", "ce"),
                                               {"act": 1.0, "jac": 10.0, "ce": 1.0}))
  assert lines[-1] == ("  chosen on validation (1200 images): alternative; best validation "
                       "80.00% given, 83.00% alternative (jac weight x10, learning rate x3); "
                       "margin 1.61%")
  lines = common.summary_lines(_choice_results(("act", "ce"), {"act": 1.0, "ce": 1.0}))
  assert lines[-1].endswith("83.00% alternative (learning rate x3); margin 1.61%")


def test_both_candidates_start_alike(tmp_path, monkeypatch):
  """With the alternative's factors set to 1 the two fits are the same fit twice: the same
  initial weights, images, batches and augmentation, so the same numbers and weights."""
  monkeypatch.setattr(selection, "ALT_JAC_FACTOR", 1.0)
  monkeypatch.setattr(selection, "ALT_LR_FACTOR", 1.0)
  config = _small(tmp_path)
  results = run.run(dataclasses.replace(
      config, data=dataclasses.replace(config.data, augment=("flip",)),
      train=dataclasses.replace(config.train, epochs=2, batch_size=32)))
  given, alternative = results["student"]["choice"]["candidates"]
  for key in ("best_val_accuracy", "test_accuracy", "best_epoch"):
    assert given[key] == alternative[key], key
  weights = [keras.saving.load_model(os.path.join(str(tmp_path), "student", export.KERAS_FILE))
             for _ in range(2)]
  for model, name in zip(weights, ("given", "alternative")):
    model.load_weights(os.path.join(str(tmp_path), "candidates", name, "checkpoints", "student",
                                    "last.weights.h5"))
  for a, b in zip(weights[0].get_weights(), weights[1].get_weights()):
    np.testing.assert_array_equal(a, b)
