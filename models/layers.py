"""Layers shared by the score networks: DDPM blocks (Ho et al. 2020) and NCSN RefineNet blocks.

All modules work on NHWC arrays. `dtype` is the computation dtype (parameters
stay float32); see `compute_dtype`.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from models.up_or_down_sampling import naive_upsample_2d

Array = jax.Array

ACTIVATIONS = {
    'elu': nn.elu,
    'relu': nn.relu,
    'lrelu': functools.partial(nn.leaky_relu, negative_slope=0.2),
    'swish': nn.swish,
}
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def check_choice(name: str, value: Any, choices) -> Any:
  """Returns `value` if it is one of `choices`, else raises a ValueError naming both."""
  if value not in choices:
    raise ValueError(f'Unknown {name} {value!r}; valid choices: {list(choices)}.')
  return value


def get_act(config) -> Callable[[Array], Array]:
  """The activation named by config.model.nonlinearity (elu, relu, lrelu, swish)."""
  name = str(config.model.nonlinearity).lower()
  return ACTIVATIONS[check_choice('model.nonlinearity', name, ACTIVATIONS)]


def compute_dtype(config) -> Any:
  """The computation dtype of config.model.dtype ('float32' default, or 'bfloat16')."""
  name = str(config.model.get('dtype', 'float32'))
  return DTYPES[check_choice('model.dtype', name, DTYPES)]


# Random draws are made flat and reshaped: with jax_threefry_partitionable (the default in this
# JAX) the compile time of a draw grows steeply with its rank (~20 s for one 4-D conv kernel on
# CPU, under 1 s flat), and a network has hundreds of them. The values are as good; only the
# layout of the random stream differs.


def flat_uniform(key: Array, shape: Sequence[int], dtype: Any = jnp.float32, minval: float = 0.,
                 maxval: float = 1.) -> Array:
  """U[minval, maxval) of `shape`, drawn as a flat vector (fast to compile)."""
  n = int(np.prod(shape))
  return jax.random.uniform(key, (n,), dtype, minval, maxval).reshape(shape)


def flat_normal(key: Array, shape: Sequence[int], dtype: Any = jnp.float32) -> Array:
  """Standard normal of `shape`, drawn as a flat vector (fast to compile)."""
  return jax.random.normal(key, (int(np.prod(shape)),), dtype).reshape(shape)


def variance_scaling(scale: float, mode: str, distribution: str) -> Callable[..., Array]:
  """jax.nn.initializers.variance_scaling (in axis -2, out axis -1) with flat draws."""
  check_choice('variance scaling mode', mode, ('fan_in', 'fan_out', 'fan_avg'))
  check_choice('variance scaling distribution', distribution, ('uniform', 'normal'))

  def init(key, shape, dtype=jnp.float32):
    receptive = int(np.prod(shape[:-2])) if len(shape) > 2 else 1
    fan_in = shape[-2] * receptive if len(shape) > 1 else shape[-1]
    fan_out = shape[-1] * receptive
    denominator = {'fan_in': fan_in, 'fan_out': fan_out, 'fan_avg': (fan_in + fan_out) / 2}[mode]
    variance = scale / denominator
    if distribution == 'uniform':
      limit = math.sqrt(3 * variance)
      return flat_uniform(key, shape, dtype, -limit, limit)
    return flat_normal(key, shape, dtype) * math.sqrt(variance)

  return init


def default_init(scale: float = 1.) -> Callable[..., Array]:
  """DDPM's initializer: variance scaling, fan_avg, uniform; scale 0 means 1e-10 (near-zero)."""
  scale = 1e-10 if scale == 0 else scale
  return variance_scaling(scale, 'fan_avg', 'uniform')


