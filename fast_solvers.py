"""Fast samplers: solvers of the diffusion ODE / SDE in 10-30 network evaluations.

Each solver is one short function over a time grid it is given (T = t_0 > t_1 > ... > t_n = eps,
built by `sampling.time_grid`), written in the papers' symbols for x_t = alpha_t x_0 + sigma_t eps
with the half log-SNR lambda_t = log(alpha_t / sigma_t) and step size h = lambda_t - lambda_s > 0
(s the current, noisier time, t the next one). They work for every SDE through its Gaussian view
(`alpha`, `sigma`, `log_snr`, `t_from_log_snr`) and any score function: the data prediction is
Tweedie's x_0(x, t) = (x + sigma_t^2 score) / alpha_t and the noise prediction
eps(x, t) = -sigma_t score.

Solvers (`SOLVERS`, each with its evaluation count for an n_steps budget):
- `ddim`: DDIM (Song, Meng & Ermon 2021, eq. 12) = DPM-Solver-1 = DPM-Solver++(1); `eta` > 0
  adds DDIM's noise, eta = 1 is ancestral (DDPM) sampling. n evaluations.
- `heun`: EDM's 2nd-order Heun method (Karras et al. 2022, Alg. 1) in the coordinates
  x / alpha and sigma / alpha, last step Euler. 2n - 1 evaluations.
- `dpm_solver`: singlestep DPM-Solver-fast (Lu et al. 2022, Sec. 3.4, Alg. 1 with DPM-Solver-1/2/3
  of Alg. 4-5): orders 3 / 2 / 1 mixed so that it spends exactly n evaluations.
- `dpmpp_2m`, `dpmpp_3m`: multistep DPM-Solver++ with data prediction (Lu et al. 2022b, Alg. 2;
  the 3rd-order update of its reference code), lower order at the first steps and, below 10
  steps, at the last ones. n evaluations.
- `dpmpp_2m_sde`: SDE-DPM-Solver++(2M) (Lu et al. 2022b, Appendix; k-diffusion's midpoint form)
  with noise scale `eta` (1: the paper's SDE solver; 0: it is `dpmpp_2m`). n evaluations.
- `unipc`: UniPC multistep order 3 (Zhao et al. 2023, Alg. 2-3, B(h) = e^h - 1), the UniC
  corrector reusing the next step's evaluation (no extra evaluation). n evaluations.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from registry import Registry

Array = jax.Array


class Parametrization:
  """The data and noise predictions of a score function under an SDE's Gaussian view."""

  def __init__(self, sde, score_fn):
    self.sde, self.score_fn = sde, score_fn

  def alpha_sigma(self, t: Array):
    """(alpha_t, sigma_t) at scalar times t."""
    return self.sde.marginal_coeffs(t)

  def log_snr(self, t: Array) -> Array:
    return self.sde.log_snr(t)

  def score(self, x: Array, t: Array) -> Array:
    return self.score_fn(x, jnp.full((x.shape[0],), t, x.dtype))

  def x0(self, x: Array, t: Array) -> Array:
    """Tweedie's data prediction x_0 = (x + sigma_t^2 score) / alpha_t."""
    alpha, sigma = self.alpha_sigma(t)
    return (x + sigma ** 2 * self.score(x, t)) / alpha

  def eps(self, x: Array, t: Array) -> Array:
    """The noise prediction eps = -sigma_t score."""
    return -self.alpha_sigma(t)[1] * self.score(x, t)

  def t_from_log_snr(self, lam: Array) -> Array:
    return self.sde.t_from_log_snr(lam)


@dataclasses.dataclass(frozen=True)
class Solver:
  """A registered fast solver: fn(rng, x, grid, model, *, n_steps, eta) -> x at grid[-1]."""
  fn: Callable
  nfe: Callable[[int], int]  # score evaluations for an n_steps budget
  intervals: Callable[[int], int]  # grid intervals for an n_steps budget
  stochastic: bool = False
  default_eta: float = 0.
  max_eta: float = np.inf


SOLVERS: Registry[Solver] = Registry('fast solver')


def _register(name: str, *, nfe=lambda n: n, intervals=lambda n: n, **kw):
  def decorator(fn):
    SOLVERS.register(Solver(fn, nfe, intervals, **kw), name=name)
    return fn
  return decorator


