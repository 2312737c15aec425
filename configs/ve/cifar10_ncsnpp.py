"""NCSN++ on CIFAR-10, SMLD (discrete VE)."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ve(config, continuous=False)
  presets.ncsnpp_net(config)
  return config
