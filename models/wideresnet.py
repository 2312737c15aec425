"""A noise-conditional Wide-ResNet classifier p(y | x(t)) for class-conditional sampling.

As the original's classifier: per-image standardization, Gaussian Fourier
features of log(label) (labels are sigmas for VE models; any positive noise
label works), a time-embedding bias in every block, GroupNorm, and logits out.
Knobs (config.model, with defaults): blocks_per_group 4, channel_multiplier
10, num_classes 10.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import layers, layerspp
from models.utils import register_model

Array = jax.Array

# Kaiming normal (fan_out, gain 2) for conv kernels, drawn flat (see layers.variance_scaling).
_conv_init = layers.variance_scaling(2.0, 'fan_out', 'normal')


def _dense_out_init(key, shape, dtype=jnp.float32):
  """U(-1/sqrt(n_out), 1/sqrt(n_out)) for the logits layer, as the autoaugment WRN."""
  bound = 1. / np.sqrt(shape[1])
  return layers.flat_uniform(key, shape, dtype, -bound, bound)


def _norm_act(x: Array, dtype: Any, apply_relu: bool = True) -> Array:
  x = nn.GroupNorm(num_groups=max(1, min(x.shape[-1] // 4, 32)), epsilon=1e-5, dtype=dtype)(x)
  return nn.relu(x) if apply_relu else x


class WideResnetBlock(nn.Module):
  """Pre-activation residual block with a noise-embedding bias; zero-padded, pooled identity skip."""
  channels: int
  strides: Tuple[int, int] = (1, 1)
  activate_before_residual: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None) -> Array:
    if self.activate_before_residual:
      x = _norm_act(x, self.dtype)
      orig_x, block_x = x, x
    else:
      orig_x, block_x = x, _norm_act(x, self.dtype)
    block_x = nn.Conv(self.channels, (3, 3), self.strides, padding='SAME', use_bias=False,
                      kernel_init=_conv_init, dtype=self.dtype)(block_x)
    if temb is not None:
      block_x += nn.Dense(self.channels, kernel_init=layers.default_init(),
                          dtype=self.dtype)(nn.swish(temb))[:, None, None, :]
    block_x = _norm_act(block_x, self.dtype)
    block_x = nn.Conv(self.channels, (3, 3), padding='SAME', use_bias=False,
                      kernel_init=_conv_init, dtype=self.dtype)(block_x)
    # Identity skip: average-pool to the new size and zero-pad the new channels.
    if block_x.shape[-1] != orig_x.shape[-1]:
      stride = orig_x.shape[1] // block_x.shape[1]
      orig_x = nn.avg_pool(orig_x, (stride, stride), (stride, stride))
      orig_x = jnp.pad(orig_x, [(0, 0), (0, 0), (0, 0), (0, block_x.shape[-1] - orig_x.shape[-1])])
    return block_x + orig_x


@register_model(name='wideresnet')
class WideResnet(nn.Module):
  """Noise-conditional WRN-(6 * blocks_per_group + 4)-channel_multiplier: (x, labels [B]) -> logits."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False) -> Array:
    m = self.config.model
    dtype = layers.compute_dtype(self.config)
    blocks = int(m.get('blocks_per_group', 4))
    widen = int(m.get('channel_multiplier', 10))
    num_classes = int(m.get('num_classes', 10))
    if x.shape[1] % 4 or x.shape[2] % 4:
      raise ValueError(f'Image size {x.shape[1]}x{x.shape[2]} is not divisible by 4, the '
                       'downsampling of the Wide-ResNet; valid sizes are multiples of 4.')
    # Per-image standardization (std floored at 1/sqrt(D), as tf.image.per_image_standardization).
    n = int(np.prod(x.shape[1:]))
    x = (x - jnp.mean(x, axis=(1, 2, 3), keepdims=True)) / jnp.maximum(
        jnp.std(x, axis=(1, 2, 3), keepdims=True), 1. / np.sqrt(n))
    temb = layerspp.GaussianFourierProjection(embedding_size=128, scale=16)(jnp.log(labels))
    temb = nn.Dense(128 * 4, kernel_init=layers.default_init())(temb)
    temb = nn.Dense(128 * 4, kernel_init=layers.default_init())(nn.swish(temb)).astype(dtype)

    h = nn.Conv(16, (3, 3), padding='SAME', use_bias=False, kernel_init=_conv_init,
                dtype=dtype)(x.astype(dtype))
    for g, (width, stride) in enumerate([(16, 1), (32, 2), (64, 2)]):
      for i in range(blocks):
        h = WideResnetBlock(width * widen, (stride, stride) if i == 0 else (1, 1),
                            activate_before_residual=(g == 0 and i == 0), dtype=dtype)(h, temb)
    h = _norm_act(h, dtype)
    h = jnp.mean(h, axis=(1, 2))
    return nn.Dense(num_classes, kernel_init=_dense_out_init, dtype=dtype)(h).astype(jnp.float32)
