"""Pins the private Keras methods that tfjac's Distiller overrides or calls (written against
Keras 3.15). A Keras release that renames one, changes its signature or the behaviour the
override works around fails here, with the reason, instead of in a distributed training run."""
import inspect

import keras
import pytest

from tfjac.training.distiller import Distiller


def _parameters(function):
  return [(p.name, p.default) for p in inspect.signature(function).parameters.values()]


def test_maybe_symbolic_build_is_the_method_the_multi_worker_override_expects():
  # Distiller._maybe_symbolic_build replaces the batch Keras would average with
  # strategy.reduce (which fails on MultiWorkerMirroredStrategy's PerReplica batch).
  keras_method = getattr(keras.Model, "_maybe_symbolic_build", None)
  assert keras_method is not None, "Keras no longer has Model._maybe_symbolic_build"
  assert _parameters(keras_method) == [("self", inspect.Parameter.empty),
                                       ("iterator", None), ("data_batch", None)]
  assert _parameters(Distiller._maybe_symbolic_build) == _parameters(keras_method)
  source = inspect.getsource(keras_method)
  # What the override relies on: the epoch iterator yields (_, _, iterator) triples, the
  # strategy is read from _distribute_strategy, and the batch is averaged with reduce().
  for piece in ("for _, _, it in iterator", "self._distribute_strategy",
                "self.distribute_strategy.reduce("):
    assert piece in source, f"Keras' _maybe_symbolic_build changed: no {piece!r}"


def test_make_function_is_the_method_lazy_steps_build_their_two_steps_with():
  # training/lazy.py compiles its two steps (several replicas) with Keras' own
  # _make_function(step_function), as make_train_function does.
  keras_method = getattr(keras.Model, "_make_function", None)
  assert keras_method is not None, "Keras no longer has Model._make_function"
  assert _parameters(keras_method) == [("self", inspect.Parameter.empty),
                                       ("step_function", inspect.Parameter.empty)]
  assert "self._make_function(" in inspect.getsource(keras.Model.make_train_function)
  assert _parameters(keras.Model.make_train_function) == [
      ("self", inspect.Parameter.empty), ("force", False)]
  assert _parameters(Distiller.make_train_function) == _parameters(
      keras.Model.make_train_function)


@pytest.mark.parametrize("name", ["train_step", "test_step", "fit"])
def test_the_public_hooks_overridden_exist(name):
  assert callable(getattr(keras.Model, name, None)), name
