"""Layers of NCSN++ / DDPM++: Fourier features, skip combiners, FIR resampling, BigGAN res blocks."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models import up_or_down_sampling as updown

Array = jax.Array

# The DDPM blocks already carry the ++ options (skip_rescale, init_scale).
AttnBlockpp = layers.AttnBlock
ResnetBlockDDPMpp = layers.ResnetBlockDDPM
COMBINE_METHODS = ('cat', 'sum')


class GaussianFourierProjection(nn.Module):
  """Random Fourier features [sin(2 pi W x), cos(2 pi W x)] of a [B] input; W ~ N(0, scale^2) is fixed."""
  embedding_size: int = 256
  scale: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param('W', nn.initializers.normal(stddev=self.scale), (self.embedding_size,))
    w = jax.lax.stop_gradient(w)  # a parameter by layout only: it is never trained
    x_proj = x.astype(jnp.float32)[:, None] * w[None, :] * 2 * np.pi
    return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class Combine(nn.Module):
  """Merges a pyramid branch x into y: 1x1 conv of x to y's channels, then concat or sum."""
  method: str = 'cat'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Array) -> Array:
    layers.check_choice('progressive_combine', self.method, COMBINE_METHODS)
    h = layers.ddpm_conv1x1(x, y.shape[-1], dtype=self.dtype)
    return jnp.concatenate([h, y], axis=-1) if self.method == 'cat' else h + y


class Upsample(nn.Module):
  """Upsampling by 2: nearest (+ 3x3 conv) or, with `fir`, FIR filtering (fused with the conv)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      h = updown.naive_upsample_2d(x, factor=2)
      if self.with_conv:
        h = layers.ddpm_conv3x3(h, out_ch, dtype=self.dtype)
    elif not self.with_conv:
      h = updown.upsample_2d(x, self.fir_kernel, factor=2)
    else:
      h = updown.Conv2d(out_ch, kernel=3, up=True, resample_kernel=self.fir_kernel,
                        kernel_init=layers.default_init(), dtype=self.dtype)(x)
    return h


class Downsample(nn.Module):
  """Downsampling by 2: stride-2 conv / average pool or, with `fir`, FIR filtering (+ fused conv)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    out_ch = self.out_ch or x.shape[-1]
    if not self.fir:
      if self.with_conv:
        return layers.ddpm_conv3x3(x, out_ch, stride=2, padding=((0, 1), (0, 1)), dtype=self.dtype)
      return updown.naive_downsample_2d(x, factor=2)
    if not self.with_conv:
      return updown.downsample_2d(x, self.fir_kernel, factor=2)
    return updown.Conv2d(out_ch, kernel=3, down=True, resample_kernel=self.fir_kernel,
                         kernel_init=layers.default_init(), dtype=self.dtype)(x)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block that can resample: up/down inside the block, 1x1 conv shortcut."""
  act: Callable[[Array], Array]
  out_ch: Optional[int] = None
  up: bool = False
  down: bool = False
  dropout: float = 0.1
  fir: bool = False
  fir_kernel: Sequence[int] = (1, 3, 3, 1)
  skip_rescale: bool = True
  init_scale: float = 0.
  conv_size: int = 3
  dtype: Any = jnp.float32

  def _resample(self, x: Array) -> Array:
    if self.up:
      return (updown.upsample_2d(x, self.fir_kernel, factor=2) if self.fir
              else updown.naive_upsample_2d(x, factor=2))
    if self.down:
      return (updown.downsample_2d(x, self.fir_kernel, factor=2) if self.fir
              else updown.naive_downsample_2d(x, factor=2))
    return x

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(layers.group_norm(c, self.dtype)(x))
    h, x = self._resample(h), self._resample(x)
    h = layers.ddpm_conv(h, out_ch, kernel=self.conv_size, dtype=self.dtype)
    if temb is not None:  # a per-channel bias from the noise-level embedding
      h += nn.Dense(out_ch, kernel_init=layers.default_init(), dtype=self.dtype)(self.act(temb))[:, None, None, :]
    h = self.act(layers.group_norm(out_ch, self.dtype)(h))
    h = layers.Dropout(self.dropout)(h, deterministic=not train)
    h = layers.ddpm_conv(h, out_ch, kernel=self.conv_size, init_scale=self.init_scale, dtype=self.dtype)
    if c != out_ch or self.up or self.down:
      x = layers.ddpm_conv1x1(x, out_ch, dtype=self.dtype)
    return (x + h) / np.sqrt(2.) if self.skip_rescale else x + h
