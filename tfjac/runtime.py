"""Runtime set-up of a run: the distribution strategy, TF_CONFIG and the chief of a
multi-worker job (who writes the workdir), and the device checks of the mixed precision."""
import dataclasses
import json
import os
from typing import Optional, Tuple

import tensorflow as tf
from absl import logging

from tfjac.config import Config
from tfjac.errors import SettingError


def make_strategy(name: str) -> tf.distribute.Strategy:
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "multi_worker":  # reads TF_CONFIG (checked by checks.validate)
    return tf.distribute.MultiWorkerMirroredStrategy()
  gpus = tf.config.list_logical_devices("GPU")
  if name == "mirrored" or (name == "auto" and len(gpus) > 1):
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def worker_config(config: Config) -> Config:
  """Under strategy multi_worker every worker runs the same command; the chief writes
  config.workdir, every other worker its own <workdir>/workers/<type>_<index> (its checkpoints,
  resume backup and exports), so that no two processes write one file."""
  if config.strategy != "multi_worker":
    return config
  cluster, kind, index = parse_tf_config()
  if is_chief(cluster, kind, index):
    return config
  workdir = os.path.join(config.workdir, "workers", f"{kind}_{index}")
  logging.info("multi-worker: %s %d is not the chief; it writes to %s", kind, index, workdir)
  return dataclasses.replace(config, workdir=workdir)


BFLOAT16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 /proc/cpuinfo "flags"; aarch64: "bf16"


def _proc_cpuinfo() -> str:
  """/proc/cpuinfo's text, or '' where it cannot be read (other systems)."""
  try:
    with open("/proc/cpuinfo") as f:
      return f.read()
  except OSError:
    return ""


def cpu_has_bfloat16(cpuinfo: Optional[str] = None) -> bool:
  """Whether this CPU has bfloat16 arithmetic units, from /proc/cpuinfo (Linux; `cpuinfo`: its
  text, for tests): avx512_bf16 or amx_bf16 among x86 "flags", bf16 among aarch64
  "Features". False where the file cannot be read (other systems): float32 is the safe side."""
  if cpuinfo is None:
    cpuinfo = _proc_cpuinfo()
  for line in cpuinfo.splitlines():
    key, _, value = line.partition(":")
    words = set(value.split())
    if key.strip() == "flags" and words.intersection(BFLOAT16_CPU_FLAGS):
      return True
    if key.strip() == "Features" and "bf16" in words:
      return True
  return False


def resolve_precision(name: str, *, estimator: str = "backprop", gpus: Optional[int] = None,
                      cpuinfo: Optional[str] = None) -> Tuple[str, str]:
  """(the keras dtype policy for mixed_precision=`name`, why). auto: mixed_bfloat16 on a
  CPU with bfloat16 units and no GPU visible, float32 elsewhere (GPUs: not measured yet), and
  float32 with jac_estimator='fd', whose differences f(x + eps u) - f(x - eps u) are lost in
  bfloat16's 8-bit mantissa. Other names are returned as they are."""
  if name != "auto":
    return name, f"mixed_precision={name}"
  if estimator == "fd":
    return "float32", "auto: float32, as jac_estimator=fd's differences need it"
  if gpus is None:
    gpus = len(tf.config.list_physical_devices("GPU"))
  if gpus:
    return "float32", "auto: float32 on GPUs (bfloat16 there is not measured yet)"
  if cpu_has_bfloat16(cpuinfo):
    return "mixed_bfloat16", "auto: mixed_bfloat16, this CPU has bfloat16 units"
  return "float32", "auto: float32, this CPU has no bfloat16 units"


def check_precision(config: Config, strategy):
  """Device checks of config.mixed_precision, logged: they run, but not as one might expect."""
  del strategy
  gpus = tf.config.list_physical_devices("GPU")
  if config.mixed_precision == "mixed_float16" and not gpus:
    logging.warning("mixed_precision=mixed_float16 without a GPU: float16 is emulated on CPU "
                    "and slower than float32 (docs/speed.md); it runs, for testing only")
  if config.mixed_precision == "mixed_bfloat16" and gpus:
    details = tf.config.experimental.get_device_details(gpus[0])
    capability = details.get("compute_capability")
    if capability and capability < (8, 0):
      logging.warning("mixed_precision=mixed_bfloat16 on %s (compute capability %s): "
                      "bfloat16 needs 8.0 (Ampere) or newer to be fast; use mixed_float16",
                      details.get("device_name", "this GPU"), capability)


def parse_tf_config():
  """The environment's TF_CONFIG of strategy multi_worker, checked: (cluster dict, task type,
  task index), as TFConfigClusterResolver reads them. Raises SettingError (strategy) naming TF_CONFIG with
  what is wrong and what a valid one looks like (the resolver reads what it can and fails later,
  in the strategy, or not at all)."""
  text = os.environ.get("TF_CONFIG")
  example = ('e.g. {"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
             '"task": {"type": "worker", "index": 0}}')
  if not text:
    raise SettingError("strategy", "multi_worker needs the environment variable TF_CONFIG, "
                       + example)
  try:
    value = json.loads(text)
  except ValueError as e:
    raise SettingError("strategy", f"TF_CONFIG is not valid JSON ({e}); {example}") from e
  if not isinstance(value, dict) or not isinstance(value.get("cluster"), dict) or not value[
      "cluster"]:
    raise SettingError("strategy", f"TF_CONFIG has no \"cluster\" mapping of job names to "
                       f"address lists; {example}")
  cluster = value["cluster"]
  for job, addresses in cluster.items():
    if (not isinstance(addresses, list) or not addresses or
        not all(isinstance(a, str) and ":" in a for a in addresses)):
      raise SettingError("strategy", f"TF_CONFIG cluster job {job!r} must be a non-empty list "
                         f"of \"host:port\" strings, got {addresses!r}")
  unknown = sorted(set(cluster) - {"chief", "worker"})
  if unknown:
    raise SettingError("strategy", f"TF_CONFIG cluster jobs {unknown} are not used by "
                       "MultiWorkerMirroredStrategy; use chief and worker")
  task = value.get("task")
  if not isinstance(task, dict) or "type" not in task or "index" not in task:
    raise SettingError("strategy", "TF_CONFIG has no \"task\" with \"type\" and \"index\"; "
                       + example)
  kind, index = task["type"], task["index"]
  if kind not in cluster:
    raise SettingError("strategy", f"TF_CONFIG task type {kind!r} is not a job of the cluster "
                       f"({', '.join(sorted(cluster))})")
  if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(
      cluster[kind]):
    raise SettingError("strategy", f"TF_CONFIG task index {index!r} is out of range: job "
                       f"{kind!r} has {len(cluster[kind])} address(es), indices 0.."
                       f"{len(cluster[kind]) - 1}")
  resolver = tf.distribute.cluster_resolver.TFConfigClusterResolver()
  return resolver.cluster_spec().as_dict(), resolver.task_type, resolver.task_id


def is_chief(cluster, kind, index) -> bool:
  """The chief writes the run's outputs: task 'chief', or worker 0 when there is no chief."""
  return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)


