"""SPAD: the training-time perturbation of the conditioning image (DESIGN §2).

This module is the whole algorithm, from a label map to the perturbed image
(in one file, ≈480 lines with this walkthrough, so it reads top-down);
``data/pipeline.py`` only schedules it (which cases and epochs a batch
holds, when an epoch's masks are computed and how long they are kept) and
``train.py`` applies the merge. How the masks of a training batch are made:

1. **ScD targets.** ``target_pixels`` lists the targets of a label: each
   foreground class present (``spad.components``: each 8-connected component
   of one), as flat pixel indices. ``scd_layout`` lays out the targets of
   many labels for the builder (``ScdLayout``); ``scd_label_layout`` does
   both. Without augmentation the pipeline builds one layout of all training
   cases, once a run.
2. **How many targets.** ``num_targets`` is ``k(e) = min(#targets, max(1,
   round(K0 / (1 + γ·e))))``; ``max_targets`` is the same before the min,
   which the builder takes with each case's own count.
3. **Randomness.** ``case_keys(seed, epochs, cases)`` gives one 64-bit key
   per (seed, epoch, case). Every random choice of that case's mask is a
   counter-based hash of its key (``stream_values``), not a generator's
   state: which ``k`` targets (``_chosen_targets``: those with the smallest
   values), the grid offset of anchor patches, and the anchors themselves
   (``_anchor_draws``: a keyed multiply-add of each pixel's fixed
   ``anchor_hashes``). So a mask is a pure function of (label, seed, epoch,
   case): batching, worker threads, hosts and resuming change nothing.
4. **The ScD builder.** ``scd_layout_masks`` makes ``M_s`` of every example
   of a layout: the non-anchor pixels of its chosen targets, bit-packed on
   request (``np.packbits`` of the flattened mask: what batches carry, 1/8
   of the bytes). Its callers differ only in where the layout and keys come
   from: ``scd_epoch_bits`` (one epoch of all cases of the run's layout: the
   pipeline's epoch table), ``scd_batch_bits`` (a batch of augmented labels,
   laid out on the spot), ``scd_masks`` (given targets, ``k`` and keys) and
   ``scd_mask`` (the DESIGN contract: one label, one key). They agree bit
   for bit.
5. **BcD.** ``boundary_band`` (the DESIGN contract): Canny on the label map
   spread over 0..255 (``spread_labels``; or per class), completed with
   ``transition_pixels``, dilated to ``width``. ``band_bits`` is the packed
   band with the config's settings (label only: the pipeline caches it per
   case without augmentation).
6. **In the train step** (jnp): ``union_mask`` ORs and unpacks the two
   packed masks, ``sigma_at`` is ``σ(e)`` (``pas_sigma``, or ``σ0`` with PaS
   off), and ``perturb_image`` adds ``σ(e)·ε ⊙ (M_s ∪ M_b)``, ``ε ~ N(0, 1)``
   from the step's PRNG key.

With ``spad.scd`` or ``spad.bcd`` off (the ablation arms) the pipeline ships
that mask all zero and calls nothing here for it.

The masks are plain numpy/OpenCV, so the same code serves tf.data (through
``tf.numpy_function``) and the TensorFlow-free loader. The schedules accept
Python numbers (host side) and traced JAX values (inside the train step).
``spad_cfg`` arguments are ``config.spad`` or any object with its fields.
"""

from typing import NamedTuple, Optional, Tuple

import cv2
import jax
import jax.numpy as jnp
import numpy as np

# --- Schedules: σ(e) and k(e) -------------------------------------------------


def _is_traced(*values) -> bool:
  for v in values:
    if isinstance(v, jax.Array):
      return True
  return False


def pas_sigma(epoch, sigma0: float, lam: float):
  """Progress-aware noise std ``σ(e) = σ0 / (1 + λ·e)``."""
  if _is_traced(epoch, sigma0, lam):
    return sigma0 / (1.0 + lam * jnp.asarray(epoch, jnp.float32))
  return float(sigma0) / (1.0 + float(lam) * float(epoch))


