"""Closed-form diagonal Gaussian mixtures: exact samples, log-densities and scores of every
perturbed marginal under VE / VP / sub-VP.

For data p_0 = sum_k w_k N(mu_k, diag(s_k^2)) and a kernel x(t) = a(t) x(0) + std(t) z, the marginal
p_t = sum_k w_k N(a(t) mu_k, diag(a(t)^2 s_k^2 + std(t)^2)) is again a mixture, so its score and
density are exact. This is the ground truth for samplers, likelihoods, losses and the embedded toy
data sets; the demo samples it with every sampler.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib

Array = jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
  """sum_k weights[k] N(means[k], diag(stds[k]^2)) over R^D (inputs [B, ...] are flattened)."""
  weights: np.ndarray  # [K], sums to 1
  means: np.ndarray  # [K, D]
  stds: np.ndarray  # [K, D]

  def __post_init__(self):
    w = np.asarray(self.weights, np.float64)
    m = np.atleast_2d(np.asarray(self.means, np.float64))
    s = np.broadcast_to(np.asarray(self.stds, np.float64), m.shape).copy()
    if w.ndim != 1 or w.shape[0] != m.shape[0]:
      raise ValueError(f'weights must be [K] with K = {m.shape[0]} components, got shape {w.shape}.')
    if np.any(w < 0) or not np.isclose(w.sum(), 1.0):
      raise ValueError(f'weights must be non-negative and sum to 1, got {w}.')
    if np.any(s <= 0):
      raise ValueError('stds must be positive.')
    object.__setattr__(self, 'weights', w)
    object.__setattr__(self, 'means', m)
    object.__setattr__(self, 'stds', s)

  @property
  def dim(self) -> int:
    """Dimension D of the space."""
    return self.means.shape[1]

  @property
  def mean(self) -> np.ndarray:
    """Mean of the mixture, [D]."""
    return self.weights @ self.means

  @property
  def variance(self) -> np.ndarray:
    """Per-dimension variance of the mixture, [D]."""
    second = self.weights @ (self.means ** 2 + self.stds ** 2)
    return second - self.mean ** 2

  def sample(self, rng: Array, n: int, *, return_components: bool = False):
    """n exact samples [n, D] (and their component indices when asked)."""
    k_rng, z_rng = jax.random.split(rng)
    k = jax.random.choice(k_rng, len(self.weights), (n,), p=jnp.asarray(self.weights, jnp.float32))
    z = jax.random.normal(z_rng, (n, self.dim))
    x = jnp.asarray(self.means, jnp.float32)[k] + jnp.asarray(self.stds, jnp.float32)[k] * z
    return (x, k) if return_components else x

  def marginal(self, sde: sde_lib.SDE, t: float) -> 'GaussianMixture':
    """The perturbed marginal p_t at one time t, as a mixture."""
    a, std = (float(v[0]) for v in sde.marginal_coeffs(jnp.full((1,), t)))
    return GaussianMixture(self.weights, a * self.means, np.sqrt(a ** 2 * self.stds ** 2 + std ** 2))

  def _components(self, x: Array, a: Optional[Array] = None, std: Optional[Array] = None):
    """Per-example component means [B, K, D], variances [B, K, D] and flattened x [B, D]."""
    xf = x.reshape(x.shape[0], -1)
    means = jnp.asarray(self.means, xf.dtype)[None]
    var = jnp.asarray(self.stds, xf.dtype)[None] ** 2
    if a is not None:
      a = a[:, None, None]
      means, var = a * means, a ** 2 * var + std[:, None, None] ** 2
    return xf, means, var

  def _log_joint(self, xf, means, var):
    log_normal = -0.5 * jnp.sum(jnp.log(2 * jnp.pi * var) + (xf[:, None] - means) ** 2 / var, -1)
    return jnp.log(jnp.asarray(self.weights, xf.dtype)) + log_normal  # [B, K]

  def log_prob(self, x: Array, a: Optional[Array] = None, std: Optional[Array] = None) -> Array:
    """log p(x) per example [B]; with per-example kernel coefficients (a, std), log p_t(x)."""
    log_joint = self._log_joint(*self._components(x, a, std))
    return jax.nn.logsumexp(log_joint, axis=-1)

  def score(self, x: Array, a: Optional[Array] = None, std: Optional[Array] = None) -> Array:
    """grad_x log p(x), same shape as x; with (a, std), the score of p_t."""
    xf, means, var = self._components(x, a, std)
    resp = jax.nn.softmax(self._log_joint(xf, means, var), axis=-1)  # [B, K]
    s = jnp.sum(resp[..., None] * (means - xf[:, None]) / var, axis=1)
    return s.reshape(x.shape)

  def log_posterior(self, x: Array, a: Optional[Array] = None, std: Optional[Array] = None) -> Array:
    """log p(k | x) [B, K], the component posteriors; with (a, std), those of the noisy x under p_t
    (the exact noise-conditional classifier of classifier guidance)."""
    return jax.nn.log_softmax(self._log_joint(*self._components(x, a, std)), axis=-1)

  def component_score(self, x: Array, k: Array, a: Optional[Array] = None,
                      std: Optional[Array] = None) -> Array:
    """grad_x log N_k(x) of each example's component k [B] (with (a, std): of p_t(x | k)), the
    exact class-conditional score."""
    xf, means, var = self._components(x, a, std)
    idx = jnp.asarray(k, jnp.int32)[:, None, None]
    pick = lambda v: jnp.take_along_axis(jnp.broadcast_to(v, (xf.shape[0],) + v.shape[1:]), idx,
                                         axis=1)[:, 0]
    return ((pick(means) - xf) / pick(var)).reshape(x.shape)


def score_fn(gmm: GaussianMixture, sde: sde_lib.SDE) -> Callable[[Array, Array], Array]:
  """The exact score_fn(x, t) of the mixture's perturbed marginals under `sde`."""

  def fn(x, t):
    a, std = sde.marginal_coeffs(t)
    return gmm.score(x, a, std)

  return fn


