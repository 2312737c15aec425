"""NCSNv2 on CelebA 64px."""
from configs import presets
from configs.default_celeba_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsn_family(config, 'ncsnv2_64', num_scales=500, snr=0.128, n_steps_each=5,
                      ema_rate=0.999, lr=1e-4)
  return config
