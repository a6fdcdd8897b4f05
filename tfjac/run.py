"""Command line of tfjac: `python -m tfjac.run --mode=distill --samples_per_class=10`.

The only module that reads flags: it builds a frozen Config, checks it before any work,
writes the resolved flags to <workdir>/flags.cfg, runs the mode, writes results.json and
prints a summary.
"""
import dataclasses
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from tfjac import config as config_lib  # noqa: E402
from tfjac import flagdefs  # noqa: E402,F401  (defines the flags)
from tfjac import modes  # noqa: E402
from tfjac.modes import defaults as mode_defaults  # noqa: E402
from tfjac.errors import ConfigError, TfjacError  # noqa: E402

FLAGS = flags.FLAGS


def config_from_flags(f=FLAGS) -> config_lib.Config:
  """The Config the parsed flags say: every flag of flagdefs.TABLE fills its fields of
  Config(); the mode's default hints and Jacobian target stand where those flags are not
  given; an optional group (the source data) exists only when the flag that creates it is
  given (--source_dataset), and its other flags are then read, else ignored."""
  absent = {flag.paths[0].split(".")[0] for flag in flagdefs.TABLE
            if flag.creates and f[flag.name].value is None}
  values = {}
  for flag in flagdefs.TABLE:
    paths = [p for p in flag.paths if p.split(".")[0] not in absent]
    if paths:  # a flag of an absent group only is not even converted (its value is moot)
      value = flagdefs.value_of(flag, f[flag.name].value)
      values.update((path, value) for path in paths)
  mode = modes.load(f.mode)  # the mode's defaults (modes/__init__.py)
  if not f["hints"].present and mode.default_hints is not None:
    values["hints.hints"] = tuple(mode.default_hints)  # always_hints first: resolved() below
  if mode.default_jac_target is not None and not f["jac_target"].present:
    values["hints.jac_target"] = mode.default_jac_target
  return mode_defaults.resolved(flagdefs.with_values(config_lib.Config(), values))


def resolved_flagfile(config: config_lib.Config, f=FLAGS) -> str:
  """Every tfjac flag with its value: `--flagfile=<workdir>/flags.cfg` reruns the run.
  Values resolved from the mode (the default hints) are written as resolved."""
  resolved = {"hints": "--hints=" + ",".join(config.hints.hints),
              "jac_target": "--jac_target=" + config.hints.jac_target}
  lines = ["# Resolved flags of this run; rerun with: python -m tfjac.run "
           "--flagfile=THIS_FILE"]
  for flag in sorted(f.get_key_flags_for_module(flagdefs), key=lambda fl: fl.name):
    if flag.value is None:
      continue
    lines.append(resolved.get(flag.name) or flag.serialize())
  return "\n".join(lines) + "\n"


def run(config: config_lib.Config, flagfile_text: str = ""):
  """Runs one configured job; returns the results dict (also written to results.json). Errors
  name flags (ConfigError), as a command-line user sets them."""
  from tfjac import checks  # pylint: disable=g-import-not-at-top

  with checks.flag_errors():  # the library names settings; the command line names flags
    return _run(config, flagfile_text)


def _run(config, flagfile_text):
  import keras  # pylint: disable=g-import-not-at-top

  from tfjac import checks, data, export, runtime  # pylint: disable=g-import-not-at-top
  from tfjac.modes import common  # pylint: disable=g-import-not-at-top

  start = time.time()
  config = mode_defaults.resolved(config)  # derived defaults, as config_from_flags fills them
  checks.validate(config)
  config = runtime.worker_config(config)  # multi-worker: only the chief writes --workdir
  if flagfile_text:
    export.atomic_write_text(os.path.join(config.workdir, "flags.cfg"), flagfile_text)
  # First TF work: MultiWorkerMirroredStrategy must be created before any op runs.
  strategy = runtime.make_strategy(config.strategy)
  if config.deterministic:
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    tf.config.experimental.enable_op_determinism()
  keras.utils.set_random_seed(config.data.seed)
  splits = data.prepare(config.data)
  checks.validate_against_data(config, splits.info.num_classes)
  policy, why = runtime.resolve_precision(config.mixed_precision,
                                          estimator=config.hints.jac_estimator)
  logging.info("mixed precision: %s (%s)", policy, why)
  config = dataclasses.replace(config, mixed_precision=policy)
  runtime.check_precision(config, strategy)
  common.check_student(config, splits, strategy)  # before a teacher is trained
  mode = modes.load(config.mode)
  previous_policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(config.mixed_precision)
  try:
    results = mode.run(config, splits, strategy)
  finally:  # a process that runs several jobs (tests) starts each from float32
    keras.mixed_precision.set_global_policy(previous_policy)
  results.update(
      mode=config.mode, config=config.to_dict(),
      dataset={"name": splits.info.name, "image_shape": list(splits.info.image_shape),
               "num_classes": splits.info.num_classes, "train": len(splits.train),
               "validation": len(splits.validation), "test": len(splits.test),
               "skipped_images": len(splits.info.skipped_files),
               "skipped_files": list(splits.info.skipped_files[:100])},
      replicas=strategy.num_replicas_in_sync, total_seconds=round(time.time() - start, 2),
      workdir=os.path.abspath(config.workdir))
  export.atomic_write_json(os.path.join(config.workdir, "results.json"), results)
  common.discard_backups(config.workdir)  # the run is complete: a rerun starts afresh
  return results


def summary(results) -> str:
  wd = results["workdir"]
  lines = [f"tfjac {results['mode']} on {results['dataset']['name']} "
           f"({results['replicas']} replica(s))"]
  lines.extend(modes.load(results["mode"]).summary_lines(results))
  skipped = results["dataset"].get("skipped_images")
  if skipped:
    lines.append(f"  skipped {skipped} unreadable image(s) (--skip_bad_images; listed in "
                 "results.json)")
  lines.append(f"  time: {results['total_seconds']:.1f} s")
  # With choose_on_validation the student's fits log under candidates/<name>/tensorboard.
  logs = wd if (results.get("student") or {}).get("choice") else f"{wd}/tensorboard"
  lines.append(f"  outputs: {wd}/results.json, {wd}/flags.cfg; tensorboard --logdir {logs}")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  logging.set_verbosity(logging.INFO)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.get_logger().setLevel("ERROR")  # SavedModel writing is chatty at INFO
  try:
    config = config_from_flags()
    results = run(config, resolved_flagfile(config))
  except TfjacError as e:
    print(f"tfjac: error: {e}", file=sys.stderr)
    sys.exit(2 if isinstance(e, ConfigError) else 1)
  print(summary(results))


def entry_point():
  """The `tfjac` console script (same as python -m tfjac.run)."""
  app.run(main)


if __name__ == "__main__":
  entry_point()
