"""NCSN v1 on CIFAR-10 with NCSNv2 techniques 1, 2, 4, 5."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsn_family(config, 'ncsn', num_scales=232, snr=0.176, n_steps_each=5, ema_rate=0.999)
  return config
