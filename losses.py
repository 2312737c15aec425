"""Score-matching losses, the optimizer, the train state and the jitted train / eval steps.

Losses (semantics of the original score_sde losses.py):
- continuous denoising score matching for VE / VP / sub-VP (`get_sde_loss_fn`), optionally with
  the likelihood weighting lambda(t) = g(t)^2 and importance sampling of t for it;
- the discrete SMLD (NCSN) loss over the SMLD noise levels (`get_smld_loss_fn`);
- the discrete DDPM noise-prediction loss (`get_ddpm_loss_fn`).

Every loss fn is `loss_fn(rng, params, model_state, batch) -> (loss, new_model_state)`, the loss
being a mean over the GLOBAL batch: under `jax.jit` with a batch sharded over the mesh, the mean
is one reduction over all devices, so 1 and N devices give the same loss and gradients. A batch is
an array [B, ...] or a dict with 'image' [B, ...] (and, from evaluation pipelines, 'mask' [B]: 1
for real examples, 0 for padding, which the loss then ignores).

Per-example reduction over data dimensions: mean when `reduce_mean`, else HALF the sum (as the
original: 0.5 * sum, so a sum-reduced loss is the negative log-density scale of the paper).

The networks of this project keep no mutable collections (GroupNorm, no batch statistics), so the
loss fns return `model_state` unchanged.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import parallel
import sde_lib
from models import utils as mutils
import xla_settings  # the library's XLA:CPU defaults, set before JAX starts
from sde_lib import batch_mul

Array = jax.Array
LossFn = Callable[[Array, Any, Any, Any], Tuple[Array, Any]]
ScoreFn = Callable[[Array, Array], Array]
ModelFn = Callable[[Array, Array], Array]

# ------------------------------------------------------------------------------------------------
# Optimizer


OPTIMIZERS = ('Adam', 'AdamW')


def get_optimizer(config) -> optax.GradientTransformation:
  """Adam with linear warmup, global-norm clipping and decoupled weight decay, from config.optim.

  As the original (flax.optim.Adam + optimization_manager): the learning rate at update k
  (k = 0, 1, ...) is lr * min(k / warmup, 1); gradients are clipped to global norm grad_clip
  (no clipping when grad_clip < 0); weight decay is decoupled and scaled by the learning rate,
  which is what flax's Adam did, so 'Adam' and 'AdamW' name the same update here.
  """
  o = config.optim
  if o.optimizer not in OPTIMIZERS:
    raise ValueError(f'Unknown optimizer {o.optimizer!r}; valid choices: {list(OPTIMIZERS)}.')
  if o.grad_clip == 0:
    raise ValueError('optim.grad_clip = 0 would zero every gradient; use a positive norm, or a '
                     'negative value to disable clipping.')
  lr, warmup = float(o.lr), int(o.warmup)
  if not lr > 0:
    raise ValueError(f'optim.lr must be positive, got {o.lr!r}.')

  def schedule(count):
    return lr * jnp.minimum(count / warmup, 1.) if warmup > 0 else lr

  adam = optax.adamw(schedule, b1=float(o.beta1), b2=0.999, eps=float(o.eps),
                     weight_decay=float(o.weight_decay))
  if o.grad_clip < 0:
    return adam
  return optax.chain(optax.clip_by_global_norm(float(o.grad_clip)), adam)


# ------------------------------------------------------------------------------------------------
# Train state


@flax.struct.dataclass
class TrainState:
  """Everything a training run carries from step to step, as one replicated pytree."""
  step: Array  # number of optimizer updates applied
  params: Any
  opt_state: Any
  ema_params: Any  # exponential moving average of params, rate config.model.ema_rate
  model_state: Any  # non-parameter variable collections of the network (empty here)
  rng: Array  # the run's PRNG key; each step splits it, so runs are deterministic given the seed


def _ema_rate(config) -> float:
  rate = config.model.get('ema_rate', None)
  if rate is None or not 0. <= float(rate) < 1.:
    raise ValueError(f'config.model.ema_rate must be set in [0, 1), got {rate!r}.')
  return float(rate)


def init_train_state(rng: Array, config, mesh: Optional[jax.sharding.Mesh] = None
                     ) -> Tuple[Any, TrainState]:
  """Builds the network and its initial state; with a `mesh`, the state is replicated on it.

  Memory: the parameters come from `mutils.init_model` (no forward pass, no whole-network
  program to compile); a small jitted program adds the optimizer state and the EMA copy and, with
  a replicated output, places the state on every device of every host without a host-to-device
  copy (its parameter input is donated)."""
  optimizer = get_optimizer(config)  # validates optim.* before any compilation
  _ema_rate(config)
  params_rng, state_rng = jax.random.split(rng)
  model, params, model_state = mutils.init_model(params_rng, config)

  def assemble(params, model_state, rng):
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      ema_params=jax.tree_util.tree_map(jnp.copy, params),  # own buffers: the
                      model_state=model_state, rng=rng)  # train step donates the state

  out = parallel.replicated(mesh) if mesh is not None else None
  state = jax.jit(assemble, out_shardings=out, donate_argnums=0)(params, model_state, state_rng)
  xla_settings.release_freed_memory()
  return model, state


# ------------------------------------------------------------------------------------------------
# Per-example losses of a score function (pure: tests pass closed-form scores here)


def _reduce(x: Array, reduce_mean: bool) -> Array:
  """Per-example reduction over data dimensions: mean, or half the sum (the original's choice)."""
  x = x.reshape(x.shape[0], -1)
  return jnp.mean(x, axis=-1) if reduce_mean else 0.5 * jnp.sum(x, axis=-1)


def _check_sde(sde) -> None:
  if not isinstance(sde, (sde_lib.VESDE, sde_lib.VPSDE, sde_lib.subVPSDE)):
    raise ValueError(f'Unsupported SDE {type(sde).__name__}; valid: VESDE, VPSDE, subVPSDE.')


def _integrated_beta_inverse(sde, big_b: Array) -> Array:
  """t with B(t) = beta_0 t + (beta_1 - beta_0) t^2 / 2 = big_b (the root in [0, inf))."""
  # 2B / (b0 + sqrt(b0^2 + 2 (b1 - b0) B)): the quadratic's root without cancellation.
  return 2. * big_b / (sde.beta_0 + jnp.sqrt(sde.beta_0 ** 2 + 2. * (sde.beta_1 - sde.beta_0) * big_b))


def _likelihood_weight_primitive(sde, t, xp=jnp):
  """R(t), a primitive of lambda(t) / std(t)^2 = g(t)^2 / std(t)^2 (closed form per SDE).

  With B(t) = int_0^t beta (so mean coefficient a = exp(-B / 2)):
  - VE: g^2 / sigma^2 = 2 log(sigma_max / sigma_min), a constant, so R = 2 log(ratio) t;
  - VP: beta / (1 - e^{-B}) = d/dt log(e^B - 1), so R = log(expm1(B));
  - sub-VP: beta (1 - e^{-2B}) / (1 - e^{-B})^2 = B' (1 + 2 / (e^B - 1)), so
    R = B + 2 log(1 - e^{-B}).
  """
  if isinstance(sde, sde_lib.VESDE):
    return 2. * np.log(sde.sigma_max / sde.sigma_min) * t
  big_b = sde.beta_0 * t + 0.5 * (sde.beta_1 - sde.beta_0) * t ** 2
  if isinstance(sde, sde_lib.VPSDE):
    return xp.log(xp.expm1(big_b))
  return big_b + 2. * xp.log(-xp.expm1(-big_b))


def _likelihood_weight_primitive_inverse(sde, y: Array) -> Array:
  """t with R(t) = y, the inverse of `_likelihood_weight_primitive` (closed form per SDE)."""
  if isinstance(sde, sde_lib.VESDE):
    return y / (2. * np.log(sde.sigma_max / sde.sigma_min))
  if isinstance(sde, sde_lib.VPSDE):
    big_b = jnp.logaddexp(y, 0.)  # e^B - 1 = e^y  =>  B = log(1 + e^y)
  else:
    # With x = e^{-B}, c = e^y: (1 - x)^2 / x = c, x^2 - (2 + c) x + 1 = 0; the root in (0, 1)
    # is 1 / x_big, x_big = (2 + c + sqrt(c (c + 4))) / 2, so B = log1p((c + sqrt(c (c + 4))) / 2).
    c = jnp.exp(y)
    big_b = jnp.log1p(0.5 * (c + jnp.sqrt(c * (c + 4.))))
  return _integrated_beta_inverse(sde, big_b)


def sample_importance_times(rng: Array, sde, n: int, eps: float = 1e-5) -> Tuple[Array, float]:
  """n times from r(t) proportional to lambda(t) / std(t)^2 on [eps, T], and the weight Z / (T - eps).

  Inverse-CDF sampling in closed form: t = R^{-1}(R(eps) + u (R(T) - R(eps))), u ~ U(0, 1), with
  R the primitive of `_likelihood_weight_primitive` and Z = R(T) - R(eps). For a uniform draw the
  likelihood-weighted integrand is lambda(t) / std^2 * h(t); under r it becomes
  lambda / std^2 * h / ((T - eps) r(t)) = Z / (T - eps) * h(t): a constant weight, which keeps
  the expectation unchanged and removes the 1 / t blow-up of the weight near t = 0 (VP, sub-VP).
  """
  _check_sde(sde)
  r_lo, r_hi = (float(_likelihood_weight_primitive(sde, np.float64(s), np)) for s in (eps, sde.T))
  u = jax.random.uniform(rng, (n,))
  t = _likelihood_weight_primitive_inverse(sde, r_lo + u * (r_hi - r_lo))
  return jnp.clip(t, eps, sde.T), (r_hi - r_lo) / (sde.T - eps)


def dsm_losses(rng: Array, sde, score_fn: ScoreFn, x: Array, *, reduce_mean: bool = True,
               likelihood_weighting: bool = False, importance_sampling: bool = False,
               eps: float = 1e-5) -> Array:
  """Per-example continuous denoising score-matching losses [B] of `score_fn` on data x.

  t ~ U(eps, T) (or ~ r(t) with importance sampling), x_t = a(t) x + std(t) z, and the loss is
  reduce((score * std + z)^2), times g(t)^2 / std^2 with likelihood weighting, i.e. the
  original's reduce((score + z / std)^2) g^2 written without dividing by a tiny std.
  """
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


def smld_losses(rng: Array, vesde: sde_lib.VESDE, model_fn: ModelFn, x: Array, *,
                reduce_mean: bool = False) -> Array:
  """Per-example discrete SMLD (NCSN) losses [B]: a uniform level i of the descending sigmas.

  The network sees the level index i and outputs the score; the loss is
  reduce((score - target)^2) sigma_i^2 with target -noise / sigma_i^2, written as
  reduce((score sigma_i + z)^2), the same number.
  """
  sigmas = jnp.asarray(vesde.discrete_sigmas[::-1], x.dtype)  # descending: label 0 is sigma_max
  i_rng, z_rng = jax.random.split(rng)
  labels = jax.random.randint(i_rng, (x.shape[0],), 0, vesde.N)
  sigma = sigmas[labels]
  z = jax.random.normal(z_rng, x.shape, x.dtype)
  score = model_fn(x + batch_mul(sigma, z), labels)
  return _reduce(jnp.square(batch_mul(sigma, score) + z), reduce_mean)


def ddpm_losses(rng: Array, vpsde: sde_lib.VPSDE, model_fn: ModelFn, x: Array, *,
                reduce_mean: bool = True) -> Array:
  """Per-example discrete DDPM losses [B]: reduce((eps_theta(x_i, i) - z)^2), i uniform in [0, N)."""
  i_rng, z_rng = jax.random.split(rng)
  labels = jax.random.randint(i_rng, (x.shape[0],), 0, vpsde.N)
  a = jnp.asarray(vpsde.sqrt_alphas_cumprod, x.dtype)[labels]
  s = jnp.asarray(vpsde.sqrt_1m_alphas_cumprod, x.dtype)[labels]
  z = jax.random.normal(z_rng, x.shape, x.dtype)
  return _reduce(jnp.square(model_fn(batch_mul(a, x) + batch_mul(s, z), labels) - z), reduce_mean)


# ------------------------------------------------------------------------------------------------
# Loss fns of a network: loss_fn(rng, params, model_state, batch) -> (loss, new_model_state)


def _data_and_mask(batch) -> Tuple[Array, Optional[Array]]:
  if isinstance(batch, Mapping):
    return batch['image'], batch.get('mask')
  return batch, None


def _batch_mean(losses: Array, mask: Optional[Array]) -> Array:
  """Mean over the global batch, over real examples only when a padding mask is given."""
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.)


