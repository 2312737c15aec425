"""NCSN++ on LSUN church_outdoor 256px, continuous VE SDE."""
from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ve(config, continuous=True)
  config.data.category = 'church_outdoor'
  config.model.sigma_max = 380.  # the original's church config (the LSUN default is 378)
  presets.ncsnpp_256(config)
  return config
