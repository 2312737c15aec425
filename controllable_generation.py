"""Controllable generation with score models: inpainting, colorization and guided sampling.

Conditional generation from a score model (Song et al. 2021, Sec. 5 and App. I):

- `inpaint(rng, sde, score_fn, data, mask)` and `colorize(rng, sde, score_fn, gray)`: the
  replacement method. At every step of predictor-corrector sampling the known part of x is
  replaced by a fresh sample of its forward perturbation, alpha_t y + sigma_t z, so only the
  unknown part follows the reverse SDE (Song et al. 2021, App. I.2). Colorization does this in an
  orthonormal "decoupled" colour basis whose first axis is the grey level (1, 1, 1) / sqrt(3): the
  grey level is known, the two chroma axes are generated (App. I.3). The output equals the known
  part exactly and, with `denoise`, the last predictor step's noise-free mean elsewhere.
  Unlike the original (score_sde, 2021): the denoised output's unknown part is the predictor's
  mean (the original rebuilt it from the already-noised x, keeping the last step's noise); the
  prior noise is drawn in the decoupled space and the known part starts from its perturbation at
  T (the original masked the noise in RGB and started from the clean known part).
- Guidance is a transform of the score function, so every sampler (PC, ODE, fast solvers) and
  the replacement method take a guided score unchanged:
  `classifier_guided_score_fn`: s(x, t) + scale * grad_x log p_t(y | x) (Song et al. 2021, eq. 14;
  Dhariwal & Nichol 2021 for the scale), for any SDE and any noise-conditional classifier;
  `cfg_score_fn`: classifier-free guidance (1 + w) s(x, t | y) - w s(x, t) (Ho & Salimans 2022,
  eq. 6, with eps = -sigma_t s).
- `inpainting_mask`: the mask presets of the config path; `class_labels`: a label spec ('all' for
  a class-balanced batch, or class ids) as a label batch.

Every function validates its arguments (ValueError naming the bad value) before any tracing.
"""
from __future__ import annotations

import functools
from typing import Callable, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

import ode
import sampling
import sde_lib
from sde_lib import batch_mul

Array = jax.Array
ScoreFn = Callable[[Array, Array], Array]
LogProbFn = Callable[[Array, Array], Array]

# Orthonormal colour basis (columns): the grey axis (1, 1, 1) / sqrt(3) and two chroma axes
# orthogonal to it. decouple(x) = x @ GREY_BASIS, couple(y) = y @ GREY_BASIS.T; being orthonormal,
# it maps N(0, I) noise to N(0, I) noise, so the forward SDE looks the same in both bases.
GREY_BASIS = np.stack([np.array([1., 1., 1.]) / np.sqrt(3.),
                       np.array([-2., 1., 1.]) / np.sqrt(6.),
                       np.array([0., 1., -1.]) / np.sqrt(2.)], axis=1).astype(np.float32)

MASK_PRESETS = ('left_half', 'right_half', 'center', 'random_pixels:<fraction>')


def decouple(x: Array) -> Array:
  """RGB [..., 3] -> decoupled colour coordinates [..., 3] (first: the grey level times sqrt(3))."""
  return jnp.einsum('...i,ij->...j', x, jnp.asarray(GREY_BASIS, x.dtype))


def couple(y: Array) -> Array:
  """The inverse of `decouple`: decoupled coordinates [..., 3] -> RGB."""
  return jnp.einsum('...j,ij->...i', y, jnp.asarray(GREY_BASIS, y.dtype))


# ------------------------------------------------------------------------------------------------
# Argument checks (before any tracing).


def _is_concrete(v) -> bool:
  return not isinstance(v, jax.core.Tracer)


def _check_nonnegative(name: str, value):
  """A non-negative finite scalar (traced values pass unchecked)."""
  if _is_concrete(value):
    v = np.asarray(value)
    if v.ndim != 0 or not np.isfinite(v) or v < 0:
      raise ValueError(f'{name} must be a non-negative finite number, got {value!r}.')
  return value


def _check_labels(labels, num_classes: Optional[int] = None):
  """Integer class labels, a scalar or [B], in [0, num_classes) (traced labels pass unchecked)."""
  if not _is_concrete(labels):
    return labels
  arr = np.asarray(labels)
  if arr.ndim > 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
    raise ValueError(f'labels must be integer class ids, a scalar or [B], got {labels!r}.')
  bad = arr[(arr < 0) | ((arr >= num_classes) if num_classes is not None else False)]
  if bad.size:
    valid = f'[0, {num_classes})' if num_classes is not None else '[0, K)'
    raise ValueError(f'labels {sorted(set(bad.tolist()))[:10]} lie outside the valid class ids '
                     f'{valid}.')
  return jnp.asarray(arr, jnp.int32)


