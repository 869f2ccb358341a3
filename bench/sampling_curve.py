r"""How the sampler's accuracy moves with steps, samples and sampler options.

For every (sampler, sampling steps, ensemble size) setting, samples the
evaluation split with the EMA parameters and records mDice/mIoU, per-case
HD95, calibration (ECE, NLL of the soft map), the GED of the samples against
the label (ensembles) and wall time per image (compilation excluded: one
untimed warm-up batch per setting), and the expected mDice of a label
drawn pixel by pixel from the soft map (at one step: what a chain whose
samples followed the model's one-step marginals would score, to hold its
single chains against). Each multi-step setting is also compared
with one step of the same sampler and ensemble size (the differences of the
single-chain mDice, of the ensemble prediction's mDice against one step's
single chains, and of the ECE), and each ensemble with its own single
chains (its prediction's, its mean p̂'s and its medoid's mDice, minus the
chains' mean), all with
paired bootstrap intervals over cases:

  python bench/sampling_curve.py --config=configs/demo.py --workdir=runs/demo
  python bench/sampling_curve.py --config=configs/demo.py --workdir=runs/demo \
      --samplers=ancestral,x0_resample,ancestral:0.5,ancestral:1:2 \
      --steps=1,3,10,25 --samples=1,4,16 --diagnose_steps=10,25

A sampler is
``name[:temperature[:mode_last[:ensemble[:soft_map[:chain_label
[:ensemble_of]]]]]]`` (``eval.sampler``, ``eval.temperature``,
``eval.mode_last``, ``eval.ensemble``, ``eval.soft_map``,
``eval.chain_label``, ``eval.ensemble_of``; plain ``ancestral`` is DESIGN
§1's exact sampler with majority-vote ensembles). Single chains are scored
on each chain's own label, ensembles on what they combine.

``--diagnose_steps`` also runs, per sampler and step count,
``--diagnose_chains`` traced chains per case (default one) and reports for
every step ``t``:

- the step's prediction (argmax ``p̂``) against the label: foreground mDice,
  NLL of the label under ``p̂`` and its ECE, on the chain's own ``x_t`` and on
  ``x_t ~ q(x_t | label)`` drawn at the same ``t`` (the training
  distribution). Their gap is the exposure bias;
- the fraction of ``x_t`` pixels that differ from the label, own vs q;
- how many pixels change class from the previous step's prediction, and how
  many of those changes fix an error or create one;

and, for the chain as a whole, the mDice of its label pooled from its
steps' ``p̂`` in each way of ``sampling_stats.POOLINGS`` (the first step's,
the last step's, their mean, the mean of the first or the last half,
weighted by the signal share ᾱ_t of each step's input), figures on the
counts summed over all chains; and the ECE and NLL of the soft map each
pooling gives the traced chains' ensemble (per case, the mean over the
chains of their pooled ``p̂``, as ``eval.soft_map`` is measured).

Writes ``<out>/sampling_curve.{json,md,png}``, the per-case figures behind
the paired intervals in ``<out>/sampling_cases.npz`` (bench/pool_folds.py
pools them over cross-validation folds) and, with diagnosis,
``<out>/sampling_diagnosis.png``; ``<out>`` defaults to
``<workdir>/bench``. Step counts above the model's ``diffusion.num_steps``
are skipped and listed as such.
"""

import io
import itertools
import os
import sys
import time

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# pylint: disable=g-import-not-at-top,wrong-import-position
from sampling_stats import ARRAYS
from sampling_stats import CASES
from sampling_stats import CASES_FILE
from sampling_stats import chain_mdices
from sampling_stats import fmt
from sampling_stats import paired_table
from sampling_stats import paired_vs_one_step
from sampling_stats import paired_vs_single
from sampling_stats import POOLINGS
from sampling_stats import pooled_soft_map
from sampling_stats import pooling_weights
from sampling_stats import soft_confusion
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Config the workdir was '
                                'trained with.', lock_config=False)
flags.DEFINE_string('workdir', None, 'Trained workdir (has checkpoints/).')
flags.DEFINE_list('steps', ['1', '5', '10', '25', '50', '250'],
                  'Sampling step counts.')
