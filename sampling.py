"""Samplers of the reverse-time SDE and the probability-flow ODE.

- `pc_sample`: predictor-corrector sampling (Song et al. 2021, Alg. 1-3) over the N steps of the
  SDE; the whole loop is one `lax.scan` inside `jax.jit`: no host round trip per step.
- `fast_sample`: 10-30-evaluation solvers (DDIM, EDM Heun, DPM-Solver, DPM-Solver++, UniPC; see
  `fast_solvers.py`) over a time grid built by `time_grid`.
- `ode_sample`, `ode_encode`: the probability-flow ODE with an adaptive solver (`ode.py`).
- `get_sampling_fn`: the config-driven path for a trained network.

Every sampler returns `(samples, nfe)`, nfe being the number of score-function evaluations; each
registered predictor, corrector and solver declares its evaluation count with its registry entry.
Guidance (classifier, classifier-free) is a transform of the score function: every sampler takes
any `score_fn(x, t)`.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

import fast_solvers
import ode
import sde_lib
from ode import ODE_SOLVERS, ode_encode, ode_sample  # noqa: F401  (public here: contract 3)
from ode import check_shape as _check_shape
from registry import Registry
from sde_lib import batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

PREDICTORS: Registry[Callable] = Registry('predictor')
CORRECTORS: Registry[Callable] = Registry('corrector')


def _register(registry: Registry, name: str, nfe: int):
  """Registers a predictor / corrector with its score evaluations per call (per corrector step)."""

  def decorator(fn):
    fn.nfe = nfe
    return registry.register(fn, name=name)

  return decorator


# --------------------------------------------------------------------------------------------
# Predictors: (rng, x, t, sde, score_fn, probability_flow) -> (x, x_mean), t of shape [B].
# --------------------------------------------------------------------------------------------

@_register(PREDICTORS, 'euler_maruyama', nfe=1)
def euler_maruyama(rng, x, t, sde, score_fn, probability_flow=False):
  """One Euler-Maruyama step of the reverse SDE (or Euler step of the ODE) with dt = -T/N."""
  dt = -sde.T / sde.N
  drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
  x_mean = x + drift * dt
  return x_mean + batch_mul(diffusion * np.sqrt(-dt), jax.random.normal(rng, x.shape, x.dtype)), x_mean


@_register(PREDICTORS, 'reverse_diffusion', nfe=1)
def reverse_diffusion(rng, x, t, sde, score_fn, probability_flow=False):
  """One step of the reverse of the forward discretization: x - rev_f + rev_G z (Song et al.
  2021, eq. 46)."""
  rev_f, rev_G = sde.reverse(score_fn, probability_flow).discretize(x, t)
  x_mean = x - rev_f
  return x_mean + batch_mul(rev_G, jax.random.normal(rng, x.shape, x.dtype)), x_mean


@_register(PREDICTORS, 'ancestral_sampling', nfe=1)
def ancestral_sampling(rng, x, t, sde, score_fn, probability_flow=False):
  """Ancestral sampling: x_mean = m (x + c score), x = x_mean + s z, (m, c, s) from
  `sde.ancestral_coeffs` (SMLD for VE, DDPM for VP, the exact Gaussian posterior otherwise)."""
  del probability_flow  # ancestral sampling has no ODE counterpart
  mean_scale, score_scale, noise_std = (c.astype(x.dtype) for c in sde.ancestral_coeffs(t))
  x_mean = batch_mul(mean_scale, x + batch_mul(score_scale, score_fn(x, t)))
  return x_mean + batch_mul(noise_std, jax.random.normal(rng, x.shape, x.dtype)), x_mean


@_register(PREDICTORS, 'none', nfe=0)
def no_predictor(rng, x, t, sde, score_fn, probability_flow=False):
  """The identity: corrector-only sampling."""
  return x, x


# --------------------------------------------------------------------------------------------
# Correctors: (rng, x, t, sde, score_fn, snr, n_steps) -> (x, x_mean).
# --------------------------------------------------------------------------------------------

def _langevin_loop(rng, x, t, score_fn, n_steps, step_size_fn):
  """n_steps of x <- x + eps s(x) + sqrt(2 eps) z, with eps = step_size_fn(score, noise): [B]."""

  def body(carry, step_rng):
    x, _ = carry
    grad = score_fn(x, t)
    noise = jax.random.normal(step_rng, x.shape, x.dtype)
    step_size = step_size_fn(grad, noise)
    x_mean = x + batch_mul(step_size, grad)
    return (x_mean + batch_mul(jnp.sqrt(2 * step_size), noise), x_mean), None

  (x, x_mean), _ = jax.lax.scan(body, (x, x), jax.random.split(rng, n_steps))
  return x, x_mean


def _mean_norm(v):
  # Mean over the (global) batch of per-example norms: the original's pmean over devices.
  return jnp.mean(jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1))


@_register(CORRECTORS, 'langevin', nfe=1)
def langevin(rng, x, t, sde, score_fn, snr, n_steps):
  """Langevin MCMC with step size 2 alpha (snr ||z|| / ||score||)^2 (Song et al. 2021, Alg. 4)."""
  alpha = sde.langevin_alpha(t).astype(x.dtype)
  step = lambda grad, noise: 2 * alpha * (snr * _mean_norm(noise) / _mean_norm(grad)) ** 2
  return _langevin_loop(rng, x, t, score_fn, n_steps, step)


@_register(CORRECTORS, 'ald', nfe=1)
def annealed_langevin_dynamics(rng, x, t, sde, score_fn, snr, n_steps):
  """Annealed Langevin dynamics (NCSN; Song & Ermon 2019, Alg. 1): step size 2 alpha (snr
  sigma_t)^2."""
  alpha = sde.langevin_alpha(t).astype(x.dtype)
  std = sde.sigma(t)
  step = lambda grad, noise: 2 * alpha * (snr * std) ** 2
  return _langevin_loop(rng, x, t, score_fn, n_steps, step)


@_register(CORRECTORS, 'none', nfe=0)
def no_corrector(rng, x, t, sde, score_fn, snr, n_steps):
  """The identity: predictor-only sampling."""
  return x, x


# --------------------------------------------------------------------------------------------
# Time grids: n_steps + 1 times from T down to eps (the samplers take the grid as an argument).
# --------------------------------------------------------------------------------------------

TIME_SCHEDULES: Registry[Callable] = Registry('time schedule')


def _from_log_snr(sde, lam: Array, eps: float) -> Array:
  t = sde.t_from_log_snr(lam)
  return t.at[0].set(sde.T).at[-1].set(eps)  # the end points exactly


def _log_snr(sde, t: float) -> Array:
  return sde.log_snr(jnp.full((1,), t))[0]


@TIME_SCHEDULES.register(name='time_uniform')
def time_uniform(sde, n_steps: int, eps: float) -> Array:
  """Uniform in t (the PC sampler's grid; DDPM / DDIM)."""
  return jnp.linspace(sde.T, eps, n_steps + 1)


@TIME_SCHEDULES.register(name='time_quadratic')
def time_quadratic(sde, n_steps: int, eps: float) -> Array:
  """Uniform in sqrt(t) (DDIM's 'quadratic'; DPM-Solver's time_quadratic)."""
  return jnp.linspace(np.sqrt(sde.T), np.sqrt(eps), n_steps + 1) ** 2


@TIME_SCHEDULES.register(name='logsnr')
def logsnr(sde, n_steps: int, eps: float) -> Array:
  """Uniform in the log-SNR lambda_t (DPM-Solver's recommended 'logSNR' grid)."""
  lam = jnp.linspace(_log_snr(sde, sde.T), _log_snr(sde, eps), n_steps + 1)
  return _from_log_snr(sde, lam, eps)


@TIME_SCHEDULES.register(name='karras')
def karras(sde, n_steps: int, eps: float, rho: float = 7.) -> Array:
  """EDM's grid (Karras et al. 2022, eq. 5) with rho = 7 in sigma/alpha = exp(-lambda)."""
  s_max, s_min = (jnp.exp(-_log_snr(sde, t)) for t in (sde.T, eps))
  ramp = jnp.linspace(0., 1., n_steps + 1)
  s = (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
  return _from_log_snr(sde, -jnp.log(s), eps)


def _check_steps(n_steps) -> int:
  if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
    raise ValueError(f'n_steps must be a positive integer, got {n_steps!r}.')
  return int(n_steps)


def time_grid(sde: sde_lib.SDE, n_steps: int, eps: float, schedule: str = 'logsnr') -> Array:
  """n_steps + 1 decreasing times [n_steps + 1] from T to eps under `schedule` (TIME_SCHEDULES).

  Raises ValueError for an unknown schedule, n_steps < 1 or eps outside (0, T)."""
  build = TIME_SCHEDULES.get(schedule)
  return build(sde, _check_steps(n_steps), sde.check_time(eps))


# --------------------------------------------------------------------------------------------
# Predictor-corrector sampling.
# --------------------------------------------------------------------------------------------

def _check_pc_args(sde, predictor, corrector, snr, n_steps, eps):
  """Validates PC arguments before tracing; returns (predictor_fn, corrector_fn, eps)."""
  predictor_fn, corrector_fn = PREDICTORS.get(predictor), CORRECTORS.get(corrector)
  eps = sde.check_time(eps)
  if isinstance(n_steps, bool) or int(n_steps) != n_steps or n_steps < 1:
    raise ValueError(f'n_steps (corrector steps per time step) must be a positive integer, got {n_steps!r}.')
  if corrector != 'none' and not (np.isfinite(snr) and snr > 0):
    raise ValueError(f'snr (the corrector\'s signal-to-noise ratio) must be positive, got {snr!r}.')
  return predictor_fn, corrector_fn, eps


def pc_sample(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, shape: Sequence[int], *,
              predictor: str = 'euler_maruyama', corrector: str = 'none', snr: float = 0.16,
              n_steps: int = 1, probability_flow: bool = False, denoise: bool = True,
              eps: float = 1e-3, x_init: Optional[Array] = None,
              constraint: Optional[Callable] = None, constraint_args=()) -> Tuple[Array, int]:
  """Predictor-corrector sampling [B, ...] from the prior at T down to eps over sde.N steps.

  The grid is `time_uniform` with N points (T, ..., eps). At each step the corrector runs before
  the predictor (as the original); `denoise` returns the last step's noise-free mean. `x_init`
  replaces the prior sample. `constraint(rng, x, vec_t, sde, *constraint_args) -> x`, a
  module-level function (it is a static argument of the jitted loop; `constraint_args` are
  arrays), is applied before the corrector (when it evaluates the score) and before the
  predictor: the replacement method of `controllable_generation` re-imposes the known part of x
  there. Returns (samples, nfe). Raises ValueError on bad arguments."""
  predictor_fn, corrector_fn, eps = _check_pc_args(sde, predictor, corrector, snr, n_steps, eps)
  shape = _check_shape(shape)
  nfe = sde.N * (predictor_fn.nfe + corrector_fn.nfe * int(n_steps))
  samples = _pc_sample_jit(rng, x_init, time_grid(sde, sde.N - 1, eps, 'time_uniform'),
                           tuple(constraint_args), sde=sde, score_fn=score_fn, shape=shape,
                           predictor_fn=predictor_fn, corrector_fn=corrector_fn, snr=float(snr),
                           n_steps=int(n_steps), probability_flow=bool(probability_flow),
                           denoise=bool(denoise), constraint=constraint)
  return samples, nfe


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'shape', 'predictor_fn', 'corrector_fn',
                                             'snr', 'n_steps', 'probability_flow', 'denoise',
                                             'constraint'))
