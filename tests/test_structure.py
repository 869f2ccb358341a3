"""Package structure: no import cycles, the DESIGN §5 layers, no absl flags
defined by library modules (only entry points define flags).

The import graph is read from the source with ``ast`` (module-level imports
and imports inside functions alike), independently of Python's import
machinery, so a lazy import that would close a cycle is caught too.
"""

import ast
import json
import os
import subprocess
import sys
import textwrap

from conftest import ROOT

PACKAGE = 'spad_jax'
PACKAGE_DIR = os.path.join(ROOT, PACKAGE)

# DESIGN §5: "Layers, each importing only those above it: (1) data,
# diffusion, perturb, models, metrics; (2) train_state; (3) evaluate;
# (4) train; (5) predict, visualize, main.py, experiments/, bench/."
# Small helpers that import nothing of a higher layer sit in layer 1. Here
# visualize.py holds the drawing helpers evaluate and train use (grid PNGs),
# so it is layer 1 as long as it imports nothing above perturb/data.
# predict.py is an entry point's library (--mode=predict): layer 5. A module
# missing from this table fails test_every_module_has_a_layer: place it.
LAYERS = {
    'spad_jax': 1,  # The package __init__ (applies xla_flags).
    'spad_jax.xla_flags': 1,
    'spad_jax.calibration': 1,
    'spad_jax.data': 1,  # The whole subpackage.
    'spad_jax.diffusion': 1,
    'spad_jax.perturb': 1,
    'spad_jax.models': 1,  # The whole subpackage.
    'spad_jax.metrics': 1,
    'spad_jax.files': 1,
    'spad_jax.formatting': 1,
    'spad_jax.config_keys': 1,
    'spad_jax.records': 1,
    'spad_jax.tf_cpu': 1,
    'spad_jax.timesteps': 1,
    'spad_jax.objectives': 1,
    'spad_jax.config_validation': 1,
    'spad_jax.visualize': 1,
    'spad_jax.train_state': 2,
    'spad_jax.predictors': 3,  # The compiled samplers evaluate and predict use.
    'spad_jax.evaluate': 3,
    'spad_jax.train': 4,
    'spad_jax.predict': 5,
    'spad_jax.robustness': 5,  # --mode=robustness.
}


def package_modules():
  """{module name: file path} of every .py file under spad_jax/."""
  modules = {}
  for folder, dirs, names in os.walk(PACKAGE_DIR):
    dirs[:] = [d for d in dirs if not d.startswith(('.', '__pycache__'))]
    for name in names:
      if not name.endswith('.py'):
        continue
      path = os.path.join(folder, name)
      parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
      if parts[-1] == '__init__':
        parts = parts[:-1]
      modules['.'.join(parts)] = path
  return modules


def resolve(name, modules):
  """The longest prefix of dotted ``name`` that is a package module."""
  parts = name.split('.')
  while parts:
    candidate = '.'.join(parts)
    if candidate in modules:
      return candidate
    parts.pop()
  return None


