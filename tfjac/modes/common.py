"""Pieces the mode recipes share: building and training one network, teachers, the resume
bookkeeping (which settings a backup must match, discarding backups) and the summary lines of
the networks a run trains or evaluates."""
import dataclasses
import json
import os
from typing import Optional

import keras
from absl import logging

from tfjac import errors, export, models, modes
from tfjac.models import sources, students, teachers
from tfjac.config import (ALT_JAC_FACTOR, ALT_LR_FACTOR, Config, DataConfig, HintConfig,
                          ModelConfig, TrainConfig)
from tfjac.data import Splits
from tfjac.errors import SettingError, mention
from tfjac.training import callbacks, evaluation, loop
from tfjac.training import resume as resume_lib
from tfjac.training import selection, teacher_cache
from tfjac.training.distiller import Distiller

TEACHER_DIR = "teacher"
STUDENT_DIR = "student"
CANDIDATES_DIR = "candidates"  # choose_on_validation: one run directory per candidate
CHECKPOINTS_DIR = "checkpoints"
# Initialisation seed offset of each role, so that a network's initial weights depend on the
# seed and its role only, not on what ran before it in the process (a resumed run loads the
# teacher instead of training it).
_ROLE_SEED = {"teacher": 1, "student": 2}
# Where each role's network and fit settings sit in Config, for the messages that name them.
_ROLE_MODEL = {"teacher": "teacher.model", "student": "student"}
_ROLE_TRAIN = {"teacher": "teacher.train", "student": "train"}


def build_network(model_cfg: ModelConfig, splits: Splits, name: str, strategy, seed=0):
  info = splits.info
  keras.utils.set_random_seed(seed * 1000 + _ROLE_SEED.get(name, 0))
  if sources.is_outside(model_cfg.name):  # keras.applications:NAME or a .keras file
    return students.build_student(model_cfg.name, info.image_shape, info.num_classes,
                                  mean=info.mean, std=info.std, weights=model_cfg.weights,
                                  model_name=name,
                                  setting=_ROLE_MODEL[name])
  return models.build(model_cfg.name, info.image_shape, info.num_classes, mean=info.mean,
                      std=info.std, width=model_cfg.width, model_name=name,
                      sync_bn=strategy.num_replicas_in_sync > 1)


def check_student(config: Config, splits: Splits, strategy):
  """Builds an outside student (keras.applications:NAME, FILE.keras) once and throws it away,
  so that one that cannot take the dataset's images is refused, naming the student's model
  setting, before a teacher is trained. tfjac's own builders take any image size: nothing to
  check."""
  if modes.load(config.mode).builds_student and sources.is_outside(config.student.name):
    build_network(config.student, splits, "student", strategy, seed=config.data.seed)


def network_metadata(config: Config, model_cfg: ModelConfig, splits: Splits, role: str):
  meta = {"role": role, "model": model_cfg.name, "width": model_cfg.width,
          "dataset": splits.info.name, "image_shape": list(splits.info.image_shape),
          "num_classes": splits.info.num_classes, "seed": config.data.seed}
  if role == "teacher":
    meta["teacher_settings"] = teacher_settings(config)
  return meta


# Settings that never change the teacher's numbers: where the data lives, the student's
# sampling (the teacher trains on the whole training split), the backup frequency.
_NOT_TEACHER = {"data_dir", "samples_per_class", "backup_every_steps"}


# The teacher's TrainConfig fields whose record key is not the field's own name.
_TEACHER_TRAIN_KEYS = {"epochs": "teacher_epochs", "learning_rate": "teacher_learning_rate"}


def _record_keys():
  """teacher_settings' flat keys -> the Config settings they record (their mentions)."""
  keys = {"teacher_model": "teacher.model.name", "teacher_width": "teacher.model.width",
          "teacher_model_weights": "teacher.model.weights",
          "ce_weight": "hints.weights.ce", "mixed_precision": "mixed_precision"}
  keys.update({f.name: f"data.{f.name}" for f in dataclasses.fields(DataConfig)})
  keys.update({_TEACHER_TRAIN_KEYS.get(f.name, f.name): f"teacher.train.{f.name}"
               for f in dataclasses.fields(TrainConfig)})
  return keys