def _network_loss_fn(per_example: Callable[[Array, Any, Any, Array, Array], Array]) -> LossFn:
  """Wraps per_example(rng, params, model_state, dropout_rng, x) -> [B] into a loss fn."""

  def loss_fn(rng, params, model_state, batch):
    x, mask = _data_and_mask(batch)
    rng, dropout_rng = jax.random.split(rng)
    return _batch_mean(per_example(rng, params, model_state, dropout_rng, x), mask), model_state

  return loss_fn


def get_sde_loss_fn(sde, model, train: bool, reduce_mean: bool = True, continuous: bool = True,
                    likelihood_weighting: bool = False, importance_sampling: bool = False,
                    eps: float = 1e-5) -> LossFn:
  """The continuous denoising score-matching loss of `model` under a VE / VP / sub-VP SDE."""
  _check_sde(sde)
  if importance_sampling and not likelihood_weighting:
    raise ValueError('importance_sampling samples t for the likelihood weighting; set '
                     'training.likelihood_weighting=True as well.')

  def per_example(rng, params, model_state, dropout_rng, x):
    score_fn = mutils.get_score_fn(sde, model, params, model_state, train=train,
                                   continuous=continuous, rng=dropout_rng)
    return dsm_losses(rng, sde, score_fn, x, reduce_mean=reduce_mean,
                      likelihood_weighting=likelihood_weighting,
                      importance_sampling=importance_sampling, eps=eps)

  return _network_loss_fn(per_example)


