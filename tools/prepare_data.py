"""Downloads and prepares a tensorflow-datasets dataset for tfjac (needs internet access).

tfjac never downloads during a run. On a machine with internet access run
  python tools/prepare_data.py --dataset=cifar100 --data_dir=DIR
then (copying DIR/<dataset>/ to the training machine if it is another one) train with
  python -m tfjac.run --flagfile=flags/cifar100_teacher.cfg --data_dir=DIR
Any tfds name works (`tfds:NAME` as tfjac's --dataset spells it is accepted too).
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_string("dataset", "cifar100", "tensorflow-datasets name, e.g. cifar10, cifar100.")
flags.DEFINE_string("data_dir", None, "Where to write the prepared data (tfds data_dir); "
                    "default $TFDS_DATA_DIR or ~/tensorflow_datasets.")
FLAGS = flags.FLAGS


def _fail(message):
  print(f"prepare_data: error: {message}", file=sys.stderr)
  sys.exit(1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = FLAGS.dataset[len("tfds:"):] if FLAGS.dataset.startswith("tfds:") else FLAGS.dataset
  data_dir = os.path.abspath(os.path.expanduser(FLAGS.data_dir)) if FLAGS.data_dir else None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for unknown names
    _fail(f"tensorflow-datasets has no dataset {name!r}: {e}")
  if getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None):
    print(f"note: {name} needs files downloaded by hand first:\n"
          f"{builder.MANUAL_DOWNLOAD_INSTRUCTIONS}", file=sys.stderr)
  try:
    builder.download_and_prepare()
  except ModuleNotFoundError as e:  # tfds imports some builders' needs lazily
    _fail(f"preparing {name!r} needs the Python package {e.name!r}: pip install {e.name}")
  except Exception as e:  # network, disk, permissions: say what and where, no trace
    _fail(f"could not download and prepare {name!r} into {builder.data_dir}: "
          f"{type(e).__name__}: {e}\nThis tool needs internet access; run it on a machine "
          f"that has it and copy the prepared directory over.")
  root = os.path.dirname(os.path.dirname(builder.data_dir))  # strip <name>/<version>
  splits = ", ".join(f"{k}: {v.num_examples}" for k, v in builder.info.splits.items())
  print(f"prepared {name} {builder.version} in {builder.data_dir} ({splits})")
  print(f"To use it elsewhere copy {os.path.join(root, name)} into the same place under that "
        f"machine's data directory.")
  print(f"Pass to tfjac: --dataset={FLAGS.dataset} --data_dir={root}")


if __name__ == "__main__":
  app.run(main)
