"""Samplers of the reverse-time SDE and the probability-flow ODE.

- `pc_sample`: predictor-corrector sampling (Song et al. 2021, Alg. 1-3); the whole loop over the N
  time steps is one `lax.scan` inside `jax.jit`: no host round trip per step.
- `ode_sample`: the probability-flow ODE solved by an adaptive Runge-Kutta solver (diffrax) inside
  jit. Over a batch sharded across devices the solve is one program, so the error norm and the step
  count are global: devices never take different numbers of steps.
- `get_sampling_fn`: the config-driven path for a trained network.

Every sampler returns `(samples, nfe)`, nfe being the number of score-function evaluations.
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
from sde_lib import batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]

PREDICTORS: Registry[Callable] = Registry('predictor')
CORRECTORS: Registry[Callable] = Registry('corrector')

# Score evaluations per call of a predictor, or per corrector step.
_NFE_PER_CALL = {'none': 0}


# --------------------------------------------------------------------------------------------
# Predictors: (rng, x, t, sde, score_fn, probability_flow) -> (x, x_mean), t of shape [B].
# --------------------------------------------------------------------------------------------

@PREDICTORS.register(name='euler_maruyama')
def euler_maruyama(rng, x, t, sde, score_fn, probability_flow=False):
  """One Euler-Maruyama step of the reverse SDE (or Euler step of the ODE) with dt = -T/N."""
  dt = -sde.T / sde.N
  drift, diffusion = sde.reverse(score_fn, probability_flow).sde(x, t)
  x_mean = x + drift * dt
  return x_mean + batch_mul(diffusion * np.sqrt(-dt), jax.random.normal(rng, x.shape, x.dtype)), x_mean


@PREDICTORS.register(name='reverse_diffusion')
def reverse_diffusion(rng, x, t, sde, score_fn, probability_flow=False):
  """One step of the reverse of the forward discretization: x - rev_f + rev_G z."""
  rev_f, rev_G = sde.reverse(score_fn, probability_flow).discretize(x, t)
  x_mean = x - rev_f
  return x_mean + batch_mul(rev_G, jax.random.normal(rng, x.shape, x.dtype)), x_mean


@PREDICTORS.register(name='ancestral_sampling')
def ancestral_sampling(rng, x, t, sde, score_fn, probability_flow=False):
  """Ancestral sampling of the discrete chain (SMLD for VE, DDPM for VP; see `_ancestral_params`)."""
  del probability_flow  # ancestral sampling has no ODE counterpart
  mean_scale, score_scale, noise_std = _ancestral_params(sde, t, x.dtype)
  x_mean = batch_mul(mean_scale, x + batch_mul(score_scale, score_fn(x, t)))
  return x_mean + batch_mul(noise_std, jax.random.normal(rng, x.shape, x.dtype)), x_mean


def _ancestral_params(sde, t, dtype):
  """Coefficients of x_mean = m (x + c score), x = x_mean + s z for one ancestral step.

  VE (SMLD): the exact posterior between adjacent noise levels, c = sigma_i^2 - sigma_{i-1}^2,
  s^2 = sigma_{i-1}^2 c / sigma_i^2. VP (DDPM with sigma^2 = beta): m = 1/sqrt(1 - beta_i),
  c = beta_i, s = sqrt(beta_i), as the original. Sub-VP has no discrete chain (the original raised
  NotImplementedError); it is a linear SDE, so its Gaussian transition x_t | x_s is exact:
  a_ts = a_t / a_s, v_ts = std_t^2 - a_ts^2 std_s^2, and the posterior of x_s given x_t with the
  Tweedie estimate of x_0 gives m = 1/a_ts, c = v_ts, s^2 = v_ts std_s^2 / std_t^2, with s = t - T/N.
  """
  if isinstance(sde, sde_lib.VESDE):
    i = sde.timestep_index(t)
    sigmas = jnp.asarray(sde.discrete_sigmas, dtype)
    sigma = sigmas[i]
    adjacent = jnp.where(i == 0, jnp.zeros_like(sigma), sigmas[jnp.maximum(i - 1, 0)])
    c = sigma ** 2 - adjacent ** 2
    return jnp.ones_like(sigma), c, jnp.sqrt(adjacent ** 2 * c / sigma ** 2)
  if isinstance(sde, sde_lib.VPSDE):
    beta = jnp.asarray(sde.discrete_betas, dtype)[sde.timestep_index(t)]
    return 1. / jnp.sqrt(1. - beta), beta, jnp.sqrt(beta)
  if isinstance(sde, sde_lib.subVPSDE):
    s = jnp.maximum(t - sde.T / sde.N, 0.)
    a_t, std_t = sde.marginal_coeffs(t)
    a_s, std_s = sde.marginal_coeffs(s)
    a_ts = a_t / a_s
    v_ts = std_t ** 2 - a_ts ** 2 * std_s ** 2
    return 1. / a_ts, v_ts, jnp.sqrt(v_ts) * std_s / std_t
  raise ValueError(f'Ancestral sampling does not support {type(sde).__name__}.')


@PREDICTORS.register(name='none')
def no_predictor(rng, x, t, sde, score_fn, probability_flow=False):
  """The identity: corrector-only sampling."""
  return x, x


# --------------------------------------------------------------------------------------------
# Correctors: (rng, x, t, sde, score_fn, snr, n_steps) -> (x, x_mean).
# --------------------------------------------------------------------------------------------

def _langevin_alpha(sde, t, dtype):
  """alpha_i = 1 - beta_i of the discrete chain for VP / sub-VP (the original lacked it for
  sub-VP), 1 for VE."""
  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    return jnp.asarray(sde.alphas, dtype)[sde.timestep_index(t)]
  return jnp.ones_like(t)


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


@CORRECTORS.register(name='langevin')
def langevin(rng, x, t, sde, score_fn, snr, n_steps):
  """Langevin MCMC with step size 2 alpha (snr ||z|| / ||score||)^2 (Song et al. 2021, Alg. 4)."""
  alpha = _langevin_alpha(sde, t, x.dtype)
  step = lambda grad, noise: 2 * alpha * (snr * _mean_norm(noise) / _mean_norm(grad)) ** 2
  return _langevin_loop(rng, x, t, score_fn, n_steps, step)


@CORRECTORS.register(name='ald')
def annealed_langevin_dynamics(rng, x, t, sde, score_fn, snr, n_steps):
  """Annealed Langevin dynamics (NCSN): step size 2 alpha (snr std(t))^2."""
  alpha = _langevin_alpha(sde, t, x.dtype)
  std = sde.marginal_coeffs(t)[1]
  step = lambda grad, noise: 2 * alpha * (snr * std) ** 2
  return _langevin_loop(rng, x, t, score_fn, n_steps, step)


@CORRECTORS.register(name='none')
def no_corrector(rng, x, t, sde, score_fn, snr, n_steps):
  """The identity: predictor-only sampling."""
  return x, x


# --------------------------------------------------------------------------------------------
# Argument checks: raised before any tracing.
# --------------------------------------------------------------------------------------------

def _check_shape(shape) -> Tuple[int, ...]:
  shape = tuple(shape)
  if len(shape) < 2 or any(int(s) != s or s < 1 for s in shape):
    raise ValueError(f'shape must be (batch, ...) of positive integers with at least 2 axes, got {shape}.')
  return tuple(int(s) for s in shape)


def _check_eps(eps: float, sde) -> float:
  if not 0. < float(eps) < sde.T:
    raise ValueError(f'eps must lie in (0, T) = (0, {sde.T}), got {eps!r}.')
  return float(eps)


def _check_tol(name: str, value: float) -> float:
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f'{name} must be a positive finite tolerance, got {value!r}.')
  return float(value)


# --------------------------------------------------------------------------------------------
# Predictor-corrector sampling.
# --------------------------------------------------------------------------------------------

def pc_sample(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, shape: Sequence[int], *,
              predictor: str = 'euler_maruyama', corrector: str = 'none', snr: float = 0.16,
              n_steps: int = 1, probability_flow: bool = False, denoise: bool = True,
              eps: float = 1e-3, x_init: Optional[Array] = None) -> Tuple[Array, int]:
  """Predictor-corrector sampling from the prior at T down to eps over sde.N steps.

  At each step the corrector runs before the predictor (as the original); `denoise` returns the
  last step's noise-free mean. `x_init` replaces the prior sample. Returns (samples, nfe).
  """
  predictor_fn, corrector_fn = PREDICTORS.get(predictor), CORRECTORS.get(corrector)
  shape, eps = _check_shape(shape), _check_eps(eps, sde)
  if int(n_steps) != n_steps or n_steps < 1:
    raise ValueError(f'n_steps (corrector steps per time step) must be a positive integer, got {n_steps!r}.')
  if corrector != 'none' and not (np.isfinite(snr) and snr > 0):
    raise ValueError(f'snr must be positive, got {snr!r}.')
  nfe = sde.N * (_NFE_PER_CALL.get(predictor, 1) + _NFE_PER_CALL.get(corrector, 1) * int(n_steps))
  samples = _pc_sample_jit(rng, x_init, sde=sde, score_fn=score_fn, shape=shape,
                           predictor_fn=predictor_fn, corrector_fn=corrector_fn, snr=float(snr),
                           n_steps=int(n_steps), probability_flow=bool(probability_flow),
                           denoise=bool(denoise), eps=eps)
  return samples, nfe


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'shape', 'predictor_fn', 'corrector_fn',
                                             'snr', 'n_steps', 'probability_flow', 'denoise', 'eps'))
def _pc_sample_jit(rng, x_init, *, sde, score_fn, shape, predictor_fn, corrector_fn, snr, n_steps,
                   probability_flow, denoise, eps):
  init_rng, rng = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if x_init is None else x_init
  timesteps = jnp.linspace(sde.T, eps, sde.N)

  def step(carry, inputs):
    x, _ = carry
    t, step_rng = inputs
    c_rng, p_rng = jax.random.split(step_rng)
    vec_t = jnp.full((shape[0],), t, x.dtype)
    x, _ = corrector_fn(c_rng, x, vec_t, sde, score_fn, snr, n_steps)
    return predictor_fn(p_rng, x, vec_t, sde, score_fn, probability_flow), None

  (x, x_mean), _ = jax.lax.scan(step, (x, x), (timesteps, jax.random.split(rng, sde.N)))
  return x_mean if denoise else x


# --------------------------------------------------------------------------------------------
# Probability-flow ODE with an adaptive solver.
# --------------------------------------------------------------------------------------------

# diffrax solver and its score evaluations per step (FSAL methods reuse their last stage); every
# solve adds one evaluation at the start. tests/test_sampling.py counts them with a host callback.
ODE_SOLVERS: Registry[Tuple[type, int]] = Registry('ODE solver')
ODE_SOLVERS.register((diffrax.Tsit5, 6), name='tsit5')
ODE_SOLVERS.register((diffrax.Dopri5, 6), name='dopri5')
ODE_SOLVERS.register((diffrax.Dopri8, 13), name='dopri8')
ODE_SOLVERS.register((diffrax.Bosh3, 3), name='bosh3')


def solve_ode(vector_field: Callable, y0, t0: float, t1: float, *, rtol: float, atol: float,
              solver: str = 'tsit5', max_steps: int = 4096):
  """Solves dy/dt = vector_field(t, y) from t0 to t1 adaptively (PID); returns (y1, nfe: traced).

  The state may be any pytree; the error norm is the RMS over all of it (global over devices)."""
  solver_cls, evals_per_step = ODE_SOLVERS.get(solver)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda t, y, args: vector_field(t, y)), solver_cls(), t0=t0, t1=t1, dt0=None,
      y0=y0, stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
      saveat=diffrax.SaveAt(t1=True), max_steps=max_steps)
  # One evaluation at t0 (shared by the initial step-size choice and the first stage), then
  # evals_per_step on each accepted or rejected step.
  nfe = 1 + evals_per_step * sol.stats['num_steps']
  return jax.tree_util.tree_map(lambda y: y[-1], sol.ys), nfe


def ode_sample(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, shape: Sequence[int], *,
               rtol: float = 1e-5, atol: float = 1e-5, eps: float = 1e-3, denoise: bool = False,
               z: Optional[Array] = None, solver: str = 'tsit5',
               max_steps: int = 4096) -> Tuple[Array, Array]:
  """Samples by solving the probability-flow ODE from T to eps; `z` given decodes that latent.

  `denoise` adds one noise-free reverse-diffusion step at eps (as the original). Returns
  (samples, nfe) with nfe a scalar array (the adaptive solver decides it at run time)."""
  ODE_SOLVERS.get(solver)
  shape, eps = _check_shape(shape), _check_eps(eps, sde)
  rtol, atol = _check_tol('rtol', rtol), _check_tol('atol', atol)
  if z is not None and tuple(z.shape) != shape:
    raise ValueError(f'z has shape {tuple(z.shape)} but shape is {shape}.')
  return _ode_sample_jit(rng, z, sde=sde, score_fn=score_fn, shape=shape, rtol=rtol, atol=atol,
                         eps=eps, denoise=bool(denoise), solver=solver, max_steps=int(max_steps))


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'shape', 'rtol', 'atol', 'eps', 'denoise',
                                             'solver', 'max_steps'))
def _ode_sample_jit(rng, z, *, sde, score_fn, shape, rtol, atol, eps, denoise, solver, max_steps):
  init_rng, denoise_rng = jax.random.split(rng)
  x = sde.prior_sampling(init_rng, shape) if z is None else z
  flow = sde.reverse(score_fn, probability_flow=True)
  drift = lambda t, x: flow.sde(x, jnp.full((shape[0],), t, x.dtype))[0]
  x, nfe = solve_ode(drift, x, sde.T, eps, rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)
  if denoise:
    vec_eps = jnp.full((shape[0],), eps, x.dtype)
    _, x = reverse_diffusion(denoise_rng, x, vec_eps, sde, score_fn, probability_flow=False)
    nfe = nfe + 1
  return x, nfe


def ode_encode(sde: sde_lib.SDE, score_fn: ScoreFn, x: Array, *, rtol: float = 1e-5,
               atol: float = 1e-5, eps: float = 1e-3, solver: str = 'tsit5',
               max_steps: int = 4096) -> Tuple[Array, Array]:
  """Encodes data x at time eps into its latent z at T with the probability-flow ODE: (z, nfe)."""
  _check_shape(x.shape)
  eps, rtol, atol = _check_eps(eps, sde), _check_tol('rtol', rtol), _check_tol('atol', atol)
  ODE_SOLVERS.get(solver)
  return _ode_encode_jit(x, sde=sde, score_fn=score_fn, rtol=rtol, atol=atol, eps=eps, solver=solver,
                         max_steps=int(max_steps))


@functools.partial(jax.jit, static_argnames=('sde', 'score_fn', 'rtol', 'atol', 'eps', 'solver',
                                             'max_steps'))
def _ode_encode_jit(x, *, sde, score_fn, rtol, atol, eps, solver, max_steps):
  flow = sde.reverse(score_fn, probability_flow=True)
  drift = lambda t, y: flow.sde(y, jnp.full((y.shape[0],), t, y.dtype))[0]
  return solve_ode(drift, x, eps, sde.T, rtol=rtol, atol=atol, solver=solver, max_steps=max_steps)


# --------------------------------------------------------------------------------------------
# Config-driven sampling of a network.
# --------------------------------------------------------------------------------------------

SAMPLING_METHODS = ('pc', 'ode')


def check_sampling_config(config) -> str:
  """Validates config.sampling's names (method, predictor, corrector, ODE solver); returns the method."""
  s = config.sampling
  method = str(s.method).lower()
  if method not in SAMPLING_METHODS:
    raise ValueError(f'Unknown sampling method {s.method!r}; valid choices: {list(SAMPLING_METHODS)}.')
  if method == 'pc':
    PREDICTORS.get(s.predictor), CORRECTORS.get(s.corrector)
  else:
    ODE_SOLVERS.get(s.get('ode_solver', 'tsit5'))
  return method


