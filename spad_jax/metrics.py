"""Segmentation metrics (DESIGN §4).

Dataset level: per-class IoU/Dice from counts accumulated over the whole set
(so Dice = 2·IoU/(1+IoU) per class), means over foreground classes.
Per mask: ``dice``, ``iou``, ``hd95``, ``assd`` on 2-D boolean masks of one
class, NaN when the class is absent from both (skipped); a class present in
only one of them gets the image diagonal as its distance.
"""

from typing import Dict, Optional, Sequence

import numpy as np
from scipy import ndimage


def confusion_counts(pred: np.ndarray, gt: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """``[K, K]`` matrix, rows ground truth, columns prediction, over all pixels."""
  idx = gt.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
  return np.bincount(idx, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def summarize_confusion(conf: np.ndarray,
                        class_names: Sequence[str]) -> Dict:
  """Per-class IoU/Dice and foreground means from a confusion matrix."""
  conf = conf.astype(np.float64)
  inter = np.diag(conf)
  gt = conf.sum(axis=1)
  pred = conf.sum(axis=0)
  union = gt + pred - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, inter / union, np.nan)
    dice = np.where(gt + pred > 0, 2 * inter / (gt + pred), np.nan)
  per_class = {}
  for c, name in enumerate(class_names):
    per_class[name] = {'IoU': _num(iou[c]), 'Dice': _num(dice[c]),
                       'gt_pixels': int(gt[c]), 'pred_pixels': int(pred[c])}
  fg = slice(1, len(class_names))
  present = ~np.isnan(iou[fg])
  return {
      'mIoU': _num(np.mean(iou[fg][present])) if present.any() else None,
      'mDice': _num(np.mean(dice[fg][present])) if present.any() else None,
      'pixel_accuracy': _num(inter.sum() / max(conf.sum(), 1)),
      'per_class': per_class,
  }


def _num(x) -> Optional[float]:
  x = float(x)
  return None if np.isnan(x) else x


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
  pred, gt = pred.astype(bool), gt.astype(bool)
  total = pred.sum() + gt.sum()
  return float('nan') if total == 0 else float(2 * (pred & gt).sum() / total)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
  pred, gt = pred.astype(bool), gt.astype(bool)
  union = (pred | gt).sum()
  return float('nan') if union == 0 else float((pred & gt).sum() / union)


def surface(mask: np.ndarray) -> np.ndarray:
  """``mask & ~erode(mask)`` with a 3×3 square; outside counts as background."""
  eroded = ndimage.binary_erosion(mask, structure=np.ones((3, 3), bool),
                                  border_value=0)
  return mask & ~eroded


def _surface_distances(a: np.ndarray, b: np.ndarray, spacing):
  """Distances from each surface pixel of ``a`` to the surface of ``b``."""
  sa, sb = surface(a), surface(b)
  dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
  return dist_to_b[sa]


def _distance_metric(pred, gt, spacing, reduce):
  pred, gt = pred.astype(bool), gt.astype(bool)
  if not pred.any() and not gt.any():
    return float('nan')
  spacing = (1.0, 1.0) if spacing is None else tuple(spacing)
  if not pred.any() or not gt.any():
    return float(np.hypot(pred.shape[0] * spacing[0],
                          pred.shape[1] * spacing[1]))
  return reduce(_surface_distances(pred, gt, spacing),
                _surface_distances(gt, pred, spacing))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
  """95th-percentile symmetric Hausdorff distance (MONAI's definition)."""
  return _distance_metric(pred, gt, spacing, lambda ab, ba: float(max(
      np.percentile(ab, 95), np.percentile(ba, 95))))


def assd(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
  """Average symmetric surface distance."""
  return _distance_metric(pred, gt, spacing, lambda ab, ba: float(
      (ab.sum() + ba.sum()) / (ab.size + ba.size)))
