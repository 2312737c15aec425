"""The DDPM U-Net trained with SMLD (discrete VE), output divided by sigma."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ve(config, continuous=False)
  presets.ddpm_net(config, scale_by_sigma=True)
  return config