def stochastic_solvers():
  return [name for name in SOLVERS.names() if SOLVERS.get(name).stochastic]


def multistep_orders(n_steps: int, order: int) -> np.ndarray:
  """Order of each of the n steps: min(order, i) at step i (too little history at the start) and,
  below 10 steps, min(order, n + 1 - i) (DPM-Solver++'s lower_order_final)."""
  i = np.arange(1, n_steps + 1)
  orders = np.minimum(order, i)
  if n_steps < 10:
    orders = np.minimum(orders, n_steps + 1 - i)
  return orders


class Step(NamedTuple):
  """Scalars of one step from s = grid[i-1] to t = grid[i] (lambda_1, lambda_2: older times)."""
  s: Array
  t: Array
  lam_s: Array
  lam_t: Array
  lam_1: Array
  lam_2: Array
  order: Array


def _multistep(rng, x, grid, model, update, orders, *, corrector=None, noise=False):
  """The driver of the multistep solvers: one evaluation per grid time except the last.

  update(model, x, ms, step, z) -> x at step.t from the x_0 predictions ms = (m_0, m_1, m_2) at
  the last three grid times (most recent first); corrector(model, x, ms, step, m_t) -> the
  corrected x at step.t given the new evaluation m_t there (UniPC). One lax.scan."""
  lam = model.log_snr(grid)
  n = grid.shape[0] - 1
  orders = jnp.asarray(orders, jnp.int32)
  m = model.x0(x, grid[0])
  # Placeholder history keeps the unused higher-order coefficients finite at the first steps.
  carry = (x, (m, m, m), (lam[0], lam[0] - 1., lam[0] - 2.))

  def step_at(i, lams):
    return Step(grid[i - 1], grid[i], lams[0], lam[i], lams[1], lams[2], orders[i - 1])

  def body(carry, inputs):
    x, ms, lams = carry
    i, key = inputs
    step = step_at(i, lams)
    z = jax.random.normal(key, x.shape, x.dtype) if noise else None
    x_t = update(model, x, ms, step, z)
    m_t = model.x0(x_t, step.t)
    if corrector is not None:
      x_t = corrector(model, x, ms, step, m_t)
    return (x_t, (m_t,) + ms[:2], (step.lam_t,) + lams[:2]), None

  keys = jax.random.split(rng, n)
  (x, ms, lams), _ = jax.lax.scan(body, carry, (jnp.arange(1, n), keys[:-1]))
  z = jax.random.normal(keys[-1], x.shape, x.dtype) if noise else None
  return update(model, x, ms, step_at(n, lams), z)


# --------------------------------------------------------------------------------------------
# DDIM


def _ddim_update(model, x, ms, step, z, eta):
  """DDIM from s to t (Song et al. 2021, eq. 12): x_t = alpha_t x_0 + sqrt(sigma_t^2 - c^2) eps
  + c z, eps = (x - alpha_s x_0) / sigma_s, c = eta sigma_t sqrt(1 - e^{-2h}) (the DDPM
  posterior's std when eta = 1)."""
  (alpha_s, sigma_s), (alpha_t, sigma_t) = model.alpha_sigma(step.s), model.alpha_sigma(step.t)
  h = step.lam_t - step.lam_s
  x0 = ms[0]
  eps = (x - alpha_s * x0) / sigma_s
  c = eta * sigma_t * jnp.sqrt(-jnp.expm1(-2. * h))
  x_t = alpha_t * x0 + jnp.sqrt(sigma_t ** 2 - c ** 2) * eps
  return x_t if z is None else x_t + c * z


@_register('ddim', stochastic=True, max_eta=1.)
def ddim(rng, x, grid, model, *, n_steps, eta=0.):
  """DDIM / DPM-Solver-1: n evaluations; eta in [0, 1] (1: ancestral sampling)."""
  update = lambda model, x, ms, step, z: _ddim_update(model, x, ms, step, z, eta)
  return _multistep(rng, x, grid, model, update, np.ones(n_steps), noise=eta > 0)


# --------------------------------------------------------------------------------------------
# EDM Heun


