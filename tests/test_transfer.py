"""Transfer learning: attention maps, at_jac, LwF heads, the oracle, the conditions, the demo."""
import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import linear_model
from tfjac import checks, export, models, run
from tfjac.config import (Config, DataConfig, HintConfig, ModelConfig, TeacherConfig,
                          TeacherInput, TrainConfig)
from tfjac.errors import ConfigError, SettingError
from tfjac.hints import attention
from tfjac.models import sources, surgery, views
from tfjac.modes import conditions
from tfjac.training.distiller import Distiller


def test_attention_map_by_hand():
  f = np.zeros((1, 2, 2, 2), np.float32)
  f[0, 0, 0] = [1.0, 3.0]  # mean of squares: 5
  f[0, 1, 1] = [2.0, 0.0]  # 2
  np.testing.assert_allclose(attention.attention_map(f)[0], [[5.0, 0.0], [0.0, 2.0]])
  t = np.zeros((1, 2, 2, 1), np.float32)
  t[0, 0, 1] = 1.0
  # Q_S = [5, 0, 0, 2] / sqrt(29), Q_T = [0, 1, 0, 0]: mean over 4 pixels of the squares.
  q_s = np.array([5, 0, 0, 2]) / np.sqrt(29)
  expected = ((q_s - [0, 1, 0, 0]) ** 2).mean()
  np.testing.assert_allclose(
      attention.attention_transfer(teacher_features=[t], student_features=[f]), [expected],
      rtol=1e-5)


def test_attention_maps_of_different_sizes_are_resized():
  t = tf.ones([2, 4, 4, 3])
  s = tf.ones([2, 2, 2, 5])
  (mt, ms), = attention.resized_maps([t], [s])
  assert mt.shape == (2, 4) and ms.shape == (2, 4)
  np.testing.assert_allclose(attention.attention_transfer(teacher_features=[t],
                                                          student_features=[s]), [0, 0],
                             atol=1e-6)


def _net(name, classes, width=0.25, shape=(8, 8, 1)):
  return models.build(name, shape, classes, mean=[0.3], std=[0.4], width=width, model_name=name)


def _views(teacher, student, source_classes):
  t_layers, s_layers = views.attention_pairs(teacher, student)
  head = keras.layers.Dense(source_classes, name="teacher_head")
  return (views.make_view(student, feature_layers=s_layers, second_head=head),
          views.make_view(teacher, feature_layers=t_layers))


def test_at_jac_matches_finite_differences():
  keras.utils.set_random_seed(3)
  teacher, student = _net("vgg4", 5), _net("vgg4", 3)
  s_view, t_view = _views(teacher, student, 5)
  d = Distiller(student, teacher, hints=HintConfig.of([("at_jac", 1.0)], jac_target="teacher_top1"),
                student_view=s_view, teacher_view=t_view)
  x = tf.constant(np.random.default_rng(0).random((2, 8, 8, 1), np.float32))
  t = d.teacher_pass(x, tf.zeros([2], tf.int32), step=0)
  _, _, s_jacs = d.student_pass(x, None, t.selection, 0, training=False, pixels=t.pixels)
  jac = s_jacs["attention"].numpy()  # [B, L, D]
  assert jac.shape == (2, len(t.features), 64)
  # Finite differences of the student's attention map value at the teacher's peak pixel.
  def value(xx, layer):
    out = s_view(xx, training=False)
    maps = d._attention_maps(views.features_of(out))  # pylint: disable=protected-access
    return attention.values_at(maps, t.pixels)[layer].numpy()
  eps = 1e-2
  for layer in range(jac.shape[1]):
    for pixel in (9, 27, 36):
      bump = np.zeros((2, 64), np.float32)
      bump[:, pixel] = eps
      bump = bump.reshape(2, 8, 8, 1)
      numeric = (value(x + bump, layer) - value(x - bump, layer)) / (2 * eps)
      np.testing.assert_allclose(jac[:, layer, pixel], numeric, rtol=0.05, atol=1e-3)


