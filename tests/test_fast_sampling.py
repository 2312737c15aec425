"""Fast samplers and time grids against exact answers.

- For one diagonal Gaussian the probability-flow map T -> eps is affine and closed form
  (`gaussian_flow_map`); every deterministic solver converges to it with its observed order
  (error ratio between n and 2n steps, in float64 so that round-off does not hide it).
- With the exact score of the 8-mode ring, every solver (stochastic ones too) reproduces the ring's
  moments, mode weights and a two-sample statistic within sample-size bounds.
- nfe equals an independent count of score evaluations (a host callback).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fast_solvers
import sampling
from tests import gmm_utils as gu
from tests.test_sampling import N_SAMPLES, RING, _check_ring

DETERMINISTIC = ('ddim', 'heun', 'dpm_solver', 'dpmpp_2m', 'dpmpp_3m', 'unipc')

# Observed order: log2(err(n) / err(2n)), at least (measured in float64 for VE / VP / sub-VP:
# ddim 0.97-0.98, heun 2.03-2.07, dpm_solver 1.80-3.21, dpmpp_2m 1.95-1.99, dpmpp_3m 2.11-2.27,
# unipc 2.26-2.50; the multistep solvers' first, order-1 step limits their global order to 2,
# and DPM-Solver-fast's last, order-1 step does the same).
ORDER = {'ddim': (0.9, 40), 'heun': (1.9, 40), 'dpm_solver': (1.7, 48), 'dpmpp_2m': (1.85, 40),
         'dpmpp_3m': (2.0, 40), 'unipc': (2.0, 40)}
# Relative RMS error at n_steps = 20 (logsnr grid), at most (measured: ddim 0.064-0.11,
# heun 0.014-0.052, dpm_solver 0.0027-0.014, dpmpp_2m 0.0059-0.017, dpmpp_3m 0.0030-0.015,
# unipc 0.00005-0.0034).
ERROR_AT_20 = {'ddim': 0.15, 'heun': 0.08, 'dpm_solver': 0.03, 'dpmpp_2m': 0.03,
               'dpmpp_3m': 0.03, 'unipc': 0.01}


def _flow_map_error(sde, eps, solver, n_steps, schedule='logsnr'):
  g = gu.diag_gaussian(8, seed=1)
  z = sde.prior_sampling(jax.random.PRNGKey(0), (256, 8)).astype(jnp.result_type(float))
  want = gu.gaussian_flow_map(g, sde, np.asarray(z), sde.T, eps)
  x, _ = sampling.fast_sample(jax.random.PRNGKey(1), sde, gu.score_fn(g, sde), z.shape,
                              solver=solver, n_steps=n_steps, eps=eps, z=z, schedule=schedule)
  return np.sqrt(np.mean((np.asarray(x, np.float64) - want) ** 2)) / np.sqrt(np.mean(want ** 2))


@pytest.mark.parametrize('sde_name', ['ve', 'vp', 'subvp'])
def test_deterministic_solvers_converge_to_the_flow_map_with_their_order(sde_name):
  sde, eps = gu.make_sde(sde_name)
  with jax.enable_x64(True):
    for solver in DETERMINISTIC:
      min_order, n = ORDER[solver]
      errors = [_flow_map_error(sde, eps, solver, n_steps) for n_steps in (20, n, 2 * n)]
      assert errors[0] < ERROR_AT_20[solver], (solver, errors)
      assert np.log2(errors[1] / errors[2]) > min_order, (solver, errors)


def test_dpmpp_2m_sde_without_noise_is_dpmpp_2m():
  sde, eps = gu.make_sde('vp')
  score_fn, z = gu.score_fn(RING, sde), jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  run = lambda solver, **kw: sampling.fast_sample(jax.random.PRNGKey(1), sde, score_fn, z.shape,
                                                  solver=solver, n_steps=8, eps=eps, z=z, **kw)[0]
  np.testing.assert_allclose(run('dpmpp_2m_sde', eta=0.), run('dpmpp_2m'), rtol=1e-5, atol=1e-5)
  assert not np.allclose(run('dpmpp_2m_sde'), run('dpmpp_2m'), atol=1e-3)  # eta = 1 by default


@pytest.mark.parametrize('schedule', ['logsnr', 'time_uniform', 'time_quadratic', 'karras'])
def test_every_schedule_converges(schedule):
  """Slowest on time_uniform, whose last step spans most of the log-SNR range for VP (measured
  relative errors at 20 / 80 steps: 0.19 / 0.031; logsnr 0.020 / 0.0014)."""
  sde, eps = gu.make_sde('vp')
  errors = [_flow_map_error(sde, eps, 'dpmpp_2m', n, schedule) for n in (20, 80)]
  assert errors[1] < 0.4 * errors[0] and errors[1] < 0.05, errors


RING_CASES = [  # (solver, n_steps, keywords, SDE): each solver on one SDE, all SDEs covered
    ('ddim', 30, {}, 've'), ('dpm_solver', 30, {}, 'vp'), ('dpmpp_2m', 30, {}, 'subvp'),
    ('dpmpp_3m', 30, {}, 've'), ('unipc', 30, {}, 'subvp'),
    ('heun', 15, {'schedule': 'karras'}, 'vp'), ('ddim', 50, {'eta': 1.}, 'subvp'),
    ('dpmpp_2m_sde', 50, {}, 'vp')]


@pytest.mark.parametrize('solver,n_steps,kw,sde_name', RING_CASES)
def test_every_solver_reproduces_the_ring(solver, n_steps, kw, sde_name):
  """Deterministic solvers at 30 steps, stochastic ones (DDIM with eta = 1, i.e. ancestral, and
  SDE-DPM-Solver++(2M)) at 50, on the logsnr grid; EDM Heun at 15 steps (29 NFE) on its own karras
  grid (on logsnr it needs 25 for sub-VP: measured variance error 13% at 15). Every pair passed on
  all three SDEs when written; the flow-map test covers every solver on every SDE."""
  sde, eps = gu.make_sde(sde_name)
  x, _ = sampling.fast_sample(jax.random.PRNGKey(0), sde, gu.score_fn(RING, sde), (N_SAMPLES, 2),
                              solver=solver, n_steps=n_steps, eps=eps, **kw)
  _check_ring(np.asarray(x))


@pytest.mark.parametrize('solver', sorted(fast_solvers.SOLVERS.names()))
def test_nfe_counts_every_score_evaluation(solver):
  sde, eps = gu.make_sde('vp')
  for n_steps, denoise in ((1, False), (6, True)):  # DPM-Solver-fast orders [1] and [3, 2, 1]
    calls = []

    def counting_score(x, t):
      jax.debug.callback(lambda: calls.append(1))
      return gu.score_fn(RING, sde)(x, t)

    x, nfe = sampling.fast_sample(jax.random.PRNGKey(0), sde, counting_score, (16, 2), solver=solver,
                                  n_steps=n_steps, eps=eps, denoise=denoise)
    x.block_until_ready()
    jax.effects_barrier()
    assert nfe == len(calls), (solver, n_steps, denoise, nfe, len(calls))
    want = (2 * n_steps - 1 if solver == 'heun' else n_steps) + denoise
    assert nfe == want


def test_denoise_is_the_tweedie_x0_prediction():
  sde, eps = gu.make_sde('vp')
  score_fn, z = gu.score_fn(RING, sde), jax.random.normal(jax.random.PRNGKey(0), (64, 2))
  kw = dict(solver='dpmpp_2m', n_steps=6, eps=eps, z=z)
  x, _ = sampling.fast_sample(jax.random.PRNGKey(1), sde, score_fn, z.shape, **kw)
  x0, _ = sampling.fast_sample(jax.random.PRNGKey(1), sde, score_fn, z.shape, denoise=True, **kw)
  a, s = (float(v[0]) for v in sde.marginal_coeffs(jnp.full((1,), eps)))
  t = jnp.full((64,), eps)
  np.testing.assert_allclose(x0, (x + s ** 2 * score_fn(x, t)) / a, rtol=1e-5, atol=1e-6)


def test_time_grids():
  sde, eps = gu.make_sde('vp')
  for schedule in sampling.TIME_SCHEDULES.names():
    grid = np.asarray(sampling.time_grid(sde, 12, eps, schedule))
    assert grid.shape == (13,) and grid[0] == sde.T and np.isclose(grid[-1], eps)
    assert np.all(np.diff(grid) < 0), schedule
  lam = np.asarray(sde.log_snr(sampling.time_grid(sde, 12, eps, 'logsnr')))
  np.testing.assert_allclose(np.diff(lam), np.diff(lam)[0], rtol=1e-4)
  s_tilde = np.exp(-np.asarray(sde.log_snr(sampling.time_grid(sde, 12, eps, 'karras'))))
  ramp = s_tilde ** (1 / 7)
  np.testing.assert_allclose(np.diff(ramp), np.diff(ramp)[0], rtol=1e-3)  # EDM eq. 5, rho = 7
  np.testing.assert_allclose(np.sqrt(np.asarray(sampling.time_grid(sde, 12, eps, 'time_quadratic'))),
                             np.linspace(1., np.sqrt(eps), 13), rtol=1e-6)


def test_fast_sample_is_one_jitted_program_and_deterministic():
  sde, eps = gu.make_sde('ve')
  score_fn = gu.score_fn(RING, sde)
  run = jax.jit(lambda rng: sampling.fast_sample(rng, sde, score_fn, (16, 2), solver='dpmpp_2m_sde',
                                                 n_steps=5, eps=eps)[0])
  a, b = run(jax.random.PRNGKey(4)), run(jax.random.PRNGKey(4))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, run(jax.random.PRNGKey(5)))


def test_bad_input():
  sde, eps = gu.make_sde('vp')
  score_fn, rng = gu.score_fn(RING, sde), jax.random.PRNGKey(0)
  run = lambda **kw: sampling.fast_sample(rng, sde, score_fn, (4, 2), **kw)
  with pytest.raises(ValueError, match=r"fast solver 'euler'.*ddim.*dpm_solver.*unipc"):
    run(solver='euler')
  with pytest.raises(ValueError, match=r"time schedule 'cosine'.*karras.*logsnr"):
    run(schedule='cosine')
  for n in (0, -3, 2.5, True):
    with pytest.raises(ValueError, match='n_steps must be a positive integer'):
      run(n_steps=n)
  for e in (0., 1., -1e-3, 2.):
    with pytest.raises(ValueError, match=r'eps must lie in \(0, T\)'):
      run(eps=e)
  with pytest.raises(ValueError, match=r'eta .* must be >= 0, got -0.5'):
    run(solver='ddim', eta=-0.5)
  with pytest.raises(ValueError, match=r"'dpmpp_2m' is deterministic.*\['ddim', 'dpmpp_2m_sde'\]"):
    run(solver='dpmpp_2m', eta=0.5)
  with pytest.raises(ValueError, match=r"eta must lie in \[0, 1.0\] for 'ddim', got 2.0"):
    run(solver='ddim', eta=2.)
  with pytest.raises(ValueError, match='z has shape'):
    run(z=jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match='n_steps'):
    sampling.time_grid(sde, 0, eps)


@pytest.mark.parametrize('sde_name', ['vesde', 'vpsde'])
def test_config_path_runs_a_fast_solver(sde_name):
  """config.sampling.method names a solver; the network's score (get_score_fn) drives it."""
  import sde_lib
  from models import utils as mutils
  from tests.test_likelihood import _config  # registers the exact-mixture network
  config = _config(sde_name, 'unipc')
  config.sampling.update(n_steps=20, schedule='logsnr', eta=None)
  sde, eps = sde_lib.get_sde(config)
  model, params, state = mutils.init_model(jax.random.PRNGKey(0), config)
  x, nfe = sampling.get_sampling_fn(config, sde, model, (N_SAMPLES, 2), lambda v: v, eps)(
      jax.random.PRNGKey(1), params, state)
  assert int(nfe) == 21  # 20 steps and noise_removal's final denoising step
  _check_ring(np.asarray(x))