class Dropout(nn.Module):
  """Inverted dropout with the 'dropout' rng (flat mask draw, see above); identity when deterministic."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    if deterministic or self.rate == 0.:
      return x
    keep = 1. - self.rate
    mask = flat_uniform(self.make_rng('dropout'), x.shape) < keep
    return jnp.where(mask, x / keep, 0.).astype(x.dtype)


def group_norm(channels: int, dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.GroupNorm:
  """GroupNorm with min(C // 4, 32) groups (32 for every original config; small nets still work)."""
  return nn.GroupNorm(num_groups=max(1, min(channels // 4, 32)), epsilon=1e-6, dtype=dtype,
                      name=name)


def ddpm_conv(x: Array, out_planes: int, kernel: int = 3, stride: int = 1, bias: bool = True,
              dilation: int = 1, init_scale: float = 1., padding: Any = 'SAME',
              dtype: Any = jnp.float32) -> Array:
  """kernel x kernel convolution with DDPM initialization (call inside a compact method)."""
  return nn.Conv(out_planes, (kernel, kernel), strides=(stride, stride), padding=padding,
                 kernel_dilation=(dilation, dilation), use_bias=bias,
                 kernel_init=default_init(init_scale), dtype=dtype)(x)


ddpm_conv3x3 = functools.partial(ddpm_conv, kernel=3)
ddpm_conv1x1 = functools.partial(ddpm_conv, kernel=1)


def _torch_conv_init(kernel_shape, init_scale: float):
  """PyTorch's default conv init (as NCSN v1/v2 used), scaled: U(+-1/sqrt(fan_in)) for w and b."""
  init_scale = 1e-10 if init_scale == 0 else init_scale
  fan_in = int(np.prod(kernel_shape[:-1]))
  bound = init_scale / math.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return flat_uniform(key, shape, dtype, -bound, bound)

  return init


def ncsn_conv(x: Array, out_planes: int, kernel: int = 3, stride: int = 1, bias: bool = True,
              dilation: int = 1, init_scale: float = 1., dtype: Any = jnp.float32) -> Array:
  """Convolution with NCSN's (PyTorch default) initialization and SAME padding."""
  init = _torch_conv_init((kernel, kernel, x.shape[-1], out_planes), init_scale)
  return nn.Conv(out_planes, (kernel, kernel), strides=(stride, stride), padding='SAME',
                 kernel_dilation=(dilation, dilation), use_bias=bias, kernel_init=init,
                 bias_init=init, dtype=dtype)(x)


ncsn_conv3x3 = functools.partial(ncsn_conv, kernel=3)
ncsn_conv1x1 = functools.partial(ncsn_conv, kernel=1)


def get_timestep_embedding(timesteps: Array, embedding_dim: int, max_positions: int = 10000) -> Array:
  """Sinusoidal embedding of [B] (possibly fractional) time steps, as in DDPM and Transformers."""
  if timesteps.ndim != 1:
    raise ValueError(f'timesteps must be [B], got shape {timesteps.shape}.')
  half_dim = embedding_dim // 2
  freqs = jnp.exp(-math.log(max_positions) / (half_dim - 1) * jnp.arange(half_dim, dtype=jnp.float32))
  emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=1)
  if embedding_dim % 2 == 1:  # zero pad
    emb = jnp.pad(emb, [[0, 0], [0, 1]])
  return emb


def num_classes(config) -> int:
  """Classes of a class-conditional score network (config.model.num_classes; 0: unconditional)."""
  n = config.model.get('num_classes', 0)
  if isinstance(n, bool) or int(n) != n or n < 0:
    raise ValueError(f'model.num_classes must be a non-negative integer (0: unconditional), got {n!r}.')
  return int(n)


class ClassEmbedding(nn.Module):
  """Embedding [B, features] of class labels [B] in {0..num_classes}; label num_classes is the null
  label (no class), learned like the others, so one network gives conditional and unconditional
  scores (classifier-free guidance, Ho & Salimans 2022)."""
  num_classes: int
  features: int

  @nn.compact
  def __call__(self, class_labels: Optional[Array], batch_size: int) -> Array:
    table = self.param('embedding', lambda key, shape: flat_normal(key, shape),
                       (self.num_classes + 1, self.features))
    if class_labels is None:
      class_labels = jnp.full((batch_size,), self.num_classes, jnp.int32)
    if class_labels.shape != (batch_size,):
      raise ValueError(f'class_labels must be [B] with B = {batch_size}, got shape {class_labels.shape}.')
    return table[class_labels.astype(jnp.int32)]


def add_class_embedding(config, temb: Optional[Array], class_labels: Optional[Array],
                        batch_size: int) -> Optional[Array]:
  """temb + the class embedding when config.model.num_classes > 0 (class_labels None: the null
  label); temb unchanged for an unconditional network, which refuses class labels. Call inside a
  compact method (the embedding's parameters belong to the calling network)."""
  n = num_classes(config)
  if n == 0:
    if class_labels is not None:
      raise ValueError('This network is not class-conditional (model.num_classes = 0) but got '
                       'class labels; set model.num_classes to train a conditional one.')
    return temb
  if temb is None:
    raise ValueError(f'model.num_classes = {n} adds the class embedding to the noise embedding, '
                     'which model.conditional = False turns off; set model.conditional = True.')
  return temb + ClassEmbedding(n, temb.shape[-1], name='class_embedding')(
      class_labels, batch_size).astype(temb.dtype)


class NIN(nn.Module):
  """Network-in-network: a per-pixel dense layer (1x1 convolution) with DDPM init."""
  num_units: int
  init_scale: float = 0.1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    w = self.param('W', default_init(self.init_scale), (x.shape[-1], self.num_units))
    b = self.param('b', nn.initializers.zeros, (self.num_units,))
    x = x.astype(self.dtype)
    return jnp.tensordot(x, w.astype(self.dtype), axes=1) + b.astype(self.dtype)


def spatial_attention(h: Array, q: Array, k: Array, v: Array) -> Array:
  """Softmax attention over all pixels of [B, H, W, C] maps (softmax in float32 for bf16 runs)."""
  b, hh, ww, c = q.shape
  w = jnp.einsum('bhwc,bHWc->bhwHW', q, k) * (int(c) ** (-0.5))
  w = jax.nn.softmax(w.reshape(b, hh, ww, hh * ww).astype(jnp.float32), axis=-1)
  w = w.reshape(b, hh, ww, hh, ww).astype(v.dtype)
  return jnp.einsum('bhwHW,bHWc->bhwc', w, v)


class AttnBlock(nn.Module):
  """Self-attention over pixels (DDPM); with `skip_rescale` the residual sum is divided by sqrt 2."""
  skip_rescale: bool = False
  init_scale: float = 0.
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    h = group_norm(c, self.dtype)(x)
    q = NIN(c, dtype=self.dtype)(h)
    k = NIN(c, dtype=self.dtype)(h)
    v = NIN(c, dtype=self.dtype)(h)
    h = NIN(c, init_scale=self.init_scale, dtype=self.dtype)(spatial_attention(h, q, k, v))
    return (x + h) / np.sqrt(2.) if self.skip_rescale else x + h


class Upsample(nn.Module):
  """Nearest-neighbour upsampling by 2, optionally followed by a 3x3 convolution (DDPM)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = naive_upsample_2d(x, factor=2)
    if self.with_conv:
      h = ddpm_conv3x3(h, self.out_ch or x.shape[-1], dtype=self.dtype)
    return h


class Downsample(nn.Module):
  """Downsampling by 2: stride-2 3x3 convolution or 2x2 average pooling (TF 'SAME' padding)."""
  out_ch: Optional[int] = None
  with_conv: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.with_conv:
      # TF SAME padding of a stride-2 3x3 conv on an even size pads one pixel after only.
      return ddpm_conv3x3(x, self.out_ch or x.shape[-1], stride=2, padding=((0, 1), (0, 1)),
                          dtype=self.dtype)
    return nn.avg_pool(x, (2, 2), strides=(2, 2), padding='SAME')


class ResnetBlockDDPM(nn.Module):
  """DDPM residual block: GN-act-conv, + dense(time embedding), GN-act-dropout-conv, NIN shortcut."""
  act: Callable[[Array], Array]
  out_ch: Optional[int] = None
  conv_shortcut: bool = False
  dropout: float = 0.1
  skip_rescale: bool = False
  init_scale: float = 0.
  conv_size: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Optional[Array] = None, train: bool = False) -> Array:
    c = x.shape[-1]
    out_ch = self.out_ch or c
    h = self.act(group_norm(c, self.dtype)(x))
    h = ddpm_conv(h, out_ch, kernel=self.conv_size, dtype=self.dtype)
    if temb is not None:  # a per-channel bias from the noise-level embedding
      h += nn.Dense(out_ch, kernel_init=default_init(), dtype=self.dtype)(self.act(temb))[:, None, None, :]
    h = self.act(group_norm(out_ch, self.dtype)(h))
    h = Dropout(self.dropout)(h, deterministic=not train)
    h = ddpm_conv(h, out_ch, kernel=self.conv_size, init_scale=self.init_scale, dtype=self.dtype)
    if c != out_ch:
      if self.conv_shortcut:
        x = ddpm_conv(x, out_ch, kernel=self.conv_size, dtype=self.dtype)
      else:
        x = NIN(out_ch, dtype=self.dtype)(x)
    return (x + h) / np.sqrt(2.) if self.skip_rescale else x + h


# ---------------------------------------------------------------------------
# NCSN v1 / v2 RefineNet blocks. Conditional variants (NCSN v1) normalise with
# a noise-level-conditional norm `norm(x, y)`; unconditional ones (NCSN v2)
# take `norm(x)`. One class per block serves both: `normalizer` builds a norm
# module and `conditional` says whether it takes the labels.
# ---------------------------------------------------------------------------


def _apply_norm(normalizer: Callable[[], nn.Module], conditional: bool, x: Array,
                y: Optional[Array]) -> Array:
  return normalizer()(x, y) if conditional else normalizer()(x)


class CRPBlock(nn.Module):
  """Chained residual pooling: n_stages of (norm) -> 5x5 pool -> conv, each added to the input."""
  features: int
  n_stages: int
  act: Callable[[Array], Array] = nn.relu
  normalizer: Optional[Callable[[], nn.Module]] = None  # conditional norms only (NCSN v1)
  maxpool: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Optional[Array] = None) -> Array:
    x = self.act(x)
    path = x
    pool = nn.max_pool if self.maxpool else functools.partial(nn.avg_pool, count_include_pad=True)
    for _ in range(self.n_stages):
      if self.normalizer is not None:
        path = self.normalizer()(path, y)
      path = pool(path, (5, 5), strides=(1, 1), padding='SAME')
      path = ncsn_conv3x3(path, self.features, bias=False, dtype=self.dtype)
      x = path + x
    return x


class RCUBlock(nn.Module):
  """Residual conv units: n_blocks residual blocks of n_stages ((norm) -> act -> conv)."""
  features: int
  n_blocks: int
  n_stages: int
  act: Callable[[Array], Array] = nn.relu
  normalizer: Optional[Callable[[], nn.Module]] = None  # conditional norms only (NCSN v1)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Optional[Array] = None) -> Array:
    for _ in range(self.n_blocks):
      residual = x
      for _ in range(self.n_stages):
        if self.normalizer is not None:
          x = self.normalizer()(x, y)
        x = self.act(x)
        x = ncsn_conv3x3(x, self.features, bias=False, dtype=self.dtype)
      x = x + residual
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion: (norm) -> conv each input, resize bilinearly to `shape`, sum."""
  features: int
  normalizer: Optional[Callable[[], nn.Module]] = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array], shape: Sequence[int], y: Optional[Array] = None) -> Array:
    sums = 0.
    for x in xs:
      h = self.normalizer()(x, y) if self.normalizer is not None else x
      h = ncsn_conv3x3(h, self.features, bias=True, dtype=self.dtype)
      if tuple(h.shape[1:3]) != tuple(shape):
        h = jax.image.resize(h, (h.shape[0], *shape, self.features), 'bilinear')
      sums = sums + h
    return sums


