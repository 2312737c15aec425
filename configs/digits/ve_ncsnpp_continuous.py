"""VE SDE, continuous training, tiny NCSN++ on the 8x8 digits (as ve/cifar10_ncsnpp_continuous)."""
from configs.default_digits_configs import build


def get_config():
  """The experiment config."""
  return build('vesde', 'ncsnpp')
