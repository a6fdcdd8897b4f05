"""Files that are either wholly old or wholly new: write to a temporary name beside the target,
flush, then os.replace (atomic on POSIX within one filesystem). A process killed at any moment
leaves the previous file intact; what it may leave is a hidden `.tmp-*` file beside it."""
import json
import os
import shutil
import tempfile

TMP_PREFIX = ".tmp-"


def _fsync_directory(directory):
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:  # not every platform can open a directory
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def write_with(path, write, mode="w"):
  """Calls write(file object) on a temporary file, then moves it to `path`."""
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=TMP_PREFIX, suffix=os.path.basename(path))
  try:
    os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are meant to be read by others
    with os.fdopen(fd, mode) as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  _fsync_directory(directory)


def write_text(path, text):
  write_with(path, lambda f: f.write(text))


def write_json(path, obj):
  write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def copy_file(src, dst):
  """Copies src to dst atomically (dst is never half written)."""
  with open(src, "rb") as source:
    write_with(dst, lambda f: shutil.copyfileobj(source, f), mode="wb")
