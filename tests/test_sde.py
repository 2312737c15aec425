"""SDE facts: marginals, discretizations, priors and reverse-time drifts against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import sde_lib
from registry import Registry

T = jnp.array([1e-5, 1e-3, 0.1, 0.5, 0.999, 1.0])


def _vp_mean_coeff(t, b0=0.1, b1=20.):
  return np.exp(-0.25 * t ** 2 * (b1 - b0) - 0.5 * t * b0)


@pytest.mark.parametrize('cls', [sde_lib.VPSDE, sde_lib.subVPSDE])
def test_vp_family_marginals(cls):
  sde = cls(0.1, 20., 1000)
  x = jnp.ones((len(T), 3))
  mean, std = sde.marginal_prob(x, T)
  t = np.asarray(T, np.float64)
  a = _vp_mean_coeff(t)
  np.testing.assert_allclose(mean[:, 0], a, rtol=1e-6)
  want = np.sqrt(1 - a ** 2) if cls is sde_lib.VPSDE else 1 - a ** 2
  # expm1 keeps float32 precision near t = 0 (the naive form loses ~1% at t = 1e-5).
  np.testing.assert_allclose(std, want, rtol=1e-5)


def test_ve_marginals_and_diffusion():
  sde = sde_lib.VESDE(0.01, 50., 1000)
  x = jnp.full((len(T), 2), 3.)
  mean, std = sde.marginal_prob(x, T)
  t = np.asarray(T, np.float64)
  np.testing.assert_allclose(mean, x)
  np.testing.assert_allclose(std, 0.01 * 5000 ** t, rtol=1e-5)
  drift, g = sde.sde(x, T)
  np.testing.assert_allclose(drift, 0)
  np.testing.assert_allclose(g, 0.01 * 5000 ** t * np.sqrt(2 * np.log(5000)), rtol=1e-5)


def test_vp_and_subvp_drift_diffusion():
  x = jnp.arange(len(T) * 2, dtype=jnp.float32).reshape(len(T), 2)
  t = np.asarray(T, np.float64)
  beta = 0.1 + t * 19.9
  for cls in (sde_lib.VPSDE, sde_lib.subVPSDE):
    drift, g = cls().sde(x, T)
    np.testing.assert_allclose(drift, -0.5 * beta[:, None] * np.asarray(x), rtol=1e-5)
    want = np.sqrt(beta) if cls is sde_lib.VPSDE else np.sqrt(
        beta * (1 - np.exp(-2 * 0.1 * t - 19.9 * t ** 2)))
    np.testing.assert_allclose(g, want, rtol=1e-4)


def test_subvp_std_matches_its_sde():
  """sub-VP std(t) solves d var/dt = -beta var + g^2 with var(0) = 0 (numerically integrated)."""
  sde = sde_lib.subVPSDE()
  ts = np.linspace(0, 1, 200001)
  beta = 0.1 + ts * 19.9
  g2 = beta * (1 - np.exp(-2 * 0.1 * ts - 19.9 * ts ** 2))
  var = np.zeros_like(ts)
  dt = ts[1] - ts[0]
  for i in range(len(ts) - 1):  # Heun on the linear ODE of the variance
    k1 = -beta[i] * var[i] + g2[i]
    k2 = -beta[i + 1] * (var[i] + dt * k1) + g2[i + 1]
    var[i + 1] = var[i] + dt * (k1 + k2) / 2
  idx = [20000, 100000, 200000]
  std = np.asarray(sde.marginal_coeffs(jnp.asarray(ts[idx], jnp.float32))[1])
  np.testing.assert_allclose(std ** 2, var[idx], rtol=1e-3)


def test_ddpm_discretization():
  sde = sde_lib.VPSDE(0.1, 20., 1000)
  betas = np.linspace(0.1 / 1000, 20. / 1000, 1000)
  np.testing.assert_allclose(sde.discrete_betas, betas)
  x = jnp.full((3, 4), 2.)
  t = jnp.array([0., 0.5, 1.])
  f, G = sde.discretize(x, t)
  i = (np.asarray(t) * 999).astype(int)
  np.testing.assert_allclose(np.asarray(x) + np.asarray(f), np.broadcast_to(np.sqrt(1 - betas[i])[:, None] * 2., (3, 4)), rtol=1e-6)
  np.testing.assert_allclose(G, np.sqrt(betas[i]), rtol=1e-6)
  # The chain's cumulative product approximates the continuous mean coefficient: log(1 - b) =
  # -b - b^2/2 - ..., so log a_chain - log a(1) lies in [-sum(b^2), 0] (the Riemann sum of the
  # linear beta over the N+1-point grid is exact here).
  gap = np.log(sde.sqrt_alphas_cumprod[-1]) - np.log(_vp_mean_coeff(1.0))
  assert -np.sum(betas ** 2) <= gap <= 0


def test_smld_discretization():
  sde = sde_lib.VESDE(0.01, 50., 10)
  sigmas = np.exp(np.linspace(np.log(0.01), np.log(50.), 10))
  np.testing.assert_allclose(sde.discrete_sigmas, sigmas, rtol=1e-12)
  x = jnp.ones((3, 2))
  t = jnp.array([0., 5 / 9, 1.])
  f, G = sde.discretize(x, t)
  np.testing.assert_allclose(f, 0)
  i = np.array([0, 5, 9])
  prev = np.where(i == 0, 0., sigmas[np.maximum(i - 1, 0)])
  np.testing.assert_allclose(G, np.sqrt(sigmas[i] ** 2 - prev ** 2), rtol=1e-5)


def test_subvp_discretize_is_euler_maruyama():
  sde = sde_lib.subVPSDE(0.1, 20., 100)
  x = jnp.ones((2, 3))
  t = jnp.array([0.3, 0.7])
  f, G = sde.discretize(x, t)
  drift, g = sde.sde(x, t)
  np.testing.assert_allclose(f, drift / 100, rtol=1e-6)
  np.testing.assert_allclose(G, g * 0.1, rtol=1e-6)


@pytest.mark.parametrize('sde,var', [(sde_lib.VPSDE(), 1.), (sde_lib.subVPSDE(), 1.),
                                     (sde_lib.VESDE(0.01, 50.), 2500.)])
def test_prior_logp_and_sampling(sde, var):
  z = sde.prior_sampling(jax.random.PRNGKey(0), (4000, 3, 2, 2))
  np.testing.assert_allclose(np.var(np.asarray(z)), var, rtol=0.05)
  want = scipy.stats.norm(0, np.sqrt(var)).logpdf(np.asarray(z[:5], np.float64)).reshape(5, -1).sum(-1)
  np.testing.assert_allclose(sde.prior_logp(z[:5]), want, rtol=1e-5)


@pytest.mark.parametrize('sde', [sde_lib.VPSDE(), sde_lib.subVPSDE(), sde_lib.VESDE()])
@pytest.mark.parametrize('probability_flow', [False, True])
def test_reverse_drift(sde, probability_flow):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5))
  t = jnp.array([0.1, 0.5, 0.9])
  score = lambda x, t: -x * t[:, None] + 1.
  rsde = sde.reverse(score, probability_flow)
  drift, diffusion = rsde.sde(x, t)
  f, g = sde.sde(x, t)
  w = 0.5 if probability_flow else 1.
  np.testing.assert_allclose(drift, f - w * g[:, None] ** 2 * score(x, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(diffusion, 0. if probability_flow else g, rtol=1e-6)
  rev_f, rev_G = rsde.discretize(x, t)
  fd, Gd = sde.discretize(x, t)
  np.testing.assert_allclose(rev_f, fd - w * Gd[:, None] ** 2 * score(x, t), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(rev_G, 0. if probability_flow else Gd, rtol=1e-6)


def test_get_sde_and_bad_input():
  import ml_collections
  cfg = ml_collections.ConfigDict({'training': {'sde': 'vpsde'}, 'model': {
      'sigma_min': 0.01, 'sigma_max': 50., 'num_scales': 100, 'beta_min': 0.1, 'beta_max': 20.}})
  sde, eps = sde_lib.get_sde(cfg)
  assert isinstance(sde, sde_lib.VPSDE) and sde.N == 100 and eps == 1e-3
  cfg.training.sde = 'vesde'
  sde, eps = sde_lib.get_sde(cfg)
  assert isinstance(sde, sde_lib.VESDE) and eps == 1e-5
  cfg.training.sde = 'bogus'
  with pytest.raises(ValueError, match=r"'bogus'.*subvpsde.*vesde.*vpsde"):
    sde_lib.get_sde(cfg)
  with pytest.raises(ValueError, match='sigma_max'):
    sde_lib.VESDE(sigma_min=1., sigma_max=0.5)
  with pytest.raises(ValueError, match='N'):
    sde_lib.VPSDE(N=0)
  with pytest.raises(ValueError, match='beta_min'):
    sde_lib.VPSDE(beta_min=-1.)


def test_registry_errors_list_names():
  reg = Registry('widget')
  reg.register(lambda: 1, name='a')

  @reg.register
  def b():
    return 2

  assert reg.names() == ('a', 'b') and reg.get('b') is b
  with pytest.raises(ValueError, match=r"Unknown widget 'c'; valid choices: \('a', 'b'\)"):
    reg.get('c')


# ------------------------------------------------------------------------------------------------
# The Gaussian view x_t = alpha_t x_0 + sigma_t eps and the network parametrization.

TS = np.array([1e-5, 1e-3, 0.1, 0.5, 0.999, 1.0])


def _ref_alpha_sigma(name, t):
  """alpha_t, sigma_t in float64 from DESIGN.md's definitions."""
  if name == 've':
    return np.ones_like(t), 0.01 * 5000. ** t
  big_b = 0.1 * t + 0.5 * 19.9 * t ** 2
  alpha = np.exp(-big_b / 2)
  return alpha, (np.sqrt(-np.expm1(-big_b)) if name == 'vp' else -np.expm1(-big_b))