def get_smld_loss_fn(vesde: sde_lib.VESDE, model, train: bool, reduce_mean: bool = False) -> LossFn:
  """The discrete SMLD (NCSN) loss of `model` over the descending sigmas of a VESDE."""
  if not isinstance(vesde, sde_lib.VESDE):
    raise ValueError(f'The SMLD loss needs a VESDE, got {type(vesde).__name__}.')

  def per_example(rng, params, model_state, dropout_rng, x):
    model_fn = mutils.get_model_fn(model, params, model_state, train=train, rng=dropout_rng)
    return smld_losses(rng, vesde, model_fn, x, reduce_mean=reduce_mean)

  return _network_loss_fn(per_example)


def get_ddpm_loss_fn(vpsde: sde_lib.VPSDE, model, train: bool, reduce_mean: bool = True) -> LossFn:
  """The discrete DDPM noise-prediction loss of `model` over the N steps of a VPSDE."""
  if not isinstance(vpsde, sde_lib.VPSDE):
    raise ValueError(f'The DDPM loss needs a VPSDE, got {type(vpsde).__name__}.')

  def per_example(rng, params, model_state, dropout_rng, x):
    model_fn = mutils.get_model_fn(model, params, model_state, train=train, rng=dropout_rng)
    return ddpm_losses(rng, vpsde, model_fn, x, reduce_mean=reduce_mean)

  return _network_loss_fn(per_example)


