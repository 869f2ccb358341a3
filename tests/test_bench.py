"""The sampling speed/accuracy bench runs end to end at tiny sizes on CPU."""

import json
import os
import subprocess
import sys

from conftest import ROOT


def test_sampling_curve_bench(main_runner, tmp_path):
  workdir = str(tmp_path / 'tiny')
  trained = main_runner(['--config=tests/tiny_config.py', f'--workdir={workdir}',
                         '--config.train.num_epochs=1'])
  assert trained.returncode == 0, trained.stderr[-3000:]
  out = str(tmp_path / 'bench')
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [sys.executable, 'bench/sampling_curve.py',
       '--config=tests/tiny_config.py', f'--workdir={workdir}',
       '--steps=1,4,50', '--samples=1,2', '--max_cases=4', f'--out={out}'],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.load(open(os.path.join(out, 'sampling_curve.json')))
  rows = data['rows']
  assert [(r['num_steps'], r['num_samples']) for r in rows] == [
      (1, 1), (1, 2), (4, 1), (4, 2), (50, 1), (50, 2)]
  assert all('skipped' in r for r in rows[4:])  # T = 20 in the tiny config.
  for r in rows[:4]:
    assert r['ms_per_image'] > 0 and 0 <= r['mDice'] <= 1
  assert data['meta']['num_cases'] == 4
  assert os.path.getsize(os.path.join(out, 'sampling_curve.png')) > 1000
  assert '| steps | samples |' in open(os.path.join(out,
                                                   'sampling_curve.md')).read()


def test_pipeline_throughput_bench(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  result = subprocess.run(
      [sys.executable, 'bench/pipeline_throughput.py',
       '--config=tests/tiny_config.py', '--steps=3', '--loaders=tf,numpy',
       f'--out={tmp_path}'], cwd=ROOT, env=env, capture_output=True,
      text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.load(open(tmp_path / 'pipeline_throughput.json'))['rows']
  assert [(r['loader'], r['masks']) for r in rows] == [
      ('tf', False), ('tf', True), ('numpy', False), ('numpy', True)]
  assert all(r['images_per_sec'] > 0 for r in rows)
