"""Segmentation metrics (DESIGN §4).

Dataset level: per-class IoU/Dice from counts accumulated over the whole set
(so Dice = 2·IoU/(1+IoU) per class), means over foreground classes.
Per mask: ``dice``, ``iou``, ``hd95``, ``assd`` on 2-D boolean masks of one
class, NaN when the class is absent from both (skipped); a class present in
only one of them gets the image diagonal as its distance.
Per case: ``case_metrics`` tabulates those for every foreground class with
missed/spurious flags; ``summarize_cases`` averages the table over cases.
Several annotations per case: ``generalized_energy_distance`` (d = 1 − IoU,
Kohl et al. 2018) and ``pixel_variance`` across samples or annotations.
"""

from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage


def confusion_counts(pred: np.ndarray, gt: np.ndarray,
                     num_classes: int) -> np.ndarray:
  """``[K, K]`` matrix, rows ground truth, columns prediction, over all pixels."""
  idx = gt.astype(np.int64).ravel() * num_classes + pred.astype(np.int64).ravel()
  return np.bincount(idx, minlength=num_classes ** 2).reshape(
      num_classes, num_classes)


def _iou_dice(conf: np.ndarray):
  """Per-class IoU and Dice of a confusion matrix, NaN where a class is absent."""
  conf = conf.astype(np.float64)
  inter = np.diag(conf)
  gt = conf.sum(axis=1)
  pred = conf.sum(axis=0)
  union = gt + pred - inter
  with np.errstate(invalid='ignore', divide='ignore'):
    iou = np.where(union > 0, inter / union, np.nan)
    dice = np.where(gt + pred > 0, 2 * inter / (gt + pred), np.nan)
  return iou, dice, inter, gt, pred


