"""Dataset sources: each returns the whole train and test splits as numpy arrays.

A source never downloads: the embedded dataset ships in the package, tensorflow-datasets
sources read a prepared `data_dir` (see tools/prepare_data.py), and `folder:PATH` reads image
files laid out one sub-folder per class. Arrays rather than streams keep per-class sampling and
the validation split exact and reproducible; the datasets here fit in memory (CIFAR-100: 180 MB
as uint8, 720 MB as float32).
"""
import dataclasses
import os
import re
from typing import Callable, Dict, Optional, Tuple

import numpy as np
from absl import logging

from tfjac.errors import DataError, SettingError, mention

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
class SourceOptions:
  """What a source may need besides its name; each source uses the fields that apply to it."""
  data_dir: Optional[str] = None  # tensorflow-datasets data_dir
  image_size: int = 0  # folder: resize every image to this square size; 0: all the same size
  skip_bad_images: bool = False  # folder: skip (and count) unreadable files instead of failing


@dataclasses.dataclass(frozen=True)
class SourceData:
  name: str
  num_classes: int
  train: ArraySplit
  test: ArraySplit
  class_names: Optional[Tuple[str, ...]] = None  # index -> name, where the source knows them
  skipped_files: Tuple[str, ...] = ()  # "path: why", files left out under skip_bad_images

  def class_name(self, index) -> str:
    if self.class_names and 0 <= index < len(self.class_names):
      return f"{index} ({self.class_names[index]!r})"
    return str(index)

  @property
  def image_shape(self) -> Tuple[int, int, int]:
    return tuple(int(d) for d in self.train.images.shape[1:])


def _to_float(images, max_value=255.0):
  images = np.asarray(images)
  if images.ndim == 3:
    images = images[..., None]
  return images.astype(np.float32) / np.float32(max_value)


def load_digits(options: SourceOptions = SourceOptions()) -> SourceData:
  """The embedded 8x8 UCI handwritten digits (CC BY 4.0); see data/embedded/README.md."""
  del options  # embedded: nothing to point at
  with np.load(os.path.join(EMBEDDED_DIR, "digits.npz")) as f:
    images = _to_float(f["images"], float(f["max_value"]))
    labels = f["labels"].astype(np.int32)
    split = f["split"]
  return SourceData(
      name="digits",
      num_classes=10,
      train=ArraySplit(images[split == 0], labels[split == 0]),
      test=ArraySplit(images[split == 1], labels[split == 1]),
      class_names=tuple(str(d) for d in range(10)))


def _tfds_hint(name, data_dir):
  where = data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return (f"Dataset {name!r} is not prepared in {where}. tfjac never downloads during a run. "
          f"On a machine with internet access run `python tools/prepare_data.py --dataset={name} "
          f"--data_dir=DIR` (or `tfds build {name} --data_dir=DIR`), copy DIR/{name}/ to this "
          f"machine and pass {mention('data.data_dir', 'DIR')}.")


_VERSION_DIR = re.compile(r"^\d+\.\d+\.\d+$")


def _tfds_missing(tfds, builder, name, data_dir) -> DataError:
  """The data is not there: say which versions are there instead, if any, else how to prepare."""
  dataset_dir = os.path.dirname(builder.data_dir)  # <data_dir>/<name>[/<config>]
  found = sorted((d for d in (os.listdir(dataset_dir) if os.path.isdir(dataset_dir) else ())
                  if _VERSION_DIR.match(d) and d != str(builder.version)),
                 key=lambda v: tuple(int(p) for p in v.split(".")), reverse=True)
  if not found:
    return DataError(_tfds_hint(name, data_dir))
  return DataError(
      f"Dataset {name!r} in {dataset_dir} has version(s) {', '.join(found)}, but the installed "
      f"tensorflow-datasets {tfds.__version__} reads version {builder.version}. Prepare it "
      f"with this tensorflow-datasets (python tools/prepare_data.py --dataset={name} "
      f"--data_dir=DIR), or install the tensorflow-datasets release that wrote version "
      f"{found[0]}.")