def _check_mask(mask, data_shape: Tuple[int, ...]) -> Array:
  """A {0, 1} mask broadcastable to data_shape (1 where known), as float32."""
  shape = tuple(np.shape(mask))
  try:
    ok = np.broadcast_shapes(shape, data_shape) == data_shape
  except ValueError:
    ok = False
  if not ok:
    raise ValueError(f'mask of shape {shape} does not broadcast to the data shape {data_shape}.')
  if _is_concrete(mask):
    values = np.unique(np.asarray(mask))
    if not np.all(np.isin(values, (0., 1.))):
      raise ValueError(f'mask must hold 0 (unknown) and 1 (known) only, got values {values[:10]}.')
  return jnp.asarray(mask, jnp.float32)


def _check_gray(gray) -> Array:
  """Grey images [B, H, W, 3] whose three channels are equal."""
  gray = jnp.asarray(gray)
  if gray.ndim != 4 or gray.shape[-1] != 3:
    raise ValueError(f'gray images must be [B, H, W, 3] with equal R, G, B channels, got shape '
                     f'{tuple(gray.shape)}.')
  if _is_concrete(gray):
    g = np.asarray(gray, np.float64)
    diff = np.abs(g - g[..., :1]).reshape(g.shape[0], -1).max(axis=1)
    tol = 1e-6 * max(1., float(np.abs(g).max()))
    if np.any(diff > tol):
      i = int(np.argmax(diff))
      raise ValueError(f'gray images must have equal R, G, B channels: example {i} has channels '
                       f'differing by up to {diff[i]:.4g}; pass e.g. '
                       'jnp.repeat(x.mean(-1, keepdims=True), 3, -1).')
  return gray


# ------------------------------------------------------------------------------------------------
# The replacement method: predictor-corrector sampling with the known part re-imposed.


def _to_latent(x: Array, decoupled: bool) -> Array:
  return decouple(x) if decoupled else x


def _from_latent(y: Array, decoupled: bool) -> Array:
  return couple(y) if decoupled else y


def _impose_known(rng, x, vec_t, sde, known, mask, *, decoupled):
  """x with the known part (mask 1) of its latent coordinates (`decoupled`: the colour basis; else
  x itself) replaced by a fresh draw of p_0t(. | known) (Song et al. 2021, App. I.2): pc_sample's
  constraint."""
  mean, std = sde.marginal_prob(known, vec_t)
  noisy = mean + batch_mul(std, jax.random.normal(rng, known.shape, known.dtype))
  return _from_latent(jnp.where(mask > 0.5, noisy, _to_latent(x, decoupled)), decoupled)


# Static arguments of pc_sample's jitted loop: created once, so that calls share its compilation.
_CONSTRAINTS = {d: functools.partial(_impose_known, decoupled=d) for d in (False, True)}


def _replacement_sample(rng, sde, score_fn, known, mask, *, decoupled, predictor, corrector, snr,
                        n_steps, eps, denoise, probability_flow) -> Tuple[Array, int]:
  """pc_sample with the known part re-imposed before the corrector and the predictor; the output
  is the known part exactly (t = 0) and the last step's mean (`denoise`) or sample elsewhere."""
  # Prior noise drawn in the latent basis (the same law: the basis is orthonormal), from the key
  # pc_sample would use for it; the first step replaces its known part by the data's perturbation.
  init_rng, _ = jax.random.split(rng)
  x_init = _from_latent(sde.prior_sampling(init_rng, known.shape), decoupled)
  x, nfe = sampling.pc_sample(rng, sde, score_fn, known.shape, predictor=predictor,
                              corrector=corrector, snr=snr, n_steps=n_steps, eps=eps,
                              denoise=denoise, probability_flow=probability_flow, x_init=x_init,
                              constraint=_CONSTRAINTS[decoupled], constraint_args=(known, mask))
  return _from_latent(jnp.where(mask > 0.5, known, _to_latent(x, decoupled)), decoupled), nfe


