"""DDPM++ deep (8 res blocks) on CIFAR-10, continuous VP SDE."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.vp(config, continuous=True)
  presets.ddpmpp_net(config, num_res_blocks=8)
  return config
