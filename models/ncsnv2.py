"""NCSNv2 RefineNets (Song & Ermon 2020) for up to 64px ('ncsnv2_64') and 96-128px ('ncsnv2_128').

Both are one encoder / RefineNet-decoder mechanism (`refinenet`) with
different stage tables; NCSN v1 (models/ncsn.py) runs the same mechanism with
noise-conditional norms. NCSNv2 is unconditional inside and divides its output
by the sigma of each example (labels index the descending sigmas).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers, normalization
from models.utils import get_sigmas, register_model


class Stage(NamedTuple):
  """One encoder stage: two residual blocks at nf * mult channels, the first resampling."""
  mult: int
  resample: Optional[str]
  dilation: int


# Encoder stages and RefineNet output channel multipliers (deepest stage first).
STAGES_64 = (Stage(1, None, 1), Stage(2, 'down', 1), Stage(2, 'down', 2), Stage(2, 'down', 4))
REFINE_64 = (2, 2, 1, 1)
STAGES_128 = (Stage(1, None, 1), Stage(2, 'down', 1), Stage(2, 'down', 1), Stage(4, 'down', 2),
              Stage(4, 'down', 4))
REFINE_128 = (4, 2, 2, 1, 1)


def _check_size(x_shape: Sequence[int], stages: Sequence[Stage]) -> None:
  """Raises unless every stride-2 (mean-pooling) stage sees an even size."""
  factor = 2 ** sum(s.resample == 'down' and s.dilation == 1 for s in stages)
  h, w = int(x_shape[1]), int(x_shape[2])
  if h % factor or w % factor:
    raise ValueError(f'Image size {h}x{w} is not divisible by {factor}, the downsampling of '
                     f'this RefineNet; valid sizes are multiples of {factor}.')


def refinenet(x: jax.Array, y: jax.Array, config, stages: Sequence[Stage],
              refine_mults: Sequence[int], conditional: bool) -> jax.Array:
  """The shared NCSN RefineNet body (call inside a compact method); returns float32 [B, H, W, C]."""
  m = config.model
  act = layers.get_act(config)
  dtype = layers.compute_dtype(config)
  nf = m.nf
  norm = normalization.get_normalization(config, conditional=conditional,
                                         num_classes=m.num_scales, dtype=dtype)
  _check_size(x.shape, stages)
  cond_norm = norm if conditional else None  # RefineBlocks normalise only in NCSN v1
  channels = x.shape[-1]
  if not config.data.centered:
    x = 2 * x - 1.
  h = layers.ncsn_conv3x3(x.astype(dtype), nf, dtype=dtype)

  feats = []
  for stage in stages:
    for i in range(2):
      h = layers.ResidualBlock(
          nf * stage.mult, norm, conditional=conditional, act=act,
          resample=stage.resample if i == 0 else None, dilation=stage.dilation,
          dtype=dtype)(h, y)
    feats.append(h)

  ref = None
  for i, (feat, mult) in enumerate(zip(reversed(feats), refine_mults)):
    inputs = [feat] if ref is None else [feat, ref]
    ref = layers.RefineBlock(nf * mult, act=act, normalizer=cond_norm, start=i == 0,
                             end=i == len(feats) - 1, dtype=dtype)(inputs, feat.shape[1:3], y)

  h = norm()(ref, y) if conditional else norm()(ref)
  h = layers.ncsn_conv3x3(act(h), channels, dtype=dtype)
  return h.astype(jnp.float32)


def _divide_by_sigma(config, h: jax.Array, labels: jax.Array) -> jax.Array:
  sigmas = jnp.asarray(get_sigmas(config), jnp.float32)[labels.astype(jnp.int32)]
  return h / sigmas.reshape((h.shape[0],) + (1,) * (h.ndim - 1))


@register_model(name='ncsnv2_64')
class NCSNv2(nn.Module):
  """NCSNv2 for images up to 64px: (x, noise-level indices [B]) -> score."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
    h = refinenet(x, labels, self.config, STAGES_64, REFINE_64, conditional=False)
    return _divide_by_sigma(self.config, h, labels)


@register_model(name='ncsnv2_128')
class NCSNv2_128(nn.Module):  # pylint: disable=invalid-name
  """NCSNv2 for 96-128px images: one more stride-2 stage and wider deep stages."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
    h = refinenet(x, labels, self.config, STAGES_128, REFINE_128, conditional=False)
    return _divide_by_sigma(self.config, h, labels)
