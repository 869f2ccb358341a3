"""End-to-end: short training runs on 1 and 4 emulated devices, resume, eval."""

import json
import os
import shutil

import numpy as np
import pytest

from conftest import DEVICE_LOSS_RTOL
from conftest import tiny_config
from conftest import trained_tiny_copy

TINY = '--config=tests/tiny_config.py'


def read_log(workdir):
  with open(os.path.join(workdir, 'train_log.jsonl')) as f:
    return [json.loads(line) for line in f]


def checkpoint_steps(workdir):
  return sorted(int(d) for d in os.listdir(os.path.join(workdir, 'checkpoints'))
                if d.isdigit())


@pytest.mark.parametrize('devices', [1, 4])
def test_short_run_loss_finite_and_decreasing(main_runner, tmp_path, devices):
  workdir = str(tmp_path / f'run{devices}')
  result = main_runner([TINY, f'--workdir={workdir}',
                        '--config.train.num_epochs=8',
                        '--config.train.eval_every_epochs=4',
                        '--config.train.monitor_train_cases=3'],
                       devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{devices} local / {devices} global devices' in result.stderr
  log = read_log(workdir)
  losses = np.array([row['loss'] for row in log if 'loss' in row])
  assert len(losses) == 16 and np.all(np.isfinite(losses))
  # Loss at log points 1-3 vs the last three (each averages 2 steps).
  assert losses[-3:].mean() < 0.7 * losses[:3].mean(), losses
  # Validation every 4 epochs (16 steps) and at the end; best kept apart.
  val = [row for row in log if 'val_mDice' in row]
  assert [row['step'] for row in val] == [16, 32]
  assert all(0 <= row['val_mDice'] <= 1 for row in val)
  # The train-split monitor runs with every validation.
  monitored = [row for row in log if 'train_mDice' in row]
  assert [row['step'] for row in monitored] == [16, 32]
  assert all(0 <= row['train_mDice'] <= 1 for row in monitored)
  assert os.path.exists(os.path.join(workdir, 'val_grid.png'))
  best_step = max(val, key=lambda row: row['val_mDice'])['step']
  assert sorted(int(d) for d in os.listdir(os.path.join(
      workdir, 'best_checkpoint')) if d.isdigit()) == [best_step]
  metrics = json.load(open(os.path.join(workdir, 'metrics.json')))
  assert metrics['checkpoint'] == 'best'
  assert metrics['checkpoint_step'] == best_step


def test_evaluate_mode_writes_metrics(main_runner, tmp_path):
  workdir = str(tmp_path / 'eval')
  missing = main_runner([TINY, f'--workdir={workdir}', '--mode=evaluate'])
  assert missing.returncode != 0
  assert 'does not exist' in missing.stderr
  trained_tiny_copy(workdir)  # Trained by main.py, one epoch.
  for name in ('metrics.json', 'eval_grid.png'):  # Its own evaluation's.
    os.remove(os.path.join(workdir, name))
  result = main_runner([TINY, f'--workdir={workdir}', '--mode=evaluate',
                        '--config.eval.num_samples=2'])
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.load(open(os.path.join(workdir, 'metrics.json')))
  for key in ('mIoU', 'mDice', 'per_class', 'sampling', 'checkpoint_step',
              'num_cases', 'seconds'):
    assert key in metrics
  assert set(metrics['per_class']) == {'background', 'srf', 'irf', 'shrm'}
  for name, entry in metrics['per_class'].items():
    if entry['IoU'] is not None:
      assert entry['Dice'] == pytest.approx(2 * entry['IoU'] /
                                            (1 + entry['IoU']))
  import tiny_config  # pylint: disable=g-import-not-at-top
  ev = tiny_config.get_config().eval  # The demo's sampler and temperature.
  assert metrics['sampling'] == {'num_steps': 4, 'num_samples': 2,
                                 'diffusion_steps': 20,
                                 'sampler': ev.sampler,
                                 'temperature': ev.temperature,
                                 'mode_last': 0, 'ensemble': ev.ensemble,
                                 'soft_map': ev.soft_map,
                                 'chain_label': ev.chain_label,
                                 'ensemble_of': ev.ensemble_of,
                                 'self_condition': False}
  assert metrics['num_cases'] == 8
  assert os.path.getsize(os.path.join(workdir, 'eval_grid.png')) > 0
  assert 'mDice' in result.stdout


def test_visualize_mode_writes_mask_grid(main_runner, tmp_path):
  workdir = tmp_path / 'viz'
  result = main_runner([TINY, f'--workdir={workdir}', '--mode=visualize'])
  assert result.returncode == 0, result.stderr[-3000:]
  import cv2
  grid = cv2.imread(str(workdir / 'spad_masks.png'))
  assert grid is not None and grid.shape[1] == 5 * 160  # 5 columns, 16² x10.
  assert not (workdir / 'checkpoints').exists()  # Nothing trained.


@pytest.mark.long
def test_one_step_same_on_1_and_4_devices(steps_on_1_device,
                                         steps_on_4_devices):
  """Same global batch and keys: 4 emulated devices match 1 device."""
  one, four = steps_on_1_device['base'], steps_on_4_devices['base']
  np.testing.assert_allclose(four['loss'][0], one['loss'][0],
                             rtol=DEVICE_LOSS_RTOL)
  assert one['step1'].keys() == four['step1'].keys()
  for name in one['step1']:
    np.testing.assert_allclose(four['step1'][name], one['step1'][name],
                               rtol=1e-4, atol=1e-6, err_msg=name)
  # The step changed the parameters (the comparison is not vacuous).
  assert max(float(np.abs(one['step1'][k] - one['init'][k]).max())
             for k in one['init']) > 1e-4


def load_checkpoint(workdir, step):
  """A checkpoint's arrays as a flat {path: numpy array} dict."""
  import jax
  import orbax.checkpoint as ocp
  path = os.path.join(os.path.abspath(workdir), 'checkpoints', str(step),
                      'default')
  items = ocp.StandardCheckpointer().restore(path)
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in
          jax.tree_util.tree_flatten_with_path(items)[0]}


