"""The paired statistics of bench/sampling_curve.py, shared with
bench/pool_folds.py: dataset-level Dice from per-case confusion counts,
paired bootstraps over cases or over groups of cases (patients), and their
Markdown tables, and the pooling of per-fold bench outputs. No flags, so
other benches and the tests can import it."""

import json
import os

import numpy as np


# A row's per-case arrays (for the paired bootstraps): kept out of the JSON,
# written to CASES_FILE as ``row<i>_<array>`` for each array of ARRAYS.
CASES = '_cases'
CURVE, CASES_FILE = 'sampling_curve.json', 'sampling_cases.npz'
ARRAYS = ('chain_conf', 'pred_conf', 'mean_conf', 'medoid_conf', 'top')


def mdice(conf: np.ndarray, names) -> float:
  """Dataset-level foreground mDice of confusion counts ``[K, K]``; NaN
  where no foreground class is in the labels or predictions."""
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  value = metrics.summarize_confusion(conf, names)['mDice']
  return np.nan if value is None else value


def soft_confusion(prob: np.ndarray, label: np.ndarray) -> np.ndarray:
  """``[K, K]`` (rows label, columns class) expected confusion counts of a
  label map drawn pixel by pixel from ``prob`` ``[..., K]``: Σ over the
  pixels of label l of their probability of class c."""
  prob = np.asarray(prob, np.float64)
  k = prob.shape[-1]
  return np.eye(k)[np.asarray(label).reshape(-1)].T @ prob.reshape(-1, k)


def chain_mdices(chain_conf: np.ndarray, names) -> list:
  """Each chain's dataset-level mDice from its confusion counts
  (``[N, K, K]``)."""
  return [mdice(c, names) for c in chain_conf]


def chain_mdice(chain_conf: np.ndarray, names) -> float:
  """Mean over chains of each chain's dataset-level mDice."""
  return float(np.mean(chain_mdices(chain_conf, names)))


# Ways to label one chain by pooling the p̂ of its steps (the diagnosis of
# bench/sampling_curve.py): each maps the step times ``t_0 > … > t_{S-1}``
# the steps saw and ``ᾱ`` to non-negative weights over the steps. 'first':
# the first step's p̂ (the one-step prediction); 'last': the final p̂
# (eval.chain_label=last); 'mean': all steps alike (eval.chain_label=
# chain_mean); 'first_half': the steps before S//2 (the first alone for one
# step), which saw little of the chain's own draws; 'last_half': the steps
# from S//2 on; 'alpha_bar': each step by ᾱ_t of its input, the share of it
# that is signal rather than noise, so the steps that saw nearly pure noise
# count little.
POOLINGS = ('first', 'last', 'mean', 'first_half', 'last_half', 'alpha_bar')