def imports_of(module, path, modules):
  """Package modules that ``module`` imports anywhere in its source:
  ``import a.b``, ``from a import b`` (b a module or a name of a),
  ``from a.b import c``, and relative forms."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  is_package = path.endswith('__init__.py')
  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # Relative: resolve against this module's package.
        base = module.split('.')
        if not is_package:
          base = base[:-1]
        base = base[:len(base) - (node.level - 1)]
        source = '.'.join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ''
      # `from a import b`: b is a submodule if a file says so, else a name
      # defined in a.
      names = []
      for alias in node.names:
        full = f'{source}.{alias.name}'
        names.append(full if full in modules else source)
    else:
      continue
    for name in names:
      target = resolve(name, modules)
      if (target is not None and target != module and
          target.split('.')[0] == PACKAGE and target != PACKAGE):
        found.add(target)
  return found


def import_graph():
  modules = package_modules()
  return {m: imports_of(m, p, modules) for m, p in sorted(modules.items())}


def find_cycle(graph):
  """One import cycle as a list [a, b, ..., a], or None."""
  white, grey, black = 0, 1, 2
  color = {node: white for node in graph}
  stack = []

  def visit(node):
    color[node] = grey
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if color.get(nxt, white) == grey:
        return stack[stack.index(nxt):] + [nxt]
      if color.get(nxt, white) == white:
        cycle = visit(nxt)
        if cycle:
          return cycle
    stack.pop()
    color[node] = black
    return None

  for node in sorted(graph):
    if color[node] == white:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_graph_reader_sees_all_import_forms():
  """The reader finds the imports the real modules use (so the cycle and
  layer checks below are not vacuous)."""
  graph = import_graph()
  # `from spad_jax import evaluate` at the top of train.py.
  assert 'spad_jax.evaluate' in graph['spad_jax.train']
  # `from spad_jax.models import unet` and `from spad_jax.data import x`.
  assert 'spad_jax.models.unet' in graph['spad_jax.train_state']
  assert 'spad_jax.data.pipeline' in graph['spad_jax.train']
  # `from spad_jax.data.sources import DATASETS` (a name of a module).
  assert 'spad_jax.data.sources' in graph['spad_jax.config_validation']
  # Imports inside functions only (lazy imports).
  assert 'spad_jax.data.annotations' in graph['spad_jax.evaluate']
  assert 'spad_jax.data.tfds_folder' in graph['spad_jax.data.sources']
  assert 'spad_jax.perturb' in graph['spad_jax.config_validation']


def test_find_cycle_on_known_graphs():
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': set()}) is None
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == ['a', 'b', 'c',
                                                               'a']
  assert find_cycle({'x': set(), 'a': {'x', 'b'}, 'b': {'a'}}) == ['a', 'b',
                                                                   'a']


def test_no_import_cycle():
  graph = import_graph()
  cycle = find_cycle(graph)
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)


def layer_of(module):
  """The layer of a module or of the subpackage holding it (the package
  root's own entry covers its __init__ only, else every module would have
  one)."""
  parts = module.split('.')
  while len(parts) > 1:
    name = '.'.join(parts)
    if name in LAYERS:
      return LAYERS[name]
    parts.pop()
  return LAYERS.get(module)


def test_every_module_has_a_layer():
  missing = [m for m in package_modules() if layer_of(m) is None]
  assert not missing, f'add these modules to LAYERS (DESIGN §5): {missing}'


def layer_violations(graph):
  violations = []
  for module, targets in sorted(graph.items()):
    for target in sorted(targets):
      if layer_of(target) > layer_of(module):
        violations.append(f'{module} (layer {layer_of(module)}) imports '
                          f'{target} (layer {layer_of(target)})')
  return violations


def test_modules_import_only_their_own_or_lower_layers():
  violations = layer_violations(import_graph())
  assert not violations, '\n'.join(violations)


def test_layer_check_catches_an_upward_import():
  """The rule on the real table: same layer and downward pass, upward
  imports (train_state -> evaluate, visualize -> train_state) are named."""
  graph = {'spad_jax.train_state': {'spad_jax.evaluate', 'spad_jax.diffusion'},
           'spad_jax.visualize': {'spad_jax.train_state',
                                  'spad_jax.data.pipeline'},
           'spad_jax.train': {'spad_jax.evaluate'},
           'spad_jax.data.pipeline': {'spad_jax.perturb'}}
  assert layer_violations(graph) == [
      'spad_jax.train_state (layer 2) imports spad_jax.evaluate (layer 3)',
      'spad_jax.visualize (layer 1) imports spad_jax.train_state (layer 2)']


def test_import_reader_on_a_sample_module(tmp_path):
  """Relative, aliased, multi-name and function-level imports; names that
  are not modules resolve to their module; other packages are ignored."""
  source = tmp_path / 'sample.py'
  source.write_text(textwrap.dedent("""
      import numpy as np
      import spad_jax.models.unet as u
      from spad_jax import diffusion, formatting as fmt
      from spad_jax.data.sources import DATASETS
      from . import timesteps
      from .data import augment

      def lazy():
        from spad_jax import train  # Inside a function.
        return train
      """))
  modules = package_modules()
  found = imports_of('spad_jax.sample', str(source), modules)
  assert found == {'spad_jax.models.unet', 'spad_jax.diffusion',
                   'spad_jax.formatting', 'spad_jax.data.sources',
                   'spad_jax.timesteps', 'spad_jax.data.augment',
                   'spad_jax.train'}


_FLAG_PROBE = textwrap.dedent('''
    import importlib, json, pkgutil, sys, types
    from absl import flags
    import spad_jax

    def defined_by_package():
      return sorted(f.name for module, fl in
                    flags.FLAGS.flags_by_module_dict().items()
                    if module.split('.')[0] == 'spad_jax' for f in fl)

    before = set(flags.FLAGS)
    imported = []
    for info in pkgutil.walk_packages(spad_jax.__path__, 'spad_jax.'):
      importlib.import_module(info.name)
      imported.append(info.name)
    result = {'imported': imported, 'by_package': defined_by_package(),
              'new': sorted(set(flags.FLAGS) - before)}
    # Self-check: a flag defined by a spad_jax module is seen.
    probe = types.ModuleType('spad_jax._flag_probe')
    sys.modules[probe.__name__] = probe
    exec("from absl import flags\\n"
         "flags.DEFINE_integer('spad_probe_flag', 0, 'probe')",
         probe.__dict__)
    result['probe_seen'] = 'spad_probe_flag' in defined_by_package()
    print(json.dumps(result))
''')


def test_no_absl_flags_defined_at_import_by_library_modules():
  """Only entry points (main.py, bench/) define flags: importing any
  spad_jax module in a fresh interpreter adds none of spad_jax's own."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  run = subprocess.run([sys.executable, '-c', _FLAG_PROBE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(run.stdout.strip().splitlines()[-1])
  expected = {m for m in package_modules() if m != PACKAGE}
  assert set(result['imported']) == expected
  assert result['probe_seen']  # The check would see a package flag.
  assert result['by_package'] == [], result['by_package']
  # Flags that third-party imports define (absl.logging, TF, orbax) are
  # fine; none may be a flag name spad_jax's entry points define.
  assert not {'config', 'workdir', 'mode'} & set(result['new'])
