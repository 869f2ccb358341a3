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
