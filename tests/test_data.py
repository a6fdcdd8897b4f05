"""Splits, the seeded N-per-class sampler, and the tensorflow-datasets path (mocked, offline)."""
import numpy as np
import pytest
import tensorflow_datasets as tfds

from tfjac import data
from tfjac.config import DataConfig
from tfjac.errors import ConfigError, DataError


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
  with pytest.raises(ConfigError, match=r"--samples_per_class: 1000 .*smallest class: \d+ examples"):
    data.prepare(DataConfig(samples_per_class=1000))


def test_validation_is_disjoint_stratified_and_seeded():
  s0 = data.prepare(DataConfig(seed=0))
  s1 = data.prepare(DataConfig(seed=1))
  assert 0.08 < len(s0.validation) / (len(s0.train) + len(s0.validation)) < 0.12
  assert set(np.unique(s0.validation.labels)) == set(range(10))
  rows = lambda split: {r.tobytes() for r in split.images}  # noqa: E731
  assert not rows(s0.validation) & rows(s0.test)
  assert not rows(s0.validation) & rows(s0.train) - rows(s0.validation)
  assert rows(s0.validation) != rows(s1.validation)


def test_pipeline_batches_and_augments(digits_splits):
  ds = data.pipeline(digits_splits.train, 16, training=True, augment=("crop", "flip"))
  x, y = next(iter(ds))
  assert x.shape == (16, 8, 8, 1) and y.shape == (16,)


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
  with pytest.raises(DataError, match="prepare_data.py.*--data_dir"):
    data.prepare(DataConfig(dataset="cifar100", data_dir=str(tmp_path)))
