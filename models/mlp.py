"""A small residual MLP score network for vector data [B, D] (the toy data sets).

Same call contract and noise conditioning as the U-Nets: the labels are embedded exactly as
NCSN++ does (`models.ncsnpp.noise_embedding`: Gaussian Fourier features of log sigma for
continuous VE, sinusoidal features of the time label otherwise), and VE models can divide their
output by sigma (`model.scale_by_sigma`), so every SDE and loss of the library trains it.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers
from models.ncsnpp import EMBEDDING_TYPES, noise_embedding
from models.utils import register_model

Array = jax.Array


def check_mlp_options(config) -> None:
  """Raises a ValueError naming any option of config that the MLP cannot use."""
  m = config.model
  layers.check_choice('model.embedding_type', str(m.embedding_type).lower(), EMBEDDING_TYPES)
  layers.get_act(config)
  layers.compute_dtype(config)
  for name in ('nf', 'num_layers'):
    if int(m[name]) != m[name] or m[name] < (1 if name == 'nf' else 0):
      raise ValueError(f'model.{name} must be a {"positive" if name == "nf" else "non-negative"} '
                       f'integer, got {m[name]!r}.')
  import datasets
  if datasets.dataset_info(config, count=False).is_image:
    raise ValueError(f"The 'mlp' model scores vectors [B, D], not the images of "
                     f'config.data.dataset={config.data.dataset!r}; use a vector data set '
                     f'(ring2d, mixture2d, gmm_nd) or a U-Net.')
  if str(m.embedding_type).lower() == 'fourier' and not config.training.continuous:
    raise ValueError("model.embedding_type 'fourier' embeds log sigma and needs "
                     "training.continuous=True; use 'positional' for discrete noise levels.")


@register_model(name='mlp')
class MLP(nn.Module):
  """Residual MLP: (x [B, D], labels [B]) -> score or noise estimate [B, D].

  Width model.nf, model.num_layers residual blocks h += W3 drop(act(W1 act(h) + W2 act(temb))),
  an output layer initialized at scale model.init_scale (near zero by default, as the U-Nets).
  Class-conditional with model.num_classes > 0, as NCSN++ (`class_labels` [B], None: null label).
  """
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: Array, labels: Array, train: bool = False,
               class_labels: Optional[Array] = None) -> Array:
    config = self.config
    m = config.model
    check_mlp_options(config)
    if x.ndim != 2:
      raise ValueError(f'The mlp model expects vectors x of shape [B, D], got {x.shape}.')
    dim = x.shape[1]
    act = layers.get_act(config)
    dtype = layers.compute_dtype(config)
    dense = lambda n, scale=1.: nn.Dense(n, dtype=dtype, kernel_init=layers.default_init(scale))

    temb, used_sigmas = noise_embedding(config, labels, act, conditional=True)
    temb = layers.add_class_embedding(config, temb, class_labels, x.shape[0])
    if m.get('scale_by_sigma', False):
      # VE inputs grow to ~sigma_max; feed x / sqrt(1 + sigma^2) so the first layer sees O(1)
      # values at every noise level (the U-Nets do not; a small MLP trains far better with it).
      x = x / jnp.sqrt(1. + used_sigmas.reshape(-1, 1) ** 2)
    h = dense(m.nf)(x)
    for _ in range(int(m.num_layers)):
      r = act(dense(m.nf)(act(h)) + dense(m.nf)(act(temb)))
      r = nn.Dropout(m.dropout, deterministic=not train)(r)
      h = h + dense(m.nf)(r)
    out = dense(dim, m.get('init_scale', 0.))(act(h)).astype(jnp.float32)
    if m.get('scale_by_sigma', False):
      # VE: the network models sigma * score, which has unit scale at every noise level.
      out = out / used_sigmas.reshape(-1, 1)
    return out
