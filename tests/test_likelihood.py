"""Probability-flow likelihoods against exact mixture log-densities; bits/dim by hand."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import likelihood
import mixtures
import sampling
from models import utils as mutils
from tests import gmm_utils as gu

RING = mixtures.ring2d()
GMM8 = mixtures.gmm_nd(dim=8, n_modes=3, seed=2)


def _exact_model_logp(g, sde, x, z, eps):
  """Exact log-density of the ODE model: log p_eps(x) corrected for the prior p_T standing in for
  the true marginal at T (log prior(z) - log p_T(z)), so that only the integration is tested."""
  t = lambda v: jnp.full((x.shape[0],), v)
  return (gu.log_prob_fn(g, sde)(x, t(eps)) + sde.prior_logp(z) - gu.log_prob_fn(g, sde)(z, t(sde.T)))


@pytest.mark.parametrize('sde_name', ['ve', 'vp', 'subvp'])
@pytest.mark.parametrize('g', [RING, GMM8], ids=['ring2d', 'gmm8d'])
def test_exact_trace_matches_exact_log_density(sde_name, g):
  sde, _ = gu.make_sde(sde_name)
  x = g.sample(jax.random.PRNGKey(1), 128)
  eps = 1e-5
  logp, z, nfe = likelihood.log_likelihood(jax.random.PRNGKey(2), sde, gu.score_fn(g, sde), x,
                                           trace='exact', eps=eps)
  per_dim = np.abs(np.asarray(logp - _exact_model_logp(g, sde, x, z, eps))) / g.dim
  # The default solver (dopri5) at rtol = atol = 1e-5: worst example ~3e-3 nats/dim, mean ~4e-5
  # (tsit5: 8e-4 and 1e-5); a wrong divergence or drift would be off by O(1).
  assert per_dim.max() < 5e-3 and per_dim.mean() < 1e-4, (per_dim.max(), per_dim.mean())
  assert 10 < int(nfe) < 500
  if sde_name == 'vp' and g is RING:
    # VP's p_T is N(a(1) mean, ~I) with a(1) = 0.0066; for zero-mean data (the ring) the prior's
    # mismatch is O(a(1)^2), so the plain model log-density matches the data's log p_0 too.
    err = np.abs(np.asarray(logp - g.log_prob(x))) / g.dim
    assert err.max() < 5e-3 and err.mean() < 5e-4


@pytest.mark.parametrize('trace', ['rademacher', 'gaussian'])
def test_hutchinson_is_unbiased(trace):
  """Over R independent probes the mean estimate is within 5 standard errors of the exact value."""
  sde, _ = gu.make_sde('vp')
  points = np.asarray(GMM8.sample(jax.random.PRNGKey(3), 4))
  reps = 128
  x = jnp.asarray(np.repeat(points, reps, axis=0))  # each point with `reps` independent probes
  score_fn = gu.score_fn(GMM8, sde)
  exact, _, _ = likelihood.log_likelihood(jax.random.PRNGKey(0), sde, score_fn, jnp.asarray(points),
                                          trace='exact')
  est, _, _ = likelihood.log_likelihood(jax.random.PRNGKey(4), sde, score_fn, x, trace=trace)
  est = np.asarray(est).reshape(4, reps)
  se = est.std(1, ddof=1) / np.sqrt(reps)
  assert np.all(est.std(1) > 1e-3)  # the estimator is really stochastic
  assert np.all(np.abs(est.mean(1) - np.asarray(exact)) < 5 * se + 1e-3), (est.mean(1), exact, se)
  # Averaging n probes divides the variance by n (within sampling error of the variances).
  est4, _, _ = likelihood.log_likelihood(jax.random.PRNGKey(5), sde, score_fn, x, trace=trace, n_probes=4)
  ratio = np.asarray(est).reshape(4, reps).var(1).mean() / np.asarray(est4).reshape(4, reps).var(1).mean()
  assert 2.5 < ratio < 6.5, ratio


@pytest.mark.parametrize('n_probes,trace', [(1, 'rademacher'), (4, 'gaussian'), (1, 'exact')])
def test_one_score_evaluation_per_function_evaluation(n_probes, trace):
  sde, _ = gu.make_sde('subvp')
  calls = []

  def counting_score(x, t):
    jax.debug.callback(lambda: calls.append(1))
    return gu.score_fn(RING, sde)(x, t)

  x = RING.sample(jax.random.PRNGKey(0), 32)
  _, _, nfe = likelihood.log_likelihood(jax.random.PRNGKey(1), sde, counting_score, x, trace=trace,
                                        n_probes=n_probes, rtol=1e-4, atol=1e-4)
  jax.effects_barrier()
  assert int(nfe) == len(calls)


def test_bits_per_dim_by_hand():
  shape = (2, 3, 8, 8)  # D = 192
  logp = jnp.array([-100., 0.])
  want01 = np.array([100 / (192 * np.log(2)) + 8, 8.])
  np.testing.assert_allclose(likelihood.bits_per_dim(logp, shape, n_bits=8), want01, rtol=1e-6)
  np.testing.assert_allclose(likelihood.bits_per_dim(logp, shape, data_scaler=lambda v: 2 * v - 1),
                             want01 - 1, rtol=1e-6)
  assert likelihood.bpd_offset(8) == 8. and likelihood.bpd_offset(8, lambda v: 2 * v - 1) == 7.
  assert likelihood.bpd_offset(5) == 5.
  # A uniform density is the uniform code: 8 bits/dim on [0,1]^D (log p = 0) and on [-1,1]^D
  # (log p = -D log 2) alike.
  np.testing.assert_allclose(likelihood.bits_per_dim(jnp.zeros(1), shape), 8.)
  np.testing.assert_allclose(
      likelihood.bits_per_dim(jnp.full((1,), -192 * np.log(2)), shape, data_scaler=lambda v: 2 * v - 1), 8.,
      rtol=1e-6)
  with pytest.warns(UserWarning, match='dequantized'):
    likelihood.bits_per_dim(logp, shape, dequantized=False)


def test_bad_input():
  sde, _ = gu.make_sde('vp')
  score_fn, x, rng = gu.score_fn(RING, sde), jnp.zeros((4, 2)), jax.random.PRNGKey(0)
  with pytest.raises(ValueError, match=r"trace estimator 'hutch'.*rademacher.*gaussian.*exact"):
    likelihood.log_likelihood(rng, sde, score_fn, x, trace='hutch')
  for bad in (0., -1e-5):
    with pytest.raises(ValueError, match='rtol'):
      likelihood.log_likelihood(rng, sde, score_fn, x, rtol=bad)
    with pytest.raises(ValueError, match='atol'):
      likelihood.log_likelihood(rng, sde, score_fn, x, atol=bad)
  for eps in (0., 1., 1.5, -0.1):
    with pytest.raises(ValueError, match=r'eps must lie in \(0, T\)'):
      likelihood.log_likelihood(rng, sde, score_fn, x, eps=eps)
  with pytest.raises(ValueError, match='n_probes'):
    likelihood.log_likelihood(rng, sde, score_fn, x, n_probes=0)
  with pytest.raises(ValueError, match='n_bits'):
    likelihood.bpd_offset(0)


def test_non_finite_data_and_unfinished_solves_are_named():
  """inf in the data is refused before any solve (it used to run the solver to max_steps and die
  in a raw runtime error inside jit); a solve that does hit max_steps says so in our words."""
  import ode
  sde, eps = gu.make_sde('vp')
  score_fn, rng = gu.score_fn(RING, sde), jax.random.PRNGKey(0)
  x = jnp.zeros((4, 2)).at[1, 0].set(jnp.inf)
  with pytest.raises(ValueError, match=r'non-finite values .* in examples \[1\]'):
    likelihood.log_likelihood(rng, sde, score_fn, x)
  with pytest.raises(ode.ODESolveError, match=r'log-likelihood \(dopri5, rtol=1e-05, atol=1e-05\).*'
                     r'all max_steps=3 steps.*raise max_steps or loosen rtol / atol'):
    likelihood.log_likelihood(rng, sde, score_fn, jnp.ones((4, 2)), max_steps=3)
  nan_score = lambda x, t: jnp.full_like(x, jnp.nan)
  with pytest.raises(ode.ODESolveError, match='sampling .*Check that the input and the score are finite'):
    sampling.ode_sample(rng, sde, nan_score, (4, 2), eps=eps, max_steps=16)
  with pytest.raises(ode.ODESolveError, match='encoding'):
    sampling.ode_encode(sde, nan_score, jnp.ones((4, 2)), eps=eps, max_steps=16)
  # Inside an outer jit nothing can be raised: the failed solve's output is NaN, never a number.
  x, _ = jax.jit(lambda r: sampling.ode_sample(r, sde, score_fn, (4, 2), eps=eps, max_steps=3))(rng)
  assert np.isnan(np.asarray(x)).all()


# ---- The config path: a "network" whose output is exactly the mixture's noise / score ----

@mutils.register_model(name='test_exact_mixture')
class ExactMixtureNet(nn.Module):
  """Outputs what a perfectly trained network would: -std(t) score (VP) or the score (VE)."""
  config: ml_collections.ConfigDict

  @nn.compact
  def __call__(self, x, labels, train: bool = False):
    self.param('unused', nn.initializers.zeros, (1,))
    import sde_lib
    sde, _ = sde_lib.get_sde(self.config)
    if isinstance(sde, sde_lib.VESDE):  # continuous VE labels are sigma(t)
      t = jnp.log(labels / sde.sigma_min) / np.log(sde.sigma_max / sde.sigma_min)
      return gu.score_fn(RING, sde)(x, t)
    t = labels / 999.
    return -sde.marginal_coeffs(t)[1][:, None] * gu.score_fn(RING, sde)(x, t)


def _config(sde_name, method):
  c = ml_collections.ConfigDict()
  c.training = dict(sde=sde_name, continuous=True)
  c.model = dict(name='test_exact_mixture', sigma_min=0.01, sigma_max=20., num_scales=1000, beta_min=0.1,
                 beta_max=20.)
  c.data = dict(dataset='ring2d', dim=2, centered=False)
  c.sampling = dict(method=method, predictor='reverse_diffusion', corrector='langevin', snr=0.16,
                    n_steps_each=1, probability_flow=False, noise_removal=True, rtol=1e-5, atol=1e-5,
                    ode_solver='tsit5')
  c.eval = dict(rtol=1e-5, atol=1e-5)
  return c


@pytest.mark.parametrize('sde_name', ['vesde', 'vpsde'])
def test_config_path_through_get_score_fn(sde_name):
  """get_score_fn's scaling (noise -> score for VP, sigma labels for VE) feeds the samplers and the
  likelihood exactly: samples reproduce the ring, bits/dim equal the exact value."""
  import sde_lib
  config = _config(sde_name, 'ode')
  sde, eps = sde_lib.get_sde(config)
  model, params, state = mutils.init_model(jax.random.PRNGKey(0), config)
  sampling_fn = sampling.get_sampling_fn(config, sde, model, (2000, 2), lambda v: v, eps)
  x, nfe = sampling_fn(jax.random.PRNGKey(1), params, state)
  gu.check_moments(np.asarray(x), RING, n_se=5., rel_bias=0.03)
  assert int(nfe) > 10
  config.sampling.method = 'pc'
  x, nfe = sampling.get_sampling_fn(config, sde, model, (2000, 2), lambda v: v, eps)(
      jax.random.PRNGKey(1), params, state)
  gu.check_moments(np.asarray(x), RING, n_se=5., rel_bias=0.03)
  assert int(nfe) == 2 * sde.N
  likelihood_fn = likelihood.get_likelihood_fn(config, sde, model, trace='exact')
  data = RING.sample(jax.random.PRNGKey(2), 64)
  bpd, z, _ = likelihood_fn(jax.random.PRNGKey(3), params, data, state)
  want = -_exact_model_logp(RING, sde, data, z, 1e-5) / (2 * np.log(2))
  np.testing.assert_allclose(np.asarray(bpd), np.asarray(want), atol=2e-3)
  config.sampling.method = 'bogus'
  with pytest.raises(ValueError, match=r"sampling method 'bogus'.*'pc', 'ode'"):
    sampling.get_sampling_fn(config, sde, model, (4, 2), lambda v: v, eps)


def test_score_fn_rejects_mismatched_batch():
  import sde_lib
  config = _config('vpsde', 'pc')
  sde, _ = sde_lib.get_sde(config)
  model, params, state = mutils.init_model(jax.random.PRNGKey(0), config)
  score_fn = mutils.get_score_fn(sde, model, params, state, continuous=True)
  with pytest.raises(ValueError, match=r'x and t must share the batch size.*\(4, 2\).*\(3,\)'):
    score_fn(jnp.zeros((4, 2)), jnp.ones(3))