def load_tfds(name: str, options: SourceOptions = SourceOptions()) -> SourceData:
  """A tensorflow-datasets image classification dataset with 'train' and 'test' splits."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = options.data_dir
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    raise SettingError("data.dataset", f"tensorflow-datasets has no dataset {name!r}: {e}") from e
  try:
    splits = tfds.load(name, split=["train", "test"], data_dir=data_dir, download=False,
                       as_supervised=True, shuffle_files=False)
  except (AssertionError, FileNotFoundError) as e:
    raise _tfds_missing(tfds, builder, name, data_dir) from e
  except Exception as e:
    if type(e).__name__ in ("DatasetNotFoundError", "NotFoundError"):
      raise _tfds_missing(tfds, builder, name, data_dir) from e
    raise
  (train_x, train_y), (test_x, test_y) = (_as_arrays(tfds, ds) for ds in splits)
  label = builder.info.features["label"]
  return SourceData(
      name=name,
      num_classes=int(label.num_classes),
      train=ArraySplit(_to_float(train_x), train_y.astype(np.int32)),
      test=ArraySplit(_to_float(test_x), test_y.astype(np.int32)),
      class_names=tuple(label.names) if getattr(label, "names", None) else None)


def _as_arrays(tfds, ds):
  # Batched iteration rather than batch_size=-1, which needs a known cardinality.
  xs, ys = [], []
  for x, y in tfds.as_numpy(ds.batch(4096)):
    xs.append(x)
    ys.append(y)
  return np.concatenate(xs), np.concatenate(ys)


# --- folder:PATH --------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
FOLDER_LAYOUT = ("PATH/train/<class>/*.jpg|jpeg|png and PATH/test/<class>/..., one sub-folder "
                 "per class, the same class names in both")


def _class_dirs(split_dir):
  if not os.path.isdir(split_dir):
    raise DataError(f"{split_dir} is not a directory; a folder dataset is laid out as "
                    f"{FOLDER_LAYOUT}")
  return sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))


def _image_files(class_dir):
  return sorted(os.path.join(class_dir, f) for f in os.listdir(class_dir)
                if f.lower().endswith(IMAGE_EXTENSIONS)
                and os.path.isfile(os.path.join(class_dir, f)))


def _decode_error(e) -> str:
  message = getattr(e, "message", None) or str(e)
  message = re.sub(r"\{\{[^}]*\}\}\s*", "", message)  # TF's "{{function_node ...}}" prefix
  return re.sub(r"\s*\[Op:\w+\]", "", message).strip()


def _decode(path):
  """uint8 HxWxC array of an image file; raises DataError naming the file."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  try:
    raw = tf.io.read_file(path)
    return tf.io.decode_image(raw, expand_animations=False).numpy()
  except (tf.errors.OpError, OSError) as e:
    raise DataError(f"cannot read image {path}: {_decode_error(e)}") from e


def _resized(image, size):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  image = tf.image.resize(image.astype(np.float32) / 255.0, [size, size], antialias=True)
  return np.clip(image.numpy(), 0.0, 1.0)


def _to_channels(image, channels):
  if image.shape[-1] == channels:
    return image
  if channels == 3:  # grey (+alpha) -> RGB; RGBA -> RGB
    return np.repeat(image[..., :1], 3, axis=-1) if image.shape[-1] < 3 else image[..., :3]
  return image[..., :1]


def _read_split(split_dir, classes, options: SourceOptions, skipped):
  """Decoded images and labels of one split of a folder dataset; see _read_files."""
  by_class = []
  for name in classes:
    class_dir = os.path.join(split_dir, name)
    files = _image_files(class_dir) if os.path.isdir(class_dir) else []
    if not files:
      raise DataError(f"class {name!r} has no images in {class_dir} (looked for "
                      f"{', '.join(IMAGE_EXTENSIONS)} files); remove the folder or add images")
    by_class.append((name, class_dir, files))
  if not by_class:
    raise DataError(f"{split_dir} has no class sub-folders with images; expected "
                    f"{FOLDER_LAYOUT}")
  return _read_files(by_class, options, skipped)


