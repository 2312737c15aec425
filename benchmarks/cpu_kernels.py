"""Kernel ceilings: GFLOP/s of XLA's 3x3 convolution (forward, and forward + both gradients) and
of a large matmul, at the shapes of the peer networks' levels, to read train_step.py against.

    python benchmarks/cpu_kernels.py

A network step cannot run faster than its convolutions: if the step's GFLOP/s (train_step.py)
is close to these, the remaining gap to another implementation is in the kernels, not the model.
Prints a table; no assertions.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from common import time_compiled

# (batch, height = width, channels in = out): nf 32 at batch 8 and nf 128 at batch 4, per level.
SHAPES = ((8, 32, 32), (8, 32, 64), (8, 16, 64), (8, 8, 64), (4, 32, 128), (4, 16, 256),
          (4, 8, 256))


def median_s(fn, *args) -> float:
  """Median seconds of 10 compiled calls of `fn(*args)`."""
  return time_compiled(fn, *args, repeats=10)[1]


def conv(x: jax.Array, w: jax.Array) -> jax.Array:
  """A 3x3 'SAME' convolution, NHWC / HWIO as the networks use."""
  return jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def main() -> None:
  print(f'backend {jax.default_backend()}, {jax.device_count()} device(s)')
  print('| batch | HxW | channels | fwd GFLOP/s | fwd + grads GFLOP/s |')
  print('|---|---|---|---|---|')
  fwd = jax.jit(conv)
  grads = jax.jit(jax.grad(lambda w, x: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  for b, h, c in SHAPES:
    x = jax.random.normal(jax.random.PRNGKey(0), (b, h, h, c))
    w = 0.01 * jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, c))
    flops = 2. * b * h * h * c * c * 9
    print(f'| {b} | {h}x{h} | {c} | {flops / median_s(fwd, x, w) / 1e9:.0f} | '
          f'{3 * flops / median_s(grads, w, x) / 1e9:.0f} |')
  a = jnp.ones((2048, 2048))
  print(f'matmul 2048^3: {2 * 2048 ** 3 / median_s(jax.jit(lambda m: m @ m), a) / 1e9:.0f} GFLOP/s')


if __name__ == '__main__':
  main()
