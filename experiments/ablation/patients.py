"""Patient-level statistics of a cross-validated study.

Under k-fold cross-validation over patients each patient is tested once per
seed, by the run of the fold that did not train on it. Every run's
``per_case.csv`` holds each test case's pixels of every foreground class in
the label, the prediction and both, so Dice can be pooled over any set of
patients: ``2·Σboth / (Σlabel + Σprediction)`` per class, then the mean
over the classes that occur. On these counts:

- an arm's pooled mDice / mIoU: per seed over all patients, then the mean
  over seeds;
- paired differences of two arms with a bootstrap over patients (a patient,
  with all its seeds, is the resampled unit: the unit that generalises to
  new patients);
- variance components of fold-level values: between folds and between seeds
  within a fold;
- whether a run's train-split learning curve is on its plateau.
"""

import csv
import functools
import json
import os
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

COUNTS = ('label_px', 'pred_px', 'overlap_px')


def case_counts(workdir: str, class_names: Sequence[str]
                ) -> Dict[str, np.ndarray]:
  """Case id -> ``[K-1, 3]`` pixel counts (label, prediction, both) of the
  foreground classes from ``workdir/per_case.csv``; a class in neither map
  (no row) counts zeros. Raises ``ValueError`` naming the file when the
  counts are missing (a run evaluated before they were written)."""
  path = os.path.join(workdir, 'per_case.csv')
  fg = list(class_names[1:])
  out = {}
  with open(path, newline='') as f:
    reader = csv.DictReader(f)
    missing = [c for c in COUNTS if c not in (reader.fieldnames or ())]
    if missing:
      raise ValueError(f'{path} has no {", ".join(missing)} column(s): '
                       'evaluate the run again (main.py --mode=evaluate)')
    for row in reader:
      table = out.setdefault(row['case'], np.zeros((len(fg), 3), np.float64))
      if row['class'] not in fg:
        raise ValueError(f'{path}: class {row["class"]!r} is not one of '
                         f'{fg}')
      table[fg.index(row['class'])] = [float(row[c]) for c in COUNTS]
  return out


def patient_of(config) -> Callable[[str], str]:
  """Case id -> patient id: dataset.json's ``patient`` for folder data sets
  (the case itself where none is given), the case itself otherwise."""
  if config.data.name == 'synthetic':
    return lambda case: case
  from spad_jax.data import folder  # pylint: disable=g-import-not-at-top
  meta = folder.read_metadata(config.data.root)
  table = {c['id']: str(c.get('patient', c['id'])) for c in meta['cases']}
  return lambda case: table.get(case, case)


def test_patients(config, fold: Optional[int]) -> Optional[List[str]]:
  """The patients of ``fold``'s test split of a folder data set (all of
  them, also those without a per_case.csv row: no foreground in label or
  prediction); None for generated data, whose cases are read from the
  rows."""
  if config.data.name == 'synthetic':
    return None
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  config = config.copy_and_resolve_references()
  if fold is not None:
    config.data.fold = int(fold)
  _, splits = sources.folder_splits(config)
  return sorted({str(c.get('patient', c['id'])) for c in splits['test']})


def dice_iou(counts: np.ndarray):
  """mDice, mIoU over the last-but-one axis of ``[..., K-1, 3]`` summed
  counts: the mean over classes present in label or prediction (NaN where
  none is)."""
  label, pred, both = counts[..., 0], counts[..., 1], counts[..., 2]
  total = label + pred
  with np.errstate(invalid='ignore', divide='ignore'):
    dice = np.where(total > 0, 2 * both / total, np.nan)
    iou = np.where(total > 0, both / (total - both), np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)  # All-NaN slices.
    return np.nanmean(dice, axis=-1), np.nanmean(iou, axis=-1)


class ArmCounts:
  """One arm's test counts summed per (seed, patient): ``counts[S, P, K-1,
  3]``, ``done[S, P]`` (that seed's run of the patient's fold finished) and
  ``fold[P]``."""

  def __init__(self, seeds: Sequence[int], patients: Sequence[str],
               num_fg: int):
    self.seeds, self.patients = list(seeds), list(patients)
    self.counts = np.zeros((len(seeds), len(patients), num_fg, 3))
    self.done = np.zeros((len(seeds), len(patients)), bool)
    self.fold = np.full(len(patients), -1)


