"""Parameters and XLA FLOPs per image of the CIFAR-10 score networks (prints a table; no assertions).

    python benchmarks/networks.py [--nf 32 128] [--batch 8]

FLOPs come from `jax.jit(f).lower(...).compile().cost_analysis()` on the
current backend, for the forward pass and for forward + backward (gradient of
a mean-square loss with respect to the parameters, as in training), divided by
the batch size. Nothing is allocated for parameters: shapes come from
`jax.eval_shape`. Train-step images/s figures belong to the train-step
benchmark.
"""
from __future__ import annotations

import argparse
import importlib
import time

import jax
import jax.numpy as jnp
import numpy as np

from common import xla_flops  # also puts the repository root on sys.path
from models import utils as mutils

CONFIGS = ('vp/cifar10_ddpmpp_continuous', 've/cifar10_ncsnpp_continuous')


def measure(config_name: str, nf: int, batch: int) -> dict:
  """Parameter count and forward / forward+backward FLOPs per image for one config at width nf."""
  config = importlib.import_module('configs.' + config_name.replace('/', '.')).get_config()
  config.model.nf = nf
  model = mutils.create_model(config)
  x = jax.ShapeDtypeStruct(mutils.input_shape(config, batch), jnp.float32)
  y = jax.ShapeDtypeStruct((batch,), jnp.float32)
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  params = jax.eval_shape(lambda: model.init(rngs, jnp.zeros(x.shape), jnp.ones(y.shape)))['params']
  n_params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))

  def forward(p, x, y):
    return model.apply({'params': p}, x, y, train=False)

  def loss(p, x, y, key):
    out = model.apply({'params': p}, x, y, train=True, rngs={'dropout': key})
    return jnp.mean(out ** 2)

  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  t0 = time.time()
  fwd = jax.jit(forward).lower(params, x, y).compile()
  t1 = time.time()
  bwd = jax.jit(jax.value_and_grad(loss)).lower(params, x, y, key).compile()
  t2 = time.time()
  return dict(config=config_name, nf=nf, params=n_params, fwd_gflops=xla_flops(fwd) / batch / 1e9,
              fwd_bwd_gflops=xla_flops(bwd) / batch / 1e9, compile_s=(t1 - t0, t2 - t1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--nf', type=int, nargs='+', default=[32, 128])
  parser.add_argument('--batch', type=int, default=8)
  args = parser.parse_args()
  print(f'backend: {jax.default_backend()}, batch {args.batch}, 32x32x3 inputs')
  print(f'{"config":34s} {"nf":>4s} {"params":>12s} {"fwd GFLOP/img":>14s} {"fwd+bwd GFLOP/img":>18s}'
        f' {"compile s (fwd, f+b)":>22s}')
  for name in CONFIGS:
    for nf in args.nf:
      r = measure(name, nf, args.batch)
      print(f'{r["config"]:34s} {r["nf"]:4d} {r["params"]:12,d} {r["fwd_gflops"]:14.2f} '
            f'{r["fwd_bwd_gflops"]:18.2f} {r["compile_s"][0]:10.1f} {r["compile_s"][1]:10.1f}',
            flush=True)


if __name__ == '__main__':
  main()
