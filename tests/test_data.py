"""Splits, the seeded N-per-class sampler, the training stream, the tensorflow-datasets path
(mocked, offline), image folders and what bad data gives."""
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfjac import checks
from tfjac import config as config_lib
from tfjac import data
from tfjac.config import DataConfig
from tfjac.data import sources
from tfjac.errors import ConfigError, DataError
from tests import helpers


def test_embedded_dataset_is_real_and_fixed(digits_splits):
  info = digits_splits.info
  assert info.image_shape == (8, 8, 1) and info.num_classes == 10
  assert len(digits_splits.test) == 539
  assert len(digits_splits.train) + len(digits_splits.validation) == 1258
  imgs = digits_splits.train.images
  assert imgs.min() == 0.0 and imgs.max() == 1.0
  # Handwritten strokes: most border pixels are blank, the centre is inked.
  assert imgs[:, :, 0].mean() < 0.05 and imgs[:, 3:5, 3:5].mean() > 0.2


def test_sampler_is_seeded_nested_and_balanced(digits_splits):
  labels = digits_splits.train.labels
  a = data.sample_per_class(labels, 10, seed=3, num_classes=10)
  b = data.sample_per_class(labels, 10, seed=3, num_classes=10)
  c = data.sample_per_class(labels, 10, seed=4, num_classes=10)
  big = data.sample_per_class(labels, 50, seed=3, num_classes=10)
  np.testing.assert_array_equal(a, b)
  assert set(a) != set(c)
  assert set(a) <= set(big)
  np.testing.assert_array_equal(np.bincount(labels[a], minlength=10), [10] * 10)


def test_too_many_samples_per_class_says_how_many_there_are(digits_splits):
  with pytest.raises(ConfigError, match=r"--samples_per_class: 1000 .*smallest class: \d+ examples"), checks.flag_errors():
    data.prepare(DataConfig(samples_per_class=1000))


def test_validation_is_disjoint_stratified_and_seeded():
  s0 = data.prepare(DataConfig(seed=0))
  s1 = data.prepare(DataConfig(seed=1))
  assert 0.08 < len(s0.validation) / (len(s0.train) + len(s0.validation)) < 0.12
  assert set(np.unique(s0.validation.labels)) == set(range(10))
  rows = lambda split: {r.tobytes() for r in split.images}  # noqa: E731
  assert not rows(s0.validation) & rows(s0.test)
  assert rows(s0.validation) != rows(s1.validation)


def _indexed_source(n=300, num_classes=3):
  """Training images that carry their own index (pixel 0 = index / n): every row unique."""
  images = np.random.default_rng(0).random((n, 4, 4, 1)).astype(np.float32)
  images[:, 0, 0, 0] = np.arange(n) / n
  labels = (np.arange(n) % num_classes).astype(np.int32)
  return sources.SourceData(name="indexed", num_classes=num_classes,
                            train=sources.ArraySplit(images, labels),
                            test=sources.ArraySplit(images[:3] + 1, labels[:3]))


def _check_train_validation_partition(monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "indexed", lambda options: _indexed_source())
  splits = data.prepare(DataConfig(dataset="indexed", validation_fraction=0.2))
  index = lambda split: np.rint(split.images[:, 0, 0, 0] * 300).astype(int)  # noqa: E731
  train, val = index(splits.train), index(splits.validation)
  assert len(set(train)) == len(train) and len(set(val)) == len(val)
  assert not set(train) & set(val), "an example is in both training and validation"
  assert sorted(np.concatenate([train, val])) == list(range(300))  # nothing lost
  np.testing.assert_array_equal(splits.train.labels, np.arange(300)[train] % 3)
  assert len(val) == 60


def test_train_and_validation_are_a_partition_of_the_training_split(monkeypatch):
  _check_train_validation_partition(monkeypatch)


def test_the_partition_check_catches_an_overlapping_split(monkeypatch):
  real = data.split_validation
  def overlapping(labels, fraction, seed, num_classes):
    train, val = real(labels, fraction, seed, num_classes)
    return np.union1d(train, val[:1]), val  # one validation example also trains
  monkeypatch.setattr(data, "split_validation", overlapping)
  with pytest.raises(AssertionError, match="in both training and validation"):
    _check_train_validation_partition(monkeypatch)


def test_pipeline_batches_and_augments(digits_splits):
  ds = data.pipeline(digits_splits.train, 16, training=True, augment=("crop", "flip"))
  x, y = next(iter(ds))
  assert x.shape == (16, 8, 8, 1) and y.shape == (16,)


