"""NCSN v1 on CelebA with NCSNv2 techniques 1, 2, 4, 5."""
from configs import presets
from configs.default_celeba_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsn_family(config, 'ncsn', num_scales=500, snr=0.128, n_steps_each=5, ema_rate=0.999)
  return config
