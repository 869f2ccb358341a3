"""Run records: ``train_log.jsonl`` always, TensorBoard scalars and images
through clu's summary writer when TensorFlow and TensorBoard are installed
(GPU machines without them still get the JSONL). TensorFlow is imported
only when a training run makes its writer.

Progress (steps/s, ETA) is ours, not ``clu.periodic_actions.ReportProgress``:
clu's point estimate divides by the wall time since the last report, so a
validation in between (seconds to minutes, plus the sampler's first
compilation: 9 s of a 10 s tiny run measured) lowers the logged steps/s and
inflates the ETA; its ``timed`` sections only report their share. The
convergence bench reads training minutes from the logged rate, so the rate
must exclude validation, which ``Progress.update`` after a validation does.
"""

import json
import os
import time
from typing import Any, Dict, Mapping, Sequence

from absl import logging
from spad_jax import tf_cpu


class QuietLibraries(logging.logging.Filter):
  """Drops INFO chatter of orbax/tensorstore (dozens of lines per checkpoint);
  add it to absl's handler."""

  def filter(self, record):
    noisy = f'{os.sep}orbax{os.sep}' in record.pathname
    return record.levelno >= logging.logging.WARNING or not noisy


class JsonlWriter:
  """Scalars as one JSON line per step, ``{"step", "time", name: value}``;
  images are not written (TensorBoard has them). The file is opened for
  each line rather than held: a tool that replaces it while a run goes on
  (a git checkout or stash of a committed log, a sync) would otherwise
  leave the run writing into the unlinked old file."""

  def __init__(self, path: str):
    self._path = path
    open(path, 'a').close()  # A bad path fails here, not at step 1.

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {'step': int(step), 'time': time.time()}
    row.update({k: float(v) for k, v in scalars.items()})
    with open(self._path, 'a') as f:
      f.write(json.dumps(row) + '\n')

  def write_images(self, step, images):
    del step, images

  def flush(self):
    pass  # Each line is written and closed at once.

  def close(self):
    pass


class Writers:
  """Sends each record to every writer: the part of clu's ``MultiWriter``
  training uses. Not clu's own because ``clu.metric_writers``' package
  ``__init__`` imports TensorFlow (~4 s), which every process that imports
  this module (predict and evaluate too) would then pay."""

  def __init__(self, writers: Sequence[Any]):
    self._writers = list(writers)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step: int, images: Mapping[str, Any]):
    for w in self._writers:
      w.write_images(step, images)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def create_writer(workdir: str, enabled: bool = True) -> Writers:
  """``train_log.jsonl`` + TensorBoard (``<workdir>/tb``) for the process
  that records (process 0); a writer that writes nothing for the others."""
  if not enabled:
    return Writers([])
  writers = [JsonlWriter(os.path.join(workdir, 'train_log.jsonl'))]
  try:
    import tensorboard  # pylint: disable=g-import-not-at-top,unused-import
    tf_cpu.import_tensorflow()  # Before clu's writer imports TensorFlow.
    from clu.metric_writers import summary_writer  # pylint: disable=g-import-not-at-top
    writers.append(summary_writer.SummaryWriter(os.path.join(workdir, 'tb')))
  except ImportError:
    logging.warning('TensorFlow or TensorBoard is not installed: no '
                    'TensorBoard records, train_log.jsonl only.')
  return Writers(writers)


class Progress:
  """Steps/s, images/s and ETA between two log points (see the module
  docstring for why not clu's ReportProgress)."""

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

