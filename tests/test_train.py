"""End-to-end: short training runs on 1 and 4 emulated devices, resume, eval."""

import json
import os

import numpy as np
import pytest

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
                        '--config.train.num_epochs=8'], devices=devices)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f'{devices} local / {devices} global devices' in result.stderr
  log = read_log(workdir)
  losses = np.array([row['loss'] for row in log])
  assert len(losses) == 16 and np.all(np.isfinite(losses))
  # Loss at log points 1-3 vs the last three (each averages 2 steps).
  assert losses[-3:].mean() < 0.7 * losses[:3].mean(), losses
  metrics = json.load(open(os.path.join(workdir, 'metrics.json')))
  assert metrics['checkpoint_step'] == 32


def test_resume_continues_at_saved_step(main_runner, tmp_path):
  workdir = str(tmp_path / 'resume')
  first = main_runner([TINY, f'--workdir={workdir}',
                       '--config.train.num_epochs=1'])
  assert first.returncode == 0, first.stderr[-3000:]
  assert checkpoint_steps(workdir) == [4]
  second = main_runner([TINY, f'--workdir={workdir}',
                        '--config.train.num_epochs=2'])
  assert second.returncode == 0, second.stderr[-3000:]
  assert 'Resuming from checkpoint at step 4' in second.stderr
  steps = [row['step'] for row in read_log(workdir)]
  assert steps == [2, 4, 6, 8]  # Continued at 5, nothing repeated.
  assert checkpoint_steps(workdir) == [4, 8]
  # The changed config is kept beside the original, which is not overwritten.
  configs = sorted(f for f in os.listdir(workdir) if f.startswith('config'))
  assert len(configs) == 2
  assert json.load(open(os.path.join(workdir, 'config.json')))[
      'train']['num_epochs'] == 1


def test_evaluate_mode_writes_metrics(main_runner, tmp_path):
  workdir = str(tmp_path / 'eval')
  missing = main_runner([TINY, f'--workdir={workdir}', '--mode=evaluate'])
  assert missing.returncode != 0
  assert 'does not exist' in missing.stderr
  assert main_runner([TINY, f'--workdir={workdir}',
                      '--config.train.num_epochs=1']).returncode == 0
  os.remove(os.path.join(workdir, 'metrics.json'))
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
  assert metrics['sampling'] == {'num_steps': 4, 'num_samples': 2,
                                 'diffusion_steps': 20}
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


def test_one_step_same_on_1_and_4_devices(tmp_path):
  """Same global batch and keys: 4 emulated devices match 1 device."""
  import subprocess
  import sys
  from conftest import ROOT
  results = {}
  for devices in (1, 4):
    env = dict(os.environ, JAX_PLATFORMS='cpu',
               XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}')
    out = tmp_path / f'd{devices}.npz'
    run = subprocess.run([sys.executable, 'tests/one_step.py', str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    results[devices] = dict(np.load(out))
  assert results[1].keys() == results[4].keys()
  np.testing.assert_allclose(results[1]['loss'], results[4]['loss'],
                             rtol=1e-5)
  for name in results[1]:
    np.testing.assert_allclose(results[4][name], results[1][name], rtol=1e-4,
                               atol=1e-6, err_msg=name)
  # The step changed the parameters (the comparison is not vacuous).
  assert results[1]['max_update'] > 1e-4
