"""Speed of the evaluation pieces: FID Inception-v3 (random weights) and digits-classifier feature
throughput, compile times, and the cost of FID / KID on 2048-d features.

    JAX_PLATFORMS=cpu python benchmarks/eval.py [--batch 8] [--iters 3]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation  # noqa: E402
import inception  # noqa: E402


def _throughput(fn, images, iters: int):
  """(compile + first call seconds, images per second over `iters` further calls)."""
  t = time.perf_counter()
  jax.block_until_ready(fn(images))
  first = time.perf_counter() - t
  t = time.perf_counter()
  for _ in range(iters):
    jax.block_until_ready(fn(images))
  return first, iters * len(images) / (time.perf_counter() - t)


def main() -> None:
  """Prints the figures."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--iters', type=int, default=3)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  print(f'devices: {jax.devices()}')

  t = time.perf_counter()
  variables = inception.random_variables(0)
  print(f'inception random variables: {time.perf_counter() - t:.1f} s')
  fn = evaluation.inception_features_fn(variables)
  images = rng.random((args.batch, 32, 32, 3), np.float32)
  first, ips = _throughput(fn, images, args.iters)
  print(f'inception 299px batch {args.batch}: compile+first call {first:.1f} s, '
        f'{ips:.1f} images/s')

  t = time.perf_counter()
  dvars, info = evaluation.train_digits_classifier()
  print(f'digits classifier training: {time.perf_counter() - t:.1f} s, test accuracy '
        f'{info["test_accuracy"]:.4f}')
  dfn = evaluation.digits_features_fn(dvars)
  digits = rng.random((1000, 8, 8, 1), np.float32)
  first, ips = _throughput(dfn, digits, 20)
  print(f'digits classifier batch 1000: compile+first call {first:.2f} s, {ips:,.0f} images/s')

  x = rng.random((10000, 2048)).astype(np.float32)
  y = rng.random((10000, 2048)).astype(np.float32) + 0.01
  t = time.perf_counter()
  mu1, s1 = evaluation.feature_stats(x)
  mu2, s2 = evaluation.feature_stats(y)
  t_stats = time.perf_counter() - t
  t = time.perf_counter()
  fid = evaluation.frechet_distance(mu1, s1, mu2, s2)
  t_fid = time.perf_counter() - t
  t = time.perf_counter()
  kid = evaluation.kernel_inception_distance(x, y, num_subsets=10)
  t_kid = time.perf_counter() - t
  print(f'2048-d, 10k features each: stats {t_stats:.1f} s, FID {t_fid:.1f} s ({fid:.4f}), '
        f'KID 10 subsets of 1000 {t_kid:.1f} s ({kid:.5f}; the default 100 subsets: x10)')


if __name__ == '__main__':
  main()
