"""Evaluation: sample the split with the EMA parameters, score, write files.

Writes into the workdir:

- ``metrics.json``: per-class IoU/Dice accumulated over the split, mIoU/mDice
  over foreground classes, the mean per-case Dice/IoU/HD95/ASSD
  (``per_case_mean``), GED and per-pixel variances when cases have several
  annotations (``multi_annotation``), sampling settings, checkpoint step,
  timing, and with ``eval.chain_label='auto'`` the label picked on the
  validation split and what each candidate scored there
  (``chain_label_auto``);
- ``per_case.csv``: one row per case and foreground class present in its
  label or prediction (DESIGN §4), with missed/spurious flags and the
  class's pixels in the label, the prediction and both;
- ``eval_grid.png`` (image / label / prediction [/ uncertainty]) and
  ``overlays/best_<rank>_<case>.png``, ``overlays/worst_<rank>_<case>.png``
  for the cases of highest and lowest mean foreground Dice.

Per-case distances are measured on the maps at ``data.image_size`` in the
units of the original image: its pixels, or ``eval.spacing`` per pixel.
"""

import csv
import dataclasses
import glob
import io
import itertools
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from absl import logging
import cv2
import jax
import numpy as np

from spad_jax import calibration
from spad_jax import formatting
from spad_jax import files
from spad_jax import metrics
from spad_jax import predictors
from spad_jax import train_state
from spad_jax import visualize
from spad_jax.data import corruptions
from spad_jax.data import pipeline
from spad_jax.data import sources

AXIS = train_state.AXIS


def sample_split(config, ema_params, setup, source, num_shown: int = 0,
                 warmup: bool = False,
                 on_case: Optional[Callable[[int, Dict[str, np.ndarray]],
                                            None]] = None,
                 return_samples: bool = False,
                 predict=None,
                 candidates: Sequence[str] = ()) -> Dict[str, Any]:
  """Samples every case of ``source``; returns confusion counts and timing.

  ``warmup`` runs the first batch once untimed, so ``seconds`` excludes
  compilation (benchmarks); ``num_shown`` keeps that many cases for a grid.
  ``on_case(index, outputs)`` is called for every case this process sampled
  with its ``prediction``, ``entropy``, ``soft`` (and ``samples`` with
  ``return_samples``); its time is reported as ``scoring_seconds``. Batch
  ``i + 1`` is dispatched to the devices before batch ``i`` is scored on the
  host, so scoring overlaps sampling. With ``candidates`` (chain labels) the
  same chains are also scored as each label would label them:
  ``candidates`` maps each to its ``confusion`` and shown ``preds``.
  """
  k = config.data.num_classes
  predict = predict or predictors.cached(config, setup, return_samples,
                                         candidates)
  params = train_state.replicate(ema_params)
  eval_key = setup.keys()[2]
  key_ids = predictors.case_key_ids(source.ids)
  batches = pipeline.eval_batches(source, config.eval.batch_size,
                                  jax.local_device_count(),
                                  jax.process_index(), jax.process_count())
  if warmup:  # Compile on the first batch, then sample it again, timed.
    first = next(batches)
    jax.block_until_ready(predict(params, first['image'], eval_key,
                                  key_ids[first['index']]))
    batches = itertools.chain([first], batches)
  conf = np.zeros((k, k), np.int64)
  shown = {'images': [], 'labels': [], 'preds': [], 'entropy': []}
  by_label = {label: {'confusion': np.zeros((k, k), np.int64), 'preds': []}
              for label in candidates}
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  start = time.time()
  done, scoring = 0, 0.0
  total = len(source) // max(jax.process_count(), 1)

  def finish(batch, out_on_device):
    nonlocal conf, done, scoring
    out = jax.device_get(out_on_device)
    valid = batch['valid'].reshape(-1)
    pred = flat(out['prediction'])[valid]
    label = flat(batch['label'])[valid]
    conf += metrics.confusion_counts(pred, label, k)
    done += int(valid.sum())
    take = slice(0, max(0, num_shown - len(shown['images'])))
    if by_label:
      cands = flat(out['candidates'])[valid]
    for i, scored in enumerate(by_label.values()):
      scored['confusion'] += metrics.confusion_counts(cands[:, i], label, k)
      scored['preds'].extend(list(cands[take, i]))
    if len(shown['images']) < num_shown:
      for name, arr in (('images', flat(batch['image'])[valid]),
                        ('labels', label), ('preds', pred),
                        ('entropy', flat(out['entropy'])[valid])):
        shown[name].extend(list(arr[take]))
    if on_case is not None:
      begin = time.time()
      index = flat(batch['index'])
      for pos in np.flatnonzero(valid):  # Views, no copies of the batch.
        on_case(int(index[pos]), {name: flat(arr)[pos]
                                  for name, arr in out.items()})
      scoring += time.time() - begin
    logging.info('  sampled %d/%d cases (%.2f img/s)', done, total,
                 done / (time.time() - start))

  previous = None
  for batch in batches:
    # Dispatch is asynchronous: the devices sample this batch while the
    # host scores the previous one.
    current = (batch, predict(params, batch['image'], eval_key,
                              key_ids[batch['index']]))
    if previous is not None:
      finish(*previous)
    previous = current
  if previous is not None:
    finish(*previous)
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    conf = np.asarray(multihost_utils.process_allgather(conf)).sum(axis=0)
    for scored in by_label.values():
      scored['confusion'] = np.asarray(multihost_utils.process_allgather(
          scored['confusion'])).sum(axis=0)
  return {'confusion': conf, 'shown': shown, 'seconds': time.time() - start,
          'scoring_seconds': scoring, 'candidates': by_label}


