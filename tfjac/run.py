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


def _int_list(flag, values):
  try:
    return tuple(int(v) for v in values)
  except ValueError as e:
    raise ConfigError(flag, f"expects integers, got {values}") from e


def _float_list(flag, values):
  try:
    return tuple(float(v) for v in values)
  except ValueError as e:
    raise ConfigError(flag, f"expects numbers, got {values}") from e


def config_from_flags(f=FLAGS) -> config_lib.Config:
  mode = modes.load(f.mode)  # the mode's defaults (modes/__init__.py)
  hints = tuple(f.hints)
  if not f["hints"].present and mode.default_hints is not None:
    hints = tuple(mode.default_hints)  # the mode's always_hints: put first by resolved() below
  jac_target = f.jac_target
  if mode.default_jac_target is not None and not f["jac_target"].present:
    jac_target = mode.default_jac_target
  train_common = dict(batch_size=f.batch_size, steps_per_epoch=f.steps_per_epoch,
                      optimizer=f.optimizer, momentum=f.momentum, weight_decay=f.weight_decay,
                      lr_schedule=f.lr_schedule,
                      lr_decay_epochs=_int_list("lr_decay_epochs", f.lr_decay_epochs),
                      lr_decay_factor=f.lr_decay_factor,
                      early_stopping_patience=f.early_stopping_patience,
                      jit_compile=f.jit_compile, backup_every_steps=f.backup_every_steps,
                      weight_decay_kind=f.weight_decay_kind, nesterov=f.nesterov,
                      lr_decay_steps=_int_list("lr_decay_steps", f.lr_decay_steps))
  from tfjac import hints as hints_lib  # pylint: disable=g-import-not-at-top
  return mode_defaults.resolved(config_lib.Config(
      mode=f.mode, workdir=f.workdir, strategy=f.strategy,
      robustness_sigmas=_float_list("robustness_sigmas", f.robustness_sigmas),
      data=config_lib.DataConfig(
          dataset=f.dataset, data_dir=f.data_dir, samples_per_class=f.samples_per_class,
          validation_fraction=f.validation_fraction, augment=tuple(f.augment),
          crop_padding=f.crop_padding, seed=f.seed, image_size=f.image_size,
          skip_bad_images=f.skip_bad_images, classes=_int_list("classes", f.classes)),
      student=config_lib.ModelConfig(name=f.model, width=f.width, weights=f.student_weights),
      teacher=config_lib.TeacherConfig(
          path=f.teacher,
          model=config_lib.ModelConfig(
              name=f.teacher_model,
              width=f.teacher_width),  # None: resolved below, as for the Python API
          train=dataclasses.replace(config_lib.TEACHER_TRAIN, epochs=f.teacher_epochs,
                                    learning_rate=f.teacher_learning_rate, **train_common),
          input=config_lib.TeacherInput(resize=f.teacher_resize, scale=f.teacher_input_scale,
                                        offset=f.teacher_input_offset,
                                        preprocessing=f.teacher_preprocessing,
                                        mean=_float_list("teacher_mean", f.teacher_mean),
                                        std=_float_list("teacher_std", f.teacher_std),
                                        outputs=f.teacher_outputs, weights=f.teacher_weights,
                                        image_size=f.teacher_image_size),
          unsafe_loading=f.unsafe_teacher_loading, cache=f.teacher_cache),
      train=config_lib.TrainConfig(epochs=f.epochs, learning_rate=f.learning_rate,
                                   train_steps=f.train_steps,
                                   val_jac_examples=f.val_jac_examples,
                                   val_jac_every=f.val_jac_every, **train_common),
      hints=config_lib.HintConfig(
          hints=hints,
          weights=tuple((h, float(f[f"{h}_weight"].value)) for h in hints_lib.HINTS),
          kd_temperature=f.kd_temperature, jac_target=jac_target,
          jac_normalize=f.jac_normalize, jac_bn_policy=f.jac_bn_policy,
          jac_top_k=f.jac_top_k, jac_projections=f.jac_projections,
          jac_estimator=f.jac_estimator, jac_probes=f.jac_probes, jac_probe=f.jac_probe,
          jac_fd_eps=f.jac_fd_eps,
          noise_sigma=f.noise_sigma, noise_samples=f.noise_samples, lwf_match=f.lwf_match,
          teacher_layers=tuple(f.teacher_layers), student_layers=tuple(f.student_layers),
          loss_scaling=f.loss_scaling, jac_every=f.jac_every),
      source=None if not f.source_dataset else config_lib.DataConfig(
          dataset=f.source_dataset, data_dir=f.data_dir, image_size=f.image_size,
          classes=_int_list("source_classes", f.source_classes), seed=f.seed),
      conditions_examples=f.conditions_examples,
      resume=f.resume, deterministic=f.deterministic, mixed_precision=f.mixed_precision))


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
  lines.append(f"  outputs: {wd}/results.json, {wd}/flags.cfg; "
               f"tensorboard --logdir {wd}/tensorboard")
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
