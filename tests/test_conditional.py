"""Class-conditional networks (class embedding with a null label), label dropout, and the
noise-conditional classifier of classifier guidance (its labels, loss and training)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import losses
import mixtures
import training
from configs import presets
from configs.default_digits_configs import build
from configs.toy import vp_ring2d
from models import utils as mutils
from tests import gmm_utils as gu

K = 3


def _conditional(config, k=K):
  config.model.num_classes = k
  return config


def _toy_config():
  config = vp_ring2d.get_config()
  config.model.nf, config.model.num_layers = 16, 1
  return config


NETS = {
    'ncsnpp_ve': lambda: build('vesde', 'ncsnpp'),
    'ddpmpp_vp': lambda: build('vpsde', 'ddpmpp'),
    'ddpm_vp': lambda: build('vpsde', 'ddpm', continuous=False),
    'mlp_vp': _toy_config,
}


def _random_params(model, shape, seed=0, **kwargs):
  """Random N(0, 0.1^2) parameters of the network's shapes: outputs then depend on every input
  (the real initialisation zeroes the output layer), and no initialisation is compiled."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape),
                                             jnp.ones(shape[:1]), train=False, **kwargs))['params']
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [0.1 * jax.random.normal(k, p.shape, p.dtype) for p, k in zip(leaves, keys)])


def _n_params(params):
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))


