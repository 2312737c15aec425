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

from registry import Registry

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
  """A forward SDE dx = f(x, t) dt + g(t) dw on t in [0, T], with Gaussian perturbation kernels.

  Everything that depends on WHICH SDE it is lives here, so samplers, losses and the network
  wrapper never test the SDE's type (adding an SDE is one subclass plus, optionally, a registry
  name for configs):
  - the Gaussian view x_t = alpha_t x_0 + sigma_t eps: `marginal_coeffs`, `alpha`, `sigma`,
    `log_snr` (lambda_t = log(alpha_t / sigma_t)) and its inverse `t_from_log_snr`;
  - the network's parametrization: `network_labels` (its time input), `network_std` and
    `score_from_output` (noise prediction, score = -output / sigma; or score prediction);
  - the discrete chain, when the SDE has one (SMLD for VE, DDPM for VP): `discrete_coeffs`,
    `discrete_labels`, `discretize`, the ancestral and Langevin coefficients;
  - the likelihood weighting's primitive and its inverse (importance sampling of t);
  - `default_eps` (where sampling stops) and `from_config`.
  """
  #: What the network outputs: 'noise' (eps prediction, score = -output / sigma_t) or 'score'.
  prediction = 'noise'
  #: Sampling stops at t = default_eps (Song et al. 2021: 1e-3 for VP / sub-VP, 1e-5 for VE).
  default_eps = 1e-3
  #: Whether the SDE has a discrete chain (SMLD / DDPM) for discrete-time training and labels.
  has_discrete_chain = False

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
    """alpha_t and sigma_t of p_0t: x(t) = alpha_t x(0) + sigma_t z, each of the shape of t."""

  @abc.abstractmethod
  def prior_sampling(self, rng: Array, shape) -> Array:
    """Samples of the prior p_T."""

  @abc.abstractmethod
  def prior_logp(self, z: Array) -> Array:
    """Log-density of the prior p_T at z, per example: [B]."""

  @abc.abstractmethod
  def t_from_log_snr(self, lam: Array) -> Array:
    """The time t with log_snr(t) = lam (closed form; the inverse of `log_snr`)."""

  def check_time(self, value: float, name: str = 'eps') -> float:
    """`value` as a float if it lies in (0, T); else a ValueError naming it (before any tracing)."""
    try:
      ok = 0. < float(value) < self.T
    except (TypeError, ValueError):
      ok = False
    if not ok:
      raise ValueError(f'{name} must lie in (0, T) = (0, {self.T}), got {value!r}.')
    return float(value)

  # -- The Gaussian-perturbation view -----------------------------------------------------------

  def alpha(self, t: Array) -> Array:
    """Mean coefficient alpha_t of the perturbation kernel."""
    return self.marginal_coeffs(t)[0]

  def sigma(self, t: Array) -> Array:
    """Standard deviation sigma_t of the perturbation kernel."""
    return self.marginal_coeffs(t)[1]

  def log_snr(self, t: Array) -> Array:
    """lambda_t = log(alpha_t / sigma_t), decreasing in t (DPM-Solver's half log-SNR)."""
    alpha, sigma = self.marginal_coeffs(t)
    return jnp.log(alpha) - jnp.log(sigma)

  def marginal_prob(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Mean (shape of x) and std (shape [B]) of the perturbation kernel p_0t(x(t) | x(0) = x)."""
    a, std = self.marginal_coeffs(t)
    return batch_mul(a, x), std

  # -- The network's parametrization (EDM's Precond, k-diffusion's Denoiser) --------------------

  def network_labels(self, t: Array, continuous: bool) -> Array:
    """The network's time input at continuous time t [B]: t * 999 (the DDPM convention) when
    continuous, the integer level of the discrete chain (`discrete_labels`) otherwise."""
    if continuous or not self.has_discrete_chain:
      return t * 999
    return self.discrete_labels(self.timestep_index(t))

  def network_std(self, t: Array, continuous: bool) -> Array:
    """sigma used to turn the network's output into a score: sigma_t, or the discrete level's."""
    if continuous or not self.has_discrete_chain:
      return self.sigma(t)
    return self.discrete_coeffs(self.timestep_index(t))[1]

  def score_from_output(self, output: Array, std: Array) -> Array:
    """The score from the network's output at noise level std [B]: -output / std for noise
    prediction (Ho et al. 2020: eps_theta = -sigma score), the output itself for score models."""
    if self.prediction == 'noise':
      return batch_mul(-1. / std, output)
    return output

  # -- The discrete chain ------------------------------------------------------------------------

  def timestep_index(self, t: Array) -> Array:
    """Index i of the discrete chain for continuous time t: floor(t (N - 1) / T)."""
    return (t * (self.N - 1) / self.T).astype(jnp.int32)

  def discrete_coeffs(self, i: Array) -> Tuple[Array, Array]:
    """(alpha_i, sigma_i) of level i (ascending noise) of the discrete chain."""
    raise NotImplementedError(f'{type(self).__name__} has no discrete chain; train with '
                              'training.continuous=True.')

  def discrete_labels(self, i: Array) -> Array:
    """The network's integer label of discrete level i (ascending noise)."""
    return i

  def discretize(self, x: Array, t: Array) -> Tuple[Array, Array]:
    """Euler-Maruyama discretization with step T / N: x_{i+1} = x_i + f + G z."""
    dt = self.T / self.N
    drift, diffusion = self.sde(x, t)
    return drift * dt, diffusion * np.sqrt(dt)

  def ancestral_coeffs(self, t: Array) -> Tuple[Array, Array, Array]:
    """Coefficients (m, c, s) of one ancestral step x_mean = m (x + c score), x = x_mean + s z.

    Default: the exact Gaussian posterior of the linear SDE between t and s = t - T/N with the
    Tweedie estimate of x_0: alpha_ts = alpha_t / alpha_s, v_ts = sigma_t^2 - alpha_ts^2 sigma_s^2,
    m = 1 / alpha_ts, c = v_ts, s^2 = v_ts sigma_s^2 / sigma_t^2 (Ho et al. 2020, eq. 7, in the
    continuous-time coefficients; the original had no ancestral step for sub-VP)."""
    s = jnp.maximum(t - self.T / self.N, 0.)
    a_t, std_t = self.marginal_coeffs(t)
    a_s, std_s = self.marginal_coeffs(s)
    a_ts = a_t / a_s
    v_ts = std_t ** 2 - a_ts ** 2 * std_s ** 2
    return 1. / a_ts, v_ts, jnp.sqrt(v_ts) * std_s / std_t

  def langevin_alpha(self, t: Array) -> Array:
    """alpha_i scaling the Langevin step size (Song et al. 2021, Alg. 4-5): 1 by default."""
    return jnp.ones_like(t)

  # -- Likelihood weighting (Song et al. 2021b, "Maximum likelihood training") -------------------

  def likelihood_weight_primitive(self, t: Array, xp=jnp) -> Array:
    """R(t), a primitive of g(t)^2 / sigma_t^2, for importance sampling of t (closed form)."""
    raise NotImplementedError(f'Importance sampling needs a closed-form primitive of '
                              f'g^2 / sigma^2, which {type(self).__name__} does not define.')

  def likelihood_weight_primitive_inverse(self, r: Array) -> Array:
    """t with R(t) = r, the inverse of `likelihood_weight_primitive`."""
    raise NotImplementedError(f'Importance sampling needs the inverse of the primitive of '
                              f'g^2 / sigma^2, which {type(self).__name__} does not define.')

  # -- Reverse time ------------------------------------------------------------------------------

  def reverse(self, score_fn: ScoreFn, probability_flow: bool = False) -> 'ReverseSDE':
    """The reverse-time SDE (or the probability-flow ODE) driven by `score_fn`."""
    return ReverseSDE(self, score_fn, probability_flow)

  @classmethod
  def from_config(cls, model_config) -> 'SDE':
    """The SDE of a config's `model` section (num_scales and the SDE's own coefficients)."""
    raise NotImplementedError(f'{cls.__name__} cannot be built from a config.')


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
  """Shared beta schedule of VP and sub-VP: f(x, t) = -beta(t) x / 2, beta linear in t.

  With B(t) = int_0^t beta = beta_min t + (beta_max - beta_min) t^2 / 2, alpha_t = exp(-B / 2)."""

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

  @classmethod
  def from_config(cls, model_config) -> 'SDE':
    m = model_config
    return cls(beta_min=m.beta_min, beta_max=m.beta_max, N=m.num_scales)

  def beta(self, t: Array) -> Array:
    """beta(t) = beta_min + t (beta_max - beta_min)."""
    return self.beta_0 + t * (self.beta_1 - self.beta_0)

  def integrated_beta(self, t: Array) -> Array:
    """B(t) = int_0^t beta(s) ds = beta_min t + (beta_max - beta_min) t^2 / 2."""
    return self.beta_0 * t + 0.5 * (self.beta_1 - self.beta_0) * t ** 2

  def t_from_integrated_beta(self, big_b: Array) -> Array:
    """t >= 0 with B(t) = big_b: 2B / (b0 + sqrt(b0^2 + 2 (b1 - b0) B)), without cancellation."""
    return 2. * big_b / (self.beta_0 + jnp.sqrt(self.beta_0 ** 2 + 2. * (self.beta_1 - self.beta_0) * big_b))

  def log_mean_coeff(self, t: Array) -> Array:
    """log alpha_t = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2."""
    return -0.25 * t ** 2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

  def prior_sampling(self, rng: Array, shape) -> Array:
    return jax.random.normal(rng, shape)

  def prior_logp(self, z: Array) -> Array:
    return _gaussian_logp(z, 1.0)

  def langevin_alpha(self, t: Array) -> Array:
    """alpha_i = 1 - beta_i of the DDPM chain at t's index (the original lacked it for sub-VP)."""
    return jnp.asarray(self.alphas, t.dtype)[self.timestep_index(t)]


class VPSDE(_LinearDriftSDE):
  """Variance-preserving SDE (continuous DDPM): dx = -beta x / 2 dt + sqrt(beta) dw.

  alpha_t = exp(-B/2), sigma_t = sqrt(1 - alpha_t^2); the network predicts noise; the discrete
  chain is DDPM's (Ho et al. 2020) with labels i = 0..N-1."""
  has_discrete_chain = True

  def sde(self, x, t):
    beta_t = self.beta(t)
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t)

  def marginal_coeffs(self, t):
    lmc = self.log_mean_coeff(t)
    # sigma = sqrt(1 - alpha^2), written with expm1 to keep precision near t = 0.
    return jnp.exp(lmc), jnp.sqrt(-jnp.expm1(2. * lmc))

  def log_snr(self, t):
    lmc = self.log_mean_coeff(t)
    return lmc - 0.5 * jnp.log(-jnp.expm1(2. * lmc))

  def t_from_log_snr(self, lam):
    # lambda = -log(e^B - 1) / 2, so B = log(1 + e^{-2 lambda}) = softplus(-2 lambda).
    return self.t_from_integrated_beta(jax.nn.softplus(-2. * lam))

  def discrete_coeffs(self, i):
    return (jnp.asarray(self.sqrt_alphas_cumprod, jnp.float32)[i],
            jnp.asarray(self.sqrt_1m_alphas_cumprod, jnp.float32)[i])

  def discretize(self, x, t):
    """DDPM chain: x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z."""
    i = self.timestep_index(t)
    beta = jnp.asarray(self.discrete_betas, x.dtype)[i]
    alpha = jnp.asarray(self.alphas, x.dtype)[i]
    f = batch_mul(jnp.sqrt(alpha), x) - x
    return f, jnp.sqrt(beta)

  def ancestral_coeffs(self, t):
    """DDPM ancestral step with posterior variance beta_i: m = 1/sqrt(1 - beta_i), c = beta_i,
    s = sqrt(beta_i) (Ho et al. 2020, Alg. 2, as the original)."""
    beta = jnp.asarray(self.discrete_betas, t.dtype)[self.timestep_index(t)]
    return 1. / jnp.sqrt(1. - beta), beta, jnp.sqrt(beta)

  def likelihood_weight_primitive(self, t, xp=jnp):
    # beta / (1 - e^{-B}) = d/dt log(e^B - 1).
    return xp.log(xp.expm1(self.integrated_beta(t)))

  def likelihood_weight_primitive_inverse(self, r):
    return self.t_from_integrated_beta(jnp.logaddexp(r, 0.))  # e^B - 1 = e^r


