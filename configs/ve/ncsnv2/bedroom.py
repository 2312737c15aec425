"""NCSNv2 on LSUN bedroom 128px."""
from configs import presets
from configs.default_lsun_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  # The original misspelled training.continuous here (so it stayed True); ncsn_family sets False.
  presets.ncsn_family(config, 'ncsnv2_128', num_scales=1086, sigma_max=190., snr=0.095,
                      n_steps_each=3, ema_rate=0.9999, lr=1e-4)
  config.training.batch_size = 128
  config.data.category = 'bedroom'
  config.data.image_size = 128
  return config
