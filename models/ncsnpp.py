"""NCSN++ and DDPM++ (Song et al. 2021): one U-Net class whose config options select the variant.

DDPM++ = resblock 'biggan', fir False, progressive / progressive_input 'none',
positional embedding; NCSN++ adds FIR resampling, an input pyramid
('residual' or 'input_skip'), Fourier features of log sigma, and divides the
output by sigma (scale_by_sigma). Parameter shapes match the original networks
one to one.
"""
from __future__ import annotations

import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from models import layers, layerspp
from models.utils import get_sigmas, register_model

PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
RESBLOCK_TYPES = ('ddpm', 'biggan')
EMBEDDING_TYPES = ('fourier', 'positional')
NORMALIZATIONS = ('GroupNorm',)


def check_ncsnpp_options(config) -> None:
  """Raises a ValueError naming any option of config.model that NCSN++ does not know."""
  m = config.model
  layers.check_choice('model.progressive', m.progressive.lower(), PROGRESSIVE)
  layers.check_choice('model.progressive_input', m.progressive_input.lower(), PROGRESSIVE_INPUT)
  layers.check_choice('model.progressive_combine', m.progressive_combine.lower(),
                      layerspp.COMBINE_METHODS)
  layers.check_choice('model.resblock_type', m.resblock_type.lower(), RESBLOCK_TYPES)
  layers.check_choice('model.embedding_type', m.embedding_type.lower(), EMBEDDING_TYPES)
  layers.check_choice('model.normalization', m.normalization, NORMALIZATIONS)
  layers.get_act(config)
  layers.compute_dtype(config)
  if m.get('conv_size', 3) < 1 or m.get('conv_size', 3) % 2 != 1:
    raise ValueError(f'model.conv_size must be a positive odd integer, got {m.conv_size!r}.')
  if m.embedding_type.lower() == 'fourier' and not config.training.continuous:
    raise ValueError("model.embedding_type 'fourier' embeds log sigma and needs "
                     'training.continuous=True; use \'positional\' for discrete noise levels.')


def noise_embedding(config, labels: jax.Array, act, conditional: bool):
  """Embeds the noise labels ([B]) and returns (temb or None, per-example sigma for scale_by_sigma)."""
  m = config.model
  nf = m.nf
  if m.embedding_type.lower() == 'fourier':
    # Continuous VE training: labels are sigmas; embed log sigma with random Fourier features.
    used_sigmas = labels
    temb = layerspp.GaussianFourierProjection(embedding_size=nf, scale=m.fourier_scale)(jnp.log(labels))
  else:
    # Discrete: labels index the descending sigmas (VE); VP labels are times, sigmas then unused.
    used_sigmas = jnp.asarray(get_sigmas(config), jnp.float32)[labels.astype(jnp.int32)]
    temb = layers.get_timestep_embedding(labels, nf)
  if not conditional:
    return None, used_sigmas
  temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(temb)
  temb = nn.Dense(nf * 4, kernel_init=layers.default_init())(act(temb))
  return temb, used_sigmas