def test_lwf_second_head_has_the_teachers_shape_and_learns_from_it():
  keras.utils.set_random_seed(1)
  teacher, student = _net("vgg4", 7), _net("vgg4", 3)
  s_view, t_view = _views(teacher, student, 7)
  assert s_view.output["logits"].shape[-1] == 3
  assert s_view.output["matching_logits"].shape[-1] == 7
  d = Distiller(student, teacher, hints=HintConfig.of([("ce", 1.0), ("lwf", 1.0)],
                                                      jac_target="teacher_top1", lwf_match="act"),
                student_view=s_view, teacher_view=t_view)
  head = s_view.get_layer("teacher_head")
  x = tf.constant(np.random.default_rng(0).random((8, 8, 8, 1), np.float32))
  y = tf.constant(np.arange(8) % 3)
  with tf.GradientTape() as tape:
    _, terms, *_ = d.compute_total_loss(x, y, training=True, step=0)
    lwf = tf.reduce_mean(terms["lwf"])
  assert np.abs(tape.gradient(lwf, head.kernel).numpy()).max() > 0
  assert any(v is head.kernel for v in d.trained_variables)
  t_logits = teacher(x, training=False)
  s_second = s_view(x, training=True)["matching_logits"]
  np.testing.assert_allclose(terms["lwf"], np.sum((t_logits - s_second) ** 2, -1), rtol=1e-4)


def test_unknown_attention_layers_list_the_valid_ones():
  teacher, student = _net("vgg4", 5), _net("vgg4", 3)
  with pytest.raises(ConfigError, match=r"--teacher_layers: no feature layer\(s\) \['nope'\] .*"
                     r"valid: .*block1_conv1"), checks.flag_errors():
    views.attention_pairs(teacher, student, teacher_layers=["nope"])


def test_default_attention_layers_end_blocks_or_stages():
  """On keras.applications networks (weights=None, no download) the defaults are the stage
  outputs, never the ZeroPadding2D layers before strided convolutions (the last layers at
  their odd resolutions) nor the next block's expansion; tfjac's own networks keep theirs."""
  resnet = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10)
  assert views.default_attention_layers(resnet) == [
      "conv1_relu", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out",
      "conv5_block3_out"]
  mobilenet = keras.applications.MobileNetV2(weights=None, input_shape=(64, 64, 3), classes=10)
  chosen = views.default_attention_layers(mobilenet)
  assert chosen == ["expanded_conv_project_BN", "block_2_add", "block_5_add", "block_12_add",
                    "out_relu"]
  for model in (resnet, mobilenet):
    assert not any(isinstance(model.get_layer(n), keras.layers.ZeroPadding2D)
                   for n in views.default_attention_layers(model))
  assert views.default_attention_layers(_net("vgg4", 5)) == [
      "block1_relu1", "block2_relu1", "block3_relu1"]
  assert views.default_attention_layers(_net("resnet20", 5)) == [
      "stage1_block3_out", "stage2_block3_out", "stage3_block3_out"]
  # Paired with a tfjac student, the deepest stages are matched.
  t, s = views.attention_pairs(resnet, _net("vgg4", 3, shape=(64, 64, 3)))
  assert 0 < len(t) == len(s) and t == views.default_attention_layers(resnet)[-len(s):]


def test_teacher_of_another_input_size_needs_the_resize_flag():
  teacher = _net("vgg4", 5, shape=(16, 16, 3))
  with pytest.raises(ConfigError, match="--teacher_resize: the teacher takes 16x16 images"), \
       checks.flag_errors():
    views.adapt_input(teacher, (8, 8, 1))
  adapted = views.adapt_input(teacher, (8, 8, 1), resize=True, scale=2.0)
  assert adapted(np.zeros((2, 8, 8, 1), np.float32)).shape == (2, 5)


