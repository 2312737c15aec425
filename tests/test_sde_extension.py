"""Adding an SDE is one class: a VP SDE with a cosine schedule (Nichol & Dhariwal 2021), defined
only here, trains a step, samples with PC, the ODE and a fast solver, and computes likelihoods,
with no edit anywhere else. Against exact answers: the ring's closed-form score and density."""
import jax
import jax.numpy as jnp
import numpy as np

import likelihood
import losses
import training
import parallel
import sampling
import sde_lib
from configs import default_toy_configs
from models import utils as mutils
from tests import gmm_utils as gu
from tests.test_sampling import N_SAMPLES, RING, _check_ring

S, CAP = 0.008, 0.97  # Nichol & Dhariwal's offset s; the angle stops at 0.97 pi / 2 so alpha_T > 0


class CosineVPSDE(sde_lib.SDE):
  """alpha_t = cos(phi(t)) / cos(phi(0)), phi(t) = CAP (pi / 2) (t + s) / (1 + s); sigma_t =
  sqrt(1 - alpha_t^2). A VP SDE: f = (d log alpha / dt) x, g^2 = -2 d log alpha / dt."""
  dphi = CAP * np.pi / 2 / (1 + S)
  phi0 = CAP * np.pi / 2 * S / (1 + S)

  def _phi(self, t):
    return self.phi0 + self.dphi * t

  def sde(self, x, t):
    dlog_alpha = -self.dphi * jnp.tan(self._phi(t))
    return sde_lib.batch_mul(dlog_alpha, x), jnp.sqrt(-2. * dlog_alpha)

  def marginal_coeffs(self, t):
    # Clipped: under jit XLA may fold cos(phi(0)) and evaluate cos(phi(t)) with different
    # round-off, and alpha_0 a hair above 1 would make sigma_0 NaN.
    alpha = jnp.minimum(jnp.cos(self._phi(t)) / np.cos(self.phi0), 1.)
    return alpha, jnp.sqrt(1. - alpha ** 2)

  def t_from_log_snr(self, lam):
    alpha = jnp.sqrt(jax.nn.sigmoid(2. * lam))  # alpha^2 / (1 - alpha^2) = e^{2 lambda}
    return (jnp.arccos(alpha * np.cos(self.phi0)) - self.phi0) / self.dphi

  def prior_sampling(self, rng, shape):
    return jax.random.normal(rng, shape)

  def prior_logp(self, z):
    return sde_lib._gaussian_logp(z, 1.0)


SDE = CosineVPSDE(N=500)
EPS = 1e-3


def test_gaussian_view_is_consistent():
  t = jnp.array([1e-3, 0.1, 0.5, 0.9, 1.0])
  np.testing.assert_allclose(SDE.t_from_log_snr(SDE.log_snr(t)), t, rtol=1e-4, atol=1e-5)
  # The marginal variance solves d var / dt = 2 f' var + g^2 with var(0) = 0 (numerically).
  ts = np.linspace(0., 1., 20001)
  f_coef = np.asarray(SDE.sde(jnp.ones((len(ts), 1)), jnp.asarray(ts))[0][:, 0])
  g2 = np.asarray(SDE.sde(jnp.ones((len(ts), 1)), jnp.asarray(ts))[1]) ** 2
  var = np.zeros_like(ts)
  for i in range(len(ts) - 1):  # Heun's method on the variance ODE
    dt = ts[i + 1] - ts[i]
    k1 = 2 * f_coef[i] * var[i] + g2[i]
    k2 = 2 * f_coef[i + 1] * (var[i] + dt * k1) + g2[i + 1]
    var[i + 1] = var[i] + dt * (k1 + k2) / 2
  np.testing.assert_allclose(np.asarray(SDE.sigma(jnp.asarray(ts[::1000]))) ** 2, var[::1000],
                             atol=2e-4)


def test_it_trains_a_step():
  config = default_toy_configs.build('vpsde')
  config.training.batch_size = 64
  config.optim.warmup = 0  # the first update has the full learning rate
  mesh = parallel.make_mesh()
  model, state = training.init_train_state(jax.random.PRNGKey(0), config, mesh)
  train_step = training.get_train_step(config, SDE, model, training.get_optimizer(config), mesh=mesh)
  batch = parallel.shard_batch(mesh, {'image': np.asarray(RING.sample(jax.random.PRNGKey(1), 64))[None]},
                               leading_axes=1)
  before = [np.asarray(p) for p in jax.tree_util.tree_leaves(state.params)]
  new_state, step_losses = train_step(state, batch)
  assert np.isfinite(np.asarray(step_losses)).all() and int(new_state.step) == 1
  after = jax.tree_util.tree_leaves(new_state.params)
  assert all(not np.allclose(a, b) for a, b in zip(after, before))


def test_its_exact_score_minimizes_the_loss():
  x = RING.sample(jax.random.PRNGKey(0), 8192)
  exact = gu.score_fn(RING, SDE)
  loss = lambda fn: float(jnp.mean(losses.dsm_losses(jax.random.PRNGKey(5), SDE, fn, x, eps=EPS)))
  assert loss(exact) < min(loss(lambda x, t: 1.1 * exact(x, t)), loss(lambda x, t: 0.9 * exact(x, t)))


def test_it_samples_with_pc_ode_and_fast_solvers():
  score_fn = gu.score_fn(RING, SDE)
  rng = jax.random.PRNGKey(0)
  for predictor, corrector in (('reverse_diffusion', 'langevin'), ('ancestral_sampling', 'none')):
    x, nfe = sampling.pc_sample(rng, SDE, score_fn, (N_SAMPLES, 2), predictor=predictor,
                                corrector=corrector, eps=EPS)
    _check_ring(np.asarray(x))
  x, _ = sampling.ode_sample(rng, SDE, score_fn, (N_SAMPLES, 2), eps=EPS)
  _check_ring(np.asarray(x))
  x, nfe = sampling.fast_sample(rng, SDE, score_fn, (N_SAMPLES, 2), solver='dpmpp_2m', n_steps=20,
                                eps=EPS)
  assert nfe == 20
  _check_ring(np.asarray(x))


def test_its_likelihood_is_exact():
  x = RING.sample(jax.random.PRNGKey(1), 64)
  logp, z, _ = likelihood.log_likelihood(jax.random.PRNGKey(2), SDE, gu.score_fn(RING, SDE), x,
                                         trace='exact', eps=1e-5)
  t = lambda v: jnp.full((x.shape[0],), v)
  want = (gu.log_prob_fn(RING, SDE)(x, t(1e-5)) + SDE.prior_logp(z)
          - gu.log_prob_fn(RING, SDE)(z, t(SDE.T)))
  np.testing.assert_allclose(np.asarray(logp), np.asarray(want), atol=2e-3)  # 1e-3 per dim


def test_network_parametrization_defaults_to_noise_prediction():
  """A network under this SDE sees t * 999 and predicts the noise (score = -output / sigma_t)."""
  config = default_toy_configs.build('vpsde')
  model, params, state = mutils.init_model(jax.random.PRNGKey(0), config)
  score_fn = mutils.get_score_fn(SDE, model, params, state, continuous=True)
  x, t = RING.sample(jax.random.PRNGKey(3), 8), jnp.linspace(0.1, 0.9, 8)
  out = mutils.get_model_fn(model, params, state)(x, t * 999)
  np.testing.assert_allclose(score_fn(x, t), -out / SDE.sigma(t)[:, None], rtol=1e-5)