class RefineBlock(nn.Module):
  """RefineNet block: RCU adapters per input, multi-resolution fusion, CRP, output RCU."""
  output_features: int
  act: Callable[[Array], Array] = nn.relu
  normalizer: Optional[Callable[[], nn.Module]] = None  # conditional norm (NCSN v1) or None
  start: bool = False
  end: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, xs: Sequence[Array], output_shape: Sequence[int],
               y: Optional[Array] = None) -> Array:
    kw = dict(act=self.act, normalizer=self.normalizer, dtype=self.dtype)
    hs = [RCUBlock(x.shape[-1], 2, 2, **kw)(x, y) for x in xs]
    if len(hs) > 1:
      h = MSFBlock(self.output_features, normalizer=self.normalizer, dtype=self.dtype)(hs, output_shape, y)
    else:
      h = hs[0]
    # NCSN v2 pools with max, NCSN v1's conditional CRP with mean.
    h = CRPBlock(self.output_features, 2, maxpool=self.normalizer is None, **kw)(h, y)
    return RCUBlock(self.output_features, 3 if self.end else 1, 2, **kw)(h, y)


class ConvMeanPool(nn.Module):
  """Convolution followed by 2x2 mean pooling (NCSN's downsampling)."""
  output_dim: int
  kernel_size: int = 3
  biases: bool = True
  adjust_padding: bool = False  # 28x28 inputs: pad one pixel top-left so 7x7 stays even-sized
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.adjust_padding:
      x = jnp.pad(x, [[0, 0], [1, 0], [1, 0], [0, 0]])
    h = ncsn_conv(x, self.output_dim, kernel=self.kernel_size, bias=self.biases, dtype=self.dtype)
    return (h[:, ::2, ::2] + h[:, 1::2, ::2] + h[:, ::2, 1::2] + h[:, 1::2, 1::2]) / 4.


