"""The original PyTorch port's train step as a benchmark worker (run by train_step.py --pair).

NOT part of the library and never imported by it: `benchmarks/train_step.py --pair` starts this
file with the Python of a virtual environment that has torch (SCORE_SDE_TORCH_PYTHON), with a
checkout of github.com/yang-song/score_sde_pytorch (SCORE_SDE_PYTORCH_DIR) whose op/ CUDA
extensions are stubbed (their CPU branches are used), and talks to it over stdin / stdout with
the protocol of `benchmarks/pair_worker.py` (one JSON line per request).

    $SCORE_SDE_TORCH_PYTHON benchmarks/torch_peer.py CONFIG NF BATCH THREADS

The step is the original's own: `losses.get_step_fn` (loss, backward, warmup, gradient clipping,
Adam) followed by its EMA update, as in its run_lib.train, on a synthetic batch already in memory.
"""
from __future__ import annotations

import importlib
import os
import sys
import time

# The original's modules (losses, sde_lib, models) share names with this project's: put the
# original's checkout first and drop this script's folder (benchmarks/ has sampling.py etc.).
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or '.') != HERE]
sys.path.insert(0, os.environ['SCORE_SDE_PYTORCH_DIR'])
sys.path.insert(1, HERE)  # pair_worker only: it imports nothing from the project

import pair_worker  # noqa: E402


def make_step(config_name: str, nf: int, batch: int, threads: int):
  """Builds the original's model, optimizer, EMA and step; returns a no-argument step."""
  import torch
  torch.set_num_threads(threads)
  import losses
  import sde_lib
  from models import ncsnpp, ddpm  # noqa: F401  (register the networks)
  from models import utils as mutils
  from models.ema import ExponentialMovingAverage

  config = importlib.import_module('configs.' + config_name.replace('/', '.')).get_config()
  config.model.nf = nf
  config.training.batch_size = batch
  config.device = torch.device('cpu')
  torch.manual_seed(config.seed)
  m = config.model
  if config.training.sde.lower() == 'vpsde':
    sde = sde_lib.VPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
  elif config.training.sde.lower() == 'subvpsde':
    sde = sde_lib.subVPSDE(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)
  else:
    sde = sde_lib.VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)
  model = mutils.create_model(config)
  state = dict(optimizer=losses.get_optimizer(config, model.parameters()), model=model,
               ema=ExponentialMovingAverage(model.parameters(), decay=m.ema_rate), step=0)
  step_fn = losses.get_step_fn(sde, train=True, optimize_fn=losses.optimization_manager(config),
                               reduce_mean=config.training.reduce_mean,
                               continuous=config.training.continuous,
                               likelihood_weighting=config.training.likelihood_weighting)
  shape = (batch, config.data.num_channels, config.data.image_size, config.data.image_size)
  data = torch.rand(shape) * 2. - 1.
  n_params = sum(p.numel() for p in model.parameters())

  def step():
    return float(step_fn(state, data).detach())

  return step, dict(params=n_params, impl='original (torch %s)' % torch.__version__)


if __name__ == '__main__':
  name, nf, batch, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
  t0 = time.perf_counter()
  step, info = make_step(name, nf, batch, threads)
  info['setup_s'] = time.perf_counter() - t0
  pair_worker.serve(step, info)