def _pc_sample_jit(rng, x_init, timesteps, constraint_args, *, sde, score_fn, shape, predictor_fn,
                   corrector_fn, snr, n_steps, probability_flow, denoise, constraint):
  init_rng, rng = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if x_init is None else x_init

  def step(carry, inputs):
    x, _ = carry
    t, step_rng = inputs
    vec_t = jnp.full((shape[0],), t, x.dtype)
    if constraint is None:
      c_rng, p_rng = jax.random.split(step_rng)
    else:  # a fresh draw for each re-imposition
      k_rng, c_rng, k2_rng, p_rng = jax.random.split(step_rng, 4)
      x = constraint(k_rng, x, vec_t, sde, *constraint_args)
    x, _ = corrector_fn(c_rng, x, vec_t, sde, score_fn, snr, n_steps)
    if constraint is not None and corrector_fn.nfe:
      x = constraint(k2_rng, x, vec_t, sde, *constraint_args)
    return predictor_fn(p_rng, x, vec_t, sde, score_fn, probability_flow), None

  (x, x_mean), _ = jax.lax.scan(step, (x, x), (timesteps, jax.random.split(rng, len(timesteps))))
  return x_mean if denoise else x


# --------------------------------------------------------------------------------------------
# Fast samplers: 10-30 evaluations over a time grid.
# --------------------------------------------------------------------------------------------

