"""bench/convergence.py: the curve helpers, and the bench end to end (tiny)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

from conftest import ROOT
from conftest import xla_flags
import pytest

PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


def _load_bench():
  # Under its own name: no clash with other modules called `convergence`.
  # Importing defines no flags (only running it as a script does).
  spec = importlib.util.spec_from_file_location(
      'bench_convergence', os.path.join(ROOT, 'bench', 'convergence.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


convergence = _load_bench()


def test_steps_to_fraction():
  steps = [10, 20, 30, 40, 50]
  # Final 0.8: 90 % of it is 0.72, first reached at step 30 (0.75).
  assert convergence.steps_to_fraction(steps, [0.1, 0.5, 0.75, 0.85, 0.8]) == 30
  # The first crossing counts, even when the curve dips below afterwards.
  assert convergence.steps_to_fraction(steps, [0.1, 0.9, 0.3, 0.6, 0.9]) == 20
  # A monotone curve: only the last point reaches 90 %.
  assert convergence.steps_to_fraction(steps, [0.1, 0.2, 0.3, 0.4, 0.5]) == 50
  assert convergence.steps_to_fraction(steps, [0.1, 0.2, 0.3, 0.4, 0.5],
                                       fraction=0.5) == 30
  # Missing values are skipped; the final value is the last finite one.
  assert convergence.steps_to_fraction(
      steps, [None, 0.7, float('nan'), 0.75, None]) == 20
  # Final val mDice < 0.05: the run did not learn, no convergence step.
  assert convergence.steps_to_fraction(steps, [0.0, 0.1, 0.0, 0.02, 0.04]) \
      is None
  assert convergence.steps_to_fraction([], []) is None
  assert convergence.steps_to_fraction([5], [None]) is None
  assert convergence.index_to_fraction([0.3, 0.6, 0.6]) == 1


def test_parse_log_resume_and_validation_time():
  rows = [
      {'step': 2, 'time': 100., 'loss': 10., 'steps_per_sec': 0.1},  # 20 s.
      {'step': 4, 'time': 101., 'loss': 8., 'steps_per_sec': 2.},
      {'step': 4, 'time': 105., 'val_mDice': 0.2, 'val_mIoU': 0.1,
       'val_seconds': 3.5},
      {'step': 6, 'time': 106., 'loss': 6., 'steps_per_sec': 2.},
      # Killed; resumed from the checkpoint of step 4 much later: step 6's
      # row is replaced, the downtime is not training time.
      {'step': 6, 'time': 500., 'loss': 5., 'steps_per_sec': 0.2},
      # A validation between two log rows, at the next window's rate.
      {'step': 7, 'time': 501., 'val_mDice': 0.5, 'val_mIoU': 0.3,
       'val_seconds': 1.},
      {'step': 8, 'time': 502., 'loss': 4., 'steps_per_sec': 2.},
      {'step': 8, 'time': 503., 'val_mDice': 0.6, 'val_mIoU': float('nan'),
       'val_seconds': 1.},
  ]
  log = convergence.parse_log(rows)
  assert log['train']['step'] == [2, 4, 6, 8]
  assert log['train']['loss'] == [10., 8., 5., 4.]
  assert log['val']['step'] == [4, 7, 8]
  assert log['val']['mDice'] == [0.2, 0.5, 0.6]
  assert log['val']['mIoU'] == [0.1, 0.3, None]
  # The first window (20 s for 2 steps) holds 19 s of start-up: 2 steps at
  # the next window's 2 steps/s take 1 s.
  assert log['startup_seconds'] == pytest.approx(19.)
  expected = [1., 2., 12., 13.]  # Seconds of training after start-up.
  assert log['train']['minutes'] == pytest.approx([s / 60 for s in expected])
  assert log['val']['minutes'] == pytest.approx([2 / 60, 12.5 / 60, 13 / 60])
  assert log['train_minutes'] == pytest.approx(13 / 60)
  assert log['val_seconds'] == pytest.approx(5.5)
  assert convergence.parse_log([])['train_minutes'] is None


def _run_bench(args, timeout=600):
  env = dict(os.environ)
  env['XLA_FLAGS'] = xla_flags(1)
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return subprocess.run(
      [sys.executable, os.path.join(ROOT, 'bench', 'convergence.py')] +
      list(args), cwd=ROOT, env=env, capture_output=True, text=True,
      timeout=timeout)


def test_unknown_variant_fails_before_any_work(tmp_path):
  out = tmp_path / 'out'
  result = _run_bench(['--config=tests/tiny_config.py', f'--out={out}',
                       '--variants=kl,no_such_variant', '--seeds=0'])
  assert result.returncode != 0
  assert 'no_such_variant' in result.stderr
  assert 'hybrid_stage' in result.stderr  # The known ones are listed.
  assert not out.exists()


@pytest.mark.long
def test_convergence_bench_end_to_end(tmp_path):
  out = tmp_path / 'conv'
  args = ['--config=tests/tiny_config.py', f'--out={out}',
          '--variants=kl,hybrid', '--seeds=0', '--epochs=2',
          '--eval_every_epochs=1', '--config.eval.split=val',
          # A one-level UNet compiles in half the time of the tiny config's.
          '--config.model.channel_mult=(1,)',
          '--config.model.attention_resolutions=()',
          '--config.model.num_res_blocks=1']
  result = _run_bench(args)
  assert result.returncode == 0, result.stderr[-3000:]

  data = json.load(open(out / 'convergence.json'))
  assert data['meta']['epochs'] == 2
  assert data['meta']['config_overrides']['eval.split'] == 'val'
  assert '--variants=kl,hybrid' in data['meta']['command']
  runs = {(r['variant'], r['seed']): r for r in data['runs']}
  assert sorted(runs) == [('hybrid', 0), ('kl', 0)]
  assert runs[('hybrid', 0)]['overrides']['diffusion.ce_lambda'] == 1.0
  for r in runs.values():
    assert r['status'] == 'done'
    train, val = r['curves']['train'], r['curves']['val']
    # 4 steps per epoch, logged every 2, validated every epoch (4 steps).
    assert train['step'] == [2, 4, 6, 8]
    assert val['step'] == [4, 8]
    assert all(math.isfinite(x) and x > 0 for x in train['loss'])
    for curve in (train, val):
      assert all(b >= a for a, b in zip(curve['minutes'],
                                        curve['minutes'][1:]))
    assert all(0 <= v <= 1 for v in val['mDice'])
    assert r['final_val_mDice'] == val['mDice'][-1]
    assert r['test']['split'] == 'val' and 0 <= r['test']['mDice'] <= 1
    assert r['train_minutes'] > 0 and r['eval_seconds'] > 0
  summary = data['summary']
  assert list(summary) == ['kl', 'hybrid']
  assert summary['kl']['seeds_done'] == [0]
  # Every variant pins every objective key (the base config may recommend
  # another objective); the Markdown shows only what differs from the paper.
  assert summary['hybrid']['overrides'] == {
      'model.kind': 'diffusion', 'diffusion.ce_lambda': 1.0,
      'diffusion.ce_weighting': 'constant', 'diffusion.t_sampling': 'uniform',
      'diffusion.dice_lambda': 0.0, 'diffusion.dice_weighting': 'constant'}
  assert summary['kl']['overrides']['diffusion.ce_lambda'] == 0.0

  md = open(out / 'convergence.md').read()
  assert '| variant |' in md and '| hybrid | `diffusion.ce_lambda=1.0` |' in md
  assert 'bench/convergence.py' in md and 'steps to 90%' in md
  for name in ('convergence_steps.png', 'convergence_minutes.png',
               'convergence_loss.png'):
    with open(out / name, 'rb') as f:
      assert f.read(8) == PNG_SIGNATURE, name
    assert os.path.getsize(out / name) > 1000

  # The same command again: both runs are read from disk, not retrained.
  metrics = out / 'runs' / 'kl' / 'seed0' / 'metrics.json'
  mtime = os.path.getmtime(metrics)
  again = _run_bench(args)
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'Skipping kl seed 0: finished' in again.stderr
  assert 'Skipping hybrid seed 0: finished' in again.stderr
  assert 'Run 1/' not in again.stderr
  assert os.path.getmtime(metrics) == mtime
  assert json.load(open(out / 'convergence.json'))['runs'] == data['runs']

  # --report_only finds the runs on disk by itself.
  os.remove(out / 'convergence.md')
  report = _run_bench([f'--out={out}', '--report_only'])
  assert report.returncode == 0, report.stderr[-3000:]
  assert '| hybrid |' in open(out / 'convergence.md').read()
