"""NCSN++ on CIFAR-10, discrete VP (DDPM chain)."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.vp(config, continuous=False)
  presets.set_sampler(config, 'reverse_diffusion', 'none')
  presets.ncsnpp_net(config, scale_by_sigma=False, embedding_type='positional')
  return config
