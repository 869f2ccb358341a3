"""Image corruptions for robustness evaluation: determinism, range, the
parameters of the severity table, and config errors naming the key."""

import numpy as np
import pytest

from configs import demo
from spad_jax import config_validation
from spad_jax.data import corruptions


def _image(seed=0, h=48, w=40):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:h, :w]
  # A bright disc (edges) over fine texture: what blur and resampling erase.
  base = 0.25 + 0.5 * ((yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (h / 4) ** 2)
  return np.clip(base + rng.normal(0, 0.05, (h, w)), 0, 1)[..., None]


@pytest.mark.parametrize('name', corruptions.SEVERITIES)
def test_deterministic_in_range_and_worse_with_severity(name):
  x = _image()
  errors = []
  for severity in range(1, 6):
    rng = lambda: corruptions.case_seed(0, name, severity, 'case7')
    a = corruptions.corrupt(x, name, severity, rng())
    b = corruptions.corrupt(x, name, severity, rng())
    np.testing.assert_array_equal(a, b)  # Same seed, same image.
    assert a.shape == x.shape and a.dtype == np.float32
    assert np.isfinite(a).all() and a.min() >= 0 and a.max() <= 1
    errors.append(float(np.mean((a - x) ** 2)))
  assert errors[0] > 0
  assert errors == sorted(errors), errors  # Higher severity, further away.


def test_parameters_follow_the_table():
  x = _image()
  lo, hi = np.percentile(x, (1, 99))
  r = hi - lo
  s = 3
  # Additive noise: std σ = p·r, r of a ramp (its middle never clips).
  p = corruptions.SEVERITIES['gaussian_noise'][s - 1]
  ramp = np.linspace(0, 1, 200 * 200).reshape(200, 200, 1)
  noisy = corruptions.corrupt(ramp, 'gaussian_noise', s,
                              np.random.default_rng(0))
  inner = (ramp > 0.3) & (ramp < 0.7)
  r_ramp = np.subtract(*np.percentile(ramp, (99, 1)))
  assert np.std((noisy - ramp)[inner]) == pytest.approx(p * r_ramp, rel=0.05)
  # Contrast: towards the mean by the factor.
  c = corruptions.SEVERITIES['contrast'][s - 1]
  np.testing.assert_allclose(
      corruptions.corrupt(x, 'contrast', s, None),
      x.mean() + (x - x.mean()) * c, atol=1e-6)
  # Gamma on the image normalised to its range.
  g = corruptions.SEVERITIES['gamma'][s - 1]
  expected = np.clip(lo + r * np.clip((x - lo) / r, 0, None) ** g, 0, 1)
  np.testing.assert_allclose(corruptions.corrupt(x, 'gamma', s, None),
                             expected, atol=1e-5)
  # Speckle: a multiplier of mean 1 and std p (0.2 never clips at 1).
  sp = corruptions.SEVERITIES['speckle'][s - 1]
  flat = np.full((200, 200, 1), 0.2, np.float32)
  ratio = corruptions.corrupt(flat, 'speckle', s, np.random.default_rng(1)) / 0.2
  assert ratio.mean() == pytest.approx(1.0, abs=0.02)
  assert ratio.std() == pytest.approx(sp, rel=0.05)


def test_non_finite_pixels_are_clipped_and_none_is_identity():
  x = _image()
  x[3, 4, 0] = np.nan
  out = corruptions.corrupt(x, 'contrast', 2, None)
  assert np.isfinite(out).all()
  y = _image()
  assert corruptions.corrupt_model_images(y, ['a'], 'none', 1, 0) is y


def test_model_range_images_are_corrupted_per_case_id():
  images = np.stack([_image(0), _image(1)]).astype(np.float16) * 2 - 1
  out = corruptions.corrupt_model_images(images, ['a', 'b'], 'speckle', 2, 5)
  assert out.dtype == images.dtype and out.shape == images.shape
  again = corruptions.corrupt_model_images(images[1:], ['b'], 'speckle', 2, 5)
  np.testing.assert_array_equal(out[1:], again)  # Independent of batching.


@pytest.mark.parametrize('key,value,message', [
    ('eval.corruption', 'fog', 'unknown corruption'),
    ('eval.severity', 6, 'must be in 1..5'),
    ('eval.severity', 0, 'must be in 1..5'),
    ('eval.ece_bins', 1, 'must be >= 2'),
])
def test_bad_settings_are_config_errors_naming_the_key(key, value, message):
  config = demo.get_config()
  section, name = key.split('.')
  setattr(getattr(config, section), name, value)
  with pytest.raises(config_validation.ConfigError, match=message) as e:
    config_validation.validate(config)
  assert f'config.{key}' in str(e.value)


def _sweep_file(path, values, sampling=None):
  """A robustness.json with mDice ``values[(name, severity)]``."""
  import json
  rows = [{'corruption': n, 'severity': s, 'mDice': v, 'ece': None}
          for (n, s), v in values.items()]
  path.mkdir()
  (path / 'robustness.json').write_text(json.dumps(
      {'split': 'test', 'sampling': sampling or {'num_steps': 10},
       'checkpoint_step': 7, 'rows': rows}))
  return str(path)


def test_robustness_comparison_against_hand_computed_differences(tmp_path):
  import csv
  import subprocess
  import sys
  from spad_jax import robustness
  a = {('none', 0): 0.8, ('blur', 1): 0.7, ('blur', 2): 0.5,
       ('jpeg', 1): 0.75}
  b = {('none', 0): 0.82, ('blur', 1): 0.6, ('blur', 2): 0.55,
       ('jpeg', 1): 0.75, ('jpeg', 2): 0.7}  # jpeg 2 missing in a.
  runs = {'spad': robustness.load_sweep(_sweep_file(tmp_path / 'a', a)),
          'none': robustness.load_sweep(_sweep_file(tmp_path / 'b', b))}
  result = robustness.compare(runs, 'spad')
  got = {(r['corruption'], r['severity']): r['none - spad']
         for r in result['rows']}
  assert set(got) == set(a)  # Only the settings both sweeps hold.
  for key in a:
    assert got[key] == pytest.approx(b[key] - a[key])
  means = result['mean_over_severities']
  assert means['blur'] == pytest.approx({'spad': 0.6, 'none': 0.575})
  assert means['none'] == pytest.approx({'spad': 0.8, 'none': 0.82})

  other = _sweep_file(tmp_path / 'c', a, sampling={'num_steps': 25})
  with pytest.raises(robustness.CompareError, match='c/robustness.json: '
                     'sampling'):
    robustness.compare({'spad': runs['spad'],
                        'x': robustness.load_sweep(other)}, 'spad')
  with pytest.raises(robustness.CompareError, match='missing.*not found'):
    robustness.load_sweep(str(tmp_path / 'missing'))

  out = tmp_path / 'out'
  run = subprocess.run(
      [sys.executable, 'scripts/compare_robustness.py',
       f'--run=spad={tmp_path / "a"}', f'--run=none={tmp_path / "b"}',
       f'--out={out}'], capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stderr[-2000:]
  table = list(csv.DictReader(open(out / 'comparison.csv')))
  assert len(table) == 4 and (out / 'comparison.png').stat().st_size > 0
  bad = subprocess.run(
      [sys.executable, 'scripts/compare_robustness.py',
       f'--run=spad={tmp_path / "a"}', f'--run=x={tmp_path / "nowhere"}',
       f'--out={tmp_path / "out2"}'], capture_output=True, text=True,
      check=False)
  assert bad.returncode != 0 and 'nowhere' in bad.stderr
