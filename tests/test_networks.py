"""Tiny versions of every network: shapes, jit, finite gradients, options, bf16, sigma scaling, errors.

Parameters are random draws into the shapes of jax.eval_shape(model.init)
(the values do not matter for these checks, and it skips compiling the
initializers). Each jitted check compiles one tiny network.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import presets
from configs.default_cifar10_configs import get_default_configs
from models import utils as mutils

B, SIZE = 2, 8


def tiny_config(name, channels=1, continuous=True, **model_overrides):
  """A tiny config of network `name` (nf 8, 8x8 inputs)."""
  config = get_default_configs()
  config.training.continuous = continuous
  config.data.image_size = SIZE
  config.data.num_channels = channels
  if name in ('ncsnpp', 'ddpmpp'):
    (presets.ncsnpp_net if name == 'ncsnpp' else presets.ddpmpp_net)(
        config, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
  elif name == 'ddpm':
    presets.ddpm_net(config, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,))
  elif name in ('ncsn', 'ncsnv2_64', 'ncsnv2_128'):
    presets.ncsn_family(config, name, num_scales=10, snr=0.1, n_steps_each=1, ema_rate=0.)
    config.model.nf = 8
  elif name == 'wideresnet':
    config.model.name = 'wideresnet'
    config.model.blocks_per_group = 1
    config.model.channel_multiplier = 1
    config.model.num_classes = 10
  config.model.update(model_overrides)
  return config


def labels_for(config):
  if config.model.name in ('ncsn', 'ncsnv2_64', 'ncsnv2_128') or not config.training.continuous:
    return jnp.array([0, 7], jnp.int32)  # noise-level indices
  return jnp.array([0.5, 3.0], jnp.float32)  # sigmas (positive, so also valid time labels)


def random_params(model, x, labels, seed=0):
  shapes = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, x, labels))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(0.3 * rng.standard_normal(s.shape), s.dtype), shapes['params'])


def images(config, seed=1):
  shape = (B, SIZE, SIZE, config.data.num_channels)
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


# --- every NCSN++ option, traced shape-only ------------------------------------------------

NCSNPP_VARIANTS = [
    dict(progressive='none', progressive_input='none'),
    dict(progressive='output_skip', progressive_input='input_skip', progressive_combine='cat'),
    dict(progressive='output_skip', progressive_input='input_skip', progressive_combine='sum'),
    dict(progressive='residual', progressive_input='residual'),
    dict(resblock_type='ddpm', progressive='residual', progressive_input='input_skip'),
    dict(resblock_type='ddpm', fir=False, resamp_with_conv=False),
    dict(embedding_type='positional', scale_by_sigma=False),
    dict(conditional=False, skip_rescale=False, init_scale=0.1, nonlinearity='elu'),
]


@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('overrides', NCSNPP_VARIANTS, ids=lambda d: '-'.join(map(str, d.values())))
def test_ncsnpp_options_trace(overrides, channels):
  config = tiny_config('ncsnpp', channels=channels, **overrides)
  model = mutils.create_model(config)
  x, y = images(config), labels_for(config)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, x, y))
  out = jax.eval_shape(lambda v: model.apply(v, x, y, train=True, rngs={'dropout': jax.random.PRNGKey(1)}),
                       variables)
  assert out.shape == x.shape and out.dtype == jnp.float32


@pytest.mark.parametrize('size,ch_mult,attn', [(16, (1, 2, 2), (8, 4)), (8, (1, 2), ())])
@pytest.mark.parametrize('name', ['ncsnpp', 'ddpmpp', 'ddpm'])
def test_unet_sizes_trace(name, size, ch_mult, attn):
  config = tiny_config(name, channels=3, nf=16, ch_mult=ch_mult, attn_resolutions=attn)
  model = mutils.create_model(config)
  x = jnp.zeros((B, size, size, 3))
  out = jax.eval_shape(lambda: model.init_with_output({'params': jax.random.PRNGKey(0)}, x,
                                                      labels_for(config))[0])
  assert out.shape == x.shape


# --- real runs: jit forward + gradient for every network ----------------------------------


JIT_CASES = [
    ('ncsnpp', dict(progressive='output_skip', progressive_input='input_skip',
                    progressive_combine='cat')),
    ('ncsnpp', dict(progressive='residual', progressive_input='residual', resblock_type='ddpm',
                    attn_resolutions=())),
    ('ddpmpp', {}),
    ('ddpm', {}),
    ('ncsnv2_64', {}),
    ('ncsnv2_128', {}),
    ('ncsn', {}),
    ('wideresnet', {}),
]


@pytest.mark.parametrize('name,overrides', JIT_CASES[2:])
def test_jit_forward(name, overrides):
  """Forward pass under jit (gradients of the shared layers are checked below)."""
  config = tiny_config(name, channels=3 if name == 'wideresnet' else 1, **overrides)
  model = mutils.create_model(config)
  x, y = images(config), labels_for(config)
  params = random_params(model, x, y)
  out = jax.jit(lambda p, x: model.apply({'params': p}, x, y, train=True,
                                         rngs={'dropout': jax.random.PRNGKey(3)}))(params, x)
  assert out.shape == ((B, 10) if name == 'wideresnet' else x.shape) and out.dtype == jnp.float32
  assert np.isfinite(np.asarray(out)).all()


# Gradients (slow to compile on CPU): the two NCSN++ cases cover every U-Net layer
# (FIR up/down convs, pyramids, Combine, attention, both res blocks, dropout).
@pytest.mark.parametrize('name,overrides', JIT_CASES[:2])
def test_jit_forward_and_finite_gradients(name, overrides):
  config = tiny_config(name, channels=1, **overrides)
  model = mutils.create_model(config)
  x, y = images(config), labels_for(config)
  params = random_params(model, x, y)

  @jax.jit
  def loss_and_grad(params, x):
    def loss(p, x):
      out = model.apply({'params': p}, x, y, train=True, rngs={'dropout': jax.random.PRNGKey(3)})
      return jnp.mean(out ** 2), out
    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)

  (value, out), (g_params, g_x) = loss_and_grad(params, x)
  assert out.shape == x.shape and out.dtype == jnp.float32
  assert np.isfinite(value) and np.isfinite(np.asarray(out)).all()
  leaves = jax.tree_util.tree_leaves(g_params)
  assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
  assert np.isfinite(np.asarray(g_x)).all() and float(jnp.abs(g_x).sum()) > 0
  # Every parameter but the fixed Fourier features gets a gradient signal.
  flat = jax.tree_util.tree_flatten_with_path(g_params)[0]
  dead = [jax.tree_util.keystr(k) for k, g in flat if not np.any(np.asarray(g))]
  assert all('GaussianFourierProjection' in d for d in dead), dead


# --- bf16 and output scaling ----------------------------------------------------------------


def test_bfloat16_matches_float32():
  config = tiny_config('ncsnpp', channels=3, dropout=0.)
  model32 = mutils.create_model(config)
  x, y = images(config), labels_for(config)
  params = random_params(model32, x, y)
  config16 = tiny_config('ncsnpp', channels=3, dropout=0., dtype='bfloat16')
  model16 = mutils.create_model(config16)
  # Same parameter tree and float32 parameters in both modes.
  shapes16 = jax.eval_shape(lambda: model16.init({'params': jax.random.PRNGKey(0)}, x, y))['params']
  assert jax.tree_util.tree_structure(shapes16) == jax.tree_util.tree_structure(params)
  assert all(s.dtype == jnp.float32 for s in jax.tree_util.tree_leaves(shapes16))
  out32 = jax.jit(lambda p: model32.apply({'params': p}, x, y))(params)
  out16 = jax.jit(lambda p: model16.apply({'params': p}, x, y))(params)
  assert out16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(out16 - out32) / jnp.linalg.norm(out32))
  assert rel < 0.05, rel  # bf16 has an 8-bit mantissa: ~1% error through the network


def test_scale_by_sigma_divides_by_sigma():
  """VE Fourier nets divide by sigma = label; discrete nets by sigmas[label] (geometric, descending)."""
  for name, continuous in [('ncsnpp', True), ('ddpm', False)]:
    small = dict(ch_mult=(1,), attn_resolutions=())  # one resolution: quick to compile
    scaled = tiny_config(name, channels=1, continuous=continuous, scale_by_sigma=True, **small)
    plain = tiny_config(name, channels=1, continuous=continuous, scale_by_sigma=False, **small)
    if name == 'ddpm':
      scaled.model.num_scales = plain.model.num_scales = 10
    x, y = images(scaled), labels_for(scaled)
    m_scaled, m_plain = mutils.create_model(scaled), mutils.create_model(plain)
    params = random_params(m_plain, x, y)
    both = jax.jit(lambda p: (m_scaled.apply({'params': p}, x, y), m_plain.apply({'params': p}, x, y)))
    out_scaled, out_plain = both(params)
    if continuous:
      sigma = np.asarray(y)
    else:  # sigma_max 50 down to sigma_min 0.01 in 10 geometric steps
      sigma = np.geomspace(50., 0.01, 10)[np.asarray(y)]
    np.testing.assert_allclose(out_scaled, out_plain / sigma[:, None, None, None], rtol=1e-5,
                               atol=1e-7)


# --- errors -------------------------------------------------------------------------------


def _init_shapes(config, x=None):
  model = mutils.create_model(config)
  x = images(config) if x is None else x
  return jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, x, labels_for(config)))


@pytest.mark.parametrize('knob,value', [
    ('progressive', 'skip'), ('progressive_input', 'output_skip'), ('progressive_combine', 'max'),
    ('resblock_type', 'resnet'), ('embedding_type', 'learned'), ('normalization', 'BatchNorm'),
    ('nonlinearity', 'gelu'), ('dtype', 'float16'),
])
def test_unknown_options_raise(knob, value):
  with pytest.raises(ValueError, match=f'{value}.*valid choices'):
    _init_shapes(tiny_config('ncsnpp', **{knob: value}))


@pytest.mark.parametrize('name', ['ncsnv2_64', 'ncsn', 'ddpm'])
def test_unknown_norm_or_act_raise(name):
  with pytest.raises(ValueError, match='gelu'):
    _init_shapes(tiny_config(name, nonlinearity='gelu'))
  if name != 'ddpm':
    with pytest.raises(ValueError, match='BatchNorm'):
      _init_shapes(tiny_config(name, normalization='BatchNorm'))


@pytest.mark.parametrize('name', ['ncsnpp', 'ddpm', 'ncsnv2_128'])
def test_indivisible_image_size_raises(name):
  config = tiny_config(name, ch_mult=(1, 2, 2)) if name != 'ncsnv2_128' else tiny_config(name)
  with pytest.raises(ValueError, match='not divisible'):
    _init_shapes(config, jnp.zeros((B, 6, 6, 1)))


@pytest.mark.parametrize('name', ['ncsnpp', 'ddpm'])
def test_bad_attention_resolution_raises(name):
  with pytest.raises(ValueError, match=r'attn_resolutions.*\[8, 4\]'):
    _init_shapes(tiny_config(name, attn_resolutions=(16,)))


def test_fourier_embedding_needs_continuous_training():
  with pytest.raises(ValueError, match='continuous'):
    _init_shapes(tiny_config('ncsnpp', continuous=False, embedding_type='fourier'))


def test_unknown_network_name():
  with pytest.raises(ValueError, match='ncsnpp'):
    mutils.get_model('ncsnpp3')
