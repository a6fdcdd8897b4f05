"""Networks from outside tfjac (issue 14): softmax-headed teachers, family preprocessing,
standard-BatchNorm students, the Python API, bad input; real keras.applications architectures
(slow) and a KerasHub preset (when keras-hub is installed)."""
import dataclasses
import os
import re
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfjac
from tfjac import checks, run
from tfjac.config import (Config, DataConfig, HintConfig, ModelConfig, TeacherConfig,
                          TeacherInput, TrainConfig)
from tfjac.errors import ConfigError, SettingError
from tfjac.models import layers, preprocessing, sources, students, surgery, teachers, views
from tfjac.training.distiller import Distiller
from tests import helpers

README = os.path.join(helpers.REPO, "README.md")


def _body(shape=(6, 6, 3), name="body"):
  inputs = keras.Input(shape, name="image")
  x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
  return inputs, keras.layers.GlobalAveragePooling2D(name="pool")(x)


def _softmax_teacher(kind, classes=5):
  """The same network ending in logits (reference) and in a softmax of the given kind."""
  inputs, x = _body()
  dense = keras.layers.Dense(classes, name="head")
  logits_model = keras.Model(inputs, dense(x), name="logits_teacher")
  if kind == "dense":
    head = keras.layers.Dense(classes, activation="softmax", name="head_sm")
    out = head(x)
    head.set_weights(dense.get_weights())
  elif kind == "activation":
    out = keras.layers.Activation("softmax", name="probs")(dense(x))
  else:
    out = keras.layers.Softmax(name="probs")(dense(x))
  return logits_model, keras.Model(inputs, out, name="softmax_teacher")


def _info(shape=(6, 6, 3)):
  return types.SimpleNamespace(image_shape=shape)


def _config(path, **teacher_input):
  return Config(mode="transfer",
                teacher=TeacherConfig(path=str(path), input=TeacherInput(**teacher_input)),
                hints=HintConfig(hints=("ce", "kd"), jac_target="teacher_top1"))


def _student(classes=5, shape=(6, 6, 3), bn=keras.layers.BatchNormalization):
  inputs = keras.Input(shape, name="image")
  x = keras.layers.Conv2D(3, 3, padding="same", use_bias=False, name="s_conv")(inputs)
  x = bn(name="s_bn")(x)
  x = keras.layers.ReLU(name="s_relu")(x)
  x = keras.layers.GlobalAveragePooling2D(name="s_pool")(x)
  return keras.Model(inputs, keras.layers.Dense(classes, name="logits")(x), name="user_student")


def _terms(teacher, hints, x, labels, jac_target="teacher_top1", student=None, **kwargs):
  keras.utils.set_random_seed(1)
  student = student or _student(bn=tfjac.JacobianSafeBatchNorm)
  d = Distiller(student, teacher, hints=HintConfig.of(hints, jac_target=jac_target), **kwargs)
  terms, _, _, _ = d.per_example_terms(tf.constant(x), tf.constant(labels), training=False,
                                       step=0)
  return {k: v.numpy() for k, v in terms.items()}