@_register('heun', nfe=lambda n: 2 * n - 1)
def heun(rng, x, grid, model, *, n_steps, eta=0.):
  """EDM's Heun sampler (Karras et al. 2022, Alg. 1, deterministic) on dx~/dsigma~ =
  (x~ - x_0) / sigma~ with x~ = x / alpha, sigma~ = sigma / alpha = e^{-lambda}; the last step
  is Euler. 2n - 1 evaluations."""
  del rng, n_steps, eta

  def tilde(t):
    alpha, sigma = model.alpha_sigma(t)
    return alpha, sigma / alpha

  def slope(x_tilde, t):  # d = (x~ - D(x~; sigma~)) / sigma~   (Alg. 1, line 4)
    alpha, sigma_tilde = tilde(t)
    return (x_tilde - model.x0(alpha * x_tilde, t)) / sigma_tilde

  def euler(x_tilde, s, t):
    d = slope(x_tilde, s)
    return x_tilde + (tilde(t)[1] - tilde(s)[1]) * d, d

  def body(x_tilde, i):
    s, t = grid[i - 1], grid[i]
    x_euler, d = euler(x_tilde, s, t)  # Alg. 1, line 5
    d_prime = slope(x_euler, t)  # line 7
    return x_tilde + (tilde(t)[1] - tilde(s)[1]) * 0.5 * (d + d_prime), None  # line 8

  n = grid.shape[0] - 1
  x_tilde, _ = jax.lax.scan(body, x / tilde(grid[0])[0], jnp.arange(1, n))
  x_tilde, _ = euler(x_tilde, grid[n - 1], grid[n])
  return tilde(grid[n])[0] * x_tilde


# --------------------------------------------------------------------------------------------
# Singlestep DPM-Solver-fast


def dpm_solver_fast_orders(n_steps: int) -> np.ndarray:
  """Orders of DPM-Solver-fast's K = n // 3 + 1 steps spending exactly n evaluations (Sec. 3.4)."""
  k = n_steps // 3 + 1
  tail = {0: [2, 1], 1: [1], 2: [2]}[n_steps % 3]
  return np.array([3] * (k - len(tail)) + tail)


def _dpm_solver_step(model, x, s, t, order):
  """One singlestep DPM-Solver-`order` step from s to t with noise prediction (Lu et al. 2022,
  Alg. 4 (order 2, r1 = 1/2) and Alg. 5 (order 3, r1 = 1/3, r2 = 2/3); order 1 is DDIM)."""
  (alpha_s, _), (alpha_t, sigma_t) = model.alpha_sigma(s), model.alpha_sigma(t)
  lam_s, lam_t = model.log_snr(s), model.log_snr(t)
  h = lam_t - lam_s
  eps_s = model.eps(x, s)
  x_t = alpha_t / alpha_s * x - sigma_t * jnp.expm1(h) * eps_s

  def intermediate(r):  # the time s_r with lambda = lambda_s + r h, and its coefficients
    s_r = model.t_from_log_snr(lam_s + r * h)
    alpha_r, sigma_r = model.alpha_sigma(s_r)
    return s_r, alpha_r / alpha_s * x - sigma_r * jnp.expm1(r * h) * eps_s, sigma_r

  if order == 2:
    r1 = 0.5
    s1, u1, _ = intermediate(r1)
    return x_t - sigma_t / (2. * r1) * jnp.expm1(h) * (model.eps(u1, s1) - eps_s)
  if order == 3:
    r1, r2 = 1. / 3., 2. / 3.
    s1, u1, _ = intermediate(r1)
    d1 = model.eps(u1, s1) - eps_s
    s2, u2, sigma_2 = intermediate(r2)
    u2 = u2 - sigma_2 * r2 / r1 * (jnp.expm1(r2 * h) / (r2 * h) - 1.) * d1
    d2 = model.eps(u2, s2) - eps_s
    return x_t - sigma_t / r2 * (jnp.expm1(h) / h - 1.) * d2
  return x_t