class ResidualBlock(nn.Module):
  """NCSN residual block: norm-act-conv-norm-act-conv with optional downsampling or dilation.

  `resample='down'` halves the resolution with a mean-pooling conv when
  `dilation == 1`, and keeps it (a dilated conv) otherwise, as NCSN did.
  """
  output_dim: int
  normalizer: Callable[[], nn.Module]
  conditional: bool = False
  resample: Optional[str] = None
  act: Callable[[Array], Array] = nn.elu
  adjust_padding: bool = False
  dilation: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, y: Optional[Array] = None) -> Array:
    check_choice('resample', self.resample, (None, 'down'))
    c = x.shape[-1]
    h = self.act(_apply_norm(self.normalizer, self.conditional, x, y))
    if self.resample == 'down':
      h = ncsn_conv3x3(h, c, dilation=self.dilation, dtype=self.dtype)
      h = self.act(_apply_norm(self.normalizer, self.conditional, h, y))
      if self.dilation > 1:
        h = ncsn_conv3x3(h, self.output_dim, dilation=self.dilation, dtype=self.dtype)
        shortcut = ncsn_conv3x3(x, self.output_dim, dilation=self.dilation, dtype=self.dtype)
      else:
        h = ConvMeanPool(self.output_dim, adjust_padding=self.adjust_padding, dtype=self.dtype)(h)
        shortcut = ConvMeanPool(self.output_dim, kernel_size=1, adjust_padding=self.adjust_padding,
                                dtype=self.dtype)(x)
    else:
      if self.output_dim == c:
        shortcut = x
      elif self.dilation > 1:
        shortcut = ncsn_conv3x3(x, self.output_dim, dilation=self.dilation, dtype=self.dtype)
      else:
        shortcut = ncsn_conv1x1(x, self.output_dim, dtype=self.dtype)
      h = ncsn_conv3x3(h, self.output_dim, dilation=self.dilation, dtype=self.dtype)
      h = self.act(_apply_norm(self.normalizer, self.conditional, h, y))
      h = ncsn_conv3x3(h, self.output_dim, dilation=self.dilation, dtype=self.dtype)
    return h + shortcut


def unet_resolutions(x_shape: Sequence[int], num_resolutions: int,
                     attn_resolutions: Sequence[int]) -> list:
  """The U-Net's feature-map sizes for input [B, H, W, C]; raises on sizes it cannot halve or bad attention sizes."""
  height, width = int(x_shape[1]), int(x_shape[2])
  factor = 2 ** (num_resolutions - 1)
  if height % factor or width % factor:
    raise ValueError(f'Image size {height}x{width} is not divisible by {factor}, the total '
                     f'downsampling of {num_resolutions} resolutions (len(ch_mult)); valid sizes '
                     f'are multiples of {factor}.')
  resolutions = [height // 2 ** i for i in range(num_resolutions)]
  bad = [r for r in attn_resolutions if r not in resolutions]
  if bad:
    raise ValueError(f'attn_resolutions {tuple(attn_resolutions)} has {bad} not among the '
                     f"network's resolutions; valid choices: {resolutions}.")
  return resolutions
