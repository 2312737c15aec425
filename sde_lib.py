"""Forward SDEs of score-based generative modeling: VE, VP and sub-VP.

Each SDE is a small immutable object of Python floats and NumPy tables; its
methods are pure functions of JAX arrays, so an SDE can be closed over inside
`jax.jit`. Names and meanings follow the original implementation (Song et al.
2021) so user code ports over:

- `sde(x, t) -> (drift, diffusion)`: the forward SDE dx = f(x, t) dt + g(t) dw;
- `marginal_prob(x, t) -> (mean, std)`: the perturbation kernel p_0t(x(t) | x(0));
- `prior_sampling(rng, shape)`, `prior_logp(z)`: the terminal distribution p_T;
- `discretize(x, t) -> (f, G)`: one step x_{i+1} = x_i + f + G z of the
  discrete chain (SMLD for VE, DDPM for VP, Euler-Maruyama otherwise);
- `reverse(score_fn, probability_flow)`: the reverse-time SDE or the
  probability-flow ODE, with the same interface.

Time labels `t` always have shape [B] (one time per example).
"""
from __future__ import annotations

import abc
from typing import Callable, Tuple

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def batch_mul(v: Array, x: Array) -> Array:
  """Multiplies per-example scalars `v: [B]` into `x: [B, ...]` by broadcasting."""
  v = jnp.asarray(v)
  return v.reshape(v.shape + (1,) * (x.ndim - v.ndim)) * x


def _flat_sum(x: Array) -> Array:
  """Sums every axis but the leading (batch) one."""
  return jnp.sum(x.reshape(x.shape[0], -1), axis=-1)


def _gaussian_logp(z: Array, var: float) -> Array:
  """Log-density of z under N(0, var I), per example."""
  d = int(np.prod(z.shape[1:]))
  return -0.5 * d * np.log(2 * np.pi * var) - _flat_sum(z ** 2) / (2 * var)


def _check_positive(name: str, value: float) -> float:
  value = float(value)
  if not np.isfinite(value) or value <= 0:
    raise ValueError(f'{name} must be a positive finite number, got {value!r}.')
  return value


def _check_n(n: int) -> int:
  if int(n) != n or n < 1:
    raise ValueError(f'N (number of discretization steps) must be a positive integer, got {n!r}.')
  return int(n)


class SDE(abc.ABC):
  """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T]."""

  def __init__(self, N: int):
    self.N = _check_n(N)

  @property
  def T(self) -> float:
    """End time of the forward SDE."""
    return 1.0

  @abc.abstractmethod
  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Drift f(x, t) (shape of x) and diffusion g(t) (shape [B])."""

  @abc.abstractmethod
  def marginal_coeffs(self, t: Array) -> Tuple[Array, Array]:
    """Mean coefficient a(t) and std s(t) of p_0t: x(t) = a(t) x(0) + s(t) z."""

  def marginal_prob(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Mean (shape of x) and std (shape [B]) of the perturbation kernel p_0t(x(t) | x(0) = x)."""
    a, std = self.marginal_coeffs(t)
    return batch_mul(a, x), std

  @abc.abstractmethod
  def prior_sampling(self, rng: Array, shape) -> Array:
    """Samples of the prior p_T."""

  @abc.abstractmethod
  def prior_logp(self, z: Array) -> Array:
    """Log-density of the prior p_T at z, per example: [B]."""

  def timestep_index(self, t: Array) -> Array:
    """Index i of the discrete chain for continuous time t: floor(t (N - 1) / T)."""
    return (t * (self.N - 1) / self.T).astype(jnp.int32)

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Euler-Maruyama discretization with step T / N: x_{i+1} = x_i + f + G z."""
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * np.sqrt(dt)

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> 'ReverseSDE':
    """The reverse-time SDE (or the probability-flow ODE) driven by `score_fn`."""
    return ReverseSDE(self, score_fn, probability_flow)


class ReverseSDE:
  """Reverse-time SDE dx = [f - g^2 s] dt + g dw_bar, or ODE dx = [f - g^2 s / 2] dt."""

  def __init__(self, forward: SDE, score_fn: ScoreFn, probability_flow: bool = False):
    self.forward = forward
    self.score_fn = score_fn
    self.probability_flow = bool(probability_flow)
    self.N = forward.N

  @property
  def T(self) -> float:
    return self.forward.T

  def sde(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Drift and diffusion of the reverse-time process (diffusion 0 for the ODE)."""
    drift, diffusion = self.forward.sde(x, t)
    score = self.score_fn(x, t)
    weight = 0.5 if self.probability_flow else 1.0
    drift = drift - batch_mul(weight * diffusion ** 2, score)
    return drift, (jnp.zeros_like(diffusion) if self.probability_flow else diffusion)

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Reverse of the forward discretization: rev_f = f - G^2 s (halved for the ODE)."""
    f, G = self.forward.discretize(x, t)
    score = self.score_fn(x, t)
    weight = 0.5 if self.probability_flow else 1.0
    rev_f = f - batch_mul(weight * G ** 2, score)
    return rev_f, (jnp.zeros_like(G) if self.probability_flow else G)


class _LinearDriftSDE(SDE):
  """Shared beta schedule of VP and sub-VP: f(x, t) = -beta(t) x / 2, beta linear in t."""

  def __init__(self, beta_min: float = 0.1, beta_max: float = 20., N: int = 1000):
    super().__init__(N)
    self.beta_0 = _check_positive('beta_min', beta_min)
    self.beta_1 = _check_positive('beta_max', beta_max)
    if self.beta_1 < self.beta_0:
      raise ValueError(f'beta_max ({beta_max}) must be >= beta_min ({beta_min}).')
    # The DDPM chain: betas = linspace(beta_min / N, beta_max / N, N).
    self.discrete_betas = np.linspace(self.beta_0 / self.N, self.beta_1 / self.N, self.N)
    self.alphas = 1. - self.discrete_betas
    self.alphas_cumprod = np.cumprod(self.alphas)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_1m_alphas_cumprod = np.sqrt(1. - self.alphas_cumprod)

  def beta(self, t: Array) -> Array:
    """beta(t) = beta_min + t (beta_max - beta_min)."""
    return self.beta_0 + t * (self.beta_1 - self.beta_0)

  def log_mean_coeff(self, t: Array) -> Array:
    """log a(t) = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""
    return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def prior_sampling(self, rng: Array, shape) -> Array:
    return jax.random.normal(rng, shape)

  def prior_logp(self, z: Array) -> Array:
    return _gaussian_logp(z, 1.0)


