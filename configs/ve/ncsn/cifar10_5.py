"""NCSN v1 on CIFAR-10 with NCSNv2 technique 5 (EMA) only."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsn_family(config, 'ncsn', num_scales=10, sigma_max=1., snr=0.316, n_steps_each=100,
                      ema_rate=0.999)
  return config
