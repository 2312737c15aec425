"""Default LSUN (256px) config: the CIFAR-10 defaults with the original's LSUN overrides."""
import ml_collections

from configs import default_cifar10_configs


def get_default_configs() -> ml_collections.ConfigDict:
  """CIFAR-10 defaults, then LSUN: 256px, batch 64, sigma_max 378, 2000 scales, no dropout."""
  config = default_cifar10_configs.get_default_configs()
  training = config.training
  training.batch_size = 64
  training.n_iters = 2400001
  training.snapshot_freq_for_preemption = 5000
  config.sampling.snr = 0.075
  evaluate = config.eval
  evaluate.begin_ckpt = 50
  evaluate.end_ckpt = 96
  evaluate.batch_size = 512
  evaluate.enable_sampling = True
  data = config.data
  data.dataset = 'LSUN'
  data.image_size = 256
  data.category = 'bedroom'
  data.tfrecords_path = ''  # FFHQ / CelebA-HQ configs point this at their TFRecords
  model = config.model
  model.sigma_max = 378.
  model.num_scales = 2000
  model.dropout = 0.
  return config
