"""--mode=predict on a folder of images and --mode=evaluate's per-case files."""

import csv
import json
import os

import cv2
import numpy as np
import pytest
from scipy import stats

from conftest import reference_mdice
from conftest import run_main
from conftest import tiny_config
from conftest import trained_tiny_copy
from spad_jax.data import synthetic

TINY = '--config=tests/tiny_config.py'
CLASSES = synthetic.CLASS_NAMES


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """This module's copy of a tiny workdir trained for one epoch (4 steps)."""
  return trained_tiny_copy(str(tmp_path_factory.mktemp('predict') / 'run'))


def synthetic_case(index, hw, seed=99):
  """A synthetic B-scan and label resized to ``hw`` (not the model size)."""
  image, label = synthetic.generate_case(seed, 'test', index, 32)
  wh = (hw[1], hw[0])
  return (cv2.resize(image, wh, interpolation=cv2.INTER_LINEAR),
          cv2.resize(label, wh, interpolation=cv2.INTER_NEAREST))


def write_images(folder, sizes):
  os.makedirs(folder, exist_ok=True)
  names = []
  for i, hw in enumerate(sizes):
    image = synthetic_case(i, hw)[0]
    if i % 2:  # Some RGB inputs; the model reads gray (data.channels = 1).
      image = np.repeat(image[..., None], 3, axis=-1)
    name = f'scan_{i}.png'
    cv2.imwrite(os.path.join(folder, name), image)
    names.append(name)
  return names


def test_predict_folder_cli(trained, tmp_path):
  inputs, outputs = tmp_path / 'in', tmp_path / 'out'
  sizes = [(20, 28), (33, 17), (16, 16)]
  names = write_images(inputs, sizes)
  (inputs / 'corrupt.png').write_bytes(b'not a png at all')
  (inputs / 'notes.txt').write_text('not an image; ignored')
  args = [TINY, f'--workdir={trained}', '--mode=predict', f'--input={inputs}',
          f'--output={outputs}', '--config.eval.num_samples=2',
          '--config.eval.batch_size=2', '--save_npy']
  first = run_main(args)
  assert first.returncode == 1, first.stderr[-3000:]  # corrupt.png.
  assert 'corrupt.png' in first.stderr and 'unreadable' in first.stderr
  assert 'wrote 3' in first.stdout
  for name, (h, w) in zip(names, sizes):
    stem = name[:-4]
    label = cv2.imread(str(outputs / f'{stem}_label.png'), cv2.IMREAD_UNCHANGED)
    assert label.shape == (h, w) and label.dtype == np.uint8
    assert label.max() < len(CLASSES)
    for kind in ('overlay', 'uncertainty'):
      assert cv2.imread(str(outputs / f'{stem}_{kind}.png')).shape == (h, w, 3)
    entropy = np.load(outputs / f'{stem}_entropy.npy')
    assert entropy.shape == (h, w) and entropy.dtype == np.float32
    # Two samples: the ensemble's entropy is at most log 2.
    assert entropy.min() >= 0 and entropy.max() <= np.log(2) + 1e-6
  assert not (outputs / 'corrupt_label.png').exists()
  assert not (outputs / 'notes_label.png').exists()
  log = [json.loads(line) for line in open(outputs / 'predict_log.jsonl')]
  assert log[-1]['written'] == 3 and log[-1]['skipped'] == 0
  assert [f['path'] for f in log[-1]['failed']] == [str(inputs / 'corrupt.png')]
  assert log[-1]['sampling']['num_samples'] == 2
  assert log[-1]['checkpoint_step'] == 4

  # Again without --overwrite: nothing is rewritten (--overwrite is tested
  # in process below, where the compilation is reused).
  os.remove(inputs / 'corrupt.png')
  stamps = {p: os.stat(outputs / p).st_mtime_ns for p in os.listdir(outputs)
            if p.endswith(('.png', '.npy'))}
  assert len(stamps) == 4 * len(names)
  # (With the chains' label picked on the config's validation split, which
  # the log records.)
  again = run_main(args + ['--config.eval.chain_label=auto'])
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'wrote 0' in again.stdout and 'skipped 3' in again.stdout
  assert all(os.stat(outputs / p).st_mtime_ns == t for p, t in stamps.items())
  log = [json.loads(line) for line in open(outputs / 'predict_log.jsonl')]
  pick = log[-1]['chain_label_auto']
  assert pick['split'] == 'val' and pick['num_cases'] == 8
  assert pick['picked'] == max(pick['val_mDice'], key=pick['val_mDice'].get)
  assert log[-1]['sampling']['chain_label'] == pick['picked']


