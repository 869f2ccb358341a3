"""main.py on folder data: the real Duke DME set end to end, and bad input."""

import json
import math
import os

import pytest

from spad_jax import config_validation
from spad_jax.data import folder
from spad_jax.data import sources
from test_data import SHARED
from test_data import folder_config
from test_data import make_folder

DUKE = '--config=tests/duke_small_config.py'


@pytest.mark.long
@pytest.mark.skipif(not os.path.isdir(SHARED),
                    reason=f'Duke DME data not found at {SHARED}')
def test_duke_dme_trains_and_evaluates(main_runner, tmp_path):
  """Real OCT data at 64², 27 steps: about 1.5 minutes on 2 CPU cores."""
  workdir = tmp_path / 'duke'
  result = main_runner([DUKE, f'--workdir={workdir}'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'Training on 77 cases' in result.stderr  # 7 of 10 patients.
  with open(workdir / 'train_log.jsonl') as f:
    losses = [json.loads(line)['loss'] for line in f]
  assert len(losses) == 9 and all(math.isfinite(x) for x in losses)
  metrics = json.loads((workdir / 'metrics.json').read_text())
  assert metrics['num_cases'] == 22 and metrics['split'] == 'test'
  assert set(metrics['per_class']) == {'background', 'fluid'}
  assert 0.0 <= metrics['mDice'] <= 1.0 and 0.0 <= metrics['mIoU'] <= 1.0
  assert metrics['checkpoint_step'] == 27


def test_bad_test_case_stops_before_training(main_runner, tmp_path):
  root = make_folder(tmp_path)
  config = folder_config(root)
  case = folder.split_cases(folder.read_metadata(str(root)),
                            *sources.split_params(config.data))['test'][0]
  label = root / 'labels' / f'{case["id"]}.png'
  label.write_bytes(label.read_bytes()[:40])  # Truncated: corrupt.
  # In-process: the check main.py can run before it creates the workdir.
  with pytest.raises(config_validation.ConfigError,
                     match=f'invalid data set: {label}: unreadable'):
    config_validation.validate_data(config)
  workdir = tmp_path / 'run'
  result = main_runner(['--config=tests/tiny_config.py',
                        f'--workdir={workdir}', '--config.data.name=folder',
                        f'--config.data.root={root}',
                        '--config.data.num_classes=2',
                        '--config.train.batch_size=2',
                        '--config.train.eval_every_epochs=0'])
  assert result.returncode != 0
  assert f'{label}: unreadable or corrupt image' in result.stderr
  assert result.returncode == 2  # Stopped in validation, before JAX.
  assert not workdir.exists()  # Nothing written, not even the workdir.