def test_oracle_starts_from_the_teachers_weights(tmp_path):
  teacher = _net("vgg4", 5)
  rng = np.random.default_rng(0)
  teacher.set_weights([rng.normal(size=w.shape).astype(np.float32) ** 2
                       for w in teacher.get_weights()])  # distinct from any initialiser
  teacher.save(tmp_path / "t.keras")
  loaded = sources.load_network(str(tmp_path / "t.keras"), (8, 8, 1))
  oracle = surgery.oracle_network(loaded, (8, 8, 1), 3, TeacherInput(), "t")
  assert oracle.output_shape == (None, 3)
  body = {w.path: w.numpy() for w in teacher.weights if not w.path.startswith("logits")}
  got = {w.path: w.numpy() for w in oracle.weights}
  assert len(body) == len(teacher.weights) - 2 and "oracle_logits/kernel" in got
  for name, value in body.items():
    np.testing.assert_array_equal(got[name], value, err_msg=name)
  assert len(oracle.trainable_weights) == len(teacher.trainable_weights)


def test_oracle_initialisation_is_checked_value_by_value(tmp_path, monkeypatch):
  from tfjac.errors import TfjacError  # pylint: disable=g-import-not-at-top
  teacher = _net("vgg4", 5)
  rng = np.random.default_rng(0)
  teacher.set_weights([rng.normal(size=w.shape).astype(np.float32) ** 2
                       for w in teacher.get_weights()])  # distinct from any initialiser
  oracle = surgery.oracle_network(teacher, (8, 8, 1), 3, TeacherInput(), "t")
  head = teacher.layers[-1]
  checked = surgery.initialised_from_teacher(teacher, oracle)
  assert checked["parameters"] == teacher.count_params() - head.count_params()
  assert checked["layers"] == sum(1 for layer in teacher.layers[:-1] if layer.weights)
  # One layer's values changed after the copy (a kernel; then only BatchNorm statistics).
  names = [layer.name for layer in oracle.layers]
  conv = next(n for n in names if "conv" in n)
  kernel = oracle.get_layer(conv).weights[0]
  kernel.assign(kernel.numpy() + 1e-3)
  with pytest.raises(TfjacError, match=f"layer '{conv}' does not hold the teacher's weights"):
    surgery.initialised_from_teacher(teacher, oracle)
  kernel.assign(teacher.get_layer(conv).weights[0].numpy())
  bn = next(layer for layer in oracle.layers if "moving_variance" in str(
      [w.path for w in layer.weights]))
  stat = next(w for w in bn.weights if w.path.endswith("moving_variance"))
  stat.assign(stat.numpy() * 2)
  with pytest.raises(TfjacError, match=f"layer '{bn.name}' does not hold"):
    surgery.initialised_from_teacher(teacher, oracle)
  # A broken copy (set_weights does nothing): oracle_network itself refuses it.
  monkeypatch.setattr(keras.Model, "set_weights", lambda self, weights: None)
  with pytest.raises(TfjacError, match="does not hold the teacher's weights"):
    surgery.oracle_network(teacher, (8, 8, 1), 3, TeacherInput(), "t")


def test_oracle_refuses_a_savedmodel_teacher(tmp_path):
  export.export_model(_net("vgg4", 5), str(tmp_path / "t"), np.zeros((2, 8, 8, 1), np.float32))
  loaded = sources.load_network(str(tmp_path / "t" / "saved_model"), (8, 8, 1))
  with pytest.raises(ConfigError, match="needs its layers: .* is a SavedModel"), \
       checks.flag_errors():
    surgery.oracle_network(loaded, (8, 8, 1), 3, TeacherInput(), str(tmp_path / "t"))


def test_lipschitz_of_a_linear_teacher_is_the_spectral_norm_of_its_weights():
  w = np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32)
  x = np.random.default_rng(1).random((5, 2, 2, 1)).astype(np.float32)
  sigma = conditions.spectral_norms(linear_model(w), x)
  np.testing.assert_allclose(sigma, np.linalg.norm(w, 2), rtol=1e-4)
  top = conditions.top1_gradient_norms(linear_model(w), x)
  logits = x.reshape(5, -1) @ w
  np.testing.assert_allclose(top, np.linalg.norm(w[:, logits.argmax(1)], axis=0), rtol=1e-5)