def inpaint(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, data: Array, mask: Array, *,
            predictor: str = 'reverse_diffusion', corrector: str = 'langevin', snr: float = 0.16,
            n_steps: int = 1, eps: float = 1e-3, denoise: bool = True,
            probability_flow: bool = False) -> Tuple[Array, int]:
  """Completes data [B, ...] where mask == 0 by the replacement method: (samples, nfe).

  `mask` broadcasts to data.shape, 1 where data is known, 0 where it is generated. The sampler is
  pc_sample's (sde.N steps from T to eps, `predictor` / `corrector` from sampling.PREDICTORS /
  CORRECTORS, the corrector first); before the corrector and before the predictor the known
  part is replaced by alpha_t data + sigma_t z. The samples equal `data` exactly where mask == 1
  and are the last predictor step's noise-free mean elsewhere when `denoise`. nfe = score
  evaluations, as pc_sample's. Raises ValueError for a mask that does not broadcast or is not
  0 / 1, and for pc_sample's bad arguments."""
  data = jnp.asarray(data)
  ode.check_shape(data.shape)
  mask = _check_mask(mask, tuple(data.shape))
  return _replacement_sample(rng, sde, score_fn, data, mask, decoupled=False, predictor=predictor,
                             corrector=corrector, snr=snr, n_steps=n_steps, eps=eps,
                             denoise=denoise, probability_flow=probability_flow)


def colorize(rng: Array, sde: sde_lib.SDE, score_fn: ScoreFn, gray: Array, *,
             predictor: str = 'reverse_diffusion', corrector: str = 'langevin', snr: float = 0.16,
             n_steps: int = 1, eps: float = 1e-3, denoise: bool = True,
             probability_flow: bool = False) -> Tuple[Array, int]:
  """Colours grey images [B, H, W, 3] (equal channels): (samples [B, H, W, 3], nfe).

  The replacement method in the decoupled basis (`decouple`): its grey axis is known and
  re-imposed, the two chroma axes are generated; the samples' grey level (channel mean) equals
  the input's. Same keywords as `inpaint`. Raises ValueError when gray is not [B, H, W, 3] with
  equal channels, and for pc_sample's bad arguments."""
  gray = _check_gray(gray)
  mask = jnp.asarray([1., 0., 0.], jnp.float32)  # in the decoupled basis: the grey axis is known
  return _replacement_sample(rng, sde, score_fn, decouple(gray.astype(jnp.float32)), mask,
                             decoupled=True, predictor=predictor, corrector=corrector, snr=snr,
                             n_steps=n_steps, eps=eps, denoise=denoise,
                             probability_flow=probability_flow)


# ------------------------------------------------------------------------------------------------
# Guidance: transforms of the score function.


def classifier_guided_score_fn(score_fn: ScoreFn, log_prob_fn: LogProbFn, labels,
                               scale=1.0, *, num_classes: Optional[int] = None) -> ScoreFn:
  """score_fn(x, t) + scale * grad_x log p_t(labels | x): the guided score_fn(x, t).

  `log_prob_fn(x, t) -> [B, K]` gives class log-probabilities of noisy inputs at time t (a
  noise-conditional classifier, `models.utils.get_class_log_prob_fn`, or an exact posterior). Each
  example's log-probability must depend on that example only (then the gradient of their sum is
  the per-example gradient). With scale 1 and the exact p_t(y | x) this is the score of
  p_t(x | y) (Bayes; Song et al. 2021, eq. 14); scale > 1 sharpens it towards p(y | x)^scale.
  Works for every SDE (the time t is the sampler's). `labels`: one class id or [B]; scale >= 0;
  both may be traced (then unchecked). Raises ValueError for a negative scale, labels outside
  [0, num_classes) (when given; else [0, K) at the first call) or of the wrong batch size."""
  labels = _check_labels(labels, num_classes)
  scale = _check_nonnegative('scale (the classifier guidance scale)', scale)

  def guided(x, t):
    y = jnp.broadcast_to(labels, (x.shape[0],)) if jnp.ndim(labels) == 0 else labels
    if y.shape != (x.shape[0],):
      raise ValueError(f'labels have shape {tuple(y.shape)} but the batch has {x.shape[0]} '
                       'examples; pass one label or one per example.')

    def log_prob_of_labels(x):
      log_probs = log_prob_fn(x, t)
      if _is_concrete(labels):
        _check_labels(np.asarray(labels), log_probs.shape[-1])
      return jnp.sum(jnp.take_along_axis(log_probs, y[:, None], axis=1))

    return score_fn(x, t) + scale * jax.grad(log_prob_of_labels)(x)

  return guided