_SETTING_OF_RECORD = _record_keys()


def teacher_settings(config: Config):
  """{flag: value} of every setting that makes the teacher trained in a run directory: a
  teacher found there is reused only if it was made with the same (obtain_teacher)."""
  c = resume_settings(config, "teacher")
  flat = {"teacher_model": c["teacher"]["model"]["name"],
          "teacher_width": c["teacher"]["model"]["width"],
          "ce_weight": c["ce_weight"], "mixed_precision": c["mixed_precision"]}
  if c["teacher"]["model"]["weights"]:  # recorded when given: older records stay reusable
    flat["teacher_model_weights"] = c["teacher"]["model"]["weights"]
  for key, value in c["data"].items():
    flat[key] = value
  for key, value in c["teacher"]["train"].items():
    flat[_TEACHER_TRAIN_KEYS.get(key, key)] = value
  flat = {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()
          if k not in _NOT_TEACHER}
  return json.loads(json.dumps(flat))  # as it reads back from model.json


def resume_settings(config: Config, role: str):
  """What a backup of `role`'s fit must have been made with to be continued: everything that
  changes the numbers (not the run directory, resume or backup frequency, or trust flags)."""
  c = config.to_dict()
  for key in ("workdir", "resume"):
    c.pop(key)
  c["teacher"].pop("unsafe_loading")
  for train in (c["train"], c["teacher"]["train"]):
    train.pop("backup_every_steps")
  if role == "teacher":  # the teacher's fit depends on none of the student's settings
    c = {k: c[k] for k in ("strategy", "data", "teacher", "deterministic", "mixed_precision")}
    c["teacher"] = {k: c["teacher"][k] for k in ("model", "train")}
    c["ce_weight"] = config.hints.weight("ce")
  return c


def discard_backups(workdir):
  """Called once the run's outputs are written: a rerun then starts afresh."""
  candidates = os.path.join(workdir, CANDIDATES_DIR)
  for directory in [workdir] + ([os.path.join(candidates, c) for c in os.listdir(candidates)]
                                if os.path.isdir(candidates) else []):
    for role in _ROLE_SEED:
      resume_lib.discard(os.path.join(directory, CHECKPOINTS_DIR, role, resume_lib.BACKUP_DIR))


def train_and_evaluate(config: Config, splits: Splits, strategy, *, network: keras.Model,
                       teacher: Optional[keras.Model], train_split, train_cfg: TrainConfig,
                       hints: HintConfig, role: str, student_view=None, teacher_view=None):
  """Fits `network` (in a Distiller with the hint settings `hints`), returns (fit result,
  test metrics). The views (models/views.py) add a second head / feature maps where hints
  need them."""
  with strategy.scope():
    distiller = Distiller(network, teacher, hints=hints, num_classes=splits.info.num_classes,
                          seed=config.data.seed, student_view=student_view,
                          teacher_view=teacher_view,
                          # settled by teachers.load_teacher (or trained here: logits)
                          teacher_outputs="logits")
  workdir = config.workdir
  use_cache = False
  if teacher is not None:
    use_cache, reason = teacher_cache.use_teacher_cache(
        config, modes.load(config.mode).teacher_cache)
    logging.info("teacher cache %s for the %s: %s", "on" if use_cache else "off", role,
                 errors.say(reason))
  dirs = loop.FitDirs(log_dir=os.path.join(workdir, "tensorboard", role),
                      checkpoint_dir=os.path.join(workdir, CHECKPOINTS_DIR, role),
                      resume=config.resume, settings=resume_settings(config, role),
                      keep_backup=True)
  result = loop.fit(distiller, train_split, splits.validation, train_cfg, dirs,
                    data=config.data, teacher_cache=use_cache,
                    setting=_ROLE_TRAIN[role],
                    extra_callbacks=[callbacks.EpochLogger(role, train_cfg.epochs)])
  test = evaluation.evaluate(distiller, splits.test, train_cfg.batch_size)
  if config.robustness_sigmas:
    test["accuracy_under_noise"] = robustness(config, splits, network, train_cfg.batch_size)
  return result, test


