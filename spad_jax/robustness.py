"""``--mode=robustness``: evaluate one trained model under every corruption.

Loads the checkpoint and compiles the sampler once, then evaluates the clean
split and every corruption × severity (``data/corruptions.py``). Each
evaluation writes its own folder ``<workdir>/corruptions/<name>_s<k>/``
(metrics.json, per_case.csv, PNGs); the sweep writes

  <workdir>/robustness.json   every row, and the settings
  <workdir>/robustness.csv    one row per (corruption, severity)
  <workdir>/robustness.png    mDice against severity, one line per corruption
  <workdir>/corruption_examples.png  one test image at every severity

An evaluation whose metrics.json exists for the same checkpoint step and
sampling settings is reused, so a stopped sweep resumes where it stopped.
"""

import csv
import io
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

from absl import logging
import numpy as np

from spad_jax import evaluate
from spad_jax import files
from spad_jax import formatting
from spad_jax import predictors
from spad_jax import train_state
from spad_jax import visualize
from spad_jax.data import corruptions
from spad_jax.data import sources

FIELDS = ('corruption', 'severity', 'mDice', 'mIoU', 'case_Dice', 'HD95',
          'ece', 'brier', 'error_auroc', 'seconds')


def _row(name: str, severity: int, m: Dict[str, Any]) -> Dict[str, Any]:
  return {'corruption': name, 'severity': severity, 'mDice': m['mDice'],
          'mIoU': m['mIoU'], 'case_Dice': m['per_case_mean']['Dice'],
          'HD95': m['per_case_mean']['HD95'],
          'ece': m['calibration']['ece'], 'brier': m['calibration']['brier'],
          'error_auroc': m['uncertainty']['error_auroc'],
          'seconds': m['seconds']}


def _reusable(path: str, step: int, config) -> Dict[str, Any]:
  """The metrics at ``path`` if they are of this checkpoint and sampler."""
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    m = json.load(f)
  same = (m.get('checkpoint_step') == step and
          m.get('sampling') == predictors.sampling_record(config))
  return m if same and 'calibration' in m else {}


LEVELS = (1, 2, 3, 4, 5)


def sweep(config, workdir: str,
          levels: Sequence[int] = LEVELS) -> List[Dict[str, Any]]:
  """Every corruption at each severity of ``levels`` plus the clean split;
  returns the rows."""
  bad = [level for level in levels if not 1 <= int(level) <= 5]
  if bad or not levels:
    raise ValueError(f'robustness severities {list(levels)}: each must be in '
                     '1..5')
  setup = train_state.Setup.from_config(config)
  state = train_state.load_eval_state(config, workdir, setup)
  import jax  # pylint: disable=g-import-not-at-top
  step = int(jax.device_get(state.step))
  # One pick for the whole sweep, on the clean validation split.
  config, pick = evaluate.resolve_chain_label(config, state.ema_params, setup)
  plan = [('none', 0)] + [(n, s) for n in corruptions.SEVERITIES
                          for s in levels]
  rows, start, fresh = [], time.time(), 0
  for i, (name, severity) in enumerate(plan):
    cfg = config.copy_and_resolve_references()
    cfg.eval.corruption = name
    cfg.eval.severity = max(severity, 1)
    out = (os.path.join(workdir, 'corruptions', 'none_s0') if name == 'none'
           else evaluate.output_dir(cfg, workdir))
    metrics = _reusable(os.path.join(out, 'metrics.json'), step, cfg)
    if not metrics:
      # Figures of the clean split only: each costs matplotlib time.
      metrics = evaluate.evaluate(cfg, workdir, state=state, setup=setup,
                                  out_dir=out, figures=name == 'none')
      fresh += 1
    rows.append(_row(name, severity, metrics))
    elapsed = time.time() - start
    left = (elapsed / max(fresh, 1)) * (len(plan) - i - 1) if fresh else None
    logging.info('robustness %d/%d: %s severity %d: mDice %s (ETA %s)',
                 i + 1, len(plan), name, severity,
                 formatting.percent(rows[-1]['mDice']), formatting.hms(left))
    if jax.process_index() == 0:
      _write(config, workdir, rows, step, pick)
  return rows


