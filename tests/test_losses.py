"""Losses, optimizer and train / eval steps, against closed-form mixture scores and numpy math.

Expected values never come from the code under test: the perturbation kernels a(t), std(t) and
g(t)^2 are re-derived here in numpy from the SDE definitions (DESIGN.md), and for a single
Gaussian the expected denoising score-matching loss of the exact score is an integral over t of
h(t) = mean_d a^2 s_d^2 / (a^2 s_d^2 + std^2), computed by quadrature (or a finite sum over the
discrete levels).
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy.integrate import cumulative_trapezoid, trapezoid

import losses

import training
import mixtures
import parallel
import sde_lib
from configs import default_toy_configs
from tests import gmm_utils

SDE_NAMES = ('ve', 'vp', 'subvp')


# ------------------------------------------------------------------------------------------------
# Independent numpy reference of the kernels (VE sigma 0.01..20, VP / sub-VP beta 0.1..20).


def ref_kernel(name: str, t: np.ndarray):
  """(a(t), std(t), g(t)^2) in float64, from the SDE definitions."""
  t = np.asarray(t, np.float64)
  if name == 've':
    smin, smax = 0.01, 20.
    std = smin * (smax / smin) ** t
    return np.ones_like(t), std, std ** 2 * 2 * np.log(smax / smin)
  big_b = 0.1 * t + 0.5 * (20. - 0.1) * t ** 2
  beta = 0.1 + t * (20. - 0.1)
  a = np.exp(-big_b / 2)
  if name == 'vp':
    return a, np.sqrt(-np.expm1(-big_b)), beta
  return a, -np.expm1(-big_b), beta * -np.expm1(-2 * big_b)


def gaussian_h(name: str, stds: np.ndarray, t: np.ndarray) -> np.ndarray:
  """E || std * exact_score + z ||^2 / D at time t for data N(mu, diag(stds^2))."""
  a, std, _ = ref_kernel(name, t)
  v = (a[:, None] * stds[None]) ** 2
  return np.mean(v / (v + std[:, None] ** 2), axis=1)


def expected_dsm(name: str, stds: np.ndarray, eps: float, weighted: bool) -> float:
  """(1 / (T - eps)) int_eps^T w(t) h(t) dt with w = 1 or g^2 / std^2 (reduce_mean=True)."""
  t = np.geomspace(eps, 1., 200001)
  _, std, g2 = ref_kernel(name, t)
  w = g2 / std ** 2 if weighted else 1.
  return trapezoid(w * gaussian_h(name, stds, t), t) / (1. - eps)


def agree(samples, expected: float, n_se: float = 4.):
  """Asserts a Monte Carlo mean within n_se standard errors of the expected value."""
  samples = np.asarray(samples, np.float64)
  mean, se = samples.mean(), samples.std() / np.sqrt(len(samples))
  assert abs(mean - expected) < n_se * se + 1e-5 * abs(expected), (mean, expected, se)
  return se


# ------------------------------------------------------------------------------------------------
# Continuous losses with the exact score


@pytest.mark.parametrize('name', SDE_NAMES)
def test_expected_dsm_loss_matches_quadrature(name):
  """Plain, half-sum, likelihood-weighted and importance-sampled estimates of the exact score's
  loss match the quadrature; importance sampling keeps the expectation and cuts the variance."""
  sde, _ = gmm_utils.make_sde(name)
  g = gmm_utils.diag_gaussian(3, seed=1)
  score_fn = mixtures.score_fn(g, sde)
  x = g.sample(jax.random.PRNGKey(0), 2 ** 16)
  variants = [dict(eps=1e-5), dict(eps=1e-5, reduce_mean=False),
              dict(eps=1e-3, likelihood_weighting=True),
              dict(eps=1e-3, likelihood_weighting=True, importance_sampling=True),
              dict(eps=1e-5, likelihood_weighting=True, importance_sampling=True)]
  est = jax.jit(lambda x: [losses.dsm_losses(jax.random.PRNGKey(1), sde, score_fn, x, **kw)
                           for kw in variants])(x)
  plain = expected_dsm(name, g.stds[0], 1e-5, False)
  agree(est[0], plain)
  agree(est[1], 1.5 * plain)  # reduce_mean=False is HALF the sum over dimensions (as the original)
  lw = expected_dsm(name, g.stds[0], 1e-3, True)
  se_plain = agree(est[2], lw)
  se_is = agree(est[3], lw)
  agree(est[4], expected_dsm(name, g.stds[0], 1e-5, True))
  if name != 've':  # VE's weight g^2 / sigma^2 is constant: importance sampling is uniform there
    assert se_is < 0.5 * se_plain


@pytest.mark.parametrize('name', SDE_NAMES)
def test_importance_times_follow_weight(name):
  """Sampled t follow r(t) ~ g^2 / std^2 on [eps, T] (Kolmogorov-Smirnov, p ~ 1e-3 bound)."""
  sde, _ = gmm_utils.make_sde(name)
  eps, n = 1e-5, 20000
  t, weight = losses.sample_importance_times(jax.random.PRNGKey(3), sde, n, eps)
  grid = np.geomspace(eps, 1., 200001)
  _, std, g2 = ref_kernel(name, grid)
  cdf = cumulative_trapezoid(g2 / std ** 2, grid, initial=0.)
  # The constant importance weight is the normalizer over the interval length.
  np.testing.assert_allclose(weight, cdf[-1] / (1. - eps), rtol=1e-4)
  t = np.sort(np.asarray(t, np.float64))
  assert t.min() >= eps and t.max() <= 1.
  ks = np.max(np.abs(np.interp(t, grid, cdf / cdf[-1]) - np.arange(1, n + 1) / n))
  assert ks < 1.95 / np.sqrt(n), ks


@pytest.mark.parametrize('name', SDE_NAMES)
def test_exact_mixture_score_minimizes_loss(name):
  """The exact score of a 3-mode mixture beats scaled and shifted versions of it, for the plain,
  likelihood-weighted and importance-sampled losses (common random numbers)."""
  sde, _ = gmm_utils.make_sde(name)
  g = mixtures.mixture2d()
  exact = mixtures.score_fn(g, sde)
  std_of = lambda t: sde.marginal_coeffs(t)[1][:, None]
  perturbed = {
      'x1.2': lambda x, t: 1.2 * exact(x, t),
      'x0.8': lambda x, t: 0.8 * exact(x, t),
      'shift': lambda x, t: exact(x, t) + jnp.array([0.3, -0.3]) / std_of(t),
  }
  x = g.sample(jax.random.PRNGKey(0), 8192)
  variants = [{}, {'likelihood_weighting': True},
              {'likelihood_weighting': True, 'importance_sampling': True}]
  fns = [exact] + list(perturbed.values())

  @jax.jit
  def all_losses(x):
    return jnp.array([[jnp.mean(losses.dsm_losses(jax.random.PRNGKey(5), sde, fn, x, **kw))
                       for fn in fns] for kw in variants])

  table = np.asarray(all_losses(x))
  for kw, row in zip(variants, table):
    assert np.all(row[0] < row[1:]), (kw, dict(zip(['exact'] + list(perturbed), row)))


# ------------------------------------------------------------------------------------------------
# Discrete losses with the exact score


def test_smld_loss_expected_value_and_minimizer():
  """SMLD: the exact score's loss is the finite sum over the descending levels; it is minimal."""
  n_levels = 100
  sde = sde_lib.VESDE(0.01, 20., n_levels)
  sigmas_desc = np.exp(np.linspace(np.log(20.), np.log(0.01), n_levels))  # label 0 = sigma_max
  g = gmm_utils.diag_gaussian(3, seed=2)

  def model_fn_of(gmm, scale=1.):
    return lambda x, labels: scale * gmm.score(x, jnp.ones(x.shape[0]), jnp.asarray(sigmas_desc,
                                                                                    x.dtype)[labels])

  x = g.sample(jax.random.PRNGKey(0), 2 ** 16)
  est = losses.discrete_losses(jax.random.PRNGKey(1), sde, model_fn_of(g), x, reduce_mean=False)  # half sum
  v = g.stds[0][None] ** 2
  expected = np.mean(0.5 * np.sum(v / (v + sigmas_desc[:, None] ** 2), axis=1))
  agree(est, expected)
  m = mixtures.mixture2d()
  xm = m.sample(jax.random.PRNGKey(2), 8192)
  loss = lambda s: float(jnp.mean(losses.discrete_losses(jax.random.PRNGKey(3), sde, model_fn_of(m, s), xm, reduce_mean=False)))
  assert loss(1.) < min(loss(1.2), loss(0.8))


