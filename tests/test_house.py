"""The layout the README promises: no import circle among tfjac's modules, config.py a leaf, and
a mode one module with one registry entry (modes.Mode), read by run.py and the checks; the
rooms' direction (training below the modes, the modes below the command line's checks)."""
import ast
import dataclasses
import importlib
import os

import pytest
from absl import flags

from tfjac import modes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(REPO, "tfjac")


def _module_name(root, path):
  rel = os.path.relpath(path, os.path.dirname(root))[:-len(".py")].split(os.sep)
  return ".".join(rel[:-1] if rel[-1] == "__init__" else rel)


def _sources(root):
  """{module name: (path, parsed tree)} of every .py file under the package `root`."""
  found = {}
  for directory, _, files in os.walk(root):
    for f in files:
      if f.endswith(".py"):
        path = os.path.join(directory, f)
        with open(path) as fh:
          found[_module_name(root, path)] = (path, ast.parse(fh.read(), path))
  return found


def _top_level(tree):
  """The import statements run when the module is imported (module body, and the bodies of
  top-level if / try blocks), not those inside functions or classes."""
  todo = list(tree.body)
  while todo:
    node = todo.pop(0)
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      yield node
    elif isinstance(node, (ast.If, ast.Try)):
      todo.extend(node.body + node.orelse + getattr(node, "finalbody", []) +
                  [s for h in getattr(node, "handlers", []) for s in h.body])


def _targets(node, module, is_package, known):
  """The modules of `known` an import statement of `module` loads."""
  if isinstance(node, ast.Import):
    return {a.name for a in node.names if a.name in known}
  base = node.module or ""
  if node.level:  # relative: from the package of `module`
    parts = module.split(".")
    parts = parts if is_package else parts[:-1]
    parts = parts[:len(parts) - node.level + 1]
    base = ".".join(parts + ([node.module] if node.module else []))
  out = set()
  for a in node.names:
    if f"{base}.{a.name}" in known:  # from package import submodule
      out.add(f"{base}.{a.name}")
    elif base in known:
      out.add(base)
  return out


def import_graph(root, all_levels=False):
  """{module: set of modules of the same package it imports} (module level only unless
  `all_levels`)."""
  sources = _sources(root)
  graph = {}
  for module, (path, tree) in sources.items():
    nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if (
        all_levels) else list(_top_level(tree))
    is_package = path.endswith("__init__.py")
    graph[module] = set().union(*(_targets(n, module, is_package, sources) for n in nodes)) - {
        module}
  return graph


def find_cycle(graph):
  """One import cycle [a, b, ..., a] of `graph`, or None."""
  state = {}  # 1: on the current path, 2: done
  path = []

  def visit(node):
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state:
        cycle = visit(nxt)
        if cycle:
          return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_no_import_cycle_among_tfjac_modules():
  """Imports inside functions count too: an import deferred into a function is still a
  dependency, and a cycle through one only moves the failure to the first call."""
  graph = import_graph(PACKAGE, all_levels=True)
  assert "tfjac.config" in graph and "tfjac.modes.transfer" in graph
  assert "tfjac.data" in graph["tfjac.modes.conditions"]  # the graph sees imports at all
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_planted_cycle(tmp_path):
  """The test above can fail: a package whose a imports b (relative, from-import of a
  submodule) and b imports a (absolute) has the cycle a -> b -> a; imports inside a function
  are not module level."""
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from . import b\n")
  (pkg / "b.py").write_text("import os\ntry:\n  import pkg.a\nexcept ImportError:\n  pass\n")
  (pkg / "c.py").write_text("def f():\n  from pkg import a\n")
  graph = import_graph(str(pkg))
  assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
  assert graph["pkg.c"] == set()
  (pkg / "b.py").write_text("import os\n")
  assert find_cycle(import_graph(str(pkg))) is None


def _imports_between(graph, importer, imported):
  """The edges of `graph` from a module under the package `importer` to one under `imported`."""
  def under(module, package):
    return module == package or module.startswith(package + ".")
  return sorted(f"{a} -> {b}" for a, targets in graph.items() if under(a, importer)
                for b in targets if under(b, imported))


# The rooms' direction: training is below the modes (a mode runs a fit; a fit knows no mode),
# and the modes are below the command line's checks (a mode's rules live in its own check).
_FORBIDDEN = [("tfjac.training", "tfjac.modes"), ("tfjac.modes", "tfjac.checks"),
              ("tfjac.modes", "tfjac.run"), ("tfjac.training", "tfjac.checks")]


