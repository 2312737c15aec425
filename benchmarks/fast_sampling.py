"""Fast samplers: error and sample quality against the number of score evaluations (NFE).

1. gaussian: the closed-form D = 192 Gaussian of benchmarks/sampling.py under VPSDE(0.1, 20): the
   relative RMS error of the samples against the exact probability-flow map (same latents) for
   every deterministic solver and schedule at NFE 5, 10, 20, 50, beside the adaptive ODE sampler
   (tsit5) at rtol = atol = 1e-3 and 1e-5 (its NFE and error).
2. digits: the README main job's trained model (configs/digits/vp_ddpmpp_continuous.py, snapshot 3
   in --workdir): digits FID (500 samples, the digits classifier's features, as the main job's
   evaluation) for every solver at NFE 5, 10, 20, 50, beside PC (reverse diffusion, N = 1000) and
   the adaptive ODE (tsit5, rtol = atol = 1e-5).

Prints the tables and writes PNG plots (error / FID vs NFE, log-log) to --out.

    JAX_PLATFORMS=cpu python benchmarks/fast_sampling.py [--part gaussian|digits|all]
        [--workdir workdir/digits_vp_ddpmpp] [--out benchmarks/out]
"""
from __future__ import annotations

import argparse
import json
import os
import time

from common import gaussian_problem  # noqa: F401  (puts the repository root on sys.path)

import jax
import numpy as np

import fast_solvers
import mixtures
import sampling
import sde_lib

NFES = (5, 10, 20, 50)
STOCHASTIC = {'ddim': 0., 'dpmpp_2m_sde': 1.}  # eta used for the stochastic solvers


def steps_for_nfe(solver: str, nfe: int) -> int:
  """The n_steps whose evaluation count is closest to (not above) nfe (Heun: 2n - 1 = nfe)."""
  entry = fast_solvers.SOLVERS.get(solver)
  return max(n for n in range(1, nfe + 1) if entry.nfe(n) <= nfe)


def _plot(curves: dict, refs: dict, ylabel: str, title: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.4, 4.8))
  for label, (x, y) in curves.items():
    ax.plot(x, y, marker='o', label=label)
  for label, (x, y) in refs.items():
    ax.scatter([x], [y], marker='*', s=120, label=label, zorder=3)
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xlabel('NFE (score evaluations)')
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, which='both', alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  print(f'wrote {path}')


def gaussian(out: str) -> None:
  g = gaussian_problem()
  sde, eps = sde_lib.VPSDE(0.1, 20., 1000), 1e-3
  score_fn = mixtures.score_fn(g, sde)
  shape = (512, 192)
  z = sde.prior_sampling(jax.random.PRNGKey(0), shape)
  a_t = g.marginal(sde, sde.T)
  a_0 = g.marginal(sde, eps)
  want = a_0.means[0] + a_0.stds[0] / a_t.stds[0] * (np.asarray(z, np.float64) - a_t.means[0])
  rel_err = lambda x: float(np.sqrt(np.mean((np.asarray(x, np.float64) - want) ** 2) / np.mean(want ** 2)))
  refs = {}
  print('\nD = 192 Gaussian, VPSDE(0.1, 20), eps = 1e-3: relative RMS error against the exact '
        'flow map (same latents)')
  for tol in (1e-3, 1e-5):
    x, nfe = sampling.ode_sample(jax.random.PRNGKey(1), sde, score_fn, shape, eps=eps, z=z,
                                 rtol=tol, atol=tol)
    refs[f'adaptive ODE tsit5 {tol:g}'] = (int(nfe), rel_err(x))
    print(f'  adaptive ODE (tsit5, rtol = atol = {tol:g}): NFE {int(nfe)}, error {rel_err(x):.2e}')
  header = f'  {"solver":12s} {"schedule":15s}' + ''.join(f'{"NFE " + str(n):>11s}' for n in NFES)
  print(header)
  curves, rows = {}, []
  for solver in sorted(fast_solvers.SOLVERS.names()):
    if solver == 'dpmpp_2m_sde':
      continue  # stochastic: no flow map (with eta = 0 it is dpmpp_2m); DDIM runs with eta = 0
    for schedule in sorted(sampling.TIME_SCHEDULES.names()):
      errs, nfes = [], []
      for nfe in NFES:
        n = steps_for_nfe(solver, nfe)
        x, used = sampling.fast_sample(jax.random.PRNGKey(1), sde, score_fn, shape, solver=solver,
                                       n_steps=n, eps=eps, z=z, schedule=schedule)
        errs.append(rel_err(x))
        nfes.append(used)
      rows.append((solver, schedule, nfes, errs))
      print(f'  {solver:12s} {schedule:15s}' + ''.join(f'{e:11.2e}' for e in errs)
            + ('' if nfes == list(NFES) else f'   (NFE used: {nfes})'))
      if schedule == 'logsnr':
        curves[solver] = (nfes, errs)
  _plot(curves, refs, 'relative RMS error vs exact flow map', 'D = 192 Gaussian, VP, logsnr grid',
        os.path.join(out, 'fast_sampling_gaussian.png'))
  with open(os.path.join(out, 'fast_sampling_gaussian.json'), 'w') as f:
    json.dump({'refs': refs, 'rows': rows}, f)


