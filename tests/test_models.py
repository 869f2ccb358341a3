"""The UNet's hand-written GroupNorm against flax's GroupNorm (+ SiLU)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spad_jax import train_state
from spad_jax.models import norm
from spad_jax.models import unet


def _rel(a, b):
  return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


@pytest.mark.parametrize('shape,groups', [((2, 8, 8, 16), 16),
                                          ((3, 4, 6, 12), 4),
                                          ((1, 16, 16, 8), 1)])
@pytest.mark.parametrize('silu', [False, True])
def test_group_norm_matches_flax_in_value_and_gradients(shape, groups, silu):
  rng = np.random.default_rng(0)
  c = shape[-1]
  # A mean far from 0 and unequal groups, where a wrong statistic shows.
  x = jnp.asarray(rng.standard_normal(shape, np.float32) * 3 + 2 +
                  np.arange(c, dtype=np.float32) / c)
  cot = jnp.asarray(rng.standard_normal(shape, np.float32))
  params = {'params': {
      'scale': jnp.asarray(1 + 0.3 * rng.standard_normal(c), jnp.float32),
      'bias': jnp.asarray(0.3 * rng.standard_normal(c), jnp.float32)}}

  def reference(p, x):
    y = nn.GroupNorm(num_groups=groups).apply(p, x)
    return nn.silu(y) if silu else y

  ours = lambda p, x: norm.GroupNorm(num_groups=groups, silu=silu).apply(p, x)
  y_ref, vjp_ref = jax.vjp(reference, params, x)
  y, vjp = jax.vjp(ours, params, x)
  assert _rel(y, y_ref) < 1e-5
  (gp_ref, gx_ref), (gp, gx) = vjp_ref(cot), vjp(cot)
  assert _rel(gx, gx_ref) < 1e-5
  for name in ('scale', 'bias'):
    assert _rel(gp['params'][name], gp_ref['params'][name]) < 1e-5
  # Second-order use (e.g. a gradient penalty) is not supported: custom_vjp
  # functions are differentiable once, which is all training needs.


def test_group_norm_rejects_bad_shapes_and_keeps_the_dtype():
  x = jnp.ones((2, 4, 4, 6), jnp.bfloat16)
  layer = norm.GroupNorm(num_groups=4)
  with pytest.raises(ValueError, match='divisible by 4'):
    layer.init(jax.random.key(0), x)
  layer = norm.GroupNorm(num_groups=3, silu=True, dtype=jnp.bfloat16)
  params = layer.init(jax.random.key(0), x)
  assert params['params']['scale'].dtype == jnp.float32
  assert layer.apply(params, x).dtype == jnp.bfloat16
  assert norm.GroupNorm(num_groups=3).apply(
      params, x.astype(jnp.float32)).dtype == jnp.float32


def test_unet_has_flax_groupnorm_parameters_and_outputs(monkeypatch):
  """Checkpoints of either GroupNorm restore into the other: the parameter
  trees are identical and, given the same parameters, so are the logits."""
  model = unet.UNet(num_classes=3, base_channels=8, channel_mult=(1, 2),
                    num_res_blocks=1, attention_resolutions=(8,),
                    norm_groups=4)
  rng = np.random.default_rng(1)
  xt = jax.nn.one_hot(rng.integers(0, 3, (2, 16, 16)), 3)
  image = jnp.asarray(rng.standard_normal((2, 16, 16, 1), np.float32))
  t = jnp.asarray([3, 7])
  init = lambda: jax.jit(model.init, compiler_options=(
      train_state.INIT_COMPILER_OPTIONS))(jax.random.key(0), xt, image, t)
  params = init()
  # Move the zero-initialised output layers and the norms off their
  # initial values, so that every path carries signal.
  leaves, tree = jax.tree.flatten(params)
  noise = np.random.default_rng(2)
  params = jax.tree.unflatten(tree, [
      l + 0.1 * noise.standard_normal(l.shape, np.float32) for l in leaves])

  # A fresh jit per GroupNorm: tracing reads unet._norm.
  def loss(p):
    logits = model.apply(p, xt, image, t)
    return jnp.sum(jnp.sin(logits)), logits

  # Unoptimised compiles (fast): the comparison is of the two GroupNorms.
  run = lambda: jax.jit(jax.grad(loss, has_aux=True), compiler_options=(
      train_state.INIT_COMPILER_OPTIONS))(params)
  grads, ours = run()
  monkeypatch.setattr(unet, '_norm', unet.flax_norm)
  flax_params = init()
  assert (jax.tree.structure(flax_params) == jax.tree.structure(params))
  assert (jax.tree.map(jnp.shape, flax_params) ==
          jax.tree.map(jnp.shape, params))
  ref_grads, reference = run()
  assert _rel(ours, reference) < 1e-5
  errors = [_rel(g, r) for g, r in zip(jax.tree.leaves(grads),
                                       jax.tree.leaves(ref_grads))]
  assert max(errors) < 1e-5
