"""The train state, the optimizer and the jitted train / eval steps.

`TrainState` is the one pytree a run carries (step, params, optimizer state, EMA, model state,
rng); `init_train_state` builds it replicated on the mesh; `get_train_step` fuses
config.training.n_jitted_steps optimizer steps of the loss that `losses.get_loss_fn` selects into
one jitted program; `get_eval_step` evaluates that loss on the EMA parameters (no optimizer).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

import losses
import parallel
from models import utils as mutils
import xla_settings  # the library's XLA:CPU defaults, set before JAX starts

Array = jax.Array


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
# Jitted train and eval steps


def _check_batch(batch, mesh, leading_axes: int) -> None:
  """Shape check before compiling: the batch axis exists and the device count divides it."""
  for leaf in jax.tree_util.tree_leaves(batch):
    if np.ndim(leaf) <= leading_axes:
      raise ValueError(f'Expected a batch with {leading_axes} leading axes before the batch axis '
                       f'(train: [n_jitted_steps, B, ...], eval: [B, ...]); got shape '
                       f'{np.shape(leaf)}.')
    parallel.check_batch_size(np.shape(leaf)[leading_axes], mesh)


def get_eval_step(config, sde, model, *, mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """eval_step(state, batch, rng=None) -> the loss of config.training's objective on the EMA
  params, batch leaves [B, ...] (config.eval.batch_size), sharded on B over the mesh's 'data'
  axis; rng defaults to a key folded from state.rng (pass distinct keys for independent draws).
  Needs no optimizer."""
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch_size(config.eval.batch_size, mesh, 'eval batch size')
  loss_fn = losses.get_loss_fn(config, sde, model, train=False)
  repl = parallel.replicated(mesh)

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


def get_train_step(config, sde, model, optimizer: optax.GradientTransformation, *,
                   mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """train_step(state, batch) -> (state, losses): n optimizer steps fused in one jitted program.

  Batch leaves [n, B, ...] (n = the number of fused steps, config.training.n_jitted_steps in the
  training loop), losses [n]. Each step splits state.rng, so a run is deterministic given
  config.seed and independent of the device count. A step whose loss or gradient is not finite
  is SKIPPED (params, optimizer state, EMA and step unchanged; only the rng advances) and reports
  a NaN loss, so the state stays usable and the training loop can stop with a clear message.

  The state is replicated over the mesh and the batch sharded on B over 'data'; the state
  argument is donated. The n fused steps are a lax.scan on accelerators and straight-line code
  on CPU (see below).
  """
  mesh = parallel.make_mesh() if mesh is None else mesh
  parallel.check_batch_size(config.training.batch_size, mesh, 'training batch size')
  loss_fn = losses.get_loss_fn(config, sde, model, train=True)
  repl = parallel.replicated(mesh)

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