def robustness(config: Config, splits: Splits, network, batch_size):
  """{sigma: test accuracy on Gaussian-noised test images}, seeded by data.seed."""
  return evaluation.accuracy_under_noise(network, splits.test, config.robustness_sigmas, batch_size,
                                   seed=config.data.seed)


def fit_summary(result: loop.FitResult, test):
  final = result.final_metrics
  if final is None:
    final = {k: v[-1] for k, v in result.history.items()}
  return {"test": test, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run,
          "best_val_accuracy": result.best_val_accuracy, "final_epoch_metrics": final,
          "train_seconds": round(result.seconds, 2), "steps_per_epoch": result.steps_per_epoch,
          "train_steps": result.total_steps,
          "fit_phases_seconds": result.phases,
          "resumed_from": result.resumed_from}


def train_student(config: Config, splits: Splits, strategy, teacher: Optional[keras.Model],
                  make_views=None, student=None, build_student=None, architecture=None):
  """The student on data.samples_per_class examples per class with hints.hints, exported alone.
  `make_views(student) -> (student_view, teacher_view)`, called in the strategy scope, adds
  what transfer hints need; `student` replaces the student.name network (the oracle), and
  `build_student()` makes another like it for a second candidate.

  With choose_on_validation (training/selection.py) two candidates are fitted from the same
  initial weights, each in <workdir>/candidates/<name> (its own TensorBoard logs and resume
  backup, so a kill during the second resumes there), and the one kept by validation accuracy
  alone is exported; results record both."""
  train_split = splits.sampled_train(config.data.samples_per_class, config.data.seed)
  logging.info("training student %s on %d images with hints %s", config.student.name,
               len(train_split), ",".join(config.hints.hints))
  choosing, reason = selection.wanted(config, modes.load(config.mode).chooses_on_validation)
  n_val = len(splits.validation)
  if not choosing:
    if config.choose_on_validation == "auto":
      logging.info("one student fit: %s", reason)
    student, summary = _fit_student(config, splits, strategy, teacher, train_split, make_views,
                                    student)
    del summary["initial_weights"]
  else:
    fits, initial, given = [], None, student
    for candidate in selection.candidates(config):
      logging.info("candidate %s", candidate.describe())
      cfg = dataclasses.replace(config, hints=candidate.hints, train=candidate.train,
                                workdir=os.path.join(config.workdir, CANDIDATES_DIR,
                                                     candidate.name))
      if fits:  # a second candidate: a fresh network with the first one's initial weights
        if given is not None and build_student is None:
          raise ValueError("train_student: a given `student` needs `build_student` to make "
                           "the second candidate's network (choose_on_validation)")
        with strategy.scope():
          student = build_student() if build_student is not None else None
      network, summary = _fit_student(cfg, splits, strategy, teacher, train_split, make_views,
                                      student, initial)
      if initial is None:
        initial = summary["initial_weights"]
      del summary["initial_weights"]
      fits.append((candidate, network, summary))
    kept = selection.choose([s["best_val_accuracy"] for _, _, s in fits], n_val)
    best_val = [s["best_val_accuracy"] for _, _, s in fits]
    logging.info("chosen on validation (%d images): %s, best validation accuracy %s; "
                 "the alternative is kept only if ahead by more than %.4f", n_val,
                 fits[kept][0].name, " vs ".join(f"{a:.4f}" for a in best_val),
                 selection.margin(*best_val, n_val))
    _, student, summary = fits[kept]
    summary = dict(summary)
    summary["choice"] = {
        "reason": reason, "validation_examples": n_val, "kept": fits[kept][0].name,
        "margin": selection.margin(*best_val, n_val),
        "candidates": [{"name": c.name, "weights": {n: c.hints.weight(n) for n in c.hints.hints},
                        "learning_rate": c.train.learning_rate,
                        "workdir": os.path.join(config.workdir, CANDIDATES_DIR, c.name),
                        **{k: s[k] for k in ("best_val_accuracy", "test_accuracy",
                                             "best_epoch", "train_seconds", "resumed_from")}}
                       for c, _, s in fits]}
    # What the run cost: both fits.
    summary["train_seconds"] = round(sum(s["train_seconds"] for _, _, s in fits), 2)
  directory = os.path.join(config.workdir, STUDENT_DIR)
  saved_model = export.export_model(
      student, directory, splits.test.images[:8],
      metadata=network_metadata(config, config.student, splits, "student"))
  summary.update(model=architecture or config.student.name, train_examples=len(train_split),
                 path=directory, saved_model=saved_model)
  return summary