def _check_fast_args(sde, solver, n_steps, schedule, eps, eta, shape, z):
  """Validates fast_sample's arguments before tracing; returns (solver entry, n_steps, eps, eta)."""
  entry = fast_solvers.SOLVERS.get(solver)
  TIME_SCHEDULES.get(schedule)
  n_steps, eps = _check_steps(n_steps), sde.check_time(eps)
  eta = entry.default_eta if eta is None else eta
  if not (np.isfinite(eta) and eta >= 0):
    raise ValueError(f'eta (the stochasticity of the solver) must be >= 0, got {eta!r}.')
  if eta > 0 and not entry.stochastic:
    raise ValueError(f'Solver {solver!r} is deterministic; eta={eta!r} applies to '
                     f'{fast_solvers.stochastic_solvers()} only.')
  if eta > entry.max_eta:
    raise ValueError(f'eta must lie in [0, {entry.max_eta}] for {solver!r}, got {eta!r}.')
  if z is not None and tuple(z.shape) != shape:
    raise ValueError(f'z has shape {tuple(z.shape)} but shape is {shape}.')
  return entry, n_steps, eps, float(eta)


def fast_sample(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, shape: Sequence[int], *,
                solver: str = 'dpmpp_2m', n_steps: int = 20, schedule: str = 'logsnr',
                eps: float = 1e-3, eta: Optional[float] = None, z: Optional[Array] = None,
                denoise: bool = False) -> Tuple[Array, int]:
  """Samples [B, ...] with a fast solver of `fast_solvers.SOLVERS` in about n_steps evaluations.

  The grid is `time_grid(sde, intervals, eps, schedule)` (intervals = n_steps, or fewer for the
  singlestep `dpm_solver`, which spends exactly n_steps evaluations); the whole loop is jitted.
  `z` given: start from that latent at T (the deterministic solvers then approximate the
  probability-flow ODE map); `denoise`: one final Tweedie step, the x_0 prediction at eps (one
  more evaluation). eta: the stochastic solvers' noise (None: the solver's default, 0 for
  `ddim`, 1 for `dpmpp_2m_sde`). Returns (samples, nfe) with nfe the score evaluations made.
  Raises ValueError for an unknown solver or schedule, n_steps < 1, eps outside (0, T), eta < 0
  (or > 0 for a deterministic solver), or z of the wrong shape."""
  shape = _check_shape(shape)
  entry, n_steps, eps, eta = _check_fast_args(sde, solver, n_steps, schedule, eps, eta, shape, z)
  grid = time_grid(sde, entry.intervals(n_steps), eps, schedule)
  x = _fast_sample_jit(rng, z, grid, sde=sde, score_fn=score_fn, shape=shape, solver=solver,
                       n_steps=n_steps, eta=eta, denoise=bool(denoise))
  return x, entry.nfe(n_steps) + int(bool(denoise))


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'shape', 'solver', 'n_steps', 'eta',
                                             'denoise'))