def test_feature_distances():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(300, 3)), rng.normal(size=(300, 3))
  far = rng.normal(size=(300, 3)) + [3.0, 0, 0]
  assert abs(conditions.frechet_distance(a, b)) < 0.2
  np.testing.assert_allclose(conditions.frechet_distance(a, far), 9.0, rtol=0.1)
  assert conditions.mmd2(a, far)[0] > 20 * abs(conditions.mmd2(a, b)[0])


def _demo_config(workdir, mode, **kw):
  base = Config(mode=mode, workdir=str(workdir), data=DataConfig(classes=(5, 6, 7, 8, 9),
                                                                   samples_per_class=5),
                student=ModelConfig("vgg4", 0.25), train=TrainConfig(epochs=2, batch_size=32),
                hints=HintConfig(hints=("ce", "lwf"), jac_target="teacher_top1"))
  return dataclasses.replace(base, **kw)


# The default suite trains the two ends of the table (no transfer, and every hint at once,
# which runs each of lwf, at, jac and at_jac); the slow variant trains all five transfer rows.
DEMO_ROWS = {"none": ("ce",), "lwf_at_jac": ("ce", "lwf", "at", "jac", "at_jac")}
ALL_DEMO_ROWS = {"none": ("ce",), "lwf": ("ce", "lwf"), "lwf_jac": ("ce", "lwf", "jac"),
                 "lwf_at": ("ce", "lwf", "at"),
                 "lwf_at_jac": ("ce", "lwf", "at", "jac", "at_jac")}


def test_transfer_every_hint_and_the_oracle_on_a_saved_tiny_teacher(tmp_path):
  """The demo's pipeline below in seconds: an untrained 5-class VGG-4 file as the teacher (in
  place of a trained ResNet-20), the transfer row with every hint, exported; the oracle."""
  _net("vgg4", 5).save(tmp_path / "t.keras")
  teacher = str(tmp_path / "t.keras")
  one_epoch = TrainConfig(epochs=1, batch_size=32)
  cfg = _demo_config(tmp_path / "lwf_at_jac", "transfer", teacher=TeacherConfig(path=teacher),
                     train=one_epoch,
                     hints=HintConfig(hints=DEMO_ROWS["lwf_at_jac"], jac_target="teacher_top1",
                                      weights=(("at", 1000.0),)),
                     choose_on_validation="on")  # each candidate gets its own views
  results = run.run(cfg)
  assert [c["weights"]["jac"] for c in results["student"]["choice"]["candidates"]] == [1, 10]
  assert 0 <= results["student"]["test_accuracy"] <= 1
  assert results["dataset"]["num_classes"] == 5
  served = tf.saved_model.load(os.path.join(tmp_path, "lwf_at_jac", "student", "saved_model"))
  assert served.serve(tf.zeros([2, 8, 8, 1])).shape == (2, 5)
  final = results["student"]["final_epoch_metrics"]
  for key in ("ce_loss", "lwf_loss", "at_loss", "jac_loss", "at_jac_loss"):
    assert np.isfinite(final[key]) and final[key] > 0, key
  oracle = run.run(_demo_config(tmp_path / "oracle", "finetune",
                                teacher=TeacherConfig(path=teacher),
                                train=one_epoch, hints=HintConfig(hints=("ce",))))
  assert oracle["student"]["model"].startswith("oracle")
  # The oracle is chosen on validation too (auto): its second network from the same factory.
  assert [c["learning_rate"] for c in oracle["student"]["choice"]["candidates"]] == [
      0.001, pytest.approx(0.003)]


