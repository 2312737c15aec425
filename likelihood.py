"""Log-likelihoods by the probability-flow ODE, and bits/dim.

log p_0(x) = log p_T(x(T)) + int_0^T div f~(x(t), t) dt, with f~ = f - g^2 s / 2 the ODE drift
(d log p(x(t)) / dt = -div f~ along the flow; Song et al. 2021, eq. 39). The state (x, int div) is
integrated from eps to T in ONE diffrax solve inside jit (`ode.ode_log_likelihood`), with the
drift and its divergence estimate from ONE network evaluation per function evaluation
(Hutchinson's estimator with Rademacher or Gaussian probes, or the exact trace for small
dimensions). The original evaluated the network twice per evaluation on the host with scipy.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import ode
import sde_lib
from ode import TRACE_ESTIMATORS, drift_and_divergence  # noqa: F401  (public here too)

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]


def log_likelihood(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, x: Array, *,
                   rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-5,
                   trace: str = 'rademacher', n_probes: int = 1, solver: str = ode.DEFAULT_SOLVER,
                   max_steps: int = 4096) -> Tuple[Array, Array, Array]:
  """Per-example log-density (nats) of x [B, ...] under the probability-flow ODE model.

  Integrates from eps to T; returns (logp [B], z = x(T), nfe). Raises ValueError for bad
  arguments or non-finite x (before tracing) and ode.ODESolveError when the solve does not
  finish."""
  eps, rtol, atol, max_steps = ode.check_likelihood_args(
      sde, x, rtol=rtol, atol=atol, eps=eps, trace=trace, n_probes=n_probes, solver=solver,
      max_steps=max_steps)
  ode.check_finite(x)
  logp, z, nfe, failed = ode.ode_log_likelihood(
      rng, x, sde=sde, score_fn=score_fn, rtol=rtol, atol=atol, eps=eps, trace=trace,
      n_probes=int(n_probes), solver=solver, max_steps=max_steps)
  ode.raise_if_failed(failed, 'the log-likelihood', solver=solver, rtol=rtol, atol=atol,
                      max_steps=max_steps)
  return logp, z, nfe


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

  x is the batch in the model's (scaled) space. The offset follows the data description
  (`datasets.dataset_info`: n-bit images and their scaler, unless `data_scaler` is given); vector
  data get offset 0 (bpd = nats / ln 2 / D).
  Raises ValueError for non-finite x and ode.ODESolveError when a solve does not finish."""
  del inverse_scaler  # the offset needs the forward scaler's slope only
  from models import utils as mutils
  rtol, atol = config.eval.get('rtol', 1e-5), config.eval.get('atol', 1e-5)
  solver, max_steps = config.eval.get('ode_solver', ode.DEFAULT_SOLVER), 4096
  eps, rtol, atol, max_steps = ode.check_likelihood_args(
      sde, np.zeros((1, 1)), rtol=rtol, atol=atol, eps=eps, trace=trace, n_probes=n_probes,
      solver=solver, max_steps=max_steps)
  import datasets
  data = datasets.dataset_info(config, count=False)
  offset = bpd_offset(data.n_bits, data_scaler or data.scaler) if data.is_image else 0.

  @jax.jit
  def jitted(rng, params, x, model_state):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False,
                                   continuous=config.training.continuous)
    logp, z, nfe, failed = ode.ode_log_likelihood(
        rng, x, sde=sde, score_fn=score_fn, rtol=rtol, atol=atol, eps=eps, trace=trace,
        n_probes=int(n_probes), solver=solver, max_steps=max_steps)
    return bits_per_dim(logp, x.shape, offset), z, nfe, failed

  def likelihood_fn(rng, params, x, model_state=None):
    ode.check_finite(x)
    bpd, z, nfe, failed = jitted(rng, params, x, model_state)
    ode.raise_if_failed(failed, 'the log-likelihood', solver=solver, rtol=rtol, atol=atol,
                        max_steps=max_steps)
    return bpd, z, nfe

  likelihood_fn.jitted = jitted
  return likelihood_fn