flags.DEFINE_list('samples', ['1', '4', '16'], 'Ensemble sizes.')
flags.DEFINE_list('samplers', ['ancestral'], 'Samplers, each '
                  'name[:temperature[:mode_last[:ensemble[:soft_map'
                  '[:chain_label[:ensemble_of]]]]]].')
flags.DEFINE_list('diagnose_steps', [], 'Step counts whose chains are traced '
                  'step by step (exposure bias, changes per step).')
flags.DEFINE_integer('diagnose_chains', 1, 'Traced chains per case in the '
                     'diagnosis.', lower_bound=1)
flags.DEFINE_string('out', None, 'Output folder (default <workdir>/bench).')
flags.DEFINE_integer('max_cases', 0, 'Use only the first N cases (0: all).')
flags.mark_flags_as_required(['config', 'workdir'])


def parse_sampler(spec: str) -> dict:
  """``'x0_resample:0.5:2:mean:chain_mean:soft_map:last'`` -> the seven
  ``eval.*`` sampler keys."""
  parts = spec.split(':')
  if not 1 <= len(parts) <= 7:
    raise ValueError(f'--samplers: {spec!r} is not name[:temperature'
                     '[:mode_last[:ensemble[:soft_map[:chain_label'
                     '[:ensemble_of]]]]]]')
  try:
    return {'sampler': parts[0],
            'temperature': float(parts[1]) if len(parts) > 1 else 1.0,
            'mode_last': int(parts[2]) if len(parts) > 2 else 0,
            'ensemble': parts[3] if len(parts) > 3 else 'vote',
            'soft_map': parts[4] if len(parts) > 4 else 'last',
            'chain_label': parts[5] if len(parts) > 5 else 'last',
            'ensemble_of': parts[6] if len(parts) > 6 else 'chain_label'}
  except ValueError as e:
    raise ValueError(f'--samplers: {spec!r}: {e}') from None


def sampler_name(options: dict) -> str:
  name = options['sampler']
  if options['temperature'] != 1.0 or options['mode_last']:
    name += f' τ={options["temperature"]:g}'
  if options['mode_last']:
    name += f' mode×{options["mode_last"]}'
  if options['ensemble'] != 'vote':
    name += f' {options["ensemble"]}'
  if options['soft_map'] != 'last':
    name += f' p̂:{options["soft_map"]}'
  if options['chain_label'] != 'last':
    name += f' label:{options["chain_label"]}'
  if options['ensemble_of'] != 'chain_label':
    name += f' of:{options["ensemble_of"]}'
  return name


def _configured(config, options, num_steps, num_samples):
  from spad_jax import config_validation  # pylint: disable=g-import-not-at-top
  cfg = config.copy_and_resolve_references()
  cfg.eval.num_steps, cfg.eval.num_samples = num_steps, num_samples
  for key, value in options.items():
    cfg.eval[key] = value
  config_validation.validate(cfg)  # Names a bad sampler before any work.
  return cfg


