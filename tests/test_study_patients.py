"""Patient-level statistics of a cross-validated study against references
written here (experiments/ablation/patients.py)."""

import json
import os

import numpy as np
import pytest

from conftest import reference_mdice
from experiments.ablation import patients

CLASSES = ('background', 'a', 'b')


def _write_run(workdir, cases):
  """per_case.csv of (case id, pred, label) maps, as evaluation writes it."""
  from spad_jax import evaluate
  from spad_jax import metrics
  os.makedirs(workdir, exist_ok=True)
  tables = np.stack([metrics.case_metrics(p, l, len(CLASSES))
                     for _, p, l in cases])
  evaluate.write_per_case_csv(os.path.join(workdir, 'per_case.csv'),
                              [c for c, _, _ in cases], tables, CLASSES)


def _maps(rng, n):
  shape = (n, 12, 12)
  label = rng.choice(3, shape, p=[0.7, 0.2, 0.1])
  pred = np.where(rng.random(shape) < 0.7, label, rng.choice(3, shape))
  return pred, label


def test_case_counts_pool_to_the_dice_of_all_pixels(tmp_path):
  rng = np.random.default_rng(0)
  pred, label = _maps(rng, 5)
  pred[3] = 0  # A case with no foreground predicted,
  label[4] = 0  # one with none in the label,
  pred[4] = 0  # and then none at all: no rows, zero counts.
  ids = [f'c{i}' for i in range(5)]
  _write_run(str(tmp_path), list(zip(ids, pred, label)))
  counts = patients.case_counts(str(tmp_path), CLASSES)
  assert set(counts) == set(ids[:4])
  total = sum(counts.values())
  d, i = patients.dice_iou(total)
  assert d == pytest.approx(reference_mdice(pred, label, 3))
  # IoU per class from the pixels, independently.
  ious = [((pred == c) & (label == c)).sum() / ((pred == c) | (label == c)).sum()
          for c in (1, 2)]
  assert i == pytest.approx(np.mean(ious))
  # A run evaluated before the counts existed is named.
  with open(tmp_path / 'old.csv', 'w') as f:
    f.write('case,class,Dice\nc0,a,0.5\n')
  os.replace(tmp_path / 'old.csv', tmp_path / 'per_case.csv')
  with pytest.raises(ValueError, match='per_case.csv has no label_px'):
    patients.case_counts(str(tmp_path), CLASSES)


def _study(tmp_path, rng, arms=('base', 'spad'), seeds=(0, 1), folds=3,
           per_patient=2, skip=()):
  """Records of a CV study on 6 patients (2 per fold), and the maps."""
  pts = [f'p{j}' for j in range(2 * folds)]
  records, maps = [], {}
  for arm in arms:
    for seed in seeds:
      for fold in range(folds):
        if (arm, seed, fold) in skip:
          continue
        workdir = str(tmp_path / arm / f's{seed}' / f'f{fold}')
        cases = []
        for p in pts[2 * fold: 2 * fold + 2]:
          pred, label = _maps(rng, per_patient)
          for k in range(per_patient):
            cid = f'{p}_b{k}'
            cases.append((cid, pred[k], label[k]))
            maps[(arm, seed, cid)] = (pred[k], label[k])
        _write_run(workdir, cases)
        records.append({'group': 'arm', 'name': arm, 'seed': seed,
                        'fold': fold, 'done': True, 'workdir': workdir})
  return records, maps, pts


def _reference_pooled(maps, arm, seeds, chosen, per_patient=2):
  """Mean over seeds of the Dice of all pixels of the chosen patients (a
  patient drawn twice counts twice)."""
  values = []
  for s in seeds:
    preds, labels = [], []
    for p in chosen:
      for k in range(per_patient):
        if (arm, s, f'{p}_b{k}') in maps:
          pr, la = maps[(arm, s, f'{p}_b{k}')]
          preds.append(pr)
          labels.append(la)
    if preds:
      values.append(reference_mdice(np.stack(preds), np.stack(labels), 3))
  return float(np.mean(values))


