"""Calibration and uncertainty metrics against brute-force references."""

import numpy as np
import pytest

from spad_jax import calibration

K = 3


def _case(rng, h=16, w=16, sharp=3.0):
  logits = rng.normal(size=(h, w, K)) * sharp
  prob = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  # Labels drawn from a tempered prob: a miscalibrated model.
  tempered = prob ** 0.5 / (prob ** 0.5).sum(-1, keepdims=True)
  label = np.array([rng.choice(K, p=p) for p in tempered.reshape(-1, K)]
                   ).reshape(h, w)
  return prob, prob.argmax(-1), label


def _ece_brute(conf, hit, num_bins):
  """Sort by confidence; equal-count groups (N divisible by num_bins)."""
  order = np.argsort(conf, kind='stable')
  groups = np.array_split(order, num_bins)
  gaps = [abs(hit[g].mean() - conf[g].mean()) for g in groups]
  return sum(len(g) / len(conf) * gap for g, gap in zip(groups, gaps)), max(gaps)


def _auroc_brute(score, positive):
  pos, neg = score[positive], score[~positive]
  wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


def _ap_brute(score, positive):
  """Average precision, tied scores flagged together."""
  ap, tp, fp, last_recall = 0.0, 0, 0, 0.0
  for s in sorted(set(score), reverse=True):
    at = score == s
    tp += int((at & positive).sum())
    fp += int((at & ~positive).sum())
    recall = tp / positive.sum()
    ap += (recall - last_recall) * tp / (tp + fp)
    last_recall = recall
  return ap


def test_ece_mce_brier_nll_equal_brute_force():
  # Confidences on distinct fine bins, so equal-mass bins are exact.
  n, num_bins = 240, 8
  rng = np.random.default_rng(0)
  # Top-label confidences lie in [1/K, 1].
  fine = rng.choice(np.arange(calibration.FINE_BINS // K + 5,
                              calibration.FINE_BINS - 1), n, replace=False)
  conf = (fine + 0.5) / calibration.FINE_BINS
  label = rng.integers(0, K, n)
  other = (1 - conf) / (K - 1)
  prob = np.repeat(other[:, None], K, axis=1)
  top = rng.integers(0, K, n)
  prob[np.arange(n), top] = conf
  acc = calibration.Accumulator(K)
  acc.add(prob.reshape(1, n, K), top.reshape(1, n), label.reshape(1, n))
  out = acc.summary(num_bins, ['a', 'b', 'c'])['calibration']
  ece, mce = _ece_brute(conf, (top == label).astype(float), num_bins)
  assert out['ece'] == pytest.approx(ece, abs=1e-12)
  assert out['mce'] == pytest.approx(mce, abs=1e-12)
  onehot = np.eye(K)[label]
  assert out['brier'] == pytest.approx(np.mean(((prob - onehot) ** 2).sum(-1)))
  assert out['nll'] == pytest.approx(np.mean(-np.log(prob[np.arange(n),
                                                          label])))
  assert len(out['reliability']) == num_bins


def test_a_calibrated_map_has_near_zero_ece_and_a_wrong_one_does_not():
  rng = np.random.default_rng(1)
  n = 200_000
  conf = rng.uniform(0.4, 1.0, n)
  hit = rng.random(n) < conf  # Right exactly as often as it says.
  prob = np.stack([conf, 1 - conf], -1)
  label = np.where(hit, 0, 1)
  good = calibration.Accumulator(2)
  good.add(prob[None], np.zeros((1, n), int), label[None])
  assert good.summary(15, ['a', 'b'])['calibration']['ece'] < 0.01
  over = calibration.Accumulator(2)  # Says 0.95, right 70 % of the time.
  prob = np.tile([0.95, 0.05], (n, 1))
  label = (rng.random(n) > 0.7).astype(int)
  over.add(prob[None], np.zeros((1, n), int), label[None])
  assert over.summary(15, ['a', 'b'])['calibration']['ece'] == pytest.approx(
      0.25, abs=0.01)