def _fast_sample_jit(rng, z, grid, *, sde, score_fn, shape, solver, n_steps, eta, denoise):
  init_rng, solver_rng = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if z is None else z
  model = fast_solvers.Parametrization(sde, score_fn)
  x = fast_solvers.SOLVERS.get(solver).fn(solver_rng, x, grid, model, n_steps=n_steps, eta=eta)
  return model.x0(x, grid[-1]) if denoise else x


# --------------------------------------------------------------------------------------------
# Config-driven sampling of a network.
# --------------------------------------------------------------------------------------------

def sampling_methods() -> Tuple[str, ...]:
  """Valid config.sampling.method values: 'pc', 'ode' and every fast solver's name."""
  return ('pc', 'ode') + fast_solvers.SOLVERS.names()


def check_sampling_config(config, eps: Optional[float] = None) -> str:
  """Validates every field of config.sampling that its method uses, and every sampler name;
  returns the method.

  Runs before any compilation: names (method, predictor, corrector, ODE solver, schedule) and
  values (snr, corrector steps, tolerances, n_steps, eta) raise ValueErrors naming the field."""
  s = config.sampling
  method = str(s.method).lower()
  if method not in sampling_methods():
    raise ValueError(f'Unknown sampling method {s.method!r}; valid choices: {list(sampling_methods())}.')
  sde, default_eps = sde_lib.get_sde(config)
  eps = default_eps if eps is None else eps
  try:
    # Names are checked whatever the method: a misspelled knob of another method is caught now,
    # not when someone switches to that method after a long training run.
    for field, registry in (('predictor', PREDICTORS), ('corrector', CORRECTORS),
                            ('ode_solver', ode.ODE_SOLVERS), ('schedule', TIME_SCHEDULES)):
      if field in s:
        registry.check(s[field])
    if method == 'pc':
      _check_pc_args(sde, s.predictor, s.corrector, s.snr, s.n_steps_each, eps)
    elif method == 'ode':
      ode._check_solve_args(sde, eps, s.get('rtol', 1e-5), s.get('atol', 1e-5),
                            s.get('ode_solver', ode.DEFAULT_SOLVER), 4096)
    else:
      _check_fast_args(sde, method, s.get('n_steps', 20), s.get('schedule', 'logsnr'), eps,
                       s.get('eta', None), (1, 1), None)
  except ValueError as e:
    raise ValueError(f'config.sampling (method {method!r}): {e}') from e
  return method


