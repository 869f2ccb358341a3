"""IoU/Dice/HD95/ASSD against hand-made cases and brute force."""

import numpy as np
import pytest

from spad_jax import metrics


def test_dataset_dice_is_2iou_over_1_plus_iou():
  rng = np.random.default_rng(0)
  gt = rng.integers(0, 3, (4, 16, 16))
  pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 3, gt.shape))
  conf = metrics.confusion_counts(pred, gt, 3)
  out = metrics.summarize_confusion(conf, ['bg', 'a', 'b'])
  for name in ('a', 'b'):
    iou = out['per_class'][name]['IoU']
    assert out['per_class'][name]['Dice'] == pytest.approx(2 * iou / (1 + iou))
    c = ['bg', 'a', 'b'].index(name)
    assert iou == pytest.approx(metrics.iou(pred == c, gt == c))
  assert out['mIoU'] == pytest.approx(np.mean(
      [out['per_class'][n]['IoU'] for n in ('a', 'b')]))


def test_absent_class_is_skipped():
  gt = np.zeros((8, 8), int)
  gt[2:4, 2:4] = 1
  out = metrics.summarize_confusion(metrics.confusion_counts(gt, gt, 3),
                                    ['bg', 'a', 'b'])
  assert out['per_class']['b']['IoU'] is None
  assert out['mIoU'] == 1.0
  assert np.isnan(metrics.dice(gt == 2, gt == 2))


def _brute_distances(a, b):
  sa = np.argwhere(metrics.surface(a))
  sb = np.argwhere(metrics.surface(b))
  return np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1)).min(1)


def test_shifted_square_and_brute_force():
  a = np.zeros((32, 32), bool)
  a[8:16, 8:16] = True
  b = np.roll(a, 3, axis=1)
  assert metrics.hd95(a, b) == pytest.approx(3.0)
  rng = np.random.default_rng(1)
  for _ in range(3):
    p = rng.random((24, 24)) > 0.6
    g = rng.random((24, 24)) > 0.6
    ab, ba = _brute_distances(p, g), _brute_distances(g, p)
    assert metrics.hd95(p, g) == pytest.approx(
        max(np.percentile(ab, 95), np.percentile(ba, 95)))
    assert metrics.assd(p, g) == pytest.approx(
        (ab.sum() + ba.sum()) / (ab.size + ba.size))


def test_missed_class_gets_diagonal():
  gt = np.zeros((30, 40), bool)
  gt[5:10, 5:10] = True
  assert metrics.hd95(np.zeros_like(gt), gt) == pytest.approx(50.0)
  assert metrics.hd95(np.zeros_like(gt), gt, spacing=(2, 1)) == pytest.approx(
      np.hypot(60, 40))
  assert np.isnan(metrics.hd95(np.zeros_like(gt), np.zeros_like(gt)))


def _brute_iou(a, b):
  union = np.logical_or(a, b).sum()
  return np.logical_and(a, b).sum() / union if union else np.nan


def test_dataset_dice_over_many_random_cases():
  """Dataset-level Dice is 2·IoU/(1+IoU) per class for any set of cases,
  and the counts match brute-force sums over the cases."""
  rng = np.random.default_rng(3)
  k = 5
  conf = np.zeros((k, k), np.int64)
  inter, size_p, size_g = np.zeros(k), np.zeros(k), np.zeros(k)
  for _ in range(7):
    shape = tuple(rng.integers(5, 30, 2))
    gt = rng.integers(0, k, shape)
    pred = np.where(rng.random(shape) < 0.6, gt, rng.integers(0, k, shape))
    conf += metrics.confusion_counts(pred, gt, k)
    for c in range(k):
      inter[c] += np.sum((pred == c) & (gt == c))
      size_p[c] += np.sum(pred == c)
      size_g[c] += np.sum(gt == c)
  names = [f'c{c}' for c in range(k)]
  out = metrics.summarize_confusion(conf, names)
  for c, name in enumerate(names):
    iou, dice = out['per_class'][name]['IoU'], out['per_class'][name]['Dice']
    assert iou == pytest.approx(inter[c] / (size_p[c] + size_g[c] - inter[c]))
    assert dice == pytest.approx(2 * inter[c] / (size_p[c] + size_g[c]))
    assert dice == pytest.approx(2 * iou / (1 + iou))


def test_spacing_scales_distances_per_axis():
  a = np.zeros((32, 32), bool)
  a[8:16, 8:16] = True
  along_cols = np.roll(a, 3, axis=1)
  along_rows = np.roll(a, 3, axis=0)
  assert metrics.hd95(a, along_cols, spacing=(2.0, 0.5)) == pytest.approx(1.5)
  assert metrics.hd95(a, along_rows, spacing=(2.0, 0.5)) == pytest.approx(6.0)
  # Isotropic spacing scales every distance (anisotropic changes which
  # surface pixel is nearest, so no such identity holds there).
  assert metrics.assd(a, along_rows, spacing=(2.5, 2.5)) == pytest.approx(
      2.5 * metrics.assd(a, along_rows))