def pooling_weights(step_times, alphas_cumprod) -> dict:
  """``{pooling: weights [S]}`` for the steps whose inputs had times
  ``step_times`` (``[S]``), under the schedule's ``alphas_cumprod``."""
  step_times = np.asarray(step_times)
  s = len(step_times)
  index = np.arange(s)
  return {'first': (index == 0).astype(np.float64),
          'last': (index == s - 1).astype(np.float64),
          'mean': np.ones(s),
          'first_half': ((index < s // 2) | (index == 0)).astype(np.float64),
          'last_half': (index >= s // 2).astype(np.float64),
          'alpha_bar': np.asarray(alphas_cumprod, np.float64)[step_times]}


def pooled_soft_map(step_probs: np.ndarray, weights: np.ndarray
                    ) -> np.ndarray:
  """The ``weights``-weighted mean over steps of ``step_probs``
  ``[S, ..., K]``: a chain's soft map pooled from its steps."""
  weights = np.asarray(weights, np.float64)
  if not np.sum(weights) > 0:
    raise ValueError(f'pooling weights sum to {np.sum(weights)}; they must '
                     'give some step a positive weight')
  return np.tensordot(weights / np.sum(weights),
                      np.asarray(step_probs, np.float64), axes=(0, 0))


def case_units(num_cases: int, groups=None) -> list:
  """The resampling units of the paired bootstraps: one per case, or with
  ``groups`` (one label per case, e.g. its patient) one per group, holding
  the indices of its cases."""
  if groups is None:
    return [np.array([i]) for i in range(num_cases)]
  if len(groups) != num_cases:
    raise ValueError(f'{len(groups)} group labels for {num_cases} cases')
  order = list(dict.fromkeys(groups))
  return [np.flatnonzero(np.asarray(groups) == g) for g in order]


def paired_bootstrap(diffs, units, resamples: int, seed: int):
  """``diffs(case indices)`` on all cases and its 95 % interval over
  ``resamples`` resamples of the ``units`` (``case_units``) with
  replacement; every figure sees the same resampled cases."""
  rng = np.random.default_rng(seed)
  boot = np.array([
      diffs(np.concatenate([units[u] for u in
                            rng.integers(0, len(units), len(units))]))
      for _ in range(resamples)])
  # A resample without foreground has no Dice: left out of the interval.
  lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
  return diffs(np.concatenate(units)), lo, hi


def paired_record(diffs, figures, num_cases: int, groups, resamples: int,
                  seed: int) -> dict:
  """``paired_bootstrap`` of ``diffs`` over cases (or ``groups``) as a
  record: each of ``figures`` (the names of ``diffs``'s outputs, in order)
  with its ``<figure>_ci95``, the resamples and the unit."""
  point, lo, hi = paired_bootstrap(diffs, case_units(num_cases, groups),
                                   resamples, seed)
  record = {}
  for i, name in enumerate(figures):
    record[name], record[name + '_ci95'] = point[i], [lo[i], hi[i]]
  record.update(resamples=resamples,
                unit='case' if groups is None else 'group')
  return record


def _with_one_step(rows):
  """Each multi-step row with per-case arrays, paired with the 1-step row of
  the same sampler and ensemble size, where there is one."""
  one = {(r['name'], r['num_samples']): r for r in rows
         if r.get(CASES) is not None and r['num_steps'] == 1}
  for r in rows:
    ref = one.get((r['name'], r['num_samples']))
    if r.get(CASES) is not None and r['num_steps'] != 1 and ref is not None:
      yield r, ref


def _ece_difference(a, b, idx, num_bins: int) -> float:
  """ECE of the cases ``idx`` of per-case arrays ``a`` minus that of ``b``."""
  from spad_jax import calibration  # pylint: disable=g-import-not-at-top
  return (calibration.reliability(a['top'][idx].sum(0), num_bins)['ece'] -
          calibration.reliability(b['top'][idx].sum(0), num_bins)['ece'])


def paired_vs_one_step(rows, class_names, num_bins: int, resamples=1000,
                       seed=0, groups=None, key='vs_one_step') -> None:
  """Adds ``key`` to every multi-step row that has a 1-step row of the same
  sampler and ensemble size: the differences of the single-chain mDice, of
  the row's ensemble prediction's mDice against one step's single chains
  (what N chains add over one sample of one step), and of the ECE, each
  with a 95 % interval from a paired bootstrap over cases, or over
  ``groups`` of cases (``case_units``); both rows see the same resampled
  cases."""
  for r, ref in _with_one_step(rows):
    a, b = r[CASES], ref[CASES]

    def diffs(idx):
      one_step = chain_mdice(b['chain_conf'][idx].sum(0), class_names)
      d_dice = chain_mdice(a['chain_conf'][idx].sum(0), class_names) - one_step
      d_ensemble = mdice(a['pred_conf'][idx].sum(0), class_names) - one_step
      return d_dice, d_ensemble, _ece_difference(a, b, idx, num_bins)

    r[key] = paired_record(diffs, ('chain_mDice', 'ensemble_mDice', 'ece'),
                           len(a['top']), groups, resamples, seed)


def stratified_bootstrap(stat, strata, resamples: int, seed: int):
  """``stat(index arrays, one per stratum)`` on all cases and its 95 %
  interval over ``resamples`` resamples that draw each stratum's cases
  (``strata``: index arrays) with replacement from that stratum alone."""
  rng = np.random.default_rng(seed)
  boot = np.array([stat([s[rng.integers(0, len(s), len(s))] for s in strata])
                   for _ in range(resamples)])
  lo, hi = np.nanpercentile(boot, [2.5, 97.5], axis=0)
  return np.asarray(stat(strata)), lo, hi


def fold_mean_ece_vs_one_step(rows, num_bins: int, resamples=1000, seed=0,
                              key='vs_one_step_fold_mean') -> None:
  """Adds ``key`` to every pooled multi-step row (with ``FOLDS``, its folds'
  case indices) that has a 1-step row of the same sampler and ensemble
  size: each fold's ECE minus its one step's, their mean over folds, and
  that mean's 95 % interval from a bootstrap resampling cases within each
  fold. ECE is a property of one model: pooling the histograms of several
  (``paired_vs_one_step`` on pooled rows) lets their miscalibrations in
  opposite directions cancel, so this is the per-model reading beside it."""
  for r, ref in _with_one_step(rows):
    a, b = r[CASES], ref[CASES]

    def per_fold(strata):
      return [_ece_difference(a, b, idx, num_bins) for idx in strata]

    point, lo, hi = stratified_bootstrap(
        lambda strata: (float(np.mean(per_fold(strata))),), r[FOLDS],
        resamples, seed)
    r[key] = {'ece': float(point[0]), 'ece_ci95': [lo[0], hi[0]],
              'per_fold': [float(d) for d in per_fold(r[FOLDS])],
              'resamples': resamples, 'unit': 'case within fold'}


def paired_vs_single(rows, class_names, resamples=1000, seed=0, groups=None,
                     key='vs_single') -> None:
  """Adds ``key`` to every ensemble row: its prediction's mDice (the row's
  own rule), its mean p̂'s argmax mDice and its medoid chain's mDice, each
  minus the mean of its chains' single-chain mDice, with 95 % intervals
  from a paired bootstrap over cases, or over ``groups`` of cases (the same
  chains and cases on both sides)."""
  for r in rows:
    if r.get(CASES) is None or r['num_samples'] < 2:
      continue
    c = r[CASES]

    def diffs(idx):
      single = chain_mdice(c['chain_conf'][idx].sum(0), class_names)
      return tuple(mdice(c[conf][idx].sum(0), class_names) - single
                   for conf in ('pred_conf', 'mean_conf', 'medoid_conf'))

    r[key] = paired_record(diffs, ('ensemble', 'mean_prob', 'medoid'),
                           len(c['top']), groups, resamples, seed)


def fmt(value, digits=4):
  return '—' if value is None else f'{value:.{digits}f}'


def paired_table(rows, key: str, caption: str, columns: dict) -> list:
  """Markdown lines of the rows that have ``key``: each figure ``f`` of
  ``columns`` (figure -> header) as ``r[key][f]`` with ``f + '_ci95'``."""
  picked = [r for r in rows if key in r]
  if not picked:
    return []
  lines = ['', caption, '',
           '| sampler | steps | samples | ' + ' | '.join(columns.values()) +
           ' |', '|---|---:|---:|' + '---:|' * len(columns)]
  for r in picked:
    v = r[key]
    cells = [f'{v[f]:+.4f} [{v[f + "_ci95"][0]:+.4f}, '
             f'{v[f + "_ci95"][1]:+.4f}]' for f in columns]
    lines.append(f'| {r["name"]} | {r["num_steps"]} | {r["num_samples"]} | ' +
                 ' | '.join(cells) + ' |')
  return lines


# Pooling over cross-validation folds (bench/pool_folds.py).
# A pooled row's case indices per fold (kept out of the JSON, as CASES).
FOLDS = '_folds'


class PoolError(ValueError):
  """A fold's outputs are missing or do not fit the others'."""


def load_run(folder: str) -> dict:
  """One fold's bench outputs: meta, rows, and each row's per-case arrays
  under ``CASES``."""
  paths = [os.path.join(folder, name) for name in (CURVE, CASES_FILE)]
  for path in paths:
    if not os.path.isfile(path):
      raise PoolError(f'{path}: missing (run bench/sampling_curve.py with '
                      f'--out={folder} first)')
  with open(paths[0]) as f:
    data = json.load(f)
  meta = data['meta']
  if 'case_ids' not in meta:
    raise PoolError(f'{paths[0]}: written before the bench saved case ids; '
                    'rerun bench/sampling_curve.py')
  with np.load(paths[1]) as arrays:
    for i, row in enumerate(data['rows']):
      if 'skipped' in row:
        continue
      try:
        row[CASES] = {a: arrays[f'row{i}_{a}'] for a in ARRAYS}
      except KeyError as e:
        raise PoolError(f'{paths[1]}: no {e.args[0]} for row {i} of '
                        f'{paths[0]}') from None
      if len(row[CASES]['top']) != len(meta['case_ids']):
        raise PoolError(f'{paths[1]}: row {i} has '
                        f'{len(row[CASES]["top"])} cases, {paths[0]} '
                        f'lists {len(meta["case_ids"])}')
  return {'folder': folder, 'meta': meta, 'rows': data['rows']}


def keep_label(run: dict, label: str) -> dict:
  """``run`` (``load_run``) with only the rows whose chains are labelled
  ``label`` (its model's ``eval.chain_label='auto'`` pick), renamed so that
  folds with different picks pool as one setting: the name without its
  label and ensemble parts, then `` of:last`` where the ensemble combines
  the chains' samples (as any ensemble of ``last``-labelled chains does),
  then `` label:picked``."""
  rows = []
  for row in run['rows']:
    if row.get('chain_label', 'last') != label:
      continue
    of_samples = (label == 'last' or
                  row.get('ensemble_of', 'chain_label') == 'last')
    base = ' '.join(t for t in row['name'].split(' ')
                    if not t.startswith(('label:', 'of:')))
    rows.append(dict(row, name=base + (' of:last' if of_samples else '') +
                     ' label:picked'))
  if not rows:
    raise PoolError(f'{run["folder"]}: no row has chain_label {label!r}')
  return dict(run, rows=rows)


def _setting(row) -> tuple:
  return row['name'], row['num_steps'], row['num_samples']


def pool(runs, resamples: int = 1000) -> dict:
  """Pooled rows over the folds ``runs`` (``load_run`` outputs)."""
  from spad_jax import calibration  # pylint: disable=g-import-not-at-top
  first = runs[0]['meta']
  seen = {}
  for run in runs:
    meta = run['meta']
    for key in ('class_names', 'ece_bins'):
      if meta[key] != first[key]:
        raise PoolError(f'{run["folder"]}: {key} = {meta[key]!r}, but '
                        f'{runs[0]["folder"]} has {first[key]!r}')
    for case in meta['case_ids']:
      if case in seen:
        raise PoolError(f'case {case!r} is in both {seen[case]} and '
                        f'{run["folder"]}: folds must not share test cases')
      seen[case] = run['folder']
  names, bins = first['class_names'], first['ece_bins']
  scored = [{_setting(r): r for r in run['rows'] if CASES in r}
            for run in runs]
  common = [s for s in scored[0] if all(s in other for other in scored[1:])]
  left_out = sorted({s for sc in scored for s in sc} - set(common))
  groups = [g for run in runs for g in run['meta']['case_groups']]
  bounds = np.cumsum([0] + [len(run['meta']['case_ids']) for run in runs])
  folds = [np.arange(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]
  rows = []
  for setting in common:
    parts = [sc[setting] for sc in scored]
    cases = {a: np.concatenate([p[CASES][a] for p in parts])
             for a in ARRAYS}
    chains = chain_mdices(cases['chain_conf'].sum(0), names)
    row = {'name': setting[0], 'num_steps': setting[1],
           'num_samples': setting[2],
           'mDice': mdice(cases['pred_conf'].sum(0), names),
           'mDice_mean_prob': mdice(cases['mean_conf'].sum(0), names),
           'mDice_medoid': mdice(cases['medoid_conf'].sum(0), names),
           'chain_mDice': float(np.mean(chains)),
           'chain_mDice_sd': (float(np.std(chains, ddof=1))
                              if len(chains) > 1 else None),
           'ece': calibration.reliability(cases['top'].sum(0), bins)['ece'],
           'folds': [{'folder': run['folder'],
                      'checkpoint_step': run['meta']['checkpoint_step'],
                      **{k: p.get(k) for k in (
                          'mDice', 'mDice_medoid', 'chain_mDice', 'ece',
                          'vs_one_step', 'vs_single')}}
                     for run, p in zip(runs, parts)],
           CASES: cases, FOLDS: folds}
    rows.append(row)
  for unit, grouping in (('case', None), ('patient', groups)):
    paired_vs_one_step(rows, names, bins, resamples, groups=grouping,
                       key=f'vs_one_step_{unit}')
    paired_vs_single(rows, names, resamples, groups=grouping,
                     key=f'vs_single_{unit}')
  fold_mean_ece_vs_one_step(rows, bins, resamples)
  for row in rows:
    row.pop(CASES)
    row.pop(FOLDS)
  return {'meta': {'folds': [r['folder'] for r in runs],
                   'num_cases': len(groups),
                   'num_patients': len(set(groups)),
                   'class_names': names, 'ece_bins': bins,
                   'resamples': resamples,
                   'left_out': [list(s) for s in left_out]},
          'rows': rows}


def pooled_markdown(result: dict) -> str:
  meta, rows = result['meta'], result['rows']
  lines = [f'{len(meta["folds"])} folds pooled: {meta["num_cases"]} cases '
           f'in {meta["num_patients"]} groups (patients, where the data set '
           'names them), each scored by the model of the fold that tested '
           'it.', '',
           '| sampler | steps | samples | single chains | ensemble | mean p̂ '
           '| medoid | ECE |', '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    chains = fmt(r['chain_mDice']) + (
        '' if r['chain_mDice_sd'] is None else f' ± {r["chain_mDice_sd"]:.4f}')
    lines.append(f'| {r["name"]} | {r["num_steps"]} | {r["num_samples"]} | '
                 f'{chains} | {fmt(r["mDice"])} | '
                 f'{fmt(r["mDice_mean_prob"])} | '
                 f'{fmt(r["mDice_medoid"])} | {fmt(r["ece"])} |')
  for unit in ('case', 'patient'):
    lines += paired_table(
        rows, f'vs_one_step_{unit}',
        'Against one step, pooled, with 95 % intervals from a paired '
        f'bootstrap over {unit}s.',
        {'chain_mDice': 'single chains − 1 step',
         'ensemble_mDice': 'ensemble − 1 step single', 'ece': 'ECE − 1 step'})
    lines += paired_table(
        rows, f'vs_single_{unit}',
        'Ensembles against their own single chains, pooled, with 95 % '
        f'intervals from a paired bootstrap over {unit}s.',
        {'ensemble': 'ensemble − single', 'mean_prob': 'mean p̂ − single',
         'medoid': 'medoid − single'})
  lines += paired_table(
      rows, 'vs_one_step_fold_mean',
      'ECE per model: the mean over folds of each fold\'s ECE minus its one '
      'step\'s, with a 95 % interval from a bootstrap of cases within each '
      'fold (pooled histograms let the folds\' miscalibrations cancel).',
      {'ece': 'mean over folds of ECE − 1 step'})
  for r in rows:
    if 'vs_one_step_fold_mean' in r:
      lines.append(f'\n{r["name"]}, {r["num_steps"]} steps, '
                   f'{r["num_samples"]} samples, ECE − 1 step per fold: ' +
                   ', '.join(f'{d:+.4f}' for d in
                             r['vs_one_step_fold_mean']['per_fold']))
  lines += ['', 'Per fold (each over its own test cases; intervals over '
            'cases):', '',
            '| sampler | steps | samples | fold | single chains | ensemble | '
            'single − 1 step |', '|---|---:|---:|---|---:|---:|---:|']
  for r in rows:
    for f in r['folds']:
      v = f.get('vs_one_step')
      gain = '—' if not v else (
          f'{v["chain_mDice"]:+.4f} [{v["chain_mDice_ci95"][0]:+.4f}, '
          f'{v["chain_mDice_ci95"][1]:+.4f}]')
      lines.append(f'| {r["name"]} | {r["num_steps"]} | {r["num_samples"]} '
                   f'| {f["folder"]} | {fmt(f["chain_mDice"])} | '
                   f'{fmt(f["mDice"])} | {gain} |')
  if meta['left_out']:
    lines += ['', 'Settings not run by every fold (left out): ' + '; '.join(
        f'{n} × {s} steps × {k} samples' for n, s, k in meta['left_out'])]
  return '\n'.join(lines) + '\n'
