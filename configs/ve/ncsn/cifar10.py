"""NCSN v1 on CIFAR-10: L=10, sigma_max 1, ALD 100 steps, no EMA."""
from configs import presets
from configs.default_cifar10_configs import get_default_configs


def get_config():
  """The experiment config."""
  config = get_default_configs()
  presets.ncsn_family(config, 'ncsn', num_scales=10, sigma_max=1., snr=0.316, n_steps_each=100,
                      ema_rate=0.)
  return config
