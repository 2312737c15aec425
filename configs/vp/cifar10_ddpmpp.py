"""DDPM++ on CIFAR-10, discrete VP (DDPM chain)."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.vp(config, continuous=False)
  presets.ddpmpp_net(config)
  return config
