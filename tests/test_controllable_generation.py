"""Controllable generation against exact answers: with closed-form mixture scores and posteriors,
guided sampling must give the exact class-conditional distribution, inpainting and colorization
the exact conditional of the unknown part, and every bad argument a ValueError naming it."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import controllable_generation as cg
import mixtures
import sampling
from tests import gmm_utils as gu

# Three well-separated components with uneven weights: nearest-mean assignment is exact up to
# ~1e-10, so mode fractions measure the sampler, not the overlap.
THREE = mixtures.GaussianMixture(np.array([0.5, 0.3, 0.2]),
                                 np.array([[-4., 0.], [4., 0.], [0., 5.]]),
                                 np.array([[0.5, 0.5], [0.7, 0.4], [0.4, 0.6]]))
N = 2000


def _component(g, k):
  return mixtures.GaussianMixture(np.ones(1), g.means[k:k + 1], g.stds[k:k + 1])


def _check_components(x, labels, g=THREE):
  """Every example lies in its label's mode; each class's per-dimension mean and variance match
  its component's within 5 standard errors (+3% for the discretization, as test_sampling)."""
  x, labels = np.asarray(x), np.asarray(labels)
  for k in range(len(g.weights)):
    xs = x[labels == k]
    np.testing.assert_array_equal(gu.nearest_mode_weights(g, xs), np.eye(len(g.weights))[k])
    gu.check_moments(xs, _component(g, k), n_se=5., rel_bias=0.03)


def _check_weights(x, g=THREE):
  w = gu.nearest_mode_weights(g, x)
  se = np.sqrt(g.weights * (1 - g.weights) / len(x))
  assert np.all(np.abs(w - g.weights) <= 5 * se), (w, g.weights)


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_classifier_guidance_with_exact_posterior(sde_name):
  """Scale 1 with the exact p_t(k | x) gives p(x | k) for each example's label; scale 0 the
  unconditional mixture (its uneven weights)."""
  sde, eps = gu.make_sde(sde_name)
  labels = jnp.arange(N) % 3
  guided = cg.classifier_guided_score_fn(mixtures.score_fn(THREE, sde),
                                         mixtures.log_posterior_fn(THREE, sde), labels, 1.0)
  x, nfe = sampling.pc_sample(jax.random.PRNGKey(0), sde, guided, (N, 2),
                              predictor='reverse_diffusion', eps=eps)
  assert nfe == sde.N
  _check_components(x, labels)
  unguided = cg.classifier_guided_score_fn(mixtures.score_fn(THREE, sde),
                                           mixtures.log_posterior_fn(THREE, sde), labels, 0.0)
  x, _ = sampling.pc_sample(jax.random.PRNGKey(1), sde, unguided, (N, 2),
                            predictor='reverse_diffusion', eps=eps)
  _check_weights(np.asarray(x))


def test_classifier_guidance_check_can_fail():
  """The component check rejects samples of the wrong class and of the unconditional mixture."""
  x, k = THREE.sample(jax.random.PRNGKey(2), N, return_components=True)
  _check_components(x, k)
  with pytest.raises(AssertionError):
    _check_components(x, (np.asarray(k) + 1) % 3)
  with pytest.raises(AssertionError):
    _check_components(x, np.arange(N) % 3)


def test_classifier_guidance_score_is_the_conditional_score():
  """Scale 1 with the exact posterior is grad log p_t(x | k) at any x, t (Bayes), and a larger
  scale adds that much more of grad log p_t(k | x)."""
  sde, _ = gu.make_sde('vp')
  x = jax.random.normal(jax.random.PRNGKey(0), (64, 2)) * 4.
  t = jax.random.uniform(jax.random.PRNGKey(1), (64,), minval=0.01, maxval=1.)
  labels = jnp.arange(64) % 3
  want = mixtures.component_score_fn(THREE, sde, labels)(x, t)
  for scale in (1., 2.5):
    got = cg.classifier_guided_score_fn(mixtures.score_fn(THREE, sde),
                                        mixtures.log_posterior_fn(THREE, sde), labels, scale)(x, t)
    uncond = mixtures.score_fn(THREE, sde)(x, t)
    np.testing.assert_allclose(got, uncond + scale * (want - uncond), rtol=1e-4, atol=1e-4)