def score_setting(cfg, state, setup, source) -> dict:
  """Samples ``source`` once with ``cfg``; accuracy, calibration, GED, time."""
  from spad_jax import calibration  # pylint: disable=g-import-not-at-top
  from spad_jax import evaluate  # pylint: disable=g-import-not-at-top
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  k, n = cfg.data.num_classes, cfg.eval.num_samples
  tables = np.full((len(source), k - 1, len(metrics.CASE_FIELDS)), np.nan)
  geds = []
  calib = calibration.Accumulator(k)
  ensemble = n > 1
  if ensemble:  # The 'medoid' rule's pick among the chains, for any row.
    import jax  # pylint: disable=g-import-not-at-top
    from spad_jax import diffusion  # pylint: disable=g-import-not-at-top
    medoid = jax.jit(lambda samples: diffusion.medoid_ensemble(
        samples[:, None], k)['prediction'][0])
  # Each chain alone (one sample per case): their spread is the noise of a
  # single-sample figure; the mean p̂'s argmax is the 'mean' ensemble rule.
  # Per case, for the paired bootstraps: each chain's, the prediction's and
  # the mean p̂'s confusion counts, and the top-label calibration histogram.
  case_chain_conf = np.zeros((len(source), n, k, k), np.int64)
  case_pred_conf = np.zeros((len(source), k, k), np.int64)
  case_mean_conf = np.zeros((len(source), k, k), np.int64)
  case_medoid_conf = np.zeros((len(source), k, k), np.int64)
  case_top = np.zeros((len(source), 3, calibration.FINE_BINS))
  soft_conf = np.zeros((k, k))  # Of a pixel-by-pixel draw from the soft map.

  def on_case(index, out):
    label = source.labels[index]
    tables[index] = metrics.case_metrics(out['prediction'], label, k)
    calib.add(out['prob'], out['prediction'], label)
    soft_conf[:] += soft_confusion(out['prob'], label)
    case_top[index] = calibration.top_histogram(out['prob'], label)
    case_pred_conf[index] = metrics.confusion_counts(out['prediction'], label,
                                                     k)
    case_mean_conf[index] = metrics.confusion_counts(out['prob'].argmax(-1),
                                                     label, k)
    chains = out['chain_labels'] if ensemble else out['prediction'][None]
    for j in range(n):
      case_chain_conf[index, j] = metrics.confusion_counts(chains[j], label, k)
    case_medoid_conf[index] = (  # Of what the ensemble combines.
        metrics.confusion_counts(np.asarray(medoid(out['samples'])), label, k)
        if ensemble else case_chain_conf[index, 0])
    if ensemble:
      geds.append(metrics.generalized_energy_distance(
          out['samples'], label[None], k)['GED'])

  begin = time.time()
  out = evaluate.sample_split(cfg, state.ema_params, setup, source,
                              warmup=True, on_case=on_case,
                              return_samples=ensemble)
  summary = metrics.summarize_confusion(out['confusion'],
                                        list(source.class_names))
  cases = metrics.summarize_cases(tables, list(source.class_names))
  calib = calib.summary(cfg.eval.ece_bins, list(source.class_names))
  names = list(source.class_names)
  chains = chain_mdices(case_chain_conf.sum(0), names)
  return {'mDice': summary['mDice'], 'mIoU': summary['mIoU'],
          'mDice_mean_prob': metrics.summarize_confusion(
              case_mean_conf.sum(0), names)['mDice'],
          'mDice_medoid': metrics.summarize_confusion(
              case_medoid_conf.sum(0), names)['mDice'],
          'mDice_soft_draw': metrics.summarize_confusion(soft_conf,
                                                         names)['mDice'],
          'chain_mDice': float(np.mean(chains)),
          'chain_mDice_sd': float(np.std(chains, ddof=1)) if ensemble else None,
          'HD95': cases['HD95'],
          'ece': calib['calibration']['ece'],
          'nll': calib['calibration']['nll'],
          'error_auroc': calib['uncertainty']['error_auroc'],
          'GED': float(np.mean(geds)) if geds else None,
          'ms_per_image': 1000 * out['seconds'] / len(source),
          'images_per_sec': len(source) / out['seconds'],
          'compile_and_run_seconds': time.time() - begin,
          CASES: {'chain_conf': case_chain_conf, 'pred_conf': case_pred_conf,
                  'mean_conf': case_mean_conf, 'medoid_conf': case_medoid_conf,
                  'top': case_top}}


