"""Test ground truth: closed-form Gaussian mixtures under VE / VP / sub-VP and two-sample statistics.

The mixture math itself lives in the library (`mixtures.py`, also used by the toy data sets and the
demo); this module adds what only tests need: the exact probability-flow map of a Gaussian, the exact
log p_T for prior-mismatch corrections, and distribution-comparison helpers with stated bounds.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import mixtures
import sde_lib
from mixtures import GaussianMixture, log_prob_fn, score_fn  # noqa: F401  (re-exported)

SDES = {
    # sigma_max above the ring's diameter (8), as the original's rule of thumb asks.
    've': (lambda: sde_lib.VESDE(sigma_min=0.01, sigma_max=20., N=1000), 1e-5),
    'vp': (lambda: sde_lib.VPSDE(beta_min=0.1, beta_max=20., N=1000), 1e-3),
    'subvp': (lambda: sde_lib.subVPSDE(beta_min=0.1, beta_max=20., N=1000), 1e-3),
}


def make_sde(name: str, N: int = 1000):
  """The test SDE `name` with N steps and its sampling eps."""
  build, eps = SDES[name]
  sde = build()
  sde_cls = type(sde)
  if isinstance(sde, sde_lib.VESDE):
    return sde_cls(sde.sigma_min, sde.sigma_max, N), eps
  return sde_cls(sde.beta_0, sde.beta_1, N), eps


def diag_gaussian(dim: int, seed: int = 0, mean_range=(-0.5, 0.5), std_range=(0.1, 0.5)) -> GaussianMixture:
  """A single diagonal Gaussian with seeded per-dimension mean U(mean_range) and std U(std_range)."""
  rs = np.random.RandomState(seed)
  return GaussianMixture(np.ones(1), rs.uniform(*mean_range, (1, dim)), rs.uniform(*std_range, (1, dim)))


def gaussian_flow_map(g: GaussianMixture, sde, x: np.ndarray, t0: float, t1: float) -> np.ndarray:
  """Exact probability-flow map x(t0) -> x(t1) of a single diagonal Gaussian.

  The ODE drift is affine in x and keeps p_t Gaussian, N(m_t, v_t), so the flow keeps the
  standardized coordinate (x - m_t) / sqrt(v_t) fixed: x(t1) = m_1 + sqrt(v_1 / v_0) (x(t0) - m_0)."""
  assert len(g.weights) == 1
  g0, g1 = g.marginal(sde, t0), g.marginal(sde, t1)
  return g1.means[0] + g1.stds[0] / g0.stds[0] * (np.asarray(x, np.float64) - g0.means[0])


@jax.jit
def mmd2(x: jax.Array, y: jax.Array) -> jax.Array:
  """Unbiased squared MMD between two sample sets with a sum of Gaussian kernels of bandwidths
  0.2, 0.5, 1 and 2 (from below the ring's mode width to its radius, so that both the shape of each
  mode and the placement of the modes count)."""
  def k(a, b):
    d2 = jnp.sum((a[:, None, :] - b[None, :, :]) ** 2, -1)
    return sum(jnp.exp(-d2 / (2 * h * h)) for h in (0.2, 0.5, 1.0, 2.0))
  n, m = x.shape[0], y.shape[0]
  kxx, kyy = k(x, x), k(y, y)
  return ((kxx.sum() - jnp.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - jnp.trace(kyy)) / (m * (m - 1))
          - 2 * k(x, y).mean())


def null_mmd_threshold(g: GaussianMixture, n: int, reps: int = 20, seed: int = 123) -> float:
  """An MMD^2 threshold for n samples: null mean + 6 null std over `reps` exact-vs-exact pairs.

  Under the null, n MMD^2 is a weighted sum of centred chi-squares; 6 standard deviations above the
  mean leaves a false-alarm rate of the order of 1e-3 per test, while a ring 5% too small (MMD^2 ~0.01
  at n = 2000, against a threshold ~0.007) is rejected (checked by tests)."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 2 * reps)
  null = np.array([float(mmd2(g.sample(keys[2 * i], n), g.sample(keys[2 * i + 1], n)))
                   for i in range(reps)])
  return float(null.mean() + 6 * null.std())


def nearest_mode_weights(g: GaussianMixture, x: np.ndarray) -> np.ndarray:
  """Fraction of samples whose nearest component mean is each mode (modes must be well separated)."""
  x = np.asarray(x, np.float64)
  nearest = np.argmin(((x[:, None, :] - g.means[None]) ** 2).sum(-1), axis=1)
  return np.bincount(nearest, minlength=len(g.weights)) / len(x)


def check_moments(x: np.ndarray, g: GaussianMixture, *, n_se: float = 5.0, rel_bias: float = 0.0):
  """Asserts per-dimension sample mean and variance within n_se standard errors of the exact ones,
  plus an allowance `rel_bias` (relative, for variance; times the std, for the mean) for the
  sampler's discretization bias. Standard errors: sqrt(var / n) for the mean and
  sqrt((mu4 - var^2) / n) for the variance, mu4 the exact 4th central moment."""
  x = np.asarray(x, np.float64)
  n = x.shape[0]
  mean, var = g.mean, g.variance
  # Exact 4th central moment of the mixture per dimension.
  c = g.means - mean
  s2 = g.stds ** 2
  mu4 = g.weights @ (c ** 4 + 6 * c ** 2 * s2 + 3 * s2 ** 2)
  se_mean = np.sqrt(var / n)
  se_var = np.sqrt(np.maximum(mu4 - var ** 2, 0) / n)
  err_mean = np.abs(x.mean(0) - mean)
  err_var = np.abs(x.var(0) - var)
  assert np.all(err_mean <= n_se * se_mean + rel_bias * np.sqrt(var)), (
      f'mean error {err_mean.max():.4g} > bound {(n_se * se_mean + rel_bias * np.sqrt(var)).min():.4g}')
  assert np.all(err_var <= n_se * se_var + rel_bias * var), (
      f'variance error {(err_var / var).max():.4g} (relative) exceeds bound')