def test_predict_needs_input_and_output(tmp_path):
  result = run_main([TINY, f'--workdir={tmp_path}', '--mode=predict',
                     f'--input={tmp_path}'])
  assert result.returncode == 2
  assert '--output' in result.stderr


def make_folder_dataset(root, sizes):
  """Test cases at original sizes ``sizes`` with a second rater for all and
  a third for the first case (``annotations/<rater>/<case>.png``)."""
  for sub in ('images', 'labels', 'annotations/rater_b', 'annotations/rater_c'):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  cases = []
  for i, hw in enumerate(sizes):
    image, label = synthetic_case(i, hw, seed=7)
    case = f'case{i}'
    cv2.imwrite(os.path.join(root, 'images', case + '.png'), image)
    cv2.imwrite(os.path.join(root, 'labels', case + '.png'), label)
    cv2.imwrite(os.path.join(root, 'annotations/rater_b', case + '.png'),
                np.roll(label, 2, axis=1))
    if i == 0:
      cv2.imwrite(os.path.join(root, 'annotations/rater_c', case + '.png'),
                  np.roll(label, -1, axis=0))
    cases.append({'id': case, 'split': 'test' if i < 4 else 'train'})
  with open(os.path.join(root, 'dataset.json'), 'w') as f:
    json.dump({'name': 'tiny', 'labels': {n: c for c, n in enumerate(CLASSES)},
               'cases': cases}, f)


def test_evaluate_writes_per_case_ged_and_overlays(trained, tmp_path):
  root = str(tmp_path / 'data')
  sizes = [(24, 40)] * 6  # Test cases 0-3 (model size 16).
  make_folder_dataset(root, sizes)
  result = run_main([TINY, f'--workdir={trained}', '--mode=evaluate',
                     '--config.data.name=folder', f'--config.data.root={root}',
                     '--config.eval.num_samples=3',
                     '--config.eval.spacing=(0.5, 2.0)'])
  assert result.returncode == 0, result.stderr[-3000:]
  metrics = json.load(open(os.path.join(trained, 'metrics.json')))
  with open(os.path.join(trained, 'per_case.csv')) as f:
    rows = list(csv.DictReader(f))
  assert list(rows[0]) == ['case', 'class', 'Dice', 'IoU', 'HD95', 'ASSD',
                           'missed', 'spurious', 'label_px', 'pred_px',
                           'overlap_px', 'mean_uncertainty']
  # Calibration and uncertainty sections (their maths: test_calibration.py).
  cal, unc = metrics['calibration'], metrics['uncertainty']
  assert cal['pixels'] == 4 * 16 * 16
  for key in ('ece', 'mce', 'brier', 'nll'):
    assert np.isfinite(cal[key]) and cal[key] >= 0, key
  assert cal['ece'] <= cal['mce']
  assert set(cal['per_class']) == set(CLASSES)
  assert unc['error_auroc'] is None or 0 <= unc['error_auroc'] <= 1
  assert unc['coverage'][0]['coverage'] == 1.0
  for png in ('reliability.png', 'coverage.png'):
    assert cv2.imread(os.path.join(trained, png)) is not None, png
  # The case-level correlation is the one of the CSV's columns.
  by_case = {}
  for r in rows:
    by_case.setdefault(r['case'], (float(r['mean_uncertainty']), []))[1].append(
        float(r['Dice']))
  u = [v[0] for v in by_case.values()]
  d = [np.mean(v[1]) for v in by_case.values()]
  assert all(0 <= x <= 1 for x in u)
  if unc['case_dice_spearman'] is not None:
    assert unc['case_dice_spearman'] == pytest.approx(
        stats.spearmanr(u, d).statistic)
  # Labels as the model saw them (nearest-neighbour to 16²).
  labels = {f'case{i}': cv2.resize(synthetic_case(i, sizes[i], seed=7)[1],
                                   (16, 16), interpolation=cv2.INTER_NEAREST)
            for i in range(4)}
  expected = {(c, CLASSES[k]) for c, lab in labels.items()
              for k in np.unique(lab) if k > 0}
  got = {(r['case'], r['class']) for r in rows}
  assert expected and expected <= got  # Every class of every label is scored.
  diagonal = np.hypot(24 * 0.5, 40 * 2.0)
  for r in rows:
    in_label = CLASSES.index(r['class']) in labels[r['case']]
    assert int(r['spurious']) == (not in_label)
    assert float(r['HD95']) <= diagonal + 1e-3
    if r['missed'] == '1' or r['spurious'] == '1':
      assert float(r['Dice']) == 0 and float(r['IoU']) == 0
      assert float(r['HD95']) == pytest.approx(diagonal, rel=1e-5)
      assert float(r['ASSD']) == pytest.approx(diagonal, rel=1e-5)
    else:
      assert 0 < float(r['Dice']) <= 1
  # The summary's per-case means are those of the CSV.
  summary = metrics['per_case_mean']
  class_means = []
  for name in CLASSES[1:]:
    dices = [float(r['Dice']) for r in rows if r['class'] == name]
    entry = summary['per_class'][name]
    assert entry['cases'] == len(dices)
    assert entry['missed'] == sum(r['missed'] == '1' for r in rows
                                  if r['class'] == name)
    if dices:
      assert entry['Dice'] == pytest.approx(np.mean(dices), abs=1e-5)
      class_means.append(entry['Dice'])
  assert summary['Dice'] == pytest.approx(np.mean(class_means))
  assert metrics['distance_unit'] == 'eval.spacing units'
  assert metrics['num_cases'] == 4
  # Several annotations: GED over the 4 test cases, 3 raters for case0.
  multi = metrics['multi_annotation']
  assert multi['num_cases'] == 4
  assert multi['per_case']['case0']['num_annotations'] == 3
  assert multi['per_case']['case1']['num_annotations'] == 2
  for entry in multi['per_case'].values():
    assert entry['GED'] == pytest.approx(
        2 * entry['cross'] - entry['sample_diversity'] -
        entry['annotation_diversity'])
    assert entry['annotation_diversity'] > 0  # The raters differ.
  # Overlays of the best and worst cases, at the original aspect ratio.
  overlays = sorted(os.listdir(os.path.join(trained, 'overlays')))
  scored = {r['case'] for r in rows}
  k = min(3, len(scored))
  assert [o.split('_')[0] for o in overlays] == ['best'] * k + ['worst'] * k
  panel = cv2.imread(os.path.join(trained, 'overlays', overlays[0]))
  assert panel.shape == (24 + round(384 * 24 / 40), 4 * 384, 3)


