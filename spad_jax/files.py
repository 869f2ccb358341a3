"""Atomic file writes: a reader (or a killed run) never sees a half-written
file, because each write goes to a temporary file renamed into place. Also
the parsing of the ``NAME=PATH`` run specs that comparison commands take."""

import json
import os
from typing import Any, Dict, Iterable, Union

import numpy as np


def write_atomic(path: str, data: Union[bytes, str]) -> None:
  """Writes ``data`` (bytes, or text as UTF-8) to ``path`` atomically."""
  tmp = path + '.tmp'
  with open(tmp, 'wb') as f:
    f.write(data.encode('utf-8') if isinstance(data, str) else data)
  os.replace(tmp, path)


def to_json_value(obj: Any) -> Any:
  """numpy scalars/arrays to Python, non-finite floats to None (strict JSON)."""
  if isinstance(obj, dict):
    return {str(k): to_json_value(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_json_value(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return to_json_value(obj.tolist())
  if isinstance(obj, np.generic):
    obj = obj.item()
  if isinstance(obj, float) and not np.isfinite(obj):
    return None
  return obj


def write_json(path: str, obj: Any, keep_previous: bool = False) -> None:
  """Writes ``obj`` as indented strict JSON (NaN/inf as null), atomically.

  ``keep_previous`` keeps an existing file as ``<name>.prev.json``.
  """
  text = json.dumps(to_json_value(obj), indent=1, allow_nan=False) + '\n'
  if keep_previous and os.path.exists(path):
    tmp = path + '.tmp'
    write_atomic(tmp + '.json', text)
    os.replace(path, path[:-len('.json')] + '.prev.json')
    os.replace(tmp + '.json', path)
    return
  write_atomic(path, text)


def write_npy(path: str, array: np.ndarray) -> None:
  """``np.save`` atomically (``path`` ends in ``.npy``)."""
  tmp = path + '.tmp.npy'
  np.save(tmp, array)
  os.replace(tmp, path)


def named_paths(specs: Iterable[str], flag: str = '--run') -> Dict[str, str]:
  """``NAME=PATH`` specs to an ordered ``{name: path}``.

  Raises ValueError naming the spec when a part is empty or a name repeats,
  so a command can report the flag value the user typed.
  """
  named = {}
  for spec in specs:
    name, sep, path = spec.partition('=')
    if not sep or not name or not path:
      raise ValueError(f'{flag}={spec!r}: expected NAME=PATH')
    if name in named:
      raise ValueError(f'{flag}: the name {name!r} is given twice')
    named[name] = path
  return named
