"""NCSN++ on CelebA-HQ 256px, continuous VE SDE."""
from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ve(config, continuous=True)
  config.data.dataset = 'CelebAHQ'
  config.data.tfrecords_path = ''  # set to your CelebA-HQ 256px TFRecords
  config.model.sigma_max = 348.
  presets.ncsnpp_256(config)
  return config
