import fcntl
import os
import shutil
import subprocess
import sys
import tempfile

import numpy

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CREATED_DIRS = []  # Removed when the session ends (pytest_unconfigure).


def _session_dir(env: str, prefix: str) -> bool:
  """Points ``env`` at a new temporary folder unless it is set already (the
  workers inherit the parent's); True when this process made it."""
  if env in os.environ:
    return False
  os.environ[env] = tempfile.mkdtemp(prefix=prefix)
  _CREATED_DIRS.append(os.environ[env])
  return True


# One persistent XLA compilation cache for the whole test session: the many
# main.py runs of the tiny config (and this process) compile the same train
# step and sampler, which then load in milliseconds. Set before any test
# imports JAX; subprocesses inherit it through the environment.
if _session_dir('JAX_COMPILATION_CACHE_DIR', 'spad_jax_test_xla_cache_'):
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')

# Tests run in parallel workers (pytest-xdist, pytest.ini), which inherit
# this process's environment: a folder for results that workers build once
# and share (see _steps_on_1_and_4_devices).
SHARED_DIR_ENV = 'SPAD_JAX_TEST_SHARED_DIR'
_session_dir(SHARED_DIR_ENV, 'spad_jax_test_shared_')


def pytest_unconfigure(config):
  del config
  # Empty in the workers: only the process that made the folders removes them.
  for path in _CREATED_DIRS:
    shutil.rmtree(path, ignore_errors=True)


# Tests compile far more than they run (tiny shapes, a few steps): LLVM at
# -O0 cut a tiny main.py run by a quarter (80 s -> 58 s measured) and
# changed no result; every comparison in the tests runs under the same flag.
TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test subprocess with ``devices`` emulated CPU devices."""
  return f'--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}'


os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' +
                           TEST_XLA_FLAGS).strip()

# The package's XLA:CPU flags (spad_jax/xla_flags.py) must reach this process
# before any test computes with JAX, whichever test module is imported first.
import spad_jax  # pylint: disable=g-import-not-at-top,unused-import,wrong-import-position


def pytest_collection_modifyitems(config, items):
  """Tests marked ``long`` first: the workers then start on them together and
  end on short tests, instead of one worker finishing a long test alone."""
  del config
  items.sort(key=lambda item: item.get_closest_marker('long') is None)


def tiny_config():
  """tests/tiny_config.py's config (loaded by path: tests/ is no package)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      'tiny', os.path.join(ROOT, 'tests', 'tiny_config.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def reference_mdice(pred, label, k):
  """Foreground mean of per-class Dice over all pixels (classes in neither
  map left out), written independently of spad_jax.metrics."""
  dices = []
  for c in range(1, k):
    both = (pred == c).sum() + (label == c).sum()
    if both:
      dices.append(2 * ((pred == c) & (label == c)).sum() / both)
  return float(numpy.mean(dices))


def run_main(args, devices: int = 1, timeout: int = 600):
  """Runs main.py in a subprocess (own XLA device count); returns the result."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(devices)
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py')] +
                        list(args), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def main_runner():
  return run_main


# Train-step variants compared across device counts (tests/train_steps.py):
# name -> overrides. Two steps each: dropout first shows in the second
# update (it sits before zero-initialised convolutions).
STEP_VARIANTS = {
    'base': 'base',
    'dropout': 'model.dropout=0.2',
    'bf16': 'model.dtype=bfloat16',
    'importance_hybrid': ('diffusion.t_sampling=importance,'
                          'diffusion.importance_history=2,'
                          'diffusion.ce_lambda=0.5,'
                          'diffusion.ce_weighting=stage'),
    'deterministic': 'model.kind=deterministic',
    # Stratified t rides along: its strata span the global batch, so it is
    # one more thing that must not depend on the device count, and each
    # variant costs a compile on both device counts.
    'self_condition_own_sample_stratified': (
        'model.self_condition=True,diffusion.own_sample_fraction=0.5,'
        'diffusion.own_sample_stride=5,diffusion.t_sampling=stratified'),
}
NUM_STEPS = 2
# Losses of one step on 1 vs 4 devices: the per-device batch changes the
# float reduction order; under the tests' -O0 they differed by up to 2.9e-5
# relative (below 1e-5 at -O2). A wrong key, mask or mean moves them by
# 1e-3 or more.
DEVICE_LOSS_RTOL = 5e-5


def _start_train_steps(out, devices: int, names):
  """Starts tests/train_steps.py on ``devices`` emulated devices, writing
  ``out`` (.npz)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=xla_flags(devices))
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'tests', 'train_steps.py'), out,
       str(NUM_STEPS)] + [STEP_VARIANTS[n] for n in names], cwd=ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish_train_steps(run):
  """Waits for a run from ``_start_train_steps``."""
  try:
    _, stderr = run.communicate(timeout=900)
  except subprocess.TimeoutExpired:
    run.kill()
    raise
  assert run.returncode == 0, stderr[-3000:]


