"""ScD/BcD masks and the PaS schedule (the basics; property tests extend these)."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spad_jax import perturb


def test_pas_sigma_python_and_traced():
  assert perturb.pas_sigma(0, 0.5, 0.05) == 0.5
  assert perturb.pas_sigma(10, 0.5, 0.05) == pytest.approx(0.5 / 1.5)
  traced = jax.jit(lambda e: perturb.pas_sigma(e, 0.5, 0.05))(jnp.int32(10))
  assert float(traced) == pytest.approx(0.5 / 1.5)


def test_num_targets():
  assert perturb.num_targets(0, 3, 0.01, 5) == 3
  assert perturb.num_targets(0, 3, 0.01, 2) == 2
  assert perturb.num_targets(0, 3, 0.01, 0) == 0
  assert perturb.num_targets(1000, 3, 0.01, 5) == 1  # max(1, round(3/11)).
  assert perturb.num_targets(100, 3, 0.01, 5) == 2  # round(1.5) half-to-even.
  traced = jax.jit(lambda e: perturb.num_targets(e, 3, 0.01, 5))(
      jnp.int32(100))
  assert int(traced) == 2


def _label():
  label = np.zeros((40, 40), np.uint8)
  label[5:20, 5:20] = 1
  label[25:35, 10:30] = 2
  label[8:14, 28:36] = 3
  return label


def test_scd_mask_inside_chosen_targets_with_anchor_fraction():
  label = _label()
  rng = np.random.default_rng(0)
  mask = perturb.scd_mask(label, 4, 2, 0.3, rng)
  chosen = [c for c in (1, 2, 3) if mask[label == c].any()]
  assert len(chosen) == 2
  assert not mask[label == 0].any()
  target = np.isin(label, chosen)
  kept = 1 - mask[target].mean()
  n = target.sum()
  assert abs(kept - 0.3) < 4 * np.sqrt(0.3 * 0.7 / n)  # Binomial tolerance.
  assert not perturb.scd_mask(np.zeros_like(label), 4, 3, 0.3, rng).any()


def test_boundary_band_along_transitions_only():
  label = _label()
  band = perturb.boundary_band(label, 4, 3)
  # Every pixel whose 4-neighbourhood changes class is covered.
  edge = np.zeros_like(label, bool)
  edge[:-1] |= label[:-1] != label[1:]
  edge[1:] |= label[:-1] != label[1:]
  edge[:, :-1] |= label[:, :-1] != label[:, 1:]
  edge[:, 1:] |= label[:, :-1] != label[:, 1:]
  assert band[edge].all()
  # Nothing farther than the band from an edge.
  from scipy import ndimage
  dist = ndimage.distance_transform_cdt(~edge, metric='chessboard')
  assert dist[band.astype(bool)].max() <= 2
  assert not perturb.boundary_band(np.zeros_like(label), 4, 3).any()


def test_perturb_image_changes_only_inside_mask():
  image = jnp.zeros((2, 8, 8, 1))
  mask = jnp.zeros((2, 8, 8), jnp.uint8).at[:, 2:5, 2:5].set(1)
  out = perturb.perturb_image(image, mask, 0.5, jax.random.key(0))
  changed = np.asarray(out[..., 0] != 0)
  np.testing.assert_array_equal(changed, np.asarray(mask, bool))


@pytest.mark.parametrize('k', [4, 16, 32])
def test_per_class_band_finds_every_transition(k):
  label = np.zeros((40, 40), np.uint8)
  label[10:30, 10:20] = 1
  label[10:30, 20:30] = 2
  band = perturb.boundary_band(label, k, 1, per_class=True)
  assert band[20, 9:11].any() and band[20, 19:21].any()
  assert band[20, 29:31].any()
  assert not band[0:5].any() and not band[20, 13:17].any()
  spread = perturb.boundary_band(label, k, 1, complete=False)
  assert spread[20, 19:21].any() == perturb.spread_sees_all_transitions(
      k, 100, 200)
  assert perturb.spread_sees_all_transitions(4, 100, 200)
  assert not perturb.spread_sees_all_transitions(32, 100, 200)
  # Completing Canny with the transition pixels finds them in any mode.
  completed = perturb.boundary_band(label, k, 1)
  assert completed[20, 19:21].any() and completed[20, 9:11].any()


def test_config_refuses_blind_spread_canny():
  from configs import cxrs
  from spad_jax import config_validation
  config = cxrs.get_config()
  config_validation.validate(config)
  config.spad.bcd_per_class = False
  config_validation.validate(config)  # Completion sees every transition...
  config.spad.bcd_complete = False  # ...Canny alone does not.
  with pytest.raises(config_validation.ConfigError,
                     match='spad.bcd_per_class'):
    config_validation.validate(config)


def test_anchor_patches_keep_square_blocks_at_the_ratio():
  full = np.ones((200, 200), np.uint8)  # One target covering the image.
  keep = 1 - perturb.scd_mask(full, 2, 1, 0.3, np.random.default_rng(3),
                              anchor_patch=4)
  assert abs(keep.mean() - 0.3) < 0.05  # 2,500 cells: binomial sd ~0.009.
  # Every kept pixel's 4x4 cell (grid offset unknown) is uniform: the field
  # changes value only along one grid of lines spaced 4 apart.
  rows = np.nonzero((keep[1:] != keep[:-1]).any(axis=1))[0]
  cols = np.nonzero((keep[:, 1:] != keep[:, :-1]).any(axis=0))[0]
  assert len(set(rows % 4)) == 1 and len(set(cols % 4)) == 1
  # The grid offset is random per example.
  offsets = set()
  for seed in range(12):
    keep = 1 - perturb.scd_mask(full, 2, 1, 0.3, np.random.default_rng(seed),
                                anchor_patch=4)
    rows = np.nonzero((keep[1:] != keep[:-1]).any(axis=1))[0]
    offsets.add(int(rows[0] % 4))
  assert len(offsets) > 1
  label = _label()
  mask = perturb.scd_mask(label, 4, 3, 0.3, np.random.default_rng(3),
                          anchor_patch=3)
  assert not mask[label == 0].any() and mask.any()


def _transition_both_sides(label):
  edge = np.zeros(label.shape, bool)
  edge[:-1] |= label[:-1] != label[1:]
  edge[1:] |= label[:-1] != label[1:]
  edge[:, :-1] |= label[:, :-1] != label[:, 1:]
  edge[:, 1:] |= label[:, :-1] != label[:, 1:]
  return edge


def _duke_labels(n=12):
  import glob
  import os
  import cv2
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))), '..', 'shared', 'data', 'duke_dme_fluid', 'labels')
  paths = sorted(glob.glob(os.path.join(root, '*.png')))
  if not paths:
    pytest.skip('shared Duke DME data absent')
  labels = [cv2.imread(p, cv2.IMREAD_UNCHANGED) for p in paths]
  with_fluid = [l for l in labels if l.any()]
  return with_fluid[:n] + [l for l in labels if not l.any()][:2]


def _random_labels(n=8):
  rng = np.random.default_rng(7)
  out = []
  for _ in range(n):
    import cv2
    noise = cv2.GaussianBlur(rng.random((64, 64)), (0, 0), 4)
    out.append(np.digitize(noise, np.quantile(noise, [0.4, 0.7, 0.9]))
               .astype(np.uint8))
  return out


@pytest.mark.parametrize('source', ['duke', 'random'])
def test_mask_properties_on_real_and_random_labels(source):
  from scipy import ndimage
  labels = _duke_labels() if source == 'duke' else _random_labels()
  k_classes = 2 if source == 'duke' else 4
  rng = np.random.default_rng(11)
  kept, total, covered, edges = 0, 0, 0, 0
  for label in labels:
    targets = perturb.target_masks(label, k_classes, components=True)
    k = perturb.num_targets(5, 3, 0.01, len(targets))
    mask = perturb.scd_mask(label, k_classes, k, 0.3, rng, targets=targets)
    if not label.any():
      assert not mask.any()
      assert not perturb.boundary_band(label, k_classes, 5).any()
      continue
    hit = [t for t in targets if (mask.astype(bool) & t).any()]
    assert len(hit) <= k  # At most k(e) targets perturbed...
    union = np.any(hit, axis=0) if hit else np.zeros_like(label, bool)
    assert not mask[~union].any()  # ...and nothing outside them.
    kept += int((union & ~mask.astype(bool)).sum())
    total += int(union.sum())
    band = perturb.boundary_band(label, k_classes, 5).astype(bool)
    edge = _transition_both_sides(label)
    assert band[edge].all()  # Every pixel of every class transition.
    canny_only = perturb.boundary_band(label, k_classes, 5,
                                       complete=False).astype(bool)
    assert not canny_only[~band].any()  # Completion only adds.
    covered += int(canny_only[edge].sum())
    edges += int(edge.sum())
    dist = ndimage.distance_transform_cdt(~edge, metric='chessboard')
    assert dist[band].max() <= 5 // 2 + 1  # The band stays near an edge.
  # Canny alone covers nearly all transition pixels (measured >= 99 %).
  assert covered / edges >= 0.97
  # Anchor fraction over all chosen-target pixels: binomial tolerance.
  assert total > 0
  assert abs(kept / total - 0.3) < 4 * np.sqrt(0.21 / total) + 0.01


def test_completion_covers_what_canny_drops():
  # A 1-pixel hole: Canny rings it but misses the hole pixel itself.
  label = np.zeros((20, 20), np.uint8)
  label[5:15, 5:15] = 1
  label[10, 10] = 0
  canny = perturb.boundary_band(label, 2, 1, complete=False)
  band = perturb.boundary_band(label, 2, 1)
  assert not canny[10, 10] and band[10, 10]
  assert canny[9:12, 9:12].sum() == 8
  assert np.array_equal(band[9:12, 9:12], np.ones((3, 3), np.uint8))
  # Completion adds only transition pixels to Canny's one-sided line.
  assert np.array_equal(band.astype(bool),
                        canny.astype(bool) | perturb.transition_pixels(label))


def test_anchor_ratio_extremes_and_index_targets():
  label = _label()
  rng = np.random.default_rng(0)
  every = perturb.scd_mask(label, 4, 3, 0.0, rng)  # No anchors: whole targets.
  np.testing.assert_array_equal(every, (label > 0).astype(np.uint8))
  assert not perturb.scd_mask(label, 4, 3, 1.0, rng).any()  # All anchors.
  # Targets as flat indices (the pipeline's cached form) or boolean masks
  # draw the same mask from the same generator state.
  by_index = perturb.scd_mask(label, 4, 2, 0.3, np.random.default_rng(5),
                              targets=perturb.target_pixels(label, 4))
  by_mask = perturb.scd_mask(label, 4, 2, 0.3, np.random.default_rng(5),
                             targets=perturb.target_masks(label, 4))
  np.testing.assert_array_equal(by_index, by_mask)
  assert by_index.any()


def test_scd_entry_points_share_one_builder():
  # The epoch table (scd_epoch_bits), augmented batches (scd_batch_bits) and
  # DESIGN's scd_mask all run scd_layout_masks: the same bits for the same
  # (label, k(e), key of (seed, epoch, case)).
  labels = np.stack([_label(), _label()[::-1], np.zeros((40, 40), np.uint8),
                     _label().T])
  spad = types.SimpleNamespace(k0=2, k_gamma=0.01, anchor_ratio=0.3,
                               anchor_patch=0, components=False)
  layout = perturb.scd_label_layout(labels, 4)
  for patch in (0, 3):
    spad.anchor_patch = patch
    for epoch in (0, 70):
      table = perturb.scd_epoch_bits(layout, 9, epoch, spad)
      batch = perturb.scd_batch_bits(labels[::-1], 4, 9, [epoch] * 4,
                                     [3, 2, 1, 0], spad)
      np.testing.assert_array_equal(batch, table[::-1])
      assert table[[0, 1, 3]].any(axis=-1).all() and not table[2].any()
      for i, label in enumerate(labels):
        k = perturb.num_targets(epoch, spad.k0, spad.k_gamma,
                                len(perturb.target_pixels(label, 4)))
        one = perturb.scd_mask(label, 4, k, 0.3, None, anchor_patch=patch,
                               key=perturb.case_keys(9, epoch, i)[0])
        np.testing.assert_array_equal(np.packbits(one), table[i])
  # Without a key, scd_mask draws it from rng: one 64-bit value.
  key = np.random.default_rng(5).bit_generator.random_raw()
  np.testing.assert_array_equal(
      perturb.scd_mask(_label(), 4, 2, 0.3, np.random.default_rng(5)),
      perturb.scd_mask(_label(), 4, 2, 0.3, None, key=key))


def test_batched_masks_equal_single_masks_and_streams_are_independent():
  label = _label()
  targets = perturb.target_pixels(label, 4)
  keys = perturb.case_keys(0, [0] * 6 + [1] * 6, list(range(6)) * 2)
  assert len(set(keys.tolist())) == 12
  ks = [1, 2, 3, 0, 2, 3] * 2
  batch = perturb.scd_masks([targets] * 12, ks, 0.3, keys, label.shape)
  for b in range(12):
    single = perturb.scd_masks([targets], [ks[b]], 0.3, keys[b:b + 1],
                               label.shape)[0]
    np.testing.assert_array_equal(batch[b], single)
  # The bit-packed form the pipeline ships is np.packbits of the same masks,
  # with pixel or patch anchors.
  for patch in (0, 3):
    dense = perturb.scd_masks([targets] * 12, ks, 0.3, keys, label.shape,
                              anchor_patch=patch)
    packed = perturb.scd_masks([targets] * 12, ks, 0.3, keys, label.shape,
                               anchor_patch=patch, packed=True)
    np.testing.assert_array_equal(packed,
                                  np.packbits(dense.reshape(12, -1), axis=-1))
  # Without anchors, each mask is exactly min(k, 3) whole targets, and the
  # choice varies with the key.
  whole = perturb.scd_masks([targets] * 12, ks, 0.0, keys, label.shape)
  choices = set()
  for b in range(12):
    hit = tuple(c for c in (1, 2, 3) if whole[b][label == c].any())
    assert len(hit) == min(ks[b], 3)
    for c in hit:
      assert whole[b][label == c].all()
    assert not whole[b][label == 0].any()
    choices.add(hit)
  assert len(choices) > 3
  # Keys are a pure function of (seed, epoch, case)...
  np.testing.assert_array_equal(keys, perturb.case_keys(
      0, [0] * 6 + [1] * 6, list(range(6)) * 2))
  assert not np.array_equal(keys, perturb.case_keys(1, [0] * 12, range(12)))
  # ...and different keys draw independent anchors: two cases agree on a
  # pixel with probability p^2 + (1-p)^2 (0.58 at p = 0.3).
  full = [[np.arange(200 * 200)]] * 2
  many = perturb.case_keys(5, np.zeros(40, int), np.arange(40))
  fields = [perturb.scd_masks(full, [1, 1], 0.3, many[i:i + 2], (200, 200))
            for i in range(0, 40, 2)]
  agree = np.mean([np.mean(f[0] == f[1]) for f in fields])
  assert abs(agree - 0.58) < 0.01
  # Neighbouring pixels of one mask are independent too.
  beside = np.mean([np.mean(f[:, :, 1:] == f[:, :, :-1]) for f in fields])
  below = np.mean([np.mean(f[:, 1:] == f[:, :-1]) for f in fields])
  assert abs(beside - 0.58) < 0.01 and abs(below - 0.58) < 0.01
  kept = 1 - np.mean(fields)
  assert abs(kept - 0.3) < 4 * np.sqrt(0.21 / (40 * 200 * 200))
