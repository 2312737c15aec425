"""Building blocks of the experiment configs: SDE families, samplers and the original networks.

Each experiment config (configs/ve, vp, subvp) is a short list of these calls
on a dataset default, so that a family's settings live in one place.
"""
from __future__ import annotations

import ml_collections

ConfigDict = ml_collections.ConfigDict


def set_sampler(config: ConfigDict, predictor: str, corrector: str, snr: float = None,
                n_steps_each: int = None) -> ConfigDict:
  """PC sampling with the given predictor / corrector (and snr, corrector steps when given)."""
  sampling = config.sampling
  sampling.method = 'pc'
  sampling.predictor = predictor
  sampling.corrector = corrector
  if snr is not None:
    sampling.snr = snr
  if n_steps_each is not None:
    sampling.n_steps_each = n_steps_each
  return config


def ve(config: ConfigDict, continuous: bool) -> ConfigDict:
  """VE SDE (SMLD when discrete): reverse-diffusion + Langevin sampling, EMA 0.999."""
  config.training.sde = 'vesde'
  config.training.continuous = continuous
  config.model.ema_rate = 0.999
  return set_sampler(config, 'reverse_diffusion', 'langevin')


def vp(config: ConfigDict, continuous: bool, sde: str = 'vpsde') -> ConfigDict:
  """VP or sub-VP SDE (DDPM when discrete): centred data, mean loss, EMA 0.9999.

  Continuous models sample with Euler-Maruyama, discrete DDPM chains with ancestral sampling.
  """
  config.training.sde = sde
  config.training.continuous = continuous
  config.training.reduce_mean = True
  config.data.centered = True
  config.model.ema_rate = 0.9999
  return set_sampler(config, 'euler_maruyama' if continuous else 'ancestral_sampling', 'none')


def _unet_common(model: ConfigDict) -> None:
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 128
  model.ch_mult = (1, 2, 2, 2)
  model.attn_resolutions = (16,)
  model.resamp_with_conv = True
  model.conditional = True
  model.conv_size = 3


def ddpm_net(config: ConfigDict, scale_by_sigma: bool = False, **overrides) -> ConfigDict:
  """The DDPM U-Net of Ho et al. (CIFAR-10 size unless overridden)."""
  model = config.model
  model.name = 'ddpm'
  model.scale_by_sigma = scale_by_sigma
  _unet_common(model)
  model.num_res_blocks = 2
  model.update(overrides)
  return config


def ncsnpp_net(config: ConfigDict, **overrides) -> ConfigDict:
  """NCSN++ (CIFAR-10 size unless overridden): FIR, residual input pyramid, BigGAN blocks, output / sigma.

  The embedding follows training.continuous: Fourier features of sigma when
  continuous, sinusoidal of the noise-level index when discrete.
  """
  model = config.model
  model.name = 'ncsnpp'
  model.scale_by_sigma = True
  _unet_common(model)
  model.num_res_blocks = 4
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'none'
  model.progressive_input = 'residual'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.fourier_scale = 16.
  model.embedding_type = 'fourier' if config.training.continuous else 'positional'
  model.update(overrides)
  return config


def ddpmpp_net(config: ConfigDict, **overrides) -> ConfigDict:
  """DDPM++: NCSN++ without FIR and input pyramid, positional embedding, no output scaling."""
  kw = dict(fir=False, progressive_input='none', scale_by_sigma=False, embedding_type='positional')
  kw.update(overrides)
  return ncsnpp_net(config, **kw)


def ncsnpp_256(config: ConfigDict, **overrides) -> ConfigDict:
  """NCSN++ for 256px: 7 resolutions, 2 res blocks, output / input skip pyramids."""
  kw = dict(ch_mult=(1, 1, 2, 2, 2, 2, 2), num_res_blocks=2, progressive='output_skip',
            progressive_input='input_skip')
  kw.update(overrides)
  return ncsnpp_net(config, **kw)


def ncsnpp_1024(config: ConfigDict, dataset: str, tfrecords_path: str) -> ConfigDict:
  """NCSN++ for 1024px FFHQ / CelebA-HQ: nf 16, 8 resolutions, one block, batch 8, EMA 0.9999."""
  ve(config, continuous=True)
  set_sampler(config, 'reverse_diffusion', 'langevin', snr=0.15)
  config.training.batch_size = 8
  config.training.reduce_mean = True
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 96
  config.eval.batch_size = 1024
  config.data.dataset = dataset
  config.data.image_size = 1024
  config.data.tfrecords_path = tfrecords_path
  config.model.sigma_max = 1348.
  ncsnpp_256(config, nf=16, ch_mult=(1, 2, 4, 8, 16, 32, 32, 32), num_res_blocks=1, dropout=0.)
  config.model.ema_rate = 0.9999
  return config


def ncsn_family(config: ConfigDict, name: str, num_scales: int, snr: float, n_steps_each: int,
                ema_rate: float, sigma_max: float = None, lr: float = 1e-3) -> ConfigDict:
  """NCSN v1 / NCSNv2 (discrete SMLD): annealed Langevin dynamics only, RefineNet with InstanceNorm++.

  ema_rate is the original's per experiment: the NCSNv2 ablations (ve/ncsn/*)
  switch EMA (technique 5) on or off, so 0 there means "no EMA".
  """
  config.training.sde = 'vesde'
  config.training.continuous = False
  set_sampler(config, 'none', 'ald', snr=snr, n_steps_each=n_steps_each)
  model = config.model
  model.name = name
  model.scale_by_sigma = name != 'ncsn'  # NCSNv2 divides its output by sigma (technique 3)
  model.num_scales = num_scales
  if sigma_max is not None:
    model.sigma_max = sigma_max
  model.ema_rate = ema_rate
  model.normalization = 'InstanceNorm++'
  model.nonlinearity = 'elu'
  model.nf = 128
  model.interpolation = 'bilinear'
  optim = config.optim
  optim.lr = lr
  optim.amsgrad = False
  optim.warmup = 0
  optim.grad_clip = -1.  # no clipping
  return config


def class_conditional(config: ConfigDict, num_classes: int, label_dropout: float = 0.1,
                      guidance_scale: float = 1.) -> ConfigDict:
  """A class-conditional score network trained with label dropout (classifier-free guidance,
  Ho & Salimans 2022: p_uncond 0.1), sampled with CFG strength `guidance_scale`."""
  config.model.num_classes = num_classes
  config.training.label_dropout = label_dropout
  config.sampling.guidance = 'cfg'
  config.sampling.guidance_scale = guidance_scale
  return config


def noise_classifier(config: ConfigDict, num_classes: int, blocks_per_group: int = 4,
                     channel_multiplier: int = 10) -> ConfigDict:
  """A noise-conditional Wide-ResNet classifier p_t(y | x) trained on perturbed data at random t
  (the classifier of classifier guidance; the original's: WRN-28-10). Training only: no
  snapshot samples, no sampling or bits/dim at evaluation (the eval loss is its cross-entropy)."""
  config.training.objective = 'classifier'
  config.training.snapshot_sampling = False
  config.eval.enable_sampling = False
  config.eval.enable_bpd = False
  config.eval.enable_loss = True
  model = config.model
  model.name = 'wideresnet'
  model.num_classes = num_classes
  model.blocks_per_group = blocks_per_group
  model.channel_multiplier = channel_multiplier
  return config