def score_chain_labels(config, ema_params, setup, source,
                       num_shown: int = 0) -> Dict[str, Any]:
  """Samples ``source`` once and labels the chains with every label of
  ``predictors.AUTO_CHAIN_LABELS`` (the same draws: a label only reads the
  chain's steps differently); picks the one whose prediction
  (``eval.ensemble`` of ``eval.num_samples`` chains, as evaluated) has the
  highest dataset mDice; ties go to the first. Returns ``pick``, ``mDice``
  per label, ``runs`` (each label's ``sample_split``-like result:
  ``confusion`` and ``shown``, whose ``preds`` are that label's) and the
  pass's ``seconds``."""
  labels = predictors.AUTO_CHAIN_LABELS
  run = sample_split(predictors.with_chain_label(config, labels[0]),
                     ema_params, setup, source, num_shown=num_shown,
                     candidates=labels)
  runs, scores = {}, {}
  for label in labels:
    scored = run['candidates'][label]
    runs[label] = {'confusion': scored['confusion'],
                   'shown': dict(run['shown'], preds=scored['preds'])}
    scores[label] = metrics.summarize_confusion(
        scored['confusion'], list(source.class_names))['mDice']
  ranked = [-np.inf if scores[l] is None else scores[l] for l in labels]
  pick = labels[int(np.argmax(ranked))]
  return {'pick': pick, 'mDice': scores, 'runs': runs,
          'seconds': run['seconds']}


def resolve_chain_label(config, ema_params, setup, source=None):
  """``config`` with ``eval.chain_label='auto'`` replaced by the label its
  model scores best with on the validation split (``score_chain_labels``),
  and the record of that choice for metrics.json; any other config comes
  back as is, with ``None``. ``source`` defaults to the clean val split:
  the choice belongs to the model, not to the images being evaluated."""
  if not predictors.picks_chain_label(config):
    return config, None
  if source is None:
    source = sources.load_split(config, 'val')
  if not len(source):
    raise ValueError("eval.chain_label='auto' picks on the validation split, "
                     f'and data.name={config.data.name!r} has no validation '
                     'cases; set eval.chain_label to one of '
                     f'{", ".join(predictors.AUTO_CHAIN_LABELS)}')
  if config.eval.split == 'val':
    logging.warning("eval.chain_label='auto' picks on the validation split "
                    'that is also evaluated: its figures favour the pick.')
  start = time.time()
  scored = score_chain_labels(config, ema_params, setup, source)
  record = {'picked': scored['pick'], 'split': 'val',
            'num_cases': len(source), 'val_mDice': scored['mDice'],
            'seconds': time.time() - start}
  logging.info("eval.chain_label='auto' on %d val cases: %s; picked %s.",
               len(source), ', '.join(
                   f'{label} mDice {formatting.number(value, 4)}'
                   for label, value in scored['mDice'].items()),
               scored['pick'])
  return predictors.with_chain_label(config, scored['pick']), record


