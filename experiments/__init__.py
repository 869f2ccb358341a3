"""Experiment drivers built on spad_jax (not part of the installed package)."""