@pytest.mark.parametrize('name,sde', [('ve', sde_lib.VESDE(0.01, 50.)), ('vp', sde_lib.VPSDE()),
                                      ('subvp', sde_lib.subVPSDE())])
def test_alpha_sigma_log_snr_and_inverse(name, sde):
  alpha, sigma = _ref_alpha_sigma(name, TS)
  t = jnp.asarray(TS, jnp.float32)
  np.testing.assert_allclose(sde.alpha(t), alpha, rtol=1e-5)
  np.testing.assert_allclose(sde.sigma(t), sigma, rtol=1e-5)
  np.testing.assert_allclose(sde.log_snr(t), np.log(alpha / sigma), rtol=1e-5, atol=1e-5)
  # The closed-form inverse, relative precision kept down to t = 1e-5 for VP / sub-VP (lambda ~
  # -log(t) / 2 there); VE's lambda is linear in t, so float32 lambda fixes t to ~3e-8 absolute.
  np.testing.assert_allclose(sde.t_from_log_snr(jnp.asarray(np.log(alpha / sigma), jnp.float32)), TS,
                             rtol=1e-4, atol=1e-7 if name == 've' else 0.)
  lam = jnp.linspace(-8., 12., 41)
  np.testing.assert_allclose(sde.log_snr(sde.t_from_log_snr(lam)), lam, rtol=1e-4, atol=2e-4)