def case_spacing(original_size, image_size: int,
                 spacing: Sequence[float] = ()) -> Tuple[float, float]:
  """Size (row, column) of one model-resolution pixel in original pixels, or
  in the units of ``spacing`` (per original pixel) when given."""
  if len(spacing) not in (0, 2) or any(v <= 0 for v in spacing):
    raise ValueError(f'config.eval.spacing = {tuple(spacing)!r}: give () or '
                     '(row, column) pixel sizes > 0')
  base = tuple(spacing) if len(spacing) else (1.0, 1.0)
  return (original_size[0] / image_size * base[0],
          original_size[1] / image_size * base[1])


class Extremes:
  """The ``k`` highest- and lowest-scoring cases seen, with their outputs."""

  def __init__(self, k: int):
    self.k = k
    self.entries = []  # (score, index, payload), at most 2k kept.

  def add(self, score: float, index: int, payload) -> None:
    if np.isnan(score):  # No foreground anywhere: nothing to rank.
      return
    ranked = sorted(self.entries + [(score, index, payload)],
                    key=lambda e: (e[0], e[1]))
    self.entries = (ranked if len(ranked) <= 2 * self.k else
                    ranked[:self.k] + ranked[-self.k:])

  def best(self) -> List:
    return sorted(self.entries, key=lambda e: (-e[0], e[1]))[:self.k]

  def worst(self) -> List:
    return sorted(self.entries, key=lambda e: (e[0], e[1]))[:self.k]


def write_overlays(directory: str, extremes: Extremes, source,
                   num_classes: int, with_entropy: bool) -> List[str]:
  """``best_<rank>_<case>.png`` and ``worst_<rank>_<case>.png``; replaces the
  previous evaluation's ones. (With several processes, ``extremes`` holds
  only this process's cases.)"""
  os.makedirs(directory, exist_ok=True)
  for old in glob.glob(os.path.join(directory, 'best_*.png')) + glob.glob(
      os.path.join(directory, 'worst_*.png')):
    os.remove(old)
  paths = []
  for kind, entries in (('best', extremes.best()),
                        ('worst', extremes.worst())):
    for rank, (score, index, out) in enumerate(entries, 1):
      panel = visualize.case_panel(source.images[index], source.labels[index],
                         out['prediction'],
                         out['entropy'] if with_entropy else None,
                         num_classes, source.original_sizes[index],
                         f'{source.ids[index]} mean Dice {score:.3f}')
      path = os.path.join(directory, f'{kind}_{rank}_{source.ids[index]}.png')
      cv2.imwrite(path, panel[..., ::-1])
      paths.append(path)
  return paths


def write_per_case_csv(path: str, ids: Sequence[str], tables: np.ndarray,
                       class_names: Sequence[str],
                       uncertainty: Optional[np.ndarray] = None) -> int:
  """One row per (case, scored foreground class); returns the row count.
  ``uncertainty``: the case's mean normalised entropy, on each of its rows."""
  rows = 0
  text = io.StringIO(newline='')
  writer = csv.writer(text)
  writer.writerow(('case', 'class') + metrics.CASE_FIELDS +
                  (('mean_uncertainty',) if uncertainty is not None else ()))
  for i, (case_id, table) in enumerate(zip(ids, tables)):
    for c, row in enumerate(table):
      if np.isnan(row[0]):  # Absent from label and prediction: skipped.
        continue
      values = [f'{v:.6g}' for v in row[:4]] + [int(v) for v in row[4:]]
      if uncertainty is not None:
        values.append(f'{uncertainty[i]:.6g}')
      writer.writerow([case_id, class_names[c + 1]] + values)
      rows += 1
  files.write_atomic(path, text.getvalue())
  return rows