def test_to_original_upsamples_like_nearest_at_twice_the_size():
  from spad_jax import predict
  rng = np.random.default_rng(0)
  label = rng.integers(0, 4, (8, 8))
  soft = np.eye(4, dtype=np.float32)[label]
  out, entropy = predict.to_original(soft, np.zeros((8, 8)), (16, 16))
  np.testing.assert_array_equal(out, np.kron(label, np.ones((2, 2), int)))
  assert entropy.shape == (16, 16) and not entropy.any()
  # Non-square original sizes come back as (height, width).
  assert predict.to_original(soft, np.zeros((8, 8)), (5, 13))[0].shape == (5, 13)


def test_one_compilation_for_all_image_sizes(tmp_path):
  """In process: mixed sizes and a padded last batch reuse one compiled
  sampler; the same image gets the same outputs again (explicit keys)."""
  import jax
  from spad_jax import predict
  from spad_jax import predictors
  from spad_jax import train_state
  import tiny_config
  config = tiny_config.get_config()
  config.eval.num_samples, config.eval.batch_size = 2, 2
  setup = train_state.Setup.from_config(config)
  params = train_state.create_train_state(config, setup.model, setup.keys()[0],
                                    1).ema_params
  fn = predictors.make_predict_fn(config, setup.model, setup.schedule)
  sizes = [(20, 28), (33, 17), (16, 16), (40, 9), (64, 48)]
  names = write_images(tmp_path / 'in', sizes)
  paths = [str(tmp_path / 'in' / n) for n in names]
  (tmp_path / 'in' / 'empty.png').write_bytes(b'')
  compiles = []
  listener = lambda name, *a, **k: compiles.append(name) if name.endswith(
      'backend_compile_duration') else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    first = predict.predict_paths(config, setup, params, paths[:2],
                                  str(tmp_path / 'a'), predict_fn=fn)
    assert first.written == paths[:2] and not first.failed
    assert compiles  # The listener sees the sampler's compilation...
    compiles.clear()
    summary = predict.predict_paths(
        config, setup, params, paths + [str(tmp_path / 'in' / 'empty.png')],
        str(tmp_path / 'b'), predict_fn=fn)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []  # ...and none for 3 batches of 5 sizes.
  assert summary.written == paths
  assert [p for p, _ in summary.failed] == [str(tmp_path / 'in' / 'empty.png')]
  assert 'empty.png' in summary.failed[0][1]
  for name, (h, w) in zip(names, sizes):
    label = cv2.imread(str(tmp_path / 'b' / (name[:-4] + '_label.png')),
                       cv2.IMREAD_UNCHANGED)
    assert label.shape == (h, w)
  read = lambda d, name: cv2.imread(str(tmp_path / d / name),
                                    cv2.IMREAD_UNCHANGED)
  np.testing.assert_array_equal(read('a', 'scan_0_label.png'),
                                read('b', 'scan_0_label.png'))

  # Existing outputs are kept unless overwrite; rewritten ones are identical.
  outputs = sorted(os.listdir(tmp_path / 'b'))
  stamps = {p: os.stat(tmp_path / 'b' / p).st_mtime_ns for p in outputs}
  before = {p: read('b', p) for p in outputs if p.endswith('.png')}
  kept = predict.predict_paths(config, setup, params, paths,
                               str(tmp_path / 'b'), predict_fn=fn)
  assert kept.skipped == paths and not kept.written
  assert all(os.stat(tmp_path / 'b' / p).st_mtime_ns == stamps[p]
             for p in outputs)
  redone = predict.predict_paths(config, setup, params, paths,
                                 str(tmp_path / 'b'), overwrite=True,
                                 predict_fn=fn)
  assert redone.written == paths and not redone.skipped
  assert sorted(os.listdir(tmp_path / 'b')) == outputs  # No temporary files.
  for p, image in before.items():
    assert os.stat(tmp_path / 'b' / p).st_mtime_ns != stamps[p]
    np.testing.assert_array_equal(read('b', p), image)