def _read_train_steps(out, names):
  """{name: {'loss', 'init', 'step1', 'step2', 'history_counts'?, ...}} of
  a finished run from ``_start_train_steps``."""
  data = dict(numpy.load(out))
  result = {}
  for i, name in enumerate(names):
    entry = {'loss': data[f'{i}/loss']}
    for part in ['init'] + [f'step{k}' for k in range(1, NUM_STEPS + 1)]:
      prefix = f'{i}/{part}'
      entry[part] = {k[len(prefix):]: v for k, v in data.items()
                     if k.startswith(prefix + '[')}
    for k, v in data.items():
      if k.startswith(f'{i}/history_'):
        entry[k[len(f'{i}/'):]] = v
    result[name] = entry
  return result


def _built_once(name: str, build) -> str:
  """A folder ``build(folder)`` fills once per test session: the first worker
  to need it builds it under a lock, the others wait and reuse it
  (pytest-xdist keeps session fixtures per worker)."""
  shared = os.path.join(os.environ[SHARED_DIR_ENV], name)
  os.makedirs(shared, exist_ok=True)
  with open(os.path.join(shared, 'lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = os.path.join(shared, 'done')
    if not os.path.exists(done):
      build(shared)
      open(done, 'w').close()
  return shared


@pytest.fixture(scope='session')
def _steps_on_1_and_4_devices():
  names = [list(STEP_VARIANTS), [n for n in STEP_VARIANTS if n != 'bf16']]
  outs = ['steps_1.npz', 'steps_4.npz']

  def build(folder):
    # Both processes at once: most of their time is single-threaded
    # compilation, so together they took 91 s against 172 s in turn.
    runs = [_start_train_steps(os.path.join(folder, out), d, n)
            for out, d, n in zip(outs, (1, 4), names)]
    try:
      for run in runs:
        _finish_train_steps(run)
    finally:
      for run in runs:
        if run.poll() is None:
          run.kill()

  shared = _built_once('train_steps', build)
  return [_read_train_steps(os.path.join(shared, out), n)
          for out, n in zip(outs, names)]


def _trained_tiny_workdir() -> str:
  """The shared workdir of tests/tiny_config.py trained for one epoch (4
  steps) by main.py; read it through ``trained_tiny_copy``."""

  def build(folder):
    result = run_main(['--config=tests/tiny_config.py',
                       f'--workdir={folder}/run',
                       '--config.train.num_epochs=1'])
    assert result.returncode == 0, result.stderr[-3000:]

  return os.path.join(_built_once('trained_tiny', build), 'run')


def trained_tiny_copy(dest: str) -> str:
  """A private copy at ``dest`` of a tiny workdir trained for one epoch
  (trained once per test session: several tests evaluate such a run)."""
  shutil.copytree(_trained_tiny_workdir(), dest)
  return dest


@pytest.fixture(scope='session')
def steps_on_1_device(_steps_on_1_and_4_devices):
  return _steps_on_1_and_4_devices[0]


@pytest.fixture(scope='session')
def steps_on_4_devices(_steps_on_1_and_4_devices):
  return _steps_on_1_and_4_devices[1]
