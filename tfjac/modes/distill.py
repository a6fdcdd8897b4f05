"""--mode=distill: teacher (given, reused or trained) -> student on N samples per class with
the hints of --hints; the student is evaluated on the test split and exported alone."""
import os

from absl import logging

from tfjac import export
from tfjac.modes import common


def run(config, splits, strategy):
  teacher, teacher_summary = common.obtain_teacher(config, splits, strategy)
  train_split = splits.sampled_train(config.data.samples_per_class, config.data.seed)
  with strategy.scope():
    student = common.build_network(config.student, splits, "student", strategy,
                                   config.data.seed)
  logging.info("training student %s on %d images with hints %s", config.student.name,
               len(train_split), ",".join(config.hints.hints))
  hints = tuple((h, config.hints.weight(h)) for h in config.hints.hints)
  result, test = common.train_and_evaluate(config, splits, strategy, network=student,
                                           teacher=teacher, train_split=train_split,
                                           train_cfg=config.train, hints=hints, role="student")
  directory = os.path.join(config.workdir, common.STUDENT_DIR)
  saved_model = export.export_model(
      student, directory, splits.test.images[:8],
      metadata=common.network_metadata(config, config.student, splits, "student"))
  summary = common.fit_summary(result, test)
  summary.update(model=config.student.name, train_examples=len(train_split), path=directory,
                 saved_model=saved_model, test_accuracy=test["accuracy"])
  return {"teacher": teacher_summary, "student": summary}