def _numpy_scores(g, sde, x, t, k):
  """Component-k and mixture scores of p_t in float64 numpy (independent of the library)."""
  a, std = (np.asarray(v, np.float64)[:, None, None] for v in sde.marginal_coeffs(t))
  x = np.asarray(x, np.float64)
  means, var = a * g.means[None], a ** 2 * g.stds[None] ** 2 + std ** 2  # [B, K, D]
  log_joint = np.log(g.weights) - 0.5 * np.sum(np.log(2 * np.pi * var)
                                               + (x[:, None] - means) ** 2 / var, -1)
  resp = np.exp(log_joint - log_joint.max(1, keepdims=True))
  resp /= resp.sum(1, keepdims=True)
  comp = (means - x[:, None]) / var
  return comp[np.arange(len(x)), k], np.sum(resp[..., None] * comp, 1)


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_cfg_formula_on_random_inputs(sde_name):
  sde, _ = gu.make_sde(sde_name)
  x = jax.random.normal(jax.random.PRNGKey(0), (128, 2)) * 5.
  t = jax.random.uniform(jax.random.PRNGKey(1), (128,), minval=0.01, maxval=1.)
  k = np.arange(128) % 3
  cond, uncond = _numpy_scores(THREE, sde, x, t, k)
  for w in (0., 0.5, 3.):
    fn = cg.cfg_score_fn(mixtures.component_score_fn(THREE, sde, jnp.asarray(k)),
                         mixtures.score_fn(THREE, sde), w)
    np.testing.assert_allclose(fn(x, t), (1 + w) * cond - w * uncond, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_cfg_w0_samples_the_component(sde_name):
  sde, eps = gu.make_sde(sde_name)
  labels = jnp.arange(N) % 3
  fn = cg.cfg_score_fn(mixtures.component_score_fn(THREE, sde, labels), mixtures.score_fn(THREE, sde), 0.)
  x, _ = sampling.pc_sample(jax.random.PRNGKey(0), sde, fn, (N, 2), predictor='reverse_diffusion',
                            eps=eps)
  _check_components(x, labels)


def test_guided_score_fns_take_traced_labels_and_scales():
  """The config path jits one program for every label batch and scale."""
  sde, _ = gu.make_sde('vp')
  x, t = jnp.ones((6, 2)), jnp.full((6,), 0.5)

  @jax.jit
  def both(labels, scale):
    clf = cg.classifier_guided_score_fn(mixtures.score_fn(THREE, sde),
                                        mixtures.log_posterior_fn(THREE, sde), labels, scale)
    cfg = cg.cfg_score_fn(mixtures.component_score_fn(THREE, sde, labels),
                          mixtures.score_fn(THREE, sde), scale)
    return clf(x, t), cfg(x, t)

  labels = jnp.arange(6) % 3
  for scale in (0., 2.):
    clf, cfg = both(labels, scale)
    np.testing.assert_allclose(clf, cg.classifier_guided_score_fn(
        mixtures.score_fn(THREE, sde), mixtures.log_posterior_fn(THREE, sde), labels, scale)(x, t),
        rtol=1e-6)
    np.testing.assert_allclose(cfg, cg.cfg_score_fn(
        mixtures.component_score_fn(THREE, sde, labels), mixtures.score_fn(THREE, sde), scale)(x, t),
        rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Inpainting: 4-D, coordinates 0-2 observed; they separate the components (4 units apart at std
# 0.5 each), so the exact conditional of coordinate 3 is the generating component's N(mu, s^2).

INPAINT = mixtures.GaussianMixture(np.array([0.5, 0.5]),
                                   np.array([[-2., -2., -2., -1.], [2., 2., 2., 1.5]]),
                                   np.array([[0.5, 0.5, 0.5, 0.3], [0.5, 0.5, 0.5, 0.6]]))
KNOWN = np.array([[1., 1., 1., 0.]])


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_inpainting_follows_the_exact_conditional(sde_name):
  sde, eps = gu.make_sde(sde_name)
  data, comp = INPAINT.sample(jax.random.PRNGKey(3), N, return_components=True)
  x, nfe = cg.inpaint(jax.random.PRNGKey(0), sde, mixtures.score_fn(INPAINT, sde), data, KNOWN,
                      eps=eps)
  assert nfe == 2 * sde.N  # reverse diffusion + one Langevin step
  x, data, comp = np.asarray(x), np.asarray(data), np.asarray(comp)
  np.testing.assert_array_equal(x[:, :3], data[:, :3])  # the known part, exactly
  for k in range(2):
    unknown = mixtures.GaussianMixture(np.ones(1), INPAINT.means[k:k + 1, 3:], INPAINT.stds[k:k + 1, 3:])
    gu.check_moments(x[comp == k, 3:], unknown, n_se=5., rel_bias=0.03)
  # The check fails for the other component's conditional.
  with pytest.raises(AssertionError):
    wrong = mixtures.GaussianMixture(np.ones(1), INPAINT.means[1:, 3:], INPAINT.stds[1:, 3:])
    gu.check_moments(x[comp == 0, 3:], wrong, n_se=5., rel_bias=0.03)


@pytest.mark.parametrize('sde_name', ['ve', 'vp'])
def test_inpainting_denoise_returns_the_noise_free_mean(sde_name):
  """A component whose unknown coordinate has std 0.002: the last step's noise (~0.01 at eps)
  stays without `denoise` and is gone with it (the original kept it: it rebuilt the mean from
  the noised x)."""
  sde, eps = gu.make_sde(sde_name)
  sharp = mixtures.GaussianMixture(INPAINT.weights, INPAINT.means,
                                   np.where(np.arange(4) == 3, 0.002, INPAINT.stds))
  data, comp = sharp.sample(jax.random.PRNGKey(3), 1000, return_components=True)
  spread = {}
  for denoise in (True, False):
    x, _ = cg.inpaint(jax.random.PRNGKey(0), sde, mixtures.score_fn(sharp, sde), data, KNOWN,
                      eps=eps, corrector='none', denoise=denoise)
    x = np.asarray(x)
    np.testing.assert_array_equal(x[:, :3], np.asarray(data)[:, :3])
    spread[denoise] = max(x[np.asarray(comp) == k, 3].std() for k in range(2))
  assert spread[True] < 0.003 < 0.007 < spread[False], spread


def test_inpainting_image_masks_and_a_broadcast_mask():
  """[B, H, W, C] data with a [1, H, W, 1] preset mask: known pixels exact, all channels."""
  g = gu.diag_gaussian(2 * 4 * 3, seed=2)
  sde, eps = gu.make_sde('vp', N=100)
  data = g.sample(jax.random.PRNGKey(0), 8).reshape(8, 2, 4, 3)
  mask = cg.inpainting_mask('left_half', data.shape)
  assert mask.shape == (1, 2, 4, 1) and mask[0, :, :2].sum() == 0 and mask[0, :, 2:].min() == 1
  x, _ = cg.inpaint(jax.random.PRNGKey(1), sde, mixtures.score_fn(g, sde), data, mask, eps=eps)
  np.testing.assert_array_equal(np.asarray(x)[:, :, 2:], np.asarray(data)[:, :, 2:])
  assert np.all(np.asarray(x)[:, :, :2] != np.asarray(data)[:, :, :2])


def test_mask_presets():
  shape = (3, 8, 8, 1)
  m = {p: cg.inpainting_mask(p, shape) for p in ('left_half', 'right_half', 'center')}
  assert m['left_half'][0, :, :4].max() == 0 and m['left_half'][0, :, 4:].min() == 1
  np.testing.assert_array_equal(m['right_half'], m['left_half'][:, :, ::-1])
  assert m['center'][0, 2:6, 2:6].max() == 0 and m['center'].sum() == 64 - 16
  r = cg.inpainting_mask('random_pixels:0.25', shape, seed=1)
  assert r.shape == (3, 8, 8, 1) and np.all(r.reshape(3, -1).sum(1) == 48)
  assert not np.array_equal(r[0], r[1])  # drawn per image
  np.testing.assert_array_equal(r, cg.inpainting_mask('random_pixels:0.25', shape, seed=1))
  for bad in ('top_half', 'random_pixels', 'random_pixels:1.5', 'random_pixels:x', 'center:2'):
    with pytest.raises(ValueError, match='(?i)mask preset'):
      cg.inpainting_mask(bad, shape)


# ------------------------------------------------------------------------------------------------
# Colorization: 2x2 RGB images; per-pixel isotropic components (diagonal in the decoupled basis
# too) whose grey levels differ by 2 sqrt(3) per pixel, so the grey image fixes the component.

RGB = np.array([[2., 1., 0.], [-1., -2., 0.]])
RGB_STD = np.array([0.3, 0.5])
COLOR = mixtures.GaussianMixture(np.array([0.6, 0.4]), np.repeat(RGB[:, None], 4, 1).reshape(2, -1),
                                 np.repeat(RGB_STD[:, None], 12, 1))


def test_colorization_keeps_the_grey_level_and_follows_the_component():
  sde, eps = gu.make_sde('vp')
  n = 1000
  data, comp = COLOR.sample(jax.random.PRNGKey(3), n, return_components=True)
  data, comp = np.asarray(data).reshape(n, 2, 2, 3), np.asarray(comp)
  gray = np.repeat(data.mean(-1, keepdims=True), 3, -1)
  x, nfe = cg.colorize(jax.random.PRNGKey(0), sde, mixtures.score_fn(COLOR, sde), gray, eps=eps)
  x = np.asarray(x)
  assert nfe == 2 * sde.N and x.shape == gray.shape
  np.testing.assert_allclose(x.mean(-1), gray[..., 0], atol=1e-4)
  chroma = (x.astype(np.float64) @ cg.GREY_BASIS.astype(np.float64))[..., 1:]  # [n, 2, 2, 2]
  for k in range(2):
    mean = (RGB[k] @ cg.GREY_BASIS.astype(np.float64))[1:]
    want = mixtures.GaussianMixture(np.ones(1), np.tile(mean, 4)[None], np.full((1, 8), RGB_STD[k]))
    gu.check_moments(chroma[comp == k].reshape(-1, 8), want, n_se=5., rel_bias=0.03)


def test_grey_basis_is_orthonormal_with_the_grey_axis_first():
  b = cg.GREY_BASIS.astype(np.float64)
  np.testing.assert_allclose(b.T @ b, np.eye(3), atol=1e-6)
  np.testing.assert_allclose(b[:, 0], np.full(3, 1 / np.sqrt(3)), atol=1e-7)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 3, 3))
  np.testing.assert_allclose(cg.couple(cg.decouple(x)), x, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Labels and bad input.


def test_class_labels():
  np.testing.assert_array_equal(cg.class_labels('all', 7, 3), [0, 1, 2, 0, 1, 2, 0])
  np.testing.assert_array_equal(cg.class_labels('all', 4, 3, offset=2), [2, 0, 1, 2])
  np.testing.assert_array_equal(cg.class_labels(2, 3, 10), [2, 2, 2])
  np.testing.assert_array_equal(cg.class_labels('1,4', 5, 10), [1, 4, 1, 4, 1])
  np.testing.assert_array_equal(cg.class_labels((7, 8), 3, 10), [7, 8, 7])
  for bad in (10, '3,12', -1):
    with pytest.raises(ValueError, match=r'outside the valid class ids \[0, 10\)'):
      cg.class_labels(bad, 4, 10)
  for bad in ('', 'some', '1.5', 2.5):
    with pytest.raises(ValueError, match="give 'all' or class ids"):
      cg.class_labels(bad, 4, 10)


def test_bad_input():
  sde, eps = gu.make_sde('vp', N=100)
  rng = jax.random.PRNGKey(0)
  score = mixtures.score_fn(INPAINT, sde)
  data = jnp.zeros((4, 4))
  with pytest.raises(ValueError, match=r'mask of shape \(3,\) does not broadcast.*\(4, 4\)'):
    cg.inpaint(rng, sde, score, data, np.ones(3))
  with pytest.raises(ValueError, match='0 \\(unknown\\) and 1 \\(known\\)'):
    cg.inpaint(rng, sde, score, data, np.full((1, 4), 0.5))
  with pytest.raises(ValueError, match="predictor 'nope'"):
    cg.inpaint(rng, sde, score, data, KNOWN, predictor='nope')
  with pytest.raises(ValueError, match='eps must lie'):
    cg.inpaint(rng, sde, score, data, KNOWN, eps=0.)
  gray = np.zeros((2, 2, 2, 3), np.float32)
  gray[1, 0, 1, 2] = 0.25
  with pytest.raises(ValueError, match='equal R, G, B channels: example 1 .* 0.25'):
    cg.colorize(rng, sde, mixtures.score_fn(COLOR, sde), gray)
  with pytest.raises(ValueError, match=r'\[B, H, W, 3\].*\(2, 2, 2, 1\)'):
    cg.colorize(rng, sde, mixtures.score_fn(COLOR, sde), np.zeros((2, 2, 2, 1)))
  log_post = mixtures.log_posterior_fn(THREE, sde)
  uncond = mixtures.score_fn(THREE, sde)
  with pytest.raises(ValueError, match='scale .* non-negative.*-1.0'):
    cg.classifier_guided_score_fn(uncond, log_post, 0, -1.0)
  with pytest.raises(ValueError, match='w .* non-negative.*-0.5'):
    cg.cfg_score_fn(uncond, uncond, -0.5)
  with pytest.raises(ValueError, match=r'labels \[-1\] lie outside'):
    cg.classifier_guided_score_fn(uncond, log_post, jnp.array([0, -1]))
  with pytest.raises(ValueError, match=r'labels \[3\] lie outside the valid class ids \[0, 3\)'):
    cg.classifier_guided_score_fn(uncond, log_post, 3, num_classes=3)
  # Without num_classes, K is known at the first call (before compilation).
  fn = cg.classifier_guided_score_fn(uncond, log_post, jnp.array([1, 5]))
  with pytest.raises(ValueError, match=r'labels \[5\] lie outside the valid class ids \[0, 3\)'):
    fn(jnp.zeros((2, 2)), jnp.full((2,), 0.5))
  with pytest.raises(ValueError, match='labels have shape \\(2,\\) but the batch has 3'):
    cg.classifier_guided_score_fn(uncond, log_post, jnp.array([1, 2]))(jnp.zeros((3, 2)),
                                                                       jnp.full((3,), 0.5))
  with pytest.raises(ValueError, match='integer class ids'):
    cg.classifier_guided_score_fn(uncond, log_post, jnp.array([0.5]))
