"""VE SDE, continuous training, on the 8-mode ring (mixtures.ring2d), MLP score net."""
from configs.default_toy_configs import build


def get_config():
  """The experiment config."""
  return build('vesde')