def log_prob_fn(gmm: GaussianMixture, sde: sde_lib.SDE) -> Callable[[Array, Array], Array]:
  """The exact log p_t(x) of the mixture's perturbed marginals, per example."""

  def fn(x, t):
    a, std = sde.marginal_coeffs(t)
    return gmm.log_prob(x, a, std)

  return fn


def log_posterior_fn(gmm: GaussianMixture, sde: sde_lib.SDE) -> Callable[[Array, Array], Array]:
  """The exact noisy-data classifier log p_t(k | x) [B, K] of the mixture's components."""

  def fn(x, t):
    a, std = sde.marginal_coeffs(t)
    return gmm.log_posterior(x, a, std)

  return fn


def component_score_fn(gmm: GaussianMixture, sde: sde_lib.SDE,
                       labels: Array) -> Callable[[Array, Array], Array]:
  """The exact class-conditional score_fn(x, t) of p_t(x | k), k = labels [B] (or one int)."""

  def fn(x, t):
    a, std = sde.marginal_coeffs(t)
    k = jnp.broadcast_to(jnp.asarray(labels, jnp.int32), (x.shape[0],))
    return gmm.component_score(x, k, a, std)

  return fn


def ring2d(n_modes: int = 8, radius: float = 4.0, std: float = 0.4) -> GaussianMixture:
  """n_modes equal-weight isotropic Gaussians on a circle of the given radius."""
  angles = 2 * np.pi * np.arange(n_modes) / n_modes
  means = radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return GaussianMixture(np.full(n_modes, 1. / n_modes), means, np.full((n_modes, 2), std))


def mixture2d() -> GaussianMixture:
  """An uneven, anisotropic 3-component 2-D mixture (weights 0.5 / 0.3 / 0.2)."""
  return GaussianMixture(np.array([0.5, 0.3, 0.2]),
                         np.array([[-3.0, -2.0], [3.0, -1.0], [0.0, 3.0]]),
                         np.array([[0.5, 1.2], [1.0, 0.3], [0.6, 0.6]]))


def gmm_nd(dim: int = 16, n_modes: int = 4, seed: int = 0) -> GaussianMixture:
  """A seeded D-dimensional mixture: means U(-2, 2), stds U(0.2, 0.6), random weights."""
  rs = np.random.RandomState(seed)
  w = rs.uniform(0.5, 1.5, n_modes)
  return GaussianMixture(w / w.sum(), rs.uniform(-2, 2, (n_modes, dim)),
                         rs.uniform(0.2, 0.6, (n_modes, dim)))


_PRESETS = {'ring2d': ring2d, 'mixture2d': mixture2d, 'gmm_nd': gmm_nd}


def get_mixture(name: str, dim: Optional[int] = None) -> GaussianMixture:
  """A named preset mixture ('ring2d', 'mixture2d', 'gmm_nd'; `dim` only for 'gmm_nd')."""
  if name not in _PRESETS:
    raise ValueError(f'Unknown mixture {name!r}; valid choices: {sorted(_PRESETS)}.')
  if name == 'gmm_nd':
    return gmm_nd(dim or 16)
  if dim not in (None, 2):
    raise ValueError(f'Mixture {name!r} is 2-D; got dim={dim}.')
  return _PRESETS[name]()