@pytest.mark.long
def test_resume_is_bit_exact_and_works_on_other_device_counts(main_runner,
                                                              tmp_path):
  """16 steps straight == 8 steps, stop, resume to 16 (params, optimizer
  state, EMA, step: bitwise); resuming on 4 devices matches to float
  tolerance (a different reduction order)."""
  args = [TINY, '--config.train.num_epochs=4',
          '--config.train.eval_every_epochs=0',
          '--config.train.checkpoint_every_steps=8']
  straight = str(tmp_path / 'straight')
  assert main_runner(args + [f'--workdir={straight}']).returncode == 0
  workdir = str(tmp_path / 'resumed')
  first = main_runner(args + [f'--workdir={workdir}',
                              '--config.train.max_steps_per_run=8'])
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpoint_steps(workdir) == [8]
  assert not os.path.exists(os.path.join(workdir, 'metrics.json'))
  shutil.copytree(workdir, tmp_path / 'resumed4')
  for name, devices in (('resumed', 1), ('resumed4', 4)):
    second = main_runner(args + [f'--workdir={tmp_path / name}'],
                         devices=devices)
    assert second.returncode == 0, second.stderr[-3000:]
    assert 'Resuming from checkpoint at step 8' in second.stderr
  # The log continues at step 9, nothing repeated; the changed config
  # (max_steps_per_run) is kept beside the original, which stays.
  steps = [row['step'] for row in read_log(workdir) if 'loss' in row]
  assert steps == list(range(2, 17, 2))
  configs = sorted(f for f in os.listdir(workdir) if f.startswith('config'))
  assert len(configs) == 2
  assert json.load(open(os.path.join(workdir, 'config.json')))[
      'train']['max_steps_per_run'] == 8
  assert os.path.exists(os.path.join(workdir, 'metrics.json'))
  reference = load_checkpoint(straight, 16)
  resumed = load_checkpoint(tmp_path / 'resumed', 16)
  assert reference.keys() == resumed.keys()
  assert any('opt_state' in k for k in reference)
  assert any('ema_params' in k for k in reference)
  for key in reference:
    np.testing.assert_array_equal(resumed[key], reference[key], err_msg=key)
  # The 8 resumed steps changed the parameters (the check is not vacuous).
  halfway = load_checkpoint(tmp_path / 'resumed', 8)
  assert any(not np.array_equal(halfway[k], reference[k]) for k in reference
             if k.startswith("['params']"))
  # On 4 devices the gradient sum runs in another order; Adam amplifies the
  # rounding in near-zero gradients, so compare each group's relative L2
  # distance (measured 1.5e-4 for params; the halfway checkpoint is 0.08).
  on4 = load_checkpoint(tmp_path / 'resumed4', 16)
  assert on4.keys() == reference.keys()
  for group in ('params', 'ema_params', 'opt_state'):
    keys = [k for k in reference if k.startswith(f"['{group}']") and
            reference[k].dtype.kind == 'f']
    flat = lambda ckpt: np.concatenate([ckpt[k].ravel() for k in keys])
    ref = flat(reference)
    assert np.linalg.norm(flat(on4) - ref) < 2e-3 * np.linalg.norm(ref), group
    assert np.linalg.norm(flat(halfway) - ref) > 1e-2 * np.linalg.norm(ref)
  assert int(on4["['step']"]) == 16