def summarize_confusion(conf: np.ndarray,
                        class_names: Sequence[str]) -> Dict:
  """Per-class IoU/Dice and foreground means from a confusion matrix."""
  iou, dice, inter, gt, pred = _iou_dice(conf)
  per_class = {}
  for c, name in enumerate(class_names):
    per_class[name] = {'IoU': _num(iou[c]), 'Dice': _num(dice[c]),
                       'gt_pixels': int(gt[c]), 'pred_pixels': int(pred[c])}
  fg = slice(1, len(class_names))
  present = ~np.isnan(iou[fg])
  return {
      'mIoU': _num(np.mean(iou[fg][present])) if present.any() else None,
      'mDice': _num(np.mean(dice[fg][present])) if present.any() else None,
      'pixel_accuracy': _num(inter.sum() / max(gt.sum(), 1)),
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


def diagonal(shape, spacing=None) -> float:
  """The image diagonal: the distance given to a missed or spurious class."""
  spacing = (1.0, 1.0) if spacing is None else tuple(spacing)
  return float(np.hypot(shape[0] * spacing[0], shape[1] * spacing[1]))


def surface_metrics(pred: np.ndarray, gt: np.ndarray,
                    spacing=None) -> Tuple[float, float]:
  """``(HD95, ASSD)`` from one pair of distance transforms (DESIGN §4 rules)."""
  pred, gt = pred.astype(bool), gt.astype(bool)
  if not pred.any() and not gt.any():
    return float('nan'), float('nan')
  if not pred.any() or not gt.any():
    worst = diagonal(pred.shape, spacing)
    return worst, worst
  spacing = (1.0, 1.0) if spacing is None else tuple(spacing)
  ab = _surface_distances(pred, gt, spacing)
  ba = _surface_distances(gt, pred, spacing)
  return (float(max(np.percentile(ab, 95), np.percentile(ba, 95))),
          float((ab.sum() + ba.sum()) / (ab.size + ba.size)))


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
  """95th-percentile symmetric Hausdorff distance (MONAI's definition)."""
  return surface_metrics(pred, gt, spacing)[0]


def assd(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
  """Average symmetric surface distance."""
  return surface_metrics(pred, gt, spacing)[1]


# ------------------------------------------------------------------ per case

# Columns of a per-case table; ``missed``/``spurious`` are 0/1 flags.
# The pixel counts let Dice be pooled over any subset of cases (e.g. a
# patient's, in a bootstrap over patients): 2·Σoverlap / (Σlabel + Σpred).
CASE_FIELDS = ('Dice', 'IoU', 'HD95', 'ASSD', 'missed', 'spurious',
               'label_px', 'pred_px', 'overlap_px')


def case_metrics(pred: np.ndarray, gt: np.ndarray, num_classes: int,
                 spacing=None) -> np.ndarray:
  """``[K-1, len(CASE_FIELDS)]`` for the foreground classes of one case.

  A class absent from both maps is skipped (an all-NaN row). One in the label
  only is *missed*, one in the prediction only *spurious*: Dice = IoU = 0,
  HD95 = ASSD = the image diagonal (in the units of ``spacing``).
  """
  table = np.full((num_classes - 1, len(CASE_FIELDS)), np.nan)
  for c in range(1, num_classes):
    p, g = pred == c, gt == c
    if not p.any() and not g.any():
      continue
    table[c - 1] = (dice(p, g), iou(p, g)) + surface_metrics(p, g, spacing) + (
        float(g.any() and not p.any()), float(p.any() and not g.any()),
        float(g.sum()), float(p.sum()), float(np.sum(p & g)))
  return table


def case_score(table: np.ndarray) -> float:
  """Mean foreground Dice of one case (NaN when no class was scored)."""
  dices = table[:, CASE_FIELDS.index('Dice')]
  return float(np.nanmean(dices)) if np.isfinite(dices).any() else float('nan')


def summarize_cases(tables: np.ndarray, class_names: Sequence[str]) -> Dict:
  """Means over cases of a ``[N, K-1, F]`` stack of ``case_metrics`` tables.

  Per foreground class: the mean of each metric over the cases where the
  class was scored, and how many were scored, missed and spurious. The
  top-level ``Dice``/``IoU``/``HD95``/``ASSD`` average those class means.
  """
  per_class = {}
  means = {f: [] for f in CASE_FIELDS[:4]}
  for c, name in enumerate(class_names[1:]):
    rows = tables[:, c]
    rows = rows[~np.isnan(rows[:, 0])]
    entry = {'cases': int(len(rows)),
             'missed': int(rows[:, CASE_FIELDS.index('missed')].sum()),
             'spurious': int(rows[:, CASE_FIELDS.index('spurious')].sum())}
    for i, f in enumerate(CASE_FIELDS[:4]):
      entry[f] = _num(rows[:, i].mean()) if len(rows) else None
      if len(rows):
        means[f].append(rows[:, i].mean())
    per_class[name] = entry
  out = {f: _num(np.mean(v)) if v else None for f, v in means.items()}
  out['per_class'] = per_class
  return out


# ---------------------------------------------- several annotations per case


def label_distance(a: np.ndarray, b: np.ndarray, num_classes: int) -> float:
  """``1 − IoU`` of two label maps: IoU averaged over the foreground classes
  present in either map; 0 when neither has any foreground (they agree)."""
  iou_c = _iou_dice(confusion_counts(a, b, num_classes))[0][1:]
  present = ~np.isnan(iou_c)
  return float(1.0 - iou_c[present].mean()) if present.any() else 0.0


def generalized_energy_distance(samples: np.ndarray, annotations: np.ndarray,
                                num_classes: int) -> Dict[str, float]:
  """Squared generalized energy distance between samples and annotations.

  ``D² = 2·E[d(S, Y)] − E[d(S, S')] − E[d(Y, Y')]`` with ``d = 1 − IoU``
  (``label_distance``), expectations over all ordered pairs of the ``[N, H,
  W]`` samples and ``[M, H, W]`` annotations, self-pairs included (so equal
  sets give exactly 0), as in Kohl et al. 2018 (probabilistic U-Net).
  Also returns the three terms: ``cross`` = E[d(S, Y)], ``sample_diversity``
  = E[d(S, S')], ``annotation_diversity`` = E[d(Y, Y')].
  """
  mean_d = lambda xs, ys: float(np.mean([[label_distance(x, y, num_classes)
                                          for y in ys] for x in xs]))
  cross = mean_d(samples, annotations)
  ss = mean_d(samples, samples)
  yy = mean_d(annotations, annotations)
  return {'GED': 2 * cross - ss - yy, 'cross': cross,
          'sample_diversity': ss, 'annotation_diversity': yy}


def pixel_variance(maps: np.ndarray, num_classes: int) -> np.ndarray:
  """Per-pixel variance of ``[N, H, W]`` label maps: ``Σ_c Var(1[map = c])``.

  Equals ``1 − Σ_c p_c²`` with ``p_c`` the fraction of maps showing class
  ``c`` (0 where all agree, at most ``1 − 1/K``); for two classes it is twice
  the Bernoulli variance ``p(1 − p)``.
  """
  frac = np.stack([(maps == c).mean(axis=0) for c in range(num_classes)], -1)
  return 1.0 - np.sum(frac ** 2, axis=-1)


# Per-case columns of ``multi_annotation`` (cases with several annotations).
MULTI_FIELDS = ('GED', 'cross', 'sample_diversity', 'annotation_diversity',
                'sample_variance', 'annotation_variance',
                'variance_correlation', 'num_annotations')


def multi_annotation_row(samples: np.ndarray, annotations: np.ndarray,
                         num_classes: int) -> np.ndarray:
  """``MULTI_FIELDS`` of one case: GED terms, mean per-pixel variances of the
  samples and of the annotations, and their correlation over pixels (does the
  model vary where the raters disagree? NaN where either is constant)."""
  ged = generalized_energy_distance(samples, annotations, num_classes)
  var_s = pixel_variance(samples, num_classes).ravel()
  var_a = pixel_variance(annotations, num_classes).ravel()
  corr = (np.corrcoef(var_s, var_a)[0, 1] if var_s.std() > 0 and
          var_a.std() > 0 else np.nan)
  return np.array([ged[f] for f in MULTI_FIELDS[:4]] +
                  [var_s.mean(), var_a.mean(), corr, len(annotations)])


def summarize_multi(rows: np.ndarray, ids: Sequence[str]) -> Dict[str, Any]:
  """``multi_annotation`` of metrics.json: means of the ``MULTI_FIELDS`` rows
  over the cases that have them (NaN rows: one annotation), and per case."""
  has = ~np.isnan(rows[:, 0])
  out = {'num_cases': int(has.sum())}
  for i, f in enumerate(MULTI_FIELDS):
    vals = rows[has, i][~np.isnan(rows[has, i])]
    out[f] = float(vals.mean()) if len(vals) else None
  out['per_case'] = {ids[n]: {f: None if np.isnan(rows[n, i]) else
                              float(rows[n, i])
                              for i, f in enumerate(MULTI_FIELDS)}
                     for n in np.flatnonzero(has)}
  return out