def get_loss_fn(config, sde, model, train: bool) -> LossFn:
  """The loss that config.training selects: continuous SDE loss, or discrete SMLD / DDPM."""
  _check_sde(sde)
  tc = config.training
  likelihood_weighting = bool(tc.likelihood_weighting)
  importance_sampling = bool(tc.get('importance_sampling', False))
  if tc.continuous:
    return get_sde_loss_fn(sde, model, train, reduce_mean=tc.reduce_mean, continuous=True,
                           likelihood_weighting=likelihood_weighting,
                           importance_sampling=importance_sampling)
  if likelihood_weighting or importance_sampling:
    raise ValueError('Likelihood weighting and importance sampling need continuous training '
                     '(training.continuous=True); the discrete SMLD / DDPM losses have neither.')
  if isinstance(sde, sde_lib.VESDE):
    return get_smld_loss_fn(sde, model, train, reduce_mean=tc.reduce_mean)
  if isinstance(sde, sde_lib.VPSDE):
    return get_ddpm_loss_fn(sde, model, train, reduce_mean=tc.reduce_mean)
  raise ValueError(f'Discrete training (training.continuous=False) exists for VESDE (SMLD) and '
                   f'VPSDE (DDPM) only, not {type(sde).__name__}; set training.continuous=True.')


# ------------------------------------------------------------------------------------------------
# Jitted train and eval steps