def _read_files(by_class, options: SourceOptions, skipped):
  """[(class name, where, [paths])] -> ArraySplit labelled by position in the list;
  `skipped` collects "path: why" under skip_bad_images."""
  images, labels, first = [], [], None
  for label, (name, where, files) in enumerate(by_class):
    kept = 0
    for path in files:
      try:
        image = _decode(path)
      except DataError as e:
        if not options.skip_bad_images:
          raise DataError(f"{e}. Fix or remove the file, or pass "
                          f"{mention('data.skip_bad_images', True)} to skip unreadable files and "
                          "count them") from e.__cause__
        logging.warning("skipping unreadable image %s", path)
        skipped.append(f"{path}: {_decode_error(e.__cause__)}")
        continue
      if options.image_size:
        image_f = _resized(image, options.image_size)
      else:
        if first is None:
          first = (path, image.shape[:2])
        elif image.shape[:2] != first[1]:
          raise SettingError(
              "data.image_size", f"images differ in size: {path} is {image.shape[1]}x"
              f"{image.shape[0]} but {first[0]} is {first[1][1]}x{first[1][0]} (width x "
              f"height); pass {mention('data.image_size', 'N')} to resize every image to NxN")
        image_f = image.astype(np.float32) / np.float32(255.0)
      images.append(image_f)
      labels.append(label)
      kept += 1
    if not kept:
      raise DataError(f"class {name!r}: none of the {len(files)} images in {where} can be "
                      "read")
  channels = 3 if any(im.shape[-1] >= 3 for im in images) else 1
  return ArraySplit(np.stack([_to_channels(im, channels) for im in images]),
                    np.asarray(labels, np.int32))


def load_folder(path: str, options: SourceOptions = SourceOptions()) -> SourceData:
  """Images in PATH/train/<class>/ and PATH/test/<class>/; classes sorted by name."""
  root = os.path.expanduser(path)
  if not os.path.isdir(root):
    raise DataError(f"{mention('data.dataset', FOLDER_PREFIX + path)}: {root} is not a "
                    "directory; expected "
                    f"{FOLDER_LAYOUT}")
  classes = _class_dirs(os.path.join(root, "train"))
  if not classes:
    raise DataError(f"{os.path.join(root, 'train')} has no class sub-folders; expected "
                    f"{FOLDER_LAYOUT}")
  extra = sorted(set(_class_dirs(os.path.join(root, "test"))) - set(classes))
  if extra:
    raise DataError(f"{os.path.join(root, 'test')} has class folder(s) {extra[:10]} that "
                    f"{os.path.join(root, 'train')} lacks; the classes must be the same")
  skipped = []
  train = _read_split(os.path.join(root, "train"), classes, options, skipped)
  # A class may be absent from test (not evaluated), but a test folder of it must hold images.
  test_classes = [c if os.path.isdir(os.path.join(root, "test", c)) else None for c in classes]
  test = _read_split(os.path.join(root, "test"), [c for c in test_classes if c], options,
                     skipped)
  present = [i for i, c in enumerate(test_classes) if c]
  test = ArraySplit(test.images, np.asarray(present, np.int32)[test.labels])
  if train.images.shape[-1] != test.images.shape[-1]:  # e.g. grey train, colour test
    test = ArraySplit(np.stack([_to_channels(im, train.images.shape[-1])
                                for im in test.images]), test.labels)
  if train.images.shape[1:3] != test.images.shape[1:3]:
    raise SettingError("data.image_size", f"train images are {train.images.shape[2]}x"
                       f"{train.images.shape[1]} but test images are {test.images.shape[2]}x"
                       f"{test.images.shape[1]}; pass {mention('data.image_size', 'N')} to "
                       "resize all to NxN")
  if skipped:
    logging.warning("skipped %d unreadable image(s) under %s", len(skipped), root)
  return SourceData(name=f"{FOLDER_PREFIX}{os.path.basename(os.path.normpath(root))}",
                    num_classes=len(classes), train=train, test=test,
                    class_names=tuple(classes), skipped_files=tuple(skipped))


# --- MIT Indoor 67 -------------------------------------------------------------------------

INDOOR_LISTS = ("TrainImages.txt", "TestImages.txt")
INDOOR_LAYOUT = ("DIR/Images/<category>/<file>.jpg (the 67 category folders of indoorCVPR_09."
                 "tar) and the official split lists DIR/TrainImages.txt and DIR/TestImages.txt "
                 "(lines like 'airport_inside/airport_inside_0001.jpg', 80 train and 20 test "
                 "images per category)")


def _read_list(path):
  with open(path) as f:
    return [line.strip().replace("\\", "/") for line in f if line.strip()]