def test_training_never_imports_modes_and_modes_never_import_the_checks():
  graph = import_graph(PACKAGE, all_levels=True)
  found = [e for importer, imported in _FORBIDDEN
           for e in _imports_between(graph, importer, imported)]
  assert not found, found


def test_the_room_rule_sees_imports_inside_functions(tmp_path):
  """The rule above can fail: a function-level import of the modes from a training module."""
  pkg = tmp_path / "tfjac"
  (pkg / "training").mkdir(parents=True)
  (pkg / "modes").mkdir()
  for f in ("__init__.py", "checks.py", "training/__init__.py", "modes/__init__.py"):
    (pkg / f).write_text("")
  (pkg / "training" / "fit.py").write_text("def f():\n  from tfjac import modes\n")
  (pkg / "modes" / "m.py").write_text("def g():\n  from tfjac.checks import x\n")
  graph = import_graph(str(pkg), all_levels=True)
  assert _imports_between(graph, "tfjac.training", "tfjac.modes") == [
      "tfjac.training.fit -> tfjac.modes"]
  assert _imports_between(graph, "tfjac.modes", "tfjac.checks") == [
      "tfjac.modes.m -> tfjac.checks"]
  assert _imports_between(import_graph(str(pkg)), "tfjac.training", "tfjac.modes") == []


def test_config_is_a_leaf():
  """config.py imports nothing from tfjac but errors, at any level (not even in a function)."""
  graph = import_graph(PACKAGE, all_levels=True)
  assert graph["tfjac.config"] <= {"tfjac.errors"}, graph["tfjac.config"]
  assert "tfjac.config" in graph["tfjac.checks"]  # the graph sees imports at all


def test_modes_registry_imports_nothing():
  graph = import_graph(PACKAGE, all_levels=True)
  assert graph["tfjac.modes"] == set()


@pytest.mark.parametrize("name", list(modes.MODES))
def test_a_mode_is_one_module_with_one_registry_entry(name):
  from tfjac import hints  # pylint: disable=g-import-not-at-top
  assert modes.MODES[name] == f"tfjac.modes.{name}"
  assert os.path.isfile(os.path.join(PACKAGE, "modes", f"{name}.py"))
  module = importlib.import_module(f"tfjac.modes.{name}")
  mode = modes.load(name)
  assert mode is module.MODE and isinstance(mode, modes.Mode)
  for fn in ("check", "run", "summary_lines"):
    assert callable(getattr(mode, fn)), fn
  assert mode.run is module.run  # the entry plus its run function
  assert mode.default_hints is None or (
      isinstance(mode.default_hints, tuple) and set(mode.default_hints) <= set(hints.HINTS))
  assert isinstance(mode.always_hints, tuple) and set(mode.always_hints) <= set(hints.HINTS)
  assert mode.default_jac_target is None or mode.default_jac_target in hints.JACOBIAN_TARGETS
  for a in ("needs_teacher", "builds_student", "teacher_cache", "hints_read_teacher"):
    assert isinstance(getattr(mode, a), bool), a
  assert mode.top_k_among in ("dataset", "teacher")


def test_mode_entries_are_frozen():
  with pytest.raises(dataclasses.FrozenInstanceError):
    modes.load("distill").needs_teacher = True  # type: ignore[misc]


def _resolved(argv):
  from tfjac import run  # pylint: disable=g-import-not-at-top  (defines the flags)
  flags.FLAGS(["tfjac"] + argv)
  try:
    config = run.config_from_flags()
  finally:
    flags.FLAGS.unparse_flags()
  return config.hints.hints, config.hints.jac_target


# What run.py resolved before the modes declared it (issue 12): the same defaults must resolve.
_BEFORE = {"teacher": ("ce",), "distill": ("act", "jac", "ce"), "regularize": ("ce", "jacnorm"),
           "transfer": ("ce", "lwf"), "finetune": ("ce",), "conditions": ("ce",)}


@pytest.mark.parametrize("name", list(modes.MODES))
def test_run_resolves_each_modes_declared_defaults(name):
  from tfjac import run  # pylint: disable=g-import-not-at-top  (defines the flags)
  del run
  mode = modes.load(name)
  hints, target = _resolved([f"--mode={name}"])
  expected = mode.default_hints or tuple(flags.FLAGS["hints"].default)
  assert hints == expected == _BEFORE[name]
  assert target == (mode.default_jac_target or flags.FLAGS["jac_target"].default)
  assert target == ("teacher_top1" if name == "transfer" else "label")
  # Given flags win over the mode's defaults; its always_hints are put first when left out.
  hints, target = _resolved([f"--mode={name}", "--hints=kd", "--jac_target=all"])
  assert hints == mode.always_hints + ("kd",) and target == "all"


