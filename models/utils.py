"""Model registry, initialization, and the one place that turns a network into a score function."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from registry import Registry
import xla_settings  # noqa: F401  (the library's XLA:CPU defaults, set before JAX starts)

# Modules that register networks on import; the registry imports them on a miss
# so that importing models.utils stays cheap and free of import cycles.
_MODEL_MODULES = ('models.mlp', 'models.ncsnpp', 'models.ddpm', 'models.ncsnv2', 'models.ncsn',
                  'models.wideresnet')


def _import_all() -> None:
  for module in _MODEL_MODULES:
    try:
      importlib.import_module(module)
    except ModuleNotFoundError as e:
      if e.name != module:  # a real missing dependency, not an absent optional module
        raise


MODELS: Registry[type] = Registry('model', on_miss=_import_all)


def register_model(cls=None, *, name: Optional[str] = None):
  """Class decorator that registers a network under `name` (default: the class name)."""
  return MODELS.register(cls, name=name)


def get_model(name: str) -> type:
  """The network class registered under `name`; a ValueError lists the known names."""
  return MODELS.get(name)


def registered_models() -> Tuple[str, ...]:
  """Names of every registered network."""
  return MODELS.names()


def get_sigmas(config) -> np.ndarray:
  """SMLD noise levels of a config, descending: exp(linspace(log sigma_max, log sigma_min, num_scales))."""
  return np.exp(np.linspace(np.log(config.model.sigma_max), np.log(config.model.sigma_min),
                            config.model.num_scales))


def create_model(config) -> nn.Module:
  """Instantiates the network named by `config.model.name` for this config."""
  return get_model(config.model.name)(config=config)


def input_shape(config, batch_size: int = 1) -> Tuple[int, ...]:
  """Shape of a model input batch under this config: [B, H, W, C] images, or [B, D] vectors."""
  data = config.data
  if getattr(data, 'dim', None):  # vector data (toy sets)
    return (batch_size, int(data.dim))
  return (batch_size, data.image_size, data.image_size, data.num_channels)


def init_model(rng: jax.Array, config, batch_size: int = 1) -> Tuple[nn.Module, Any, Any]:
  """Builds and initializes the config's network: returns (model, params, model_state).

  The parameters are computed without running the network: `model.init` is traced once (on a
  batch of `batch_size`, abstractly), every operation that does not feed a variable (the forward
  pass) is dropped, and what remains (the initializers' random draws and scalings) runs op by
  op. That gives the same values, bit for bit, as a jitted `model.init` without compiling a
  program for the whole network: compiling it took XLA:CPU ~0.45 GiB of memory at nf = 32
  (benchmarks/train_step.py prints the peak RSS after initialization).
  """
  model = create_model(config)
  shape = input_shape(config, batch_size)

  def init(rng):
    params_rng, dropout_rng = jax.random.split(rng)
    return model.init({'params': params_rng, 'dropout': dropout_rng},
                      jnp.zeros(shape, jnp.float32), jnp.zeros((shape[0],), jnp.float32),
                      train=False)

  variables = dict(_eval_outputs_only(init, rng))
  params = variables.pop('params')
  return model, params, variables


def _eval_outputs_only(fn: Callable, *args):
  """fn(*args) evaluated op by op on the part of its program that its outputs depend on."""
  from jax.extend import core as jex_core
  closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
  try:  # dead-code elimination of the jaxpr (private API; without it the values are the same)
    from jax._src.interpreters import partial_eval as pe
    closed = jex_core.ClosedJaxpr(pe.dce_jaxpr(closed.jaxpr, [True] * len(closed.out_avals))[0],
                                  closed.consts)
  except (ImportError, AttributeError, TypeError):
    pass
  out = jex_core.jaxpr_as_fun(closed)(*jax.tree_util.tree_leaves(args))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)


def get_model_fn(model: nn.Module, params, model_state=None, *, train: bool = False,
                 rng: Optional[jax.Array] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A function (x, labels) -> network output for fixed parameters; dropout only when training."""
  variables = {'params': params, **(model_state or {})}

  def model_fn(x, labels):
    rngs = {'dropout': rng} if (train and rng is not None) else {}
    return model.apply(variables, x, labels, train=train, rngs=rngs)

  return model_fn


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, params, model_state=None, *,
                 train: bool = False, continuous: bool = False,
                 rng: Optional[jax.Array] = None) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Turns a network into score_fn(x, t) with t in continuous time (0, T].

  VP / sub-VP networks predict noise: score = -output / std, with time labels
  t * 999 (continuous, and always for sub-VP) or the DDPM step index t (N - 1)
  (discrete, std from the discrete chain). VE networks output the score; their
  labels are sigma(t) (continuous) or the index of the descending SMLD noise
  levels (discrete).
  """
  model_fn = get_model_fn(model, params, model_state, train=train, rng=rng)

  if isinstance(sde, (sde_lib.VPSDE, sde_lib.subVPSDE)):
    def score_fn(x, t):
      if continuous or isinstance(sde, sde_lib.subVPSDE):
        labels = t * 999
        std = sde.marginal_prob(jnp.zeros_like(x), t)[1]
      else:
        labels = t * (sde.N - 1)
        std = jnp.asarray(sde.sqrt_1m_alphas_cumprod, x.dtype)[labels.astype(jnp.int32)]
      return sde_lib.batch_mul(-1. / std, model_fn(x, labels))
  elif isinstance(sde, sde_lib.VESDE):
    def score_fn(x, t):
      if continuous:
        labels = sde.marginal_prob(jnp.zeros_like(x), t)[1]
      else:
        # Index into descending sigmas: t = T is level 0 (sigma_max).
        labels = jnp.round((sde.T - t) * (sde.N - 1)).astype(jnp.int32)
      return model_fn(x, labels)
  else:
    raise ValueError(f'Unsupported SDE {type(sde).__name__}; valid: VESDE, VPSDE, subVPSDE.')

  def checked_score_fn(x, t):
    _check_batch(x, t)
    return score_fn(x, t)

  return checked_score_fn


def _check_batch(x: jax.Array, t: jax.Array) -> None:
  """Raises before tracing when x and t disagree on the batch size."""
  if jnp.ndim(t) != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f'x and t must share the batch size: x has shape {tuple(x.shape)}, '
                     f't has shape {tuple(jnp.shape(t))}; t must be [B] with B = {x.shape[0]}.')
