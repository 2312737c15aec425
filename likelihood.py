"""Log-likelihoods by the probability-flow ODE, and bits/dim.

log p_0(x) = log p_T(x(T)) + int_0^T div f~(x(t), t) dt, with f~ = f - g^2 s / 2 the ODE drift
(d log p(x(t)) / dt = -div f~ along the flow). The state (x, int div) is integrated from eps to T in
ONE diffrax solve inside jit. The drift and its divergence estimate come from ONE network evaluation
per function evaluation: `jax.linearize` evaluates the drift once and returns its Jacobian-vector
product, which is then applied to each probe (Hutchinson: div f = E[v^T J v] for Rademacher or
Gaussian v) or to every basis vector (`trace='exact'`, for small dimensions). The original evaluated
the network twice per evaluation (drift, then divergence) on the host with scipy.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from sampling import _check_eps, _check_tol, solve_ode, ODE_SOLVERS

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

TRACE_ESTIMATORS = ('rademacher', 'gaussian', 'exact')


def _probes(rng: Array, trace: str, n_probes: int, x: Array) -> Array:
  """Probe vectors [P, *x.shape]: Hutchinson noise, or the D basis vectors (same for each example)."""
  if trace == 'exact':
    d = int(np.prod(x.shape[1:]))
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    return jnp.broadcast_to(basis, (d,) + x.shape)
  shape = (n_probes,) + x.shape
  if trace == 'gaussian':
    return jax.random.normal(rng, shape, x.dtype)
  return jax.random.rademacher(rng, shape, x.dtype)


def drift_and_divergence(drift_fn: Callable[[Array], Array], x: Array, probes: Array,
                         exact: bool = False) -> Tuple[Array, Array]:
  """drift_fn(x) and its divergence per example [B] from one evaluation of drift_fn.

  Hutchinson: the mean over probes of v^T J v. Exact: the sum over the basis of e_j^T J e_j (each
  example's Jacobian block is its own: networks do not mix examples at evaluation)."""
  drift, jvp_fn = jax.linearize(drift_fn, x)
  vjv = jax.vmap(lambda v: sde_lib._flat_sum(v * jvp_fn(v)))(probes)  # [P, B]
  return drift, (jnp.sum(vjv, 0) if exact else jnp.mean(vjv, 0))


def log_likelihood(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, x: Array, *,
                   rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                   trace: str = 'rademacher', n_probes: int = 1, solver: str = 'tsit5',
                   max_steps: int = 4096) -> Tuple[Array, Array, Array]:
  """Per-example log-density (nats) of x under the probability-flow ODE model.

  Integrates from eps to T; returns (logp [B], z = x(T), nfe). The probes are drawn once and held
  fixed over the solve (the integrand must be smooth in t for the adaptive solver)."""
  if trace not in TRACE_ESTIMATORS:
    raise ValueError(f'Unknown trace estimator {trace!r}; valid choices: {list(TRACE_ESTIMATORS)}.')
  if int(n_probes) != n_probes or n_probes < 1:
    raise ValueError(f'n_probes must be a positive integer, got {n_probes!r}.')
  if x.ndim < 2:
    raise ValueError(f'x must be a batch [B, ...] with at least 2 axes, got shape {tuple(x.shape)}.')
  eps, rtol, atol = _check_eps(eps, sde), _check_tol('rtol', rtol), _check_tol('atol', atol)
  ODE_SOLVERS.get(solver)
  return _log_likelihood_jit(rng, x, sde=sde, score_fn=score_fn, rtol=rtol, atol=atol, eps=eps,
                             trace=trace, n_probes=int(n_probes), solver=solver,
                             max_steps=int(max_steps))


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'rtol', 'atol', 'eps', 'trace',
                                             'n_probes', 'solver', 'max_steps'))
