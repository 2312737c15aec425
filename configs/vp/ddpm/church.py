"""DDPM on LSUN church_outdoor 256px, discrete VP."""
from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.vp(config, continuous=False)
  config.data.category = 'church_outdoor'
  config.model.num_scales = 1000
  config.optim.lr = 2e-5
  presets.ddpm_net(config, ch_mult=(1, 1, 2, 2, 4, 4))
  return config