def sigma_at(epoch, spad_cfg):
  """σ(e) (PaS) or the constant σ0 when PaS is off, from ``config.spad``; a
  Python float for a Python epoch (host side), traced inside the train step."""
  if spad_cfg.pas:
    return pas_sigma(epoch, spad_cfg.sigma0, spad_cfg.pas_lambda)
  return float(spad_cfg.sigma0)


def num_targets(epoch, k0: float, gamma: float, n_available):
  """``k(e) = min(#targets, max(1, round(K0 / (1 + γ·e))))``; 0 with no targets.

  Rounding is half-to-even (Python's ``round`` and jnp agree).
  """
  if _is_traced(epoch, k0, gamma, n_available):
    k = jnp.maximum(1, jnp.round(k0 / (1.0 + gamma * jnp.asarray(
        epoch, jnp.float32))).astype(jnp.int32))
    return jnp.minimum(jnp.asarray(n_available, jnp.int32), k)
  k = max(1, round(float(k0) / (1.0 + float(gamma) * float(epoch))))
  return min(int(n_available), k)


def max_targets(epoch: int, spad_cfg) -> int:
  """``k(e)`` of an unlimited number of targets, from ``config.spad``: what
  the training path passes to ``scd_layout_masks``, which takes the min with
  each label's own count (as ``num_targets`` does)."""
  return num_targets(epoch, spad_cfg.k0, spad_cfg.k_gamma, 2**31)


# --- ScD targets --------------------------------------------------------------


def target_masks(label: np.ndarray, num_classes: int,
                 components: bool = False) -> list:
  """Boolean masks of the ScD targets in ``label`` ``[H, W]``.

  A target is a foreground class present in the label or, with
  ``components=True``, each 8-connected component of one.
  """
  targets = []
  for c in range(1, num_classes):
    cls = label == c
    if not cls.any():
      continue
    if not components:
      targets.append(cls)
      continue
    n, comp = cv2.connectedComponents(cls.astype(np.uint8), connectivity=8)
    targets.extend(comp == i for i in range(1, n))
  return targets


def target_pixels(label: np.ndarray, num_classes: int,
                  components: bool = False) -> list:
  """The ScD targets of ``label`` as flat pixel indices (intp arrays), the
  compact form ``scd_layout`` takes."""
  return [np.flatnonzero(t) for t in target_masks(label, num_classes,
                                                  components)]


# --- Keys and hashed draws ----------------------------------------------------
# Counter-based random values, vectorised over a whole batch. Value ``n`` of
# stream ``key`` is ``mix64(key ^ n·γ)``: SplitMix64's mixer on a Weyl
# sequence (Steele et al. 2014). As a pure function of (key, n), a draw does
# not depend on which others are drawn with it, so one call serves a batch:
# a numpy generator per example cost ~18 us of Python per example at 256².
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
# Streams of one key, kept apart by xoring these into it.
_PIXELS, _CHOICE, _OFFSET = (np.uint64(0xA5C4), np.uint64(0x5CD1),
                             np.uint64(0x0FF5E7))


def mix64(x) -> np.ndarray:
  """SplitMix64's finaliser of uint64 values (wraps modulo 2**64)."""
  x = np.array(x, np.uint64, ndmin=1)  # A copy: the steps work in place.
  x ^= x >> _S30
  x *= _M1
  x ^= x >> _S27
  x *= _M2
  x ^= x >> _S31
  return x


def stream_values(keys, counters) -> np.ndarray:
  """Uniform uint64 values number ``counters`` of streams ``keys``."""
  x = np.multiply(np.asarray(counters), _GAMMA, dtype=np.uint64,
                  casting='unsafe')
  x ^= np.asarray(keys, np.uint64)
  return mix64(x)


def case_keys(seed: int, epochs, indices) -> np.ndarray:
  """The ScD stream key of each (seed, epoch, case index): uint64 array.

  A bijection of (epoch, index) for each seed (epochs and indices < 2**32).
  """
  e = np.asarray(epochs, np.uint64).reshape(-1)
  i = np.asarray(indices, np.uint64).reshape(-1)
  return mix64(mix64(int(seed) & (2**64 - 1)) ^ (e << np.uint64(32) | i))