def gather(records: Sequence[Dict], arm: str, seeds: Sequence[int],
           patients: Sequence[str], class_names: Sequence[str],
           patient: Callable[[str], str],
           evaluations: Optional[Callable[[Dict], Optional[List[str]]]] = None,
           tested: Optional[Callable[[Dict], Optional[List[str]]]] = None
           ) -> ArmCounts:
  """The finished arm runs of ``records`` (``plan.collect_run``) as
  ``ArmCounts``. ``evaluations(record)``: the folders whose per_case.csv
  count for that run, summed (default: the run's test evaluation; None
  leaves the run out). ``tested(record)``: the patients the run tested
  (default, or None: those with a row)."""
  out = ArmCounts(seeds, patients, len(class_names) - 1)
  for r in records:
    if r['group'] != 'arm' or r['name'] != arm or not r['done'] or (
        r['seed'] not in out.seeds):
      continue
    folders = [r['workdir']] if evaluations is None else evaluations(r)
    if not folders:
      continue
    s = out.seeds.index(r['seed'])
    for p in (tested(r) if tested else None) or ():
      out.done[s, out.patients.index(p)] = True
      out.fold[out.patients.index(p)] = -1 if r['fold'] is None else r['fold']
    for folder in folders:
      for case, table in case_counts(folder, class_names).items():
        p = out.patients.index(patient(case))
        out.counts[s, p] += table
        out.done[s, p] = True
        out.fold[p] = -1 if r['fold'] is None else r['fold']
  return out


def robustness_json(workdir: str) -> Optional[Dict[str, Any]]:
  """A run's robustness.json (``--mode=robustness``), or None."""
  path = os.path.join(workdir, 'robustness.json')
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def corrupted_evaluations(record: Dict, name: Optional[str] = None
                          ) -> Optional[List[str]]:
  """A run's corrupted evaluations (every corruption and severity of its
  sweep, the record's ``swept``, or only corruption ``name``; the clean split
  left out); None when the run was not swept."""
  if record.get('swept') is None:
    return None
  return [os.path.join(record['workdir'], 'corruptions', f'{kind}_s{level}')
          for kind, level in record['swept']
          if kind != 'none' and name in (None, kind)]


def swept_corruptions(records: Sequence[Dict]) -> List[str]:
  """The corruptions any finished arm run was swept under, in the order of
  its robustness.json."""
  names = []
  for r in records:
    if r['group'] == 'arm' and r['done']:
      for kind, _ in r.get('swept') or ():
        if kind != 'none' and kind not in names:
          names.append(kind)
  return names


def patients_in(records: Sequence[Dict], class_names: Sequence[str],
                patient: Callable[[str], str]) -> List[str]:
  """Every patient tested by a finished arm run, sorted."""
  found = set()
  for r in records:
    if r['group'] == 'arm' and r['done']:
      found |= {patient(c) for c in case_counts(r['workdir'], class_names)}
  return sorted(found)


def _scores(counts: np.ndarray, use: np.ndarray, weights: np.ndarray):
  """Per resample (rows of ``weights[R, P]``, patient multiplicities): the
  mean over seeds of the pooled mDice and mIoU over the patients that seed
  has (``use[S, P]``); ``[R]`` each (NaN where no seed has a patient)."""
  w = weights[:, None, :] * use[None]  # [R, S, P]
  sums = np.einsum('rsp,spck->rsck', w, counts)
  dice, iou = dice_iou(sums)  # [R, S]
  has = w.sum(-1) > 0
  dice, iou = np.where(has, dice, np.nan), np.where(has, iou, np.nan)
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', RuntimeWarning)
    return np.nanmean(dice, axis=1), np.nanmean(iou, axis=1)


def _complete_seeds(done: np.ndarray) -> np.ndarray:
  """``[S]``: the seeds (rows of ``done[S, P]``) that have every patient any
  seed has; a seed under way would weigh its few patients as much as a
  whole seed."""
  return (done == done.any(0)).all(1) & done.any(1)


