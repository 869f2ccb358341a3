"""Dotted config keys (``'train.batch_size'``) on ConfigDicts and their JSON."""

from typing import Any, Dict, List


def get(config, dotted: str) -> Any:
  """``config['a']['b']`` for ``'a.b'``; KeyError names the whole key."""
  value = config
  for part in dotted.split('.'):
    try:
      value = value[part]
    except (KeyError, AttributeError, TypeError) as e:
      raise KeyError(f'config has no key {dotted!r}') from e
  return value


def set_value(config, dotted: str, value: Any) -> None:
  """Sets an existing key ``'a.b'``; KeyError for a key the config lacks
  (a typo would otherwise add a key nothing reads)."""
  *parents, last = dotted.split('.')
  node = get(config, '.'.join(parents)) if parents else config
  if last not in node:
    raise KeyError(f'config has no key {dotted!r}')
  node[last] = value


def flat_diff(a: Dict, b: Dict, prefix: str = '',
              one_sided: bool = True) -> List[str]:
  """Dotted keys whose values differ between two nested dicts.

  ``one_sided=False`` ignores keys present on one side only (a key added to
  the code's config since an old run was started).
  """
  if isinstance(a, dict) and isinstance(b, dict):
    keys = (set(a) | set(b)) if one_sided else (set(a) & set(b))
    out = []
    for k in sorted(keys):
      out += flat_diff(a.get(k), b.get(k), f'{prefix}{k}.', one_sided)
    return out
  return [prefix.rstrip('.')] if a != b else []
