"""Training and evaluation batches, from tf.data or a TensorFlow-free loader.

Every training example is a pure function of ``(seed, step, slot)``: the
epoch ``e = step // steps_per_epoch`` picks a permutation of the split
(seeded by ``(seed, e)``), the slot picks the example, and the optional
augmentation and the SPAD masks (built on the augmented label) are drawn from
``(seed, e, example)``. So the data order and masks of a run are
fixed by its config, resuming at any step continues them exactly, and the two
loaders produce identical batches.

The masks are built by ``spad_jax.perturb`` (its docstring walks through
how); this module only schedules that work: which cases and epochs a batch
holds, and what is computed once and kept. Without augmentation the ScD
targets of all cases are laid out once, each epoch's ScD masks of all cases
are one table (computed once, under a lock, half-way through the previous
epoch; the last three kept), and each case's BcD band is computed once; with
augmentation both masks are built per batch from the augmented labels.

Multi-host: each process builds only its slice of every global batch.
Batches come out as ``[local_devices, per_device_batch, ...]`` numpy arrays:
``image`` float32 ``[..., H, W, C]``, ``label`` int32 ``[..., H, W]``, and the
SPAD masks bit-packed, ``scd_bits`` and ``bcd_bits`` uint8
``[..., ceil(H·W/8)]`` (``np.packbits`` of the flattened mask: 1/8 of the
bytes to build, copy and send; the train step unpacks them on the device).
"""

import concurrent.futures
import functools
import threading
import time
import types
from typing import Dict, Iterator

from absl import logging
import numpy as np

from spad_jax import perturb
from spad_jax import tf_cpu
from spad_jax.data import augment
from spad_jax.data.sources import Source

Batch = Dict[str, np.ndarray]


def unpack_mask(bits: np.ndarray, shape) -> np.ndarray:
  """A ``scd_bits``/``bcd_bits`` entry as a uint8 0/1 mask of ``shape``
  (``[..., H, W]``); the train step does the same with ``jnp.unpackbits``."""
  h, w = shape[-2:]
  return np.unpackbits(bits, axis=-1, count=h * w).reshape(shape)


