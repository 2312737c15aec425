"""Defaults of the digits experiments: scikit-learn's 8x8 handwritten digits (embedded, 1,797
images), scored by TINY networks of the same classes as the CIFAR-10 models.

Derived from the CIFAR-10 defaults by overriding, with the SDE families and networks of
`configs.presets`: every field of the original's cifar10 NCSN++ / DDPM++ / DDPM configs is kept
and only the size shrinks (nf, ch_mult, num_res_blocks, attn_resolutions), so the same code paths
run at CPU scale. Sized so that the README's main job trains in a few minutes on 2 CPU cores.
Experiment configs call `build`.
"""
import functools

import ml_collections
from ml_collections import config_dict

from configs import default_cifar10_configs, presets

# 8x8 -> 4x4 with attention at 4x4.
TINY = dict(nf=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
NETS = {'ncsnpp': presets.ncsnpp_net, 'ddpmpp': presets.ddpmpp_net, 'ddpm': presets.ddpm_net}
FAMILIES = {'vesde': presets.ve, 'vpsde': presets.vp,
            'subvpsde': functools.partial(presets.vp, sde='subvpsde')}


def get_default_configs() -> ml_collections.ConfigDict:
  """Digits defaults (data, training, evaluation); `build` picks the SDE and the network."""
  config = default_cifar10_configs.get_default_configs()
  training = config.training
  training.batch_size = 64
  training.n_iters = 3000
  training.snapshot_freq = 1000
  training.log_freq = 50
  training.eval_freq = 250
  training.snapshot_freq_for_preemption = 500
  training.n_jitted_steps = 1  # CPU: fusing steps saves no time (see training.get_train_step)

  evaluate = config.eval
  # Snapshot i is the state at step i * snapshot_freq. None (the default): the final snapshot of
  # config.training (3 here, about 5 minutes on 2 CPU cores; 1 with --config.training.n_iters=200);
  # -1: the newest existing one; --config.eval.begin_ckpt=1 sweeps all three.
  evaluate.begin_ckpt = config_dict.placeholder(int)
  evaluate.end_ckpt = config_dict.placeholder(int)
  evaluate.batch_size = 100  # the digits test split has 300 images
  evaluate.enable_sampling = True
  evaluate.num_samples = 500
  evaluate.enable_bpd = True
  # One dequantization pass (the paper: 5; passes differ by ~0.03 bits/dim here) at ODE tolerances
  # 1e-4: measured on the main job's final snapshot, 5.916 bits/dim as at 1e-5 with 40% of the
  # function evaluations; 1e-3 is biased (5.870).
  evaluate.bpd_num_repeats = 1
  evaluate.rtol = 1e-4
  evaluate.atol = 1e-4

  data = config.data
  data.dataset = 'digits'
  data.image_size = 8
  data.num_channels = 1
  data.random_flip = False  # digits are not mirror-symmetric
  data.centered = False
  data.uniform_dequantization = True  # continuous data, so bits/dim is a proper bound

  model = config.model
  model.sigma_min = 0.01
  model.sigma_max = 5.  # above the largest distance between two digits in [0, 1] (4.8)
  model.dropout = 0.1

  optim = config.optim
  optim.lr = 1e-3
  optim.warmup = 200
  return config


def build(sde: str, net: str, continuous: bool = True) -> ml_collections.ConfigDict:
  """The digits config for `sde` ('vesde', 'vpsde', 'subvpsde') and a tiny `net`."""
  if sde not in FAMILIES:
    raise ValueError(f'Unknown sde {sde!r}; valid choices: {list(FAMILIES)}.')
  if net not in NETS:
    raise ValueError(f'Unknown net {net!r}; valid choices: {list(NETS)}.')
  config = get_default_configs()
  FAMILIES[sde](config, continuous=continuous)
  NETS[net](config, **TINY)
  # 0.999, not the original's 0.9999 for VP: an EMA horizon of ~1,000 steps fits a
  # few-thousand-step run.
  config.model.ema_rate = 0.999
  return config