@_register('dpm_solver', intervals=lambda n: int(n // 3 + 1))
def dpm_solver(rng, x, grid, model, *, n_steps, eta=0.):
  """Singlestep DPM-Solver-fast: K = n // 3 + 1 outer steps of orders 3 / 2 / 1 (exactly n
  evaluations); one lax.scan with a switch on each step's order."""
  del rng, eta
  orders = jnp.asarray(dpm_solver_fast_orders(n_steps), jnp.int32)
  branches = [lambda x, s, t, o=o: _dpm_solver_step(model, x, s, t, o) for o in (1, 2, 3)]

  def body(x, i):
    return jax.lax.switch(orders[i] - 1, branches, x, grid[i], grid[i + 1]), None

  x, _ = jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))
  return x


# --------------------------------------------------------------------------------------------
# Multistep DPM-Solver++ and SDE-DPM-Solver++(2M)


def _dpmpp_update(model, x, ms, step, z):
  """DPM-Solver++ multistep update of order 1-3 with data prediction (Lu et al. 2022b, Alg. 2 and
  the 3rd-order update of its code): with h = lambda_t - lambda_s, r0 = (lambda_s - lambda_1) / h,
  r1 = (lambda_1 - lambda_2) / h, phi_1 = e^{-h} - 1, phi_2 = phi_1 / h + 1, phi_3 = phi_2 / h - 1/2:
  x_t = sigma_t / sigma_s x - alpha_t phi_1 m_0 [- alpha_t phi_1 D1_0 / 2 (order 2)]
                                             [+ alpha_t phi_2 D1 - alpha_t phi_3 D2 (order 3)]."""
  del z
  (_, sigma_s), (alpha_t, sigma_t) = model.alpha_sigma(step.s), model.alpha_sigma(step.t)
  m0, m1, m2 = ms
  h = step.lam_t - step.lam_s
  r0, r1 = (step.lam_s - step.lam_1) / h, (step.lam_1 - step.lam_2) / h
  phi_1 = jnp.expm1(-h)
  phi_2 = phi_1 / h + 1.
  phi_3 = phi_2 / h - 0.5
  d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
  d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
  d2 = (d1_0 - d1_1) / (r0 + r1)
  x_1 = sigma_t / sigma_s * x - alpha_t * phi_1 * m0
  x_2 = x_1 - 0.5 * alpha_t * phi_1 * d1_0
  x_3 = x_1 + alpha_t * phi_2 * d1 - alpha_t * phi_3 * d2
  return jnp.where(step.order == 1, x_1, jnp.where(step.order == 2, x_2, x_3))


@_register('dpmpp_2m')
def dpmpp_2m(rng, x, grid, model, *, n_steps, eta=0.):
  """DPM-Solver++(2M): n evaluations."""
  del eta
  return _multistep(rng, x, grid, model, _dpmpp_update, multistep_orders(n_steps, 2))


@_register('dpmpp_3m')
def dpmpp_3m(rng, x, grid, model, *, n_steps, eta=0.):
  """DPM-Solver++(3M): n evaluations."""
  del eta
  return _multistep(rng, x, grid, model, _dpmpp_update, multistep_orders(n_steps, 3))


def _dpmpp_sde_update(model, x, ms, step, z, eta):
  """SDE-DPM-Solver++(2M) (Lu et al. 2022b, Appendix; k-diffusion's midpoint form) with noise
  scale eta: x_t = sigma_t / sigma_s e^{-eta h} x + alpha_t (1 - e^{-(1 + eta) h}) m_0
  [+ alpha_t (1 - e^{-(1 + eta) h}) (m_0 - m_1) / (2 r0) (order 2)] + sigma_t sqrt(1 - e^{-2 eta h}) z."""
  (_, sigma_s), (alpha_t, sigma_t) = model.alpha_sigma(step.s), model.alpha_sigma(step.t)
  m0, m1, _ = ms
  h = step.lam_t - step.lam_s
  r0 = (step.lam_s - step.lam_1) / h
  c = -jnp.expm1(-(1. + eta) * h)
  x_t = sigma_t / sigma_s * jnp.exp(-eta * h) * x + alpha_t * c * m0
  x_t = jnp.where(step.order >= 2, x_t + 0.5 * alpha_t * c * (m0 - m1) / r0, x_t)
  return x_t if z is None else x_t + sigma_t * jnp.sqrt(-jnp.expm1(-2. * eta * h)) * z