def pooled(arm: ArmCounts) -> Dict[str, Any]:
  """The arm's pooled mDice / mIoU: per seed over its tested patients, and
  their mean over the seeds that tested every patient any seed of the arm
  tested (a seed still under way would otherwise average other patients
  in)."""
  ones = np.ones((1, len(arm.patients)))
  per_seed = []
  for s in range(len(arm.seeds)):
    use = np.zeros_like(arm.done)
    use[s] = arm.done[s]
    d, i = _scores(arm.counts, use, ones)
    per_seed.append((float(d[0]), float(i[0]), int(arm.done[s].sum())))
  complete = _complete_seeds(arm.done)
  d, i = _scores(arm.counts, arm.done & complete[:, None], ones)
  return {'mDice': _num(d[0]), 'mIoU': _num(i[0]),
          'seeds_pooled': [s for s, c in zip(arm.seeds, complete) if c],
          'per_seed': {str(seed): {'mDice': _num(v[0]), 'mIoU': _num(v[1]),
                                   'patients': v[2]}
                       for seed, v in zip(arm.seeds, per_seed) if v[2]},
          'patients_done': int(arm.done.any(0).sum()),
          'runs_patients': int(arm.done.sum())}


def paired_bootstrap(a: ArmCounts, b: ArmCounts, resamples: int = 2000,
                     seed: int = 0, by_fold: bool = False) -> Dict[str, Any]:
  """``a − b`` of the pooled mDice and mIoU over the (seed, patient) pairs
  both arms have, with a 95 % percentile interval from resampling patients
  with replacement (each with all its seeds). A seed counts once both arms
  have it on every patient of those pairs (``_complete_seeds``).

  ``by_fold``: resample folds instead, each with all its patients and
  seeds. The patients a fold tests share its runs, so a run's luck moves
  them together; resampling them one by one treats them as independent."""
  use = a.done & b.done
  use &= _complete_seeds(use)[:, None]
  keep = np.flatnonzero(use.any(0))
  out = {'patients': [a.patients[p] for p in keep],
         'pairs': int(use.sum()), 'resamples': resamples,
         'unit': 'fold' if by_fold else 'patient'}
  if len(keep) == 0:
    return dict(out, mDice=None, mDice_ci95=None, mIoU=None, mIoU_ci95=None)
  use, ca, cb = use[:, keep], a.counts[:, keep], b.counts[:, keep]
  ones = np.ones((1, len(keep)))
  rng = np.random.default_rng(seed)
  # Each patient's unit (itself, or its fold); a resample draws units and
  # weighs each patient by how often its unit was drawn.
  units = (np.unique(a.fold[keep], return_inverse=True)[1].reshape(-1)
           if by_fold else np.arange(len(keep)))
  num_units = int(units.max()) + 1
  out['units'] = num_units
  draws = rng.integers(0, num_units, (resamples, num_units))
  drawn = np.zeros((resamples, num_units))
  np.add.at(drawn, (np.arange(resamples)[:, None], draws), 1.0)
  weights = drawn[:, units]
  for name, k in (('mDice', 0), ('mIoU', 1)):
    point = _scores(ca, use, ones)[k][0] - _scores(cb, use, ones)[k][0]
    boot = _scores(ca, use, weights)[k] - _scores(cb, use, weights)[k]
    lo, hi = np.nanpercentile(boot, [2.5, 97.5])
    out[name] = _num(point)
    out[name + '_ci95'] = [_num(lo), _num(hi)]
    out[name + '_half_width'] = _num((hi - lo) / 2)
  return out


def patient_values(arm: ArmCounts) -> np.ndarray:
  """``[P, S]`` mDice of each patient's test cases per seed (NaN where not
  tested, or where the patient has no foreground in label or prediction)."""
  out = np.full((len(arm.patients), len(arm.seeds)), np.nan)
  for s in range(len(arm.seeds)):
    for p in range(len(arm.patients)):
      if arm.done[s, p]:
        out[p, s] = dice_iou(arm.counts[s, p])[0]
  return out


