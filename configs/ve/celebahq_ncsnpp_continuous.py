"""NCSN++ on CelebA-HQ 1024px, continuous VE SDE."""
from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsnpp_1024(config, 'CelebAHQ', tfrecords_path='')  # set to your CelebA-HQ TFRecords
  return config