@register_model(name='ncsnpp')
class NCSNpp(nn.Module):
  """NCSN++ / DDPM++ U-Net: (x [B,H,W,C], labels [B]) -> score or noise estimate [B,H,W,C].

  With model.num_classes = K > 0 it is class-conditional: `class_labels` [B] in {0..K} (K, or
  None, is the null label) add a class embedding to the noise embedding."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x: jax.Array, labels: jax.Array, train: bool = False,
               class_labels: Optional[jax.Array] = None) -> jax.Array:
    config = self.config
    check_ncsnpp_options(config)
    m = config.model
    act = layers.get_act(config)
    dtype = layers.compute_dtype(config)
    nf, ch_mult, num_res_blocks = m.nf, tuple(m.ch_mult), m.num_res_blocks
    attn_resolutions = tuple(m.attn_resolutions)
    num_resolutions = len(ch_mult)
    layers.unet_resolutions(x.shape, num_resolutions, attn_resolutions)
    conditional = m.conditional
    fir, fir_kernel = m.fir, tuple(m.fir_kernel)
    skip_rescale, init_scale = m.skip_rescale, m.init_scale
    resblock_type = m.resblock_type.lower()
    progressive, progressive_input = m.progressive.lower(), m.progressive_input.lower()
    combine_method = m.progressive_combine.lower()
    conv_size = m.get('conv_size', 3)
    channels = x.shape[-1]

    temb, used_sigmas = noise_embedding(config, labels, act, conditional)
    temb = layers.add_class_embedding(config, temb, class_labels, x.shape[0])
    if temb is not None:
      temb = temb.astype(dtype)

    AttnBlock = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale,
                                  skip_rescale=skip_rescale, dtype=dtype)
    Upsample = functools.partial(layerspp.Upsample, with_conv=m.resamp_with_conv, fir=fir,
                                 fir_kernel=fir_kernel, dtype=dtype)
    Downsample = functools.partial(layerspp.Downsample, with_conv=m.resamp_with_conv, fir=fir,
                                   fir_kernel=fir_kernel, dtype=dtype)
    # Pyramid resamplers: plain FIR for the skip variants, with a conv for the residual ones.
    pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel,
                                         with_conv=progressive == 'residual', dtype=dtype)
    pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir, fir_kernel=fir_kernel,
                                           with_conv=progressive_input == 'residual', dtype=dtype)
    if resblock_type == 'ddpm':
      ResnetBlock = functools.partial(layerspp.ResnetBlockDDPMpp, act=act, dropout=m.dropout,
                                      init_scale=init_scale, skip_rescale=skip_rescale,
                                      conv_size=conv_size, dtype=dtype)
    else:
      ResnetBlock = functools.partial(layerspp.ResnetBlockBigGANpp, act=act, dropout=m.dropout,
                                      fir=fir, fir_kernel=fir_kernel, init_scale=init_scale,
                                      skip_rescale=skip_rescale, conv_size=conv_size, dtype=dtype)
    conv = functools.partial(layers.ddpm_conv, kernel=conv_size, dtype=dtype)
    rescale = (lambda a: a / np.sqrt(2.)) if skip_rescale else (lambda a: a)

    if not config.data.centered:
      x = 2 * x - 1.  # data in [0, 1] -> [-1, 1]
    x = x.astype(dtype)

    # Downsampling path.
    input_pyramid = x if progressive_input != 'none' else None
    hs = [conv(x, nf)]
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(hs[-1], temb, train)
        if h.shape[1] in attn_resolutions:
          h = AttnBlock()(h)
        hs.append(h)

      if i_level != num_resolutions - 1:
        if resblock_type == 'ddpm':
          h = Downsample()(hs[-1])
        else:
          h = ResnetBlock(down=True)(hs[-1], temb, train)

        if progressive_input == 'input_skip':
          input_pyramid = pyramid_downsample()(input_pyramid)
          h = layerspp.Combine(method=combine_method, dtype=dtype)(input_pyramid, h)
        elif progressive_input == 'residual':
          input_pyramid = pyramid_downsample(out_ch=h.shape[-1])(input_pyramid)
          input_pyramid = rescale(input_pyramid + h)
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = ResnetBlock()(h, temb, train)
    h = AttnBlock()(h)
    h = ResnetBlock()(h, temb, train)

    # Upsampling path.
    pyramid = None
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        h = ResnetBlock(out_ch=nf * ch_mult[i_level])(jnp.concatenate([h, hs.pop()], axis=-1),
                                                      temb, train)
      if h.shape[1] in attn_resolutions:
        h = AttnBlock()(h)

      if progressive == 'output_skip':
        # Each level predicts an image; the upsampled coarser prediction is added to it.
        pyramid_h = act(layers.group_norm(h.shape[-1], dtype)(h))
        pyramid_h = conv(pyramid_h, channels, bias=True, init_scale=init_scale)
        pyramid = pyramid_h if pyramid is None else pyramid_upsample()(pyramid) + pyramid_h
      elif progressive == 'residual':
        if pyramid is None:  # the coarsest level starts a feature pyramid
          pyramid = conv(act(layers.group_norm(h.shape[-1], dtype)(h)), h.shape[-1], bias=True)
        else:
          pyramid = rescale(pyramid_upsample(out_ch=h.shape[-1])(pyramid) + h)
          h = pyramid

      if i_level != 0:
        if resblock_type == 'ddpm':
          h = Upsample()(h)
        else:
          h = ResnetBlock(up=True)(h, temb, train)

    if hs:
      raise AssertionError('skip connections left unused')  # a bug in this module, not a user error

    if progressive == 'output_skip':
      h = pyramid
    else:
      h = act(layers.group_norm(h.shape[-1], dtype)(h))
      h = conv(h, channels, init_scale=init_scale)

    h = h.astype(jnp.float32)
    if m.scale_by_sigma:
      h = h / used_sigmas.reshape((x.shape[0],) + (1,) * (h.ndim - 1))
    return h
