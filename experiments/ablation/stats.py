"""The study's statistics: per-seed values, summaries over seeds, paired
differences to the baseline, the sweeps' rows."""

from typing import Any, Dict, Sequence

import numpy as np

from experiments.ablation import patients
from experiments.ablation import plan

METRICS = ('mIoU', 'mDice', 'HD95')


def seed_values(records: Sequence[Dict], metric: str) -> Dict[int, float]:
  """Per seed: the metric (mean over folds); seeds missing a value in any
  fold are left out, so that a half-finished seed is not compared with a
  finished one over other patients."""
  by_seed, incomplete = {}, set()
  for r in records:
    if r.get('done') and r.get(metric) is not None:
      by_seed.setdefault(r['seed'], []).append(r[metric])
    else:
      incomplete.add(r['seed'])
  return {s: float(np.mean(v)) for s, v in sorted(by_seed.items())
          if s not in incomplete}


def describe(values: Sequence[float]) -> Dict[str, Any]:
  v = np.asarray(list(values), np.float64)
  return {'n': int(len(v)), 'mean': float(v.mean()) if len(v) else None,
          'std': float(v.std(ddof=1)) if len(v) > 1 else None,
          'min': float(v.min()) if len(v) else None,
          'max': float(v.max()) if len(v) else None,
          'values': [float(x) for x in v]}


def paired_difference(arm: Dict[int, float], base: Dict[int, float],
                      confidence: float = 0.95) -> Dict[str, Any]:
  """Paired per-seed differences ``arm − baseline`` over common seeds: mean,
  sample std and the Student-t interval ``mean ± t·sd/√n`` (n − 1 degrees of
  freedom). A simple reading aid: seeds are few and the test set is one
  fixed set of patients, so it says nothing about other patients."""
  seeds = sorted(set(arm) & set(base))
  d = np.asarray([arm[s] - base[s] for s in seeds], np.float64)
  out = {'seeds': seeds, 'diffs': [float(x) for x in d], 'n': int(len(d)),
         'mean': float(d.mean()) if len(d) else None, 'sd': None,
         'ci_low': None, 'ci_high': None, 'confidence': confidence}
  if len(d) > 1:
    sd = float(d.std(ddof=1))
    half = patients.t_half_width(d, confidence)
    out.update({'sd': sd, 'ci_low': out['mean'] - half,
                'ci_high': out['mean'] + half})
  return out


def summarize(records: Sequence[Dict], arms: Sequence[str]) -> Dict[str, Any]:
  """Per arm: label, overrides, paper numbers, metric summaries over seeds,
  and the paired differences to the baseline."""
  out = {}
  for arm in arms:
    label, overrides, paper = plan.ARMS[arm]
    mine = [r for r in records if r['group'] == 'arm' and r['name'] == arm]
    entry = {'label': label, 'overrides': overrides,
             'paper_amdsd': ({'mIoU': paper[0], 'mDice': paper[1]} if paper
                             else None),
             'runs_done': sum(r['done'] for r in mine), 'runs': len(mine)}
    for metric in METRICS + ('missed', 'spurious'):
      entry[metric] = describe(seed_values(mine, metric).values())
    seconds = [r['seconds'] for r in mine if r.get('seconds')]
    entry['seconds'] = describe(seconds)
    out[arm] = entry
  if 'baseline' in arms:
    base = [r for r in records if r['group'] == 'arm' and
            r['name'] == 'baseline']
    for arm in arms:
      if arm == 'baseline':
        continue
      mine = [r for r in records if r['group'] == 'arm' and r['name'] == arm]
      out[arm]['vs_baseline'] = {
          metric: paired_difference(seed_values(mine, metric),
                                    seed_values(base, metric))
          for metric in METRICS}
  return out


def summarize_sweeps(records: Sequence[Dict], sweeps: Sequence[str],
                     values: Dict[str, Sequence[float]]) -> Dict[str, Any]:
  out = {}
  for sweep in sweeps:
    key, label = plan.SWEEPS[sweep]
    rows = []
    for value in values[sweep]:
      mine = [r for r in records if r['group'] == f'sweep_{sweep}' and
              r['name'] == plan.value_label(value)]
      row = {'value': float(value)}
      for metric in METRICS:
        row[metric] = describe(seed_values(mine, metric).values())
      row['reused'] = sorted({r['same_as'] for r in mine if r['same_as']})
      rows.append(row)
    out[sweep] = {'key': key, 'label': label, 'rows': rows}
  return out
