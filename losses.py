"""Score-matching losses: pure per-example losses of a score function, and the loss fns of a network.

Losses (semantics of the original score_sde losses.py):
- continuous denoising score matching for VE / VP / sub-VP (`get_sde_loss_fn`), optionally with
  the likelihood weighting lambda(t) = g(t)^2 and importance sampling of t for it;
- the discrete loss of the SDE's chain (`get_discrete_loss_fn`): SMLD (NCSN) over the SMLD noise
  levels for VE, DDPM noise prediction for VP.

Every loss fn is `loss_fn(rng, params, model_state, batch) -> (loss, new_model_state)`, the loss
being a mean over the GLOBAL batch: under `jax.jit` with a batch sharded over the mesh, the mean
is one reduction over all devices, so 1 and N devices give the same loss and gradients. A batch is
an array [B, ...] or a dict with 'image' [B, ...] (and, from evaluation pipelines, 'mask' [B]: 1
for real examples, 0 for padding, which the loss then ignores; 'label' [B]: the class, which
class-conditional networks and the noise-conditional classifier need).

Per-example reduction over data dimensions: mean when `reduce_mean`, else HALF the sum (as the
original: 0.5 * sum, so a sum-reduced loss is the negative log-density scale of the paper).

The networks of this project keep no mutable collections (GroupNorm, no batch statistics), so the
loss fns return `model_state` unchanged. The optimizer, the train state and the jitted train / eval
steps are in training.py.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from models import layers
from models import utils as mutils
from sde_lib import batch_mul

Array = jax.Array
LossFn = Callable[[Array, Any, Any, Any], Tuple[Array, Any]]
ScoreFn = Callable[[Array, Array], Array]
ModelFn = Callable[[Array, Array], Array]

# ------------------------------------------------------------------------------------------------
# Per-example losses of a score function (pure: tests pass closed-form scores here)


def _reduce(x: Array, reduce_mean: bool) -> Array:
  """Per-example reduction over data dimensions: mean, or half the sum (the original's choice)."""
  x = x.reshape(x.shape[0], -1)
  return jnp.mean(x, axis=-1) if reduce_mean else 0.5 * jnp.sum(x, axis=-1)


def sample_importance_times(rng: Array, sde, n: int, eps: float = 1e-5) -> Tuple[Array, float]:
  """n times from r(t) proportional to lambda(t) / std(t)^2 on [eps, T], and the weight Z / (T - eps).

  Inverse-CDF sampling in closed form (Song et al. 2021b, "Maximum likelihood training of
  score-based diffusion models", Sec. 5): t = R^{-1}(R(eps) + u (R(T) - R(eps))), u ~ U(0, 1),
  with R = `sde.likelihood_weight_primitive` and Z = R(T) - R(eps). For a uniform draw the
  likelihood-weighted integrand is lambda(t) / std^2 * h(t); under r it becomes
  lambda / std^2 * h / ((T - eps) r(t)) = Z / (T - eps) * h(t): a constant weight, which keeps
  the expectation unchanged and removes the 1 / t blow-up of the weight near t = 0 (VP, sub-VP).
  """
  eps = sde.check_time(eps)
  r_lo, r_hi = (float(sde.likelihood_weight_primitive(np.float64(s), np)) for s in (eps, sde.T))
  u = jax.random.uniform(rng, (n,))
  t = sde.likelihood_weight_primitive_inverse(r_lo + u * (r_hi - r_lo))
  return jnp.clip(t, eps, sde.T), (r_hi - r_lo) / (sde.T - eps)


def dsm_losses(rng: Array, sde, score_fn: ScoreFn, x: Array, *, reduce_mean: bool = True,
               likelihood_weighting: bool = False, importance_sampling: bool = False,
               eps: float = 1e-5) -> Array:
  """Per-example continuous denoising score-matching losses [B] of `score_fn` on data x.

  t ~ U(eps, T) (or ~ r(t) with importance sampling), x_t = a(t) x + std(t) z, and the loss is
  reduce((score * std + z)^2), times g(t)^2 / std^2 with likelihood weighting, i.e. the
  original's reduce((score + z / std)^2) g^2 written without dividing by a tiny std.
  """
  eps = sde.check_time(eps)
  if importance_sampling and not likelihood_weighting:
    raise ValueError('importance_sampling samples t for the likelihood weighting; set '
                     'likelihood_weighting=True as well.')
  t_rng, z_rng = jax.random.split(rng)
  if importance_sampling:
    t, weight = sample_importance_times(t_rng, sde, x.shape[0], eps)
  else:
    t = jax.random.uniform(t_rng, (x.shape[0],), minval=eps, maxval=sde.T)
  z = jax.random.normal(z_rng, x.shape, x.dtype)
  mean, std = sde.marginal_prob(x, t)
  score = score_fn(mean + batch_mul(std, z), t)
  losses = _reduce(jnp.square(batch_mul(std, score) + z), reduce_mean)
  if importance_sampling:
    return losses * weight
  if likelihood_weighting:
    g2 = sde.sde(jnp.zeros_like(x), t)[1] ** 2
    return losses * g2 / std ** 2
  return losses


def discrete_losses(rng: Array, sde, model_fn: ModelFn, x: Array, *, reduce_mean: bool = True) -> Array:
  """Per-example losses [B] of the SDE's discrete chain: a uniform level i in [0, N).

  x_i = alpha_i x + sigma_i z with the chain's (alpha_i, sigma_i) (`sde.discrete_coeffs`), the
  network sees `sde.discrete_labels(i)`, and the loss is reduce((score sigma_i + z)^2) with the
  score from `sde.score_from_output`. This is the SMLD (NCSN) loss reduce((s - target)^2)
  sigma_i^2 with target -z / sigma_i (Song & Ermon 2019, eq. 5) for a score network, and the DDPM
  loss reduce((eps_theta - z)^2) (Ho et al. 2020, eq. 14) for a noise-predicting one. The
  original used reduce_mean=False (half sum) for SMLD and True for DDPM.
  """
  if not sde.has_discrete_chain:
    raise ValueError(f'{type(sde).__name__} has no discrete chain; use the continuous loss.')
  i_rng, z_rng = jax.random.split(rng)
  i = jax.random.randint(i_rng, (x.shape[0],), 0, sde.N)
  alpha, sigma = (c.astype(x.dtype) for c in sde.discrete_coeffs(i))
  z = jax.random.normal(z_rng, x.shape, x.dtype)
  score = sde.score_from_output(model_fn(batch_mul(alpha, x) + batch_mul(sigma, z), sde.discrete_labels(i)),
                                sigma)
  return _reduce(jnp.square(batch_mul(sigma, score) + z), reduce_mean)


# ------------------------------------------------------------------------------------------------
# Loss fns of a network: loss_fn(rng, params, model_state, batch) -> (loss, new_model_state)


def _data_and_mask(batch) -> Tuple[Array, Optional[Array]]:
  if isinstance(batch, Mapping):
    return batch['image'], batch.get('mask')
  return batch, None


def _batch_labels(batch, what: str) -> Array:
  """The batch's class labels [B]; a ValueError when it has none (at trace time)."""
  if not isinstance(batch, Mapping) or 'label' not in batch:
    raise ValueError(f'{what} needs class labels: pass batches {{"image", "label"}}.')
  return batch['label'].astype(jnp.int32)


def drop_labels(rng: Array, labels: Array, rate: float, null_label: int) -> Array:
  """Labels [B] with each one replaced by `null_label` with probability `rate`, independently
  (label dropout of classifier-free guidance, Ho & Salimans 2022, Alg. 1: p_uncond)."""
  drop = jax.random.uniform(rng, labels.shape) < rate
  return jnp.where(drop, null_label, labels).astype(jnp.int32)


def _check_label_dropout(config) -> float:
  rate = config.training.get('label_dropout', 0.)
  if not 0. <= float(rate) <= 1.:
    raise ValueError(f'config.training.label_dropout must lie in [0, 1], got {rate!r}.')
  return float(rate)


def _batch_mean(losses: Array, mask: Optional[Array]) -> Array:
  """Mean over the global batch, over real examples only when a padding mask is given."""
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.)