def raise_if_sampler_failed(config, failed, what: str) -> None:
  """ode.ODESolveError, with config.sampling's solver settings, when the `failed` flag of a
  `get_sampler` sampler is set (an adaptive ODE solve that did not finish)."""
  s = config.sampling
  ode.raise_if_failed(failed, what, solver=s.get('ode_solver', ode.DEFAULT_SOLVER),
                      rtol=s.get('rtol', 1e-5), atol=s.get('atol', 1e-5), max_steps=4096)


def get_sampler(config, shape: Sequence[int], eps: float) -> Callable:
  """sampler(rng, sde, score_fn) -> (samples, nfe, failed) for `config.sampling`, jittable.

  `failed` is True when an adaptive ODE solve did not finish (see `ode.raise_if_failed`)."""
  s = config.sampling
  method = check_sampling_config(config, eps)
  shape = _check_shape(shape)
  no_failure = lambda out: (out[0], jnp.asarray(out[1]), jnp.asarray(False))
  if method == 'pc':
    pc = functools.partial(pc_sample, shape=shape, predictor=s.predictor, corrector=s.corrector,
                           snr=s.snr, n_steps=s.n_steps_each, probability_flow=s.probability_flow,
                           denoise=s.noise_removal, eps=eps)
    return lambda rng, sde, score_fn: no_failure(pc(rng, sde, score_fn))
  if method == 'ode':
    def ode_sampler(rng, sde, score_fn):
      return ode._ode_sample_jit(rng, None, sde=sde, score_fn=score_fn, shape=shape,
                                 rtol=float(s.get('rtol', 1e-5)), atol=float(s.get('atol', 1e-5)),
                                 eps=eps, denoise=bool(s.noise_removal),
                                 solver=s.get('ode_solver', ode.DEFAULT_SOLVER), max_steps=4096)
    return ode_sampler
  fast = functools.partial(fast_sample, shape=shape, solver=method, n_steps=s.get('n_steps', 20),
                           schedule=s.get('schedule', 'logsnr'), eps=eps, eta=s.get('eta', None),
                           denoise=s.noise_removal)
  return lambda rng, sde, score_fn: no_failure(fast(rng, sde, score_fn))


def get_sampling_fn(config, sde: sde_lib.SDE, model, shape: Sequence[int],
                    inverse_scaler: Callable[[Array], Array], eps: float, *, mesh=None):
  """sampling_fn(rng, params, model_state=None) -> (samples, nfe) for `config.sampling`.

  The score function honours config.training.continuous (the original's ODE sampler ignored it);
  with a `mesh`, samples come out sharded over its 'data' axis. Raises ValueError for a bad
  config.sampling (at build time) and ode.ODESolveError when an adaptive solve does not finish."""
  from models import utils as mutils  # local: models import sampling-free modules only
  s = config.sampling
  sampler = get_sampler(config, shape, eps)
  out_shardings = None
  if mesh is not None:
    import parallel
    out_shardings = (parallel.batch_sharding(mesh), parallel.replicated(mesh), parallel.replicated(mesh))

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def jitted(rng, params, model_state=None):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False,
                                   continuous=config.training.continuous)
    x, nfe, failed = sampler(rng, sde, score_fn)
    return inverse_scaler(x), nfe, failed

  def sampling_fn(rng, params, model_state=None):
    x, nfe, failed = jitted(rng, params, model_state)
    raise_if_sampler_failed(config, failed, 'sampling')
    return x, nfe

  sampling_fn.jitted = jitted
  return sampling_fn