def _check_batch(batch, mesh, leading_axes: int) -> None:
  """Shape check before compiling: the batch axis exists and the device count divides it."""
  for leaf in jax.tree_util.tree_leaves(batch):
    if np.ndim(leaf) <= leading_axes:
      raise ValueError(f'Expected a batch with {leading_axes} leading axes before the batch axis '
                       f'(train: [n_jitted_steps, B, ...], eval: [B, ...]); got shape '
                       f'{np.shape(leaf)}.')
    parallel.check_batch_size(np.shape(leaf)[leading_axes], mesh)


def get_step_fn(config, sde, model, optimizer: optax.GradientTransformation, *, train: bool,
                mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """The jitted train step (n steps fused in one program) or eval step of a config.

  train: `step_fn(state, batch) -> (state, losses)`, batch leaves [n, B, ...] (n = the number of
  fused steps, config.training.n_jitted_steps in the training loop), losses [n]. Each step splits
  state.rng, so a run is deterministic given config.seed and independent of the device count.
  A step whose loss or gradient is not finite is SKIPPED (params, optimizer state, EMA and step
  unchanged; only the rng advances) and reports a NaN loss, so the state stays usable and the
  training loop can stop with a clear message on a non-finite loss.

  eval: `eval_step(state, batch, rng=None) -> loss` on the EMA params, batch leaves [B, ...];
  rng defaults to a key folded from state.rng (pass distinct keys for independent draws).

  The state is replicated over the mesh and the batch sharded on B over 'data'; the state
  argument of the train step is donated. The n fused steps are a lax.scan on accelerators and
  straight-line code on CPU (see below).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  batch_size = config.training.batch_size if train else config.eval.batch_size
  parallel.check_batch_size(batch_size, mesh, 'training batch size' if train else 'eval batch size')
  loss_fn = get_loss_fn(config, sde, model, train=train)
  repl = parallel.replicated(mesh)

  if not train:
    def eval_loss(state, batch, rng):
      if rng is None:
        rng = jax.random.fold_in(state.rng, 1)
      return loss_fn(rng, state.ema_params, state.model_state, batch)[0]

    jitted = jax.jit(eval_loss, in_shardings=(repl, parallel.batch_sharding(mesh), repl),
                     out_shardings=repl)

    def eval_step(state, batch, rng=None):
      _check_batch(batch, mesh, 0)
      return jitted(state, batch, rng)

    eval_step.jitted = jitted
    return eval_step

  ema_rate = _ema_rate(config)
  grad_fn = jax.value_and_grad(loss_fn, argnums=1, has_aux=True)

  def one_step(state: TrainState, batch) -> Tuple[TrainState, Array]:
    rng, step_rng = jax.random.split(state.rng)
    (loss, model_state), grads = grad_fn(step_rng, state.params, state.model_state, batch)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = jax.tree_util.tree_map(lambda e, p: e * ema_rate + p * (1. - ema_rate),
                                        state.ema_params, params)
    new = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                     ema_params=ema_params, model_state=model_state, rng=rng)
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(grads))
    new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state.replace(rng=rng))
    return new, jnp.where(finite, loss, jnp.nan)

  # XLA:CPU runs convolutions inside a while loop ~10x slower than outside one (measured: tiny
  # DDPM++ at batch 64, 92 ms per gradient plain, 780 ms as the body of a length-1 scan, even with
  # unroll=True), so on CPU the fused steps are a Python loop inside jit: straight-line code,
  # compile time growing with n_jitted_steps (use 1 on CPU; fusing saves nothing there).
  on_cpu = mesh.devices.flat[0].platform == 'cpu'

  def train_steps(state, batch):
    if not on_cpu:
      return jax.lax.scan(one_step, state, batch)
    step_losses = []
    for i in range(jax.tree_util.tree_leaves(batch)[0].shape[0]):
      state, loss = one_step(state, jax.tree_util.tree_map(lambda b: b[i], batch))
      step_losses.append(loss)
    return state, jnp.stack(step_losses)

  jitted = jax.jit(train_steps, in_shardings=(repl, parallel.batch_sharding(mesh, 1)),
                   out_shardings=(repl, repl), donate_argnums=0)

  compiled = []

  def train_step(state, batch):
    _check_batch(batch, mesh, 1)
    if not compiled:  # compile before the first step runs, and return what compiling left behind
      jitted.lower(state, batch).compile()  # (jitted reuses this compilation)
      xla_settings.release_freed_memory()
      compiled.append(True)
    return jitted(state, batch)

  train_step.jitted = jitted
  return train_step
