"""VP SDE, discrete DDPM training, tiny DDPM network on the 8x8 digits (as vp/ddpm/cifar10)."""
from configs.default_digits_configs import build


def get_config():
  """The experiment config."""
  return build('vpsde', 'ddpm', continuous=False)