def _network_loss_fn(per_example: Callable[..., Array], num_classes: int = 0,
                     label_dropout: float = 0.) -> LossFn:
  """Wraps per_example(rng, params, model_state, dropout_rng, x, class_labels) -> [B] into a
  loss fn. A class-conditional network (num_classes > 0) gets the batch's labels, each replaced
  by the null label (num_classes) with probability label_dropout; the others get None."""

  def loss_fn(rng, params, model_state, batch):
    x, mask = _data_and_mask(batch)
    rng, dropout_rng = jax.random.split(rng)
    class_labels = None
    if num_classes:  # unconditional runs keep their random streams unchanged
      rng, label_rng = jax.random.split(rng)
      class_labels = drop_labels(label_rng, _batch_labels(batch, 'A class-conditional network'),
                                 label_dropout, num_classes)
    losses = per_example(rng, params, model_state, dropout_rng, x, class_labels)
    return _batch_mean(losses, mask), model_state

  return loss_fn


def get_sde_loss_fn(sde, model, train: bool, reduce_mean: bool = True, continuous: bool = True,
                    likelihood_weighting: bool = False, importance_sampling: bool = False,
                    eps: float = 1e-5, num_classes: int = 0, label_dropout: float = 0.) -> LossFn:
  """The continuous denoising score-matching loss of `model` under `sde` (any SDE); with
  num_classes > 0, of the class-conditional score with label dropout (see `_network_loss_fn`)."""
  eps = sde.check_time(eps)
  if importance_sampling and not likelihood_weighting:
    raise ValueError('importance_sampling samples t for the likelihood weighting; set '
                     'training.likelihood_weighting=True as well.')

  def per_example(rng, params, model_state, dropout_rng, x, class_labels):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=train,
                                   continuous=continuous, rng=dropout_rng,
                                   class_labels=class_labels)
    return dsm_losses(rng, sde, score_fn, x, reduce_mean=reduce_mean,
                      likelihood_weighting=likelihood_weighting,
                      importance_sampling=importance_sampling, eps=eps)

  return _network_loss_fn(per_example, num_classes, label_dropout)