def digits(workdir: str, out: str, num_samples: int = 500) -> None:
  import checkpointing
  import datasets
  import evaluation
  import run_lib
  from configs.digits import vp_ddpmpp_continuous
  from models import utils as mutils
  config = vp_ddpmpp_continuous.get_config()
  run = run_lib.setup(config, workdir)
  snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
  state = checkpointing.restore(snapshots, 3, run.state)
  score_fn = mutils.get_score_fn(run.sde, run.model, state.ema_params, state.model_state,
                                 continuous=True)
  extractor = evaluation.get_feature_extractor(config, run.workdir)
  stats = evaluation.get_data_stats(config, run.workdir, extractor, lambda: datasets.get_dataset(
      config, split='train', evaluation=True, process_index=0, process_count=1))
  shape = mutils.input_shape(config, num_samples)
  rng = jax.random.PRNGKey(config.seed)

  def fid(samples) -> float:
    feats = evaluation.extract_features(extractor[1], [{'image': np.asarray(run.inverse_scaler(samples))}])
    return evaluation.compute_metrics(feats, stats, kid_subset_size=min(1000, num_samples))['fid']

  print(f'\nDigits FID of the main job\'s trained DDPM++ (snapshot 3, {num_samples} samples, '
        f'digits classifier features; held-out digits score ~0.8)')
  refs = {}
  t0 = time.time()
  x, nfe = sampling.pc_sample(rng, run.sde, score_fn, shape, predictor='reverse_diffusion',
                              corrector='none', eps=run.eps)
  refs['PC reverse diffusion N=1000'] = (int(nfe), fid(x))
  print(f'  PC reverse diffusion, N = 1000: NFE {nfe}, FID {refs["PC reverse diffusion N=1000"][1]:.2f} '
        f'({time.time() - t0:.0f} s)')
  t0 = time.time()
  x, nfe = sampling.ode_sample(rng, run.sde, score_fn, shape, eps=run.eps, rtol=1e-5, atol=1e-5)
  refs['adaptive ODE tsit5 1e-5'] = (int(nfe), fid(x))
  print(f'  adaptive ODE (tsit5, rtol = atol = 1e-5): NFE {int(nfe)}, FID '
        f'{refs["adaptive ODE tsit5 1e-5"][1]:.2f} ({time.time() - t0:.0f} s)')
  print(f'  {"solver":13s}' + ''.join(f'{"NFE " + str(n):>9s}' for n in NFES))
  curves = {}
  for solver in sorted(fast_solvers.SOLVERS.names()):
    schedule = 'karras' if solver == 'heun' else 'logsnr'
    kw = {'eta': STOCHASTIC[solver]} if solver in STOCHASTIC else {}
    fids, nfes = [], []
    for nfe in NFES:
      x, used = sampling.fast_sample(rng, run.sde, score_fn, shape, solver=solver,
                                     n_steps=steps_for_nfe(solver, nfe), eps=run.eps,
                                     schedule=schedule, **kw)
      fids.append(fid(x))
      nfes.append(used)
    label = solver + (f' (eta={kw["eta"]:g})' if kw else '') + (' karras' if solver == 'heun' else '')
    curves[label] = (nfes, fids)
    print(f'  {label:13s}' + ''.join(f'{v:9.2f}' for v in fids)
          + ('' if nfes == list(NFES) else f'   (NFE used: {nfes})'))
  _plot(curves, refs, 'digits FID', 'Trained digits DDPM++ (VP), logsnr grid',
        os.path.join(out, 'fast_sampling_digits.png'))
  with open(os.path.join(out, 'fast_sampling_digits.json'), 'w') as f:
    json.dump({'refs': refs, 'curves': curves}, f)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--part', choices=('gaussian', 'digits', 'all'), default='all')
  parser.add_argument('--workdir', default='workdir/digits_vp_ddpmpp',
                      help='workdir of the trained main job (bash scripts/main_job.sh)')
  parser.add_argument('--out', default='benchmarks/out')
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if args.part in ('gaussian', 'all'):
    gaussian(args.out)
  if args.part in ('digits', 'all'):
    digits(args.workdir, args.out)


if __name__ == '__main__':
  main()