def test_pooled_and_paired_bootstrap_against_a_loop(tmp_path):
  rng = np.random.default_rng(1)
  records, maps, pts = _study(tmp_path, rng)
  patient = lambda case: case.split('_')[0]
  found = patients.patients_in(records, CLASSES, patient)
  assert found == pts
  a = patients.gather(records, 'spad', [0, 1], found, CLASSES, patient)
  b = patients.gather(records, 'base', [0, 1], found, CLASSES, patient)
  assert a.done.all() and list(a.fold) == [0, 0, 1, 1, 2, 2]
  pooled = patients.pooled(a)
  assert pooled['mDice'] == pytest.approx(
      _reference_pooled(maps, 'spad', [0, 1], pts))
  assert pooled['per_seed']['1']['mDice'] == pytest.approx(
      _reference_pooled(maps, 'spad', [1], pts))

  result = patients.paired_bootstrap(a, b, resamples=200, seed=3)
  point = (_reference_pooled(maps, 'spad', [0, 1], pts) -
           _reference_pooled(maps, 'base', [0, 1], pts))
  assert result['mDice'] == pytest.approx(point)
  # The same resamples of patients, drawn as the function draws them.
  draws = np.random.default_rng(3).integers(0, len(pts), (200, len(pts)))
  boot = [_reference_pooled(maps, 'spad', [0, 1], [pts[j] for j in row]) -
          _reference_pooled(maps, 'base', [0, 1], [pts[j] for j in row])
          for row in draws]
  assert result['mDice_ci95'] == pytest.approx(
      list(np.percentile(boot, [2.5, 97.5])))
  assert result['mDice_ci95'][0] < point < result['mDice_ci95'][1]
  # Resampling folds: each draw takes a fold's two patients together.
  by_fold = patients.paired_bootstrap(a, b, resamples=200, seed=3,
                                      by_fold=True)
  assert by_fold['mDice'] == pytest.approx(point) and by_fold['units'] == 3
  draws = np.random.default_rng(3).integers(0, 3, (200, 3))
  boot = [_reference_pooled(maps, 'spad', [0, 1], [p for f in row for p in
                                                   pts[2 * f: 2 * f + 2]]) -
          _reference_pooled(maps, 'base', [0, 1], [p for f in row for p in
                                                   pts[2 * f: 2 * f + 2]])
          for row in draws]
  assert by_fold['mDice_ci95'] == pytest.approx(
      list(np.percentile(boot, [2.5, 97.5])))
  assert by_fold['mDice_ci95'] != result['mDice_ci95']
  # An arm against itself: zero, with a zero-width interval.
  same = patients.paired_bootstrap(a, a, resamples=50)
  assert same['mDice'] == 0 and same['mDice_ci95'] == [0, 0]


def test_paired_bootstrap_uses_only_complete_seeds_of_pairs_both_have(tmp_path):
  rng = np.random.default_rng(2)
  records, maps, pts = _study(tmp_path, rng, skip={('spad', 1, 2)})
  patient = lambda case: case.split('_')[0]
  a = patients.gather(records, 'spad', [0, 1], pts, CLASSES, patient)
  b = patients.gather(records, 'base', [0, 1], pts, CLASSES, patient)
  assert not a.done[1, 4:].any() and a.done[0].all()
  result = patients.paired_bootstrap(a, b, resamples=20)
  # Seed 1 is still under way for spad: until it has every patient, the
  # difference is seed 0's alone (not seed 1 on four patients weighed as
  # much as seed 0 on six).
  assert result['mDice'] == pytest.approx(
      _reference_pooled(maps, 'spad', [0], pts) -
      _reference_pooled(maps, 'base', [0], pts))
  assert result['pairs'] == 6 and result['patients'] == pts
  # Once it is complete, both seeds count.
  records2, maps2, _ = _study(tmp_path / 'all', np.random.default_rng(2))
  a2 = patients.gather(records2, 'spad', [0, 1], pts, CLASSES, patient)
  b2 = patients.gather(records2, 'base', [0, 1], pts, CLASSES, patient)
  assert patients.paired_bootstrap(a2, b2, resamples=20)['mDice'] == (
      pytest.approx(_reference_pooled(maps2, 'spad', [0, 1], pts) -
                    _reference_pooled(maps2, 'base', [0, 1], pts)))
  # An arm's own pooled score counts only the seeds that tested all its
  # patients: spad's seed 1 is still under way, base's is complete.
  assert patients.pooled(a)['mDice'] == pytest.approx(
      _reference_pooled(maps, 'spad', [0], pts))
  assert patients.pooled(a)['seeds_pooled'] == [0]
  assert patients.pooled(a)['per_seed']['1']['patients'] == 4
  assert patients.pooled(b)['mDice'] == pytest.approx(
      _reference_pooled(maps, 'base', [0, 1], pts))


