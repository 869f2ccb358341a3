"""Atomic JSON writes and the NAME=PATH run specs of comparison commands."""

import json
import math

import numpy as np
import pytest

from spad_jax import files


def test_named_paths_keep_order_and_split_at_the_first_equals():
  named = files.named_paths(['b=runs/x', 'a=runs/y=z', 'c=/abs/p'])
  assert list(named.items()) == [('b', 'runs/x'), ('a', 'runs/y=z'),
                                 ('c', '/abs/p')]
  assert files.named_paths([]) == {}


@pytest.mark.parametrize('spec', ['runs/x', '=runs/x', 'name=', '='])
def test_named_paths_name_the_malformed_spec(spec):
  with pytest.raises(ValueError, match=f"--out={spec!r}: expected NAME=PATH"):
    files.named_paths(['ok=p', spec], flag='--out')


def test_named_paths_refuse_a_repeated_name():
  with pytest.raises(ValueError, match="the name 'a' is given twice"):
    files.named_paths(['a=p', 'b=q', 'a=r'])


def test_write_json_is_strict_and_keeps_the_previous_file(tmp_path):
  path = str(tmp_path / 'm.json')
  files.write_json(path, {'x': np.float32(0.5), 'nan': math.nan,
                          'a': np.arange(3), 1: [np.inf]})
  with open(path) as f:
    text = f.read()
  # json.loads would accept NaN; the strict parser below does not.
  first = json.loads(text, parse_constant=lambda c: pytest.fail(c))
  assert first == {'x': 0.5, 'nan': None, 'a': [0, 1, 2], '1': [None]}
  files.write_json(path, {'x': 2}, keep_previous=True)
  with open(path) as f:
    assert json.load(f) == {'x': 2}
  with open(tmp_path / 'm.prev.json') as f:
    assert json.load(f) == first
  assert sorted(p.name for p in tmp_path.iterdir()) == ['m.json',
                                                        'm.prev.json']