def test_discrete_models_get_the_integer_label_of_their_level():
  """A DDPM model sampled at t = 0.5005 sees label 499, the index whose coefficients the step
  uses (it used to see 499.5); an NCSN model sees the index of its descending noise levels."""
  vp, ve = sde_lib.VPSDE(N=1000), sde_lib.VESDE(N=1000)
  t = jnp.array([0.5005, 1.0, 1e-3])
  np.testing.assert_array_equal(vp.network_labels(t, continuous=False), [499, 999, 0])
  np.testing.assert_array_equal(vp.timestep_index(t), [499, 999, 0])
  np.testing.assert_allclose(vp.network_std(t, continuous=False),
                             vp.sqrt_1m_alphas_cumprod[[499, 999, 0]], rtol=1e-6)
  np.testing.assert_array_equal(ve.network_labels(t, continuous=False), [500, 0, 999])
  sigmas_desc = ve.discrete_sigmas[::-1]
  _, g = ve.discretize(jnp.zeros((3, 1)), t)  # the SMLD step at the same level
  np.testing.assert_allclose(g, np.sqrt(sigmas_desc[[500, 0, 999]] ** 2 - np.r_[
      sigmas_desc[501], sigmas_desc[1], 0.] ** 2), rtol=1e-5)
  # Every time of the PC grid maps to its own level, N-1 .. 0, once each.
  grid = jnp.linspace(1., 1e-3, 1000)
  np.testing.assert_array_equal(vp.network_labels(grid, continuous=False), np.arange(999, -1, -1))
  # Continuous labels: t * 999 for VP / sub-VP, sigma(t) for VE.
  np.testing.assert_allclose(vp.network_labels(t, continuous=True), t * 999, rtol=1e-6)
  np.testing.assert_allclose(ve.network_labels(t, continuous=True), ve.sigma(t), rtol=1e-6)
  # sub-VP has no discrete chain: its networks always see t * 999 and sigma_t.
  sub = sde_lib.subVPSDE()
  np.testing.assert_allclose(sub.network_labels(t, continuous=False), t * 999, rtol=1e-6)
  np.testing.assert_allclose(sub.network_std(t, continuous=False), sub.sigma(t), rtol=1e-6)


def test_score_from_output():
  out, std = jnp.ones((2, 3)), jnp.array([0.5, 2.])
  np.testing.assert_allclose(sde_lib.VPSDE().score_from_output(out, std), -out / std[:, None])
  np.testing.assert_allclose(sde_lib.VESDE().score_from_output(out, std), out)


def test_check_time():
  sde = sde_lib.VPSDE()
  assert sde.check_time(0.5) == 0.5
  for bad in (0., 1., -1., float('nan'), 'x', None):
    with pytest.raises(ValueError, match=r'eps must lie in \(0, T\) = \(0, 1.0\)'):
      sde.check_time(bad)
