"""The original PyTorch port's train step as a benchmark worker (run by train_step.py --pair).

NOT part of the library and never imported by it: `benchmarks/train_step.py --pair` starts this
file with the Python of a virtual environment that has torch (SCORE_SDE_TORCH_PYTHON), with a
checkout of github.com/yang-song/score_sde_pytorch (SCORE_SDE_PYTORCH_DIR) whose op/ CUDA
extensions are stubbed (their CPU branches are used), and talks to it over stdin / stdout with
the protocol of `benchmarks/pair_worker.py` (one JSON line per request).

    $SCORE_SDE_TORCH_PYTHON benchmarks/torch_peer.py KIND CONFIG NF BATCH THREADS

KIND 'step': the original's train step, `losses.get_step_fn` (loss, backward, warmup, gradient
clipping, Adam, EMA update, as its run_lib.train) on a synthetic batch already in memory.
KIND 'forward': one evaluation of the probability-flow drift (its ODE sampler's work per NFE).
KIND 'likelihood': its likelihood's work per NFE: the drift, and the Hutchinson divergence
(`likelihood.get_div_fn`: another forward and a backward), with one Rademacher probe.
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


def make_step(kind: str, config_name: str, nf: int, batch: int, threads: int):
  """Builds the original's model (optimizer, EMA); returns a no-argument call of KIND's work."""
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
  info = dict(params=n_params, impl='original (torch %s)' % torch.__version__)

  if kind == 'step':
    return lambda: float(step_fn(state, data).detach()), info
  import likelihood
  model.eval()
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
  drift_fn = lambda x, t: sde.reverse(score_fn, probability_flow=True).sde(x, t)[0]
  t = torch.rand(batch) * (sde.T - 1e-3) + 1e-3
  probe = torch.randint(0, 2, shape).float() * 2. - 1.
  if kind == 'forward':
    def forward():
      with torch.no_grad():
        return float(drift_fn(data, t).abs().mean())
    return forward, info

  div_fn = likelihood.get_div_fn(drift_fn)

  def likelihood_nfe():  # as the original's ode_func: drift and divergence, separately
    with torch.no_grad():
      drift = drift_fn(data, t)
    return float(drift.abs().mean() + div_fn(data, t, probe).sum())

  return likelihood_nfe, info


if __name__ == '__main__':
  kind, name, nf, batch, threads = sys.argv[1:3] + [int(a) for a in sys.argv[3:6]]
  t0 = time.perf_counter()
  step, info = make_step(kind, name, nf, batch, threads)
  info['setup_s'] = time.perf_counter() - t0
  pair_worker.serve(step, info)
