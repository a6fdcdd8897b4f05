"""Data for a run: train / validation / test splits, N samples per class, tf.data pipelines.

Validation is carved from the training split (stratified, seeded), so model selection never
looks at the test split. The N-per-class subset is drawn from what remains, by a seeded
per-class permutation: the same seed gives the same images whatever the hints, and the
10-per-class subset of a seed is contained in its 50-per-class subset.

The training stream is a pure function of (seed, epoch, step): the order of pass p is a
stateless shuffle seeded by (seed, p), and an example's augmentation is seeded by (seed, p,
index). A run resumed at epoch e, step s (training/resume.py) therefore sees exactly the
batches that the uninterrupted run saw from that point.
"""
import dataclasses
from typing import Optional, Tuple

import numpy as np
import tensorflow as tf

from tfjac.config import DataConfig
from tfjac.data.sources import (FOLDER_PREFIX, SOURCES, TFDS_PREFIX, ArraySplit,  # noqa: F401
                                SourceData, SourceOptions, check_dataset_name,
                                is_folder_dataset, load_source)
from tfjac.errors import DataError, SettingError, mention


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  image_shape: Tuple[int, int, int]
  num_classes: int
  mean: Tuple[float, ...]  # per channel, of the training split, in [0, 1] units
  std: Tuple[float, ...]
  class_names: Optional[Tuple[str, ...]] = None
  skipped_files: Tuple[str, ...] = ()  # "path: why", left out under skip_bad_images


@dataclasses.dataclass(frozen=True)
class Splits:
  info: DatasetInfo
  train: ArraySplit  # all training examples outside validation
  validation: ArraySplit
  test: ArraySplit

  def sampled_train(self, samples_per_class: int, seed: int) -> ArraySplit:
    if samples_per_class == 0:
      return self.train
    return self.train.take(sample_per_class(self.train.labels, samples_per_class, seed,
                                            self.info.num_classes))


def _class_permutations(labels, num_classes, seed):
  rng = np.random.default_rng(seed)
  return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def sample_per_class(labels, n, seed, num_classes):
  """Indices of n examples of each class: the first n of a seeded per-class permutation."""
  perms = _class_permutations(labels, num_classes, seed)
  counts = [len(p) for p in perms]
  if min(counts) < n:
    short = [c for c in range(num_classes) if counts[c] < n]
    raise SettingError(
        "data.samples_per_class",
        f"{n} is more than the training split holds for class(es) {short[:10]} "
        f"(smallest class: {min(counts)} examples after the validation split; largest: "
        f"{max(counts)}). Use {mention('data.samples_per_class')} <= {min(counts)}, or 0 for "
        "all.")
  return np.sort(np.concatenate([p[:n] for p in perms]))


def split_validation(labels, fraction, seed, num_classes):
  """(train_indices, validation_indices), stratified: a fraction of each class, at least one."""
  val = []
  for perm in _class_permutations(labels, num_classes, seed + 7919):  # not the sampler's stream
    if len(perm) >= 2:
      val.append(perm[:max(1, int(round(fraction * len(perm))))])
  val = np.sort(np.concatenate(val)) if val else np.zeros([0], np.int64)
  train = np.setdiff1d(np.arange(len(labels)), val)
  return train, val


def _check_labels(source: SourceData, split: ArraySplit, where: str):
  """Labels within the classes, and every class present in the training split."""
  num_classes = source.num_classes
  if len(split) == 0:
    raise DataError(f"the {where} split of dataset {source.name!r} is empty")
  values, counts = np.unique(split.labels, return_counts=True)
  bad = [(int(v), int(n)) for v, n in zip(values, counts) if v < 0 or v >= num_classes]
  if bad:
    shown = ", ".join(f"label {v} ({n} example{'s' * (n > 1)})" for v, n in bad[:10])
    raise DataError(f"the {where} split of dataset {source.name!r} has labels outside the "
                    f"{num_classes} classes [0, {num_classes}): {shown}")
  missing = sorted(set(range(num_classes)) - set(values.tolist()))
  if where == "train" and missing:
    shown = ", ".join(source.class_name(c) for c in missing[:10])
    raise DataError(f"the training split of dataset {source.name!r} has no example of "
                    f"class(es) {shown}{' ...' if len(missing) > 10 else ''}; every class "
                    "needs training examples")


def source_options(config: DataConfig) -> SourceOptions:
  return SourceOptions(data_dir=config.data_dir, image_size=config.image_size,
                       skip_bad_images=config.skip_bad_images)


def select_classes(source: SourceData, classes) -> SourceData:
  """Keeps `classes` (indices of the source) and relabels them 0..n-1 in the order given."""
  bad = [c for c in classes if c >= source.num_classes]
  if bad:
    raise SettingError("data.classes", f"class(es) {bad} do not exist: {source.name} has "
                       f"classes 0..{source.num_classes - 1}")
  lookup = np.full(source.num_classes, -1, np.int64)
  lookup[list(classes)] = np.arange(len(classes))

  def keep(split):
    mask = lookup[split.labels] >= 0
    return ArraySplit(split.images[mask], lookup[split.labels[mask]].astype(np.int32))

  name = f"{source.name}[{','.join(str(c) for c in classes)}]"
  names = tuple(source.class_names[c] for c in classes) if source.class_names else None
  return SourceData(name, len(classes), keep(source.train), keep(source.test),
                    class_names=names, skipped_files=source.skipped_files)


