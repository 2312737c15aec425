"""Defaults of the toy experiments: closed-form mixtures (mixtures.py) scored by a small MLP.

Derived from the CIFAR-10 defaults by overriding, with the SDE families of `configs.presets`;
sized for a run of a minute or two on 2 CPU cores. Experiment configs call `build`.
"""
import ml_collections
from ml_collections import config_dict

from configs import default_cifar10_configs, presets

SDES = ('vesde', 'vpsde', 'subvpsde')


def get_default_configs() -> ml_collections.ConfigDict:
  """Toy defaults: ring2d data and an MLP score net (the SDE is set by `build`)."""
  config = default_cifar10_configs.get_default_configs()
  training = config.training
  training.batch_size = 256
  training.n_iters = 5000
  training.snapshot_freq = 1000
  training.log_freq = 100
  training.eval_freq = 500
  training.snapshot_freq_for_preemption = 1000
  training.n_jitted_steps = 5

  evaluate = config.eval
  # Snapshot i is the state at step i * snapshot_freq. None (the default): the final snapshot of
  # config.training; -1: the newest existing one; --config.eval.begin_ckpt=1 sweeps them all.
  evaluate.begin_ckpt = config_dict.placeholder(int)
  evaluate.end_ckpt = config_dict.placeholder(int)
  evaluate.batch_size = 1000  # the toy test split has 10,000 points
  evaluate.enable_sampling = True
  evaluate.num_samples = 2000
  evaluate.enable_bpd = True
  evaluate.bpd_num_repeats = 1  # continuous data: no dequantization noise to average over

  data = config.data
  data.dataset = 'ring2d'
  data.dim = 2  # the mixture's dimension (gmm_nd; ring2d / mixture2d are 2-D)
  data.centered = False
  data.uniform_dequantization = False
  data.random_flip = False
  del data.image_size, data.num_channels  # no images here

  model = config.model
  model.name = 'mlp'
  model.nf = 64
  model.num_layers = 3
  model.nonlinearity = 'swish'
  model.conditional = True
  model.fourier_scale = 16.
  model.init_scale = 0.
  model.dropout = 0.
  model.sigma_min = 0.01
  # Above the largest distance between two data points (ring2d: 8, gmm_nd in 16-D: < 16).
  model.sigma_max = 20.

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 100
  return config


def build(sde: str, dataset: str = 'ring2d', dim: int = 2) -> ml_collections.ConfigDict:
  """The toy config for continuous training with `sde` on `dataset` (dimension `dim`)."""
  if sde not in SDES:
    raise ValueError(f'Unknown sde {sde!r}; valid choices: {list(SDES)}.')
  config = get_default_configs()
  if sde == 'vesde':
    presets.ve(config, continuous=True)
  else:
    presets.vp(config, continuous=True, sde=sde)
  config.data.dataset = dataset
  config.data.dim = dim
  config.data.centered = False  # vectors are used in raw coordinates (presets.vp centres images)
  model = config.model
  model.ema_rate = 0.999  # an EMA horizon of ~1,000 steps fits a few-thousand-step run
  # As NCSN++ / DDPM++: VE nets embed log sigma with Fourier features and divide by sigma,
  # VP / sub-VP nets embed the time label sinusoidally and predict the noise.
  model.scale_by_sigma = sde == 'vesde'
  model.embedding_type = 'fourier' if sde == 'vesde' else 'positional'
  if sde == 'vesde':
    # No Langevin corrector: in 2-D after a few thousand steps it amplifies the MLP's score
    # errors (ring2d, 2,000 steps: MMD^2 0.12-0.37 with it, 0.03 without; with the exact score
    # both are exact). Turn it back on with --config.sampling.corrector=langevin.
    config.sampling.corrector = 'none'
  return config
