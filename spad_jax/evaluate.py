"""Evaluation: sample the split with the EMA parameters, score, write files.

Writes ``<workdir>/metrics.json`` (per-class IoU/Dice accumulated over the
split, mIoU/mDice over foreground classes, sampling settings, timing) and
``<workdir>/eval_grid.png`` (image / label / prediction [/ uncertainty]).
"""

import json
import os
import time
from typing import Any, Dict, Optional

from absl import logging
import cv2
import jax
import jax.numpy as jnp
import numpy as np

from spad_jax import diffusion
from spad_jax import metrics
from spad_jax.data import pipeline
from spad_jax.data import sources

AXIS = 'batch'


def make_predict_fn(config, model, schedule):
  """pmapped ``(params, images, key, batch_index) -> ensemble``.

  ``params`` and ``images`` are per device; ``key`` and ``batch_index`` are
  shared. Runs ``eval.num_samples`` chains per image in one batched call.
  """
  num_classes = config.data.num_classes
  n = config.eval.num_samples
  times = diffusion.time_sequence(config.diffusion.num_steps,
                                  config.eval.num_steps)

  def predict(params, images, key, batch_index):
    key = jax.random.fold_in(key, batch_index)
    key = jax.random.fold_in(key, jax.lax.axis_index(AXIS))
    b = images.shape[0]

    def denoise(xt_onehot, image, t):
      return jax.nn.softmax(model.apply({'params': params}, xt_onehot, image,
                                        t), axis=-1)

    tiled = jnp.tile(images, (n, 1, 1, 1))  # n chains of the same images.
    out = diffusion.sample(denoise, tiled, key, schedule, num_classes, times)
    labels = out['labels'].reshape((n, b) + out['labels'].shape[1:])
    return diffusion.ensemble(labels, num_classes)

  return jax.pmap(predict, axis_name=AXIS, in_axes=(0, 0, None, None))


def palette(num_classes: int) -> np.ndarray:
  """RGB colours, background black, the rest spread over hue."""
  colours = [(0, 0, 0)]
  for c in range(1, num_classes):
    hsv = np.uint8([[[int(180 * (c - 1) / max(num_classes - 1, 1)), 255,
                      255]]])
    colours.append(tuple(int(v) for v in cv2.cvtColor(hsv,
                                                      cv2.COLOR_HSV2RGB)[0, 0]))
  return np.asarray(colours, np.uint8)


def gray_rgb(image: np.ndarray) -> np.ndarray:
  """Model-range image [-1, 1] ``[H, W, C]`` to uint8 RGB."""
  img = np.clip((image + 1.0) * 127.5, 0, 255).astype(np.uint8)
  return np.repeat(img, 3, axis=-1) if img.shape[-1] == 1 else img[..., :3]