def test_variance_components_by_hand():
  v = patients.variance_components([[1.0, 3.0], [5.0, 7.0]])
  assert v['within_sd'] == pytest.approx(np.sqrt(2))
  assert v['means_sd'] == pytest.approx(np.sqrt(8))
  assert v['between_sd'] == pytest.approx(np.sqrt(8 - 2 / 2))
  # Seeds that agree and folds that differ; missing values are skipped.
  v = patients.variance_components([[0.5, 0.5, np.nan], [0.7, 0.7, 0.7]])
  assert v['within_sd'] == pytest.approx(0, abs=1e-12)
  assert v['replicates'] == [2, 3]
  assert v['between_sd'] == pytest.approx(np.std([0.5, 0.7], ddof=1))
  # Noise larger than the spread of the means floors the between term at 0.
  v = patients.variance_components([[0.0, 1.0], [0.1, 0.9]])
  assert v['between_sd'] == 0


def test_plateau():
  steps = [100 * k for k in range(1, 11)]  # 1,000 steps, a point per 10 %.
  rising = list(zip(steps, np.linspace(0.1, 0.82, 10)))
  flat = list(zip(steps, [0.1, 0.4, 0.6, 0.7, 0.75, 0.78, 0.8, 0.81, 0.815,
                          0.82]))
  p = patients.plateau(rising, 1000)
  assert p['earlier_best'] == pytest.approx(0.74)  # Step 900.
  assert p['gain'] == pytest.approx(0.08) and p['on_plateau'] is False
  p = patients.plateau(flat, 1000)
  assert p['earlier_best'] == 0.815 and p['on_plateau'] is True
  assert p['gain_quarter'] == pytest.approx(0.82 - 0.8)  # Best by step 750.
  assert patients.plateau(flat, 1000, window=0.25,
                          tolerance=0.01)['on_plateau'] is False
  assert patients.plateau(rising[:9], 1000)['on_plateau'] is None  # Unfinished.
  # A run that fell back is past its plateau, not still learning.
  assert patients.plateau([(900, 0.8), (1000, 0.7)], 1000)['on_plateau']
  # A curve flat at zero learned nothing: not a plateau.
  idle = patients.plateau([(900, 0.0), (1000, 0.001)], 1000)
  assert idle['gain'] < 0.01 and not idle['learned']
  assert idle['on_plateau'] is False
  assert patients.plateau(flat, 1000)['learned']


def test_a_patient_without_any_foreground_is_still_a_unit(tmp_path):
  """No per_case.csv row (nothing in label or prediction), still tested:
  it counts as a resampled patient with zero pixels."""
  rng = np.random.default_rng(4)
  pred, label = _maps(rng, 2)
  empty = np.zeros((12, 12), np.int64)
  cases = [('p0_b0', pred[0], label[0]), ('p0_b1', pred[1], label[1]),
           ('p1_b0', empty, empty)]
  records = []
  for arm in ('a', 'b'):
    _write_run(str(tmp_path / arm), cases)
    records.append({'group': 'arm', 'name': arm, 'seed': 0, 'fold': 0,
                    'done': True, 'workdir': str(tmp_path / arm)})
  patient = lambda case: case.split('_')[0]
  assert patients.patients_in(records, CLASSES, patient) == ['p0']
  pts = ['p0', 'p1']
  a = patients.gather(records, 'a', [0], pts, CLASSES, patient,
                      tested=lambda r: pts)
  assert a.done.all() and not a.counts[0, 1].any()
  without = patients.gather(records, 'a', [0], pts, CLASSES, patient)
  assert not without.done[0, 1]
  result = patients.paired_bootstrap(a, a, resamples=10)
  assert result['patients'] == pts