def fold_values(arm: ArmCounts, folds: int) -> np.ndarray:
  """``[folds, S]`` pooled mDice of each fold's test patients per seed (NaN
  where that run is not done)."""
  out = np.full((folds, len(arm.seeds)), np.nan)
  for f in range(folds):
    members = arm.fold == f
    for s in range(len(arm.seeds)):
      use = np.zeros_like(arm.done)
      use[s] = arm.done[s] & members
      if use[s].any():
        out[f, s] = _scores(arm.counts, use, np.ones((1, len(arm.patients))))[
            0][0]
  return out


def variance_components(values: np.ndarray) -> Dict[str, Any]:
  """One-way random-effects reading of ``values[groups, replicates]`` (NaN
  = missing): the within-group variance (mean of the groups' sample
  variances) and the between-group variance of the true group means (the
  variance of the group means less within/n, floored at 0), as standard
  deviations. Groups with fewer than two replicates give no within-group
  term; with fewer than two groups there is no between-group term."""
  values = np.asarray(values, np.float64)
  rows = [v[~np.isnan(v)] for v in values]
  rows = [v for v in rows if len(v)]
  within = [np.var(v, ddof=1) for v in rows if len(v) > 1]
  out = {'groups': len(rows), 'replicates': [int(len(v)) for v in rows],
         'within_sd': None, 'between_sd': None, 'means_sd': None}
  if within:
    out['within_sd'] = float(np.sqrt(np.mean(within)))
  if len(rows) > 1:
    means = np.array([v.mean() for v in rows])
    out['means_sd'] = float(np.std(means, ddof=1))
    n = np.mean([len(v) for v in rows])
    var_within = np.mean(within) if within else 0.0
    out['between_sd'] = float(np.sqrt(max(np.var(means, ddof=1) -
                                           var_within / n, 0.0)))
  return out


def projected_half_width(per_patient_diffs: np.ndarray,
                         seeds: Sequence[int] = (1, 2, 4, 8, 16, 32),
                         target: float = 0.02) -> Dict[str, Any]:
  """How the 95 % half-width of a paired difference would shrink with more
  seeds, from ``per_patient_diffs[P, S]`` (each patient's Dice difference
  per seed): with the components of ``variance_components``, the mean over
  P patients of S seeds each has variance ``between²/P + within²/(P·S)``
  (a normal approximation of the patient bootstrap of the pooled Dice).
  The between-patient term is the floor that no number of seeds removes.
  ``patients_for_target[S]``: the fewest patients, S seeds each, whose
  half-width is at most ``target``, under the same components.
  ``seeds_now`` / ``half_width_now``: the seeds each patient has now (the
  mean, rounded) and the half-width they give; ``seeds_for_target``: the
  fewest seeds on these patients that reach ``target`` (None when the
  floor is above it)."""
  comp = variance_components(per_patient_diffs)
  p = comp['groups']
  if comp['between_sd'] is None or comp['within_sd'] is None:
    return dict(comp, patients=p, half_width={}, floor=None, target=target,
                patients_for_target={}, seeds_now=None, half_width_now=None,
                seeds_for_target=None)
  b2, w2 = comp['between_sd'] ** 2, comp['within_sd'] ** 2
  hw = lambda k: float(1.96 * np.sqrt(b2 / p + w2 / (p * k)))
  now = int(round(np.mean(comp['replicates'])))
  # Solve 1.96²·(b²/P + w²/(P·S)) ≤ target² for S.
  room = (target / 1.96) ** 2 - b2 / p
  return dict(comp, patients=p,
              half_width={str(k): hw(k) for k in seeds},
              seeds_now=now, half_width_now=hw(now),
              seeds_for_target=(int(max(1, np.ceil(w2 / (p * room) - 1e-9)))
                                if room > 0 else None),
              floor=float(1.96 * np.sqrt(b2 / p)), target=target,
              patients_for_target={
                  str(k): int(max(1, np.ceil(
                      1.96 ** 2 * (b2 + w2 / k) / target ** 2 - 1e-9)))
                  for k in seeds})


