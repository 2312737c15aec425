"""Train-step speed: steps/s, examples/s, compile time, peak RSS (and FLOPs per image).

    python benchmarks/train_step.py [--configs toy/vp_ring2d digits/vp_ddpmpp_continuous ...]
                                    [--n_jitted 1 5] [--seconds 10] [--batch_size B]
    python benchmarks/train_step.py --peers   # CIFAR-10 DDPM++ / NCSN++ at nf 32 (batch 8)
                                              # and nf 128 (batch 4), 32x32x3, one step per call
    SCORE_SDE_TORCH_PYTHON=/path/to/venv/bin/python SCORE_SDE_PYTORCH_DIR=/path/to/score_sde_pytorch \
      python benchmarks/train_step.py --peers --pair [--rounds 30] [--round_s 2]
    python benchmarks/train_step.py --peers --ab 'SCORE_SDE_XLA_DEFAULTS=0' 'xla_cpu_use_onednn=true'

Each (config, n_jitted_steps) runs in its own subprocess, so that compile time and peak resident
memory (resource.getrusage ru_maxrss) belong to that configuration alone. The step is the library's
`training.get_train_step` on all local devices, fed synthetic data of the config's shape that is
already on the device (this measures the step, not the input pipeline: see input_pipeline.py).
Compile time is the library's first call of the step (tracing, lowering, XLA compilation and
one step); steps/s counts optimizer steps (n_jitted_steps per call). Prints a table; no assertions.

--pair runs our step and the original PyTorch port's step (benchmarks/torch_peer.py, started with
the Python named by SCORE_SDE_TORCH_PYTHON on the checkout named by SCORE_SDE_PYTORCH_DIR, whose
op/ CUDA extensions must be stubbed; this process never imports torch) as two long-lived worker
processes at the same priority and with the same number of threads, and alternates them: each
round runs ~round_s seconds of steps of one, then of the other (the order swaps every round, and
each waits for the other's threads to go idle). It prints the median over rounds of the per-round
ratio of median step times (ours / original: < 1 is faster), its quartiles, both img/s, both CPU
utilisations (process CPU time / wall time over the timed steps: cores kept busy) and both peak
RSS. Alternation makes the ratio robust to load from other processes; absolute figures are not.
--ab does the same with two of our workers that differ only in their environment (flag
experiments): each side is a string of words, 'xla_name=value' (or '--xla_name=value') for
XLA_FLAGS and 'NAME=VALUE' for other variables; SCORE_SDE_XLA_DEFAULTS=0 measures without the
library's XLA:CPU defaults (xla_settings.py).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from typing import List, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from pair_worker import peak_rss_mb  # noqa: E402  (benchmarks/ is on sys.path as a script)

DEFAULT_CONFIGS = ('toy/vp_ring2d', 'toy/ve_ring2d', 'digits/ve_ncsnpp_continuous',
                   'digits/vp_ddpmpp_continuous', 'digits/vp_ddpm')
# The networks issue's peer set: (config, nf, batch), 32x32x3 images, as the original PyTorch port.
PEERS = (('vp/cifar10_ddpmpp_continuous', 32, 8), ('ve/cifar10_ncsnpp_continuous', 32, 8),
         ('vp/cifar10_ddpmpp_continuous', 128, 4), ('ve/cifar10_ncsnpp_continuous', 128, 4))
TORCH_ENV = ('SCORE_SDE_TORCH_PYTHON', 'SCORE_SDE_PYTORCH_DIR')


def load_config(config_name: str, batch_size: int = 0, nf: int = 0, dtype: str = ''):
  """A config by its name under configs/ ('vp/cifar10_ddpmpp_continuous'), with overrides."""
  config = importlib.import_module('configs.' + config_name.replace('/', '.')).get_config()
  if batch_size:
    config.training.batch_size = batch_size
  if nf:
    config.model.nf = nf
  if dtype:
    config.model.dtype = dtype
  return config


def build(config_name: str, n_jitted: int = 1, batch_size: int = 0, nf: int = 0, dtype: str = ''):
  """Our compiled train step on synthetic data: (compiled, state, data, info dict)."""
  t_start = time.perf_counter()
  import jax
  import numpy as np

  import training
  import parallel
  import sde_lib
  from common import xla_flops
  from models import utils as mutils

  config = load_config(config_name, batch_size, nf, dtype)
  config.training.n_jitted_steps = n_jitted
  batch = config.training.batch_size
  mesh = parallel.make_mesh()
  rss_import = peak_rss_mb()
  sde, _ = sde_lib.get_sde(config)
  t0 = time.perf_counter()
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0
  rss_init = peak_rss_mb()
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  step = training.get_train_step(config, sde, model, training.get_optimizer(config), mesh=mesh)
  shape = (n_jitted,) + mutils.input_shape(config, batch)
  data = np.random.RandomState(0).uniform(0., 1., shape).astype(np.float32)
  data = {'image': parallel.shard_batch(mesh, data, leading_axes=1)}

  # The library's first call compiles (and returns the memory compiling left behind), then steps.
  t0 = time.perf_counter()
  state, loss = step(state, data)
  jax.block_until_ready(loss)
  compile_s = time.perf_counter() - t0
  rss_compile = peak_rss_mb()
  compiled = step.jitted.lower(state, data).compile()  # cached: for the cost analysis
  info = dict(config=config_name, n_jitted=n_jitted, batch=batch, params=n_params,
              nf=int(config.model.get('nf', 0)), dtype=str(config.model.get('dtype', 'float32')),
              gflops_per_example=xla_flops(compiled) / (n_jitted * batch) / 1e9,
              devices=jax.device_count(), backend=jax.default_backend(), init_s=init_s,
              compile_s=compile_s, setup_s=time.perf_counter() - t_start,
              xla_flags=os.environ.get('XLA_FLAGS', ''), rss_import_mb=rss_import,
              rss_init_mb=rss_init, rss_compile_mb=rss_compile, impl='ours (jax %s)' % jax.__version__)
  return compiled, state, data, info


def measure(config_name: str, n_jitted: int, seconds: float, batch_size: int = 0,
            nf: int = 0) -> dict:
  """Compile time, steps/s, examples/s and FLOPs of one config with n_jitted fused steps."""
  import jax
  import numpy as np

  compiled, state, data, info = build(config_name, n_jitted, batch_size, nf)
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
  return dict(info, steps_per_s=steps_per_s, examples_per_s=steps_per_s * info['batch'],
              ms_per_step=1e3 * float(np.median(times)) / n_jitted, calls=len(times),
              finite=bool(np.all(np.isfinite(np.asarray(loss)))), peak_rss_mb=peak_rss_mb())


def serve(kind: str, config_name: str, nf: int, batch_size: int) -> None:
  """A pair worker (see pair_worker.py) for KIND: 'step' (one optimizer step per call),
  'forward' (one probability-flow drift evaluation: the ODE sampler's work per NFE) or
  'likelihood' (drift and Hutchinson divergence, one Rademacher probe: the likelihood's per NFE)."""
  import jax
  import numpy as np

  import pair_worker
  if kind == 'step':
    compiled, state, data, info = build(config_name, 1, batch_size, nf)
    holder = [state]

    def step() -> float:
      holder[0], loss = compiled(holder[0], data)  # the state is donated: keep only the new one
      return float(np.asarray(jax.device_get(loss))[0])

    pair_worker.serve(step, info)
    return

  import jax.numpy as jnp

  import training
  import sde_lib
  from models import utils as mutils
  config = load_config(config_name, batch_size, nf)
  sde, eps = sde_lib.get_sde(config)
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config)
  score_fn = mutils.get_score_fn(sde, model, state.params, state.model_state, train=False,
                                 continuous=config.training.continuous)
  flow = sde.reverse(score_fn, probability_flow=True)
  shape = mutils.input_shape(config, config.training.batch_size)
  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  x = jax.random.uniform(keys[0], shape, minval=-1., maxval=1.)
  t = jax.random.uniform(keys[1], shape[:1], minval=eps, maxval=sde.T)
  probe = jax.random.rademacher(keys[2], shape, jnp.float32)

  def work(x, t, probe):
    drift_fn = lambda y: flow.sde(y, t)[0]
    if kind == 'forward':
      return jnp.mean(jnp.abs(drift_fn(x)))
    drift, jvp_fn = jax.linearize(drift_fn, x)  # as likelihood.py: one forward, one JVP
    return jnp.mean(jnp.abs(drift)) + jnp.sum(probe * jvp_fn(probe))

  t0 = time.perf_counter()
  compiled = jax.jit(work).lower(x, t, probe).compile()
  info = dict(config=config_name, nf=nf, batch=config.training.batch_size, compile_s=time.perf_counter() - t0,
              xla_flags=os.environ.get('XLA_FLAGS', ''), impl='ours (jax %s)' % jax.__version__)
  pair_worker.serve(lambda: float(compiled(x, t, probe)), info)


# ------------------------------------------------------------------------------------------------
# Alternating two workers


class Worker:
  """A worker process (pair_worker protocol) with its label."""

  def __init__(self, label: str, cmd: Sequence[str], env: dict):
    self.label = label
    self.proc = subprocess.Popen(list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 env=env, cwd=ROOT, text=True)
    self.info = self._read()

  def _read(self) -> dict:
    line = self.proc.stdout.readline()
    if not line:
      raise RuntimeError(f'worker {self.label!r} exited with code {self.proc.wait()} '
                         f'(its stderr is above)')
    return json.loads(line)

  def run(self, n: int) -> dict:
    self.proc.stdin.write(f'run {n}\n')
    self.proc.stdin.flush()
    return self._read()

  def close(self) -> None:
    if self.proc.poll() is None:
      self.proc.stdin.write('quit\n')
      self.proc.stdin.flush()
      self.proc.wait(timeout=60)


def ours_cmd(kind: str, config: str, nf: int, batch: int) -> List[str]:
  return [sys.executable, os.path.abspath(__file__), '--worker', kind, config, str(nf), str(batch)]


def torch_cmd(kind: str, config: str, nf: int, batch: int, threads: int) -> Tuple[List[str], dict]:
  missing = [v for v in TORCH_ENV if not os.environ.get(v)]
  if missing:
    raise SystemExit(f'--pair needs {" and ".join(missing)}: the Python of a virtual environment '
                     f'with torch (+ ml_collections) and a checkout of score_sde_pytorch whose op/ '
                     f'CUDA extensions are stubbed.')
  cmd = [os.environ['SCORE_SDE_TORCH_PYTHON'], os.path.join(HERE, 'torch_peer.py'), kind, config,
         str(nf), str(batch), str(threads)]
  return cmd, {}


def side_env(extra: dict, threads: int) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', **extra)
  env.setdefault('JAX_PLATFORMS', 'cpu')
  # Same thread count for both sides: torch via set_num_threads, XLA via the CPUs it may use.
  env['OMP_NUM_THREADS'] = str(threads)
  return env


def pinned(cmd: List[str], threads: int) -> List[str]:
  """cmd restricted to the first `threads` CPUs when fewer than all (XLA sizes its pool by them)."""
  if threads >= (os.cpu_count() or 1):
    return cmd
  return ['taskset', '-c', f'0-{threads - 1}'] + cmd


def parse_side(spec: str) -> dict:
  """'ENV=VALUE ... --xla_flag=v ...' -> the environment of one --ab side."""
  env, flags = {}, []
  for word in shlex.split(spec):
    if word.startswith(('--', 'xla_')):
      flags.append('--' + word.lstrip('-'))
    else:
      key, _, value = word.partition('=')
      env[key] = value
  env['XLA_FLAGS'] = ' '.join(flags + ([os.environ['XLA_FLAGS']] if os.environ.get('XLA_FLAGS') else []))
  return env


def alternate(a: Worker, b: Worker, rounds: int, round_s: float, idle_s: float) -> dict:
  """Runs a and b alternately for `rounds` rounds; per-round ratio of median step times a / b."""
  # Calibrate the steps per round so that each side runs about round_s seconds.
  n = {}
  for w in (a, b):
    t = min(w.run(3)['times'])
    n[w.label] = max(1, int(round(round_s / t)))
  results = {a.label: [], b.label: []}
  ratios, cpu_ratios = [], []
  for r in range(rounds):
    order = (a, b) if r % 2 == 0 else (b, a)
    med, cpu = {}, {}
    for w in order:
      time.sleep(idle_s)  # let the other side's spinning threads go idle
      res = w.run(n[w.label])
      results[w.label].append(res)
      med[w.label] = statistics.median(res['times'])
      cpu[w.label] = res['cpu_s'] / len(res['times'])
    ratios.append(med[a.label] / med[b.label])
    cpu_ratios.append(cpu[a.label] / cpu[b.label])
    print(f'  round {r + 1}/{rounds}: {a.label} {med[a.label] * 1e3:.0f} ms, '
          f'{b.label} {med[b.label] * 1e3:.0f} ms, ratio {ratios[-1]:.3f}, CPU time ratio '
          f'{cpu_ratios[-1]:.3f}', file=sys.stderr, flush=True)
  out = dict(rounds=rounds, ratio_median=statistics.median(ratios),
             ratio_q1=_quantile(ratios, .25), ratio_q3=_quantile(ratios, .75),
             cpu_ratio_median=statistics.median(cpu_ratios), cpu_ratio_q1=_quantile(cpu_ratios, .25),
             cpu_ratio_q3=_quantile(cpu_ratios, .75))
  for w in (a, b):
    res = results[w.label]
    times = [t for x in res for t in x['times']]
    out[w.label] = dict(w.info, median_step_s=statistics.median(times),
                        cpu_util=sum(x['cpu_s'] for x in res) / sum(x['wall_s'] for x in res),
                        peak_rss_mb=res[-1]['peak_rss_mb'], last_loss=res[-1]['loss'],
                        steps=len(times))
  return out


def _quantile(xs: Sequence[float], q: float) -> float:
  xs = sorted(xs)
  return xs[min(len(xs) - 1, int(q * len(xs)))]


def run_pairs(runs, args) -> None:
  """--pair / --ab over (config, nf, batch) runs; prints one table row per run."""
  threads = args.threads or os.cpu_count()
  rows = []
  for config, nf, batch in runs:
    print(f'# {config} nf={nf} batch={batch}', file=sys.stderr, flush=True)
    if args.pair:
      sides = [('ours', ours_cmd(args.kind, config, nf, batch), side_env({}, threads)),
               ('original',) + _torch_side(args.kind, config, nf, batch, threads)]
    else:
      sides = [(label, ours_cmd(args.kind, config, nf, batch), side_env(parse_side(spec), threads))
               for label, spec in zip(('A', 'B'), args.ab)]
    workers = []
    try:
      for label, cmd, env in sides:  # started one after the other: compile peaks do not overlap
        workers.append(Worker(label, pinned(cmd, threads), env))
      out = alternate(workers[0], workers[1], args.rounds, args.round_s, args.idle_s)
    finally:
      for w in workers:
        w.close()
    a, b = (out[w.label] for w in workers)
    rows.append((config, nf, batch, out, a, b))
    print(json.dumps(dict(config=config, nf=nf, batch=batch, **out)), flush=True)

  la, lb = ('ours', 'original') if args.pair else ('A', 'B')
  if not args.pair:
    print(f'A: XLA_FLAGS {args.ab[0]!r}\nB: XLA_FLAGS {args.ab[1]!r}')
  print(f'\n{threads} threads each, {args.rounds} alternated rounds of ~{args.round_s:g} s per side')
  header = ('config', 'nf', 'batch', f'{la}/{lb} step time (median, q1-q3)',
            f'{la}/{lb} CPU time per step (median, q1-q3)', f'{la} img/s',
            f'{lb} img/s', f'{la} cores busy', f'{lb} cores busy', f'{la} peak RSS GiB',
            f'{lb} peak RSS GiB', 'RSS ratio')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for config, nf, batch, out, a, b in rows:
    print(f'| {config} | {nf} | {batch} | {out["ratio_median"]:.3f} ({out["ratio_q1"]:.3f}-'
          f'{out["ratio_q3"]:.3f}) | {out["cpu_ratio_median"]:.3f} ({out["cpu_ratio_q1"]:.3f}-'
          f'{out["cpu_ratio_q3"]:.3f}) | '
          f'{batch / a["median_step_s"]:.2f} | '
          f'{batch / b["median_step_s"]:.2f} | {a["cpu_util"]:.2f} | {b["cpu_util"]:.2f} | '
          f'{a["peak_rss_mb"] / 1024:.2f} | {b["peak_rss_mb"] / 1024:.2f} | '
          f'{a["peak_rss_mb"] / b["peak_rss_mb"]:.2f} |')
  for config, nf, batch, out, a, b in rows:  # the first call's value, same inputs on both sides
    print(f'{config} nf {nf}: first {args.kind} value {la} {a["loss"]!r}, {lb} {b["loss"]!r}')


def _torch_side(kind, config, nf, batch, threads):
  cmd, extra = torch_cmd(kind, config, nf, batch, threads)
  return cmd, side_env(extra, threads)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', nargs='+', default=list(DEFAULT_CONFIGS))
  parser.add_argument('--n_jitted', nargs='+', type=int, default=[1, 5])
  parser.add_argument('--seconds', type=float, default=10., help='timed seconds per measurement')
  parser.add_argument('--batch_size', type=int, default=0, help='override training.batch_size')
  parser.add_argument('--nf', type=int, default=0, help='override model.nf')
  parser.add_argument('--peers', action='store_true', help='the CIFAR-10 peer set (see PEERS)')
  parser.add_argument('--only', type=int, nargs='+', help='indices into PEERS (with --peers)')
  parser.add_argument('--pair', action='store_true', help='alternate with the PyTorch original')
  parser.add_argument('--ab', nargs=2, metavar=('SIDE_A', 'SIDE_B'),
                      help="alternate two of ours: 'ENV=V ... xla_flag=v ...' for each")
  parser.add_argument('--rounds', type=int, default=30)
  parser.add_argument('--round_s', type=float, default=2., help='seconds of steps per side per round')
  parser.add_argument('--idle_s', type=float, default=0.3, help='pause before each side runs')
  parser.add_argument('--threads', type=int, default=0, help='threads per side (default: all CPUs)')
  parser.add_argument('--one', nargs=2, metavar=('CONFIG', 'N_JITTED'), help=argparse.SUPPRESS)
  parser.add_argument('--kind', default='step', choices=['step', 'forward', 'likelihood'],
                      help="--pair / --ab: the train step, or the sampler's / likelihood's work per NFE")
  parser.add_argument('--worker', nargs=4, metavar=('KIND', 'CONFIG', 'NF', 'BATCH'),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    serve(args.worker[0], args.worker[1], int(args.worker[2]), int(args.worker[3]))
    return
  if args.one:
    print(json.dumps(measure(args.one[0], int(args.one[1]), args.seconds, args.batch_size,
                             args.nf)))
    return

  if args.pair or args.ab:
    peers = [PEERS[i] for i in args.only] if args.only else PEERS
    runs = (peers if args.peers else
            [(name, args.nf, args.batch_size) for name in args.configs])
    run_pairs(runs, args)
    return

  if args.peers:
    peers = [PEERS[i] for i in args.only] if args.only else PEERS
    runs = [(name, 1, batch, nf) for name, nf, batch in peers]
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
  header = ('config', 'nf', 'n_jit', 'batch', 'params', 'GFLOP/ex', 'init s', 'compile s',
            'steps/s', 'median ms/step', 'ex/s', 'GFLOP/s', 'peak RSS MB (import/init/1st step/end)')
  print('| ' + ' | '.join(header) + ' |')
  print('|' + '---|' * len(header))
  for r in rows:
    print(f'| {r["config"]} | {r["nf"]} | {r["n_jitted"]} | {r["batch"]} | {r["params"]:,} | '
          f'{r["gflops_per_example"]:.3g} | {r["init_s"]:.1f} | '
          f'{r["compile_s"]:.1f} | {r["steps_per_s"]:.1f} | {r["ms_per_step"]:.1f} | '
          f'{r["examples_per_s"]:.1f} | {r["gflops_per_example"] * r["examples_per_s"]:.0f} | '
          f'{r["rss_import_mb"]:.0f} / {r["rss_init_mb"]:.0f} / {r["rss_compile_mb"]:.0f} / '
          f'{r["peak_rss_mb"]:.0f} |')


if __name__ == '__main__':
  main()
