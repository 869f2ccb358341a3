"""XLA:CPU settings the package applies before JAX starts its backend.

jaxlib 0.10 sends float32 convolutions (forward and both gradients) to
YNNPACK by default. On the 2-core x86 machine this project measures on,
that ran the UNet's train step 1.35x slower than XLA's Eigen convolutions
(docs/PERFORMANCE.md, ``bench/xla_flags.py``), so the package turns YNNPACK
fusions off. The flags are ``xla_cpu_*`` ones: GPU and TPU backends ignore
them.

They are applied when ``spad_jax`` is imported, which in every entry point
happens before the first JAX computation. A flag the user already set in
``XLA_FLAGS`` is left as it is, and ``SPAD_JAX_XLA_DEFAULTS=0`` leaves
``XLA_FLAGS`` untouched altogether (how the bench measures XLA's defaults).
"""

import os
import warnings

# jaxlib versions the flags were measured on. XLA stops at start-up on a flag
# it does not know, so other versions get none (with a warning) until they
# are measured and added here.
MEASURED_JAXLIB = ((0, 10), (0, 11))  # [first, end) as (major, minor).

# name -> value; each is measured in docs/PERFORMANCE.md.
CPU_FLAGS = {
    # Empty list: no YNNPACK fusions (convolutions, dots, reductions).
    '--xla_cpu_experimental_ynn_fusion_type': '',
}
OPT_OUT = 'SPAD_JAX_XLA_DEFAULTS'


def merged(xla_flags: str, flags=None) -> str:
  """``xla_flags`` with each of ``flags`` appended unless already named."""
  flags = CPU_FLAGS if flags is None else flags
  present = {f.split('=', 1)[0] for f in xla_flags.split()}
  extra = [f'{name}={value}' for name, value in flags.items()
           if name not in present]
  return ' '.join([xla_flags.strip()] + extra).strip()


def _backend_started() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # A jax without the helper.
    return False


def _jaxlib_version():
  try:
    from jaxlib import version  # pylint: disable=g-import-not-at-top
    return tuple(int(p) for p in version.__version__.split('.')[:2])
  except (ImportError, ValueError):
    return None


def apply(environ=None, jaxlib_version=None) -> bool:
  """Adds CPU_FLAGS to ``XLA_FLAGS``; returns whether anything changed."""
  environ = os.environ if environ is None else environ
  if environ.get(OPT_OUT, '1') == '0':
    return False
  version = jaxlib_version or _jaxlib_version()
  first, end = MEASURED_JAXLIB
  if version is None or not first <= version < end:
    warnings.warn(
        f'spad_jax: jaxlib {version} is outside the versions its XLA:CPU '
        f'flags were measured on ({first} to before {end}); running with '
        'XLA\'s defaults (CPU training may be slower). See '
        'spad_jax/xla_flags.py.', stacklevel=3)
    return False
  before = environ.get('XLA_FLAGS', '')
  after = merged(before)
  if after == before.strip():
    return False
  if _backend_started():
    warnings.warn(
        'spad_jax was imported after JAX started its backend, so its XLA:CPU '
        f'flags ({" ".join(CPU_FLAGS)}) do not apply to this process and '
        'CPU training runs slower; import spad_jax before the first JAX '
        'computation.', stacklevel=3)
    return False
  environ['XLA_FLAGS'] = after
  return True
