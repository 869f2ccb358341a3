"""Calibration of the soft map, and its uncertainty as an error detector.

Dataset-level, like the IoU/Dice confusion counts: every pixel of every case
adds to fixed histograms (``Accumulator``), and the summaries are computed
from them once at the end, so the numbers do not depend on batching, device
or process counts (the arrays sum across processes).

The soft map ``p`` is the mean of the final-step ``p̂`` over the ensemble's
chains (the ``p̂`` itself for one chain; the softmax for the deterministic
model). Definitions (docs/EVALUATION.md):

- ECE: pixels sorted by confidence (top-label ``max_c p_c``) into ``B``
  equal-mass bins; ``Σ_b n_b/N · |acc_b − conf_b|``. MCE: ``max_b`` of the
  same gap. Per class the same with ``p_c`` against ``[y = c]``.
  Confidences are histogrammed in ``FINE_BINS`` equal-width bins first; the
  equal-mass bins are unions of those, so their masses are equal up to one
  fine bin.
- Brier: ``mean Σ_c (p_c − [y = c])²``. NLL: ``mean −log max(p_y, ε)``.
- Error detection: a pixel is an error when the reported prediction differs
  from the label; its score is the soft map's normalised entropy
  ``H(p)/log K`` (histogrammed in ``FINE_BINS`` bins, ties inside a bin
  count one half). AUROC and AUPRC (average precision) of that score.
- Coverage: the most uncertain pixels are dropped first; the mean foreground
  Dice and pixel accuracy of the kept ones at each coverage.
"""

from typing import Any, Dict, Optional, Sequence

import numpy as np

FINE_BINS = 2000
LOG_EPS = 1e-8  # DESIGN §1's clamp inside logarithms.
COVERAGES = (1.0, 0.999, 0.998, 0.995, 0.99, 0.98, 0.95, 0.9, 0.8, 0.7, 0.6,
             0.5)


def _fine_index(values: np.ndarray) -> np.ndarray:
  return np.clip((values * FINE_BINS).astype(np.int64), 0, FINE_BINS - 1)


def normalized_entropy(prob: np.ndarray) -> np.ndarray:
  """``H(p) / log K`` over the last axis, in [0, 1]."""
  k = prob.shape[-1]
  h = -np.sum(prob * np.log(np.maximum(prob, LOG_EPS)), axis=-1)
  return np.clip(h / np.log(k), 0.0, 1.0)


def top_histogram(prob: np.ndarray, label: np.ndarray) -> np.ndarray:
  """``[3, FINE_BINS]``: pixels, Σ confidence and Σ correct per fine bin of
  the top-label confidence (``prob`` ``[..., K]``); sums over cases add."""
  prob = np.asarray(prob, np.float64)
  prob = prob.reshape(-1, prob.shape[-1])
  label = np.asarray(label).reshape(-1)
  conf = prob.max(axis=-1)
  idx = _fine_index(conf)
  correct = (prob.argmax(axis=-1) == label).astype(np.float64)
  return np.stack([np.bincount(idx, weights, FINE_BINS)
                   for weights in (None, conf, correct)])