def _augmented_and_originals(augment, n=900, seed=3):
  """(augmented, original) images in the same order: the order stream does not depend on the
  augmentation. Random images: no crop or flip of one equals another by chance."""
  images = np.random.default_rng(1).random((n, 8, 8, 1)).astype(np.float32)
  split = sources.ArraySplit(images, np.zeros([n], np.int32))
  both = [np.concatenate([x.numpy() for x, _ in data.pipeline(split, 128, training=True,
                                                              seed=seed, augment=a)])
          for a in (augment, ())]
  return both[0], both[1]


def _check_crop_and_flip():
  """Each output is the reflect-padded (pad 1 = 8 // 8) image cropped at one of the 3 x 3
  offsets, then mirrored or not: offsets uniform (1/9 each), half of the images mirrored."""
  aug, orig = _augmented_and_originals(("crop", "flip"))
  padded = np.pad(orig, [(0, 0), (1, 1), (1, 1), (0, 0)], mode="reflect")
  found = np.full([len(aug), 3], -1)
  for dy in range(3):
    for dx in range(3):
      crop = padded[:, dy:dy + 8, dx:dx + 8]
      for flipped, candidate in ((0, crop), (1, crop[:, :, ::-1])):
        match = np.all(np.isclose(candidate, aug), axis=(1, 2, 3))
        assert not (match & (found[:, 0] >= 0)).any(), "an output matches two transforms"
        found[match] = (dy, dx, flipped)
  assert (found >= 0).all(), "an output is no crop-and-flip of its input"
  offsets = np.bincount(found[:, 0] * 3 + found[:, 1], minlength=9) / len(aug)
  flipped = found[:, 2].mean()
  # n = 900: per offset 1/9 +- 0.0105 (std), mirrored 1/2 +- 0.017; bounds at > 3.5 std.
  assert offsets.min() > 0.07 and offsets.max() < 0.155, f"crop offsets {offsets}"
  assert 0.44 < flipped < 0.56, f"mirrored fraction {flipped}"
  assert (aug != orig).any(axis=(1, 2, 3)).mean() > 0.9  # unchanged: 1/18 expected


def test_augmentation_crops_and_flips_with_the_expected_distribution():
  _check_crop_and_flip()


@pytest.mark.parametrize("broken", ["no-op", "never flips", "crops in place"])
def test_the_augmentation_check_catches_a_broken_augmentation(monkeypatch, broken):
  real = data._augment_fn  # pylint: disable=protected-access
  def fake(augment, padding, image_shape):
    kept = {"no-op": (), "never flips": ("crop",), "crops in place": ("flip",)}[broken]
    return real(tuple(a for a in augment if a in kept), padding, image_shape)
  monkeypatch.setattr(data, "_augment_fn", fake)
  with pytest.raises(AssertionError):
    _check_crop_and_flip()


def _batches(ds, n=None):
  return [(x.numpy(), y.numpy()) for x, y in (ds.take(n) if n else ds)]


@pytest.mark.parametrize("steps_per_epoch", [0, 7])
def test_training_stream_from_any_epoch_and_step_is_the_tail_of_the_whole(digits_splits,
                                                                          steps_per_epoch):
  """What makes resuming exact: the batches from (epoch, step) depend on nothing else."""
  split = digits_splits.sampled_train(3, 0)  # 30 examples: 4 batches of 8, the last partial
  steps = steps_per_epoch or 4
  kwargs = dict(seed=5, epochs=3, steps_per_epoch=steps_per_epoch, augment=("crop", "flip"))
  whole = _batches(data.training_batches(split, 8, **kwargs), 3 * steps)
  assert len(whole) == 3 * steps
  for epoch, step in ((0, 3), (1, 0), (1, 2), (2, 1)):
    tail = _batches(data.training_batches(split, 8, start_epoch=epoch, start_step=step,
                                          **kwargs), 3 * steps - epoch * steps - step)
    for (x, y), (tx, ty) in zip(whole[epoch * steps + step:], tail):
      np.testing.assert_array_equal(x, tx)
      np.testing.assert_array_equal(y, ty)
  if not steps_per_epoch:  # one pass per epoch: every example once, in a new order each epoch
    labels = [np.concatenate([y for _, y in whole[e * 4:(e + 1) * 4]]) for e in range(3)]
    assert all(sorted(lab) == sorted(split.labels) for lab in labels)
    assert not np.array_equal(labels[0], labels[1])
  other_seed = _batches(data.training_batches(split, 8, **{**kwargs, "seed": 6}), 1)
  assert not np.array_equal(whole[0][0], other_seed[0][0])