# slow: a trained ResNet-20 teacher (--mode=teacher) then every mode on it, minutes on 2 cores.
# Faster default tests cover its parts: test_transfer_every_hint_and_the_oracle_on_a_saved_tiny_
# teacher (transfer with every hint, export, the oracle), test_conditions_measures_every_class_
# of_class_sorted_splits (--mode=conditions), and test_end_to_end.py trains a teacher first.
@pytest.mark.slow
@pytest.mark.parametrize("rows", [DEMO_ROWS, ALL_DEMO_ROWS], ids=["ends", "all_rows"])
def test_transfer_demo_end_to_end(tmp_path, rows):
  teacher_cfg = Config(mode="teacher", workdir=str(tmp_path / "teacher"),
                       data=DataConfig(classes=(0, 1, 2, 3, 4)),
                       teacher=TeacherConfig(model=ModelConfig("resnet20", 0.5),
                                             train=TrainConfig(epochs=2)),
                       hints=HintConfig(hints=("ce",)))
  run.run(teacher_cfg)
  teacher = str(tmp_path / "teacher" / "teacher")
  for name, hints in rows.items():
    cfg = _demo_config(tmp_path / name, "transfer", teacher=TeacherConfig(path=teacher),
                       hints=HintConfig(hints=hints, jac_target="teacher_top1",
                                        weights=(("at", 1000.0),)))
    results = run.run(cfg)
    assert 0 <= results["student"]["test_accuracy"] <= 1
    assert results["dataset"]["num_classes"] == 5
    served = tf.saved_model.load(os.path.join(tmp_path, name, "student", "saved_model"))
    assert served.serve(tf.zeros([2, 8, 8, 1])).shape == (2, 5)
  with open(tmp_path / "lwf_at_jac" / "results.json") as f:
    final = json.load(f)["student"]["final_epoch_metrics"]
  for key in ("ce_loss", "lwf_loss", "at_loss", "jac_loss", "at_jac_loss"):
    assert np.isfinite(final[key]), key
  oracle = run.run(_demo_config(tmp_path / "oracle", "finetune",
                                teacher=TeacherConfig(path=teacher),
                                hints=HintConfig(hints=("ce",))))
  assert oracle["student"]["model"].startswith("oracle")
  # The oracle is chosen on validation too (auto): its second network from the same factory.
  assert [c["learning_rate"] for c in oracle["student"]["choice"]["candidates"]] == [
      0.001, pytest.approx(0.003)]
  cond = run.run(_demo_config(tmp_path / "cond", "conditions",
                              teacher=TeacherConfig(path=teacher),
                              source=DataConfig(classes=(0, 1, 2, 3, 4)),
                              conditions_examples=64))["conditions"]
  assert cond["source_loss"]["accuracy"] > 0.5
  assert cond["distance"]["frechet"] > cond["distance"]["frechet_source_halves"]
  assert cond["lipschitz"]["jacobian_spectral_norm"]["max"] > 0


def test_every_hint_parameter_comes_from_the_config():
  from tfjac.hints import HintParams  # pylint: disable=g-import-not-at-top
  h = HintConfig(kd_temperature=7.0, jac_normalize=False, noise_sigma=0.3, noise_samples=9,
                 lwf_match="act")
  assert HintParams.from_config(h) == HintParams(kd_temperature=7.0, jac_normalize=False,
                                             noise_sigma=0.3, noise_samples=9, lwf_match="act")


def _class_sorted_source(name, num_classes, per_class, seed):
  """A dataset whose splits are stored class by class (as folder and MIT Indoor splits are)."""
  from tfjac.data import sources  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  split = lambda: sources.ArraySplit(  # noqa: E731
      rng.random((len(labels), 8, 8, 1)).astype(np.float32), labels.copy())
  return sources.SourceData(name=name, num_classes=num_classes, train=split(), test=split(),
                            class_names=tuple(f"c{c}" for c in range(num_classes)))


def test_stratified_sample_is_seeded_and_proportional():
  labels = np.repeat(np.arange(67), 20)  # MIT Indoor's test split, class by class
  per_class = conditions.stratified_sample(labels, 500, seed=0)
  counts = [len(i) for i in per_class]
  assert sum(counts) == 500 and set(counts) == {7, 8}
  assert all((labels[i] == c).all() for c, i in enumerate(per_class))
  again = conditions.stratified_sample(labels, 500, seed=0)
  other = conditions.stratified_sample(labels, 500, seed=1)
  assert all(np.array_equal(a, b) for a, b in zip(per_class, again))
  assert not all(np.array_equal(a, b) for a, b in zip(per_class, other))
  a, b = conditions.halves(per_class)
  assert abs(len(a) - len(b)) <= 1 and not set(a) & set(b)
  ca, cb = np.bincount(labels[a], minlength=67), np.bincount(labels[b], minlength=67)
  assert (ca > 0).all() and (cb > 0).all() and np.abs(ca - cb).max() <= 1