def _merge_processes(local: np.ndarray) -> np.ndarray:
  """Rows filled by one process each (NaN elsewhere), merged over processes."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  merged = None
  for part in np.asarray(multihost_utils.process_allgather(local)):
    merged = part if merged is None else np.where(np.isnan(merged), part,
                                                  merged)
  return merged


def output_dir(config, workdir: str) -> str:
  """Where evaluate writes: the workdir, or for a corrupted evaluation its
  own folder (the clean metrics.json stays)."""
  if config.eval.corruption == 'none':
    return workdir
  return os.path.join(workdir, 'corruptions',
                      f'{config.eval.corruption}_s{config.eval.severity}')


def load_eval_source(config, split: str):
  """``split`` of the data set, degraded by ``eval.corruption`` if set."""
  source = sources.load_split(config, split)
  if config.eval.corruption == 'none':
    return source
  return dataclasses.replace(source, images=corruptions.corrupt_model_images(
      source.images, source.ids, config.eval.corruption,
      config.eval.severity, config.seed))


def evaluate(config, workdir: str, state=None, setup=None,
             num_extremes: int = 3, out_dir: Optional[str] = None,
             figures: bool = True) -> Dict[str, Any]:
  """Samples ``config.eval.split``; writes metrics.json, per_case.csv and,
  with ``figures``, eval_grid.png, reliability.png, coverage.png and the
  overlays of the ``num_extremes`` best/worst cases to ``out_dir`` (default
  ``output_dir(config, workdir)``)."""
  from spad_jax.data import annotations  # pylint: disable=g-import-not-at-top
  case_spacing((1, 1), 1, config.eval.spacing)  # Fail before sampling.
  setup = setup or train_state.Setup.from_config(config)
  if state is None:
    state = train_state.load_eval_state(config, workdir, setup)
  config, pick = resolve_chain_label(config, state.ema_params, setup)
  split = config.eval.split
  source = load_eval_source(config, split)
  out_dir = out_dir or output_dir(config, workdir)
  k = config.data.num_classes
  n_samples = config.eval.num_samples
  sets = annotations.for_source(config, source)
  if sets and n_samples < 2:
    logging.warning('%d %s cases have several annotations; GED and sample '
                    'variances need eval.num_samples > 1.', len(sets), split)
    sets = {}
  logging.info('Evaluating %d %s cases: %d sampling steps, %d sample(s) each%s%s.',
               len(source), split, config.eval.num_steps, n_samples,
               f'; {len(sets)} with several annotations' if sets else '',
               '' if config.eval.corruption == 'none' else
               f'; images degraded by {config.eval.corruption}, severity '
               f'{config.eval.severity}')
  tables = np.full((len(source), k - 1, len(metrics.CASE_FIELDS)), np.nan)
  multi = np.full((len(source), len(metrics.MULTI_FIELDS)), np.nan)
  uncertainty = np.full((len(source), 1), np.nan)  # Mean per case.
  calib = calibration.Accumulator(k)
  extremes = Extremes(num_extremes)

  def on_case(index, out):
    spacing = case_spacing(source.original_sizes[index],
                           config.data.image_size, config.eval.spacing)
    tables[index] = metrics.case_metrics(out['prediction'],
                                         source.labels[index], k, spacing)
    extremes.add(metrics.case_score(tables[index]), index,
                 {'prediction': out['prediction'].copy(),  # Not the batch.
                  'entropy': out['entropy'].copy()})
    if source.ids[index] in sets:
      multi[index] = metrics.multi_annotation_row(out['samples'],
                                          sets[source.ids[index]], k)
    uncertainty[index] = calib.add(out['prob'], out['prediction'],
                                   source.labels[index])

  run = sample_split(config, state.ema_params, setup, source,
                     num_shown=config.eval.num_grid_cases, on_case=on_case,
                     return_samples=bool(sets))
  tables, multi = _merge_processes(tables), _merge_processes(multi)
  uncertainty = _merge_processes(uncertainty)[:, 0]
  if jax.process_count() > 1:  # Each process's histograms, summed.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    gathered = multihost_utils.process_allgather(calib.arrays())
    calib = calibration.Accumulator(k)
    calib.merge({name: np.asarray(v).sum(axis=0)
                 for name, v in gathered.items()})
  result = _summary(config, workdir, state, source, run, tables)
  if pick is not None:
    result['chain_label_auto'] = pick
  result.update(calib.summary(config.eval.ece_bins, list(source.class_names)))
  result['uncertainty']['case_dice_spearman'] = calibration.spearman(
      uncertainty, [metrics.case_score(t) for t in tables])
  if sets:
    result['multi_annotation'] = metrics.summarize_multi(multi, source.ids)
  if jax.process_index() == 0:
    os.makedirs(out_dir, exist_ok=True)
    _write_outputs(config, out_dir, result, source, tables, run['shown'],
                   extremes, uncertainty, figures)
  _log_result(split, result, run['seconds'], len(sets))
  return result


def _log_result(split: str, result: Dict[str, Any], seconds: float,
                num_multi: int) -> None:
  """The evaluation's headline numbers, in the log."""
  pcm = result['per_case_mean']
  logging.info('%s: mIoU %s  mDice %s  per case: Dice %s HD95 %s ASSD %s '
               '(%.1f s, checkpoint step %d)', split,
               formatting.percent(result['mIoU']),
               formatting.percent(result['mDice']),
               formatting.percent(pcm['Dice']), formatting.number(pcm['HD95']),
               formatting.number(pcm['ASSD']), seconds,
               result['checkpoint_step'])
  cal, unc = result['calibration'], result['uncertainty']
  logging.info('%s: ECE %s  MCE %s  Brier %s  NLL %s; uncertainty flags '
               'errors with AUROC %s, AUPRC %s.', split,
               formatting.number(cal['ece'], 4), formatting.number(cal['mce'], 4),
               formatting.number(cal['brier'], 4),
               formatting.number(cal['nll'], 4),
               formatting.number(unc['error_auroc']),
               formatting.number(unc['error_auprc']))
  if num_multi:
    logging.info('%s: GED %s over %d cases with several annotations.', split,
                 formatting.number(result['multi_annotation']['GED']),
                 num_multi)


