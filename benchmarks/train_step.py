"""Train-step speed: steps/s, examples/s, compile time, peak RSS (and FLOPs per image).

    python benchmarks/train_step.py [--configs toy/vp_ring2d digits/vp_ddpmpp_continuous ...]
                                    [--n_jitted 1 5] [--seconds 10] [--batch_size B]
    python benchmarks/train_step.py --peers   # CIFAR-10 DDPM++ / NCSN++ at nf 32 (batch 8)
                                              # and nf 128 (batch 4), 32x32x3, one step per call

Each (config, n_jitted_steps) runs in its own subprocess, so that compile time and peak resident
memory (resource.getrusage ru_maxrss) belong to that configuration alone. The step is the library's
`training.get_train_step` on all local devices, fed synthetic data of the config's shape that is
already on the device (this measures the step, not the input pipeline: see input_pipeline.py).
Compile time is lowering + XLA compilation of the fused step; steps/s counts optimizer steps
(n_jitted_steps per call). Prints a table; no assertions.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

DEFAULT_CONFIGS = ('toy/vp_ring2d', 'toy/ve_ring2d', 'digits/ve_ncsnpp_continuous',
                   'digits/vp_ddpmpp_continuous', 'digits/vp_ddpm')
# The networks issue's peer set: (config, nf, batch); the original measured 17.5 / 14.7 img/s at
# nf 32 and 1.85 / 1.69 img/s at nf 128 on 2 CPU cores.
PEERS = (('vp/cifar10_ddpmpp_continuous', 32, 8), ('ve/cifar10_ncsnpp_continuous', 32, 8),
         ('vp/cifar10_ddpmpp_continuous', 128, 4), ('ve/cifar10_ncsnpp_continuous', 128, 4))


def measure(config_name: str, n_jitted: int, seconds: float, batch_size: int = 0,
            nf: int = 0) -> dict:
  """Compile time, steps/s, examples/s and FLOPs of one config with n_jitted fused steps."""
  import jax
  import numpy as np

  import training
  import parallel
  import sde_lib
  from common import xla_flops
  from models import utils as mutils

  config = importlib.import_module('configs.' + config_name.replace('/', '.')).get_config()
  if batch_size:
    config.training.batch_size = batch_size
  if nf:
    config.model.nf = nf
  config.training.n_jitted_steps = n_jitted
  batch = config.training.batch_size
  mesh = parallel.make_mesh()
  sde, _ = sde_lib.get_sde(config)
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  step = training.get_train_step(config, sde, model, training.get_optimizer(config), mesh=mesh)
  shape = (n_jitted,) + mutils.input_shape(config, batch)
  data = np.random.RandomState(0).uniform(0., 1., shape).astype(np.float32)
  data = {'image': parallel.shard_batch(mesh, data, leading_axes=1)}

  t0 = time.perf_counter()
  compiled = step.jitted.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  gflops_per_example = xla_flops(compiled) / (n_jitted * batch) / 1e9
  state, loss = compiled(state, data)  # warm-up call
  jax.block_until_ready(loss)
  # Every call is waited for, so each has its own time: the median is robust to other load.
  times, t0 = [], time.perf_counter()
  while time.perf_counter() - t0 < seconds or len(times) < 3:
    t1 = time.perf_counter()
    state, loss = compiled(state, data)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t1)
  steps_per_s = len(times) * n_jitted / sum(times)
  median_ms = 1e3 * float(np.median(times)) / n_jitted
  return dict(config=config_name, n_jitted=n_jitted, batch=batch, params=n_params,
              nf=int(config.model.get('nf', 0)), gflops_per_example=gflops_per_example,
              devices=jax.device_count(), backend=jax.default_backend(), compile_s=compile_s,
              steps_per_s=steps_per_s, examples_per_s=steps_per_s * batch,
              ms_per_step=median_ms, calls=len(times), finite=bool(np.all(np.isfinite(np.asarray(loss)))),
              peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', nargs='+', default=list(DEFAULT_CONFIGS))
  parser.add_argument('--n_jitted', nargs='+', type=int, default=[1, 5])
  parser.add_argument('--seconds', type=float, default=10., help='timed seconds per measurement')
  parser.add_argument('--batch_size', type=int, default=0, help='override training.batch_size')
  parser.add_argument('--nf', type=int, default=0, help='override model.nf')
  parser.add_argument('--peers', action='store_true', help='the CIFAR-10 peer set (see PEERS)')
  parser.add_argument('--one', nargs=2, metavar=('CONFIG', 'N_JITTED'), help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.one:
    print(json.dumps(measure(args.one[0], int(args.one[1]), args.seconds, args.batch_size,
                             args.nf)))
    return

  if args.peers:
    runs = [(name, 1, batch, nf) for name, nf, batch in PEERS]
  else:
    runs = [(name, n, args.batch_size, args.nf) for name in args.configs for n in args.n_jitted]
  rows = []
  for name, n, batch_size, nf in runs:
    cmd = [sys.executable, os.path.abspath(__file__), '--one', name, str(n),
           '--seconds', str(args.seconds), '--batch_size', str(batch_size), '--nf', str(nf)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode:
      print(f'{name} n_jitted={n} failed:\n{proc.stderr[-2000:]}', file=sys.stderr)
      continue
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    r = rows[-1]
    print(f'# {r["config"]} n_jitted={r["n_jitted"]}: {r["steps_per_s"]:.1f} steps/s', flush=True)

  if not rows:
    return
  print(f'\nbackend {rows[0]["backend"]}, {rows[0]["devices"]} device(s), os.cpu_count() = '
        f'{os.cpu_count()}')
  header = ('config', 'nf', 'n_jit', 'batch', 'params', 'GFLOP/ex', 'compile s', 'steps/s',
            'median ms/step', 'ex/s', 'GFLOP/s', 'peak RSS MB')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for r in rows:
    print(f'| {r["config"]} | {r["nf"]} | {r["n_jitted"]} | {r["batch"]} | {r["params"]:,} | '
          f'{r["gflops_per_example"]:.3g} | '
          f'{r["compile_s"]:.1f} | {r["steps_per_s"]:.1f} | {r["ms_per_step"]:.1f} | '
          f'{r["examples_per_s"]:.1f} | {r["gflops_per_example"] * r["examples_per_s"]:.0f} | '
          f'{r["peak_rss_mb"]:.0f} |')


if __name__ == '__main__':
  main()