def test_error_auroc_and_auprc_equal_sorted_pair_references():
  rng = np.random.default_rng(2)
  prob, _, label = _case(rng, 12, 12)
  prediction = prob.argmax(-1)
  acc = calibration.Accumulator(K)
  acc.add(prob, prediction, label)
  unc = acc.summary(10, ['a', 'b', 'c'])['uncertainty']
  # The reference sees the score the accumulator bins (ties inside a bin).
  score = calibration._fine_index(  # pylint: disable=protected-access
      calibration.normalized_entropy(prob)).reshape(-1)
  error = (prediction != label).reshape(-1)
  assert 0 < error.sum() < error.size
  assert unc['error_auroc'] == pytest.approx(_auroc_brute(score, error))
  assert unc['error_auprc'] == pytest.approx(_ap_brute(score, error))
  assert unc['error_rate'] == pytest.approx(error.mean())


def test_coverage_drops_the_most_uncertain_pixels_first():
  rng = np.random.default_rng(3)
  prob, prediction, label = _case(rng, 20, 20)
  acc = calibration.Accumulator(K)
  acc.add(prob, prediction, label)
  curve = acc.summary(10, ['a', 'b', 'c'])['uncertainty']['coverage']
  assert curve[0]['coverage'] == 1.0
  u = calibration._fine_index(  # pylint: disable=protected-access
      calibration.normalized_entropy(prob)).reshape(-1)
  for row in curve:
    cut = np.sort(u)[int(np.ceil(row['requested'] * u.size - 1e-9)) - 1]
    keep = u <= cut  # Whole bins: everything up to the bin reaching it.
    assert row['coverage'] == pytest.approx(keep.mean())
    p, g = prediction.reshape(-1)[keep], label.reshape(-1)[keep]
    dices = [2 * np.sum((p == c) & (g == c)) / (np.sum(p == c) + np.sum(g == c))
             for c in range(1, K) if np.sum(p == c) + np.sum(g == c)]
    assert row['mDice'] == pytest.approx(np.mean(dices))
    assert row['accuracy'] == pytest.approx(np.mean(p == g))


def test_accumulating_in_parts_equals_all_at_once():
  rng = np.random.default_rng(4)
  cases = [_case(rng) for _ in range(3)]
  whole, parts = calibration.Accumulator(K), calibration.Accumulator(K)
  for c in cases:
    whole.add(*c)
  other = calibration.Accumulator(K)
  parts.add(*cases[0])
  for c in cases[1:]:
    other.add(*c)
  parts.merge(other.arrays())
  names = ['a', 'b', 'c']
  a, b = _flat(parts.summary(10, names)), _flat(whole.summary(10, names))
  assert a.keys() == b.keys()
  for key, value in a.items():  # Equal up to float summation order.
    assert value == (pytest.approx(b[key], rel=1e-12)
                     if isinstance(value, float) else b[key]), key


def _flat(tree, prefix=''):
  if isinstance(tree, dict):
    items = tree.items()
  elif isinstance(tree, list):
    items = enumerate(tree)
  else:
    return {prefix: tree}
  out = {}
  for k, v in items:
    out.update(_flat(v, f'{prefix}/{k}'))
  return out


def test_spearman_sign_and_bad_input():
  x = [0.1, 0.2, 0.3, 0.4]
  assert calibration.spearman(x, [0.9, 0.8, 0.5, 0.1]) == pytest.approx(-1.0)
  assert calibration.spearman(x[:2], [1, 2]) is None
  with pytest.raises(ValueError, match='num_bins'):
    calibration.reliability(np.ones((3, calibration.FINE_BINS)), 1)


def test_coverage_plot_when_every_pixel_is_equally_certain(tmp_path):
  """All pixels in one uncertainty bin keep the whole map at every asked
  coverage: no curve to draw on a log axis, and still a figure."""
  conf = np.zeros((10, 2, 2), np.int64)
  conf[0] = [[50, 3], [2, 9]]  # Every pixel in the most certain bin.
  rows = calibration.coverage_curve(conf, calibration.COVERAGES)
  assert all(r['coverage'] == 1 for r in rows)
  path = str(tmp_path / 'coverage.png')
  calibration.plot_coverage({'coverage': rows, 'error_rate': 5 / 64,
                             'error_auroc': None}, path)
  import cv2  # pylint: disable=g-import-not-at-top
  assert cv2.imread(path) is not None