def anchor_hashes(cells) -> np.ndarray:
  """Fixed odd 32-bit hashes of pixel (or anchor cell) indices.

  An anchor draw is ``a·hash + b mod 2**32``, with ``a`` odd and ``b`` the
  two halves of the key of (seed, epoch, case): keyed multiply-add hashing
  (Dietzfelbinger 1996), uniform for every hash through ``b``, one 32-bit
  multiply-add a pixel instead of a full 64-bit mix (the cost that showed:
  the pipeline draws every case's anchors once an epoch). The hashes depend
  on the pixel only, so ``ScdLayout`` holds them.
  """
  return ((stream_values(_PIXELS, cells) >> np.uint64(32)).astype(np.uint32)
          | np.uint32(1))


# --- The ScD builder ----------------------------------------------------------


class ScdLayout(NamedTuple):
  """The ScD targets of a batch of labels, laid out for ``scd_layout_masks``.

  Every byte of the bit-packed masks ``[B, ceil(H·W/8)]`` (``np.packbits``
  order) that holds a target pixel gets 8 slots, one per pixel: its index in
  its image, target (-1: none) and ``anchor_hashes``. One epoch's masks of
  all cases are then a few numpy passes over the slots and one
  ``np.packbits``, with no per-pixel scatter (``np.add.at`` holds the GIL).
  Labels only: the input pipeline builds one for all training cases.
  """
  shape: Tuple[int, int]
  n_targets: np.ndarray  # [B]: targets per example.
  target_rows: np.ndarray  # [T]: the example of each target.
  slots_per_row: np.ndarray  # [B].
  slot_pixel: np.ndarray  # [S] int32.
  slot_target: np.ndarray  # [S] int32, -1 where no target.
  in_target: np.ndarray  # [S] bool: slot_target >= 0.
  hashes: np.ndarray  # [S] uint32.
  byte: np.ndarray  # [S / 8] intp, flat index into [B, ceil(H·W/8)].