def _write(config, workdir: str, rows: List[Dict[str, Any]], step: int,
           pick: Optional[Dict[str, Any]] = None) -> None:
  extra = {} if pick is None else {'chain_label_auto': pick}
  files.write_json(os.path.join(workdir, 'robustness.json'), {
      'checkpoint_step': step, 'split': config.eval.split,
      'sampling': predictors.sampling_record(config), **extra,
      'severities': {k: list(v) for k, v in corruptions.SEVERITIES.items()},
      'rows': rows})
  files.write_atomic(os.path.join(workdir, 'robustness.csv'),
                     _csv_text(FIELDS, rows))
  plot(rows, os.path.join(workdir, 'robustness.png'))


def _csv_text(fields, rows: List[Dict[str, Any]]) -> str:
  """CSV of ``rows``: floats to 6 significant digits, None as empty."""
  text = io.StringIO(newline='')
  writer = csv.DictWriter(text, fields)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: ('' if r[k] is None else
                         f'{r[k]:.6g}' if isinstance(r[k], float) else r[k])
                     for k in fields})
  return text.getvalue()


def plot(rows: List[Dict[str, Any]], path: str) -> None:
  plt = visualize.pyplot()
  clean = [r['mDice'] for r in rows if r['corruption'] == 'none']
  fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
  for i, name in enumerate(corruptions.SEVERITIES):
    mine = [r for r in rows if r['corruption'] == name and
            r['mDice'] is not None]
    if mine:
      ax.plot([0] + [r['severity'] for r in mine],
              clean[:1] + [r['mDice'] for r in mine], 'o-', ms=3,
              color=f'C{i}', label=name)
  ax.set_xlabel('severity (0 = clean)')
  ax.set_ylabel('test mDice')
  ax.set_xticks(range(6))
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def examples_png(config, path: str, case: int = 0) -> str:
  """One image of ``eval.split`` at every corruption and severity."""
  import cv2  # pylint: disable=g-import-not-at-top
  source = sources.load_split(config, config.eval.split)  # Clean images.
  image = (source.images[case, ..., 0].astype(np.float32) + 1) / 2
  case_id = source.ids[case]
  tiles = []
  for name in corruptions.SEVERITIES:
    row = [image]
    for severity in range(1, 6):
      rng = corruptions.case_seed(config.seed, name, severity, case_id)
      row.append(corruptions.corrupt(image[..., None], name, severity,
                                     rng)[..., 0])
    tiles.append(np.concatenate(row, axis=1))
  grid = np.concatenate(tiles, axis=0)
  scale = max(1, 128 // image.shape[0])
  grid = cv2.resize(grid, None, fx=scale, fy=scale,
                    interpolation=cv2.INTER_NEAREST)
  label_w = 120
  canvas = np.full((grid.shape[0], grid.shape[1] + label_w), 255, np.uint8)
  canvas[:, label_w:] = np.round(grid * 255).astype(np.uint8)
  tile_h = grid.shape[0] // len(corruptions.SEVERITIES)
  for i, name in enumerate(corruptions.SEVERITIES):
    cv2.putText(canvas, name, (4, i * tile_h + tile_h // 2),
                cv2.FONT_HERSHEY_SIMPLEX, 0.4, 0, 1, cv2.LINE_AA)
  ok, data = cv2.imencode('.png', canvas)
  assert ok
  files.write_atomic(path, data.tobytes())
  return path


def robustness(config, workdir: str,
               levels: Sequence[int] = LEVELS) -> List[Dict[str, Any]]:
  """The sweep, then the examples picture; returns the rows."""
  rows = sweep(config, workdir, levels)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_index() == 0:
    examples_png(config, os.path.join(workdir, 'corruption_examples.png'))
  return rows


class CompareError(ValueError):
  """A robustness.json that cannot be compared (names the file)."""


def load_sweep(path: str) -> Dict[str, Any]:
  """A workdir's robustness.json (or the file itself), checked."""
  if os.path.isdir(path):
    path = os.path.join(path, 'robustness.json')
  if not os.path.exists(path):
    raise CompareError(f'{path}: not found (run --mode=robustness first)')
  with open(path) as f:
    try:
      sweep_ = json.load(f)
    except json.JSONDecodeError as e:
      raise CompareError(f'{path}: not JSON ({e})') from e
  if not isinstance(sweep_, dict) or 'rows' not in sweep_:
    raise CompareError(f'{path}: no "rows"; not a robustness.json')
  sweep_['path'] = path
  return sweep_


def compare(sweeps: Dict[str, Dict[str, Any]], reference: str,
            metric: str = 'mDice') -> Dict[str, Any]:
  """Rows of ``metric`` per (corruption, severity) for each named sweep,
  its difference to ``reference``'s, and per corruption the mean over
  severities 1..5 (``none``: the clean split, severity 0). Sweeps must
  share the split and sampling settings: otherwise the difference is not
  the models'."""
  if reference not in sweeps:
    raise CompareError(f'reference {reference!r} is not one of '
                       f'{sorted(sweeps)}')
  ref = sweeps[reference]
  for name, s in sweeps.items():
    for key in ('split', 'sampling'):
      if s.get(key) != ref.get(key):
        raise CompareError(f'{s["path"]}: {key} {s.get(key)!r} differs from '
                           f'{ref["path"]}\'s {ref.get(key)!r}')

  def table(s):
    return {(r['corruption'], int(r['severity'])): r.get(metric)
            for r in s['rows']}
  tables = {name: table(s) for name, s in sweeps.items()}
  keys = [k for k in tables[reference]
          if all(k in t for t in tables.values())]
  rows = []
  for key in keys:
    row = {'corruption': key[0], 'severity': key[1]}
    for name, t in tables.items():
      row[name] = t[key]
      if name != reference:
        row[f'{name} - {reference}'] = (
            None if t[key] is None or tables[reference][key] is None
            else t[key] - tables[reference][key])
    rows.append(row)
  means = {}
  for name in ['none', *corruptions.SEVERITIES]:
    mine = [r for r in rows if r['corruption'] == name]
    if mine:
      means[name] = {n: _mean([r[n] for r in mine]) for n in sweeps}
  return {'metric': metric, 'reference': reference,
          'runs': {n: s['path'] for n, s in sweeps.items()},
          'checkpoint_steps': {n: s.get('checkpoint_step')
                               for n, s in sweeps.items()},
          'rows': rows, 'mean_over_severities': means}


def _mean(values):
  values = [v for v in values if v is not None]
  return float(np.mean(values)) if values else None


def write_comparison(result: Dict[str, Any], out: str) -> List[str]:
  """comparison.json, comparison.csv and comparison.png in ``out``."""
  os.makedirs(out, exist_ok=True)
  paths = [os.path.join(out, f'comparison.{e}') for e in ('json', 'csv',
                                                           'png')]
  files.write_json(paths[0], result)
  fields = list(result['rows'][0]) if result['rows'] else []
  files.write_atomic(paths[1], _csv_text(fields, result['rows']))
  plt = visualize.pyplot()
  names = list(result['runs'])
  kinds = [c for c in corruptions.SEVERITIES
           if any(r['corruption'] == c for r in result['rows'])]
  fig, axes = plt.subplots(1, max(len(kinds), 1), dpi=110, sharey=True,
                           figsize=(2.1 * max(len(kinds), 1), 2.8),
                           squeeze=False)
  clean = {r_name: next((r[r_name] for r in result['rows']
                         if r['corruption'] == 'none'), None)
           for r_name in names}
  for ax, kind in zip(axes[0], kinds):
    mine = [r for r in result['rows'] if r['corruption'] == kind]
    for i, name in enumerate(names):
      xs = [0] + [r['severity'] for r in mine]
      ys = [clean[name]] + [r[name] for r in mine]
      ax.plot(xs, [np.nan if y is None else y for y in ys], 'o-', ms=3,
              color=f'C{i}', label=name)
    ax.set_title(kind, fontsize=8)
    ax.set_xticks(range(6))
    ax.tick_params(labelsize=7)
  axes[0][0].set_ylabel(f'test {result["metric"]}', fontsize=8)
  axes[0][0].legend(fontsize=7)
  fig.supxlabel('severity (0 = clean)', fontsize=8)
  fig.tight_layout()
  fig.savefig(paths[2])
  plt.close(fig)
  return paths