class Accumulator:
  """Histograms of one split; ``add`` per case, ``summary`` at the end."""

  def __init__(self, num_classes: int):
    k = self.num_classes = num_classes
    self.top = np.zeros((3, FINE_BINS))  # count, Σ confidence, Σ correct.
    self.per_class = np.zeros((k, 3, FINE_BINS))  # count, Σ p_c, Σ [y = c].
    self.sums = np.zeros(3)  # pixels, Σ Brier, Σ NLL.
    # Confusion counts (prediction, label) per uncertainty bin.
    self.by_uncertainty = np.zeros((FINE_BINS, k, k), np.int64)

  def add(self, prob: np.ndarray, prediction: np.ndarray,
          label: np.ndarray) -> float:
    """Adds one case (``prob`` ``[H, W, K]``); returns its mean uncertainty."""
    k = self.num_classes
    prob = np.asarray(prob, np.float64).reshape(-1, k)
    label = np.asarray(label).reshape(-1).astype(np.int64)
    prediction = np.asarray(prediction).reshape(-1).astype(np.int64)
    onehot = np.eye(k)[label]
    self.top += top_histogram(prob, label)
    for c in range(k):
      idx_c = _fine_index(prob[:, c])
      for row, weights in enumerate((None, prob[:, c], onehot[:, c])):
        self.per_class[c, row] += np.bincount(idx_c, weights, FINE_BINS)
    p_y = prob[np.arange(len(label)), label]
    self.sums += (len(label), np.sum((prob - onehot) ** 2),
                  np.sum(-np.log(np.maximum(p_y, LOG_EPS))))
    u = normalized_entropy(prob)
    flat = (_fine_index(u) * k + prediction) * k + label
    self.by_uncertainty += np.bincount(
        flat, minlength=FINE_BINS * k * k).reshape(FINE_BINS, k, k)
    return float(u.mean())

  def arrays(self) -> Dict[str, np.ndarray]:
    return {'top': self.top, 'per_class': self.per_class, 'sums': self.sums,
            'by_uncertainty': self.by_uncertainty}

  def merge(self, other: Dict[str, np.ndarray]) -> None:
    """Adds another process's ``arrays()``."""
    self.top += other['top']
    self.per_class += other['per_class']
    self.sums += other['sums']
    self.by_uncertainty += other['by_uncertainty'].astype(np.int64)

  def summary(self, num_bins: int, class_names: Sequence[str]
              ) -> Dict[str, Any]:
    """metrics.json's ``calibration`` and ``uncertainty`` sections."""
    pixels = self.sums[0]
    if pixels == 0:
      raise ValueError('no pixels were added')
    top = reliability(self.top, num_bins)
    per_class = {}
    for c, name in enumerate(class_names):
      bins = reliability(self.per_class[c], num_bins)
      per_class[name] = {'ece': bins['ece'], 'mce': bins['mce']}
    calibration = {
        'ece': top['ece'], 'mce': top['mce'],
        'classwise_ece': float(np.mean([v['ece'] for v in per_class.values()])),
        'brier': float(self.sums[1] / pixels),
        'nll': float(self.sums[2] / pixels),
        'num_bins': num_bins, 'binning': 'equal-mass', 'pixels': int(pixels),
        'per_class': per_class, 'reliability': top['bins'],
        # Equal-width bins for the diagram: equal-mass ones all sit near
        # confidence 1 when most pixels are easy background.
        'reliability_equal_width': equal_width_bins(self.top, 10)}
    conf = self.by_uncertainty
    errors = conf.sum(axis=(1, 2)) - np.trace(conf, axis1=1, axis2=2)
    rights = np.trace(conf, axis1=1, axis2=2)
    uncertainty = {
        'score': 'normalized entropy of the soft map',
        'error_rate': float(errors.sum() / pixels),
        'error_auroc': auroc_from_histograms(errors, rights),
        'error_auprc': auprc_from_histograms(errors, rights),
        'coverage': coverage_curve(conf, COVERAGES)}
    return {'calibration': calibration, 'uncertainty': uncertainty}


def reliability(hist: np.ndarray, num_bins: int) -> Dict[str, Any]:
  """Equal-mass bins from a ``[3, FINE_BINS]`` (count, Σ conf, Σ hit)
  histogram: ECE, MCE and each bin's count, confidence and accuracy."""
  if num_bins < 2:
    raise ValueError(f'num_bins must be >= 2, got {num_bins}')
  count, conf_sum, hit_sum = hist
  total = count.sum()
  cum = np.cumsum(count)
  # Fine bin where each equal-mass bin ends (the first reaching its quota).
  ends = np.searchsorted(cum, total * np.arange(1, num_bins + 1) / num_bins,
                         side='left')
  ends = np.unique(np.minimum(ends, FINE_BINS - 1))
  bins, ece, mce, start = [], 0.0, 0.0, 0
  for end in ends:
    n = count[start:end + 1].sum()
    if n > 0:
      c = conf_sum[start:end + 1].sum() / n
      a = hit_sum[start:end + 1].sum() / n
      gap = abs(a - c)
      ece += n / total * gap
      mce = max(mce, gap)
      bins.append({'count': int(n), 'confidence': float(c),
                   'accuracy': float(a)})
    start = end + 1
  return {'ece': float(ece), 'mce': float(mce), 'bins': bins}


def equal_width_bins(hist: np.ndarray, num_bins: int) -> list:
  """Count, mean confidence and accuracy in ``num_bins`` equal-width bins."""
  out = []
  for part in np.array_split(np.arange(FINE_BINS), num_bins):
    n = hist[0, part].sum()
    out.append({'low': float(part[0] / FINE_BINS),
                'high': float((part[-1] + 1) / FINE_BINS), 'count': int(n),
                'confidence': float(hist[1, part].sum() / n) if n else None,
                'accuracy': float(hist[2, part].sum() / n) if n else None})
  return out


