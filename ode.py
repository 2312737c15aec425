"""The probability-flow ODE, solved adaptively: sampling, encoding and the likelihood solve.

dx/dt = f(x, t) - g(t)^2 score(x, t) / 2 (Song et al. 2021, eq. 13) shares its marginals with the
forward SDE. Every solve here is one diffrax `diffeqsolve` (adaptive Runge-Kutta with a PID step
size controller) inside `jax.jit`. Over a batch sharded across devices the solve is one program,
so the error norm and the step count are global: devices never take different numbers of steps.

- `ode_sample`: T -> eps from the prior (or from a given latent z): samples;
- `ode_encode`: eps -> T: the latent of data;
- `ode_log_likelihood`: eps -> T of (x, int div f~): log p_0(x) = log p_T(x(T)) + int_eps^T div f~
  dt (Song et al. 2021, eq. 39; Chen et al. 2018), with the divergence from ONE network evaluation
  per function evaluation (`drift_and_divergence`).

A solve that does not finish (max_steps reached, e.g. a non-finite input or score) never passes
silently: eager calls raise `ODESolveError` naming the solve, its tolerances and what to change;
inside an outer jit its outputs are NaN and the config paths raise after the call.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from registry import Registry

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

# diffrax solver and its score evaluations per step (FSAL methods reuse their last stage); every
# solve adds one evaluation at the start. tests/test_sampling.py counts them with a host callback.
ODE_SOLVERS: Registry[Tuple[type, int]] = Registry('ODE solver')
ODE_SOLVERS.register((diffrax.Tsit5, 6), name='tsit5')
ODE_SOLVERS.register((diffrax.Dopri5, 6), name='dopri5')
ODE_SOLVERS.register((diffrax.Dopri8, 13), name='dopri8')
ODE_SOLVERS.register((diffrax.Bosh3, 3), name='bosh3')
# The default (the original's RK45 is also Dormand-Prince 5(4)): on the main job's trained digits
# DDPM++ it took fewer evaluations than tsit5 for a smaller error at every tolerance, for sampling
# (rtol = atol = 1e-3: 67 NFE, RMS error 5.0e-3 against tsit5's 103 NFE, 1.1e-2) and for bits/dim
# (1e-4: 217 NFE, mean error 2.9e-3 bits/dim against 397 NFE, 7.1e-3); benchmarks/ode_solvers.py.
DEFAULT_SOLVER = 'dopri5'

TRACE_ESTIMATORS = ('rademacher', 'gaussian', 'exact')


class ODESolveError(RuntimeError):
  """An adaptive probability-flow ODE solve did not reach its end time."""


# --------------------------------------------------------------------------------------------
# Argument checks, raised before any tracing.


def check_shape(shape) -> Tuple[int, ...]:
  """`shape` as a tuple if it is (batch, ...) of positive integers with at least 2 axes."""
  shape = tuple(shape)
  if len(shape) < 2 or any(int(s) != s or s < 1 for s in shape):
    raise ValueError(f'shape must be (batch, ...) of positive integers with at least 2 axes, got {shape}.')
  return tuple(int(s) for s in shape)


def check_tol(name: str, value: float) -> float:
  """`value` as a float if it is a positive finite tolerance."""
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a positive finite tolerance, got {value!r}.')
  return float(value)


def _check_solve_args(sde, eps, rtol, atol, solver, max_steps):
  ODE_SOLVERS.get(solver)
  if int(max_steps) != max_steps or max_steps < 1:
    raise ValueError(f'max_steps must be a positive integer, got {max_steps!r}.')
  return sde.check_time(eps), check_tol('rtol', rtol), check_tol('atol', atol), int(max_steps)


def raise_if_failed(failed, what: str, *, solver: str, rtol: float, atol: float,
                    max_steps: int) -> None:
  """Raises ODESolveError when a (concrete) solve failed; does nothing under tracing."""
  if isinstance(failed, jax.core.Tracer) or not bool(np.any(np.asarray(failed))):
    return
  raise ODESolveError(
      f'The adaptive probability-flow ODE solve of {what} ({solver}, rtol={rtol}, atol={atol}) did '
      f'not finish: it took all max_steps={max_steps} steps. Check that the input and the score '
      f'are finite; otherwise raise max_steps or loosen rtol / atol.')


# --------------------------------------------------------------------------------------------
# The solve.


def solve(vector_field: Callable, y0, t0: float, t1: float, *, rtol: float, atol: float,
          solver: str = DEFAULT_SOLVER, max_steps: int = 4096):
  """Solves dy/dt = vector_field(t, y) from t0 to t1 adaptively (PID): (y1, nfe, failed).

  The state may be any pytree; the error norm is the RMS over all of it (global over devices).
  nfe (traced int) counts vector-field evaluations; failed (traced bool) is True when the solve
  stopped early (max_steps); y1 is then NaN."""
  solver_cls, evals_per_step = ODE_SOLVERS.get(solver)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), solver_cls(), t0=t0, t1=t1, dt0=None,
      y0=y0, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, throw=False)
  # One evaluation at t0 (shared by the initial step-size choice and the first stage), then
  # evals_per_step on each accepted or rejected step.
  nfe = 1 + evals_per_step * sol.stats['num_steps']
  failed = sol.result != diffrax.RESULTS.successful
  y1 = jax.tree_util.tree_map(lambda y: jnp.where(failed, jnp.nan, y[-1]), sol.ys)
  return y1, nfe, failed


def flow_drift(sde: sde_lib.SDE, score_fn: ScoreFn) -> Callable[[Array, Array], Array]:
  """drift(t, x) of the probability-flow ODE at a scalar time t, for a batch x."""
  flow = sde.reverse(score_fn, probability_flow=True)
  return lambda t, x: flow.sde(x, jnp.full((x.shape[0],), t, x.dtype))[0]


# --------------------------------------------------------------------------------------------
# Sampling and encoding.


def ode_sample(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, shape: Sequence[int], *,
               rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3, denoise: bool = False,
               z: Optional[Array] = None, solver: str = DEFAULT_SOLVER,
               max_steps: int = 4096) -> Tuple[Array, Array]:
  """Samples [B, ...] by solving the probability-flow ODE from T to eps; `z` given decodes it.

  `denoise` adds one noise-free reverse-diffusion step at eps (as the original). Returns
  (samples, nfe) with nfe a scalar array (the adaptive solver decides it at run time). Raises
  ValueError on bad arguments and ODESolveError when the solve does not finish."""
  shape = check_shape(shape)
  eps, rtol, atol, max_steps = _check_solve_args(sde, eps, rtol, atol, solver, max_steps)
  if z is not None and tuple(z.shape) != shape:
    raise ValueError(f'z has shape {tuple(z.shape)} but shape is {shape}.')
  x, nfe, failed = _ode_sample_jit(rng, z, sde=sde, score_fn=score_fn, shape=shape, rtol=rtol,
                                   atol=atol, eps=eps, denoise=bool(denoise), solver=solver,
                                   max_steps=max_steps)
  raise_if_failed(failed, 'sampling', solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
  return x, nfe


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'shape', 'rtol', 'atol', 'eps', 'denoise',
                                             'solver', 'max_steps'))
def _ode_sample_jit(rng, z, *, sde, score_fn, shape, rtol, atol, eps, denoise, solver, max_steps):
  init_rng, _ = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if z is None else z
  x, nfe, failed = solve(flow_drift(sde, score_fn), x, sde.T, eps, rtol=rtol, atol=atol,
                         solver=solver, max_steps=max_steps)
  if denoise:  # the reverse-diffusion predictor's noise-free mean: x - rev_f
    rev_f, _ = sde.reverse(score_fn).discretize(x, jnp.full((shape[0],), eps, x.dtype))
    x, nfe = x - rev_f, nfe + 1
  return x, nfe, failed


def ode_encode(sde: sde_lib.SDE, score_fn: ScoreFn, x: Array, *, rtol: float = 1e-5,
               atol: float = 1e-5, eps: float = 1e-3, solver: str = DEFAULT_SOLVER,
               max_steps: int = 4096) -> Tuple[Array, Array]:
  """Encodes data x [B, ...] at time eps into its latent z at T: (z, nfe)."""
  check_shape(x.shape)
  eps, rtol, atol, max_steps = _check_solve_args(sde, eps, rtol, atol, solver, max_steps)
  z, nfe, failed = _ode_encode_jit(x, sde=sde, score_fn=score_fn, rtol=rtol, atol=atol, eps=eps,
                                   solver=solver, max_steps=max_steps)
  raise_if_failed(failed, 'encoding', solver=solver, rtol=rtol, atol=atol, max_steps=max_steps)
  return z, nfe


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'rtol', 'atol', 'eps', 'solver',
                                             'max_steps'))
def _ode_encode_jit(x, *, sde, score_fn, rtol, atol, eps, solver, max_steps):
  return solve(flow_drift(sde, score_fn), x, eps, sde.T, rtol=rtol, atol=atol, solver=solver,
               max_steps=max_steps)


# --------------------------------------------------------------------------------------------
# The likelihood solve.


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

  `jax.linearize` evaluates the drift once and returns its Jacobian-vector product, applied to
  each probe. Hutchinson (1989): div f = E[v^T J v], the mean over probes. Exact: the sum over the
  basis of e_j^T J e_j (each example's Jacobian block is its own: networks do not mix examples at
  evaluation). The original evaluated the network twice per evaluation (drift, then divergence)."""
  drift, jvp_fn = jax.linearize(drift_fn, x)
  vjv = jax.vmap(lambda v: sde_lib._flat_sum(v * jvp_fn(v)))(probes)  # [P, B]
  return drift, (jnp.sum(vjv, 0) if exact else jnp.mean(vjv, 0))


