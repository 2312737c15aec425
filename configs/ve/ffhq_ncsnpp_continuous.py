"""NCSN++ on FFHQ 1024px, continuous VE SDE."""
from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsnpp_1024(config, 'FFHQ', tfrecords_path='')  # set to your FFHQ 1024px TFRecords
  return config