def load_indoor67(options: SourceOptions = SourceOptions()) -> SourceData:
  """MIT Indoor Scenes (Quattoni & Torralba 2009) from its image folder and the official
  train/test image lists; images are resized to options.image_size (they come in many sizes)."""
  root = os.path.expanduser(options.data_dir or "")
  if not options.data_dir or not os.path.isdir(root):
    raise DataError(f"{mention('data.dataset', 'mit_indoor67')} reads "
                    f"{mention('data.data_dir', 'DIR')}, laid out as {INDOOR_LAYOUT}; "
                    f"{root or 'no ' + mention('data.data_dir')} is not a directory. The images and lists come "
                    "from https://web.mit.edu/torralba/www/indoor.html")
  images_dir = next((d for d in (os.path.join(root, "Images"),
                                 os.path.join(root, "indoorCVPR_09", "Images"))
                     if os.path.isdir(d)), None)
  missing = [f for f in INDOOR_LISTS if not os.path.isfile(os.path.join(root, f))]
  if images_dir is None or missing:
    what = (["Images/"] if images_dir is None else []) + missing
    raise DataError(f"{root} lacks {', '.join(what)}; {mention('data.dataset', 'mit_indoor67')} "
                    "expects "
                    f"{INDOOR_LAYOUT}")
  if not options.image_size:
    raise SettingError("data.image_size", "MIT Indoor images come in many sizes: pass "
                       f"{mention('data.image_size', 'N')} (e.g. 64) to resize them to NxN")
  lists = [_read_list(os.path.join(root, f)) for f in INDOOR_LISTS]
  classes = sorted({entry.split("/")[0] for entry in lists[0]})
  skipped, splits = [], []
  for list_name, entries in zip(INDOOR_LISTS, lists):
    unknown = sorted({e.split("/")[0] for e in entries} - set(classes))
    if unknown:
      raise DataError(f"{list_name} names categories {unknown[:5]} that TrainImages.txt lacks")
    by_class = []
    for name in classes:
      files = [os.path.join(images_dir, e) for e in entries if e.split("/")[0] == name]
      absent = [p for p in files if not os.path.isfile(p)]
      if absent and not options.skip_bad_images:
        raise DataError(f"{list_name} lists {len(absent)} image(s) missing from {images_dir}, "
                        f"e.g. {absent[0]}; restore them or pass "
                        f"{mention('data.skip_bad_images', True)}")
      skipped.extend(f"{p}: missing" for p in absent)
      files = [p for p in files if p not in absent]
      if files:
        by_class.append((name, images_dir, files))
    split = _read_files(by_class, options, skipped)
    present = np.asarray([classes.index(name) for name, _, _ in by_class], np.int32)
    splits.append(ArraySplit(split.images, present[split.labels]))
  return SourceData(name="mit_indoor67", num_classes=len(classes), train=splits[0],
                    test=splits[1], class_names=tuple(classes), skipped_files=tuple(skipped))


# --- Fashion-MNIST --------------------------------------------------------------------------

