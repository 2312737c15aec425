"""The original's noise-conditional classifier for class-conditional CIFAR-10 sampling with the
VE models (Song et al. 2021, App. I.1): a Wide-ResNet-28-10 on perturbed images, sigma_t labels."""
from configs import default_cifar10_configs, presets


def get_config():
  """The experiment config."""
  config = default_cifar10_configs.get_default_configs()
  presets.ve(config, continuous=True)
  presets.noise_classifier(config, num_classes=10, blocks_per_group=4, channel_multiplier=10)
  return config