def grid_png(images, labels, preds, entropies, num_classes: int,
             path: str, scale: int = 1) -> np.ndarray:
  """Rows of image / label / prediction [/ entropy]; returns the RGB grid."""
  pal = palette(num_classes)
  rows = []
  for i in range(len(images)):
    row = [gray_rgb(images[i]), pal[labels[i]], pal[preds[i]]]
    if entropies is not None:
      e = entropies[i] / max(np.log(num_classes), 1e-9)
      heat = cv2.applyColorMap((np.clip(e, 0, 1) * 255).astype(np.uint8),
                               cv2.COLORMAP_INFERNO)[..., ::-1]
      row.append(heat)
    rows.append(np.concatenate(row, axis=1))
  grid = np.concatenate(rows, axis=0)
  if scale > 1:
    grid = cv2.resize(grid, None, fx=scale, fy=scale,
                      interpolation=cv2.INTER_NEAREST)
  titles = ['image', 'label', 'prediction']
  if entropies is not None:
    titles.append('uncertainty')
  grid = np.concatenate(
      [title_strip(titles, grid.shape[1] // len(titles)), grid], axis=0)
  cv2.imwrite(path, grid[..., ::-1])
  return grid


def title_strip(titles, tile_width: int, height: int = 24) -> np.ndarray:
  """A white strip with one title per ``tile_width`` columns."""
  strip = np.full((height, tile_width * len(titles), 3), 255, np.uint8)
  font_scale = min(0.45, tile_width / 220)
  for i, title in enumerate(titles):
    cv2.putText(strip, title, (i * tile_width + 4, height - 7),
                cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1,
                cv2.LINE_AA)
  return strip


def load_state(config, workdir, setup):
  """The latest checkpoint of ``workdir`` (unreplicated TrainState)."""
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  mgr = train.checkpoint_manager(workdir, config.train.checkpoints_to_keep)
  if mgr.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {mgr.directory}; train first '
                            '(--mode=train)')
  init_key = setup.keys()[0]
  state = train.create_train_state(config, setup.model, init_key, 1)
  state = train.restore_checkpoint(mgr, state)
  mgr.close()
  return state


def sample_split(config, ema_params, setup, source, num_shown: int = 0,
                 warmup: bool = False) -> Dict[str, Any]:
  """Samples every case of ``source``; returns confusion counts and timing.

  ``warmup`` runs the first batch once untimed, so ``seconds`` excludes
  compilation (benchmarks); ``num_shown`` keeps that many cases for a grid.
  """
  k = config.data.num_classes
  predict = make_predict_fn(config, setup.model, setup.schedule)
  params = _replicate(ema_params)
  eval_key = setup.keys()[2]
  batches = pipeline.eval_batches(source, config.eval.batch_size,
                                  jax.local_device_count(),
                                  jax.process_index(), jax.process_count())
  if warmup:
    first = next(pipeline.eval_batches(source, config.eval.batch_size,
                                       jax.local_device_count()))
    jax.block_until_ready(predict(params, first['image'], eval_key,
                                  np.int32(0)))
  conf = np.zeros((k, k), np.int64)
  shown = {'images': [], 'labels': [], 'preds': [], 'entropy': []}
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  start = time.time()
  done = 0
  for i, batch in enumerate(batches):
    out = jax.device_get(predict(params, batch['image'], eval_key,
                                 np.int32(i)))
    valid = batch['valid'].reshape(-1)
    pred = flat(out['prediction'])[valid]
    label = flat(batch['label'])[valid]
    conf += metrics.confusion_counts(pred, label, k)
    done += int(valid.sum())
    if len(shown['images']) < num_shown:
      take = slice(0, num_shown - len(shown['images']))
      for name, arr in (('images', flat(batch['image'])[valid]),
                        ('labels', label), ('preds', pred),
                        ('entropy', flat(out['entropy'])[valid])):
        shown[name].extend(list(arr[take]))
    elapsed = time.time() - start
    logging.info('  sampled %d/%d cases (%.2f img/s)', done,
                 len(source) // max(jax.process_count(), 1), done / elapsed)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(axis=0)
  return {'confusion': conf, 'shown': shown, 'seconds': time.time() - start}


def _replicate(tree):
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  return train.replicate(tree)


def evaluate(config, workdir: str, state=None, setup=None) -> Dict[str, Any]:
  """Samples ``config.eval.split`` and writes metrics.json and eval_grid.png."""
  from spad_jax import train  # pylint: disable=g-import-not-at-top
  setup = setup or train.Setup.from_config(config)
  if state is None:
    state = load_state(config, workdir, setup)
  split = config.eval.split
  source = sources.load_split(config, split)
  k = config.data.num_classes
  logging.info('Evaluating %d %s cases: %d sampling steps, %d sample(s) each.',
               len(source), split, config.eval.num_steps,
               config.eval.num_samples)
  run = sample_split(config, state.ema_params, setup, source,
                     num_shown=config.eval.num_grid_cases)
  seconds, shown = run['seconds'], run['shown']
  result = metrics.summarize_confusion(run['confusion'],
                                       list(source.class_names))
  result.update({
      'split': split, 'num_cases': len(source),
      'checkpoint_step': int(jax.device_get(state.step)),
      'params': 'ema',
      'sampling': {'num_steps': config.eval.num_steps,
                   'num_samples': config.eval.num_samples,
                   'diffusion_steps': config.diffusion.num_steps},
      'seconds': seconds, 'seconds_per_image': seconds / max(len(source), 1),
  })
  if jax.process_index() == 0:
    _write_json(os.path.join(workdir, 'metrics.json'), result)
    grid_png(shown['images'], shown['labels'], shown['preds'],
             shown['entropy'] if config.eval.num_samples > 1 else None, k,
             os.path.join(workdir, 'eval_grid.png'),
             scale=max(1, 256 // config.data.image_size))
  logging.info('%s: mIoU %s  mDice %s  (%.1f s, checkpoint step %d)', split,
               _pct(result['mIoU']), _pct(result['mDice']), seconds,
               result['checkpoint_step'])
  return result


def _pct(x: Optional[float]) -> str:
  return 'n/a' if x is None else f'{100 * x:.2f}%'


def _write_json(path: str, obj) -> None:
  """Writes atomically, keeping an earlier file as ``<name>.prev.json``."""
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=1)
  if os.path.exists(path):
    os.replace(path, path[:-len('.json')] + '.prev.json')
  os.replace(tmp, path)
