"""VP SDE, continuous training, on a seeded 16-D Gaussian mixture (mixtures.gmm_nd), MLP score net."""
from configs.default_toy_configs import build


def get_config():
  """The experiment config."""
  config = build('vpsde', dataset='gmm_nd', dim=16)
  config.model.nf = 256
  return config
