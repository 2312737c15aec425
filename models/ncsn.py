"""NCSN v1 (Song & Ermon 2019): RefineNet with conditional instance norm++ over L noise levels.

The same RefineNet as NCSNv2-64 (models/ncsnv2.py), but every normalization
(residual blocks, RCU, CRP and fusion blocks, and the output norm) looks up its
scale and shift for the noise level of each example, and the output is not
divided by sigma. The number of levels is config.model.num_scales (the
original read model.num_classes, which no config set).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import ml_collections

from models.ncsnv2 import REFINE_64, STAGES_64, refinenet
from models.utils import register_model


@register_model(name='ncsn')
class NCSN(nn.Module):
  """NCSN v1: (x [B,H,W,C], noise-level indices [B] in [0, num_scales)) -> score."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False) -> jax.Array:
    return refinenet(x, labels, self.config, STAGES_64, REFINE_64, conditional=True)
