"""The DDPM U-Net (Ho et al. 2020), as the original score_sde code used it for VP and SMLD (VE) runs."""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from models import layers
from models.utils import get_sigmas, register_model


def check_ddpm_options(config) -> None:
  """Raises a ValueError naming any option of config.model that DDPM does not know."""
  layers.check_choice('model.normalization', config.model.get('normalization', 'GroupNorm'),
                      ('GroupNorm',))
  layers.get_act(config)
  layers.compute_dtype(config)


@register_model(name='ddpm')
class DDPM(nn.Module):
  """DDPM U-Net: (x [B,H,W,C], labels [B] time steps or noise-level indices) -> [B,H,W,C].

  Class-conditional with model.num_classes > 0 (`class_labels` [B], None: the null label), as
  NCSN++."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False,
               class_labels: Optional[jax.Array] = None) -> jax.Array:
    config = self.config
    check_ddpm_options(config)
    m = config.model
    act = layers.get_act(config)
    dtype = layers.compute_dtype(config)
    nf, ch_mult, num_res_blocks = m.nf, tuple(m.ch_mult), m.num_res_blocks
    attn_resolutions = tuple(m.attn_resolutions)
    num_resolutions = len(ch_mult)
    layers.unet_resolutions(x.shape, num_resolutions, attn_resolutions)

    if m.conditional:
      temb = layers.get_timestep_embedding(labels, nf)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
      temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb)).astype(dtype)
    else:
      temb = None  # unconditional: the net must infer the noise level from x (as NCSNv2)
    temb = layers.add_class_embedding(config, temb, class_labels, x.shape[0])

    ResnetBlock = functools.partial(layers.ResnetBlockDDPM, act=act, dropout=m.dropout, dtype=dtype)
    AttnBlock = functools.partial(layers.AttnBlock, dtype=dtype)
    if not config.data.centered:
      x = 2 * x - 1.  # data in [0, 1] -> [-1, 1]
    h = x.astype(dtype)

    # Downsampling path.
    hs = [layers.ddpm_conv3x3(h, nf, dtype=dtype)]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in attn_resolutions:
          h = AttnBlock()(h)
        hs.append(h)
      if i_level != num_resolutions - 1:
        hs.append(layers.Downsample(with_conv=m.resamp_with_conv, dtype=dtype)(hs[-1]))

    h = hs[-1]
    h = ResnetBlock()(h, temb, train)
    h = AttnBlock()(h)
    h = ResnetBlock()(h, temb, train)

    # Upsampling path.
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                                      temb, train)
      if h.shape[1] in attn_resolutions:
        h = AttnBlock()(h)
      if i_level != 0:
        h = layers.Upsample(with_conv=m.resamp_with_conv, dtype=dtype)(h)

    h = act(layers.group_norm(h.shape[-1], dtype)(h))
    h = layers.ddpm_conv3x3(h, x.shape[-1], init_scale=0., dtype=dtype).astype(jnp.float32)

    if m.scale_by_sigma:
      # NCSN-style training divides by sigma; labels index the descending sigmas.
      sigmas = jnp.asarray(get_sigmas(config), jnp.float32)[labels.astype(jnp.int32)]
      h = h / sigmas.reshape((h.shape[0],) + (1,) * (h.ndim - 1))
    return h
