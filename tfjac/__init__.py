"""tfjac: knowledge transfer with Jacobian matching (Srinivas & Fleuret, ICML 2018) in Keras 3.

The Python API (README.md, Python API; docs/networks.md):

    import tfjac
    d = tfjac.Distiller(student=student, teacher=teacher, hints={"ce": 1, "act": 1, "jac": 1})
    d.compile(optimizer=keras.optimizers.Adam(1e-3))
    d.fit(dataset)      # (images, labels) batches; history: loss and <hint>_loss per term
    d.student.save(...)  # the trained student alone

A teacher ending in a softmax (keras.applications' classifiers) is taken by its logits: the
softmax is removed (d.teacher_info says how). A teacher whose softmax cannot be seen and whose
outputs look like probabilities is refused until `teacher_outputs='logits'` or
`'probabilities'` says what it returns.

Every other hint setting travels in `hints=` as one tfjac.HintConfig, the object the command
line's modes pass: `hints=tfjac.HintConfig.of({"act": 1, "jac": 1, "ce": 1}, jac_target="all",
jac_estimator="jvp", jac_probes=1)` (the short form plus any field by name), or
`tfjac.HintConfig(hints=(...), weights=(...), ...)` in full.

Names are loaded on first use, so `import tfjac` alone does not import TensorFlow.
"""
import importlib

__version__ = "0.1.0"

_PUBLIC = {
    "Distiller": ("tfjac.training.distiller", "Distiller"),
    "HINTS": ("tfjac.hints", "HINTS"),
    "HintParams": ("tfjac.hints", "HintParams"),
    "HintConfig": ("tfjac.config", "HintConfig"),
    "JACOBIAN_TARGETS": ("tfjac.hints", "JACOBIAN_TARGETS"),
    "JAC_ESTIMATORS": ("tfjac.hints.estimators", "ESTIMATORS"),
    "build_model": ("tfjac.models", "build"),
    "MODELS": ("tfjac.models", "MODELS"),
    "JacobianSafeBatchNorm": ("tfjac.models.layers", "JacobianSafeBatchNorm"),
    "convert_batchnorm": ("tfjac.models.layers", "convert_batchnorm"),
    "without_softmax": ("tfjac.models.outputs", "without_softmax"),
    "preprocessing_layer": ("tfjac.models.preprocessing", "preprocessing_layer"),
    "adapt_input": ("tfjac.models.views", "adapt_input"),
    "export_model": ("tfjac.export", "export_model"),
}
__all__ = sorted(_PUBLIC)


def __getattr__(name):
  if name not in _PUBLIC:
    raise AttributeError(f"module 'tfjac' has no attribute {name!r}")
  module, attr = _PUBLIC[name]
  value = getattr(importlib.import_module(module), attr)
  globals()[name] = value
  return value


def __dir__():
  return sorted(list(globals()) + list(_PUBLIC))