def _log_likelihood_jit(rng, x, *, sde, score_fn, rtol, atol, eps, trace, n_probes, solver, max_steps):
  flow = sde.reverse(score_fn, probability_flow=True)
  probes = _probes(rng, trace, n_probes, x)
  batch = x.shape[0]

  def vector_field(t, state):
    y, _ = state
    vec_t = jnp.full((batch,), t, y.dtype)
    drift, div = drift_and_divergence(lambda v: flow.sde(v, vec_t)[0], y, probes, trace == 'exact')
    return drift, div

  init = (x, jnp.zeros((batch,), x.dtype))
  (z, delta_logp), nfe = solve_ode(vector_field, init, eps, sde.T, rtol=rtol, atol=atol,
                                   solver=solver, max_steps=max_steps)
  return sde.prior_logp(z) + delta_logp, z, nfe


def bpd_offset(n_bits: int = 8, data_scaler: Optional[Callable[[Array], Array]] = None) -> float:
  """Bits/dim offset of a density on scaled, dequantized n-bit data: n_bits - log2|d scaler/dx|.

  Pixels k in {0..2^n - 1} are dequantized to x = (k + u) / 2^n in [0, 1), so the probability of k
  is p_x(x) / 2^(n D) and -log2 P / D = -log p_x(x) / (D ln 2) + n. The data scaler maps x to the
  model's space y = c x + b (c = 2 for data centred to [-1, 1]); p_x = p_y |c|^D subtracts log2|c|:
  +8 bits for [0, 1] data, +7 for [-1, 1] data (8-bit)."""
  if int(n_bits) != n_bits or n_bits < 1:
    raise ValueError(f'n_bits must be a positive integer, got {n_bits!r}.')
  slope = 1.0
  if data_scaler is not None:  # scalers are affine: the slope is scaler(1) - scaler(0)
    slope = float(np.asarray(data_scaler(jnp.ones(())) - data_scaler(jnp.zeros(()))))
  if slope == 0:
    raise ValueError('The data scaler must not be constant.')
  return float(n_bits) - float(np.log2(abs(slope)))


def bits_per_dim(logp: Array, x_shape: Sequence[int], offset: Optional[float] = None, *,
                 n_bits: int = 8, data_scaler: Optional[Callable[[Array], Array]] = None,
                 dequantized: bool = True) -> Array:
  """Bits/dim -logp / (D ln 2) + offset per example, D = prod(x_shape[1:]).

  `offset` defaults to `bpd_offset(n_bits, data_scaler)`. Without uniform dequantization the
  density of discrete data is unbounded and bits/dim can go negative: a warning says so."""
  if not dequantized:
    warnings.warn('bits/dim of data that were not uniformly dequantized is not a valid code length '
                  'and can be negative; enable data.uniform_dequantization.', stacklevel=2)
  d = int(np.prod(tuple(x_shape)[1:]))
  if offset is None:
    offset = bpd_offset(n_bits, data_scaler)
  return -logp / (d * np.log(2.)) + offset


def get_likelihood_fn(config, sde: sde_lib.SDE, model, inverse_scaler=None, *,
                      trace: str = 'rademacher', n_probes: int = 1, eps: float = 1e-5,
                      data_scaler: Optional[Callable[[Array], Array]] = None):
  """likelihood_fn(rng, params, x, model_state=None) -> (bpd [B], z, nfe) for a config's network.

  x is the batch in the model's (scaled) space. The offset follows config.data (8-bit images,
  centering) unless `data_scaler` is given; vector toy data get offset 0 (bpd = nats / ln 2 / D)."""
  del inverse_scaler  # the offset needs the forward scaler's slope only
  from models import utils as mutils
  if trace not in TRACE_ESTIMATORS:
    raise ValueError(f'Unknown trace estimator {trace!r}; valid choices: {list(TRACE_ESTIMATORS)}.')
  rtol, atol = config.eval.get('rtol', 1e-5), config.eval.get('atol', 1e-5)
  is_image = not config.data.get('dim', None)
  if is_image:
    scaler = data_scaler or ((lambda v: 2 * v - 1) if config.data.centered else (lambda v: v))
    offset = bpd_offset(8, scaler)
  else:
    offset = 0.0

  def likelihood_fn(rng, params, x, model_state=None):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False,
                                   continuous=config.training.continuous)
    logp, z, nfe = log_likelihood(rng, sde, score_fn, x, rtol=rtol, atol=atol, eps=eps, trace=trace,
                                  n_probes=n_probes)
    return bits_per_dim(logp, x.shape, offset), z, nfe

  return jax.jit(likelihood_fn)
