"""The run log, train_log.jsonl."""

import json
import os
import shutil

import pytest

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
