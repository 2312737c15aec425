"""Which adaptive ODE solver and tolerance: NFE, wall time and error of probability-flow ODE sampling
and bits/dim, per diffrax solver, on a network (trained, from a workdir's checkpoint, or untrained).

    python benchmarks/ode_solvers.py --workdir /path/to/digits_vp_ddpmpp --ckpt 3
        [--config digits/vp_ddpmpp_continuous] [--batch 64] [--solvers tsit5 dopri5 dopri8 bosh3]
        [--tols 1e-3 1e-4 1e-5] [--ref_tol 1e-7] [--tasks sample bpd]
    python benchmarks/ode_solvers.py --config vp/cifar10_ddpmpp_continuous --nf 32 --batch 8
        # no --workdir: an untrained network (its ODE is much easier than a trained one's)

The checkpoint is copied to a temporary folder and restored from there (the workdir is only
read). Every run uses the same prior latents (sampling) and the same dequantized test images and
Rademacher probes (bits/dim, digits test split or, untrained, uniform noise images), so the error
against the reference (dopri8 at rtol = atol = --ref_tol) is the solver's alone: for sampling the
RMS and the max over pixels of the difference of the samples (in [0, 1] data units), for bits/dim
the mean and max over images of |bpd - bpd_ref|. Wall time: median of 3 compiled calls (compile
excluded); NFE: the network evaluations the solve took (likelihood: each is one forward plus one
JVP). Prints a table; no assertions.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

from common import time_compiled  # also puts the repository root on sys.path

import checkpointing  # noqa: E402
import datasets  # noqa: E402
import likelihood  # noqa: E402
import training  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from models import utils as mutils  # noqa: E402


def load(args):
  """(config, sde, eps, score_fn, scaler, inverse_scaler) of a trained checkpoint or a fresh net."""
  config = importlib.import_module('configs.' + args.config.replace('/', '.')).get_config()
  if args.nf:
    config.model.nf = args.nf
  sde, eps = sde_lib.get_sde(config)
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config)
  params = state.params
  if args.workdir:
    tmp = tempfile.mkdtemp(prefix='ode_solvers_')
    src = os.path.join(args.workdir, 'checkpoints', str(args.ckpt))
    shutil.copytree(src, os.path.join(tmp, str(args.ckpt)))
    params = checkpointing.restore(checkpointing.make_manager(tmp), args.ckpt, state).ema_params
    shutil.rmtree(tmp, ignore_errors=True)
  score_fn = mutils.get_score_fn(sde, model, params, state.model_state, train=False,
                                 continuous=config.training.continuous)
  return (config, sde, eps, score_fn, datasets.get_data_scaler(config),
          datasets.get_data_inverse_scaler(config))


def test_images(config, n: int, trained: bool) -> np.ndarray:
  """n dequantized images in [0, 1): the digits test split (trained) or uniform noise."""
  rs = np.random.RandomState(0)
  shape = mutils.input_shape(config, n)
  if trained and config.data.dataset == 'digits':
    u8 = datasets.load_digits_split('test')[0][:n].astype(np.float32)
    return (u8 + rs.uniform(size=u8.shape).astype(np.float32)) / 256.
  return rs.uniform(size=shape).astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='digits/vp_ddpmpp_continuous')
  parser.add_argument('--workdir', default='', help='read-only workdir with checkpoints/<ckpt>')
  parser.add_argument('--ckpt', type=int, default=3)
  parser.add_argument('--nf', type=int, default=0)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--solvers', nargs='+', default=['tsit5', 'dopri5', 'dopri8', 'bosh3'])
  parser.add_argument('--tols', type=float, nargs='+', default=[1e-3, 1e-4, 1e-5])
  parser.add_argument('--ref_tol', type=float, default=1e-7)
  parser.add_argument('--tasks', nargs='+', default=['sample', 'bpd'], choices=['sample', 'bpd'])
  args = parser.parse_args()

  config, sde, eps, score_fn, scaler, inverse_scaler = load(args)
  shape = mutils.input_shape(config, args.batch)
  z = sde.prior_sampling(jax.random.PRNGKey(1), shape)
  x = jnp.asarray(scaler(test_images(config, args.batch, bool(args.workdir))))
  offset = likelihood.bpd_offset(8, scaler)
  probe_rng = jax.random.PRNGKey(2)

  def sample(solver, tol):
    fn = jax.jit(lambda z: sampling.ode_sample(jax.random.PRNGKey(0), sde, score_fn, shape, z=z,
                                                rtol=tol, atol=tol, eps=eps, solver=solver))
    c, t, (out, nfe) = time_compiled(fn, z)
    return t, int(nfe), np.asarray(inverse_scaler(out))

  def bpd(solver, tol):
    fn = jax.jit(lambda x: likelihood.log_likelihood(probe_rng, sde, score_fn, x, rtol=tol, atol=tol,
                                                     solver=solver))
    c, t, (logp, _, nfe) = time_compiled(fn, x)
    return t, int(nfe), np.asarray(likelihood.bits_per_dim(logp, x.shape, offset))

  src = f'{args.workdir} checkpoint {args.ckpt}' if args.workdir else 'untrained'
  print(f'{args.config} (nf {config.model.get("nf", "-")}, {src}), batch {args.batch}, '
        f'{jax.default_backend()}, reference: dopri8 at rtol = atol = {args.ref_tol:g}')
  for task, run in (('sample', sample), ('bpd', bpd)):
    if task not in args.tasks:
      continue
    t_ref, nfe_ref, ref = run('dopri8', args.ref_tol)
    what = 'samples' if task == 'sample' else f'bits/dim (reference mean {ref.mean():.4f})'
    print(f'\n{task}: reference {nfe_ref} NFE, {t_ref:.2f} s; error of the {what}')
    unit = ('RMS err', 'max err') if task == 'sample' else ('mean |err| bpd', 'max |err| bpd')
    print(f'| solver | rtol = atol | NFE | wall s | s / NFE | {unit[0]} | {unit[1]} |')
    print('|---|---|---|---|---|---|---|')
    for tol in args.tols:
      for solver in args.solvers:
        t, nfe, out = run(solver, tol)
        if task == 'sample':
          errs = (float(np.sqrt(np.mean((out - ref) ** 2))), float(np.max(np.abs(out - ref))))
        else:
          errs = (float(np.mean(np.abs(out - ref))), float(np.max(np.abs(out - ref))))
        print(f'| {solver} | {tol:g} | {nfe} | {t:.2f} | {t / nfe * 1e3:.1f} ms | {errs[0]:.2e} | '
              f'{errs[1]:.2e} |', flush=True)


if __name__ == '__main__':
  main()