@pytest.mark.parametrize('name', sorted(NETS))
def test_class_conditional_networks(name):
  config = _conditional(NETS[name]())
  model = mutils.create_model(config)
  params = _random_params(model, mutils.input_shape(config, 1))
  emb = params['class_embedding']['embedding']
  width = emb.shape[1]
  assert emb.shape == (K + 1, width)  # K classes and the null label
  plain = _random_params(mutils.create_model(NETS[name]()), mutils.input_shape(config, 1))
  assert _n_params(params) - _n_params(plain) == (K + 1) * width  # only the embedding
  x = jax.random.normal(jax.random.PRNGKey(1), mutils.input_shape(config, 4))
  sde, _ = gu.make_sde('ve' if name == 'ncsnpp_ve' else 'vp')
  score = lambda x, y: mutils.get_score_fn(sde, model, params, continuous=config.training.continuous,
                                           class_labels=y)(x, jnp.full((len(x),), 0.5))
  null = jax.jit(lambda x: score(x, None))(x)
  # One program for four label batches: the null label explicitly, 0, 1 and a mixed batch.
  labels = jnp.concatenate([jnp.full((4,), K), jnp.zeros(4), jnp.ones(4), jnp.array([0, 1, 0, 1])])
  explicit, a, b, mixed = jnp.split(jax.jit(score)(jnp.tile(x, (4,) + (1,) * (x.ndim - 1)),
                                                   labels.astype(jnp.int32)), 4)
  np.testing.assert_allclose(explicit, null, rtol=1e-4, atol=1e-5)
  assert a.shape == x.shape and not np.allclose(a, b, atol=1e-4) and not np.allclose(a, null, atol=1e-4)
  # Each example's score depends on its own label only.
  np.testing.assert_allclose(mixed[0::2], a[0::2], rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(mixed[1::2], b[1::2], rtol=1e-4, atol=1e-5)


def test_conditioning_errors():
  """Raised at trace time (eval_shape: no compilation)."""
  x, t = jnp.zeros((2, 8, 8, 1)), jnp.zeros((2,))
  init = lambda config, **kw: jax.eval_shape(
      lambda: mutils.create_model(config).init(jax.random.PRNGKey(0), x, t, train=False, **kw))
  with pytest.raises(ValueError, match='not class-conditional.*model.num_classes'):
    init(build('vpsde', 'ddpmpp'), class_labels=jnp.zeros(2, jnp.int32))
  config = _conditional(build('vpsde', 'ddpmpp'))
  with pytest.raises(ValueError, match=r'class_labels must be \[B\] with B = 2'):
    init(config, class_labels=jnp.zeros(3, jnp.int32))
  config.model.conditional = False
  with pytest.raises(ValueError, match='model.conditional = True'):
    init(config)
  config.model.num_classes = -2
  with pytest.raises(ValueError, match='num_classes must be a non-negative integer.*-2'):
    init(config)


# ------------------------------------------------------------------------------------------------
# Label dropout.


def test_drop_labels_fraction():
  labels = jnp.arange(100_000) % K
  for rate in (0., 0.1, 0.5, 1.):
    dropped = np.asarray(losses.drop_labels(jax.random.PRNGKey(0), labels, rate, K))
    null = dropped == K
    se = np.sqrt(rate * (1 - rate) / len(dropped))
    assert abs(null.mean() - rate) <= 5 * se, (rate, null.mean())
    np.testing.assert_array_equal(dropped[~null], np.asarray(labels)[~null])  # the rest intact


def test_training_batch_null_label_fraction_matches_label_dropout():
  """Through the loss: the network sees the null label in a label_dropout fraction of a batch."""
  seen = []

  def per_example(rng, params, model_state, dropout_rng, x, class_labels):
    seen.append(class_labels)
    return (class_labels == K).astype(jnp.float32)

  loss_fn = losses._network_loss_fn(per_example, num_classes=K, label_dropout=0.1)
  n = 40_000
  batch = {'image': jnp.zeros((n, 2)), 'label': jnp.arange(n) % K}
  fraction, _ = loss_fn(jax.random.PRNGKey(3), None, None, batch)
  assert abs(float(fraction) - 0.1) <= 5 * np.sqrt(0.1 * 0.9 / n)
  kept = np.asarray(seen[-1]) != K
  np.testing.assert_array_equal(np.asarray(seen[-1])[kept], np.asarray(batch['label'])[kept])


def test_config_label_dropout_reaches_the_loss(monkeypatch):
  """get_loss_fn drops labels at training.label_dropout when training, never in evaluation, and a
  conditional network without labels in its batch is an error."""
  config = presets.class_conditional(_conditional(_toy_config()), K, label_dropout=0.25)
  model, params, state = mutils.init_model(jax.random.PRNGKey(0), config)
  sde, _ = gu.make_sde('vp')
  rates = []
  real = losses.drop_labels
  monkeypatch.setattr(losses, 'drop_labels', lambda rng, y, rate, null: (rates.append((rate, null)),
                                                                         real(rng, y, rate, null))[1])
  batch = {'image': jnp.zeros((8, 2)), 'label': jnp.arange(8) % K}
  for train in (True, False):
    loss, _ = losses.get_loss_fn(config, sde, model, train=train)(jax.random.PRNGKey(0), params, state, batch)
    assert np.isfinite(float(loss))
  assert rates == [(0.25, K), (0., K)]
  with pytest.raises(ValueError, match='needs class labels'):
    losses.get_loss_fn(config, sde, model, train=True)(jax.random.PRNGKey(0), params, state,
                                                       {'image': jnp.zeros((8, 2))})
  config.training.label_dropout = 1.5
  with pytest.raises(ValueError, match=r'label_dropout must lie in \[0, 1\], got 1.5'):
    losses.get_loss_fn(config, sde, model, train=True)


# ------------------------------------------------------------------------------------------------
# The noise-conditional classifier.


def _classifier_config(sde='vpsde'):
  config = build(sde, 'ddpmpp')
  presets.noise_classifier(config, num_classes=10, blocks_per_group=1, channel_multiplier=2)
  config.optim.warmup = 10
  config.optim.lr = 2e-3
  return config


def test_classifier_noise_labels_are_the_ve_equivalent_sigma():
  t = jnp.linspace(1e-3, 1., 9)
  for name in ('ve', 'vp', 'subvp'):
    sde, _ = gu.make_sde(name)
    alpha, sigma = sde.marginal_coeffs(t)
    np.testing.assert_allclose(mutils.classifier_noise_labels(sde, t), sigma / alpha, rtol=1e-5)
  ve, _ = gu.make_sde('ve')
  np.testing.assert_allclose(mutils.classifier_noise_labels(ve, t), ve.sigma(t), rtol=1e-5)


def test_classifier_log_probs():
  config = _classifier_config()
  model = mutils.create_model(config)
  sde, _ = gu.make_sde('vp')
  log_prob_fn = mutils.get_class_log_prob_fn(sde, model, _random_params(model, (1, 8, 8, 1)))
  x = jax.random.normal(jax.random.PRNGKey(1), (5, 8, 8, 1))
  lp = jax.jit(log_prob_fn)(x, jnp.linspace(0.01, 1., 5))
  assert lp.shape == (5, 10)
  np.testing.assert_allclose(jax.nn.logsumexp(lp, axis=1), 0., atol=1e-5)
  with pytest.raises(ValueError, match='share the batch size'):
    log_prob_fn(x, jnp.ones(4))


def test_classifier_loss_is_minimised_by_the_exact_posterior():
  """Cross-entropy is a proper scoring rule: on noisy mixture data, the exact p_t(k | x) has a
  lower expected loss than sharpened or flattened versions of it (same t and noise draws)."""
  g = mixtures.GaussianMixture(np.array([0.5, 0.3, 0.2]), np.array([[-1., 0.], [1., 0.], [0., 1.5]]),
                               np.full((3, 2), 0.6))
  sde, _ = gu.make_sde('vp')
  x, k = g.sample(jax.random.PRNGKey(0), 20_000, return_components=True)
  exact = mixtures.log_posterior_fn(g, sde)
  loss = {}
  for temp in (0.5, 1., 2.):
    fn = lambda x, t, temp=temp: jax.nn.log_softmax(exact(x, t) / temp, axis=-1)
    per_example = losses.classifier_losses(jax.random.PRNGKey(1), sde, fn, x, k)
    loss[temp] = (float(per_example.mean()), float(per_example.std() / np.sqrt(len(x))))
  assert loss[1.][0] < loss[0.5][0] and loss[1.][0] < loss[2.][0], loss
  assert 0.1 < loss[1.][0] < np.log(3.)  # informative, far from chance


def test_classifier_trains_with_the_train_step():
  """--mode train's step with training.objective = 'classifier': the cross-entropy on perturbed
  digits (batch 64) drops from chance (log 10) within 60 steps (measured: 2.36 over the first
  20 steps, 2.0 over steps 41-60; about half the noise levels leave nothing to classify)."""
  import datasets
  config = _classifier_config()
  sde, _ = gu.make_sde('vp')
  model, state = training.init_train_state(jax.random.PRNGKey(0), config)
  step_fn = training.get_train_step(config, sde, model, training.get_optimizer(config))
  it = datasets.get_dataset(config, split='train')
  scaler = datasets.get_data_scaler(config)
  history = []
  for _ in range(60):
    b = next(it)
    batch = {'image': scaler(b['image'])[None].astype(np.float32), 'label': b['label'][None]}
    state, step_losses = step_fn(state, batch)
    history.append(float(step_losses[-1]))
  assert abs(np.mean(history[:3]) - np.log(10.)) < 0.3, history[:3]
  assert np.mean(history[-20:]) < np.log(10.) - 0.2, history[-20:]


def test_objective_names_are_checked():
  config = _classifier_config()
  config.training.objective = 'regression'
  sde, _ = gu.make_sde('vp')
  with pytest.raises(ValueError, match="objective 'regression'.*score.*classifier"):
    losses.get_loss_fn(config, sde, None, train=True)