@pytest.mark.parametrize("kind", ["dense", "activation", "softmax_layer"])
def test_a_softmax_headed_teacher_gives_the_hints_of_its_logits_twin(tmp_path, kind):
  reference, with_softmax = _softmax_teacher(kind)
  with_softmax.save(tmp_path / "t.keras")
  loaded = teachers.load_teacher(_config(tmp_path / "t.keras"), _info())
  assert loaded.outputs == "logits" and "softmax" in loaded.outputs_how
  x = np.random.default_rng(0).uniform(size=(4, 6, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(loaded.adapted(x), reference(x), atol=1e-5)
  hints = (("act", 1.0), ("kd", 1.0), ("jac", 1.0), ("lwf", 1.0))
  labels = np.array([0, 1, 2, 3])
  got = _terms(loaded.adapted, hints, x, labels)
  want = _terms(reference, hints, x, labels)
  for name in ("act", "kd", "jac", "lwf"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)
  # The Python API takes the softmax teacher itself under the same rule (issue 20): the same
  # hints as its logits twin, though what the teacher returns are probabilities.
  probs = with_softmax(x).numpy()
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert not np.allclose(probs, reference(x), atol=1e-2)
  api = _terms(with_softmax, hints, x, labels)
  for name in ("act", "kd", "jac", "lwf"):
    np.testing.assert_allclose(api[name], want[name], rtol=1e-4, atol=1e-6, err_msg=name)


class _HiddenSoftmax(keras.layers.Layer):
  """A softmax no structure check can see (like a SavedModel's or a subclassed model's)."""

  def call(self, x):
    return keras.ops.softmax(x)


def test_the_python_api_settles_what_its_teacher_outputs_in_its_own_terms():
  reference, with_softmax = _softmax_teacher("dense")
  student = _student(bn=tfjac.JacobianSafeBatchNorm)
  d = Distiller(student, with_softmax, hints={"ce": 1, "act": 1})
  assert d.teacher_info["outputs"] == "logits" and "softmax" in d.teacher_info["how"]
  x = np.random.default_rng(3).uniform(size=(4, 6, 6, 3)).astype(np.float32)
  np.testing.assert_allclose(d.teacher(x), reference(x), atol=1e-5)  # logits, not probs
  assert Distiller(student, reference, hints={"act": 1}).teacher_info["outputs"] == "logits"

  inputs = keras.Input((6, 6, 3))
  opaque = keras.Model(inputs, _HiddenSoftmax()(reference(inputs)), name="opaque")
  for kwargs, message in [
      ({}, "cannot tell what the teacher outputs.*teacher_outputs='probabilities' or "
           "teacher_outputs='logits'"),
      (dict(teacher_outputs="probabilities"), r"\['act'\] need the teacher's logits"),
      (dict(teacher_outputs="proba"), "unknown value 'proba'"),
  ]:
    with pytest.raises(ValueError, match=message) as e:
      Distiller(student, opaque, hints={"ce": 1, "act": 1}, **kwargs)
    assert "--" not in str(e.value), str(e.value)  # the Python API's words, not the flags'
  with pytest.raises(ValueError, match="ends in a softmax.*drop teacher_outputs='logits'") as e:
    Distiller(student, with_softmax, hints={"act": 1}, teacher_outputs="logits")
  assert "--" not in str(e.value)
  # Declared probabilities: log-probabilities stand in; kd is exact on them.
  d = Distiller(student, opaque, hints={"kd": 1}, teacher_outputs="probabilities")
  assert d.teacher_info["outputs"] == "probabilities"
  labels = np.array([0, 1, 2, 3])
  got = _terms(opaque, (("kd", 1.0),), x, labels, teacher_outputs="probabilities")
  want = _terms(reference, (("kd", 1.0),), x, labels)
  np.testing.assert_allclose(got["kd"], want["kd"], rtol=1e-3, atol=1e-5)
  # NaN weights are refused by argument too.
  with pytest.raises(ValueError, match="hints: the weight of 'act' must be a finite number"):
    Distiller(student, reference, hints={"act": float("nan"), "ce": 1})


def test_a_probability_savedmodel_needs_the_flag_and_then_gives_exact_kd(tmp_path):
  reference, with_softmax = _softmax_teacher("dense")
  tf.saved_model.save(with_softmax, str(tmp_path / "sm"))  # no layers left to inspect
  with pytest.raises(ConfigError, match="--teacher_outputs: cannot tell .* "
                     "--teacher_outputs=probabilities or --teacher_outputs=logits"), \
                          checks.flag_errors():
    teachers.load_teacher(_config(tmp_path / "sm"), _info())
  loaded = teachers.load_teacher(_config(tmp_path / "sm", outputs="probabilities"), _info())
  assert loaded.outputs == "probabilities"
  x = np.random.default_rng(1).uniform(size=(4, 6, 6, 3)).astype(np.float32)
  labels = np.array([0, 1, 2, 3])
  hints = (("kd", 1.0), ("jac_ce", 1.0))
  got = _terms(loaded.adapted, hints, x, labels)
  want = _terms(reference, hints, x, labels)
  for name in ("kd", "jac_ce"):  # log p = logits - logsumexp: a per-example constant
    np.testing.assert_allclose(got[name], want[name], rtol=1e-3, atol=1e-5, err_msg=name)
  cfg = dataclasses.replace(_config(tmp_path / "sm", outputs="probabilities"),
                            hints=HintConfig(hints=("ce", "act"), jac_target="teacher_top1"))
  with pytest.raises(ConfigError, match=r"--teacher_outputs: .*\['act'\] need"), \
       checks.flag_errors():
    teachers.load_teacher(cfg, _info())
  with pytest.raises(ConfigError, match="--teacher_outputs: probabilities: .*'act'.* act on log-probabilities is not act"):
    checks._validate_outside_teacher(cfg)  # pylint: disable=protected-access


def test_logits_declared_for_a_softmax_teacher_is_refused(tmp_path):
  _, with_softmax = _softmax_teacher("activation")
  with_softmax.save(tmp_path / "t.keras")
  with pytest.raises(ConfigError, match="--teacher_outputs: .* ends in a softmax"), \
       checks.flag_errors():
    teachers.load_teacher(_config(tmp_path / "t.keras", outputs="logits"), _info())


@pytest.mark.parametrize("mode,family", [("caffe", "resnet50"), ("tf", "mobilenet_v2"),
                                         ("torch", "densenet"), ("pixels255", "efficientnet")])
def test_preprocessing_matches_keras_preprocess_input(mode, family):
  x = np.random.default_rng(2).uniform(size=(2, 5, 5, 3)).astype(np.float32)
  layer = preprocessing.preprocessing_layer(mode)
  want = getattr(keras.applications, family).preprocess_input(x * 255.0)
  np.testing.assert_allclose(layer(x), want, rtol=1e-5, atol=1e-3)


def test_family_defaults_and_custom_mean_std():
  assert [preprocessing.family_preprocessing(n) for n in (
      "ResNet50", "VGG16", "ResNet50V2", "MobileNetV2", "DenseNet121", "EfficientNetB0",
      "MobileNetV3Small")] == ["caffe", "caffe", "tf", "tf", "torch", "pixels255", "pixels255"]
  x = np.random.default_rng(3).uniform(size=(2, 4, 4, 3)).astype(np.float32)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
  got = preprocessing.preprocessing_layer("torch", mean=mean, std=std)(x)
  np.testing.assert_allclose(got, (x - np.array(mean)) / np.array(std), rtol=1e-5)
  with pytest.raises(ConfigError, match="--teacher_mean"), checks.flag_errors():
    preprocessing.preprocessing_layer("caffe", mean=mean)


def test_preprocessing_inside_the_adapter_keeps_jacobians_on_the_dataset_pixels(tmp_path):
  inputs = keras.Input((4, 4, 3), name="image")
  out = keras.layers.Flatten()(inputs)  # the identity: its Jacobian is the preprocessing's
  keras.Model(inputs, out).save(tmp_path / "id.keras")
  cfg = _config(tmp_path / "id.keras", preprocessing="caffe", outputs="logits")
  adapted = teachers.load_teacher(cfg, _info((4, 4, 3))).adapted
  x = tf.constant(np.random.default_rng(4).uniform(size=(1, 4, 4, 3)), tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(x)
    y = adapted(x)  # [1, 48]: channel c of pixel p is BGR[c] = RGB[2 - c]
    b_of_first_pixel = y[0, 0]
  np.testing.assert_allclose(y.numpy().reshape(4, 4, 3)[..., 0],
                             255 * x.numpy()[0, ..., 2] - 103.939, rtol=1e-5)
  g = tape.gradient(b_of_first_pixel, x).numpy()[0]
  want = np.zeros((4, 4, 3), np.float32)
  want[0, 0, 2] = 255.0
  np.testing.assert_allclose(g, want)


def test_standard_batchnorm_student_gets_per_example_jacobians():
  student = _student()
  x = np.random.default_rng(5).normal(size=(6, 6, 6, 3)).astype(np.float32)
  student(x, training=True)  # moving statistics away from their initial values
  converted, n = layers.convert_batchnorm(student)
  assert n == 1 and isinstance(converted.get_layer("s_bn"), tfjac.JacobianSafeBatchNorm)
  for training in (False, True):
    np.testing.assert_allclose(converted(x, training=training), student(x, training=training),
                               atol=1e-5)

  def jacobians(model, batch, policy):
    """Row i: d(sum_j S_j[label_j]) / d x_i, as the training step takes it."""
    weights = model.get_weights()  # the training pass moves the moving statistics: undo it
    d = Distiller(
        model, None, hints=HintConfig.of((("ce", 1.0), ("jacnorm", 1.0)), jac_target="label",
                                         jac_bn_policy="batch_stats"))
    d.bn_policy = policy
    _, _, jacs = d.student_pass(tf.constant(batch), tf.zeros([len(batch)], tf.int32), None, 0,
                                training=True)
    model.set_weights(weights)
    return jacs["logits"].numpy()[:, 0]

  def reference(batch, moving):
    """Per-example Jacobians of BatchNorm in inference mode with moving statistics `moving`
    (a different mechanism: no batch statistics at all, so no cross-example terms)."""
    twin = keras.models.clone_model(student)
    twin.set_weights(student.get_weights())
    if moving is not None:
      twin.get_layer("s_bn").moving_mean.assign(moving[0])
      twin.get_layer("s_bn").moving_variance.assign(moving[1])
    rows = []
    for example in batch:
      z = tf.constant(example[None])
      with tf.GradientTape() as tape:
        tape.watch(z)
        out = twin(z, training=False)[0, 0]  # label 0
      rows.append(tape.gradient(out, z).numpy()[0].reshape(-1))
    return np.stack(rows)

  # batch_stats on the converted student: the batch's moments held constant, i.e. inference
  # mode with the batch's moments as moving statistics, example by example.
  conv_out = keras.Model(student.inputs, student.get_layer("s_conv").output)(x[:3])
  moments = (tf.reduce_mean(conv_out, [0, 1, 2]),
             tf.math.reduce_variance(conv_out, [0, 1, 2]))
  want = reference(x[:3], moments)
  np.testing.assert_allclose(jacobians(converted, x[:3], "batch_stats"), want, atol=1e-5)
  # The control: the standard BatchNorm under batch_stats carries cross-example terms.
  assert not np.allclose(jacobians(student, x[:3], "batch_stats"), want, atol=1e-3)
  # The inference policy (what the Distiller picks for a standard-BN student): the
  # Jacobian of example 0 is the same whatever the rest of the batch.
  other = np.concatenate([x[:1], x[3:]])
  first = reference(x[:1], None)[0]
  np.testing.assert_allclose(jacobians(student, x[:3], "inference")[0], first, atol=1e-5)
  np.testing.assert_allclose(jacobians(student, other, "inference")[0], first, atol=1e-5)
  # The Distiller picks the inference policy itself for such a student (logged).
  d = Distiller(student, None, hints=HintConfig.of({"ce": 1.0, "jacnorm": 1.0}, jac_target="label"))
  assert d.bn_policy == "inference"
  assert Distiller(converted, None, hints={"ce": 1, "jacnorm": 1}).bn_policy == "batch_stats"


def _readme_block(title):
  with open(README) as f:
    text = f.read()
  section = text.split(f"## {title}", 1)[1].split("\n## ", 1)[0]
  return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_python_api_example_of_the_readme_runs(tmp_path, monkeypatch):
  (code,) = _readme_block("Python API")
  monkeypatch.chdir(tmp_path)
  scope = {}
  exec(compile(code, "README.md (Python API)", "exec"), scope)  # pylint: disable=exec-used
  history, d, before = scope["history"], scope["d"], scope["initial_weights"]
  for key in ("loss", "ce_loss", "act_loss", "jac_loss", "accuracy"):
    assert key in history.history and all(np.isfinite(history.history[key])), key
  after = [w.numpy() for w in d.student.trainable_weights]
  assert len(after) == len(before)
  assert all(not np.allclose(a, b) for a, b in zip(before, after))  # every trained variable
  events = [f for root, _, fs in os.walk(tmp_path / "logs") for f in fs if "tfevents" in f]
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  ea = event_accumulator.EventAccumulator(str(tmp_path / "logs" / "train"),
                                          size_guidance={event_accumulator.TENSORS: 0})
  ea.Reload()
  assert "epoch_jac_loss" in ea.Tags()["tensors"]


def test_bad_networks_are_refused_clearly(tmp_path, monkeypatch):
  with pytest.raises(ConfigError, match="--teacher: unknown keras.applications model "
                     "'ResNet51'; valid: .*ResNet50, "), checks.flag_errors():
    sources.check_application("teacher.path", "keras.applications:ResNet51")
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  with pytest.raises(ConfigError, match="--teacher_weights: .* tfjac never downloads"), \
       checks.flag_errors():
    sources.application_weights("ResNet50", "")
  os.makedirs(tmp_path / "keras_home" / "models")
  cached = tmp_path / "keras_home" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels.h5"
  cached.write_bytes(b"")
  (tmp_path / "keras_home" / "models" / "resnet50v2_weights_tf_kernels.h5").write_bytes(b"")
  assert sources.application_weights("ResNet50", "") == str(cached)
  assert sources.application_weights("ResNet50", "none") is None
  with pytest.raises(ConfigError, match="--teacher: .* is not a KerasHub preset directory"), \
       checks.flag_errors():
    sources.kerashub_teacher(str(tmp_path))
  (tmp_path / "not_a_model.keras").write_text("hello")
  with pytest.raises(ConfigError, match="--model: .* is not a Keras model file"):  # no TF work
    checks._check_network_name(  # pylint: disable=protected-access
        "model", "student.name", ModelConfig(str(tmp_path / "not_a_model.keras")))
  with pytest.raises(ConfigError, match="--model: .* is not a Keras model file"), \
       checks.flag_errors():
    students.build_student(str(tmp_path / "not_a_model.keras"), (6, 6, 3), 5, mean=(0,),
                           std=(1,))
  inputs, x = _body()
  keras.Model(inputs, x).save(tmp_path / "headless.keras")
  loaded = teachers.load_teacher(_config(tmp_path / "headless.keras", outputs="logits"),
                                 _info())
  with pytest.raises(ConfigError, match="--teacher: cannot rebuild .* with a new head: .* "
                     "does not end in a Dense layer"), checks.flag_errors():
    surgery.oracle_network(loaded.network, (6, 6, 3), 3, TeacherInput(), "headless.keras",
                            adapt=loaded.adapt)
  # A weights file of another architecture.
  _student().save_weights(tmp_path / "other.weights.h5")
  with pytest.raises(ConfigError, match="--teacher_weights: .* does not hold weights of "
                     "keras.applications.MobileNetV3Small"), checks.flag_errors():
    sources.application_teacher("MobileNetV3Small", weights=str(tmp_path / "other.weights.h5"),
                                 image_size=32)


def test_a_user_keras_student_file_is_converted_and_trained(tmp_path):
  _student(classes=10, shape=(8, 8, 1)).save(tmp_path / "mine.keras")
  cfg = Config(mode="regularize", workdir=str(tmp_path / "run"),
               data=DataConfig(samples_per_class=2),
               student=ModelConfig(str(tmp_path / "mine.keras")),
               train=TrainConfig(epochs=1, batch_size=16, steps_per_epoch=1),
               hints=HintConfig(hints=("ce", "jacnorm")))
  results = run.run(cfg)
  assert results["student"]["model"].endswith("mine.keras")
  reloaded = keras.saving.load_model(tmp_path / "run" / "student" / "model.keras")
  assert isinstance(reloaded.get_layer("s_bn"), tfjac.JacobianSafeBatchNorm)


# --- real architectures (random weights, tiny inputs) ---------------------------------------

def _folder_dataset(root):
  return "folder:" + helpers.write_image_folder(root, classes=("a", "b"), per_class=(6, 2),
                                                size=(32, 32))


@pytest.mark.slow
def test_resnet50_softmax_teacher_in_transfer_with_lwf_at_jac(tmp_path):
  dataset = _folder_dataset(tmp_path / "data")
  cfg = Config(mode="transfer", workdir=str(tmp_path / "run"),
               teacher=TeacherConfig(path="keras.applications:ResNet50",
                                     input=TeacherInput(resize=True, weights="none",
                                                        image_size=48)),
               data=DataConfig(dataset=dataset, validation_fraction=0.34),
               student=ModelConfig("vgg4", 0.25),
               train=TrainConfig(epochs=1, batch_size=2, steps_per_epoch=1),
               hints=HintConfig(hints=("ce", "lwf", "at", "jac"), jac_target="teacher_top1",
                                weights=(("at", 1000.0),)))
  results = run.run(cfg)
  t = results["teacher"]
  assert t["source_classes"] == 1000 and t["outputs"] == "logits"
  assert "softmax" in t["outputs_how"] and t["preprocessing"] == "caffe"
  assert t["attention_pairs"]
  final = results["student"]["final_epoch_metrics"]
  for key in ("ce_loss", "lwf_loss", "at_loss", "jac_loss"):
    assert np.isfinite(final[key]), key


@pytest.mark.slow
def test_mobilenetv3small_student_with_standard_batchnorm_in_distill(tmp_path):
  dataset = _folder_dataset(tmp_path / "data")
  cfg = Config(mode="distill", workdir=str(tmp_path / "run"),
               data=DataConfig(dataset=dataset, validation_fraction=0.34),
               student=ModelConfig("keras.applications:MobileNetV3Small"),
               teacher=TeacherConfig(model=ModelConfig("vgg4", 0.25),
                                     train=TrainConfig(epochs=1, batch_size=4, steps_per_epoch=1)),
               train=TrainConfig(epochs=1, batch_size=4, steps_per_epoch=1),
               hints=HintConfig(hints=("act", "jac", "ce")))
  results = run.run(cfg)
  final = results["student"]["final_epoch_metrics"]
  assert all(np.isfinite(final[k]) for k in ("act_loss", "jac_loss", "ce_loss"))
  student = keras.saving.load_model(tmp_path / "run" / "student" / "model.keras")
  assert not layers.has_standard_batchnorm(student)
  assert any(isinstance(l, tfjac.JacobianSafeBatchNorm) for l in student.layers)


def test_kerashub_preset_directory_as_teacher(tmp_path):
  keras_hub = pytest.importorskip("keras_hub")
  backbone = keras_hub.models.ResNetBackbone(
      input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64],
      stackwise_num_blocks=[1], stackwise_num_strides=[1], block_type="basic_block",
      use_pre_activation=False, image_shape=(16, 16, 3))
  converter = keras_hub.layers.ResNetImageConverter(image_size=(16, 16), scale=1 / 127.5,
                                                    offset=-1.0)
  classifier = keras_hub.models.ResNetImageClassifier(
      backbone=backbone, num_classes=4,
      preprocessor=keras_hub.models.ResNetImageClassifierPreprocessor(converter),
      activation="softmax")
  classifier.save_to_preset(str(tmp_path / "preset"))
  loaded = teachers.load_teacher(_config(f"kerashub:{tmp_path / 'preset'}"), _info((16, 16, 3)))
  assert loaded.outputs == "logits" and loaded.num_outputs == 4
  x = np.random.default_rng(6).uniform(size=(2, 16, 16, 3)).astype(np.float32)
  probabilities = classifier.predict(x * 255.0, verbose=0)  # KerasHub's own preprocessing
  np.testing.assert_allclose(tf.nn.softmax(loaded.adapted(x)), probabilities, atol=1e-5)


@pytest.mark.parametrize("size_in,size_out", [((16, 16), (8, 8)), ((16, 12), (12, 5)),
                                              ((7, 7), (3, 3))])
def test_attention_maps_are_area_resized_differentiably(size_in, size_out):
  from tfjac.hints import attention  # pylint: disable=g-import-not-at-top
  f = tf.constant(np.random.default_rng(7).normal(size=(2, *size_in, 3)), tf.float32)
  want = tf.image.resize(attention.attention_map(f)[..., None], size_out, method="area")
  got = attention.flat_map(f, size_out)
  np.testing.assert_allclose(got, tf.reshape(want, [2, -1]), rtol=1e-5, atol=1e-6)
  with tf.GradientTape() as tape:  # tf.image.resize(area) has no registered gradient
    tape.watch(f)
    total = tf.reduce_sum(attention.flat_map(f, size_out))
  assert tape.gradient(total, f) is not None


def test_export_of_a_trainable_network_behind_an_input_adapter_is_in_inference_mode(tmp_path):
  """The fine-tuning oracle of a resized teacher: a plain model.export served it with
  BatchNorm batch statistics (export.py, _export_inference)."""
  from tfjac import export  # pylint: disable=g-import-not-at-top
  from tfjac.models import views  # pylint: disable=g-import-not-at-top
  inner = _student(classes=3, shape=(8, 8, 3))
  inner.trainable = True
  adapted = views.adapt_input(inner, (4, 4, 3), resize=True, name="oracle")
  x = np.random.default_rng(8).uniform(size=(4, 4, 4, 3)).astype(np.float32)
  path = export.export_model(adapted, str(tmp_path / "oracle"), x)
  served = tf.saved_model.load(path)
  np.testing.assert_allclose(served.serve(tf.constant(x)), adapted(x, training=False),
                             atol=1e-4)


def test_progress_bar_on_a_terminal_one_log_line_per_epoch_otherwise(monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  from tfjac.training import callbacks  # pylint: disable=g-import-not-at-top
  lines = []
  monkeypatch.setattr(logging, "info", lambda *a: lines.append(a))
  for tty, verbosity, logged in ((True, 1, 0), (False, 0, 1)):
    monkeypatch.setattr(sys.stdout, "isatty", lambda tty=tty: tty, raising=False)
    assert callbacks.progress_verbosity() == verbosity
    lines.clear()
    callbacks.EpochLogger("student", 3).on_epoch_end(0, {"loss": 1.0})
    assert len(lines) == logged


def test_a_student_too_big_for_the_images_is_refused_before_the_teacher_trains(tmp_path,
                                                                               monkeypatch):
  """MobileNetV3Small cannot take the 8x8 digits: a ConfigError naming --model, raised before
  distill trains its teacher (obtain_teacher is never reached)."""
  from tfjac import config as config_lib  # pylint: disable=g-import-not-at-top
  from tfjac import run  # pylint: disable=g-import-not-at-top
  from tfjac.modes import common  # pylint: disable=g-import-not-at-top

  def no_teacher(*a, **k):
    raise AssertionError("the teacher was obtained before the student was checked")

  monkeypatch.setattr(common, "obtain_teacher", no_teacher)
  cfg = config_lib.Config(mode="distill", workdir=str(tmp_path / "run"),
                          student=config_lib.ModelConfig("keras.applications:MobileNetV3Small"))
  with pytest.raises(ConfigError, match="--model"):
    run.run(cfg)


# --- every keras.applications family, as a student and as a teacher (issue 20) --------------

# One model per family, at 32x32 (or refused there, with the reason, and built at its least).
FAMILY_MODELS = {
    "ResNet": "ResNet50", "ResNetV2": "ResNet50V2", "VGG": "VGG16",
    "DenseNet": "DenseNet121", "MobileNet": "MobileNet", "MobileNetV2": "MobileNetV2",
    "MobileNetV3": "MobileNetV3Small", "EfficientNet": "EfficientNetB0",
    "EfficientNetV2": "EfficientNetV2B0", "ConvNeXt": "ConvNeXtTiny",
    "NASNet": "NASNetMobile", "InceptionV3": "InceptionV3",
    "InceptionResNetV2": "InceptionResNetV2", "Xception": "Xception",
}


_FAMILY_OF = ((r"ResNet\d+$", "ResNet"), (r"ResNet\d+V2$", "ResNetV2"), (r"VGG\d+$", "VGG"),
              (r"DenseNet\d+$", "DenseNet"), (r"MobileNet$", "MobileNet"),
              (r"MobileNetV2$", "MobileNetV2"), (r"MobileNetV3(Small|Large)$", "MobileNetV3"),
              (r"EfficientNetB\d$", "EfficientNet"), (r"EfficientNetV2(B\d|[SML])$",
                                                       "EfficientNetV2"),
              (r"ConvNeXt(Tiny|Small|Base|Large|XLarge)$", "ConvNeXt"),
              (r"NASNet(Mobile|Large)$", "NASNet"), (r"InceptionV3$", "InceptionV3"),
              (r"InceptionResNetV2$", "InceptionResNetV2"), (r"Xception$", "Xception"))


def _family(app):
  return next((family for pattern, family in _FAMILY_OF if re.match(pattern, app)), None)


def test_every_keras_applications_name_is_in_a_tested_family():
  """A family Keras adds later must join FAMILY_MODELS (and the slow test) to be claimed."""
  assert {f: _family(m) for f, m in FAMILY_MODELS.items()} == {f: f for f in FAMILY_MODELS}
  missing = [n for n in sources.application_names() if _family(n) not in FAMILY_MODELS]
  assert not missing, missing


def test_an_efficientnet_student_builds_and_gets_its_0_255_pixels():
  """EfficientNet B0-B7 have no include_preprocessing argument (they rescale inside): the
  student builder used to pass it and crash with a TypeError."""
  model = students.build_student("keras.applications:EfficientNetB0", (32, 32, 3), 10,
                                 mean=(0.5,), std=(0.25,))
  assert model.output_shape == (None, 10)
  assert preprocessing.own_preprocessing("EfficientNetB0") == "always"
  assert preprocessing.own_preprocessing("EfficientNetV2B0") == "switch"
  assert preprocessing.own_preprocessing("ResNet50") == "none"
  assert model.get_layer("pixels255") is not None


def _one_step(student, teacher, size):
  x = np.random.default_rng(0).uniform(size=(2, size, size, 3)).astype(np.float32)
  d = Distiller(student, teacher, hints={"act": 1, "jac": 1, "ce": 1})
  d.compile(optimizer=keras.optimizers.SGD(1e-3))
  before = [w.numpy().copy() for w in d.student.trainable_weights]
  logs = d.train_on_batch(x, np.array([0, 1]), return_dict=True)
  assert all(np.isfinite(float(logs[k])) for k in ("act_loss", "jac_loss", "ce_loss")), logs
  assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, d.student.trainable_weights))
  return d


@pytest.mark.slow
@pytest.mark.parametrize("app", sorted(FAMILY_MODELS.values()))
def test_every_keras_applications_family_as_student_and_teacher(app):
  """Random weights: the command line's student builder and teacher loader, and the Python
  API with the family's softmax-headed classifier as teacher; one training step with
  act + jac + ce. Families too small at 32x32 are refused there, naming the setting and
  the size they need, and are then taken at that size."""
  size = sources.MIN_IMAGE_SIZE.get(app, 32)
  if size > 32:
    if app.startswith("Inception"):
      with pytest.raises(ConfigError, match=f"--model: .*at least {size}x{size}"), \
           checks.flag_errors():
        students.build_student(f"keras.applications:{app}", (32, 32, 3), 10, mean=(0.5,),
                               std=(0.25,))
    else:  # Xception's body takes 32x32; its classifier does not
      students.build_student(f"keras.applications:{app}", (32, 32, 3), 10, mean=(0.5,),
                             std=(0.25,))
    with pytest.raises(ConfigError, match=f"--teacher_image_size: .*at least {size}x{size}"), \
         checks.flag_errors():
      sources.application_teacher(app, weights=None, image_size=32)
  keras.utils.set_random_seed(0)
  student = students.build_student(f"keras.applications:{app}", (size, size, 3), 10,
                                   mean=(0.5,), std=(0.25,))
  teacher = getattr(keras.applications, app)(weights=None, input_shape=(size, size, 3),
                                             classes=10)
  d = _one_step(student, teacher, size)
  assert d.teacher_info["outputs"] == "logits" and "softmax" in d.teacher_info["how"]
  # The command line's loader of --teacher=keras.applications:APP (ImageNet's 1000 classes).
  cfg = Config(mode="transfer",
               teacher=TeacherConfig(path=f"keras.applications:{app}",
                                     input=TeacherInput(weights="none", image_size=size)),
               hints=HintConfig(hints=("ce", "lwf"), jac_target="teacher_top1"))
  loaded = teachers.load_teacher(cfg, _info((size, size, 3)))
  assert loaded.outputs == "logits" and "softmax" in loaded.outputs_how
  assert loaded.num_outputs == 1000


# --- library errors in the caller's terms -----------------------------------------------------

def test_library_errors_name_the_setting_and_the_command_line_names_the_flag(tmp_path,
                                                                            monkeypatch):
  """The same refusal, twice: raised to a Python caller it names the argument or Config setting
  and no flag; through checks.flag_errors (run.run) it names the flag, as the command line
  always has."""
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
  teacher = keras.Model(*_body((16, 16, 1)))
  cases = [  # (call, setting, the API's words, the command line's words)
      (lambda: views.adapt_input(teacher, (8, 8, 1)), "teacher.input.resize",
       "pass teacher.input.resize=True to resize", "--teacher_resize: .* pass --teacher_resize "
       "to resize"),
      (lambda: sources.application_weights("ResNet50", ""), "teacher.input.weights",
       "teacher.input.weights=FILE.* or teacher.input.weights='none' for random",
       "--teacher_weights: .*--teacher_weights=FILE.* or --teacher_weights=none for random"),
      (lambda: preprocessing.preprocessing_layer("caffe", scale=2.0), "teacher.input.scale",
       "applies with teacher.input.preprocessing='none'",
       "--teacher_input_scale: applies with --teacher_preprocessing=none"),
      (lambda: students.build_student(str(tmp_path / "nothing.keras"), (8, 8, 1), 3, mean=(0,),
                                      std=(1,)), "student.name", "does not exist",
       "--model: .* does not exist"),
      (lambda: students.build_student(str(tmp_path / "nothing.keras"), (8, 8, 1), 3, mean=(0,),
                                      std=(1,), model_name="teacher", setting="teacher.model"),
       "teacher.model.name", "does not exist", "--teacher_model: .* does not exist"),
      (lambda: views.attention_pairs(teacher, teacher, student_layers=["nope"]),
       "hints.student_layers", r"no feature layer\(s\) \['nope'\]",
       r"--student_layers: no feature layer\(s\) \['nope'\]"),
  ]
  for call, setting, api, cli in cases:
    with pytest.raises(SettingError, match=f"^{re.escape(setting)}: .*{api}") as e:
      call()
    assert e.value.setting == setting and "--" not in str(e.value), str(e.value)
    assert isinstance(e.value, ValueError)  # as Keras raises for a bad argument
    with pytest.raises(ConfigError, match=cli), checks.flag_errors():
      call()


def _library_sources():
  edge = {"checks.py", "run.py", "flagdefs.py"}  # the command line's own modules
  for directory, _, files in os.walk(os.path.join(helpers.REPO, "tfjac")):
    for f in sorted(files):
      if f.endswith(".py") and f not in edge:
        path = os.path.join(directory, f)
        with open(path, encoding="utf-8") as fh:
          yield os.path.relpath(path, helpers.REPO), fh.read()


def test_every_setting_the_library_names_has_a_flag():
  """flag_errors can only name a flag it knows: each setting raised or mentioned in the library
  maps (checks.flag_of) to a flag the command line defines."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from tfjac import flagdefs  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  named = set()
  for _, text in _library_sources():
    named.update(re.findall(r"SettingError\(\s*[\"']([\w.]+)[\"']", text))
    named.update(re.findall(r"mention\(\s*[\"']([\w.]+)[\"']", text))
  assert {"teacher.input.resize", "teacher.path", "teacher.input.weights"} <= named
  # models/students.py names its network's ModelConfig by prefix ('student', 'teacher.model').
  named |= {f"{prefix}.{field}" for prefix in ("student", "teacher.model")
            for field in ("name", "weights")}
  unknown = {s: checks.flag_of(tuple(s.split("."))) for s in named
             if checks.flag_of(tuple(s.split("."))) not in flags.FLAGS}
  assert not unknown, f"settings without a flag: {unknown}"


def test_the_networks_package_speaks_in_settings_not_flags():
  """tfjac/models/ (builders, sources, outputs, preprocessing, views, teachers, surgery) raises
  SettingError, never ConfigError, and its text names no --flag."""
  for path, text in _library_sources():
    if not path.startswith(os.path.join("tfjac", "models")):
      continue
    assert "ConfigError" not in text, path
    assert not re.findall(r"--[a-z]\w+", text), (path, re.findall(r"--[a-z]\w+", text))


def test_students_and_teachers_load_files_through_one_loader(tmp_path):
  """sources.load_network reads a student's .keras file too: a file with Python code (a
  Lambda) is refused in safe mode for both, and only the teacher is told of the setting that
  lifts it (students load in safe mode only); a student is never a SavedModel."""
  inputs = keras.Input((4, 4, 1))
  x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
  out = keras.layers.Dense(3)(keras.layers.Flatten()(x))
  path = str(tmp_path / "lambda.keras")
  keras.Model(inputs, out).save(path)
  with pytest.raises(SettingError, match=r"^student.name: .*Keras safe mode will not run") as e:
    students.build_student(path, (4, 4, 1), 3, mean=(0,), std=(1,))
  assert "unsafe" not in str(e.value)
  with pytest.raises(SettingError, match=r"^teacher.path: .*pass teacher.unsafe_loading=True"):
    sources.load_network(path, (4, 4, 1))
  os.makedirs(tmp_path / "sm")
  (tmp_path / "sm" / "saved_model.pb").write_bytes(b"")
  with pytest.raises(SettingError, match=r"^student.name: .* is not a .keras file"):
    students.build_student(str(tmp_path / "sm"), (4, 4, 1), 3, mean=(0,), std=(1,))
