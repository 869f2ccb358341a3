"""The noise probe's masks, noise and tallies against loops written here."""

import numpy as np
import pytest

from experiments.ablation import noise_probe
import tiny_config


def _config(anchor_ratio=0.3, band_width=2):
  config = tiny_config.get_config()
  config.data.num_classes = 2
  config.spad.anchor_ratio = anchor_ratio
  config.spad.band_width = band_width
  config.spad.components = False
  return config


def _labels():
  labels = np.zeros((3, 32, 32), np.uint8)
  labels[0, 4:20, 6:22] = 1  # One large target.
  labels[1, 2:5, 25:30] = 1  # A small one near the border.
  return labels  # The third has no foreground.


def test_masks_cover_targets_and_edges_and_move_onto_background():
  config, labels = _config(), _labels()
  on, off = noise_probe.probe_masks(labels, config, seed=0)
  assert on.dtype == np.uint8 and on.shape == labels.shape
  h, w = labels.shape[1:]
  for i, label in enumerate(labels):
    fg = label > 0
    near = np.zeros_like(fg)  # Within 2 px (Chebyshev) of a target.
    for y, x in zip(*np.nonzero(fg)):
      near[max(y - 2, 0):y + 3, max(x - 2, 0):x + 3] = True
    # Noise off the targets only near their edges.
    assert not (on[i].astype(bool) & ~fg & ~near).any()
    # Every pixel at a class change is in the band.
    for y in range(h):
      for x in range(w):
        right = x + 1 < w and label[y, x] != label[y, x + 1]
        down = y + 1 < h and label[y, x] != label[y + 1, x]
        if right or down:
          assert on[i, y, x] == 1
    # Moved masks: the mask rolled by half the image, on background only.
    for y in range(h):
      for x in range(w):
        moved = on[i, (y - h // 2) % h, (x - w // 2) % w]
        assert off[i, y, x] == (moved if label[y, x] == 0 else 0)
  assert not on[2].any() and not off[2].any()
  # Inside the large target, away from its edge, ScD noises all but the
  # anchors: about 1 - anchor_ratio of the pixels.
  inner = on[0, 7:17, 9:19].mean()
  assert 0.55 < inner < 0.85
  # Without anchors ScD noises the whole target.
  on_all, _ = noise_probe.probe_masks(labels, _config(anchor_ratio=0.0), 0)
  assert on_all[0][labels[0] > 0].all() and on_all[1][labels[1] > 0].all()
  # The same seed, the same masks.
  again, _ = noise_probe.probe_masks(labels, config, seed=0)
  np.testing.assert_array_equal(on, again)


def test_noise_only_inside_the_mask():
  rng = np.random.default_rng(0)
  images = rng.uniform(-1, 1, (4, 32, 32, 1)).astype(np.float16)
  mask = (rng.uniform(size=(4, 32, 32)) < 0.5).astype(np.uint8)
  noisy = noise_probe.add_noise(images, mask, 0.5, seed=3)
  assert noisy.dtype == images.dtype
  outside = mask == 0
  np.testing.assert_array_equal(noisy[outside], images[outside])
  d = (noisy.astype(np.float64) - images)[mask == 1]
  assert abs(d.std() - 0.5) < 0.03 and abs(d.mean()) < 0.03
  np.testing.assert_array_equal(
      noisy, noise_probe.add_noise(images, mask, 0.5, seed=3))


def test_tally_and_pooled_against_loops():
  rng = np.random.default_rng(1)
  k = 3
  labels = rng.integers(0, k, (2, 8, 8))
  preds = rng.integers(0, k, (2, 8, 8))
  off = (rng.uniform(size=(2, 8, 8)) < 0.3).astype(np.uint8)
  t = noise_probe.tally(preds, labels, off, k)
  conf = np.zeros((k, k), int)
  fg = 0
  for idx in np.ndindex(labels.shape):
    conf[labels[idx], preds[idx]] += 1
    fg += off[idx] == 1 and preds[idx] > 0
  assert t['confusion'] == conf.tolist()
  assert t['off_pixels'] == int(off.sum()) and t['off_foreground'] == fg
  # Pooled over two runs: Dice of the summed counts, mean over classes 1..k-1.
  other = noise_probe.tally(labels, labels, off, k)  # A perfect run.
  probes = [{'versions': {v: t if v != 'clean' else other
                          for v in noise_probe.VERSIONS}}] * 2
  pooled = noise_probe.pooled(probes)
  assert pooled['runs'] == 2
  assert pooled['clean']['mDice'] == pytest.approx(1.0)
  total = 2 * conf
  dice = [2 * total[c, c] / (total[c].sum() + total[:, c].sum())
          for c in (1, 2)]
  assert pooled['on_target']['mDice'] == pytest.approx(np.mean(dice))
  assert pooled['off_target']['off_foreground'] == pytest.approx(
      fg / off.sum())
