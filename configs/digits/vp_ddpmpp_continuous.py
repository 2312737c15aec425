"""VP SDE, continuous training, tiny DDPM++ on the 8x8 digits (as vp/cifar10_ddpmpp_continuous)."""
from configs.default_digits_configs import build


def get_config():
  """The experiment config."""
  return build('vpsde', 'ddpmpp')
