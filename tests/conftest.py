import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, devices: int = 1, timeout: int = 600):
  """Runs main.py in a subprocess (own XLA device count); returns the result."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return subprocess.run([sys.executable, os.path.join(ROOT, 'main.py')] +
                        list(args), cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def main_runner():
  return run_main
