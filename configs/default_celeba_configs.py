"""Default CelebA (64px) config: the CIFAR-10 defaults with the original's CelebA overrides."""
import ml_collections

from configs import default_cifar10_configs


def get_default_configs() -> ml_collections.ConfigDict:
  """CIFAR-10 defaults, then CelebA: 64px, sigma_max 90, snr 0.17, sampling during eval."""
  config = default_cifar10_configs.get_default_configs()
  config.sampling.snr = 0.17
  config.eval.begin_ckpt = 1
  config.eval.end_ckpt = 26
  config.eval.enable_sampling = True
  config.data.dataset = 'CELEBA'
  config.data.image_size = 64
  config.model.sigma_max = 90.
  return config