def test_conditions_measures_every_class_of_class_sorted_splits(tmp_path, monkeypatch):
  """First-n images of a class-sorted split would see 2 of 6 target classes and give source
  halves with disjoint classes; the measured images must cover every class, halves balanced."""
  from tfjac.data import sources  # pylint: disable=g-import-not-at-top
  monkeypatch.setitem(sources.SOURCES, "sorted_target",
                      lambda options: _class_sorted_source("sorted_target", 6, 10, 0))
  monkeypatch.setitem(sources.SOURCES, "sorted_source",
                      lambda options: _class_sorted_source("sorted_source", 5, 12, 1))
  _net("vgg4", 5).save(tmp_path / "t.keras")
  seeds, sample = [], conditions.stratified_sample
  monkeypatch.setattr(conditions, "stratified_sample",
                      lambda labels, n, seed: seeds.append(seed) or sample(labels, n, seed))
  cfg = Config(mode="conditions", workdir=str(tmp_path / "run"),
               teacher=TeacherConfig(path=str(tmp_path / "t.keras")),
               data=DataConfig(dataset="sorted_target", seed=4),
               source=DataConfig(dataset="sorted_source"), conditions_examples=20,
               hints=HintConfig(hints=("ce",)))
  cond = run.run(cfg)["conditions"]
  assert cond["target"]["examples"] == 20 and cond["target"]["classes"] == 6
  assert cond["source_loss"]["classes"] == 5
  assert cond["distance"]["source_sample"] == {"examples": 20, "classes": 5}
  assert cond["distance"]["source_halves"] == [{"examples": 10, "classes": 5}] * 2
  assert seeds == [4, 4, 5]  # --seed draws them (target, source loss, source halves)


def _top_k_transfer(tmp_path, k):
  """A transfer run whose teacher has 7 classes and whose target data has 3."""
  if not os.path.exists(tmp_path / "t.keras"):
    _net("vgg4", 7).save(tmp_path / "t.keras")
  return run.run(Config(
      mode="transfer", workdir=str(tmp_path / f"k{k}"),
      teacher=TeacherConfig(path=str(tmp_path / "t.keras")),
      data=DataConfig(classes=(0, 1, 2), samples_per_class=2),
      student=ModelConfig("vgg4", 0.25), train=TrainConfig(epochs=1, batch_size=8),
      hints=HintConfig(hints=("ce", "lwf", "jac"), jac_target="top_k", jac_top_k=k)))


def test_jac_top_k_in_transfer_is_checked_against_the_teachers_classes(tmp_path, monkeypatch):
  """Top-k picks among the teacher's 7 classes (the student's second head), not the target's
  3: k=5 passes every check and reaches training, k=8 is refused before it."""
  from tfjac.modes import common  # pylint: disable=g-import-not-at-top

  class ReachedTraining(Exception):
    pass

  def train_student(*args, **kwargs):
    raise ReachedTraining
  monkeypatch.setattr(common, "train_student", train_student)
  with pytest.raises(ReachedTraining):
    _top_k_transfer(tmp_path, 5)
  with pytest.raises(ConfigError, match=r"--jac_top_k: 8 is more than the teacher's 7 classes "
                     r"\(.*t.keras; top-k picks among its outputs\); use 1..7"):
    _top_k_transfer(tmp_path, 8)


@pytest.mark.slow
def test_transfer_with_jac_top_k_above_the_target_classes_trains(tmp_path):
  results = _top_k_transfer(tmp_path, 5)
  assert results["dataset"]["num_classes"] == 3 and results["config"]["hints"]["jac_top_k"] == 5
  assert np.isfinite(results["student"]["final_epoch_metrics"]["jac_loss"])
