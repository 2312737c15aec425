"""Every experiment config builds its network with exactly the original's parameter count.

Counts are taken with jax.eval_shape of model.init (no allocation, no compile).
Expected totals come from REFERENCE.md (counted on the PyTorch port, whose
shapes match the original JAX networks). For the two networks the port cannot
build (NCSN v1 and the unconditional DDPM) the expected totals are derived
below by an independent layer-by-layer count from the published architectures;
the same counters first reproduce the reference totals of their validated
siblings (NCSNv2 and the conditional DDPM), so they cannot drift silently.
"""
import importlib
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import utils as mutils

REFERENCE_COUNTS = {
    'subvp/cifar10_ddpm_continuous': 35_218_947,
    'subvp/cifar10_ddpmpp_continuous': 61_804_419,
    'subvp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'subvp/cifar10_ncsnpp_continuous': 62_693_251,
    'subvp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    've/bedroom_ncsnpp_continuous': 65_574_549,
    've/celeba_ncsnpp': 62_693_251,
    've/celebahq_256_ncsnpp_continuous': 65_574_549,
    've/celebahq_ncsnpp_continuous': 105_785_896,
    've/church_ncsnpp_continuous': 65_574_549,
    've/cifar10_ddpm': 35_218_947,
    've/cifar10_ncsnpp': 62_693_251,
    've/cifar10_ncsnpp_continuous': 62_758_915,
    've/cifar10_ncsnpp_deep_continuous': 107_587_075,
    've/ffhq_256_ncsnpp_continuous': 65_574_549,
    've/ffhq_ncsnpp_continuous': 105_785_896,
    've/ncsnv2/bedroom': 83_445_379,
    've/ncsnv2/celeba': 29_694_083,
    've/ncsnv2/cifar10': 29_694_083,
    'vp/cifar10_ddpmpp': 61_804_419,
    'vp/cifar10_ddpmpp_continuous': 61_804_419,
    'vp/cifar10_ddpmpp_deep_continuous': 106_632_579,
    'vp/cifar10_ncsnpp': 62_693_251,
    'vp/cifar10_ncsnpp_continuous': 62_693_251,
    'vp/cifar10_ncsnpp_deep_continuous': 107_521_411,
    'vp/ddpm/bedroom': 111_569_923,
    'vp/ddpm/celebahq': 111_569_923,
    'vp/ddpm/church': 111_569_923,
    'vp/ddpm/cifar10': 35_218_947,
    'vp/ddpm/cifar10_continuous': 35_218_947,
}


# ---------------------------------------------------------------------------
# Independent counters (plain arithmetic over the published architectures).
# ---------------------------------------------------------------------------


def conv(cin, cout, k=3, bias=True):
  return k * k * cin * cout + (cout if bias else 0)


def ddpm_count(nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,), channels=3,
               conditional=True):
  """DDPM U-Net (Ho et al. 2020): GN(2C) + conv + [dense] + GN + conv (+ NIN shortcut) per block."""
  temb = 4 * nf

  def res(cin, cout):
    n = 2 * cin + conv(cin, cout) + 2 * cout + conv(cout, cout)
    n += (temb * cout + cout) if conditional else 0
    return n + (cin * cout + cout if cin != cout else 0)

  def attn(c):
    return 2 * c + 4 * (c * c + c)

  n = (nf * temb + temb + temb * temb + temb) if conditional else 0
  n += conv(channels, nf)
  hs, cin = [nf], nf
  for lvl, mult in enumerate(ch_mult):
    for _ in range(num_res_blocks):
      n += res(cin, nf * mult) + (attn(nf * mult) if lvl in attn_levels else 0)
      cin = nf * mult
      hs.append(cin)
    if lvl != len(ch_mult) - 1:
      n += conv(cin, cin)  # stride-2 conv
      hs.append(cin)
  n += 2 * res(cin, cin) + attn(cin)
  for lvl in reversed(range(len(ch_mult))):
    for _ in range(num_res_blocks + 1):
      n += res(cin + hs.pop(), nf * ch_mult[lvl])
      cin = nf * ch_mult[lvl]
    n += attn(cin) if lvl in attn_levels else 0
    n += conv(cin, cin) if lvl != 0 else 0  # upsample conv
  return n + 2 * cin + conv(cin, channels)


def refinenet_count(nf=128, channels=3, num_classes=None, stages=None, refine=None):
  """NCSN RefineNet: unconditional InstanceNorm++ (NCSNv2) or conditional (NCSN v1, num_classes).

  A norm has 3 C parameters (alpha, gamma, beta), or 3 C per class when conditional;
  NCSNv2's RefineBlocks have no norms, NCSN v1's CondRefineBlocks normalise before
  every RCU conv, every CRP stage and every fusion conv.
  """
  cond = num_classes is not None

  def norm(c):
    return 3 * c * (num_classes if cond else 1)

  def res_block(cin, cout, down, dilation):
    n = norm(cin)
    if down:
      n += conv(cin, cin) + norm(cin) + conv(cin, cout)
      n += conv(cin, cout) if dilation > 1 else conv(cin, cout, k=1)  # shortcut
    else:
      n += conv(cin, cout) + norm(cout) + conv(cout, cout)
      n += 0 if cin == cout else conv(cin, cout, k=1)
    return n

  def rcu(c, n_blocks):  # n_blocks x 2 stages of (norm) act conv (no bias)
    return n_blocks * 2 * (conv(c, c, bias=False) + (norm(c) if cond else 0))

  def crp(c):  # 2 stages of (norm) pool conv (no bias)
    return 2 * (conv(c, c, bias=False) + (norm(c) if cond else 0))

  def refine_block(cins, cout, end):
    n = sum(rcu(c, 1) for c in cins)  # adapters: RCU with 2 blocks = rcu(c, 1) * 2
    n = 2 * n
    if len(cins) > 1:
      n += sum(conv(c, cout) + (norm(c) if cond else 0) for c in cins)
    return n + crp(cout) + rcu(cout, 3 if end else 1)

  n = conv(channels, nf)
  cin, feats = nf, []
  for mult, down, dilation in stages:
    n += res_block(cin, nf * mult, down, dilation) + res_block(nf * mult, nf * mult, False, dilation)
    cin = nf * mult
    feats.append(cin)
  prev = None
  for i, (c, mult) in enumerate(zip(reversed(feats), refine)):
    cins = [c] if prev is None else [c, prev]
    n += refine_block(cins, nf * mult, end=i == len(feats) - 1)
    prev = nf * mult
  return n + norm(nf) + conv(nf, channels)


