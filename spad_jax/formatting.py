"""Numbers and durations as the logs and reports print them."""

from typing import Any, Dict, Optional


def number(x: Optional[float], digits: int = 3, scale: float = 1.0,
           missing: str = 'n/a') -> str:
  """``scale·x`` with ``digits`` decimals, ``missing`` for None."""
  return missing if x is None else f'{scale * x:.{digits}f}'


def percent(x: Optional[float], digits: int = 2) -> str:
  """A fraction as a percentage, e.g. ``0.8123 -> '81.23%'``."""
  return 'n/a' if x is None else f'{100 * x:.{digits}f}%'


def mean_std(desc: Optional[Dict[str, Any]], digits: int = 3,
             scale: float = 1.0, missing: str = '—') -> str:
  """``'m ± s'`` of a ``{'mean', 'std'}`` dict (``'m'`` when std is None)."""
  if not desc or desc.get('mean') is None:
    return missing
  text = number(desc['mean'], digits, scale, missing)
  if desc.get('std') is None:
    return text
  return f'{text} ± {number(desc["std"], digits, scale, missing)}'


def hms(seconds: Optional[float]) -> str:
  """``H:MM:SS``; ``'unknown'`` for None."""
  if seconds is None:
    return 'unknown'
  seconds = int(round(max(seconds, 0)))
  return f'{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'
