"""Mode finetune: the fine-tuning oracle of the poster's transfer table. The teacher's own
network, initialised from its weights, with a new head for the target classes, fine-tuned on
the target data with CE. Needs a Keras teacher (.keras) that ends in a Dense layer."""
from tfjac.errors import SettingError, mention
from tfjac.models import teachers
from tfjac.models.surgery import initialised_from_teacher, oracle_network
from tfjac.modes import Mode, common

DEFAULT_HINTS = ("ce",)


def check(config):
  if config.hints.hints != DEFAULT_HINTS:
    raise SettingError("hints.hints", f"{mention('mode', 'finetune')} (the fine-tuning oracle) "
                       f"trains with CE alone: use {mention('hints.hints', 'ce')}")


def run(config, splits, strategy):
  info = splits.info
  with strategy.scope():
    loaded = teachers.load_teacher(config, info)
    teacher = loaded.network

    def build():  # another candidate's network (choose_on_validation): the same initial weights
      return oracle_network(teacher, info.image_shape, info.num_classes, config.teacher.input,
                            config.teacher.path, adapt=loaded.adapt)

    network = build()
    checked = initialised_from_teacher(teacher, network)
  student = common.train_student(config, splits, strategy, teacher=None, student=network,
                                 build_student=build, architecture=f"oracle ({teacher.name})")
  return {"teacher": {"source": "given", "path": config.teacher.path,
                      "source_classes": int(teacher.output_shape[-1]),
                      # Checked value by value before training (initialised_from_teacher).
                      "layers_initialised_from_teacher": checked["layers"],
                      "parameters_initialised_from_teacher": checked["parameters"]},
          "student": student}


MODE = Mode(run=run, summary_lines=common.summary_lines, check=check,
            default_hints=DEFAULT_HINTS, needs_teacher=True,
            builds_student=False,  # the oracle is the teacher's network with a new head
            # The oracle's fit has no teacher; with hints ('ce',) the cache is refused by
            # the hints' rule ("no hint reads the teacher").
            teacher_cache=True,
            chooses_on_validation=True)  # the transfer table's rows get equal budgets
