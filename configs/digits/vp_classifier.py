"""Noise-conditional Wide-ResNet classifier p_t(y | x) of the 8x8 digits under the VP SDE, for
classifier guidance of the digits VP models: trained on perturbed digits at t ~ U(0, 1)
(`--mode train`; checkpointed like the score models, its eval loss the cross-entropy)."""
from configs import presets
from configs.default_digits_configs import build


def get_config():
  """The experiment config."""
  config = build('vpsde', 'ddpmpp')  # the SDE and data of the score models it guides
  # WRN-10-2: one block per group, widths 32 / 64 / 128 (8x8 -> 2x2).
  presets.noise_classifier(config, num_classes=10, blocks_per_group=1, channel_multiplier=2)
  config.training.n_iters = 2000
  config.optim.lr = 2e-3  # 1e-2 does not train; 2e-3 halves the loss of the first 200 steps
  return config