class subVPSDE(_LinearDriftSDE):
  """Sub-VP SDE: VP drift, diffusion^2 = beta(t) (1 - exp(-2 B(t))); alpha_t = exp(-B/2),
  sigma_t = 1 - alpha_t^2 (no square root). No discrete chain: networks always see t * 999."""

  def sde(self, x, t):
    beta_t = self.beta(t)
    # 1 - exp(-2 beta_min t - (beta_max - beta_min) t^2) = 1 - alpha^4, via expm1.
    discount = -jnp.expm1(4. * self.log_mean_coeff(t))
    return batch_mul(-0.5 * beta_t, x), jnp.sqrt(beta_t * discount)

  def marginal_coeffs(self, t):
    lmc = self.log_mean_coeff(t)
    return jnp.exp(lmc), -jnp.expm1(2. * lmc)  # sigma = 1 - alpha^2, no square root

  def log_snr(self, t):
    lmc = self.log_mean_coeff(t)
    return lmc - jnp.log(-jnp.expm1(2. * lmc))

  def t_from_log_snr(self, lam):
    # e^lambda = alpha / (1 - alpha^2); with u = 1 - alpha^2 = sigma: e^{2 lambda} u^2 + u - 1 = 0,
    # u = 2 / (1 + s), s = sqrt(1 + 4 e^{2 lambda}); B = -log(1 - u). Near u = 1 (lambda << 0),
    # 1 - u = 4 e^{2 lambda} / (1 + s)^2 avoids the cancellation.
    s = jnp.exp(0.5 * jax.nn.softplus(2. * lam + np.log(4.)))
    u = 2. / (1. + s)
    big_b = jnp.where(u < 0.5, -jnp.log1p(-u), 2. * jnp.log1p(s) - np.log(4.) - 2. * lam)
    return self.t_from_integrated_beta(big_b)

  def likelihood_weight_primitive(self, t, xp=jnp):
    # beta (1 - e^{-2B}) / (1 - e^{-B})^2 = B' (1 + 2 / (e^B - 1)).
    big_b = self.integrated_beta(t)
    return big_b + 2. * xp.log(-xp.expm1(-big_b))

  def likelihood_weight_primitive_inverse(self, r):
    # With x = e^{-B}, c = e^r: (1 - x)^2 / x = c; the root in (0, 1) gives
    # B = log1p((c + sqrt(c (c + 4))) / 2).
    c = jnp.exp(r)
    return self.t_from_integrated_beta(jnp.log1p(0.5 * (c + jnp.sqrt(c * (c + 4.)))))