class VPSDE(_LinearDriftSDE):
  """Variance-preserving SDE (continuous DDPM): dx = -beta x / 2 dt + sqrt(beta) dw."""

  def sde(self, x, t):
    beta_t = self.beta(t)
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t)

  def marginal_coeffs(self, t):
    lmc = self.log_mean_coeff(t)
    # std = sqrt(1 - a^2), written with expm1 to keep precision near t = 0.
    return jnp.exp(lmc), jnp.sqrt(-jnp.expm1(2. * lmc))

  def discretize(self, x, t):
    """DDPM chain: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z."""
    i = self.timestep_index(t)
    beta = jnp.asarray(self.discrete_betas, x.dtype)[i]
    alpha = jnp.asarray(self.alphas, x.dtype)[i]
    f = batch_mul(jnp.sqrt(alpha), x) - x
    return f, jnp.sqrt(beta)


class subVPSDE(_LinearDriftSDE):
  """Sub-VP SDE: VP drift, diffusion^2 = beta(t) (1 - exp(-2 int_0^t beta))."""

  def sde(self, x, t):
    beta_t = self.beta(t)
    # 1 - exp(-2 beta_min t - (beta_max - beta_min) t^2) = 1 - a(t)^4, via expm1.
    discount = -jnp.expm1(4. * self.log_mean_coeff(t))
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_coeffs(self, t):
    lmc = self.log_mean_coeff(t)
    return jnp.exp(lmc), -jnp.expm1(2. * lmc)  # std = 1 - a^2, no square root


class VESDE(SDE):
  """Variance-exploding SDE (continuous SMLD): dx = sigma(t) sqrt(2 log(smax/smin)) dw."""

  def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50., N: int = 1000):
    super().__init__(N)
    self.sigma_min = _check_positive('sigma_min', sigma_min)
    self.sigma_max = _check_positive('sigma_max', sigma_max)
    if self.sigma_max <= self.sigma_min:
      raise ValueError(f'sigma_max ({sigma_max}) must be > sigma_min ({sigma_min}).')
    # SMLD noise levels, ascending: geometric(sigma_min, sigma_max, N).
    self.discrete_sigmas = np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))

  def sigma(self, t: Array) -> Array:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    diffusion = self.sigma(t) * np.sqrt(2 * (np.log(self.sigma_max) - np.log(self.sigma_min)))
    return jnp.zeros_like(x), diffusion

  def marginal_coeffs(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def prior_sampling(self, rng, shape):
    return jax.random.normal(rng, shape) * self.sigma_max

  def prior_logp(self, z):
    return _gaussian_logp(z, self.sigma_max ** 2)

  def discretize(self, x, t):
    """SMLD chain: x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z (sigma_{-1} = 0)."""
    i = self.timestep_index(t)
    sigmas = jnp.asarray(self.discrete_sigmas, x.dtype)
    sigma = sigmas[i]
    adjacent = jnp.where(i == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(i - 1, 0)])
    return jnp.zeros_like(x), jnp.sqrt(sigma ** 2 - adjacent ** 2)


SDE_CLASSES = {'vesde': VESDE, 'vpsde': VPSDE, 'subvpsde': subVPSDE}


def get_sde(config) -> Tuple[SDE, float]:
  """Builds the SDE named by `config.training.sde` and returns it with its sampling eps."""
  name = str(config.training.sde).lower()
  if name not in SDE_CLASSES:
    raise ValueError(f'Unknown SDE {config.training.sde!r}; valid choices: {sorted(SDE_CLASSES)}.')
  m = config.model
  if name == 'vesde':
    return VESDE(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales), 1e-5
  return SDE_CLASSES[name](beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales), 1e-3