def test_case_metrics_flags_and_skips():
  gt = np.zeros((30, 40), np.uint8)
  gt[2:10, 2:10] = 1  # Class 1: found, shifted by 2 columns.
  gt[20:25, 20:30] = 2  # Class 2: missed.
  pred = np.zeros_like(gt)
  pred[2:10, 4:12] = 1
  pred[12:16, 30:36] = 3  # Class 3: spurious. Class 4: absent from both.
  table = metrics.case_metrics(pred, gt, 5, spacing=(0.5, 2.0))
  f = {name: i for i, name in enumerate(metrics.CASE_FIELDS)}
  assert table.shape == (4, len(metrics.CASE_FIELDS))
  assert table[0, f['Dice']] == pytest.approx(metrics.dice(pred == 1, gt == 1))
  assert table[0, f['IoU']] == pytest.approx(48 / 80)
  assert table[0, f['HD95']] == pytest.approx(4.0)  # 2 columns x 2.0.
  assert table[0, f['missed']] == 0 and table[0, f['spurious']] == 0
  # Pixel counts, by hand: 8x8 squares overlapping in 8x6.
  assert [table[0, f[k]] for k in ('label_px', 'pred_px', 'overlap_px')] == [
      64, 64, 48]
  assert [table[1, f[k]] for k in ('label_px', 'pred_px', 'overlap_px')] == [
      50, 0, 0]
  assert [table[2, f[k]] for k in ('label_px', 'pred_px', 'overlap_px')] == [
      0, 24, 0]
  diagonal = np.hypot(30 * 0.5, 40 * 2.0)
  for c, flag in ((1, 'missed'), (2, 'spurious')):
    assert table[c, f['Dice']] == 0 and table[c, f['IoU']] == 0
    assert table[c, f['HD95']] == pytest.approx(diagonal)
    assert table[c, f['ASSD']] == pytest.approx(diagonal)
    assert table[c, f[flag]] == 1
    other = 'spurious' if flag == 'missed' else 'missed'
    assert table[c, f[other]] == 0
  assert np.all(np.isnan(table[3]))  # Skipped.
  assert metrics.case_score(table) == pytest.approx(table[0, f['Dice']] / 3)
  assert np.isnan(metrics.case_score(metrics.case_metrics(
      np.zeros_like(gt), np.zeros_like(gt), 5)))


def test_summarize_cases_averages_scored_cases_only():
  rng = np.random.default_rng(4)
  tables = []
  for _ in range(6):
    gt = rng.integers(0, 3, (12, 12)) * (rng.random((12, 12)) < 0.5)
    pred = np.where(rng.random(gt.shape) < 0.7, gt, 0)
    tables.append(metrics.case_metrics(pred, gt, 4))
  tables = np.stack(tables)  # Class 3 never occurs: skipped everywhere.
  out = metrics.summarize_cases(tables, ['bg', 'a', 'b', 'c'])
  for c, name in enumerate(['a', 'b']):
    dices = [t[c, 0] for t in tables if not np.isnan(t[c, 0])]
    assert out['per_class'][name]['Dice'] == pytest.approx(np.mean(dices))
    assert out['per_class'][name]['cases'] == len(dices)
  assert out['per_class']['c'] == {'cases': 0, 'missed': 0, 'spurious': 0,
                                   'Dice': None, 'IoU': None, 'HD95': None,
                                   'ASSD': None}
  assert out['HD95'] == pytest.approx(np.mean(
      [out['per_class'][n]['HD95'] for n in ('a', 'b')]))


def _brute_ged(samples, annotations, k):
  def d(a, b):
    ious = [_brute_iou(a == c, b == c) for c in range(1, k)]
    ious = [v for v in ious if not np.isnan(v)]
    return 1 - np.mean(ious) if ious else 0.0
  mean = lambda xs, ys: np.mean([d(x, y) for x in xs for y in ys])
  return (2 * mean(samples, annotations) - mean(samples, samples) -
          mean(annotations, annotations))


def test_ged_against_brute_force_and_hand_cases():
  rng = np.random.default_rng(5)
  for k, n, m in ((2, 4, 3), (4, 5, 2)):
    samples = rng.integers(0, k, (n, 10, 12))
    annotations = rng.integers(0, k, (m, 10, 12))
    ged = metrics.generalized_energy_distance(samples, annotations, k)
    assert ged['GED'] == pytest.approx(_brute_ged(samples, annotations, k))
    assert ged['GED'] >= 0
    # Identical sets (in any order) are at distance 0.
    same = metrics.generalized_energy_distance(samples, samples[::-1], k)
    assert same['GED'] == pytest.approx(0.0, abs=1e-12)
  # Two disjoint squares: d = 1, so GED = 2·1 - 0 - 0.
  a = np.zeros((1, 8, 8), int)
  a[0, :4, :4] = 1
  b = np.zeros((1, 8, 8), int)
  b[0, 4:, 4:] = 1
  assert metrics.generalized_energy_distance(a, b, 2)['GED'] == 2.0
  # Both empty: they agree (d = 0).
  assert metrics.label_distance(a[0] * 0, b[0] * 0, 2) == 0.0


def test_pixel_variance_matches_one_hot_variance():
  rng = np.random.default_rng(6)
  maps = rng.integers(0, 3, (5, 6, 7))
  onehot = np.stack([maps == c for c in range(3)], -1).astype(float)
  np.testing.assert_allclose(metrics.pixel_variance(maps, 3),
                             onehot.var(axis=0).sum(-1))
  half = np.array([[[0]], [[1]], [[0]], [[1]]])
  assert metrics.pixel_variance(half, 2)[0, 0] == pytest.approx(0.5)
  assert np.all(metrics.pixel_variance(np.repeat(maps[:1], 4, 0), 3) == 0)