class VESDE(SDE):
  """Variance-exploding SDE (continuous SMLD): dx = sigma(t) sqrt(2 log(smax/smin)) dw.

  alpha_t = 1, sigma_t = sigma_min (sigma_max / sigma_min)^t; the network outputs the score and
  sees sigma_t (continuous) or the index of the DESCENDING SMLD levels (discrete, as NCSN)."""
  prediction = 'score'
  default_eps = 1e-5
  has_discrete_chain = True

  def __init__(self, sigma_min: float = 0.01, sigma_max: float = 50., N: int = 1000):
    super().__init__(N)
    self.sigma_min = _check_positive('sigma_min', sigma_min)
    self.sigma_max = _check_positive('sigma_max', sigma_max)
    if self.sigma_max <= self.sigma_min:
      raise ValueError(f'sigma_max ({sigma_max}) must be > sigma_min ({sigma_min}).')
    # SMLD noise levels, ascending: geometric(sigma_min, sigma_max, N).
    self.discrete_sigmas = np.exp(np.linspace(np.log(self.sigma_min), np.log(self.sigma_max), self.N))
    self._log_ratio = float(np.log(self.sigma_max) - np.log(self.sigma_min))

  @classmethod
  def from_config(cls, model_config) -> 'SDE':
    m = model_config
    return cls(sigma_min=m.sigma_min, sigma_max=m.sigma_max, N=m.num_scales)

  def sigma(self, t: Array) -> Array:
    """sigma(t) = sigma_min (sigma_max / sigma_min)^t."""
    return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

  def sde(self, x, t):
    diffusion = self.sigma(t) * np.sqrt(2 * self._log_ratio)
    return jnp.zeros_like(x), diffusion

  def marginal_coeffs(self, t):
    return jnp.ones_like(t), self.sigma(t)

  def log_snr(self, t):
    return -(np.log(self.sigma_min) + t * self._log_ratio)

  def t_from_log_snr(self, lam):
    return (-lam - np.log(self.sigma_min)) / self._log_ratio

  def prior_sampling(self, rng, shape):
    return jax.random.normal(rng, shape) * self.sigma_max

  def prior_logp(self, z):
    return _gaussian_logp(z, self.sigma_max ** 2)

  def network_labels(self, t, continuous):
    return self.sigma(t) if continuous else self.discrete_labels(self.timestep_index(t))

  def discrete_coeffs(self, i):
    sigma = jnp.asarray(self.discrete_sigmas, jnp.float32)[i]
    return jnp.ones_like(sigma), sigma

  def discrete_labels(self, i):
    """NCSN networks index the DESCENDING levels: level N - 1 - i is sigma_max at label 0."""
    return self.N - 1 - i

  def _adjacent_sigmas(self, t, dtype):
    """(sigma_i, sigma_{i-1}) of t's level, sigma_{-1} = 0."""
    i = self.timestep_index(t)
    sigmas = jnp.asarray(self.discrete_sigmas, dtype)
    return sigmas[i], jnp.where(i == 0, 0., sigmas[jnp.maximum(i - 1, 0)])

  def discretize(self, x, t):
    """SMLD chain: x_{i+1} = x_i + sqrt(sigma_{i+1}^2 - sigma_i^2) z (sigma_{-1} = 0)."""
    sigma, adjacent = self._adjacent_sigmas(t, x.dtype)
    return jnp.zeros_like(x), jnp.sqrt(sigma ** 2 - adjacent ** 2)

  def ancestral_coeffs(self, t):
    """SMLD ancestral step: the exact posterior between adjacent levels, m = 1,
    c = sigma_i^2 - sigma_{i-1}^2, s^2 = sigma_{i-1}^2 c / sigma_i^2 (Song et al. 2021, eq. 47)."""
    sigma, adjacent = self._adjacent_sigmas(t, t.dtype)
    c = sigma ** 2 - adjacent ** 2
    return jnp.ones_like(sigma), c, jnp.sqrt(adjacent ** 2 * c / sigma ** 2)

  def likelihood_weight_primitive(self, t, xp=jnp):
    return 2. * self._log_ratio * t  # g^2 / sigma^2 = 2 log(sigma_max / sigma_min), a constant

  def likelihood_weight_primitive_inverse(self, r):
    return r / (2. * self._log_ratio)


SDES: Registry[type] = Registry('SDE')
SDES.register(VESDE, name='vesde')
SDES.register(VPSDE, name='vpsde')
SDES.register(subVPSDE, name='subvpsde')


def get_sde(config) -> Tuple[SDE, float]:
  """Builds the SDE named by `config.training.sde` from `config.model`; returns it with its
  sampling eps (`default_eps`). An unknown name raises a ValueError listing the valid ones."""
  sde_cls = SDES.get(str(config.training.sde).lower())
  sde = sde_cls.from_config(config.model)
  return sde, sde.default_eps
