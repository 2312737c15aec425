"""NCSN++ on CIFAR-10, continuous sub-VP SDE."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.vp(config, continuous=True, sde='subvpsde')
  presets.ncsnpp_net(config, scale_by_sigma=False, embedding_type='positional')
  return config