def test_nifti_inputs_are_listed_with_their_stems(tmp_path):
  from spad_jax import predict
  from spad_jax.data import folder
  from spad_jax.data import nifti
  image = np.arange(12, dtype=np.float32).reshape(3, 4)
  nifti.write(str(tmp_path / 'scan.nii.gz'), image)
  (tmp_path / 'notes.txt').write_text('x')
  images, other = predict.list_inputs(str(tmp_path))
  assert images == [str(tmp_path / 'scan.nii.gz')]
  assert other == [str(tmp_path / 'notes.txt')]
  out = predict.output_paths(str(tmp_path / 'out'), images[0], False)
  assert out['label'].endswith('/scan_label.png')
  read = folder.read_image(images[0], 1)[..., 0]
  np.testing.assert_allclose(read, image / 11, atol=1e-4)


def test_corrupted_evaluation_and_the_robustness_sweep(trained):
  clean = os.path.join(trained, 'metrics.json')
  before = open(clean).read() if os.path.exists(clean) else None
  result = run_main([TINY, f'--workdir={trained}', '--mode=evaluate',
                     '--config.eval.corruption=blur',
                     '--config.eval.severity=3'])
  assert result.returncode == 0, result.stderr[-3000:]
  out = os.path.join(trained, 'corruptions', 'blur_s3')
  metrics = json.load(open(os.path.join(out, 'metrics.json')))
  assert metrics['corruption'] == {'name': 'blur', 'severity': 3}
  assert os.path.exists(os.path.join(out, 'per_case.csv'))
  # The clean evaluation's outputs are untouched.
  assert (open(clean).read() if os.path.exists(clean) else None) == before
  # The sweep: every corruption x severity plus clean, in one command;
  # blur_s3 (same checkpoint and sampler) is reused, not sampled again.
  stamp = os.path.getmtime(os.path.join(out, 'metrics.json'))
  result = run_main([TINY, f'--workdir={trained}', '--mode=robustness'])
  assert result.returncode == 0, result.stderr[-3000:]
  assert os.path.getmtime(os.path.join(out, 'metrics.json')) == stamp
  with open(os.path.join(trained, 'robustness.csv')) as f:
    rows = list(csv.DictReader(f))
  from spad_jax.data import corruptions  # pylint: disable=g-import-not-at-top
  assert [(r['corruption'], int(r['severity'])) for r in rows] == (
      [('none', 0)] + [(n, s) for n in corruptions.SEVERITIES
                       for s in range(1, 6)])
  row = next(r for r in rows if r['corruption'] == 'blur' and
             r['severity'] == '3')
  assert float(row['mDice']) == pytest.approx(metrics['mDice'], abs=1e-6)
  for png in ('robustness.png', 'corruption_examples.png'):
    assert cv2.imread(os.path.join(trained, png)) is not None, png
  # Figures for the clean split only; numbers for every corruption.
  swept = os.path.join(trained, 'corruptions', 'gamma_s2')
  assert os.path.exists(os.path.join(swept, 'per_case.csv'))
  assert not os.path.exists(os.path.join(swept, 'reliability.png'))
  assert cv2.imread(os.path.join(trained, 'corruptions', 'none_s0',
                                 'reliability.png')) is not None