def test_projected_half_width_by_hand():
  # Two patients, two seeds: within-patient variance 2, patient means 2 / 6.
  proj = patients.projected_half_width(np.array([[1.0, 3.0], [5.0, 7.0]]),
                                       seeds=(2, 8))
  b2 = 8 - 2 / 2  # variance_components' between term.
  assert proj['half_width']['2'] == pytest.approx(
      1.96 * np.sqrt(b2 / 2 + 2 / (2 * 2)))
  assert proj['half_width']['8'] == pytest.approx(
      1.96 * np.sqrt(b2 / 2 + 2 / (2 * 8)))
  assert proj['floor'] == pytest.approx(1.96 * np.sqrt(b2 / 2))
  # The fewest patients whose half-width reaches the target, by search.
  for k in (2, 8):
    var = b2 + 2 / k
    need = next(n for n in range(1, 10 ** 6)
                if 1.96 * np.sqrt(var / n) <= proj['target'])
    assert proj['patients_for_target'][str(k)] == need
  wide = patients.projected_half_width(np.array([[1.0, 3.0], [5.0, 7.0]]),
                                       seeds=(2,), target=10.0)
  assert wide['patients_for_target']['2'] == 1
  # The seeds now (two per patient) and the fewest seeds on these patients
  # that reach a target, by search; a floor above the target: none.
  near = patients.projected_half_width(np.array([[1.0, 3.0], [5.0, 7.0]]),
                                       seeds=(2,), target=3.8)
  assert near['seeds_now'] == 2
  assert near['half_width_now'] == pytest.approx(
      1.96 * np.sqrt(b2 / 2 + 2 / (2 * 2)))
  assert near['seeds_for_target'] == next(
      k for k in range(1, 10 ** 6)
      if 1.96 * np.sqrt(b2 / 2 + 2 / (2 * k)) <= 3.8)
  assert near['seeds_for_target'] > 2  # Above the floor, beyond two seeds.
  assert proj['seeds_for_target'] is None  # Floor 1.96·√3.5 > 0.02.
  # One seed: no within-patient term, no projection.
  assert patients.projected_half_width(np.ones((3, 1)))['half_width'] == {}


def test_patient_t_interval_against_scipy():
  from scipy import stats
  rng = np.random.default_rng(0)
  diffs = rng.normal(-0.03, 0.05, (10, 4))
  diffs[3, 1] = np.nan   # a missing seed: the patient's mean of the rest
  diffs[7] = np.nan      # a patient with no pair: not a unit
  t = patients.patient_t_interval(diffs)
  means = [np.mean(r[~np.isnan(r)]) for r in diffs if not np.isnan(r).all()]
  ref = stats.ttest_1samp(means, 0.0).confidence_interval(0.95)
  assert t['patients'] == 9
  assert t['mean'] == pytest.approx(np.mean(means))
  assert t['ci95'] == pytest.approx([ref.low, ref.high])
  assert t['half_width'] == pytest.approx((ref.high - ref.low) / 2)
  # One patient: a mean, no interval.
  one = patients.patient_t_interval(diffs[:1])
  assert one['mean'] == pytest.approx(diffs[0].mean())
  assert one['ci95'] is None and one['half_width'] is None


def test_corrupted_evaluations_come_from_the_records_sweep(tmp_path):
  """The sweep a record lists (plan.collect_run reads it from
  robustness.json) names the corrupted evaluation folders; no file is read
  again, and an unswept run has none."""
  from experiments.ablation import plan
  workdir = tmp_path / 'run'
  workdir.mkdir()
  (workdir / 'metrics.json').write_text('{"mDice": 0.5}')
  rows = [{'corruption': c, 'severity': s} for c, s in
          (('none', 0), ('blur', 3), ('jpeg', 3), ('blur', 5))]
  (workdir / 'robustness.json').write_text(json.dumps({'rows': rows}))
  run = plan.Run(group='arm', name='a', seed=0, fold=0, overrides={},
                 workdir=str(workdir))
  record = plan.collect_run(run)
  os.remove(workdir / 'robustness.json')
  want = [str(workdir / 'corruptions' / f) for f in
          ('blur_s3', 'jpeg_s3', 'blur_s5')]
  assert patients.corrupted_evaluations(record) == want
  assert patients.corrupted_evaluations(record, name='blur') == [want[0],
                                                                 want[2]]
  unswept = dict(record, swept=None)
  assert patients.corrupted_evaluations(unswept) is None
  assert patients.swept_corruptions(
      [record, unswept, dict(record, done=False,
                             swept=[['speckle', 1]])]) == ['blur', 'jpeg']