def test_ddpm_loss_expected_value_and_minimizer():
  """DDPM: the exact noise predictor's loss is the finite sum over the chain; it is minimal."""
  n_steps = 100
  sde = sde_lib.VPSDE(0.1, 20., n_steps)
  alphas_cumprod = np.cumprod(1. - np.linspace(0.1 / n_steps, 20. / n_steps, n_steps))
  a_i, s_i = np.sqrt(alphas_cumprod), np.sqrt(1. - alphas_cumprod)
  g = gmm_utils.diag_gaussian(3, seed=3)

  def model_fn_of(gmm, scale=1.):
    def fn(x, labels):
      a, s = jnp.asarray(a_i, x.dtype)[labels], jnp.asarray(s_i, x.dtype)[labels]
      return -scale * s[:, None] * gmm.score(x, a, s)  # noise = -std * score
    return fn

  x = g.sample(jax.random.PRNGKey(0), 2 ** 16)
  est = losses.discrete_losses(jax.random.PRNGKey(1), sde, model_fn_of(g), x)  # reduce: mean
  v = (a_i[:, None] * g.stds[0][None]) ** 2
  agree(est, np.mean(np.mean(v / (v + s_i[:, None] ** 2), axis=1)))
  m = mixtures.mixture2d()
  xm = m.sample(jax.random.PRNGKey(2), 8192)
  loss = lambda s: float(jnp.mean(losses.discrete_losses(jax.random.PRNGKey(3), sde, model_fn_of(m, s), xm)))
  assert loss(1.) < min(loss(1.2), loss(0.8))


