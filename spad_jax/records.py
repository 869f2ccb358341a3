"""Run records: ``train_log.jsonl`` always, TensorBoard scalars and images when
TensorFlow is installed (GPU machines without it still get the JSONL)."""

import json
import os
import time
from typing import Dict

import numpy as np
from absl import logging

from spad_jax import tf_cpu


class QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of orbax/tensorstore (dozens of lines per checkpoint);
  add it to absl's handler."""

  def filter(self, record):
    noisy = f'{os.sep}orbax{os.sep}' in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


class Records:
  """Writes scalars to ``<workdir>/train_log.jsonl`` and TensorBoard."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    self._jsonl = open(os.path.join(workdir, 'train_log.jsonl'), 'a')
    try:
      import tensorboard  # pylint: disable=g-import-not-at-top,unused-import
      tf = tf_cpu.import_tensorflow()
      self._tf = tf
      self._tb = tf.summary.create_file_writer(os.path.join(workdir, 'tb'))
    except ImportError:
      logging.warning('TensorFlow or TensorBoard is not installed: no '
                      'TensorBoard records, train_log.jsonl only.')

  def scalars(self, step: int, values: Dict[str, float]) -> None:
    if not self.enabled:
      return
    row = {'step': int(step), 'time': time.time()}
    row.update({k: float(v) for k, v in values.items()})
    self._jsonl.write(json.dumps(row) + '\n')
    self._jsonl.flush()
    if self._tb is not None:
      with self._tb.as_default(step=int(step)):
        for k, v in values.items():
          self._tf.summary.scalar(k, float(v))
      self._tb.flush()

  def image(self, step: int, name: str, image: np.ndarray) -> None:
    """``image`` uint8 ``[H, W, 3]`` RGB."""
    if self.enabled and self._tb is not None:
      with self._tb.as_default(step=int(step)):
        self._tf.summary.image(name, image[None])
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


class Progress:
  """Steps/s, images/s and ETA between two log points."""

  def __init__(self, start_step: int, total_steps: int, global_batch: int):
    self.total = total_steps
    self.batch = global_batch
    self._t0 = self._t = time.time()
    self._step0 = self._step = start_step

  def update(self, step: int) -> Dict[str, float]:
    now = time.time()
    rate = (step - self._step) / max(now - self._t, 1e-9)
    overall = (step - self._step0) / max(now - self._t0, 1e-9)
    self._t, self._step = now, step
    eta = (self.total - step) / max(overall, 1e-9)
    return {'steps_per_sec': rate, 'images_per_sec': rate * self.batch,
            'eta_sec': eta}