def auroc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> Optional[float]:
  """P(score of a positive > score of a negative), ties counting one half;
  scores are bin indices (higher = more uncertain). None without both."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  if pos.sum() == 0 or neg.sum() == 0:
    return None
  neg_below = np.cumsum(neg) - neg  # Negatives in strictly lower bins.
  wins = np.sum(pos * (neg_below + 0.5 * neg))
  return float(wins / (pos.sum() * neg.sum()))


def auprc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> Optional[float]:
  """Average precision of flagging the most uncertain bins first."""
  pos, neg = np.asarray(pos, np.float64), np.asarray(neg, np.float64)
  if pos.sum() == 0:
    return None
  tp = np.cumsum(pos[::-1])
  fp = np.cumsum(neg[::-1])
  keep = (pos[::-1] + neg[::-1]) > 0
  precision = tp[keep] / (tp[keep] + fp[keep])
  recall = tp[keep] / pos.sum()
  return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))


def coverage_curve(conf_by_bin: np.ndarray,
                   coverages: Sequence[float]) -> list:
  """Keeps the least uncertain bins up to each coverage; their mean
  foreground Dice and pixel accuracy. ``coverage`` is what was kept (whole
  bins, so at or just above the asked one)."""
  counts = conf_by_bin.sum(axis=(1, 2))
  total = counts.sum()
  cum = np.cumsum(counts)
  out = []
  for want in coverages:
    last = int(np.searchsorted(cum, want * total - 1e-9, side='left'))
    last = min(last, len(counts) - 1)
    kept = conf_by_bin[:last + 1].sum(axis=0)
    n = kept.sum()
    tp = np.diag(kept)[1:].astype(np.float64)
    denom = kept.sum(axis=0)[1:] + kept.sum(axis=1)[1:]
    dice = np.where(denom > 0, 2 * tp / np.maximum(denom, 1), np.nan)
    out.append({'requested': float(want), 'coverage': float(n / total),
                'mDice': float(np.nanmean(dice)) if np.isfinite(dice).any()
                else None,
                'accuracy': float(np.trace(kept) / n) if n else None})
  return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
  """Spearman rank correlation over the finite pairs (None below 3)."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  ok = np.isfinite(x) & np.isfinite(y)
  if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
    return None
  return float(stats.spearmanr(x[ok], y[ok]).statistic)


def plot_reliability(calibration: Dict[str, Any], path: str) -> None:
  """Reliability diagram (equal-width bins) over the pixels' histogram."""
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
  bins = [b for b in calibration['reliability_equal_width'] if b['count']]
  fig, (ax, hist) = plt.subplots(
      2, 1, figsize=(4.2, 5.2), dpi=120, sharex=True,
      gridspec_kw={'height_ratios': [3, 1]})
  ax.plot([0, 1], [0, 1], color='0.6', lw=1, ls='--', label='calibrated')
  ax.plot([b['confidence'] for b in bins], [b['accuracy'] for b in bins],
          'o-', color='C0', label='model')
  ax.set_ylabel('accuracy')
  ax.set_ylim(0, 1)
  ax.set_title(f'ECE {calibration["ece"]:.4f}  MCE {calibration["mce"]:.4f} '
               f'({calibration["num_bins"]} equal-mass bins)', fontsize=9)
  ax.legend(loc='upper left', fontsize=8)
  hist.bar([(b['low'] + b['high']) / 2 for b in bins],
           [b['count'] for b in bins],
           width=[b['high'] - b['low'] for b in bins], color='0.7')
  hist.set_yscale('log')
  hist.set_ylabel('pixels')
  hist.set_xlabel('confidence (max p)')
  hist.set_xlim(0, 1)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def plot_coverage(uncertainty: Dict[str, Any], path: str) -> None:
  """Error rate and foreground Dice of the kept pixels against the kept
  fraction (log scale of the dropped fraction)."""
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  plt = visualize.pyplot()
  rows = [r for r in uncertainty['coverage'] if r['coverage'] < 1]
  dropped = [1 - r['coverage'] for r in rows]
  fig, ax = plt.subplots(figsize=(4.6, 3.4), dpi=120)
  ax.plot(dropped, [1 - r['accuracy'] for r in rows], 'o-', color='C3',
          label='error rate of kept pixels')
  ax.axhline(uncertainty['error_rate'], color='C3', lw=0.8, ls=':',
             label='error rate, all pixels')
  if rows:  # None when no pixel is less certain than another.
    ax.set_xscale('log')
  else:
    ax.text(0.5, 0.5, 'no coverage curve:\nall pixels equally certain',
            ha='center', va='center', transform=ax.transAxes, fontsize=8)
  ax.set_xlabel('fraction dropped (most uncertain first)')
  ax.set_ylabel('error rate')
  twin = ax.twinx()
  twin.plot(dropped, [r['mDice'] if r['mDice'] is not None else float('nan')
                      for r in rows], 's--', color='C0', ms=3,
            label='mDice of kept pixels')
  twin.set_ylabel('mDice of kept pixels', color='C0')
  twin.set_ylim(0, 1)
  lines = ax.get_legend_handles_labels()
  more = twin.get_legend_handles_labels()
  ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7)
  auroc = uncertainty['error_auroc']
  ax.set_title('error AUROC ' + (f'{auroc:.3f}' if auroc is not None
                                  else 'n/a (no errors)'), fontsize=10)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