# ------------------------------------------------------------------------------------------------
# Loss selection and every family under jit with a network


def tiny_config(sde: str = 'vpsde', continuous: bool = True, **training):
  """A toy config with a tiny MLP (fast to compile)."""
  config = default_toy_configs.build(sde)
  config.training.continuous = continuous
  if not continuous:
    config.model.embedding_type = 'positional'
  config.training.update(training)
  config.model.nf = 16
  config.model.num_layers = 1
  config.training.batch_size = 64
  return config


def test_loss_selection_errors():
  """Combinations that do not exist raise ValueErrors that say why."""
  for config, match in [(tiny_config('subvpsde', continuous=False), 'Discrete training'),
                        (tiny_config('vpsde', continuous=False, likelihood_weighting=True),
                         'continuous training'),
                        (tiny_config('vpsde', importance_sampling=True), 'likelihood_weighting')]:
    sde, _ = sde_lib.get_sde(config)
    with pytest.raises(ValueError, match=match):
      losses.get_loss_fn(config, sde, None, train=True)
  for eps in (-0.5, 0., 1., 2.):
    with pytest.raises(ValueError, match=r'eps must lie in \(0, T\) = \(0, 1.0\), got ' + str(eps)):
      losses.dsm_losses(jax.random.PRNGKey(0), sde_lib.VPSDE(), lambda x, t: x, jnp.zeros((2, 2)),
                        eps=eps)
    with pytest.raises(ValueError, match=r'eps must lie in \(0, T\)'):
      losses.get_sde_loss_fn(sde_lib.VPSDE(), None, True, eps=eps)
  with pytest.raises(ValueError, match=r'VESDE: SMLD, VPSDE: DDPM.*not subVPSDE'):
    losses.get_discrete_loss_fn(sde_lib.subVPSDE(), None, True)


def test_every_sde_and_loss_family_runs_under_jit():
  """Continuous VE / VP / sub-VP (plain, weighted, importance-sampled), SMLD and DDPM losses of an
  MLP compile in one jitted program and give finite positive values (the train-step tests below
  differentiate the VP loss)."""
  from models import utils as mutils
  cases = [('vesde', True, {}), ('vpsde', True, {'likelihood_weighting': True}),
           ('subvpsde', True, {'likelihood_weighting': True, 'importance_sampling': True}),
           ('vesde', False, {}), ('vpsde', False, {})]
  fns, params = [], []
  for sde_name, continuous, kw in cases:
    config = tiny_config(sde_name, continuous, **kw)
    sde, _ = sde_lib.get_sde(config)
    model, p, _ = mutils.init_model(jax.random.PRNGKey(0), config)
    fns.append(losses.get_loss_fn(config, sde, model, train=True))
    params.append(p)
  x = mixtures.ring2d().sample(jax.random.PRNGKey(1), 64)

  @jax.jit
  def all_losses(params):
    return [fn(jax.random.PRNGKey(2), p, {}, {'image': x})[0] for fn, p in zip(fns, params)]

  for (sde_name, continuous, kw), loss in zip(cases, all_losses(params)):
    assert np.isfinite(loss) and loss > 0, (sde_name, continuous, kw)