def _summary(config, workdir, state, source, run, tables) -> Dict[str, Any]:
  """metrics.json's content: dataset-level metrics, per-case means, the
  checkpoint and sampling settings, timing."""
  result = metrics.summarize_confusion(run['confusion'],
                                       list(source.class_names))
  seconds = run['seconds']
  sampling_seconds = seconds - run['scoring_seconds']
  result.update({
      'split': config.eval.split, 'num_cases': len(source),
      'checkpoint_step': int(jax.device_get(state.step)),
      'checkpoint': train_state.resolve_checkpoint(config, workdir),
      'params': 'ema',
      'model_kind': config.model.kind,
      'corruption': {'name': config.eval.corruption,
                     'severity': (config.eval.severity
                                  if config.eval.corruption != 'none'
                                  else 0)},
      'sampling': predictors.sampling_record(config),
      'per_case_mean': metrics.summarize_cases(tables,
                                               list(source.class_names)),
      'distance_unit': ('eval.spacing units' if len(config.eval.spacing) else
                        'pixels of the original image'),
      'seconds': seconds, 'sampling_seconds': sampling_seconds,
      'scoring_seconds': run['scoring_seconds'],
      'seconds_per_image': sampling_seconds / max(len(source), 1),
  })
  return result


def _write_outputs(config, out_dir, result, source, tables, shown,
                   extremes, uncertainty, figures: bool) -> None:
  """metrics.json, per_case.csv and (``figures``) eval_grid.png,
  reliability.png, coverage.png and overlays/ (process 0)."""
  k = config.data.num_classes
  # A softmax has an entropy even from one pass; one diffusion sample not.
  show_entropy = (config.eval.num_samples > 1 or
                  config.model.kind == 'deterministic')
  files.write_json(os.path.join(out_dir, 'metrics.json'), result,
                   keep_previous=True)
  write_per_case_csv(os.path.join(out_dir, 'per_case.csv'), source.ids,
                     tables, source.class_names, uncertainty)
  if not figures:
    return
  calibration.plot_reliability(result['calibration'],
                               os.path.join(out_dir, 'reliability.png'))
  calibration.plot_coverage(result['uncertainty'],
                            os.path.join(out_dir, 'coverage.png'))
  visualize.grid_png(shown['images'], shown['labels'], shown['preds'],
                     shown['entropy'] if show_entropy else None, k,
                     os.path.join(out_dir, 'eval_grid.png'),
                     scale=max(1, 256 // config.data.image_size))
  write_overlays(os.path.join(out_dir, 'overlays'), extremes, source, k,
                 with_entropy=show_entropy)
