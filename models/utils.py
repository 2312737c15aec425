"""Model registry, initialization, and the one place that turns a network into a score function."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sde_lib
from models import layers
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
  """Shape of a model input batch under this config: [B, H, W, C] images, or [B, D] vectors
  (`datasets.dataset_info(config).batch_shape`)."""
  import datasets
  return datasets.dataset_info(config, count=False, check=False).batch_shape(batch_size)


def check_input_shape(config, shape: Optional[Sequence[int]] = None) -> Tuple[int, ...]:
  """Raises a ValueError, before any tracing, unless the configured network takes inputs of this
  per-example `shape` (default: the config's own, input_shape(config)[1:]); returns that shape.

  Checks that `shape` is the config's data shape (`datasets.dataset_info(config).shape`) and
  that the config's image size fits the U-Net's downsampling (len(ch_mult) levels) and
  model.attn_resolutions.
  """
  expected = tuple(int(s) for s in input_shape(config)[1:])
  data = config.data
  fields = (f'config.data.dataset={data.dataset!r}' if len(expected) == 1 else
            f'config.data.image_size={data.image_size}, config.data.num_channels={data.num_channels}')
  if shape is not None and tuple(int(s) for s in shape) != expected:
    raise ValueError(f'Input of shape {tuple(shape)} per example, but the {config.model.name} '
                     f'network of this config takes {expected} ({fields}).')
  m = config.model
  if len(expected) == 3 and 'ch_mult' in m and 'attn_resolutions' in m:
    try:
      layers.unet_resolutions((1, *expected), len(m.ch_mult), tuple(m.attn_resolutions))
    except ValueError as e:
      raise ValueError(f'config.data.image_size={data.image_size} does not fit the '
                       f'{m.name} network (model.ch_mult={tuple(m.ch_mult)}, '
                       f'model.attn_resolutions={tuple(m.attn_resolutions)}): {e} Change the '
                       f'image size or those model fields.') from None
  return expected


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
    closed = jex_core.ClosedJaxpr(pe.dce_jaxpr(closed.jaxpr, True, instantiate=True)[0],
                                  closed.consts)
  except (ImportError, AttributeError, TypeError):
    pass
  out = jex_core.jaxpr_as_fun(closed)(*jax.tree_util.tree_leaves(args))
  return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)


def get_model_fn(model: nn.Module, params, model_state=None, *, train: bool = False,
                 rng: Optional[jax.Array] = None, class_labels: Optional[jax.Array] = None
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """A function (x, labels) -> network output for fixed parameters; dropout only when training.

  `class_labels` [B] condition a class-conditional network (model.num_classes > 0); None leaves
  it unconditional (the null label)."""
  variables = {'params': params, **(model_state or {})}
  # Only class-conditional networks take the keyword: the others keep their plain signature.
  extra = {} if class_labels is None else {'class_labels': class_labels}

  def model_fn(x, labels):
    rngs = {'dropout': rng} if (train and rng is not None) else {}
    return model.apply(variables, x, labels, train=train, rngs=rngs, **extra)

  return model_fn


def get_score_fn(sde: sde_lib.SDE, model: nn.Module, params, model_state=None, *,
                 train: bool = False, continuous: bool = False, rng: Optional[jax.Array] = None,
                 class_labels: Optional[jax.Array] = None
                 ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Turns a network into score_fn(x, t) with t in continuous time (0, T], x: [B, ...], t: [B].

  The SDE owns the parametrization: the network sees `sde.network_labels(t, continuous)` (VP /
  sub-VP: t * 999, or the DDPM step index when discrete; VE: sigma_t, or the index of the
  descending SMLD levels when discrete) and its output becomes a score through
  `sde.score_from_output` (noise prediction: -output / sigma; VE networks output the score).
  `class_labels` [B] give a class-conditional network's score of p_t(x | y); None its
  unconditional score (the null label). Raises ValueError (before tracing) when x and t disagree
  on the batch size.
  """
  model_fn = get_model_fn(model, params, model_state, train=train, rng=rng,
                          class_labels=class_labels)

  def score_fn(x, t):
    _check_batch(x, t)
    output = model_fn(x, sde.network_labels(t, continuous))
    return sde.score_from_output(output, sde.network_std(t, continuous).astype(x.dtype))

  return score_fn


def _check_batch(x: jax.Array, t: jax.Array) -> None:
  """Raises before tracing when x and t disagree on the batch size."""
  if jnp.ndim(t) != 1 or t.shape[0] != x.shape[0]:
    raise ValueError(f'x and t must share the batch size: x has shape {tuple(x.shape)}, '
                     f't has shape {tuple(jnp.shape(t))}; t must be [B] with B = {x.shape[0]}.')


def classifier_noise_labels(sde: sde_lib.SDE, t: jax.Array) -> jax.Array:
  """The noise-conditional classifier's input label at time t [B]: sigma_t / alpha_t =
  exp(-lambda_t), the VE-equivalent noise level (sigma_t itself for the VE SDE, as the original's
  classifier saw), positive and increasing in t for every SDE."""
  return jnp.exp(-sde.log_snr(t))


def get_class_log_prob_fn(sde: sde_lib.SDE, model: nn.Module, params, model_state=None, *,
                          train: bool = False, rng: Optional[jax.Array] = None
                          ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Turns a noise-conditional classifier (logits out, e.g. 'wideresnet') into
  log_prob_fn(x, t) -> [B, K]: log p_t(y | x) of noisy inputs x [B, ...] at times t [B].

  The classifier sees `classifier_noise_labels(sde, t)`. Each example's output depends only on
  that example (per-example normalisation), which classifier guidance relies on."""
  model_fn = get_model_fn(model, params, model_state, train=train, rng=rng)

  def log_prob_fn(x, t):
    _check_batch(x, t)
    return jax.nn.log_softmax(model_fn(x, classifier_noise_labels(sde, t)), axis=-1)

  return log_prob_fn