@_register('dpmpp_2m_sde', stochastic=True, default_eta=1.)
def dpmpp_2m_sde(rng, x, grid, model, *, n_steps, eta=1.):
  """SDE-DPM-Solver++(2M): n evaluations."""
  update = lambda model, x, ms, step, z: _dpmpp_sde_update(model, x, ms, step, z, eta)
  return _multistep(rng, x, grid, model, update, multistep_orders(n_steps, 2), noise=eta > 0)


# --------------------------------------------------------------------------------------------
# UniPC


def _unipc_coeffs(step):
  """UniPC's (Zhao et al. 2023, Alg. 2-3; B(h) = e^h - 1 with h -> -h for data prediction)
  predictor weights rho_p [2] and corrector weights rho_c [3] for the step's order, with
  r_k = (lambda_k - lambda_s) / h and the D_k = (m_k - m_0) / r_k of the two older times."""
  h = step.lam_t - step.lam_s
  hh = -h
  r = jnp.stack([(step.lam_1 - step.lam_s) / h, (step.lam_2 - step.lam_s) / h, jnp.ones_like(h)])
  b_h = jnp.expm1(hh)
  # b_k = k! phi_{k+1}(hh) / B(h) with h phi_1 = e^hh - 1 and phi_{k+1} = phi_k / hh - 1 / k!.
  b, h_phi_k, factorial = [], jnp.expm1(hh) / hh - 1., 1.
  for k in range(1, 4):
    b.append(h_phi_k * factorial / b_h)
    factorial *= k + 1
    h_phi_k = h_phi_k / hh - 1. / factorial
  b = jnp.stack(b)

  def solve(rks):  # R rho = b with R_jk = rks_k^j, j = 0..len-1
    m = len(rks)
    return jnp.linalg.solve(jnp.stack([rks ** j for j in range(m)]), b[:m])

  zero = jnp.zeros(())
  # Order k uses k - 1 older points in the predictor and those plus the new one in the corrector.
  rho_p = {1: jnp.stack([zero, zero]), 2: jnp.stack([0.5 + zero, zero]),
           3: solve(r[:2])}
  rho_c = {1: jnp.stack([zero, zero, 0.5 + zero]),
           2: (lambda c: jnp.stack([c[0], zero, c[1]]))(solve(jnp.stack([r[0], r[2]]))),
           3: solve(r)}
  pick = lambda d: jnp.where(step.order == 1, d[1], jnp.where(step.order == 2, d[2], d[3]))
  return pick(rho_p), pick(rho_c), r, b_h


def _unipc_base(model, x, ms, step):
  (_, sigma_s), (alpha_t, sigma_t) = model.alpha_sigma(step.s), model.alpha_sigma(step.t)
  rho_p, rho_c, r, b_h = _unipc_coeffs(step)
  m0, m1, m2 = ms
  d = ((m1 - m0) / r[0], (m2 - m0) / r[1])
  x_base = sigma_t / sigma_s * x - alpha_t * jnp.expm1(-(step.lam_t - step.lam_s)) * m0
  return x_base, alpha_t * b_h, rho_p, rho_c, d


def _unipc_update(model, x, ms, step, z):
  """UniP (predictor): x_t = x_base - alpha_t B(h) sum_k rho_p_k D_k."""
  del z
  x_base, scale, rho_p, _, d = _unipc_base(model, x, ms, step)
  return x_base - scale * (rho_p[0] * d[0] + rho_p[1] * d[1])


def _unipc_correct(model, x, ms, step, m_t):
  """UniC (corrector), with the evaluation m_t at the predicted x_t that the next step reuses:
  x_t = x_base - alpha_t B(h) (sum_k rho_c_k D_k + rho_c_last (m_t - m_0))."""
  x_base, scale, _, rho_c, d = _unipc_base(model, x, ms, step)
  return x_base - scale * (rho_c[0] * d[0] + rho_c[1] * d[1] + rho_c[2] * (m_t - ms[0]))


@_register('unipc')
def unipc(rng, x, grid, model, *, n_steps, eta=0.):
  """UniPC-3 with the UniC corrector after every step but the last: n evaluations."""
  del eta
  i = np.arange(1, n_steps + 1)
  orders = np.minimum(np.minimum(3, i), n_steps + 1 - i)  # UniPC's lower_order_final
  return _multistep(rng, x, grid, model, _unipc_update, orders, corrector=_unipc_correct)
