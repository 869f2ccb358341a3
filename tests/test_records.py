"""The run log, train_log.jsonl."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from spad_jax import records


def test_log_lines_reach_a_file_replaced_during_the_run(tmp_path):
  path = str(tmp_path / 'train_log.jsonl')
  writer = records.JsonlWriter(path)
  writer.write_scalars(1, {'loss': 2.0})
  # What `git stash` / `git checkout` of a committed log does: a new file
  # under the same name.
  shutil.copy(path, path + '.new')
  os.replace(path + '.new', path)
  writer.write_scalars(2, {'loss': 1.5})
  writer.flush()
  writer.close()
  with open(path) as f:
    rows = [json.loads(line) for line in f]
  assert [(r['step'], r['loss']) for r in rows] == [(1, 2.0), (2, 1.5)]


def test_a_log_in_a_missing_folder_fails_at_once(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope'):
    records.JsonlWriter(str(tmp_path / 'nope' / 'train_log.jsonl'))


def test_the_writer_reaches_the_jsonl_and_tensorboard(tmp_path):
  writer = records.create_writer(str(tmp_path))
  writer.write_scalars(3, {'loss': 0.25})
  writer.write_images(3, {'grid': np.zeros((1, 4, 4, 3), np.float32)})
  writer.close()
  with open(tmp_path / 'train_log.jsonl') as f:
    rows = [json.loads(line) for line in f]
  assert [(r['step'], r['loss']) for r in rows] == [(3, 0.25)]
  # Read back with TensorBoard's own reader, not through clu.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path / 'tb'))
  events.Reload()
  assert 'grid' in events.Tags()['tensors'] + events.Tags()['images']
  (loss,) = events.Tensors('loss')
  assert loss.step == 3
  assert float(tensor_util.make_ndarray(loss.tensor_proto)) == pytest.approx(
      0.25)


def test_other_processes_write_nothing(tmp_path):
  writer = records.create_writer(str(tmp_path), enabled=False)
  writer.write_scalars(1, {'loss': 1.0})
  writer.close()
  assert not os.listdir(tmp_path)


def test_entry_points_import_without_tensorflow():
  # TensorFlow costs ~4 s per process; predict and evaluate never need it,
  # training imports it when it makes its writer or its tf.data loader.
  code = ('import sys, main, spad_jax.predict, spad_jax.evaluate, '
          'spad_jax.robustness, experiments.ablation.plan, '
          'experiments.ablation.report; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in '
          '("tensorflow", "tensorflow_datasets")))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                       capture_output=True, text=True, timeout=300)
  assert out.stdout.strip() == '[]', out.stdout[-2000:]