# ------------------------------------------------------------------------------------------------
# Optimizer


def optim_config(**kw):
  """A config holding only optim.* (what get_optimizer reads)."""
  optim = dict(optimizer='Adam', lr=0.1, beta1=0.9, eps=1., weight_decay=0., warmup=4, grad_clip=1.)
  optim.update(kw)
  return ml_collections.ConfigDict({'optim': optim})


def first_updates(config, grad: float, n: int, param: float = 5.):
  """The updates of n steps of get_optimizer(config) for one parameter and a constant gradient."""
  opt = training.get_optimizer(config)
  params = {'w': jnp.array([param])}
  state, out = opt.init(params), []
  for _ in range(n):
    updates, state = opt.update({'w': jnp.array([grad])}, state, params)
    out.append(float(updates['w'][0]))
  return np.array(out)


def test_optimizer_warmup_clipping_and_weight_decay():
  """lr * min(k / warmup, 1) at update k, global-norm clipping, decoupled decay times lr."""
  # Adam with a constant gradient g has m_hat = g, v_hat = g^2, so its step is
  # lr_k g / (|g| + eps); with eps = 1, a gradient 10 gives 10/11 unclipped and 1/2 once clipped
  # to norm 1.
  lr_k = 0.1 * np.minimum(np.arange(6) / 4, 1.)
  np.testing.assert_allclose(first_updates(optim_config(), 10., 6), -lr_k * 0.5, rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(first_updates(optim_config(grad_clip=-1.), 10., 6), -lr_k * 10. / 11.,
                             rtol=1e-5, atol=1e-8)
  # Zero gradient: only the decay acts, lr * weight_decay * param.
  np.testing.assert_allclose(first_updates(optim_config(weight_decay=0.01, warmup=0), 0., 1),
                             [-0.1 * 0.01 * 5.], rtol=1e-5)


def test_optimizer_config_errors():
  """Unknown optimizer names and a zero clipping norm are rejected with the valid choices."""
  with pytest.raises(ValueError, match=r"Unknown optimizer 'SGD'.*Adam"):
    training.get_optimizer(optim_config(optimizer='SGD'))
  with pytest.raises(ValueError, match='grad_clip'):
    training.get_optimizer(optim_config(grad_clip=0.))


# ------------------------------------------------------------------------------------------------
# Train and eval steps


@pytest.fixture(scope='module')
def toy_run():
  """A small VP MLP on the 3-mode 2-D mixture, its step functions and initial state."""
  config = default_toy_configs.build('vpsde', dataset='mixture2d')
  config.model.nf, config.model.num_layers = 64, 2
  config.optim.lr, config.optim.warmup = 2e-3, 50  # 500 steps: MMD^2 ~1e-3, 20x below the bound
  config.model.ema_rate = 0.99
  mesh = parallel.make_mesh(jax.devices()[:1])
  sde, _ = sde_lib.get_sde(config)
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  opt = training.get_optimizer(config)
  train_step = training.get_train_step(config, sde, model, opt, mesh=mesh)
  eval_step = training.get_eval_step(config, sde, model, mesh=mesh)
  return dict(config=config, sde=sde, model=model, state=state, train=train_step, eval=eval_step)


def fresh(state):
  """A copy of a state (the train step donates its input)."""
  return jax.tree_util.tree_map(jnp.copy, state)


def mixture_batches(n_calls: int, n_fused: int = 1, batch: int = 256, seed: int = 0):
  x = mixtures.mixture2d().sample(jax.random.PRNGKey(seed), n_calls * n_fused * batch)
  return np.asarray(x).reshape(n_calls, n_fused, batch, 2)


def test_train_step_is_deterministic_and_updates_ema(toy_run):
  """Same state and batch give the same result; EMA = rate * old + (1 - rate) * new params."""
  data = mixture_batches(1)
  s0 = toy_run['state']
  s1, l1 = toy_run['train'](fresh(s0), {'image': data[0]})
  s2, l2 = toy_run['train'](fresh(s0), {'image': data[0]})
  assert int(s1.step) == 1 and l1.shape == (1,)
  np.testing.assert_array_equal(l1, l2)
  jax.tree_util.tree_map(np.testing.assert_array_equal, s1, s2)
  # Warmup: update 0 has learning rate 0 (as the original), so the params are unchanged and
  # the EMA equals them; update 1 moves both.
  jax.tree_util.tree_map(np.testing.assert_array_equal, s1.params, s0.params)
  s3, _ = toy_run['train'](fresh(s1), {'image': data[0]})
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), s3.params, s1.params)
  assert max(jax.tree_util.tree_leaves(moved)) > 0
  ema = jax.tree_util.tree_map(lambda e, p: 0.99 * e + 0.01 * p, s1.ema_params, s3.params)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                         s3.ema_params, ema)
  assert not np.array_equal(s3.rng, s1.rng)


