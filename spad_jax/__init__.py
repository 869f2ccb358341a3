"""SPAD (Structure and Progress Aware Diffusion) segmentation in JAX/Flax."""

from spad_jax import xla_flags as _xla_flags

# Before any JAX computation: the measured XLA:CPU settings (see xla_flags).
_xla_flags.apply()