# --- bad data: a clear error naming the file or class ----------------------------------------

def _source(train_labels, class_names=("zero", "one", "two")):
  images = np.zeros((len(train_labels), 4, 4, 1), np.float32)
  return sources.SourceData(name="fake", num_classes=3,
                            train=sources.ArraySplit(images, np.asarray(train_labels, np.int32)),
                            test=sources.ArraySplit(images[:1], np.zeros([1], np.int32)),
                            class_names=class_names)


def test_labels_out_of_range_are_named(monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "fake", lambda options: _source([0, 1, 2, 7, 7, -1]))
  with pytest.raises(DataError, match=r"train split of dataset 'fake' has labels outside the 3 "
                     r"classes \[0, 3\): label -1 \(1 example\), label 7 \(2 examples\)"):
    data.prepare(DataConfig(dataset="fake"))


def test_a_class_without_training_examples_is_named(monkeypatch):
  monkeypatch.setitem(sources.SOURCES, "fake", lambda options: _source([0, 0, 2, 2]))
  with pytest.raises(DataError, match=r"no example of class\(es\) 1 \('one'\)"):
    data.prepare(DataConfig(dataset="fake"))


def test_image_folder_is_read_with_sorted_class_names(tmp_path):
  root = helpers.write_image_folder(tmp_path)
  helpers.write_png(os.path.join(root, "train", "ant", "grey.png"), channels=1)  # made colour
  (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image: ignored")
  source = sources.load_folder(root)
  assert source.class_names == ("ant", "bee", "cat") and source.num_classes == 3
  assert source.train.images.shape == (10, 8, 8, 3) and source.train.images.dtype == np.float32
  assert 0.0 <= source.train.images.min() and source.train.images.max() <= 1.0
  np.testing.assert_array_equal(np.bincount(source.train.labels), [4, 3, 3])
  assert source.name == f"folder:{os.path.basename(root)}"


def test_image_folder_faults_name_the_class_or_file(tmp_path):
  root = helpers.write_image_folder(tmp_path / "a")
  os.makedirs(os.path.join(root, "train", "dog"))
  with pytest.raises(DataError, match=r"class 'dog' has no images in .*train/dog"):
    sources.load_folder(root)

  root = helpers.write_image_folder(tmp_path / "b")
  big = os.path.join(root, "train", "bee", "big.png")
  helpers.write_png(big, size=(12, 10))
  with pytest.raises(ConfigError, match=rf"--image_size: images differ in size: {big} is 10x12"), checks.flag_errors():
    sources.load_folder(root)
  resized = sources.load_folder(root, sources.SourceOptions(image_size=6))
  assert resized.train.images.shape == (10, 6, 6, 3)

  root = helpers.write_image_folder(tmp_path / "c")
  helpers.write_png(os.path.join(root, "test", "eel", "0.png"))
  with pytest.raises(DataError, match=r"class folder\(s\) \['eel'\] that .*train lacks"):
    sources.load_folder(root)

  with pytest.raises(DataError, match=r"is not a directory"):
    data.prepare(DataConfig(dataset=f"folder:{tmp_path / 'nowhere'}"))


def test_image_size_and_skip_bad_images_need_a_folder_dataset():
  with pytest.raises(ConfigError, match="--image_size: applies to --dataset=folder:PATH and mit_indoor67 only"):
    checks.validate(config_lib.Config(data=DataConfig(image_size=32)))
  with pytest.raises(ConfigError, match="--skip_bad_images: applies to --dataset=folder:PATH"):
    checks.validate(config_lib.Config(data=DataConfig(skip_bad_images=True)))


def _mock_labels_dataset(self, *args, **kwargs):
  """Mocked cifar100 with every class present (mock_data's random labels may miss some)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del self, args, kwargs
  n = 400
  images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  return tf.data.Dataset.from_tensor_slices(
      {"image": images, "label": np.arange(n) % 100, "coarse_label": np.arange(n) % 20,
       "id": [str(i) for i in range(n)]})


def test_cifar100_through_tfds_mock():
  with tfds.testing.mock_data(num_examples=400, as_dataset_fn=_mock_labels_dataset):
    splits = data.prepare(DataConfig(dataset="cifar100", samples_per_class=2))
  assert splits.info.image_shape == (32, 32, 3) and splits.info.num_classes == 100
  assert len(splits.sampled_train(2, 0)) == 200
  assert len(splits.test) == 400


def test_missing_tfds_data_says_how_to_provide_it(tmp_path):
  with pytest.raises(DataError, match="prepare_data.py.*--data_dir"), checks.flag_errors():
    data.prepare(DataConfig(dataset="cifar100", data_dir=str(tmp_path)))


def test_tfds_data_of_another_version_lists_the_versions_found(tmp_path):
  for version in ("2.0.0", "3.0.0", "not_a_version"):
    os.makedirs(tmp_path / "cifar100" / version)
  expected = tfds.builder("cifar100", data_dir=str(tmp_path)).version
  with pytest.raises(DataError, match=rf"cifar100 has version\(s\) 3.0.0, 2.0.0, but the "
                     rf"installed tensorflow-datasets .* reads version {expected}"):
    data.prepare(DataConfig(dataset="cifar100", data_dir=str(tmp_path)))


def _indoor_tree(root, n_train=3, n_test=2, sizes=((20, 30), (25, 17))):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  lists = {"TrainImages.txt": [], "TestImages.txt": []}
  for c, name in enumerate(["bakery", "airport_inside", "kitchen"]):
    os.makedirs(root / "Images" / name)
    for i in range(n_train + n_test):
      h, w = sizes[i % 2]
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      rel = f"{name}/{name}_{i:04d}.jpg"
      tf.io.write_file(str(root / "Images" / rel), tf.io.encode_jpeg(pixels))
      lists["TrainImages.txt" if i < n_train else "TestImages.txt"].append(rel)
  for f, entries in lists.items():
    (root / f).write_text("\n".join(entries) + "\n")


def test_mit_indoor67_from_its_folder_and_lists(tmp_path):
  _indoor_tree(tmp_path)
  src = data.load_source("mit_indoor67", data.SourceOptions(data_dir=str(tmp_path),
                                                            image_size=16))
  assert src.num_classes == 3 and src.class_names == ("airport_inside", "bakery", "kitchen")
  assert src.train.images.shape == (9, 16, 16, 3) and src.test.images.shape == (6, 16, 16, 3)
  np.testing.assert_array_equal(np.bincount(src.train.labels), [3, 3, 3])


def test_mit_indoor67_says_what_is_missing(tmp_path):
  _indoor_tree(tmp_path)
  os.remove(tmp_path / "TestImages.txt")
  with pytest.raises(DataError, match="lacks TestImages.txt; --dataset=mit_indoor67 expects"), checks.flag_errors():
    data.load_source("mit_indoor67", data.SourceOptions(data_dir=str(tmp_path), image_size=16))
  (tmp_path / "TestImages.txt").write_text("kitchen/gone.jpg\n")
  with pytest.raises(DataError, match="TestImages.txt lists 1 image.* missing .*gone.jpg"):
    data.load_source("mit_indoor67", data.SourceOptions(data_dir=str(tmp_path), image_size=16))
  with pytest.raises(ConfigError, match="--image_size"), checks.flag_errors():
    data.load_source("mit_indoor67", data.SourceOptions(data_dir=str(tmp_path)))
  with pytest.raises(DataError, match="not a directory"):
    data.load_source("mit_indoor67", data.SourceOptions(data_dir=str(tmp_path / "nope")))


def test_data_errors_name_settings_to_a_python_caller(tmp_path, digits_splits):
  """The data loaders speak in DataConfig's terms; the command line (checks.flag_errors) in
  flags (the tests above)."""
  from tfjac.errors import SettingError  # pylint: disable=g-import-not-at-top
  with pytest.raises(SettingError, match=r"^data.samples_per_class: 1000 .*Use "
                     r"data.samples_per_class <= \d+") as e:
    data.prepare(DataConfig(samples_per_class=1000))
  assert e.value.setting == "data.samples_per_class" and "--" not in str(e.value)
  _indoor_tree(tmp_path)
  os.remove(tmp_path / "TestImages.txt")
  with pytest.raises(DataError, match="lacks TestImages.txt; data.dataset='mit_indoor67' "
                     "expects") as e:
    data.load_source("mit_indoor67", data.SourceOptions(data_dir=str(tmp_path), image_size=16))
  assert "--" not in str(e.value)