def get_sampling_fn(config, sde: sde_lib.SDE, model, shape: Sequence[int],
                    inverse_scaler: Callable[[Array], Array], eps: float, *, mesh=None):
  """sampling_fn(rng, params, model_state=None) -> (samples, nfe) for `config.sampling`.

  The score function honours config.training.continuous (the original's ODE sampler ignored it);
  with a `mesh`, samples come out sharded over its 'data' axis."""
  from models import utils as mutils  # local: models import sampling-free modules only
  s = config.sampling
  method = check_sampling_config(config)
  shape = _check_shape(shape)
  if method == 'pc':
    sampler = functools.partial(pc_sample, shape=shape, predictor=s.predictor, corrector=s.corrector,
                                snr=s.snr, n_steps=s.n_steps_each, probability_flow=s.probability_flow,
                                denoise=s.noise_removal, eps=eps)
  else:
    sampler = functools.partial(ode_sample, shape=shape, rtol=s.get('rtol', 1e-5),
                                atol=s.get('atol', 1e-5), eps=eps, denoise=s.noise_removal,
                                solver=s.get('ode_solver', 'tsit5'))
  out_shardings = None
  if mesh is not None:
    import parallel
    out_shardings = (parallel.batch_sharding(mesh), parallel.replicated(mesh))

  @functools.partial(jax.jit, out_shardings=out_shardings)
  def sampling_fn(rng, params, model_state=None):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=False,
                                   continuous=config.training.continuous)
    x, nfe = sampler(rng, sde, score_fn)
    return inverse_scaler(x), jnp.asarray(nfe)

  return sampling_fn
