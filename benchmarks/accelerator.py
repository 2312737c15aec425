"""Accelerator figures in one short run (benchmarks/accelerator.sh calls this): train step, MFU,
fast sampling and likelihood throughput on the first device.

    python benchmarks/accelerator.py [--nf 128] [--batch 128] [--dtypes float32 bfloat16]
        [--configs vp/cifar10_ddpmpp_continuous ve/cifar10_ncsnpp_continuous] [--steps 10]
        [--peak_tflops F] [--budget_s 280]
    python benchmarks/accelerator.py --tiny   # the same code paths at CPU size (a smoke test)

For each config and dtype: the jitted train step (the library's training.get_train_step on all local
devices, synthetic batch already on the device) with its median step time over --steps waited-for
steps, images/s, achieved FLOP/s (XLA's cost analysis of the compiled step) and MFU against the
device's peak for that dtype (a table of datasheet dense peaks by device kind; f32 convolutions
and matmuls run as TF32 on NVIDIA tensor cores under JAX's default precision, so f32 is read
against the TF32 peak there; --peak_tflops overrides). Then, in float32 for each config: sampling
with `sampling.fast_sample(solver='dpmpp_2m', n_steps=20)` in images/s, and the
probability-flow likelihood (rtol = atol = 1e-3, Rademacher trace) in examples/s, of an
untrained network. Items left when --budget_s runs out are skipped with a note. No assertions.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from train_step import build, load_config  # also puts the repository root on sys.path
from common import time_compiled  # noqa: E402

import likelihood  # noqa: E402
import training  # noqa: E402
import sampling  # noqa: E402
import sde_lib  # noqa: E402
from models import utils as mutils  # noqa: E402

# Dense datasheet peaks in TFLOP/s: (float32 as the convolutions run it, bfloat16).
PEAK_TFLOPS = {'H200': (494.7, 989.4), 'H100': (494.7, 989.4), 'A100': (156., 312.),
               'L40S': (183., 362.), 'A10': (62.5, 125.), 'V100': (15.7, 125.),
               'TPU v4': (275., 275.), 'TPU v5 lite': (197., 197.), 'TPU v5p': (459., 459.),
               'TPU v6 lite': (918., 918.)}
CONFIGS = ('vp/cifar10_ddpmpp_continuous', 've/cifar10_ncsnpp_continuous')


def peak_tflops(device, dtype: str, override: float) -> float:
  """The device's dense peak for `dtype` (NaN when its kind is not in the table)."""
  if override:
    return override
  for kind, peaks in PEAK_TFLOPS.items():
    if kind.lower() in device.device_kind.lower():
      return peaks[dtype == 'bfloat16']
  return float('nan')


def train_row(name, nf, batch, dtype, steps, peak):
  compiled, state, data, info = build(name, 1, batch, nf, dtype)
  times = []
  for _ in range(steps + 1):
    t0 = time.perf_counter()
    state, loss = compiled(state, data)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  step_s = statistics.median(times[1:])
  tflops = info['gflops_per_example'] * batch / step_s / 1e3
  mfu = f'{100 * tflops / peak:.1f}% of {peak:g}' if np.isfinite(peak) else 'n/a (peak unknown)'
  print(f'| train {name} | {dtype} | nf {nf}, batch {batch} | {info["compile_s"]:.0f} s | '
        f'{step_s * 1e3:.1f} ms | {batch / step_s:.1f} img/s | {tflops:.3g} TFLOP/s | {mfu} | '
        f'finite {bool(np.isfinite(np.asarray(loss)).all())} |', flush=True)


def sampling_rows(name, nf, batch):
  config = load_config(name, batch, nf)
  sde, eps = sde_lib.get_sde(config)
  model, state = training.init_train_state(jax.random.PRNGKey(0), config)
  score_fn = mutils.get_score_fn(sde, model, state.params, state.model_state, train=False,
                                 continuous=config.training.continuous)
  shape = mutils.input_shape(config, batch)
  what = 'fast_sample dpmpp_2m, 20 steps'
  fn = jax.jit(lambda r: sampling.fast_sample(r, sde, score_fn, shape, solver='dpmpp_2m', n_steps=20))
  compile_s, t, (_, nfe) = time_compiled(fn, jax.random.PRNGKey(1))
  print(f'| sample {name} | float32 | {what}, batch {batch} | {compile_s:.0f} s | {t * 1e3:.0f} ms | '
        f'{batch / t:.1f} img/s | {int(nfe)} NFE | | |', flush=True)
  x = jax.random.uniform(jax.random.PRNGKey(2), shape, minval=-1., maxval=1.)
  fn = jax.jit(lambda r, x: likelihood.log_likelihood(r, sde, score_fn, x, rtol=1e-3, atol=1e-3))
  compile_s, t, (_, _, nfe) = time_compiled(fn, jax.random.PRNGKey(3), x)
  print(f'| likelihood {name} | float32 | rtol = atol = 1e-3, batch {batch} | {compile_s:.0f} s | '
        f'{t * 1e3:.0f} ms | {batch / t:.1f} ex/s | {int(nfe)} NFE | | |', flush=True)


def _with(config, field: str, value):
  config = config.copy_and_resolve_references()
  section, key = field.split('.')
  config[section][key] = value
  return config


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', nargs='+', default=list(CONFIGS))
  parser.add_argument('--nf', type=int, default=128)
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--sample_batch', type=int, default=0, help='default: --batch')
  parser.add_argument('--dtypes', nargs='+', default=['float32', 'bfloat16'])
  parser.add_argument('--steps', type=int, default=10)
  parser.add_argument('--peak_tflops', type=float, default=0.)
  parser.add_argument('--budget_s', type=float, default=280.)
  parser.add_argument('--tiny', action='store_true', help='CPU-size smoke test of every code path')
  args = parser.parse_args()
  if args.tiny:  # every code path once, at CPU size, however long it takes
    args.configs = ['digits/vp_ddpmpp_continuous', 'digits/ve_ncsnpp_continuous']
    args.nf, args.batch, args.steps, args.budget_s = 16, 4, 2, float('inf')
  device = jax.devices()[0]
  print(f'{jax.device_count()} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}')
  print('| what | dtype | size | compile | median time | throughput | FLOP/s or NFE | MFU | |')
  print('|---|---|---|---|---|---|---|---|---|')
  t_start = time.perf_counter()
  items = [(train_row, (name, args.nf, args.batch * jax.device_count(), dtype, args.steps,
                        peak_tflops(device, dtype, args.peak_tflops)))
           for dtype in args.dtypes for name in args.configs]
  items += [(sampling_rows, (name, args.nf, (args.sample_batch or args.batch) * jax.device_count()))
            for name in args.configs]
  for fn, fn_args in items:
    if time.perf_counter() - t_start > args.budget_s:
      print(f'(skipped {fn.__name__}{fn_args[:2]}: past the {args.budget_s:.0f} s budget)')
      continue
    fn(*fn_args)
  print(f'total {time.perf_counter() - t_start:.0f} s')


if __name__ == '__main__':
  main()
