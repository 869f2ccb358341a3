"""Training and evaluation batches, from tf.data or a TensorFlow-free loader.

Every training example is a pure function of ``(seed, step, slot)``: the
epoch ``e = step // steps_per_epoch`` picks a permutation of the split
(seeded by ``(seed, e)``), the slot picks the example, and the optional
augmentation and the SPAD masks (built on the augmented label) are drawn from
``(seed, e, example)``. So the data order and masks of a run are
fixed by its config, resuming at any step continues them exactly, and the two
loaders produce identical batches.

Multi-host: each process builds only its slice of every global batch.
Batches come out as ``[local_devices, per_device_batch, ...]`` numpy arrays.
"""

import concurrent.futures
import functools
import threading
import types
from typing import Dict, Iterator

import numpy as np

from spad_jax import perturb
from spad_jax import tf_cpu
from spad_jax.data import augment
from spad_jax.data.sources import Source

Batch = Dict[str, np.ndarray]


_THREAD = threading.local()


def mask_rng(seed: int, epoch: int, idx: int) -> np.random.Generator:
  """The ScD generator of case ``idx`` in ``epoch``: Philox keyed by
  ``(seed, epoch, idx)``, counter at zero.

  Each thread re-keys one generator instead of building a new one (15 us
  a time, which showed in the per-example mask cost), so the result is valid
  until this thread's next call.
  """
  if not hasattr(_THREAD, 'rng'):
    _THREAD.rng = np.random.Generator(np.random.Philox(key=[0, 0]))
  _THREAD.rng.bit_generator.state = {
      'bit_generator': 'Philox',
      'state': {'counter': np.zeros(4, np.uint64),
                'key': np.array([int(seed) & (2**64 - 1),
                                 (int(epoch) << 32) | int(idx)], np.uint64)},
      'buffer': np.zeros(4, np.uint64), 'buffer_pos': 4, 'has_uint32': 0,
      'uinteger': 0}
  return _THREAD.rng


