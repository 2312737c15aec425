"""Shared benchmark helpers: the D = 192 diagonal-Gaussian problem, compiled-call timing and
XLA's FLOP count. Importing it puts the repository root on sys.path (benchmarks run as scripts)."""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

import mixtures  # noqa: E402


def gaussian_problem(seed: int = 0) -> mixtures.GaussianMixture:
  """The issue's problem: one diagonal Gaussian on 3x8x8 = 192 dims, mean U(-0.5, 0.5), std U(0.1, 0.5)."""
  rs = np.random.RandomState(seed)
  return mixtures.GaussianMixture(np.ones(1), rs.uniform(-0.5, 0.5, (1, 192)), rs.uniform(0.1, 0.5, (1, 192)))


def time_compiled(fn: Callable, *args, repeats: int = 3) -> Tuple[float, float, object]:
  """(first-call seconds incl. compile - median, median of `repeats` compiled calls, last output)."""
  t0 = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t0
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  return first - med, med, out


def xla_flops(compiled) -> float:
  """FLOPs of a compiled jax program by XLA's cost analysis (NaN where the backend gives none)."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older JAX returns one dict per device
    cost = cost[0]
  return float(cost.get('flops', float('nan')))


def count_score_calls(score_fn: Callable) -> Tuple[Callable, list]:
  """A score function that records each evaluation through a host callback (benchmark-only)."""
  calls: list = []

  def fn(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return score_fn(x, t)

  return fn, calls