def _random_outputs(params):
  """``params`` plus fixed Gaussian noise: the zero-initialised output
  layer would give every pixel the same p̂, and chains nothing to draw."""
  import jax  # pylint: disable=g-import-not-at-top
  return jax.tree.map(lambda x: x + 0.3 * np.asarray(
      np.random.default_rng(0).normal(size=x.shape), x.dtype), params)


def _random_model(config):
  """config's Setup, a fresh train state and ``_random_outputs`` of its
  parameters (unreplicated)."""
  import jax  # pylint: disable=g-import-not-at-top
  from spad_jax import train_state  # pylint: disable=g-import-not-at-top
  setup = train_state.Setup.from_config(config)
  state = train_state.create_train_state(config, setup.model,
                                         jax.random.key(1), 1)
  return setup, state, _random_outputs(state.params)


def test_one_predictor_per_sampling_setting():
  """Validation, evaluation and the benches share compiled samplers by
  setting; any key the sampler reads gives its own."""
  from spad_jax import diffusion
  from spad_jax import predictors
  from spad_jax import train_state
  config = tiny_config()
  setup = train_state.Setup.from_config(config)
  base = predictors.cached(config, setup)
  assert predictors.cached(config.copy_and_resolve_references(),
                            setup) is base
  seen = [base]
  other_sampler = ('ancestral' if config.eval.sampler == 'x0_resample' else
                   'x0_resample')
  other_ensembles = [('ensemble', e) for e in diffusion.ENSEMBLES
                     if e != config.eval.ensemble]
  for key, value in [('num_steps', 3), ('num_samples', 2),
                     ('sampler', other_sampler), ('temperature', 0.5),
                     ('mode_last', 1), *other_ensembles,
                     ('soft_map', 'chain_mean'), ('chain_label', 'soft_map'),
                     ('chain_label', 'chain_mean'), ('ensemble_of', 'last')]:
    other = config.copy_and_resolve_references()
    other.eval[key] = value
    fn = predictors.cached(other, setup)
    assert all(fn is not s for s in seen), key
    seen.append(fn)
  assert predictors.cached(config, setup, return_samples=True) is not base