def scd_layout(targets: list, shape) -> ScdLayout:
  """``ScdLayout`` of ``targets[b]``, the targets of example ``b`` (flat
  pixel indices or boolean masks, disjoint), in images of ``shape``."""
  h, w = shape
  size = (h * w + 7) // 8
  runs = [(b, np.flatnonzero(t) if t.dtype.kind == 'b' else t)
          for b, example in enumerate(targets) for t in example]
  target_rows = np.array([b for b, _ in runs], np.intp)
  counts = np.array([p.size for _, p in runs], np.intp)
  pixels = (np.concatenate([p for _, p in runs]).astype(np.intp) if runs
            else np.zeros(0, np.intp))
  byte_of_pixel = np.repeat(target_rows * size, counts) + (pixels >> 3)
  byte = np.unique(byte_of_pixel)
  # int32 where it can: the layout lives as long as the run.
  slot_target = np.full(byte.size * 8, -1, np.int32)
  slot_target[np.searchsorted(byte, byte_of_pixel) * 8 + (pixels & 7)] = (
      np.repeat(np.arange(len(runs)), counts))
  slot_pixel = ((byte % size * 8)[:, None] + np.arange(8)).reshape(-1).astype(
      np.int32)
  return ScdLayout(
      (h, w), np.array([len(t) for t in targets], np.intp), target_rows,
      8 * np.bincount(byte // size, minlength=len(targets)), slot_pixel,
      slot_target, slot_target >= 0, anchor_hashes(slot_pixel), byte)



def scd_layout_masks(layout: ScdLayout, ks, anchor_ratio: float, keys,
                     anchor_patch: int = 0,
                     packed: bool = False) -> np.ndarray:
  """Semantic-concentrated masks ``M_s`` of the layout's examples: uint8 0/1
  ``[B, H, W]``, or with ``packed`` ``np.packbits`` of each flattened mask,
  ``[B, ceil(H·W/8)]`` (what the input pipeline ships: 1/8 of the bytes).

  Example ``b`` chooses ``min(ks[b], #targets)`` of its targets at random;
  inside each, every pixel (or every cell of a randomly offset
  ``anchor_patch``-pixel grid) is kept as an anchor with probability
  ``anchor_ratio`` (quantised to 1/2**32: 0 and 1 are exact); the mask covers
  the non-anchor pixels of the chosen targets. Draws come from ``keys[b]``
  (uint64, ``case_keys``) alone, so each mask is a pure function of its own
  (targets, k, key): batching changes nothing.
  """
  (h, w), n = layout.shape, len(layout.n_targets)
  size = (h * w + 7) // 8 if packed else h * w
  out = np.zeros((n, size), np.uint8)
  threshold = int(round(float(anchor_ratio) * 2**32))
  if not layout.byte.size or threshold >= 2**32:  # No pixel is masked.
    return out if packed else out.reshape((n, h, w))
  keys = np.asarray(keys, np.uint64).reshape(-1)
  masked = _anchor_draws(layout, keys, anchor_patch) >= np.uint32(threshold)
  ks = np.asarray(ks, np.intp).reshape(-1)
  if (ks < layout.n_targets).any():
    # Chosen targets, and False (index -1) for slots outside every target.
    chosen = np.append(_chosen_targets(layout, ks, keys), False)
    masked &= chosen[layout.slot_target]
  else:
    masked &= layout.in_target
  if packed:
    out.reshape(-1)[layout.byte] = np.packbits(masked)
  else:
    rows = np.repeat(np.arange(n), layout.slots_per_row)
    out.reshape(-1)[(rows * size + layout.slot_pixel)[masked]] = 1
  return out if packed else out.reshape((n, h, w))


def _anchor_draws(layout: ScdLayout, keys: np.ndarray,
                  anchor_patch: int) -> np.ndarray:
  """Uniform uint32 draw of every slot: ``(key_lo | 1)·hash + key_hi mod
  2**32`` of its example's key and its pixel's (or anchor cell's) hash. A
  pixel is an anchor where the draw is below ``anchor_ratio·2**32``."""
  w = layout.shape[1]
  if anchor_patch > 1:
    # Pixel (y, x) lies in cell ((y + oy) // p, (x + ox) // p) of a grid
    # offset by a random (oy, ox) per example.
    p = int(anchor_patch)
    oy, ox = (np.repeat((stream_values(keys ^ _OFFSET, c) % np.uint64(p))
                        .astype(np.intp), layout.slots_per_row)
              for c in (0, 1))
    y, x = np.divmod(layout.slot_pixel, w)
    hashes = anchor_hashes((y + oy) // p * (w // p + 2) + (x + ox) // p)
  else:
    hashes = layout.hashes
  draws = np.repeat(keys.astype(np.uint32) | np.uint32(1),
                    layout.slots_per_row)
  draws *= hashes
  draws += np.repeat((keys >> np.uint64(32)).astype(np.uint32),
                     layout.slots_per_row)
  return draws


def _chosen_targets(layout: ScdLayout, ks, keys) -> np.ndarray:
  """Whether each target is among the ``ks[b]`` of its example with the
  smallest random values: ``[T]`` bool."""
  rows = layout.target_rows
  first = np.cumsum(layout.n_targets) - layout.n_targets
  ordinal = np.arange(rows.size) - first[rows]
  values = stream_values(keys[rows] ^ _CHOICE, ordinal)
  order = np.lexsort((values, rows))  # By example, then value.
  rank = np.empty(rows.size, np.intp)
  rank[order] = ordinal
  return rank < ks[rows]


# --- ScD masks: the training path and the contract view -----------------------
# All call scd_layout_masks; they differ in where the layout and keys come
# from.


def scd_label_layout(labels, num_classes: int,
                     components: bool = False) -> ScdLayout:
  """``scd_layout`` of the ``target_pixels`` of each of ``labels``
  ``[B, H, W]``: row ``b`` is ``labels[b]``."""
  return scd_layout([target_pixels(l, num_classes, components)
                     for l in labels], np.shape(labels)[1:])


def scd_epoch_bits(layout: ScdLayout, seed: int, epoch: int,
                   spad_cfg) -> np.ndarray:
  """The bit-packed ScD masks of every case in ``epoch``, ``[N,
  ceil(H·W/8)]``: row ``i`` of ``layout`` is case ``i``, keyed ``case_keys(
  seed, epoch, i)``, with ``max_targets(epoch)`` targets (the pipeline's
  epoch table, labels not augmented)."""
  n = len(layout.n_targets)
  return scd_layout_masks(
      layout, [max_targets(epoch, spad_cfg)] * n, spad_cfg.anchor_ratio,
      case_keys(seed, np.full(n, epoch), np.arange(n)),
      spad_cfg.anchor_patch, packed=True)


def scd_batch_bits(labels, num_classes: int, seed: int, epochs, cases,
             spad_cfg) -> np.ndarray:
  """The bit-packed ScD masks of ``labels`` ``[B, H, W]``, ``labels[b]``
  being case ``cases[b]`` in ``epochs[b]`` (augmented: its targets are found
  here). The same bits as ``scd_epoch_bits`` for unaugmented labels."""
  return scd_masks(
      [target_pixels(l, num_classes, spad_cfg.components) for l in labels],
      [max_targets(e, spad_cfg) for e in epochs], spad_cfg.anchor_ratio,
      case_keys(seed, epochs, cases), np.shape(labels)[1:],
      spad_cfg.anchor_patch, packed=True)


def scd_masks(targets: list, ks, anchor_ratio: float, keys, shape,
              anchor_patch: int = 0, packed: bool = False) -> np.ndarray:
  """``scd_layout_masks`` of ``scd_layout(targets, shape)``: ``targets[b]``
  are the targets of example ``b`` (flat pixel indices or boolean masks,
  disjoint), ``keys[b]`` its stream key."""
  return scd_layout_masks(scd_layout(targets, shape), ks, anchor_ratio, keys,
                          anchor_patch, packed)


def scd_mask(label: np.ndarray, num_classes: int, k: int, anchor_ratio: float,
             rng: Optional[np.random.Generator], components: bool = False,
             targets: Optional[list] = None, anchor_patch: int = 0,
             key=None) -> np.ndarray:
  """Semantic-concentrated mask ``M_s`` of one label (uint8 0/1, its shape).

  ``scd_masks`` of a one-example layout, whose stream key is ``key`` or, by
  default, one 64-bit draw of ``rng``. With ``key = case_keys(seed, epoch,
  case)`` and ``k = num_targets(epoch, ...)`` it is that case's training
  mask, unpacked. ``targets`` (from ``target_pixels`` or ``target_masks``)
  skips finding them again.
  """
  if targets is None:
    targets = target_pixels(label, num_classes, components)
  if key is None:
    key = np.uint64(rng.bit_generator.random_raw())
  return scd_masks([targets], [k], anchor_ratio, [key], label.shape,
                   anchor_patch)[0]


# --- BcD ----------------------------------------------------------------------


def spread_labels(label: np.ndarray, num_classes: int) -> np.ndarray:
  """Maps class indices to grey values spread evenly over 0..255."""
  step = 255 // max(1, num_classes - 1)
  lut = np.minimum(np.arange(256) * step, 255).astype(np.uint8)
  return cv2.LUT(label.astype(np.uint8, copy=False), lut)


def transition_pixels(label: np.ndarray) -> np.ndarray:
  """Pixels whose right or lower neighbour has another class (bool).

  This is the side OpenCV's Canny marks on a label step, so adding these
  pixels to Canny's edges keeps the line one pixel wide.
  """
  out = np.zeros(label.shape, bool)
  out[:, :-1] |= label[:, :-1] != label[:, 1:]
  out[:-1] |= label[:-1] != label[1:]
  return out


def boundary_band(label: np.ndarray, num_classes: int, width: int,
                  low: float = 100.0, high: float = 200.0,
                  per_class: bool = False,
                  complete: bool = True) -> np.ndarray:
  """Boundary-centralized mask ``M_b`` (uint8 0/1).

  Canny with the given thresholds on the label map spread over 0..255, then
  dilation with a ``width``×``width`` square so the band is ``width`` pixels
  across, centred on the detected edges.

  Canny's non-maximum suppression drops a few transition pixels of label
  maps (1-pixel holes, junctions, corners, the image border: ~1-2 % on Duke
  DME labels), so ``complete=True`` (default) adds ``transition_pixels``
  to its edges: with ``width >= 2`` the band then covers both pixels of
  every class transition and still lies within ``width // 2 + 1`` of one.

  With many classes the grey step between adjacent classes gets too small
  for high thresholds (for 100/200: K >= 16 finds no edge at all), so
  ``per_class=True`` runs Canny on each present class's binary map (full
  contrast) and unites the edges: every class transition is then found.
  ``spread_sees_all_transitions`` tells whether the plain mode suffices.
  """
  if per_class:
    edges = np.zeros(label.shape, np.uint8)
    for c in np.unique(label):
      edges |= cv2.Canny(np.where(label == c, 255, 0).astype(np.uint8), low,
                         high)
  else:
    edges = cv2.Canny(spread_labels(label, num_classes), low, high)
  if complete:
    edges[transition_pixels(label)] = 255
  if width > 1:
    edges = cv2.dilate(edges, np.ones((width, width), np.uint8))
  return (edges > 0).astype(np.uint8)


def spread_sees_all_transitions(num_classes: int, low: float,
                                high: float) -> bool:
  """Whether Canny on the spread label map detects a step between two
  adjacent classes (the smallest grey step) with these thresholds."""
  strip = np.zeros((16, 16), np.uint8)
  strip[:, 8:] = 1
  return bool(cv2.Canny(spread_labels(strip, num_classes), low, high).any())


def band_bits(label: np.ndarray, num_classes: int, spad_cfg) -> np.ndarray:
  """``np.packbits`` of the flattened ``boundary_band`` of ``label`` with the
  settings of ``config.spad``: a batch's ``bcd_bits`` row."""
  return np.packbits(boundary_band(
      label, num_classes, spad_cfg.band_width, spad_cfg.canny_low,
      spad_cfg.canny_high, spad_cfg.bcd_per_class, spad_cfg.bcd_complete))


# --- The merge, in the train step (jnp) ---------------------------------------


def union_mask(scd_bits: jnp.ndarray, bcd_bits: jnp.ndarray,
               shape) -> jnp.ndarray:
  """``M_s ∪ M_b`` (uint8 0/1, ``shape`` = ``[..., H, W]``) from the
  pipeline's bit-packed masks ``[..., ceil(H·W/8)]``: OR, then unpack (in the
  train step, on the device)."""
  h, w = shape[-2:]
  return jnp.unpackbits(scd_bits | bcd_bits, axis=-1,
                        count=h * w).reshape(shape)


def perturb_image(image: jnp.ndarray, mask: jnp.ndarray, sigma,
                  key: jax.Array) -> jnp.ndarray:
  """``Ĩ = I + σ·ε ⊙ M`` with one ``ε ~ N(0, 1)`` draw per pixel and channel.

  ``image`` is ``[..., H, W, C]``, ``mask`` ``[..., H, W]`` (the union
  ``M_s ∪ M_b``); ``sigma`` a scalar or broadcastable to ``[...]``.
  """
  eps = jax.random.normal(key, image.shape, jnp.float32)
  sigma = jnp.asarray(sigma, jnp.float32)
  sigma = sigma.reshape(sigma.shape + (1,) * (image.ndim - sigma.ndim))
  m = mask.astype(jnp.float32)[..., None]
  return (image.astype(jnp.float32) + sigma * eps * m).astype(image.dtype)