def _fit_student(config: Config, splits: Splits, strategy, teacher, train_split, make_views,
                 student=None, initial_weights=None):
  """One fit of the student (built here unless given, then set to `initial_weights` when
  given): (network, fit summary with the network's initial weights under 'initial_weights')."""
  student_view = teacher_view = None
  with strategy.scope():
    if student is None:  # seeded by (seed, role): every row of a table starts alike
      student = build_network(config.student, splits, "student", strategy, config.data.seed)
    if initial_weights is not None:
      student.set_weights(initial_weights)
    initial = student.get_weights()
    if make_views is not None:
      student_view, teacher_view = make_views(student)
  result, test = train_and_evaluate(config, splits, strategy, network=student, teacher=teacher,
                                    train_split=train_split, train_cfg=config.train,
                                    hints=config.hints, role="student", student_view=student_view,
                                    teacher_view=teacher_view)
  summary = fit_summary(result, test)
  summary.update(test_accuracy=test["accuracy"], initial_weights=initial)
  return student, summary


def train_teacher(config: Config, splits: Splits, strategy):
  """Trains the teacher on the whole training split with CE and exports it; returns
  (teacher model, teacher results dict)."""
  with strategy.scope():
    teacher = build_network(config.teacher.model, splits, "teacher", strategy, config.data.seed)
  logging.info("training teacher %s on %d images", config.teacher.model.name, len(splits.train))
  result, test = train_and_evaluate(config, splits, strategy, network=teacher, teacher=None,
                                    train_split=splits.train, train_cfg=config.teacher.train,
                                    hints=dataclasses.replace(config.hints, hints=("ce",)),
                                    role="teacher")
  directory = os.path.join(config.workdir, TEACHER_DIR)
  metadata = network_metadata(config, config.teacher.model, splits, "teacher")
  path = export.export_model(teacher, directory, splits.test.images[:8], metadata=metadata)
  summary = fit_summary(result, test)
  summary.update(source="trained", path=directory, saved_model=path,
                 model=config.teacher.model.name, test_accuracy=test["accuracy"])
  return teacher, summary


def check_reusable_teacher(config: Config, meta, existing):
  """A teacher found in the run directory is reused only if its metadata records the teacher
  settings of this run; else a SettingError (workdir) naming the settings that differ and the
  two ways out. Before, only the dataset and class count were compared: another teacher model,
  width, number of epochs or seed distilled from the old teacher in silence."""
  ways_out = (f"use another {mention('workdir')} to train a teacher with these settings, or "
              f"pass {mention('teacher.path', existing)} to distil from this one on purpose")
  recorded = meta.get("teacher_settings")
  if recorded is None:
    raise SettingError("workdir", f"{existing} holds a teacher whose metadata (model.json) "
                       "records no teacher settings (written by an older tfjac), so it cannot "
                       f"be shown to match this run's; {ways_out}")
  wanted = teacher_settings(config)
  differing = [f"{mention(_SETTING_OF_RECORD.get(k, k), wanted.get(k))} here, "
               f"{recorded.get(k)!r} for the teacher"
               for k in sorted(set(wanted) | set(recorded)) if wanted.get(k) != recorded.get(k)]
  if differing:
    raise SettingError("workdir", f"{existing} holds a teacher made with other settings: "
                       f"{'; '.join(differing)}. {ways_out[0].upper()}{ways_out[1:]}")


