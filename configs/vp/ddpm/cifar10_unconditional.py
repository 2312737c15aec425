"""DDPM U-Net on CIFAR-10 without noise-level input (NCSNv2 technique 3), discrete VP."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.vp(config, continuous=False)
  presets.ddpm_net(config, conditional=False)
  return config
