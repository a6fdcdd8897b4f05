"""--dataset=fashion_mnist: the IDX files of Debian's dataset-fashion-mnist (gzip'd or not),
read from tiny files written here in the real format; the tfds fallback; the message when
neither is there. Nothing here needs the Debian package."""
import gzip
import struct

import numpy as np
import pytest

from tfjac import checks, data
from tfjac.config import DataConfig
from tfjac.data import sources
from tfjac.errors import DataError


def _idx(array):
  """The IDX encoding of a uint8 array, written by hand: 0x00 0x00, type 0x08, ndim, then
  big-endian int32 sizes and the bytes in C order."""
  array = np.asarray(array, np.uint8)
  header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
  header += b"".join(struct.pack(">i", d) for d in array.shape)
  return header + array.tobytes()


def _write(directory, split, images, labels, gz):
  names = sources.FASHION_MNIST_FILES[split]
  for name, array in zip(names, (images, labels)):
    if gz:
      with gzip.open(directory / (name + ".gz"), "wb") as f:
        f.write(_idx(array))
    else:
      (directory / name).write_bytes(_idx(array))


@pytest.fixture
def idx_dir(tmp_path, monkeypatch):
  """3 training and 1 test image per class, 4 rows x 5 columns (not square: rows and columns
  cannot be swapped unnoticed), every pixel distinct within an image. Train gzip'd (as Debian
  ships it), test not."""
  monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "not_installed"))
  directory = tmp_path / "fmnist"
  directory.mkdir()
  rng = np.random.default_rng(0)
  train_y = np.repeat(np.arange(10), 3)
  test_y = np.arange(10)[::-1].copy()
  train_x = rng.integers(0, 256, size=(30, 4, 5))
  test_x = rng.integers(0, 256, size=(10, 4, 5))
  _write(directory, "train", train_x, train_y, gz=True)
  _write(directory, "test", test_x, test_y, gz=False)
  return directory, (train_x, train_y, test_x, test_y)


def test_reads_the_idx_files_pixel_for_pixel(idx_dir):
  directory, (train_x, train_y, test_x, test_y) = idx_dir
  source = sources.load_source("fashion_mnist", sources.SourceOptions(data_dir=str(directory)))
  assert source.num_classes == 10 and source.class_names[9] == "Ankle boot"
  assert source.train.images.shape == (30, 4, 5, 1) and source.test.images.shape == (10, 4, 5, 1)
  np.testing.assert_array_equal(source.train.images[..., 0], train_x.astype(np.float32) / 255)
  np.testing.assert_array_equal(source.test.images[..., 0], test_x.astype(np.float32) / 255)
  np.testing.assert_array_equal(source.train.labels, train_y)
  np.testing.assert_array_equal(source.test.labels, test_y)
  splits = data.prepare(DataConfig(dataset="fashion_mnist", data_dir=str(directory)))
  assert splits.info.image_shape == (4, 5, 1) and len(splits.validation) == 10  # 1 of 3 each


def test_bad_files_are_named(idx_dir):
  directory, _ = idx_dir
  labels = directory / "t10k-labels-idx1-ubyte"
  labels.write_bytes(_idx(np.arange(10))[:-3])
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte: its header says 10 = 10 bytes "
                     "of data, the file holds 7"):
    sources.load_fashion_mnist(sources.SourceOptions(data_dir=str(directory)))
  labels.write_bytes(b"\x1f\x8b" + _idx(np.arange(10)))
  with pytest.raises(DataError, match="t10k-labels-idx1-ubyte is not an IDX file"):
    sources.load_fashion_mnist(sources.SourceOptions(data_dir=str(directory)))
  labels.write_bytes(_idx(np.arange(10)[:, None]))  # 2 dimensions where 1 is expected
  with pytest.raises(DataError, match="with 2 dimension.*expected unsigned bytes .* with 1"):
    sources.load_fashion_mnist(sources.SourceOptions(data_dir=str(directory)))
  labels.write_bytes(_idx(np.arange(10) + 1))
  with pytest.raises(DataError, match="label 10; Fashion-MNIST has classes 0..9"):
    sources.load_fashion_mnist(sources.SourceOptions(data_dir=str(directory)))


def test_debian_directory_is_the_default(idx_dir, monkeypatch):
  directory, (train_x, _, _, _) = idx_dir
  monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIR", str(directory))
  source = sources.load_fashion_mnist(sources.SourceOptions())
  np.testing.assert_array_equal(source.train.images[..., 0], train_x.astype(np.float32) / 255)


def test_neither_files_nor_tfds_says_how_to_install(tmp_path, monkeypatch):
  monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "not_installed"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(DataError, match=r"no Fashion-MNIST IDX files .* in .*empty and "
                     r".*not_installed\. Install Debian's package.*apt-get install "
                     r"dataset-fashion-mnist.*--data_dir=DIR\. Nor is tensorflow-datasets' "
                     r"fashion_mnist there"), checks.flag_errors():
    sources.load_fashion_mnist(sources.SourceOptions(data_dir=str(tmp_path / "empty")))


def test_falls_back_to_tfds(tmp_path, monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  monkeypatch.setattr(sources, "FASHION_MNIST_DEBIAN_DIR", str(tmp_path / "not_installed"))
  with tfds.testing.mock_data(num_examples=20):
    source = sources.load_fashion_mnist(sources.SourceOptions(data_dir=str(tmp_path)))
  assert source.name == "fashion_mnist" and source.num_classes == 10
  assert source.train.images.shape == (20, 28, 28, 1)
