"""Dataset sources: each returns the whole train and test splits as numpy arrays.

A source never downloads: the embedded dataset ships in the package, and tensorflow-datasets
sources read a prepared `data_dir` (see tools/prepare_data.py). Arrays rather than streams keep
per-class sampling and the validation split exact and reproducible; the datasets here fit in
memory (CIFAR-100: 180 MB as uint8).
"""
import dataclasses
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np

from tfjac.errors import ConfigError, DataError

EMBEDDED_DIR = os.path.join(os.path.dirname(__file__), "embedded")


@dataclasses.dataclass(frozen=True)
class ArraySplit:
  images: np.ndarray  # float32 in [0, 1], NHWC
  labels: np.ndarray  # int32

  def __len__(self):
    return len(self.labels)

  def take(self, indices):
    return ArraySplit(self.images[indices], self.labels[indices])


@dataclasses.dataclass(frozen=True)
class SourceData:
  name: str
  num_classes: int
  train: ArraySplit
  test: ArraySplit

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(int(d) for d in self.train.images.shape[1:])


def _to_float(images, max_value=255.0):
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  return images.astype(np.float32) / np.float32(max_value)


def load_digits(data_dir: Optional[str] = None) -> SourceData:
  """The embedded 8x8 UCI handwritten digits (CC BY 4.0); see data/embedded/README.md."""
  del data_dir  # embedded: nothing to point at
  with np.load(os.path.join(EMBEDDED_DIR, "digits.npz")) as f:
    images = _to_float(f["images"], float(f["max_value"]))
    labels = f["labels"].astype(np.int32)
    split = f["split"]
  return SourceData(
      name="digits",
      num_classes=10,
      train=ArraySplit(images[split == 0], labels[split == 0]),
      test=ArraySplit(images[split == 1], labels[split == 1]))


def _tfds_hint(name, data_dir):
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return (f"Dataset {name!r} is not prepared in {where}. tfjac never downloads during a run. "
          f"On a machine with internet access run `python tools/prepare_data.py --dataset={name} "
          f"--data_dir=DIR` (or `tfds build {name} --data_dir=DIR`), copy DIR/{name}/ to this "
          f"machine and pass --data_dir=DIR.")


def load_tfds(name: str, data_dir: Optional[str] = None) -> SourceData:
  """A tensorflow-datasets image classification dataset with 'train' and 'test' splits."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    raise ConfigError("dataset", f"tensorflow-datasets has no dataset {name!r}: {e}") from e
  try:
    splits = tfds.load(name, split=["train", "test"], data_dir=data_dir, download=False,
                       as_supervised=True, shuffle_files=False)
  except (AssertionError, FileNotFoundError) as e:
    raise DataError(_tfds_hint(name, data_dir)) from e
  except Exception as e:
    if type(e).__name__ in ("DatasetNotFoundError", "NotFoundError"):
      raise DataError(_tfds_hint(name, data_dir)) from e
    raise
  (train_x, train_y), (test_x, test_y) = (_as_arrays(tfds, ds) for ds in splits)
  num_classes = builder.info.features["label"].num_classes
  return SourceData(
      name=name,
      num_classes=int(num_classes),
      train=ArraySplit(_to_float(train_x), train_y.astype(np.int32)),
      test=ArraySplit(_to_float(test_x), test_y.astype(np.int32)))


def _as_arrays(tfds, ds):
  # Batched iteration rather than batch_size=-1, which needs a known cardinality.
  xs, ys = [], []
  for x, y in tfds.as_numpy(ds.batch(4096)):
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys)


SOURCES: Dict[str, Callable[[Optional[str]], SourceData]] = {
    "digits": load_digits,
    "cifar10": lambda data_dir: load_tfds("cifar10", data_dir),
    "cifar100": lambda data_dir: load_tfds("cifar100", data_dir),
}
TFDS_PREFIX = "tfds:"


def check_dataset_name(name: str):
  if name in SOURCES or (name.startswith(TFDS_PREFIX) and len(name) > len(TFDS_PREFIX)):
    return
  raise ConfigError("dataset", f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}, or "
                    f"{TFDS_PREFIX}NAME for any tensorflow-datasets image classification dataset")


def load_source(name: str, data_dir: Optional[str] = None) -> SourceData:
  check_dataset_name(name)
  if name.startswith(TFDS_PREFIX):
    return load_tfds(name[len(TFDS_PREFIX):], data_dir)
  return SOURCES[name](data_dir)
