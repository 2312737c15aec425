"""NCSNv2 on CIFAR-10."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsn_family(config, 'ncsnv2_64', num_scales=232, snr=0.176, n_steps_each=5,
                      ema_rate=0.999, lr=1e-4)
  return config
