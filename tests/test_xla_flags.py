"""The package's XLA:CPU flags: merged into XLA_FLAGS without overriding the
user, and in effect in a process that imports spad_jax."""

import os
import subprocess
import sys

import pytest

from spad_jax import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_merged_appends_and_keeps_the_users_flags():
  flags = {'--xla_a': '', '--xla_b': 'x'}
  assert xla_flags.merged('', flags) == '--xla_a= --xla_b=x'
  # A flag the user named keeps the user's value; other flags are kept.
  assert (xla_flags.merged('--xla_force_host_platform_device_count=4 '
                           '--xla_b=mine', flags) ==
          '--xla_force_host_platform_device_count=4 --xla_b=mine --xla_a=')
  assert xla_flags.merged('--xla_a=1 --xla_b=2', flags) == '--xla_a=1 --xla_b=2'


def test_apply_respects_the_opt_out():
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
         xla_flags.OPT_OUT: '0'}
  assert not xla_flags.apply(env)
  assert env['XLA_FLAGS'] == '--xla_force_host_platform_device_count=2'


def test_an_unmeasured_jaxlib_gets_no_flags_and_a_warning():
  # XLA aborts on a flag it does not know: never pass one to another jaxlib.
  env = {'XLA_FLAGS': ''}
  with pytest.warns(UserWarning, match='outside the versions'):
    assert not xla_flags.apply(env, jaxlib_version=(0, 99))
  assert env['XLA_FLAGS'] == ''


# Compiles one convolution in a fresh process and reports whether XLA sent
# it to YNNPACK (a "ynn" fusion in the optimised HLO).
_PROBE = r'''
import os
import spad_jax  # Before any JAX computation, as the entry points do.
import jax, jax.numpy as jnp
x = jnp.ones((2, 16, 16, 8)); w = jnp.ones((3, 3, 8, 8))
conv = jax.jit(lambda x, w: jax.lax.conv_general_dilated(
    x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC')))
hlo = conv.lower(x, w).compile().as_text()
print('FLAGS', os.environ.get('XLA_FLAGS', ''))
print('YNN', 'ynn' in hlo.lower())
'''


def _probe(**env):
  env = dict(os.environ, JAX_PLATFORMS='cpu', **env)
  out = subprocess.run([sys.executable, '-c', _PROBE], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300, check=True)
  lines = dict(l.split(' ', 1) for l in out.stdout.splitlines()
               if l.startswith(('FLAGS', 'YNN')))
  return lines['FLAGS'], lines['YNN'] == 'True'


def test_importing_the_package_keeps_convolutions_off_ynnpack():
  flags, ynn = _probe(XLA_FLAGS='--xla_force_host_platform_device_count=2',
                      **{xla_flags.OPT_OUT: '1'})
  assert flags.startswith('--xla_force_host_platform_device_count=2 ')
  assert '--xla_cpu_experimental_ynn_fusion_type=' in flags.split()
  assert not ynn