class TrainExamples:
  """The deterministic stream of training examples of one process."""

  def __init__(self, source: Source, config, process_index: int = 0,
               process_count: int = 1, local_device_count: int = 1):
    gb = config.train.batch_size
    if gb % (process_count * local_device_count):
      raise ValueError(
          f'config.train.batch_size = {gb} must be divisible by the number of '
          f'devices ({process_count * local_device_count})')
    if len(source) < gb:
      raise ValueError(f'the training split has {len(source)} cases, fewer '
                       f'than config.train.batch_size = {gb}')
    self.source = source
    self.seed = config.seed
    # A plain namespace: ConfigDict attribute access showed in the
    # per-example cost.
    self.spad = types.SimpleNamespace(**config.spad.to_dict())
    self.num_classes = config.data.num_classes
    self.augment = config.data.augment
    self.augment_on = augment.enabled(config.data.augment)
    self._cache = {}  # Label-derived mask parts per case (see _label_derived).
    self.global_batch = gb
    self.host_batch = gb // process_count
    self.host_offset = process_index * self.host_batch
    self.local_device_count = local_device_count
    self.steps_per_epoch = len(source) // gb  # The last partial batch is dropped.

  @functools.lru_cache(maxsize=4)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 7, epoch]).permutation(
        len(self.source))

  def example_index(self, step: int, slot: int):
    epoch, within = divmod(int(step), self.steps_per_epoch)
    position = within * self.global_batch + self.host_offset + int(slot)
    return epoch, int(self.permutation(epoch)[position])

  def example(self, step: int, slot: int) -> Batch:
    """Image, label and the SPAD mask planes of one example."""
    return self.example_at(*self.example_index(step, slot))

  def example_at(self, epoch: int, idx: int) -> Batch:
    """Case ``idx`` as seen in ``epoch``: augmentation and masks are drawn
    from ``(seed, epoch, idx)``; masks are built on the augmented label."""
    image = self.source.images[idx].astype(np.float32)
    label = self.source.labels[idx]
    if self.augment_on:
      image, label = augment.augment(
          image, label, self.augment,
          np.random.default_rng([self.seed, 13, epoch, idx]))
    spad = self.spad
    targets = self._label_derived(idx, label, 'targets', lambda: (
        perturb.target_pixels(label, self.num_classes, spad.components))
                                  ) if spad.scd else []
    if targets:  # No generator for a label without targets (cheaper).
      k = perturb.num_targets(epoch, spad.k0, spad.k_gamma, len(targets))
      scd = perturb.scd_mask(label, self.num_classes, k, spad.anchor_ratio,
                             mask_rng(self.seed, epoch, idx), targets=targets,
                             anchor_patch=spad.anchor_patch)
    else:
      scd = np.zeros(label.shape, np.uint8)
    if spad.bcd:
      bcd = self._label_derived(idx, label, 'band', lambda: (
          perturb.boundary_band(label, self.num_classes, spad.band_width,
                                spad.canny_low, spad.canny_high,
                                spad.bcd_per_class, spad.bcd_complete)))
    else:
      bcd = np.zeros(label.shape, np.uint8)
    return {'image': image, 'label': label.astype(np.int32), 'scd': scd,
            'bcd': bcd}

  def _label_derived(self, idx: int, label: np.ndarray, name: str, build):
    """``build()`` of a case's label, computed once per case when labels are
    not augmented (the BcD band and ScD targets then never change: caching
    them cut the mask cost per example from ~0.34 to ~0.1 ms at 256²)."""
    if self.augment_on:
      return build()
    key = (name, idx)
    if key not in self._cache:  # Racing threads compute the same value.
      self._cache[key] = build()
    return self._cache[key]

  def host_batch_at(self, step: int) -> Batch:
    """This process's examples of ``step``, stacked ``[host_batch, ...]``."""
    items = [self.example(step, j) for j in range(self.host_batch)]
    return {k: np.stack([it[k] for it in items]) for k in items[0]}

  def to_device_layout(self, batch: Batch) -> Batch:
    d = self.local_device_count
    return {k: v.reshape((d, v.shape[0] // d) + v.shape[1:])
            for k, v in batch.items()}


def numpy_train_batches(examples: TrainExamples, start_step: int,
                        num_steps: int, num_workers: int = 2,
                        prefetch: int = 2) -> Iterator[Batch]:
  """TensorFlow-free loader: a thread pool builds the examples, in order."""
  build = lambda step: examples.to_device_layout(examples.host_batch_at(step))

  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = []
    step = start_step
    while step < num_steps or pending:
      while step < num_steps and len(pending) < max(1, prefetch):
        pending.append(pool.submit(build, step))
        step += 1
      yield pending.pop(0).result()


def tf_train_batches(examples: TrainExamples, start_step: int, num_steps: int,
                     num_workers: int = 2, prefetch: int = 2) -> Iterator[Batch]:
  """tf.data loader: a parallel map over steps, each building its host batch
  (examples and masks) in one ``tf.numpy_function``.

  One call per batch rather than per example: the call's fixed cost, paid
  under the GIL, made the per-example map 2.3x slower with masks on.
  """
  tf = tf_cpu.import_tensorflow()
  hb = examples.host_batch
  h, w, c = examples.source.images.shape[1:]

  def make(step):
    batch = examples.host_batch_at(step)
    return batch['image'], batch['label'], batch['scd'], batch['bcd']

  def mapped(step):
    image, label, scd, bcd = tf.numpy_function(
        make, [step], [tf.float32, tf.int32, tf.uint8, tf.uint8],
        stateful=False)
    image.set_shape((hb, h, w, c))
    for t in (label, scd, bcd):
      t.set_shape((hb, h, w))
    return {'image': image, 'label': label, 'scd': scd, 'bcd': bcd}

  ds = tf.data.Dataset.range(start_step, num_steps)
  ds = ds.map(mapped, num_parallel_calls=max(1, num_workers),
              deterministic=True)
  ds = ds.prefetch(max(1, prefetch))
  # Fixed parallelism and buffer: autotune has nothing to tune, and its
  # model thread sleeps in growing periods that the iterator's destructor
  # waits out. That stalled the end of short runs for up to a minute
  # (measured: 42 s after a 100 s iteration; 0 s with autotune off).
  options = tf.data.Options()
  options.autotune.enabled = False
  ds = ds.with_options(options)
  for batch in ds.as_numpy_iterator():
    yield examples.to_device_layout(batch)


def train_batches(examples: TrainExamples, start_step: int, num_steps: int,
                  config) -> Iterator[Batch]:
  loader = config.data.loader
  if loader == 'tf':
    try:
      tf_cpu.import_tensorflow()
    except ImportError as e:
      raise ImportError('config.data.loader = "tf" needs TensorFlow; install '
                        'it or run with --config.data.loader=numpy') from e
    return tf_train_batches(examples, start_step, num_steps,
                            config.data.num_workers, config.data.prefetch)
  if loader == 'numpy':
    return numpy_train_batches(examples, start_step, num_steps,
                               config.data.num_workers, config.data.prefetch)
  raise ValueError(f'config.data.loader: unknown loader {loader!r}; expected '
                   "'tf' or 'numpy'")


def eval_batches(source: Source, global_batch: int, local_device_count: int,
                 process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
  """The split in order, padded to whole global batches.

  Every process yields the same number of batches (pmap needs it); padded
  slots carry ``valid = False``. ``index`` is the case index in ``source``.
  """
  if global_batch % (process_count * local_device_count):
    raise ValueError(f'config.eval.batch_size = {global_batch} must be '
                     'divisible by the number of devices '
                     f'({process_count * local_device_count})')
  hb = global_batch // process_count
  d = local_device_count
  n = len(source)
  for start in range(0, n, global_batch):
    pos = start + process_index * hb + np.arange(hb)
    valid = pos < n
    idx = np.where(valid, pos, 0)
    batch = {'image': source.images[idx].astype(np.float32),
             'label': source.labels[idx].astype(np.int32),
             'index': idx.astype(np.int32), 'valid': valid}
    yield {k: v.reshape((d, hb // d) + v.shape[1:]) for k, v in batch.items()}