def t_half_width(values: np.ndarray, confidence: float = 0.95) -> float:
  """Half-width of the Student-t interval of the mean of ``values`` (at
  least two): t·sd/√n with n − 1 degrees of freedom."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  n = len(values)
  return float(stats.t.ppf(0.5 + confidence / 2, n - 1) *
               np.std(values, ddof=1) / np.sqrt(n))


def patient_t_interval(per_patient_diffs: np.ndarray,
                       confidence: float = 0.95) -> Dict[str, Any]:
  """The mean over patients of each patient's mean difference over its
  seeds (``per_patient_diffs[P, S]``, NaN = missing), with a Student-t
  interval over patients (P − 1 degrees of freedom). A check on the
  percentile bootstrap, which with ten patients is too narrow (it draws
  from the ten values seen, and uses no t quantile); it weighs patients
  equally where the pooled Dice weighs them by their fluid pixels."""
  values = np.asarray(per_patient_diffs, np.float64)
  means = np.nanmean(values[~np.isnan(values).all(1)], axis=1)
  out = {'patients': int(len(means)), 'confidence': confidence,
         'mean': float(means.mean()) if len(means) else None,
         'ci95': None, 'half_width': None}
  if len(means) > 1:
    half = t_half_width(means, confidence)
    out.update(ci95=[out['mean'] - half, out['mean'] + half],
               half_width=half)
  return out


def plateau(series: Sequence, total_steps: int, window: float = 0.1,
            tolerance: float = 0.01, learned_above: float = 0.05
            ) -> Dict[str, Any]:
  """Whether a learning curve ``[(step, value), ...]`` is flat at its end:
  its last value is at most ``tolerance`` above the best value reached by
  ``(1 − window)·total_steps`` (``gain``). Also ``gain_quarter``, the same
  over the last quarter of the steps: how much the run still learned late.
  Values None where the curve does not reach the end or has no point that
  early. Under a schedule that decays to zero the end flattens partly
  because the learning rate does; ``gain_quarter`` shows how far it came.
  ``learned``: the last value is above ``learned_above`` (a curve flat at
  zero is not a plateau reached but nothing learned; ``on_plateau`` is
  then False)."""
  series = [(int(s), float(v)) for s, v in series
            if v is not None and np.isfinite(v)]
  out = {'final': None, 'earlier_best': None, 'gain': None,
         'gain_quarter': None, 'learned': None, 'on_plateau': None}
  if not series or series[-1][0] < total_steps:
    return out
  out['final'] = series[-1][1]
  out['learned'] = bool(out['final'] > learned_above)

  def best_by(fraction):
    early = [v for s, v in series if s <= (1 - fraction) * total_steps]
    return max(early) if early else None

  quarter = best_by(0.25)
  if quarter is not None:
    out['gain_quarter'] = out['final'] - quarter
  out['earlier_best'] = best_by(window)
  if out['earlier_best'] is None:
    return out
  out['gain'] = out['final'] - out['earlier_best']
  out['on_plateau'] = bool(out['gain'] <= tolerance and out['learned'])
  return out


def _num(x) -> Optional[float]:
  x = float(x)
  return None if np.isnan(x) else x


def case_rows(workdir: str) -> List[Dict[str, Any]]:
  """``per_case.csv`` rows with Dice, IoU, HD95 and ASSD as numbers."""
  with open(os.path.join(workdir, 'per_case.csv'), newline='') as f:
    rows = list(csv.DictReader(f))
  for row in rows:
    for key in ('Dice', 'IoU', 'HD95', 'ASSD'):
      row[key] = float(row[key])
  return rows


# Per-run scores of the soft map averaged over an arm's runs: calibration,
# whether its entropy flags errors (pixels; cases by Spearman with Dice),
# and the first two under corruption (mean over a run's sweep).
CALIBRATION_KEYS = ('ECE', 'NLL', 'Brier', 'error_AUROC', 'error_AUPRC',
                    'case_Spearman', 'corrupted_ECE', 'corrupted_error_AUROC')


def analyse(records: Sequence[Dict], config, arms: Sequence[str],
            seeds: Sequence[int], folds: int, reference: str = 'baseline',
            resamples: int = 2000) -> Dict[str, Any]:
  """The cross-validated study's patient-level reading: per arm the pooled
  scores, per-fold values, per-case means, variance components and, against
  ``reference``, paired differences with intervals over patients."""
  # The data's own class names, as each run's metrics.json lists them
  # (config.data.class_names may be empty: read from the data set).
  done = [r for r in records if r['group'] == 'arm' and r['done']]
  class_names = list((done[0].get('per_class') or {}) if done else
                     config.data.class_names)
  patient = patient_of(config)
  folds_tested = {}
  for r in done:
    if r['fold'] not in folds_tested:
      folds_tested[r['fold']] = test_patients(config, r['fold'])
  tested = lambda r: folds_tested.get(r['fold'])
  if done and all(v is not None for v in folds_tested.values()):
    # Folder data: the splits name every tested patient.
    patients = sorted({p for v in folds_tested.values() for p in v})
  else:  # Generated data: the cases the runs scored.
    patients = patients_in(records, class_names, patient)
  out = {'patients': patients, 'folds': folds, 'reference': reference,
         'resamples': resamples, 'arms': {}}
  counts = {arm: gather(records, arm, seeds, patients, class_names, patient,
                        tested=tested) for arm in arms}
  fold_table = {arm: fold_values(counts[arm], folds) for arm in arms}
  patient_table = {arm: patient_values(counts[arm]) for arm in arms}
  for arm in arms:
    c = counts[arm]
    per_fold, per_patient = fold_table[arm], patient_table[arm]
    mine = [r for r in records if r['group'] == 'arm' and r['name'] == arm
            and r['done']]
    rows_by_seed = {}
    for r in mine:
      rows_by_seed.setdefault(r['seed'], []).extend(case_rows(r['workdir']))
    case_means = {}
    for key in ('Dice', 'HD95', 'ASSD'):
      values = [float(np.mean([row[key] for row in rows]))
                for rows in rows_by_seed.values() if rows]
      case_means[key] = (float(np.mean(values)) if values else None)
    entry = dict(pooled(c), per_fold=[[_num(v) for v in row]
                                      for row in per_fold],
                 per_patient={p: [_num(v) for v in row]
                              for p, row in zip(patients, per_patient)},
                 per_case_mean=case_means,
                 fold_components=variance_components(per_fold),
                 patient_components=variance_components(per_patient))
    entry['calibration'] = {}
    for key in CALIBRATION_KEYS:
      values = [r[key] for r in mine if r.get(key) is not None]
      entry['calibration'][key] = {
          'mean': float(np.mean(values)) if values else None,
          'runs': len(values)}
    if arm != reference and reference in counts:
      entry['vs_reference'] = paired_bootstrap(c, counts[reference],
                                               resamples)
      entry['vs_reference_by_fold'] = paired_bootstrap(
          c, counts[reference], resamples, by_fold=True)
      entry['vs_reference']['fold_components'] = variance_components(
          per_fold - fold_table[reference])
      diffs = per_patient - patient_table[reference]
      entry['vs_reference']['projection'] = projected_half_width(diffs)
      entry['vs_reference']['patient_t'] = patient_t_interval(diffs)
    out['arms'][arm] = entry
  # Under corruption: every corrupted test image of the swept runs pooled,
  # against the same runs' clean test images.
  corrupted = {arm: gather(records, arm, seeds, patients, class_names,
                           patient, corrupted_evaluations, tested)
               for arm in arms}
  # And each corruption on its own (its severities pooled).
  per_corruption = {
      name: {arm: gather(records, arm, seeds, patients, class_names, patient,
                         functools.partial(corrupted_evaluations, name=name),
                         tested) for arm in arms}
      for name in swept_corruptions(records)}
  for arm in arms:
    c = corrupted[arm]
    if not c.done.any():
      continue
    clean = counts[arm]
    clean_same = ArmCounts(seeds, patients, clean.counts.shape[2])
    clean_same.counts, clean_same.done = clean.counts, c.done
    entry = {'corrupted': pooled(c), 'clean': pooled(clean_same)}
    if arm != reference and corrupted[reference].done.any():
      entry['vs_reference'] = paired_bootstrap(c, corrupted[reference],
                                               resamples)
    entry['per_corruption'] = {}
    for name, by_arm in per_corruption.items():
      e = {'mDice': pooled(by_arm[arm])['mDice']}
      if arm != reference and by_arm[reference].done.any():
        e['vs_reference'] = paired_bootstrap(by_arm[arm], by_arm[reference],
                                             resamples)
      entry['per_corruption'][name] = e
    out['arms'][arm]['robustness'] = entry
  return out