def test_sigkill_during_checkpoint_write_keeps_previous(main_runner, tmp_path):
  import signal
  import subprocess
  import sys
  from conftest import ROOT
  workdir = tmp_path / 'killed'
  workdir.mkdir()
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  run = subprocess.run([sys.executable, 'tests/kill_during_save.py',
                        str(workdir)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
  assert run.returncode == -signal.SIGKILL, (run.stdout, run.stderr[-3000:])
  assert 'killing while writing 2.' in run.stdout
  assert checkpoint_steps(workdir) == [1]  # Step 2 never became visible.
  restored = load_checkpoint(workdir, 1)
  params = np.concatenate([v.ravel() for k, v in sorted(restored.items())
                           if k.startswith("['params']")])
  np.testing.assert_array_equal(params, np.load(workdir / 'saved_params.npy'))
  # Training resumes from it, saving over the dead write's leftovers.
  result = main_runner([TINY, f'--workdir={workdir}',
                        '--config.train.checkpoint_every_steps=1',
                        '--config.train.eval_every_epochs=0'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Resuming from checkpoint at step 1' in result.stderr
  assert checkpoint_steps(workdir) == [10, 11, 12]


@pytest.mark.long
def test_two_processes_train_to_identical_parameters(tmp_path):
  """jax.distributed on localhost: 2 processes x 2 emulated devices; both
  hold the parameters of one process with 4 devices (same global batch)."""
  import socket
  import subprocess
  import sys
  from conftest import ROOT
  from conftest import xla_flags
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2',
             XLA_FLAGS=xla_flags(2))
  workdir = tmp_path / 'multihost'
  # Logs go to files: a full pipe would block one process mid-collective
  # while the test waits on the other.
  logs = [open(tmp_path / f'log{i}.txt', 'w') for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, 'tests/multihost_worker.py', f'localhost:{port}', '2',
       str(i), str(workdir), str(tmp_path / f'p{i}.npz')], cwd=ROOT, env=env,
      stdout=logs[i], stderr=subprocess.STDOUT) for i in range(2)]
  try:
    for p in procs:
      p.wait(timeout=600)
  finally:
    for p in procs:
      p.kill()
    for log in logs:
      log.close()
  for i, p in enumerate(procs):
    assert p.returncode == 0, (tmp_path / f'log{i}.txt').read_text()[-4000:]
  p0, p1 = (dict(np.load(tmp_path / f'p{i}.npz')) for i in range(2))
  assert list(p0['devices']) == [2, 4] and list(p1['devices']) == [2, 4]
  assert int(p0['step']) == 12
  assert p0.keys() == p1.keys()
  for key in p0:
    np.testing.assert_array_equal(p0[key], p1[key], err_msg=key)
  assert checkpoint_steps(workdir) == [4, 8, 12]
  log = read_log(workdir)  # Written by process 0 only: one row per step.
  assert [r['step'] for r in log if 'loss' in r] == list(range(2, 13, 2))
  assert [r['step'] for r in log if 'val_mDice' in r] == [4, 8, 12]
  assert json.load(open(workdir / 'metrics.json'))['num_cases'] == 8
  # The hosts agree by construction (pmean); the reference is one process
  # with the same 4 devices, global batch, keys and steps.
  ref_env = dict(env, XLA_FLAGS=xla_flags(4))
  ref = subprocess.run(
      [sys.executable, 'tests/multihost_worker.py', '-', '1', '0',
       str(tmp_path / 'single'), str(tmp_path / 'single.npz')], cwd=ROOT,
      env=ref_env, capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-4000:]
  single = dict(np.load(tmp_path / 'single.npz'))
  assert list(single['devices']) == [4, 4]
  assert single.keys() == p0.keys()
  assert int(single['step']) == int(p0['step'])
  # The chain label's pick counts every val pixel once, whichever process
  # sampled it: the one process's total.
  for key in [k for k in p0 if k.startswith('val_confusion_')]:
    assert p0[key].sum() == single[key].sum() > 0, key
  # Not bitwise: gloo sums the two processes' partial means in another order
  # than one process's all-reduce over 4 devices, and Adam amplifies the
  # rounding of near-zero gradients (only 2 % of the values are equal).
  # Measured relative L2 distance after 12 steps: 3.8e-4 (params), 3.3e-4
  # (EMA), 100x below what the last 4 steps moved them (4.1e-2, 3.6e-2).
  halfway = load_checkpoint(tmp_path / 'single', 8)
  for group in ('params', 'ema_params'):
    keys = [k for k in p0 if k.startswith(group)]
    flat = lambda d: np.concatenate([d[k].ravel() for k in keys])
    ref = flat(single)
    assert (np.linalg.norm(flat(p0) - ref) < 2e-3 * np.linalg.norm(ref)), group
    earlier = np.concatenate([halfway[f"['{group}']" + k[len(group):]].ravel()
                              for k in keys])
    assert np.linalg.norm(earlier - ref) > 1e-2 * np.linalg.norm(ref), group


def test_init_compiled_unoptimised_gives_the_same_parameters():
  """create_train_state compiles its one-off init without backend
  optimisation (7 s less per run on CPU); the parameters stay the same up to
  the last bit of a few values."""
  import jax
  import jax.numpy as jnp
  from spad_jax import train_state
  from spad_jax.models import unet
  config = tiny_config()
  model = unet.create_model(config)
  key = jax.random.key(3)
  ours = train_state.create_train_state(config, model, key, 10).params
  s, k = config.data.image_size, config.data.num_classes
  optimised = jax.jit(lambda key: model.init(
      key, jnp.zeros((1, s, s, k)), jnp.zeros((1, s, s, 1)),
      jnp.zeros((1,), jnp.int32))['params'])(key)
  ours, optimised = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
                     for p in (ours, optimised))
  # The initialisers' float maths may round differently in the last bit.
  np.testing.assert_allclose(ours, optimised, rtol=2e-7, atol=1e-7)
  assert np.mean(ours == optimised) > 0.9 and np.abs(ours).max() > 0.1