def diagnose(cfg, state, setup, source, num_chains: int = 1) -> dict:
  """Per step of ``cfg``'s chain: own-chain vs q(x_t|x0) prediction quality,
  and the changes of the prediction; and the mDice of the chain's label
  under each of POOLINGS. ``num_chains`` traced chains per case (one
  device); every figure is on the counts summed over them."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from spad_jax import calibration  # pylint: disable=g-import-not-at-top
  from spad_jax import diffusion  # pylint: disable=g-import-not-at-top
  from spad_jax import metrics  # pylint: disable=g-import-not-at-top
  from spad_jax import predictors  # pylint: disable=g-import-not-at-top
  k, schedule, model = cfg.data.num_classes, setup.schedule, setup.model
  params = state.ema_params
  times = diffusion.time_sequence(cfg.diffusion.num_steps, cfg.eval.num_steps)
  steps = len(times) - 1

  self_condition = cfg.model.self_condition

  denoise = predictors.denoiser(model, params)

  @jax.jit
  def chain(images, key):
    return diffusion.sample(denoise, images, key, schedule, k, times,
                            sampler=cfg.eval.sampler,
                            temperature=cfg.eval.temperature,
                            mode_last=cfg.eval.mode_last,
                            self_condition=self_condition, trace=True)

  @jax.jit
  def on_q(images, labels, t, key):
    """p̂ on x_t ~ q(x_t | label), with a self-conditioned model's own
    first estimate on the same x_t (as in training)."""
    tt = jnp.full((images.shape[0],), t, jnp.int32)
    x_q = diffusion.sample_categorical(
        key, diffusion.q_probs(jax.nn.one_hot(labels, k), t, schedule))
    xq_onehot = jax.nn.one_hot(x_q, k)
    p_prev = denoise(xq_onehot, images, tt) if self_condition else None
    return denoise(xq_onehot, images, tt, p_prev), x_q

  kinds = ('own', 'q')
  conf = {kind: np.zeros((steps, k, k), np.int64) for kind in kinds}
  calib = {kind: [calibration.Accumulator(k) for _ in range(steps)]
           for kind in kinds}
  input_errors = {kind: np.zeros(steps) for kind in kinds}
  changes = np.zeros((steps, 3), np.int64)  # changed, fixed, created.
  weights = pooling_weights(times[:-1], setup.schedule.alphas_cumprod)
  pooled_conf = {name: np.zeros((k, k), np.int64) for name in POOLINGS}
  # Per case, the sum over chains of each pooling's soft map.
  pooled_soft = {name: np.zeros(np.shape(source.labels) + (k,))
                 for name in POOLINGS}
  pixels = 0
  bs = cfg.eval.batch_size
  base_key = setup.keys()[2]
  for c, start in itertools.product(range(num_chains),
                                     range(0, len(source), bs)):
    # Chain 0 keeps the keys of the one-chain diagnosis.
    key = base_key if c == 0 else jax.random.fold_in(base_key, 1_000_000 + c)
    images = jnp.asarray(source.images[start:start + bs], jnp.float32)
    labels = np.asarray(source.labels[start:start + bs], np.int32)
    out = jax.device_get(chain(images, jax.random.fold_in(key, start)))
    for name in POOLINGS:
      soft = pooled_soft_map(out['trace_prob'], weights[name])
      pooled_conf[name] += metrics.confusion_counts(soft.argmax(-1), labels,
                                                    k)
      pooled_soft[name][start:start + bs] += soft
    previous = None
    for i in range(steps):
      x_own, p_own = out['trace_input'][i], out['trace_prob'][i]
      p_q, x_q = jax.device_get(on_q(
          images, labels, int(times[i]),
          jax.random.fold_in(jax.random.fold_in(key, start), 10_000 + i)))
      for kind, prob, x_t in (('own', p_own, x_own), ('q', p_q, x_q)):
        pred = prob.argmax(-1)
        conf[kind][i] += metrics.confusion_counts(pred, labels, k)
        input_errors[kind][i] += np.sum(x_t != labels)
        for j in range(len(labels)):
          calib[kind][i].add(prob[j], pred[j], labels[j])
      pred = p_own.argmax(-1)
      if previous is not None:
        changed = pred != previous
        changes[i] += (changed.sum(), np.sum(changed & (pred == labels)),
                       np.sum(changed & (previous == labels)))
      previous = pred
    pixels += labels.size
  names = list(source.class_names)
  pooled_calib = {}
  for name in POOLINGS:
    acc = calibration.Accumulator(k)
    for j, label in enumerate(source.labels):
      soft = pooled_soft[name][j] / num_chains
      acc.add(soft, soft.argmax(-1), label)
    pooled_calib[name] = acc.summary(cfg.eval.ece_bins, names)['calibration']
  rows = []
  for i in range(steps):
    row = {'step': i + 1, 't': int(times[i]), 's': int(times[i + 1])}
    for kind in kinds:
      summary = calib[kind][i].summary(cfg.eval.ece_bins, names)
      row.update({
          f'{kind}_mDice': metrics.summarize_confusion(conf[kind][i],
                                                       names)['mDice'],
          f'{kind}_nll': summary['calibration']['nll'],
          f'{kind}_ece': summary['calibration']['ece'],
          f'{kind}_input_error': float(input_errors[kind][i] / pixels)})
    row.update({'changed': float(changes[i, 0] / pixels),
                'fixed': float(changes[i, 1] / pixels),
                'created': float(changes[i, 2] / pixels)})
    rows.append(row)
  return {'steps': rows, 'num_chains': num_chains,
          'pooled_mDice': {name: metrics.summarize_confusion(
              pooled_conf[name], names)['mDice'] for name in POOLINGS},
          'pooled_ece': {name: pooled_calib[name]['ece'] for name in POOLINGS},
          'pooled_nll': {name: pooled_calib[name]['nll'] for name in POOLINGS}}


def run(config, workdir, steps, samples, max_cases=0, samplers=('ancestral',),
        diagnose_steps=(), diagnose_chains=1):
  """Returns (meta, rows, diagnoses): one row per setting (skipped ones
  too), one diagnosis per (sampler, diagnosed step count)."""
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top

  options_list = [parse_sampler(s) for s in samplers]
  t_max = config.diffusion.num_steps
  for options in options_list:  # Fail on a bad spec before any sampling.
    _configured(config, options, 1, 1)
  setup = train_state.Setup.from_config(config)
  state = train_state.load_eval_state(config, workdir, setup)
  source = sources.load_split(config, config.eval.split)
  if max_cases:
    source = source.head(max_cases)
  rows, diagnoses = [], []
  for options in options_list:
    name = sampler_name(options)
    for s in steps:
      for n in samples:
        row = {'name': name, **options, 'num_steps': s, 'num_samples': n}
        if s > t_max:
          row['skipped'] = f'num_steps > diffusion.num_steps ({t_max})'
          rows.append(row)
          continue
        row.update(score_setting(_configured(config, options, s, n), state,
                                 setup, source))
        logging.info('%s  steps %4d  samples %3d  mDice %.4f  ECE %.4f  '
                     '%.1f ms/image', name, s, n, row['mDice'] or 0,
                     row['ece'], row['ms_per_image'])
        rows.append(row)
    for s in diagnose_steps:
      if s > t_max:
        continue
      diagnoses.append({'name': name, **options, 'num_steps': s,
                        **diagnose(_configured(config, options, s, 1),
                                   state, setup, source, diagnose_chains)})
      logging.info('%s: diagnosed %d-step chains.', name, s)
  paired_vs_one_step(rows, list(source.class_names), config.eval.ece_bins)
  paired_vs_single(rows, list(source.class_names))
  meta = {'checkpoint_step': int(jax.device_get(state.step)),
          'num_cases': len(source), 'split': config.eval.split,
          'diffusion_steps': t_max, 'device': str(jax.devices()[0]),
          'device_count': jax.device_count(), 'jax': jax.__version__,
          'image_size': config.data.image_size,
          'eval_batch_size': config.eval.batch_size,
          'date': time.strftime('%Y-%m-%d'), 'case_ids': list(source.ids),
          'case_groups': case_groups(config, source.ids),
          'class_names': list(source.class_names),
          'ece_bins': int(config.eval.ece_bins)}
  return meta, rows, diagnoses


def case_groups(config, ids) -> list:
  """Each case's resampling group for pooled analyses: its patient where
  the folder data set names one, else the case itself."""
  if config.data.name == 'synthetic':
    return list(ids)
  from spad_jax.data import sources  # pylint: disable=g-import-not-at-top
  _, splits = sources.folder_splits(config)
  patient = {c['id']: c.get('patient', c['id'])
             for cases in splits.values() for c in cases}
  return [str(patient[i]) for i in ids]


def markdown(meta, rows, diagnoses) -> str:
  lines = [f'Checkpoint step {meta["checkpoint_step"]}, {meta["num_cases"]} '
           f'{meta["split"]} cases at {meta["image_size"]}², T = '
           f'{meta["diffusion_steps"]}, {meta["device"]} x'
           f'{meta["device_count"]}, jax {meta["jax"]}, {meta["date"]}.', '',
           'mDice: the prediction of `eval.ensemble` (majority vote unless the '
           'sampler name says mean or medoid); mean-p̂ mDice: argmax of the '
           'chains\' mean p̂; medoid mDice: the chain with the highest summed '
           'Dice to the others (`eval.ensemble=medoid`); single chains: mean ± '
           'sd over the chains of each one\'s own mDice (one sample per '
           'case); draw from p̂: the expected mDice of a label drawn pixel by '
           'pixel from the soft map.', '',
           '| sampler | steps | samples | mDice | mean-p̂ mDice | medoid mDice '
           '| single chains | draw from p̂ | mIoU | HD95 | ECE | NLL | GED '
           '| ms / image |',
           '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:'
           '|---:|']
  for r in rows:
    head = f'| {r["name"]} | {r["num_steps"]} | {r["num_samples"]} |'
    if 'skipped' in r:
      lines.append(f'{head}' + ' — |' * 10 + f' skipped: {r["skipped"]} |')
    else:
      chains = fmt(r['chain_mDice']) + (
          '' if r['chain_mDice_sd'] is None else
          f' ± {r["chain_mDice_sd"]:.4f}')
      lines.append(f'{head} {fmt(r["mDice"])} | '
                   f'{fmt(r["mDice_mean_prob"])} | '
                   f'{fmt(r.get("mDice_medoid"))} | {chains} | '
                   f'{fmt(r.get("mDice_soft_draw"))} | '
                   f'{fmt(r["mIoU"])} | '
                   f'{fmt(r["HD95"], 2)} | {fmt(r["ece"])} | '
                   f'{fmt(r["nll"])} | {fmt(r["GED"])} | '
                   f'{r["ms_per_image"]:.1f} |')
  lines += paired_table(
      rows, 'vs_one_step',
      'Against one step of the same sampler and ensemble size: differences '
      'with 95 % intervals from a paired bootstrap over cases.',
      {'chain_mDice': 'single chains − 1 step',
       'ensemble_mDice': 'ensemble − 1 step single', 'ece': 'ECE − 1 step'})
  lines += paired_table(
      rows, 'vs_single',
      "Ensembles against their own single chains: the prediction's mDice "
      "(the row's ensemble rule), the mean p̂'s and the medoid's, minus the "
      "chains' mean single-chain mDice, with 95 % intervals from a paired "
      'bootstrap over cases.',
      {'ensemble': 'ensemble − single', 'mean_prob': 'mean p̂ − single',
       'medoid': 'medoid − single'})
  for d in diagnoses:
    lines += ['', f'Chain of {d["num_steps"]} steps, {d["name"]}: '
              'prediction at each step on its own x_t vs on x_t ~ q(x_t|x0); '
              'input error = fraction of x_t pixels unlike the label; '
              'changes = fraction of pixels whose predicted class changed '
              '(fixed / created an error).', '',
              '| step | t | mDice own | mDice q | NLL own | NLL q | ECE own | '
              'ECE q | input err own | input err q | changed | fixed | '
              'created |', '|' + '---:|' * 13]
    for r in d['steps']:
      lines.append(
          f'| {r["step"]} | {r["t"]} | {fmt(r["own_mDice"])} | '
          f'{fmt(r["q_mDice"])} | {fmt(r["own_nll"])} | {fmt(r["q_nll"])} '
          f'| {fmt(r["own_ece"])} | {fmt(r["q_ece"])} | '
          f'{fmt(r["own_input_error"])} | {fmt(r["q_input_error"])} | '
          f'{fmt(r["changed"], 5)} | {fmt(r["fixed"], 5)} | '
          f'{fmt(r["created"], 5)} |')
    lines += ['', f'These chains ({d["num_chains"]} per case) pooled from '
              'their steps\' p̂: first step (one step), last step, mean of '
              'all, of the first half, of the last half, weighted by ᾱ_t of '
              'each step\'s input. mDice: each chain\'s pooled label; ECE and '
              'NLL: the soft map of their ensemble (per case, the mean over '
              'the chains of their pooled p̂).', '',
              '| | ' + ' | '.join(POOLINGS) + ' |',
              '|---|' + '---:|' * len(POOLINGS)]
    for key, title in (('pooled_mDice', 'mDice'), ('pooled_ece', 'ECE'),
                       ('pooled_nll', 'NLL')):
      if key in d:  # Diagnoses written before the calibration lack them.
        lines.append(f'| {title} | ' + ' | '.join(fmt(d[key][p])
                                                  for p in POOLINGS) + ' |')
  return '\n'.join(lines) + '\n'


def write_outputs(out_dir, meta, rows, diagnoses=()):
  """Writes the JSON, Markdown and plots, and each row's per-case arrays to
  ``sampling_cases.npz`` (``row<i>_<array>``, in ``meta['case_ids']``
  order) for pooled analyses such as bench/pool_folds.py."""
  from spad_jax import files  # pylint: disable=g-import-not-at-top
  from spad_jax import visualize  # pylint: disable=g-import-not-at-top
  os.makedirs(out_dir, exist_ok=True)
  arrays = {f'row{i}_{name}': r[CASES][name] for i, r in enumerate(rows)
            if r.get(CASES) is not None for name in ARRAYS}
  rows = [{k: v for k, v in r.items() if k != CASES} for r in rows]
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  files.write_atomic(os.path.join(out_dir, CASES_FILE), buffer.getvalue())
  files.write_json(os.path.join(out_dir, 'sampling_curve.json'),
                   {'meta': meta, 'rows': rows, 'diagnoses': list(diagnoses)})
  files.write_atomic(os.path.join(out_dir, 'sampling_curve.md'),
                     markdown(meta, rows, diagnoses))
  plt = visualize.pyplot()
  fig, ax = plt.subplots(figsize=(6.5, 4))
  done = [r for r in rows if 'skipped' not in r]
  for name in dict.fromkeys(r['name'] for r in done):
    for n in sorted({r['num_samples'] for r in done}):
      pts = sorted((r for r in done if r['num_samples'] == n and
                    r['name'] == name), key=lambda r: r['num_steps'])
      if not pts:
        continue
      ax.plot([r['num_steps'] for r in pts], [r['mDice'] for r in pts],
              'o-', label=f'{name}, {n} sample(s)')
  ax.set_xscale('log')
  ax.set_xlabel('sampling steps (log scale)')
  ax.set_ylabel('foreground mDice')
  ax.set_title(f'Accuracy against sampling steps, T = '
               f'{meta["diffusion_steps"]}', fontsize=9)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'sampling_curve.png'), dpi=120)
  plt.close(fig)
  if not diagnoses:
    return
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for d in diagnoses:
    label = f'{d["name"]}, {d["num_steps"]} steps'
    ts = [r['t'] for r in d['steps']]
    line, = axes[0].plot(ts, [r['own_mDice'] for r in d['steps']], 'o-',
                         label=f'{label}: own x_t')
    axes[0].plot(ts, [r['q_mDice'] for r in d['steps']], 's--',
                 color=line.get_color(), label=f'{label}: q(x_t|x0)')
    axes[1].plot(ts, [r['fixed'] for r in d['steps']], 'o-',
                 color=line.get_color(), label=f'{label}: fixed')
    axes[1].plot(ts, [r['created'] for r in d['steps']], 'x--',
                 color=line.get_color(), label=f'{label}: created')
  axes[0].set_ylabel('mDice of argmax p̂ at t')
  axes[1].set_ylabel('fraction of pixels')
  axes[1].set_yscale('symlog', linthresh=1e-5)
  for ax in axes:
    ax.set_xlabel('t (the chain runs right to left)')
    ax.invert_xaxis()
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
  axes[0].set_title('Exposure bias: own chain vs training distribution',
                    fontsize=9)
  axes[1].set_title('Prediction changes per step', fontsize=9)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, 'sampling_diagnosis.png'), dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  steps = sorted({int(s) for s in FLAGS.steps})
  samples = sorted({int(n) for n in FLAGS.samples})
  meta, rows, diagnoses = run(
      FLAGS.config, FLAGS.workdir, steps, samples, FLAGS.max_cases,
      FLAGS.samplers, sorted({int(s) for s in FLAGS.diagnose_steps}),
      FLAGS.diagnose_chains)
  out = FLAGS.out or os.path.join(FLAGS.workdir, 'bench')
  write_outputs(out, meta, rows, diagnoses)
  print(open(os.path.join(out, 'sampling_curve.md')).read())


if __name__ == '__main__':
  app.run(main)
