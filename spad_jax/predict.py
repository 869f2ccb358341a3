"""``--mode=predict``: segment a folder of images with a trained workdir.

For every image ``<stem>.<ext>`` (``IMAGE_EXTENSIONS``) directly inside the
input folder (no labels needed), writes into the output folder:

  <stem>_label.png        uint8 class index per pixel, at the input's size
  <stem>_overlay.png      the class colours blended over the image
  <stem>_uncertainty.png  per-pixel entropy of the ensemble of
                          ``eval.num_samples`` samples, 0 (black) .. log K
                          (yellow) in the inferno colour map
  <stem>_entropy.npy      that entropy in nats, float32 (``save_npy``)

and appends one JSON line per run to ``predict_log.jsonl`` (checkpoint step,
sampling settings, counts, timing, unreadable files). With
``eval.chain_label='auto'`` the chains' label is first picked on the
validation split of the config's data set, which must be readable.

Images go through the training preprocessing (``folder.read_image``, resize
to ``data.image_size``², scale to [-1, 1]) in batches of ``eval.batch_size``
(or all images, when fewer), the last one padded: one shape, so one
compilation per run whatever the sizes of the inputs.
The ensemble's soft map is resized bilinearly to the input's size and its
argmax is the label (smoother than upsampling the labels); the entropy is
resized bilinearly. Unreadable files are reported and skipped; an input
whose outputs exist is skipped unless ``overwrite``.
"""

import dataclasses
import json
import os
import time
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import cv2
import jax
import numpy as np

from spad_jax import evaluate
from spad_jax import files
from spad_jax import formatting
from spad_jax import predictors
from spad_jax import train_state
from spad_jax import visualize
from spad_jax.data import corruptions
from spad_jax.data import folder

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.nii',
                    '.nii.gz')


def split_name(path: str) -> Tuple[str, str]:
  """(stem, extension) of a file name; ``.nii.gz`` counts as one."""
  name = os.path.basename(path)
  if name.lower().endswith('.nii.gz'):
    return name[:-7], name[-7:].lower()
  stem, ext = os.path.splitext(name)
  return stem, ext.lower()
OUTPUTS = ('label', 'overlay', 'uncertainty')


@dataclasses.dataclass
class Summary:
  written: List[str] = dataclasses.field(default_factory=list)
  skipped: List[str] = dataclasses.field(default_factory=list)  # Outputs exist.
  failed: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
  seconds: float = 0.0
  first_batch_seconds: float = 0.0  # Includes the one compilation.
  images_per_sec: Optional[float] = None  # After the first batch, if any.

  def as_dict(self) -> Dict:
    d = dataclasses.asdict(self)
    d['failed'] = [{'path': p, 'error': e} for p, e in self.failed]
    return d


def list_inputs(input_dir: str) -> Tuple[List[str], List[str]]:
  """Image files directly in ``input_dir`` (sorted) and the other files."""
  images, other = [], []
  for name in sorted(os.listdir(input_dir)):
    path = os.path.join(input_dir, name)
    if name.startswith('.') or not os.path.isfile(path):
      continue
    (images if split_name(name)[1] in IMAGE_EXTENSIONS
     else other).append(path)
  return images, other


def output_paths(output_dir: str, input_path: str,
                 save_npy: bool) -> Dict[str, str]:
  stem = split_name(input_path)[0]
  out = {k: os.path.join(output_dir, f'{stem}_{k}.png') for k in OUTPUTS}
  if save_npy:
    out['entropy'] = os.path.join(output_dir, f'{stem}_entropy.npy')
  return out


def model_input(image01: np.ndarray, size: int) -> np.ndarray:
  """``[H, W, C]`` in [0, 1] to the model's ``[size, size, C]`` in [-1, 1].

  Resized by ``folder.resize_pair`` (its label slot unused) and rounded to
  float16 like ``sources.Source``, so an exported training or test image
  reaches the model exactly as in training.
  """
  image = folder.resize_pair(image01, np.zeros(image01.shape[:2], np.uint8),
                             size)[0]
  return (image * 2.0 - 1.0).astype(np.float16).astype(np.float32)