def test_chains_depend_on_seed_and_case_only():
  """A case samples the same in any batch position or batch size, an
  ensemble of 3 holds the single chain, and another case id draws others."""
  import jax
  from spad_jax import predictors
  from spad_jax import train_state
  config = tiny_config()
  setup, _, params = _random_model(config)
  params = train_state.replicate(params)
  s = config.data.image_size
  images = np.random.default_rng(1).normal(size=(4, s, s, 1)).astype(
      np.float32)
  ids = predictors.case_key_ids(['a', 'b', 'c', 'd'])
  key = jax.random.key(7)

  def run(n, order, samples=False, soft_map='last', chain_label='last',
          ensemble='vote', ensemble_of='chain_label'):
    cfg = config.copy_and_resolve_references()
    cfg.eval.num_samples = n
    cfg.eval.ensemble = ensemble
    cfg.eval.soft_map = soft_map
    cfg.eval.chain_label = chain_label
    cfg.eval.ensemble_of = ensemble_of
    fn = predictors.make_predict_fn(cfg, setup.model, setup.schedule,
                                  return_samples=samples)
    out = jax.device_get(fn(params, images[order][None], key,
                            ids[order][None]))
    inverse = np.argsort(order)
    return {k: v[0][inverse] for k, v in out.items()}

  base = run(1, np.arange(4), samples=True)
  for order in ([3, 1, 0, 2], [2, 3]):
    order = np.asarray(order)
    again = run(1, order, samples=True)
    np.testing.assert_array_equal(again['samples'],
                                  base['samples'][np.sort(order)])
  three = run(3, np.arange(4), samples=True)
  np.testing.assert_array_equal(three['samples'][:, :1], base['samples'])
  assert np.any(three['samples'][:, 1] != three['samples'][:, 0])
  # The same image under another case id is another chain.
  other = dict(run(1, np.arange(4), samples=True))
  ids = predictors.case_key_ids(['e', 'f', 'g', 'h'])
  moved = run(1, np.arange(4), samples=True)
  assert np.any(moved['samples'] != other['samples'])
  assert predictors.case_key_ids(['a'])[0] == predictors.case_key_ids(['a'])[0]
  # The chains' mean soft map changes what is reported, not what is drawn.
  ids = predictors.case_key_ids(['a', 'b', 'c', 'd'])
  averaged = run(3, np.arange(4), samples=True, soft_map='chain_mean')
  np.testing.assert_array_equal(averaged['samples'], three['samples'])
  assert np.abs(averaged['prob'] - three['prob']).max() > 1e-3
  np.testing.assert_allclose(averaged['prob'].sum(-1), 1, atol=1e-5)
  # A chain labelled by its soft map: the argmax of its final p̂ is its
  # usual label; of its steps' mean p̂, that mean's argmax (one chain: the
  # reported soft map is its own).
  same = run(1, np.arange(4), samples=True, chain_label='soft_map')
  np.testing.assert_array_equal(same['samples'], base['samples'])
  one_mean = run(1, np.arange(4), samples=True, soft_map='chain_mean')
  pooled = run(1, np.arange(4), samples=True, soft_map='chain_mean',
               chain_label='soft_map')
  np.testing.assert_array_equal(pooled['samples'][:, 0],
                                one_mean['prob'].argmax(-1))
  assert np.any(pooled['samples'] != base['samples'])
  np.testing.assert_array_equal(pooled['prob'], one_mean['prob'])
  # An ensemble of the chains' samples: it votes the final p̂'s labels (the
  # same vote as chains labelled by them), while each chain's own label is
  # still its pooled one; one chain stays its own label.
  pooled3 = run(3, np.arange(4), samples=True, soft_map='chain_mean',
                chain_label='soft_map')
  of_last = run(3, np.arange(4), samples=True, soft_map='chain_mean',
                chain_label='soft_map', ensemble_of='last')
  for name in ('samples', 'prediction', 'soft', 'prob'):
    np.testing.assert_array_equal(of_last[name], averaged[name])
  np.testing.assert_array_equal(of_last['chain_labels'], pooled3['samples'])
  np.testing.assert_array_equal(pooled3['chain_labels'], pooled3['samples'])
  assert np.any(of_last['chain_labels'] != of_last['samples'])
  alone = run(1, np.arange(4), samples=True, soft_map='chain_mean',
              chain_label='soft_map', ensemble_of='last')
  for name in ('samples', 'chain_labels', 'prediction'):
    np.testing.assert_array_equal(alone[name], pooled[name])
  # The pooled label whatever the soft map: the soft map stays the final
  # p̂, the labels are those of the chain-mean soft map.
  kept = run(3, np.arange(4), samples=True, chain_label='chain_mean',
             ensemble_of='last')
  np.testing.assert_array_equal(kept['chain_labels'], pooled3['samples'])
  for name in ('samples', 'prediction', 'soft', 'prob'):
    np.testing.assert_array_equal(kept[name], three[name])
  # The medoid ensemble: the same chains; each case's prediction is the
  # chain the independent loop of the diffusion tests picks; the soft map
  # is the vote's.
  medoid = run(3, np.arange(4), samples=True, ensemble='medoid')
  np.testing.assert_array_equal(medoid['samples'], three['samples'])
  np.testing.assert_array_equal(medoid['soft'], three['soft'])
  from test_diffusion import _medoid_reference
  k = config.data.num_classes
  for b in range(4):
    chosen = _medoid_reference(three['samples'][b], k)
    np.testing.assert_array_equal(medoid['prediction'][b],
                                  three['samples'][b, chosen])


