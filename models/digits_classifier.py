"""A small CNN classifier of the embedded 8x8 digits: the feature extractor of the digits metrics.

FID / KID use its penultimate features ('pool', 64-d after ReLU, the role of Inception's pool3) and
IS its 10 logits. `evaluation.train_digits_classifier` trains and caches it; this module holds only
the network and the map from any digits-config image to its 8x8 grey input.
"""
from __future__ import annotations

from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

FEATURE_DIM, NUM_CLASSES = 64, 10


class PatchConv(nn.Module):
  """3x3 'SAME' convolution written as 9 shifted copies + one matmul.

  Why not nn.Conv: XLA:CPU runs convolutions inside a while loop (the lax.scan of training) about
  10x slower than outside it; dense matmuls keep their speed, so training takes seconds.
  """
  features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h, w = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = jnp.concatenate([xp[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], -1)
    return nn.Dense(self.features, name='dense')(patches)


class DigitsClassifier(nn.Module):
  """8x8x1 images in [0, 1] -> {'pool': [B, 64] penultimate features, 'logits': [B, 10]}."""
  width: int = 16

  @nn.compact
  def __call__(self, x: Array) -> Dict[str, Array]:
    x = 2. * x - 1.  # centre the inputs: faster, steadier training
    x = nn.relu(PatchConv(self.width, name='conv1')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 8x8 -> 4x4
    x = nn.relu(PatchConv(2 * self.width, name='conv2')(x))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))  # 4x4 -> 2x2
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128, name='dense1')(x))
    pool = nn.relu(nn.Dense(FEATURE_DIM, name='features')(x))
    return {'pool': pool, 'logits': nn.Dense(NUM_CLASSES, name='logits')(pool)}


def to_classifier_input(images: Array) -> Array:
  """[0, 1] NHWC digits of a digits config (size 8k, 1 or 3 channels) -> [B, 8, 8, 1].

  Inverts the data pipeline's nearest-neighbour upsampling and channel copies exactly (a mean over
  each k x k block and over channels), so data images map back onto the 8x8 originals.
  """
  if images.ndim != 4 or images.shape[1] != images.shape[2] or images.shape[1] % 8 \
      or images.shape[-1] not in (1, 3):
    raise ValueError(f'Digits images must be [B, 8k, 8k, 1 or 3], got shape {images.shape}.')
  x = jnp.mean(jnp.asarray(images, jnp.float32), axis=-1, keepdims=True)
  k = x.shape[1] // 8
  if k > 1:
    x = x.reshape(x.shape[0], 8, k, 8, k, 1).mean(axis=(2, 4))
  return x