def to_original(soft: np.ndarray, entropy: np.ndarray,
                size_hw: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """Model-resolution soft map ``[s, s, K]`` and entropy ``[s, s]`` to the
  input's size: ``(label uint8 [H, W], entropy float32 [H, W])``."""
  wh = (int(size_hw[1]), int(size_hw[0]))  # OpenCV's order.
  soft = cv2.resize(soft.astype(np.float32), wh, interpolation=cv2.INTER_LINEAR)
  entropy = cv2.resize(entropy.astype(np.float32), wh,
                       interpolation=cv2.INTER_LINEAR)
  return np.argmax(soft, axis=-1).astype(np.uint8), np.maximum(entropy, 0)


def _png(array: np.ndarray) -> bytes:
  ok, buf = cv2.imencode('.png', array)
  if not ok:
    raise OSError(f'could not encode a PNG of shape {array.shape}')
  return buf.tobytes()


def write_outputs(paths: Dict[str, str], display01: np.ndarray,
                  label: np.ndarray, entropy: np.ndarray,
                  num_classes: int) -> None:
  """The files of one input; ``display01`` is the image read, in [0, 1]."""
  rgb = visualize.gray_rgb(display01[..., :3] * 2.0 - 1.0)
  files.write_atomic(paths['label'], _png(label))
  files.write_atomic(paths['overlay'], _png(
      visualize.overlay_rgb(rgb, label, num_classes)[..., ::-1]))
  files.write_atomic(paths['uncertainty'], _png(
      visualize.uncertainty_rgb(entropy, num_classes)[..., ::-1]))
  if 'entropy' in paths:
    files.write_npy(paths['entropy'], entropy.astype(np.float32))


def batch_size(config, num_images: int, devices: int) -> int:
  """``eval.batch_size``, or fewer when there are fewer images (rounded up to
  the devices), so a small folder is not padded to a large batch."""
  gb = config.eval.batch_size
  if gb % devices:
    raise ValueError(f'config.eval.batch_size = {gb} must be divisible by the '
                     f'number of devices ({devices})')
  return min(gb, -(-num_images // devices) * devices)


def read_batches(paths: Sequence[str], config, summary: Summary, gb: int,
                 devices: int) -> Iterator[Dict]:
  """Batches of ``gb`` readable images, padded, split over the devices.

  Unreadable files go to ``summary.failed`` and are skipped. Each batch has
  ``image`` ``[devices, gb/devices, s, s, C]``, ``case_ids`` (the file
  stems' ``predictors.case_key_ids``), ``valid`` and ``items`` (the path and
  the image as read, for the outputs).
  """
  size, channels = config.data.image_size, config.data.channels
  corruption, severity = config.eval.corruption, config.eval.severity

  def flush(items):
    batch = np.zeros((gb, size, size, channels), np.float32)
    for i, (path, image) in enumerate(items):
      batch[i] = model_input(image, size)
      if corruption != 'none':  # The same code, seeds, rounding as evaluate.
        stem = os.path.splitext(os.path.basename(path))[0]
        batch[i] = corruptions.corrupt_model_images(
            batch[i][None].astype(np.float16), [stem], corruption, severity,
            config.seed)[0]
    ids = np.zeros(gb, np.int32)  # Padding slots: any id.
    ids[:len(items)] = predictors.case_key_ids(
        [os.path.splitext(os.path.basename(p))[0] for p, _ in items])
    return {'image': batch.reshape((devices, gb // devices) + batch.shape[1:]),
            'case_ids': ids.reshape(devices, gb // devices),
            'valid': np.arange(gb) < len(items), 'items': items}

  items = []
  for path in paths:
    try:
      items.append((path, folder.read_image(path, channels)))
    except (folder.DataError, OSError) as e:
      logging.error('skipping %s', e)
      summary.failed.append((path, str(e)))
    if len(items) == gb:
      yield flush(items)
      items = []
  if items:
    yield flush(items)


def predict_paths(config, setup, params, paths: Sequence[str], output_dir: str,
                  overwrite: bool = False, save_npy: bool = False,
                  predict_fn=None) -> Summary:
  """Predicts ``paths`` with ``params`` (unreplicated) into ``output_dir``.

  ``predict_fn`` (from ``predictors.make_predict_fn``) may be passed to reuse
  its compilation across calls.
  """
  k = config.data.num_classes
  devices = jax.local_device_count()
  summary = Summary()
  os.makedirs(output_dir, exist_ok=True)
  todo = _select_inputs(paths, output_dir, overwrite, save_npy, summary)
  if (config.eval.num_samples < 2 and
      config.model.kind == 'diffusion'):
    logging.warning('eval.num_samples = 1: the uncertainty maps are all zero; '
                    'pass e.g. --config.eval.num_samples=8 for an ensemble.')
  if not todo:
    return summary

  predict_fn = predict_fn or predictors.cached(config, setup)
  params = train_state.replicate(params)
  key = setup.keys()[2]
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  failed_before = len(summary.failed)
  start = time.time()
  first = None  # (time, images written) when the first batch was done.

  def finish(batch, out):
    nonlocal first
    out = jax.device_get(out)
    soft, entropy = flat(out['soft']), flat(out['entropy'])
    for i, (path, image) in enumerate(batch['items']):
      label, ent = to_original(soft[i], entropy[i], image.shape[:2])
      write_outputs(output_paths(output_dir, path, save_npy), image, label,
                    ent, k)
      summary.written.append(path)
    now, done = time.time(), len(summary.written)
    note = ''
    if first is None:  # Its time includes the compilation.
      first = (now, done)
      summary.first_batch_seconds = now - start
      rate, note = done / max(now - start, 1e-9), ' (incl. compilation)'
    else:
      rate = (done - first[1]) / max(now - first[0], 1e-9)
      summary.images_per_sec = rate
    left = len(todo) - done - (len(summary.failed) - failed_before)
    logging.info('predict: %d/%d images  %.2f img/s%s  ETA %s', done,
                 len(todo), rate, note,
                 formatting.hms(max(left, 0) / max(rate, 1e-9)))

  pending = None
  gb = batch_size(config, len(todo), devices)
  for batch in read_batches(todo, config, summary, gb, devices):
    # Dispatch is asynchronous: the device samples this batch while the
    # previous one is written.
    out = predict_fn(params, batch['image'], key, batch['case_ids'])
    if pending is not None:
      finish(*pending)
    pending = (batch, out)
  if pending is not None:
    finish(*pending)
  summary.seconds = time.time() - start
  return summary


def _select_inputs(paths, output_dir, overwrite, save_npy,
                   summary: Summary) -> List[str]:
  """The paths to predict: duplicate stems are failed, inputs whose outputs
  exist are skipped (unless ``overwrite``); both recorded in ``summary``."""
  todo, stems = [], {}
  for path in paths:
    stem = split_name(path)[0]
    if stem in stems:  # a.png and a.jpg would write the same outputs.
      summary.failed.append((path, f'same name stem as {stems[stem]}; rename '
                                   'one of them'))
      logging.error('skipping %s: same stem as %s', path, stems[stem])
      continue
    stems[stem] = path
    if not overwrite and any(os.path.exists(p) for p in output_paths(
        output_dir, path, save_npy).values()):
      summary.skipped.append(path)
      continue
    todo.append(path)
  if summary.skipped:
    logging.warning('%d input(s) already have outputs in %s and are skipped '
                    '(pass --overwrite to replace them).',
                    len(summary.skipped), output_dir)
  return todo


def predict_folder(config, workdir: str, input_dir: str, output_dir: str,
                   overwrite: bool = False, save_npy: bool = False) -> Summary:
  """Loads the workdir's checkpoint (EMA parameters) and predicts a folder."""
  if jax.process_count() > 1:
    raise ValueError('--mode=predict runs in one process (it uses all local '
                     'devices); start it without --num_processes')
  if not os.path.isdir(input_dir):
    raise FileNotFoundError(f'--input {input_dir} is not a directory')
  if os.path.realpath(input_dir) == os.path.realpath(output_dir):
    raise ValueError('--output must differ from --input (outputs would be '
                     'read as inputs next time)')
  paths, other = list_inputs(input_dir)
  for path in other:
    logging.warning('ignoring %s (not one of %s)', path,
                    ', '.join(IMAGE_EXTENSIONS))
  if not paths:
    raise FileNotFoundError(f'no images ({", ".join(IMAGE_EXTENSIONS)}) in '
                            f'{input_dir}')
  setup = train_state.Setup.from_config(config)
  state = train_state.load_eval_state(config, workdir, setup)
  step = int(jax.device_get(state.step))
  config, pick = evaluate.resolve_chain_label(config, state.ema_params, setup)
  logging.info('Predicting %d image(s) from %s with checkpoint step %d (EMA '
               'parameters): %d sampling steps, %d sample(s) each.',
               len(paths), input_dir, step, config.eval.num_steps,
               config.eval.num_samples)
  summary = predict_paths(config, setup, state.ema_params, paths, output_dir,
                          overwrite, save_npy)
  record = {'time': time.strftime('%Y-%m-%d %H:%M:%S'),
            'workdir': os.path.abspath(workdir),
            'input': os.path.abspath(input_dir), 'checkpoint_step': step,
            'params': 'ema',
            'sampling': predictors.sampling_record(config),
            'image_size': config.data.image_size}
  if pick is not None:
    record['chain_label_auto'] = pick
  record.update(summary.as_dict())
  for name in ('written', 'skipped'):
    record[name] = len(record[name])
  with open(os.path.join(output_dir, 'predict_log.jsonl'), 'a') as f:
    f.write(json.dumps(record) + '\n')
  return summary