def check_likelihood_args(sde, x, *, rtol, atol, eps, trace, n_probes, solver, max_steps):
  """Validates log-likelihood arguments before tracing; returns (eps, rtol, atol, max_steps)."""
  if trace not in TRACE_ESTIMATORS:
    raise ValueError(f'Unknown trace estimator {trace!r}; valid choices: {list(TRACE_ESTIMATORS)}.')
  if int(n_probes) != n_probes or n_probes < 1:
    raise ValueError(f'n_probes must be a positive integer, got {n_probes!r}.')
  if np.ndim(x) < 2:
    raise ValueError(f'x must be a batch [B, ...] with at least 2 axes, got shape {tuple(np.shape(x))}.')
  return _check_solve_args(sde, eps, rtol, atol, solver, max_steps)


def check_finite(x: Array, what: str = 'x') -> None:
  """Raises a ValueError when a concrete x has a NaN or inf (the density is asked of data)."""
  if isinstance(x, jax.core.Tracer):
    return
  bad = ~jnp.isfinite(jnp.asarray(x)).reshape(np.shape(x)[0], -1).all(axis=1)
  if bool(jnp.any(bad)):
    rows = np.flatnonzero(np.asarray(bad))
    raise ValueError(f'{what} has non-finite values (NaN or inf) in examples {rows[:10].tolist()}'
                     f'{" ..." if len(rows) > 10 else ""}: a log-density needs finite data.')


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'rtol', 'atol', 'eps', 'trace',
                                             'n_probes', 'solver', 'max_steps'))
def ode_log_likelihood(rng, x, *, sde, score_fn, rtol, atol, eps, trace, n_probes, solver,
                       max_steps):
  """(log p_0(x) [B] in nats, z = x(T), nfe, failed): the (x, int div) solve from eps to T.

  The probes are drawn once and held fixed over the solve (the integrand must be smooth in t
  for the adaptive solver). Arguments are NOT checked here: see `likelihood.log_likelihood`."""
  drift = flow_drift(sde, score_fn)
  probes = _probes(rng, trace, n_probes, x)

  def vector_field(t, state):
    y, _ = state
    return drift_and_divergence(lambda v: drift(t, v), y, probes, trace == 'exact')

  init = (x, jnp.zeros((x.shape[0],), x.dtype))
  (z, delta_logp), nfe, failed = solve(vector_field, init, eps, sde.T, rtol=rtol, atol=atol,
                                       solver=solver, max_steps=max_steps)
  return sde.prior_logp(z) + delta_logp, z, nfe, failed