def test_candidate_labels_match_their_own_samplers():
  """One pass with ``candidates`` gives, for every chain label, exactly the
  prediction of that label's own sampler (the same draws), one chain or an
  ensemble; a label that is not a chain label, or a model without
  chains, is refused by name."""
  import jax
  from spad_jax import diffusion
  from spad_jax import predictors
  from spad_jax import train_state
  config = tiny_config()
  setup, _, params = _random_model(config)
  params = train_state.replicate(params)
  s = config.data.image_size
  images = np.random.default_rng(2).normal(size=(1, 3, s, s, 1)).astype(
      np.float32)
  ids = predictors.case_key_ids(['a', 'b', 'c'])[None]
  key = jax.random.key(3)
  labels = diffusion.CHAIN_LABELS
  for n, ensemble, soft_map in ((1, 'vote', 'last'),
                                (3, 'medoid', 'chain_mean')):
    cfg = config.copy_and_resolve_references()
    cfg.eval.num_samples = n
    cfg.eval.ensemble = ensemble
    cfg.eval.soft_map = soft_map
    fn = predictors.make_predict_fn(cfg, setup.model, setup.schedule,
                                    candidates=labels)
    both = jax.device_get(fn(params, images, key, ids))
    assert both['candidates'].shape == (1, 3, len(labels), s, s)
    predictions = []
    for i, label in enumerate(labels):
      alone = predictors.make_predict_fn(
          predictors.with_chain_label(cfg, label), setup.model,
          setup.schedule)
      own = jax.device_get(alone(params, images, key, ids))['prediction']
      np.testing.assert_array_equal(both['candidates'][:, :, i], own)
      predictions.append(own)
    # The chain's main outputs are its own label's ('last' by default).
    np.testing.assert_array_equal(both['prediction'], predictions[0])
    assert np.any(predictions[0] != predictions[2]), (n, ensemble)
  with pytest.raises(ValueError, match="candidate 'auto'"):
    predictors.make_predict_fn(config, setup.model, setup.schedule,
                               candidates=('last', 'auto'))
  unet_config = config.copy_and_resolve_references()
  unet_config.model.kind = 'deterministic'
  with pytest.raises(ValueError, match="model.kind='deterministic'"):
    predictors.make_predict_fn(unet_config, setup.model, setup.schedule,
                               candidates=('last',))