def prepare(config: DataConfig) -> Splits:
  source: SourceData = load_source(config.dataset, source_options(config))
  if config.classes:
    source = select_classes(source, config.classes)
  _check_labels(source, source.train, "train")
  _check_labels(source, source.test, "test")
  train_idx, val_idx = split_validation(source.train.labels, config.validation_fraction,
                                        config.seed, source.num_classes)
  train = source.train.take(train_idx)
  axes = (0, 1, 2)
  info = DatasetInfo(
      name=source.name,
      image_shape=source.image_shape,
      num_classes=source.num_classes,
      mean=tuple(float(v) for v in train.images.mean(axis=axes)),
      std=tuple(float(v) for v in np.maximum(train.images.std(axis=axes), 1e-3)),
      class_names=source.class_names, skipped_files=source.skipped_files)
  splits = Splits(info, train, source.train.take(val_idx), source.test)
  if config.samples_per_class:
    splits.sampled_train(config.samples_per_class, config.seed)  # fail now, not after the teacher
  return splits


def _augment_fn(augment, padding, image_shape):
  """Augmentation of one example, stateless: the same (image, seed) gives the same result."""
  h, w, c = image_shape
  pad = padding or max(1, h // 8)

  def fn(image, example_seed):
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(example_seed, 2))
    if "crop" in augment:
      padded = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]], mode="REFLECT")
      image = tf.image.stateless_random_crop(padded, [h, w, c], seed=crop_seed)
    if "flip" in augment:
      image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image

  return fn


# Distinct streams for the order and the augmentation, derived from the run's seed.
_ORDER_STREAM, _AUGMENT_STREAM = 1, 2


def _pass_order(seed, n):
  """A function pass -> dataset of (pass, index), the pass's order a stateless shuffle."""
  base = tf.constant([seed, _ORDER_STREAM], tf.int64)

  def order(p):
    indices = tf.random.experimental.stateless_shuffle(
        tf.range(n, dtype=tf.int64), seed=tf.random.experimental.stateless_fold_in(base, p))
    return tf.data.Dataset.from_tensor_slices(indices).map(lambda i: (p, i))

  return order


def training_batches(split: ArraySplit, batch_size: int, *, seed: int, epochs: int,
                     steps_per_epoch: int = 0, start_epoch: int = 0, start_step: int = 0,
                     augment=(), crop_padding: int = 0, extras=None) -> tf.data.Dataset:
  """The training batches from (start_epoch, start_step) on: a pure function of the seed.

  steps_per_epoch == 0: epoch e is one pass over `split` (pass e), its last batch partial;
  the stream ends after epoch `epochs` - 1. steps_per_epoch > 0: the passes follow each other
  without a break and epoch e is batches [e * steps, (e + 1) * steps) of that endless stream.
  extras: {name: array [len(split), ...]} of per-example values (the teacher cache,
  training/teacher_cache.py), batched as a third element {name: [batch, ...]} beside each
  example; only without augmentation, where they describe the image actually fed.
  """
  n = len(split)
  images = tf.constant(split.images)
  labels = tf.constant(split.labels)
  if extras is not None:
    if augment:
      raise ValueError("per-example extras describe the un-augmented images: no augmentation")
    wrong = {k: len(v) for k, v in extras.items() if len(v) != n}
    if wrong:
      raise ValueError(f"extras must have one row per example ({n}), got {wrong}")
    extras = {k: tf.constant(v) for k, v in extras.items()}
  order = _pass_order(seed, n)
  augment_base = tf.constant([seed, _AUGMENT_STREAM], tf.int64)
  augment_fn = _augment_fn(tuple(augment), crop_padding, split.images.shape[1:])

  def load(p, i):
    image = tf.gather(images, i)
    if augment:
      fold = tf.random.experimental.stateless_fold_in
      image = augment_fn(image, fold(fold(augment_base, p), i))
    if extras is not None:
      return image, tf.gather(labels, i), {k: tf.gather(v, i) for k, v in extras.items()}
    return image, tf.gather(labels, i)

  def batched(examples):
    return examples.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)

  if steps_per_epoch:
    position = (start_epoch * steps_per_epoch + start_step) * batch_size
    examples = tf.data.Dataset.range(position // n, 2**62).flat_map(order)
    ds = batched(examples.skip(position % n))
  else:
    first = batched(order(tf.constant(start_epoch, tf.int64)).skip(start_step * batch_size))
    rest = tf.data.Dataset.range(start_epoch + 1, max(epochs, start_epoch + 1)).flat_map(
        lambda p: batched(order(p)))
    ds = first.concatenate(rest)
  return ds.prefetch(tf.data.AUTOTUNE)


def pipeline(split: ArraySplit, batch_size: int, *, training: bool = False, seed: int = 0,
             augment=(), crop_padding: int = 0) -> tf.data.Dataset:
  """Batches of (float32 images in [0, 1], int32 labels), batched at the *global* batch size.
  training: one shuffled (and augmented) pass, the first epoch of `training_batches`."""
  if training:
    return training_batches(split, batch_size, seed=seed, epochs=1, augment=augment,
                            crop_padding=crop_padding)
  ds = tf.data.Dataset.from_tensor_slices((split.images, split.labels))
  return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