def test_non_finite_loss_skips_the_update(toy_run):
  """A NaN in the batch gives a NaN loss and leaves params, optimizer state and EMA untouched."""
  data = mixture_batches(1, seed=1)[0]
  s0, _ = toy_run['train'](fresh(toy_run['state']), {'image': data})
  bad = data.copy()
  bad[0, 3, 0] = np.nan
  s1, loss = toy_run['train'](fresh(s0), {'image': bad})
  assert np.isnan(loss[0])
  for field in ('step', 'params', 'opt_state', 'ema_params'):
    jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(s1, field), getattr(s0, field))
  assert not np.array_equal(s1.rng, s0.rng)


def test_eval_step_uses_ema_params_and_mask(toy_run):
  """The eval loss reads only the EMA params and ignores examples with mask 0."""
  data = mixture_batches(1, batch=1000, seed=2)[0, 0]
  mask = (np.arange(1000) < 600).astype(np.float32)
  state = toy_run['state']
  key = jax.random.PRNGKey(7)
  loss = toy_run['eval'](state, {'image': data, 'mask': mask}, key)
  other = data.copy()
  other[600:] = 100.  # padding rows: any values
  scrambled = state.replace(params=jax.tree_util.tree_map(lambda p: p + 1., state.params))
  assert float(toy_run['eval'](scrambled, {'image': other, 'mask': mask}, key)) == pytest.approx(
      float(loss), rel=1e-6)
  shifted = state.replace(ema_params=jax.tree_util.tree_map(lambda p: p + 0.1, state.ema_params))
  assert float(toy_run['eval'](shifted, {'image': data, 'mask': mask}, key)) != pytest.approx(
      float(loss), rel=1e-3)


def test_mlp_learns_a_2d_mixture(toy_run):
  """500 steps: the loss falls, and the EMA model's samples match the data.

  Criterion: the MMD^2 (gmm_utils.mmd2, 4 bandwidths) between 1,000 samples and 1,000 exact draws
  must be below 1/10 of that between a moment-matched Gaussian and the data. The Gaussian has the
  data's mean and covariance, so it is the best a sampler that misses the three modes can be;
  beating it tenfold requires the modes, their widths and weights. The statistic of two exact
  sample sets is checked to lie far below that bound, so the bound is attainable.
  """
  import sampling
  from models import utils as mutils
  data = mixture_batches(500)
  state = fresh(toy_run['state'])
  history = []
  for batch in data:
    state, loss = toy_run['train'](state, {'image': batch})
    history.append(loss)
  history = np.concatenate(jax.device_get(history))
  assert history[-50:].mean() < 0.6 * history[:20].mean(), (history[:20].mean(), history[-50:].mean())

  gmm = mixtures.mixture2d()
  score_fn = mutils.get_score_fn(toy_run['sde'], toy_run['model'], state.ema_params,
                                 state.model_state, continuous=True)
  x, _ = sampling.pc_sample(jax.random.PRNGKey(11), sde_lib.VPSDE(0.1, 20., 200), score_fn,
                            (1000, 2), eps=1e-3)
  y = gmm.sample(jax.random.PRNGKey(12), 1000)
  y2 = gmm.sample(jax.random.PRNGKey(13), 1000)
  gauss = jax.random.normal(jax.random.PRNGKey(14), (1000, 2)) * np.sqrt(gmm.variance) + gmm.mean
  bound = 0.1 * float(gmm_utils.mmd2(gauss.astype(jnp.float32), y))
  assert float(gmm_utils.mmd2(y2, y)) < 0.3 * bound
  assert float(gmm_utils.mmd2(x, y)) < bound
