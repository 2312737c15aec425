"""Normalization layers of NCSN v1/v2: (conditional) instance norm++, instance norm, variance norm.

Statistics are computed in float32 whatever the computation dtype, then cast
back, so bf16 networks normalise as accurately as float32 ones.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from models.layers import check_choice, flat_normal

Array = jax.Array
EPS = 1e-5


def _near_one(key, shape, dtype=jnp.float32):
  """N(1, 0.02^2): NCSN's initial scales."""
  return 1. + 0.02 * flat_normal(key, shape, dtype)


def _instance_stats(x: Array):
  """Per-example, per-channel spatial means [B, C] and standardised maps, in float32."""
  x = x.astype(jnp.float32)
  means = jnp.mean(x, axis=(1, 2))
  h = (x - means[:, None, None, :]) / jnp.sqrt(jnp.var(x, axis=(1, 2), keepdims=True) + EPS)
  return means, h


def _means_plus(means: Array) -> Array:
  """InstanceNorm++'s correction term: the channel means standardised across channels."""
  m = jnp.mean(means, axis=-1, keepdims=True)
  v = jnp.var(means, axis=-1, keepdims=True)
  return (means - m) / jnp.sqrt(v + EPS)


class InstanceNorm2d(nn.Module):
  """Instance normalization with a per-channel scale and (optional) bias."""
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _, h = _instance_stats(x)
    h = h * self.param('scale', nn.initializers.ones, (x.shape[-1],))
    if self.bias:
      h = h + self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    return h.astype(self.dtype)


class VarianceNorm2d(nn.Module):
  """Divides by the per-channel spatial standard deviation (no centering), then scales."""
  bias: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x32 = x.astype(jnp.float32)
    h = x32 / jnp.sqrt(jnp.var(x32, axis=(1, 2), keepdims=True) + EPS)
    h = h * self.param('scale', _near_one, (x.shape[-1],))
    if self.bias:
      h = h + self.param('bias', nn.initializers.zeros, (x.shape[-1],))
    return h.astype(self.dtype)


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ (NCSN): instance norm that keeps the relative channel means via alpha."""
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    means, h = _instance_stats(x)
    h = h + _means_plus(means)[:, None, None, :] * self.param('alpha', _near_one, (c,))
    h = h * self.param('gamma', _near_one, (c,))
    if self.bias:
      h = h + self.param('beta', nn.initializers.zeros, (c,))
    return h.astype(self.dtype)


class ConditionalInstanceNorm2dPlus(nn.Module):
  """Conditional InstanceNorm++ (NCSN v1): gamma, alpha, beta looked up per noise level."""
  num_classes: int
  bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    c = x.shape[-1]
    n_parts = 3 if self.bias else 2

    def init_embed(key, shape, dtype=jnp.float32):
      # gamma and alpha start near one, beta at zero.
      scales = _near_one(key, (shape[0], 2 * c), dtype)
      return jnp.concatenate([scales, jnp.zeros((shape[0], shape[1] - 2 * c), dtype)], axis=-1)

    table = nn.Embed(self.num_classes, n_parts * c, embedding_init=init_embed)(y.astype(jnp.int32))
    parts = jnp.split(table.astype(jnp.float32), n_parts, axis=-1)
    means, h = _instance_stats(x)
    h = h + _means_plus(means)[:, None, None, :] * parts[1][:, None, None, :]
    out = parts[0][:, None, None, :] * h
    if self.bias:
      out = out + parts[2][:, None, None, :]
    return out.astype(self.dtype)


_UNCONDITIONAL = {
    'InstanceNorm': InstanceNorm2d,
    'InstanceNorm++': InstanceNorm2dPlus,
    'VarianceNorm': VarianceNorm2d,
    'GroupNorm': None,  # built by get_normalization (it needs the group count)
}
_CONDITIONAL = {'InstanceNorm++': ConditionalInstanceNorm2dPlus}


def get_normalization(config, conditional: bool = False, num_classes: int = 0,
                      dtype: Any = jnp.float32) -> Callable[..., nn.Module]:
  """A factory of the norm named by config.model.normalization (noise-conditional if asked)."""
  name = config.model.normalization
  if conditional:
    check_choice('conditional model.normalization', name, _CONDITIONAL)
    return functools.partial(_CONDITIONAL[name], num_classes=num_classes, dtype=dtype)
  check_choice('model.normalization', name, _UNCONDITIONAL)
  if name == 'GroupNorm':
    return functools.partial(nn.GroupNorm, num_groups=32, epsilon=1e-5, dtype=dtype)
  return functools.partial(_UNCONDITIONAL[name], dtype=dtype)