class TrainExamples:
  """The deterministic stream of training examples of one process; the
  masks are ``perturb``'s (see its module docstring for how they are made)."""

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
    n, h, w = source.labels.shape
    self._scd_layout = None  # See scd_table.
    self._scd_tables = {}
    self._scd_lock = threading.Lock()
    if self.spad.scd and not self.augment_on:
      # The ScD targets of every case, once: each epoch's masks of all cases
      # are then a few numpy passes over them (see scd_table).
      start = time.perf_counter()
      self._scd_layout = perturb.scd_label_layout(
          source.labels, self.num_classes, self.spad.components)
      logging.info('ScD targets of %d training cases found in %.1f s.', n,
                   time.perf_counter() - start)
    self._bands = np.zeros((n, (h * w + 7) // 8), np.uint8)  # _band_table.
    self._have_band = np.zeros(n, bool)
    self.global_batch = gb
    self.host_batch = gb // process_count
    self.host_offset = process_index * self.host_batch
    self.local_device_count = local_device_count
    self.steps_per_epoch = len(source) // gb  # The last partial batch is dropped.

  @functools.lru_cache(maxsize=4)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, 7, epoch]).permutation(
        len(self.source))

  def scd_table(self, epoch: int) -> np.ndarray:
    """The bit-packed ScD masks of every case in ``epoch``, ``[N,
    ceil(H·W/8)]`` (labels not augmented; the last three computed are kept).

    One call an epoch: per-batch calls cost ~14 us an example, mostly in
    short numpy calls that hold the GIL (two workers ran no faster than one);
    this costs ~6 us an example. ``host_batch_at`` asks for the next epoch's
    table half-way through this one, so no worker waits for it; the lock
    makes workers that miss together compute it once.
    """
    table = self._scd_tables.get(epoch)
    if table is not None:
      return table
    with self._scd_lock:
      table = self._scd_tables.get(epoch)
      if table is None:
        table = perturb.scd_epoch_bits(self._scd_layout, self.seed, epoch,
                                       self.spad)
        self._scd_tables[epoch] = table
        while len(self._scd_tables) > 3:  # Drop the oldest computed.
          del self._scd_tables[next(iter(self._scd_tables))]
    return table

  def example_index(self, step: int, slot: int):
    epoch, within = divmod(int(step), self.steps_per_epoch)
    position = within * self.global_batch + self.host_offset + int(slot)
    return epoch, int(self.permutation(epoch)[position])

  def example(self, step: int, slot: int) -> Batch:
    """Image, label and the bit-packed SPAD masks of one example."""
    return self.example_at(*self.example_index(step, slot))

  def example_at(self, epoch: int, idx: int) -> Batch:
    """Case ``idx`` as seen in ``epoch`` (see ``examples_at``)."""
    return {k: v[0] for k, v in self.examples_at([epoch], [idx]).items()}

  def host_batch_at(self, step: int) -> Batch:
    """This process's examples of ``step``, stacked ``[host_batch, ...]``."""
    epochs, idxs = zip(*(self.example_index(step, j)
                         for j in range(self.host_batch)))
    batch = self.examples_at(epochs, idxs)
    epoch, within = divmod(int(step), self.steps_per_epoch)
    if self._scd_layout is not None and within == self.steps_per_epoch // 2:
      self.scd_table(epoch + 1)  # Ready before any worker needs it.
    return batch

  def examples_at(self, epochs, idxs) -> Batch:
    """Cases ``idxs`` as seen in ``epochs``, stacked: augmentation and masks
    are drawn from ``(seed, epoch, idx)`` per case, so a case's example does
    not depend on the others; masks are built on the augmented label.

    Built a batch at a time (per-example numpy calls, short and holding the
    GIL, were most of the mask cost); without augmentation the BcD bands
    and the epoch's ScD masks come from per-case tables.
    """
    images, labels = self._images_and_labels(epochs, idxs)
    return {'image': images, 'label': labels.astype(np.int32),
            'scd_bits': self._scd_bits(epochs, idxs, labels),
            'bcd_bits': self._bcd_bits(idxs, labels)}

  def _images_and_labels(self, epochs, idxs):
    """Float32 images and labels of cases ``idxs``, augmented (drawn from
    ``(seed, epoch, idx)``) when augmentation is on."""
    if not self.augment_on:
      return (self.source.images[list(idxs)].astype(np.float32),
              self.source.labels[list(idxs)])
    pairs = [augment.augment(
        self.source.images[i].astype(np.float32), self.source.labels[i],
        self.augment, np.random.default_rng([self.seed, 13, e, i]))
             for e, i in zip(epochs, idxs)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

  def _scd_bits(self, epochs, idxs, labels) -> np.ndarray:
    """Bit-packed ScD masks: rows of the epoch tables, or built on the
    augmented labels."""
    if not self.spad.scd:
      return np.zeros((len(idxs), (labels[0].size + 7) // 8), np.uint8)
    if self.augment_on:
      return perturb.scd_batch_bits(labels, self.num_classes, self.seed,
                                    epochs, idxs, self.spad)
    return np.stack([self.scd_table(e)[i] for e, i in zip(epochs, idxs)])

  def _bcd_bits(self, idxs, labels) -> np.ndarray:
    """Bit-packed BcD bands: rows of the band table, or built on the
    augmented labels."""
    if not self.spad.bcd:
      return np.zeros((len(idxs), (labels[0].size + 7) // 8), np.uint8)
    if self.augment_on:
      return np.stack([perturb.band_bits(l, self.num_classes, self.spad)
                       for l in labels])
    return self._band_table(idxs, labels)[list(idxs)]

  def _band_table(self, idxs, labels) -> np.ndarray:
    """``[N, H·W/8]`` bit-packed BcD bands of the (unaugmented) cases,
    filled in as cases come."""
    for i, l in zip(idxs, labels):
      if not self._have_band[i]:  # Racing threads write the same row.
        self._bands[i] = perturb.band_bits(l, self.num_classes, self.spad)
        self._have_band[i] = True
    return self._bands

  def to_device_layout(self, batch: Batch) -> Batch:
    d = self.local_device_count
    return {k: v.reshape((d, v.shape[0] // d) + v.shape[1:])
            for k, v in batch.items()}


def numpy_train_batches(examples: TrainExamples, start_step: int,
                        num_steps: int, num_workers: int = 2,
                        prefetch: int = 2) -> Iterator[Batch]:
  """TensorFlow-free loader: a thread pool builds the examples, in order.

  Like tf.data's parallel map followed by ``prefetch``, up to ``num_workers
  + prefetch`` batches are in flight, so a slow batch (the one that draws
  the next epoch's ScD masks) does not leave the other workers idle.
  """
  build = lambda step: examples.to_device_layout(examples.host_batch_at(step))
  workers = max(1, num_workers)

  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = []
    step = start_step
    while step < num_steps or pending:
      while step < num_steps and len(pending) < workers + max(0, prefetch):
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

  keys = ('image', 'label', 'scd_bits', 'bcd_bits')
  dtypes = (tf.float32, tf.int32, tf.uint8, tf.uint8)
  shapes = ((hb, h, w, c), (hb, h, w)) + 2 * ((hb, (h * w + 7) // 8),)

  def make(step):
    batch = examples.host_batch_at(step)
    return tuple(batch[k] for k in keys)

  def mapped(step):
    outs = tf.numpy_function(make, [step], dtypes, stateful=False)
    for t, shape in zip(outs, shapes):
      t.set_shape(shape)
    return dict(zip(keys, outs))

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