def obtain_teacher(config: Config, splits: Splits, strategy):
  """teacher if given; else the teacher already in the run directory; else train one."""
  info = splits.info
  path = config.teacher.path
  source = "given"
  if path is None:
    existing = os.path.join(config.workdir, TEACHER_DIR)
    export.recover_export(existing)
    meta_path = os.path.join(existing, "model.json")
    if not os.path.exists(os.path.join(existing, export.KERAS_FILE)):
      return train_teacher(config, splits, strategy)
    with open(meta_path) as f:
      meta = json.load(f)
    check_reusable_teacher(config, meta, existing)
    path, source = existing, "reused"
    logging.info("reusing the teacher in %s", existing)
  with strategy.scope():
    loaded = teachers.load_teacher(config, info, num_classes=info.num_classes, path=path)
    teacher = loaded.adapted
    evaluator = Distiller(teacher, None)
  test = evaluation.evaluate(evaluator, splits.test, config.train.batch_size)
  if config.robustness_sigmas:
    test["accuracy_under_noise"] = robustness(config, splits, teacher, config.train.batch_size)
  return teacher, {"source": source, "path": path, "test": test,
                   "test_accuracy": test["accuracy"], **loaded.summary()}


def pct(v):
  return f"{100 * v:.2f}%"


def summary_lines(results):
  """The summary lines of the teacher and the student in `results` (each when present)."""
  c = results["config"]
  lines = []
  t = results.get("teacher")
  if t and "test_accuracy" in t:
    how = {"trained": f"trained here in {t.get('train_seconds', 0):.0f} s",
           "reused": "reused from the run directory", "given": "from --teacher"}[t["source"]]
    lines.append(f"  teacher: test accuracy {pct(t['test_accuracy'])} ({how}; {t['path']})")
  elif t:
    lines.append(f"  teacher: {t['path']} (another label space: "
                 f"{t.get('source_classes', '?')} classes)")
  s = results.get("student")
  if s:
    lines.append(f"  student {s['model']} ({','.join(c['hints']['hints'])}; "
                 f"{s['train_examples']} training images): test accuracy "
                 f"{pct(s['test_accuracy'])} (best validation epoch {s['best_epoch']}/"
                 f"{s['epochs_run']})")
    lines.append(f"  student SavedModel: {s['saved_model']}")
    choice = s.get("choice")
    if choice:
      given, alternative = choice["candidates"]
      moved = [f"{n} weight x{ALT_JAC_FACTOR:g}" for n in given["weights"]
               if alternative["weights"][n] != given["weights"][n]] + [
                   f"learning rate x{ALT_LR_FACTOR:g}"]
      lines.append(f"  chosen on validation ({choice['validation_examples']} images): "
                   f"{choice['kept']}; best validation {pct(given['best_val_accuracy'])} given, "
                   f"{pct(alternative['best_val_accuracy'])} alternative ({', '.join(moved)}); "
                   f"margin {pct(choice['margin'])}")
  for role in ("teacher", "student"):
    noisy = (results.get(role) or {}).get("test", {}).get("accuracy_under_noise")
    if noisy:
      lines.append(f"  {role} accuracy under input noise: " +
                   ", ".join(f"sigma {k}: {pct(v)}" for k, v in noisy.items()))
    r = (results.get(role) or {}).get("resumed_from")
    if r:
      lines.append(f"  {role}: resumed after {r['epochs_done']} epoch(s) and "
                   f"{r['steps_done']} step(s) of an interrupted run")
  return lines