def test_auto_chain_label_is_picked_on_validation(tmp_path):
  """eval.chain_label='auto' scores each candidate label on the validation
  split, picks the best, and then evaluates, validates and predicts exactly
  as the picked label would; the record says what each scored."""
  import jax
  from spad_jax import config_validation
  from spad_jax import evaluate
  from spad_jax import predictors
  from spad_jax import train
  from spad_jax import train_state
  from spad_jax.data import sources
  config = tiny_config()
  config.eval.chain_label = 'auto'
  config_validation.validate(config)
  # Random outputs give chains whose final and pooled labels differ.
  setup, state, params = _random_model(config)
  state = state.replace(params=params, ema_params=params)
  with pytest.raises(ValueError, match='eval.chain_label'):
    predictors.make_predict_fn(config, setup.model, setup.schedule)

  # The reference: each candidate's val predictions from its fixed-label
  # sampler, with the keys evaluation uses, scored here.
  val = sources.load_split(config, 'val')
  k = config.data.num_classes
  expected = {}
  for label in predictors.AUTO_CHAIN_LABELS:
    fn = predictors.make_predict_fn(
        predictors.with_chain_label(config, label), setup.model,
        setup.schedule)
    out = jax.device_get(fn(train_state.replicate(params),
                            np.asarray(val.images)[None], setup.keys()[2],
                            predictors.case_key_ids(val.ids)[None]))
    expected[label] = reference_mdice(out['prediction'][0],
                                     np.asarray(val.labels), k)
  # Different pixel counts: the pick is decided by more than rounding.
  assert abs(expected['last'] - expected['chain_mean']) > 1e-6, expected
  best = max(predictors.AUTO_CHAIN_LABELS, key=expected.get)

  resolved, record = evaluate.resolve_chain_label(config, params, setup)
  assert resolved.eval.chain_label == record['picked'] == best
  assert record['num_cases'] == len(val)
  for label, value in expected.items():
    assert record['val_mDice'][label] == pytest.approx(value, abs=1e-9)
  fixed, none = evaluate.resolve_chain_label(resolved, params, setup)
  assert fixed is resolved and none is None

  # Evaluation with 'auto' equals evaluation with the picked label.
  auto_dir, fixed_dir = str(tmp_path / 'auto'), str(tmp_path / 'fixed')
  auto = evaluate.evaluate(config, auto_dir, state=state, setup=setup,
                           figures=False)
  same = evaluate.evaluate(resolved, fixed_dir, state=state, setup=setup,
                           figures=False)
  assert auto['mDice'] == same['mDice']
  assert auto['sampling'] == same['sampling']
  assert auto['chain_label_auto']['picked'] == best
  assert 'chain_label_auto' not in same
  assert (open(os.path.join(auto_dir, 'per_case.csv')).read() ==
          open(os.path.join(fixed_dir, 'per_case.csv')).read())
  written = json.load(open(os.path.join(auto_dir, 'metrics.json')))
  assert written['chain_label_auto']['val_mDice'] == record['val_mDice']

  # Validation during training reports the picked label's figures (so the
  # best checkpoint is chosen with it) and every candidate's.
  class Scalars:
    def __init__(self):
      self.scalars = {}

    def write_scalars(self, step, values):
      self.scalars.update(values)

    def write_images(self, step, images):
      del step, images

  rec = Scalars()
  replicated = state.replace(ema_params=train_state.replicate(params))
  result = train.validate(config, str(tmp_path / 'train'), setup, replicated,
                          val, 0, rec, None)
  assert result['mDice'] == pytest.approx(expected[best], abs=1e-9)
  assert result['chain_label_auto']['picked'] == best
  for label, value in expected.items():
    assert rec.scalars[f'val_mDice_{label}'] == pytest.approx(value,
                                                               abs=1e-9)


def test_train_split_monitor_scores_the_first_training_cases():
  """train.monitor_train_cases: the logged train_mDice is the dataset mDice
  of the first training cases under the chains' final labels, whatever
  eval.chain_label, scored here independently."""
  import jax
  from spad_jax import predictors
  from spad_jax import train
  from spad_jax import train_state
  from spad_jax.data import sources
  config = tiny_config()
  config.eval.chain_label = 'auto'
  setup, state, params = _random_model(config)
  head = sources.load_split(config, 'train').head(3)
  fn = predictors.make_predict_fn(predictors.with_chain_label(config, 'last'),
                                  setup.model, setup.schedule)
  out = jax.device_get(fn(train_state.replicate(params),
                          np.asarray(head.images)[None], setup.keys()[2],
                          predictors.case_key_ids(head.ids)[None]))
  expected = reference_mdice(out['prediction'][0], np.asarray(head.labels),
                            config.data.num_classes)

  class Scalars:
    def __init__(self):
      self.scalars = {}

    def write_scalars(self, step, values):
      self.scalars[step] = values

  rec = Scalars()
  replicated = state.replace(ema_params=train_state.replicate(params))
  value = train.monitor_train(config, setup, replicated, head, 7, rec)
  assert value == pytest.approx(expected, abs=1e-9)
  assert rec.scalars[7]['train_mDice'] == pytest.approx(expected, abs=1e-9)


def test_auto_chain_label_on_one_and_four_devices(trained, tmp_path):
  """The pick and the evaluation it leads to are the same on 1 and 4
  devices: every chain is keyed by its case."""
  import shutil
  results = []
  for devices in (1, 4):
    workdir = str(tmp_path / f'd{devices}')
    shutil.copytree(trained, workdir)
    run = run_main([TINY, f'--workdir={workdir}', '--mode=evaluate',
                    '--config.eval.chain_label=auto'], devices=devices)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "eval.chain_label='auto' on 8 val cases" in run.stderr
    results.append(json.load(open(os.path.join(workdir, 'metrics.json'))))
  one, four = results
  assert one['chain_label_auto']['picked'] == four['chain_label_auto'][
      'picked']
  assert one['chain_label_auto']['val_mDice'] == four['chain_label_auto'][
      'val_mDice']
  assert one['sampling'] == four['sampling']
  assert one['sampling']['chain_label'] == one['chain_label_auto']['picked']
  assert one['mDice'] == four['mDice']