STAGES_64 = [(1, False, 1), (2, True, 1), (2, True, 2), (2, True, 4)]
STAGES_128 = [(1, False, 1), (2, True, 1), (2, True, 1), (4, True, 2), (4, True, 4)]


def test_independent_counters_reproduce_reference():
  """The hand counters reproduce the reference totals they can be checked against."""
  assert ddpm_count() == REFERENCE_COUNTS['vp/ddpm/cifar10']
  assert ddpm_count(ch_mult=(1, 1, 2, 2, 4, 4), attn_levels=(4,)) == REFERENCE_COUNTS['vp/ddpm/bedroom']
  assert refinenet_count(stages=STAGES_64, refine=(2, 2, 1, 1)) == REFERENCE_COUNTS['ve/ncsnv2/cifar10']
  assert (refinenet_count(stages=STAGES_128, refine=(4, 2, 2, 1, 1))
          == REFERENCE_COUNTS['ve/ncsnv2/bedroom'])


# Derived: DDPM without noise conditioning drops the two embedding denses (128->512->512:
# 328,704) and the 512 -> C dense of each of the 22 res blocks (513 x 4,992 output channels
# in all: 2,560,896): 35,218,947 - 2,889,600 = 32,329,347.
# NCSN v1 (L=10 noise levels, ngf 128): the NCSNv2-64 RefineNet with every norm made
# conditional (3 C per level) and norms added inside the refine blocks: 30,117,635 for
# CIFAR-10 and for CelebA (L=10); the _124/_1245 ablations use L=232 / L=500 levels.
DERIVED_COUNTS = {
    'vp/ddpm/cifar10_unconditional': ddpm_count(conditional=False),
    've/ncsn/cifar10': refinenet_count(num_classes=10, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/cifar10_5': refinenet_count(num_classes=10, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/cifar10_124': refinenet_count(num_classes=232, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/cifar10_1245': refinenet_count(num_classes=232, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/celeba': refinenet_count(num_classes=10, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/celeba_5': refinenet_count(num_classes=10, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/celeba_124': refinenet_count(num_classes=500, stages=STAGES_64, refine=(2, 2, 1, 1)),
    've/ncsn/celeba_1245': refinenet_count(num_classes=500, stages=STAGES_64, refine=(2, 2, 1, 1)),
}


def test_derived_counts_documented():
  assert DERIVED_COUNTS['vp/ddpm/cifar10_unconditional'] == 32_329_347
  assert DERIVED_COUNTS['ve/ncsn/cifar10'] == 30_117_635


ALL_COUNTS = {**REFERENCE_COUNTS, **DERIVED_COUNTS}


def load_config(name):
  return importlib.import_module('configs.' + name.replace('/', '.')).get_config()


# Knobs that change no parameter shape; configs that differ only in them share one trace.
_SHAPE_FREE = ('ema_rate', 'sigma_min', 'sigma_max', 'beta_min', 'beta_max', 'dropout')


_COUNTS_BY_SHAPE = {}


def count_params(config):
  """Parameter count of the config's network (memoised over configs with the same shapes)."""
  model_cfg = {k: v for k, v in config.model.to_dict().items() if k not in _SHAPE_FREE}
  key = json.dumps([model_cfg, mutils.input_shape(config, 1), config.training.continuous],
                   sort_keys=True, default=str)
  if key not in _COUNTS_BY_SHAPE:
    _COUNTS_BY_SHAPE[key] = _trace_count(config)
  return _COUNTS_BY_SHAPE[key]


def _trace_count(config):
  model = mutils.create_model(config)
  shape = mutils.input_shape(config, 1)
  labels = jnp.ones((1,), jnp.float32)
  variables = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)},
                                                jnp.zeros(shape), labels, train=False))
  return sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(variables['params']))


def test_every_config_is_counted():
  assert len(ALL_COUNTS) == 39


@pytest.mark.parametrize('name', sorted(ALL_COUNTS))
def test_param_count(name):
  assert count_params(load_config(name)) == ALL_COUNTS[name]


@pytest.mark.parametrize('name', sorted(ALL_COUNTS))
def test_config_family_settings(name):
  """Each config names its SDE, sampler and EMA; fixes the original's config defects."""
  config = load_config(name)
  sde = config.training.sde
  assert sde == {'ve': 'vesde', 'vp': 'vpsde', 'subvp': 'subvpsde'}[name.split('/')[0]]
  assert config.sampling.method == 'pc'
  assert config.sampling.predictor and config.sampling.corrector
  if sde == 'vesde':
    assert not config.data.centered
  else:
    assert config.data.centered and config.training.reduce_mean and config.model.ema_rate == 0.9999
  if config.model.name.startswith('ncsn') and config.model.name != 'ncsnpp':
    # NCSN / NCSNv2 are discrete (the original's bedroom config misspelled this knob).
    assert config.training.continuous is False
    assert (config.sampling.predictor, config.sampling.corrector) == ('none', 'ald')