def get_discrete_loss_fn(sde, model, train: bool, reduce_mean: bool = True,
                         num_classes: int = 0, label_dropout: float = 0.) -> LossFn:
  """The discrete-chain loss of `model` (SMLD for a VESDE, DDPM for a VPSDE): `discrete_losses`."""
  if not sde.has_discrete_chain:
    raise ValueError(f'Discrete training (training.continuous=False) needs an SDE with a discrete '
                     f'chain (VESDE: SMLD, VPSDE: DDPM), not {type(sde).__name__}; set '
                     f'training.continuous=True.')

  def per_example(rng, params, model_state, dropout_rng, x, class_labels):
    model_fn = mutils.get_model_fn(model, params, model_state, train=train, rng=dropout_rng,
                                   class_labels=class_labels)
    return discrete_losses(rng, sde, model_fn, x, reduce_mean=reduce_mean)

  return _network_loss_fn(per_example, num_classes, label_dropout)


# ------------------------------------------------------------------------------------------------
# The noise-conditional classifier of classifier guidance


def classifier_losses(rng: Array, sde, log_prob_fn: Callable[[Array, Array], Array], x: Array,
                      labels: Array, eps: float = 1e-5) -> Array:
  """Per-example cross-entropies [B] of a noise-conditional classifier on perturbed data.

  t ~ U(eps, T), x_t = alpha_t x + sigma_t z, loss -log p_t(labels | x_t) with
  log_prob_fn(x, t) -> [B, K] (Song et al. 2021, Sec. 5 and App. I.1: the classifier of
  class-conditional sampling is trained on noisy data at every noise level)."""
  t_rng, z_rng = jax.random.split(rng)
  t = jax.random.uniform(t_rng, (x.shape[0],), minval=eps, maxval=sde.T)
  mean, std = sde.marginal_prob(x, t)
  x_t = mean + batch_mul(std, jax.random.normal(z_rng, x.shape, x.dtype))
  log_probs = log_prob_fn(x_t, t)
  return -jnp.take_along_axis(log_probs, labels[:, None].astype(jnp.int32), axis=1)[:, 0]


def get_classifier_loss_fn(sde, model, train: bool, eps: float = 1e-5) -> LossFn:
  """The loss of a noise-conditional classifier (`classifier_losses`) for batches with labels."""
  eps = sde.check_time(eps)

  def loss_fn(rng, params, model_state, batch):
    x, mask = _data_and_mask(batch)
    labels = _batch_labels(batch, 'The classifier loss')
    rng, dropout_rng = jax.random.split(rng)
    log_prob_fn = mutils.get_class_log_prob_fn(sde, model, params, model_state, train=train,
                                               rng=dropout_rng)
    return _batch_mean(classifier_losses(rng, sde, log_prob_fn, x, labels, eps), mask), model_state

  return loss_fn


OBJECTIVES = ('score', 'classifier')


def get_objective(config) -> str:
  """config.training.objective: 'score' (a score network, the default) or 'classifier' (a
  noise-conditional classifier for classifier guidance)."""
  objective = str(config.training.get('objective', 'score'))
  if objective not in OBJECTIVES:
    raise ValueError(f'Unknown config.training.objective {objective!r}; valid choices: '
                     f'{list(OBJECTIVES)}.')
  return objective


def get_loss_fn(config, sde, model, train: bool) -> LossFn:
  """The loss that config.training selects: continuous SDE loss, or the discrete chain's, or
  (training.objective = 'classifier') the noise-conditional classifier's cross-entropy. Class-
  conditional networks (model.num_classes > 0) train with training.label_dropout when `train`."""
  if get_objective(config) == 'classifier':
    return get_classifier_loss_fn(sde, model, train)
  tc = config.training
  labels = dict(num_classes=layers.num_classes(config),
                label_dropout=_check_label_dropout(config) if train else 0.)
  likelihood_weighting = bool(tc.likelihood_weighting)
  importance_sampling = bool(tc.get('importance_sampling', False))
  if tc.continuous:
    return get_sde_loss_fn(sde, model, train, reduce_mean=tc.reduce_mean, continuous=True,
                           likelihood_weighting=likelihood_weighting,
                           importance_sampling=importance_sampling, **labels)
  if likelihood_weighting or importance_sampling:
    raise ValueError('Likelihood weighting and importance sampling need continuous training '
                     '(training.continuous=True); the discrete SMLD / DDPM losses have neither.')
  return get_discrete_loss_fn(sde, model, train, reduce_mean=tc.reduce_mean, **labels)