def cfg_score_fn(cond_score_fn: ScoreFn, uncond_score_fn: ScoreFn, w) -> ScoreFn:
  """Classifier-free guidance: (1 + w) cond_score_fn(x, t) - w uncond_score_fn(x, t).

  Ho & Salimans (2022), eq. 6, written for scores (eps = -sigma_t score makes the two forms the
  same): w = 0 is the conditional model (and then costs one evaluation: `cond_score_fn` is
  returned), w > 0 sharpens it. w may be traced (then unchecked). Raises ValueError for w < 0."""
  w = _check_nonnegative('w (the classifier-free guidance strength)', w)
  if _is_concrete(w) and float(w) == 0.:
    return cond_score_fn

  def guided(x, t):
    return (1. + w) * cond_score_fn(x, t) - w * uncond_score_fn(x, t)

  return guided


# ------------------------------------------------------------------------------------------------
# Presets of the config path.


def inpainting_mask(preset: str, shape: Sequence[int], seed: int = 0) -> np.ndarray:
  """The {0, 1} mask (1 = known) of a preset for images of `shape` [B, H, W, C], float32.

  The preset names the region to fill in: 'left_half' / 'right_half' (columns below / from W/2),
  'center' (the central H/2 x W/2 square), 'random_pixels:<fraction>' (that fraction of each
  image's pixels, all channels, drawn per image from `seed`). Geometric masks are [1, H, W, 1],
  random ones [B, H, W, 1]. Raises ValueError for an unknown preset or a fraction outside (0, 1).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != 4:
    raise ValueError(f'Mask presets are for images [B, H, W, C], got shape {shape}.')
  b, h, w, _ = shape
  name, _, arg = str(preset).partition(':')
  mask = np.ones((1, h, w, 1), np.float32)
  if name == 'left_half' and not arg:
    mask[:, :, :w // 2] = 0.
  elif name == 'right_half' and not arg:
    mask[:, :, w // 2:] = 0.
  elif name == 'center' and not arg:
    mask[:, h // 4:h // 4 + h // 2, w // 4:w // 4 + w // 2] = 0.
  elif name == 'random_pixels' and arg:
    try:
      fraction = float(arg)
    except ValueError:
      fraction = float('nan')
    if not 0. < fraction < 1.:
      raise ValueError(f"Mask preset {preset!r}: the fraction of missing pixels must lie in "
                       f"(0, 1), e.g. 'random_pixels:0.5'.")
    rng = np.random.default_rng(seed)
    n_missing = int(round(fraction * h * w))
    mask = np.ones((b, h * w), np.float32)
    for row in mask:
      row[rng.permutation(h * w)[:n_missing]] = 0.
    mask = mask.reshape(b, h, w, 1)
  else:
    raise ValueError(f'Unknown inpainting mask preset {preset!r}; valid choices: '
                     f'{list(MASK_PRESETS)}.')
  return mask


def class_labels(spec: Union[str, int, Sequence[int]], n: int, num_classes: int,
                 offset: int = 0) -> np.ndarray:
  """n class labels [n] int32 from a spec: 'all' (class-balanced: (offset + i) mod K), or class
  ids (an int, a sequence, or a string '3' / '1,4,7') repeated to fill n.

  Raises ValueError for an empty or non-integer spec or ids outside [0, num_classes)."""
  if num_classes < 1:
    raise ValueError(f'Class labels need a class-conditional model (num_classes >= 1), got '
                     f'num_classes={num_classes}.')
  if isinstance(spec, str) and spec.strip().lower() == 'all':
    return ((offset + np.arange(n)) % num_classes).astype(np.int32)
  try:
    if isinstance(spec, str):
      ids = [int(s) for s in spec.split(',')]  # int('3.5') raises
    else:
      arr = np.atleast_1d(np.asarray(spec))
      ids = arr.astype(int).tolist() if np.all(arr == np.round(arr)) else []
  except (TypeError, ValueError):
    ids = []
  if not ids:
    raise ValueError(f"Class labels {spec!r}: give 'all' or class ids such as 3 or '1,4,7'.")
  _check_labels(np.asarray(ids), num_classes)
  return np.resize(np.asarray(ids, np.int32), n)