# Where Debian's package `dataset-fashion-mnist` puts the four IDX files (gzip'd); a module
# constant so that tests can point it elsewhere.
FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {  # split -> (images, labels), as Zalando publishes them
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_UBYTE = 0x08


def _idx_path(directory, name):
  """`name` or `name.gz` in `directory`, or None."""
  for candidate in (name, name + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  return None


def read_idx(path: str, ndim: int) -> np.ndarray:
  """An IDX file of unsigned bytes (the MNIST format): magic 0x0000 08 <ndim>, then ndim
  big-endian int32 sizes, then the data; gzip'd when the name ends in .gz. DataError naming
  the file if it is not that."""
  import gzip  # pylint: disable=g-import-not-at-top
  try:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read {path}: {e}") from e
  if len(raw) < 4 + 4 * ndim or raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path} is not an IDX file (its first bytes are not the IDX magic "
                    "number 0x0000TTNN)")
  if raw[2] != _IDX_UBYTE or raw[3] != ndim:
    raise DataError(f"{path}: IDX type 0x{raw[2]:02x} with {raw[3]} dimension(s), expected "
                    f"unsigned bytes (0x08) with {ndim}")
  shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
  size = int(np.prod(shape))
  if len(raw) - 4 - 4 * ndim != size:
    raise DataError(f"{path}: its header says {'x'.join(map(str, shape))} = {size} bytes of "
                    f"data, the file holds {len(raw) - 4 - 4 * ndim}: truncated or not this "
                    "file")
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist_idx_dir(options: SourceOptions) -> Optional[str]:
  """The first of `data_dir` and Debian's directory that holds all four IDX files."""
  for directory in (options.data_dir, FASHION_MNIST_DEBIAN_DIR):
    if directory and all(_idx_path(os.path.expanduser(directory), name) for pair in
                         FASHION_MNIST_FILES.values() for name in pair):
      return os.path.expanduser(directory)
  return None


def load_fashion_mnist(options: SourceOptions = SourceOptions()) -> SourceData:
  """Fashion-MNIST (Zalando, MIT licence; 60,000 training and 10,000 test 28x28 grey images,
  10 classes) from its four IDX files: in options.data_dir, or where Debian's `dataset-fashion-mnist`
  installs them; else tensorflow-datasets' `fashion_mnist` prepared in data_dir."""
  directory = _fashion_mnist_idx_dir(options)
  if directory is None:
    return _fashion_mnist_tfds(options)
  splits = {}
  for split, (images_name, labels_name) in FASHION_MNIST_FILES.items():
    images_path = _idx_path(directory, images_name)
    labels_path = _idx_path(directory, labels_name)
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
      raise DataError(f"{images_path} holds {len(images)} images but {labels_path} "
                      f"{len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
      raise DataError(f"{labels_path} has label {int(labels.max())}; Fashion-MNIST has "
                      f"classes 0..{len(FASHION_MNIST_CLASSES) - 1}")
    splits[split] = ArraySplit(_to_float(images), labels.astype(np.int32))
  logging.info("Fashion-MNIST from the IDX files in %s", directory)
  return SourceData(name="fashion_mnist", num_classes=len(FASHION_MNIST_CLASSES),
                    train=splits["train"], test=splits["test"],
                    class_names=FASHION_MNIST_CLASSES)


def _fashion_mnist_tfds(options: SourceOptions) -> SourceData:
  files = ", ".join(f"{n}[.gz]" for pair in FASHION_MNIST_FILES.values() for n in pair)
  looked = " and ".join(d for d in (options.data_dir, FASHION_MNIST_DEBIAN_DIR) if d)
  try:
    import tensorflow_datasets  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    tfds_hint = ""
  else:
    try:
      source = load_tfds("fashion_mnist", options)
    except DataError as e:
      tfds_hint = f" Nor is tensorflow-datasets' fashion_mnist there: {e}"
    else:
      return SourceData(name="fashion_mnist", num_classes=source.num_classes,
                        train=source.train, test=source.test,
                        class_names=source.class_names or FASHION_MNIST_CLASSES)
  raise DataError(
      f"{mention('data.dataset', 'fashion_mnist')}: no Fashion-MNIST IDX files ({files}) in {looked}. Install "
      "Debian's package, which puts them in " + FASHION_MNIST_DEBIAN_DIR + ": `sudo apt-get "
      "install dataset-fashion-mnist`; or copy the four files into a directory and pass "
      f"{mention('data.data_dir', 'DIR')}." + tfds_hint)


# --- the registry ---------------------------------------------------------------------------

SOURCES: Dict[str, Callable[[SourceOptions], SourceData]] = {
    "digits": load_digits,
    "cifar10": lambda options: load_tfds("cifar10", options),
    "cifar100": lambda options: load_tfds("cifar100", options),
    "mit_indoor67": load_indoor67,
    "fashion_mnist": load_fashion_mnist,
}
TFDS_PREFIX = "tfds:"
FOLDER_PREFIX = "folder:"
# Prefix -> loader(rest of the name, options): `tfds:NAME`, `folder:PATH`.
PREFIXED_SOURCES: Dict[str, Callable[[str, SourceOptions], SourceData]] = {
    TFDS_PREFIX: load_tfds,
    FOLDER_PREFIX: load_folder,
}


def _split_prefix(name: str):
  for prefix in PREFIXED_SOURCES:
    if name.startswith(prefix) and len(name) > len(prefix):
      return prefix, name[len(prefix):]
  return None, name


def check_dataset_name(name: str):
  if name in SOURCES or _split_prefix(name)[0]:
    return
  raise SettingError("data.dataset", f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}, "
                     f"{TFDS_PREFIX}NAME for any tensorflow-datasets image classification "
                    f"dataset, or {FOLDER_PREFIX}PATH for image files in {FOLDER_LAYOUT}")


def is_folder_dataset(name: str) -> bool:
  """Sources that decode image files (and so take image_size and skip_bad_images)."""
  return _split_prefix(name)[0] == FOLDER_PREFIX or name == "mit_indoor67"


def load_source(name: str, options: SourceOptions = SourceOptions()) -> SourceData:
  check_dataset_name(name)
  prefix, rest = _split_prefix(name)
  if prefix:
    return PREFIXED_SOURCES[prefix](rest, options)
  return SOURCES[name](options)