def test_transfer_always_trains_with_ce_on_the_labels():
  assert _resolved(["--mode=transfer", "--hints=lwf,jac"])[0] == ("ce", "lwf", "jac")
  assert _resolved(["--mode=transfer", "--hints=jac,ce"])[0] == ("jac", "ce")
  assert _resolved(["--mode=distill", "--hints=jac"])[0] == ("jac",)


def _mode_name_comparisons(tree):
  """Comparisons of something called *mode with a mode's name: an if-chain on modes."""
  names = set(modes.MODES)
  for node in ast.walk(tree):
    if not isinstance(node, ast.Compare):
      continue
    sides = [node.left] + node.comparators
    spelled = any(isinstance(s, ast.Constant) and s.value in names or
                  isinstance(s, (ast.Tuple, ast.List, ast.Set)) and any(
                      isinstance(e, ast.Constant) and e.value in names for e in s.elts)
                  for s in sides)
    about_mode = any(isinstance(s, ast.Attribute) and s.attr == "mode" or
                     isinstance(s, ast.Name) and s.id == "mode" for s in sides)
    if spelled and about_mode:
      yield node.lineno


def test_nothing_tests_a_mode_by_its_name():
  found = [f"{path}:{line}" for path, tree in _sources(PACKAGE).values()
           for line in _mode_name_comparisons(tree)]
  assert not found, found
  planted = ast.parse("if config.mode in ('teacher', 'x'):\n  pass\nif f.mode == 'transfer': pass")
  assert list(_mode_name_comparisons(planted)) == [1, 3]


def _results(mode, **parts):
  return {"mode": mode, "config": {"hints": {"hints": ["ce", "lwf"]}}, "replicas": 1,
          "dataset": {"name": "digits", "skipped_images": 0}, "total_seconds": 1.25,
          "workdir": "/w", **parts}


def test_the_summary_takes_each_modes_own_lines():
  from tfjac import run  # pylint: disable=g-import-not-at-top
  conditions = {"teacher": {"path": "t.keras", "source_classes": 5},
                "source_loss": {"dataset": "src", "cross_entropy": 0.5, "accuracy": 0.875},
                "lipschitz": {"jacobian_spectral_norm": {"max": 3.0, "p50": 1.0, "p99": 2.5},
                              "top1_gradient_norm": {"max": 0.25}},
                "target": {"examples": 40, "classes": 4},
                "distance": {"feature_space": "penultimate", "source": "src", "frechet": 1.5,
                             "frechet_source_halves": 0.5, "mmd2": 0.125,
                             "mmd2_source_halves": 0.0625}}
  assert run.summary(_results("conditions", conditions=conditions)).splitlines() == [
      "tfjac conditions on digits (1 replica(s))",
      "  teacher: t.keras (5 source classes)",
      "  1. teacher's loss on its source data (src): cross-entropy 0.5, accuracy 87.50%",
      "  2. teacher's Lipschitz estimate on 40 target images (4 classes, stratified): Jacobian "
      "spectral norm max 3, p50 1, p99 2.5; top-1 gradient norm max 0.25",
      "  3. source/target distance (penultimate features): Frechet 1.5 (source halves: 0.5), "
      "MMD^2 0.125 (source halves: 0.0625)",
      "  time: 1.2 s",
      "  outputs: /w/results.json, /w/flags.cfg; tensorboard --logdir /w/tensorboard"]
  student = {"model": "vgg4", "train_examples": 50, "test_accuracy": 0.5, "best_epoch": 2,
             "epochs_run": 3, "saved_model": "/w/student/saved_model",
             "test": {"accuracy_under_noise": {"0.1": 0.25}}}
  teacher = {"path": "t.keras", "source_classes": 7}
  assert run.summary(_results("transfer", teacher=teacher, student=student)).splitlines()[1:5] == [
      "  teacher: t.keras (another label space: 7 classes)",
      "  student vgg4 (ce,lwf; 50 training images): test accuracy 50.00% (best validation "
      "epoch 2/3)",
      "  student SavedModel: /w/student/saved_model",
      "  student accuracy under input noise: sigma 0.1: 25.00%"]
