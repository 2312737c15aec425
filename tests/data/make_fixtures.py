"""Makes the fixtures of tests/test_original_checkpoints.py with the original implementations.

NOT run by the tests and never imported by the package: run once by hand, outside the project's
import path, on scratch copies of the original repositories (see tests/data/README.md for the
exact commands). The committed outputs are small data files; the test only reads them.

Three stages:

  setup  (any Python): copies the two original repositories to a scratch folder and replaces
         what cannot run there, never the network code: score_sde_pytorch's op/ package builds
         CUDA extensions at import, so op/upfirdn2d.py becomes the original's own pure-torch
         upfirdn2d_native (what the original runs on CPU anyway) and op/__init__.py stops
         importing the fused activation (unused by these networks); score_sde's models/utils.py
         imports flax.optim, flax.training.checkpoints, sde_lib and a classifier, gone from or
         unneeded by current flax, so it is cut down to the two functions the networks call
         (register_model, get_sigmas; same code).

and one stage per original implementation, each in its own Python environment:

  torch  (a venv with torch, numpy, ml_collections): with score_sde_pytorch's own network code,
         tiny NCSN++ (VE), DDPM++ (VP) and DDPM (VP) networks are built, their weights
         randomised, the original's Adam optimizer and ExponentialMovingAverage created, and the
         raw weights moved away from the EMA ones; the checkpoint is written by the original's
         utils.save_checkpoint (torch.save of a dict of optimizer / model / ema / step), DDPM++
         in the legacy (pre-1.6) torch.save format, the others in the zip format. The expected
         outputs are the original network's outputs, with the raw weights and with the EMA
         weights, on a fixed input and noise level. Also two tensor files (zip and legacy
         format) for the restricted-unpickler test, with their values as numpy arrays.
  jax    (this project's venv: current jax / flax): with score_sde's own network code (its
         models/ncsnpp.py, layerspp.py, layers.py, ddpm.py, up_or_down_sampling.py,
         normalization.py; flax.linen code that still runs on current flax), the same three
         tiny networks are initialised, their weights randomised, and the original's training
         state (`step`, `optimizer` {`target`, `state` {`step`, `param_states` {grad_ema,
         grad_sq_ema}}}, `lr`, `model_state`, `ema_rate`, `params_ema`, `rng`: the state dict
         of score_sde's mutils.State with a flax.optim.Adam optimizer, as flax 0.3.1's
         checkpoints.save_checkpoint wrote it) is written with flax.serialization's msgpack,
         GroupNorm scale / bias stored as (1, 1, 1, C) like flax 0.3.1 did
         (flax/linen/normalization.py of the flax-0.3.1 wheel: feature_shape = (1, ..., 1, C)).
         The expected outputs are the original JAX network's outputs on those weights.

Both stages also record the full-size parameter layouts of every released network (RELEASED) in
released_layouts.json.gz: the flax parameter tree (names, shapes as flax 0.3.1 stored them) from
score_sde's code, and from score_sde_pytorch's the state dict (keys in order, shapes), the
parameters that require gradients (what its EMA keeps, in order) and the noise levels (count,
first, last). One of score_sde's configs (ve/ffhq_ncsnpp_continuous) imports torch for a field
nothing reads; the jax stage gives it a stand-in while importing it.

One deliberate change to the originals, for the tiny DDPM only: the original DDPM normalises with
a fixed 32 groups, which no channel count below 128 fits the way this project's networks do
(min(C // 4, 32) groups, identical to 32 for every released config, where C >= 128). The DDPM
fixtures patch the group count to min(C // 4, 32) while building the network; names and shapes
of the parameters are untouched, so the fixture still checks the conversion itself.
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import importlib
import json
import os
import shutil
import sys
import types

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
MANIFEST = os.path.join(HERE, 'fixtures.json')

TINY = {'model.nf': 4, 'model.ch_mult': [1, 1], 'model.num_res_blocks': 1,
        'model.attn_resolutions': [4], 'data.image_size': 8}
# name -> (original config module, extra overrides, labels fed to the network, torch save format)
FIXTURES = {
    # VE, FIR, output_skip pyramid, residual input pyramid, Gaussian Fourier embedding of sigma.
    'ncsnpp_ve': ('configs.ve.cifar10_ncsnpp_continuous',
                  {'model.progressive': 'output_skip', 'data.num_channels': 3}, [0.05, 12.0],
                  'zip'),
    # DDPM++: positional embedding of t * 999, BigGAN residual blocks, no FIR, no pyramids.
    'ddpmpp_vp': ('configs.vp.cifar10_ddpmpp_continuous', {'data.num_channels': 1},
                  [13.7, 802.4], 'legacy'),
    # DDPM: discrete time steps, NIN shortcuts, conv up / downsampling.
    'ddpm_vp': ('configs.vp.ddpm.cifar10', {'data.num_channels': 3}, [17.0, 803.0], 'zip'),
}
STEP = 12345
BATCH = 2

# Every checkpoint the original READMEs list (its path there -> the original config it used),
# whose full-size parameter layouts both stages record in released_layouts.json.gz.
RELEASED = {
    've/cifar10_ncsnpp': 'configs.ve.cifar10_ncsnpp',
    've/cifar10_ncsnpp_continuous': 'configs.ve.cifar10_ncsnpp_continuous',
    've/cifar10_ncsnpp_deep_continuous': 'configs.ve.cifar10_ncsnpp_deep_continuous',
    'vp/cifar10_ddpm': 'configs.vp.ddpm.cifar10',
    'vp/cifar10_ddpm_continuous': 'configs.vp.ddpm.cifar10_continuous',
    'vp/cifar10_ddpmpp': 'configs.vp.cifar10_ddpmpp',
    'vp/cifar10_ddpmpp_continuous': 'configs.vp.cifar10_ddpmpp_continuous',
    'vp/cifar10_ddpmpp_deep_continuous': 'configs.vp.cifar10_ddpmpp_deep_continuous',
    'subvp/cifar10_ddpm_continuous': 'configs.subvp.cifar10_ddpm_continuous',
    'subvp/cifar10_ddpmpp_continuous': 'configs.subvp.cifar10_ddpmpp_continuous',
    'subvp/cifar10_ddpmpp_deep_continuous': 'configs.subvp.cifar10_ddpmpp_deep_continuous',
    've/bedroom_ncsnpp_continuous': 'configs.ve.bedroom_ncsnpp_continuous',
    've/church_ncsnpp_continuous': 'configs.ve.church_ncsnpp_continuous',
    've/ffhq_1024_ncsnpp_continuous': 'configs.ve.ffhq_ncsnpp_continuous',
    've/ffhq_256_ncsnpp_continuous': 'configs.ve.ffhq_256_ncsnpp_continuous',
    've/celebahq_256_ncsnpp_continuous': 'configs.ve.celebahq_256_ncsnpp_continuous',
}
LAYOUTS = os.path.join(HERE, 'released_layouts.json.gz')


def original_config(name):
  module, extra, _, _ = FIXTURES[name]
  config = importlib.import_module(module).get_config()
  for key, value in {**TINY, **extra}.items():
    section, field = key.split('.')
    config[section][field] = tuple(value) if isinstance(value, list) else value
  return config


def inputs(name, channels):
  rng = np.random.RandomState(sorted(FIXTURES).index(name))
  x = rng.standard_normal((BATCH, 8, 8, channels)).astype(np.float32)  # NHWC
  return x, np.asarray(FIXTURES[name][2], np.float32)


def update_manifest(entries):
  manifest = {}
  if os.path.exists(MANIFEST):
    with open(MANIFEST) as f:
      manifest = json.load(f)
  manifest.update(entries)
  with open(MANIFEST, 'w') as f:
    json.dump(dict(sorted(manifest.items())), f, indent=1)
    f.write('\n')


def update_layouts(key, layouts):
  """Stores `layouts` ({release path: [[name, shape], ...]}) under `key` of each release."""
  import gzip
  stored = {}
  if os.path.exists(LAYOUTS):
    with gzip.open(LAYOUTS, 'rt') as f:
      stored = json.load(f)
  for release, layout in layouts.items():
    stored.setdefault(release, {})[key] = layout
  with gzip.GzipFile(LAYOUTS, 'wb', mtime=0) as f:  # mtime 0: the same bytes on every run
    f.write(json.dumps(dict(sorted(stored.items()))).encode())


def manifest_entry(name, fmt, expected, made_with, patched):
  module, extra, _, _ = FIXTURES[name]
  return {'format': fmt, 'config': module[len('configs.'):].replace('.', '/'),
          'overrides': {**TINY, **extra}, 'expected': expected, 'step': STEP,
          'made_with': made_with,
          'patched': 'GroupNorm groups min(C // 4, 32) instead of 32' if patched else None}


# ------------------------------------------------------------------------------------------------
# Scratch copies of the originals

_TORCH_OP_INIT = 'from .upfirdn2d import upfirdn2d\n'
_TORCH_UPFIRDN_HEAD = """# SCRATCH COPY (make_fixtures.py setup): the original builds a CUDA
# extension here at import. On CPU the original's upfirdn2d calls upfirdn2d_native, kept below
# verbatim.
import torch
from torch.nn import functional as F


def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
    return upfirdn2d_native(input, kernel, up, up, down, down, pad[0], pad[1], pad[0], pad[1])


"""
_JAX_UTILS = """# SCRATCH COPY (make_fixtures.py setup): the original models/utils.py imports
# flax.optim, flax.training.checkpoints, sde_lib and a classifier; the networks need only these
# two functions (the original's code).
import jax.numpy as jnp

_MODELS = {}


def register_model(cls=None, *, name=None):
  def _register(cls):
    _MODELS[cls.__name__ if name is None else name] = cls
    return cls
  return _register if cls is None else _register(cls)


def get_model(name):
  return _MODELS[name]


def get_sigmas(config):
  return jnp.exp(jnp.linspace(jnp.log(config.model.sigma_max), jnp.log(config.model.sigma_min),
                              config.model.num_scales))
"""


def setup_stage(score_sde, score_sde_pytorch, scratch):
  torch_copy = os.path.join(scratch, 'score_sde_pytorch')
  jax_copy = os.path.join(scratch, 'score_sde_jax')
  shutil.copytree(score_sde_pytorch, torch_copy)
  shutil.copytree(score_sde, jax_copy)
  path = os.path.join(torch_copy, 'op', 'upfirdn2d.py')
  with open(path) as f:
    source = f.read()
  native = source[source.index('def upfirdn2d_native('):]
  with open(path, 'w') as f:
    f.write(_TORCH_UPFIRDN_HEAD + native)
  with open(os.path.join(torch_copy, 'op', '__init__.py'), 'w') as f:
    f.write(_TORCH_OP_INIT)
  with open(os.path.join(jax_copy, 'models', 'utils.py'), 'w') as f:
    f.write(_JAX_UTILS)
  print(f'Scratch copies in {torch_copy} and {jax_copy}.')


# ------------------------------------------------------------------------------------------------
# PyTorch original (score_sde_pytorch)


def torch_stage(original):
  sys.path.insert(0, original)
  import torch
  import losses
  # utils.py imports tensorflow for tf.io.gfile in functions not used here; the venv has no TF.
  # The stand-in is removed again at once (torch's own import machinery probes for tensorflow).
  sys.modules['tensorflow'] = types.ModuleType('tensorflow')
  import utils
  del sys.modules['tensorflow']
  from models import ddpm, ncsnpp  # noqa: F401  (register the networks)
  from models import utils as mutils
  from models.ema import ExponentialMovingAverage

  @contextlib.contextmanager
  def groups_of_four():
    original_group_norm = torch.nn.GroupNorm

    def group_norm(num_groups, num_channels, eps=1e-5, affine=True):
      assert num_channels < 128  # at C >= 128 both rules give 32 groups
      return original_group_norm(min(num_channels // 4, num_groups), num_channels, eps=eps,
                                 affine=affine)

    torch.nn.GroupNorm = group_norm
    try:
      yield
    finally:
      torch.nn.GroupNorm = original_group_norm

  @contextlib.contextmanager
  def legacy_torch_save(enabled):
    save = torch.save
    if enabled:
      torch.save = functools.partial(save, _use_new_zipfile_serialization=False)
    try:
      yield
    finally:
      torch.save = save

  def randomise(model, gen):
    """Every weight random and O(1)-scaled, so that every parameter moves the output."""
    with torch.no_grad():
      for name, p in model.named_parameters():
        if not p.requires_grad:  # the Fourier features W: keep the original's N(0, scale^2)
          continue
        noise = torch.randn(p.shape, generator=gen)
        if name.endswith('.W'):  # NIN weights are (in, out)
          p.copy_(noise / np.sqrt(p.shape[0]))
        elif p.ndim >= 2:  # Linear (out, in), Conv2d (out, in, kh, kw)
          p.copy_(noise / np.sqrt(np.prod(p.shape[1:])))
        elif 'GroupNorm' in name and name.endswith('weight'):
          p.copy_(1. + 0.1 * noise)
        else:
          p.copy_(0.1 * noise)

  entries = {}
  for name, (_, _, _, save_format) in FIXTURES.items():
    config = original_config(name)
    torch.manual_seed(sorted(FIXTURES).index(name))  # the Fourier features' initial W
    gen = torch.Generator().manual_seed(sorted(FIXTURES).index(name))
    patched = config.model.name == 'ddpm'
    with groups_of_four() if patched else contextlib.nullcontext():
      model = mutils.create_model(config)  # DataParallel, as the original's run_lib
    randomise(model, gen)
    ema = ExponentialMovingAverage(model.parameters(), decay=config.model.ema_rate)
    x, labels = inputs(name, config.data.num_channels)
    x_t = torch.from_numpy(x).permute(0, 3, 1, 2)
    labels_t = torch.from_numpy(labels)
    # The original's Adam, saved before its first step (its state_dict then holds the parameter
    # groups only: moments would double the file for nothing the import reads). The raw weights
    # drift away from the EMA so that the two give different outputs.
    optimizer = losses.get_optimizer(config, model.parameters())
    with torch.no_grad():
      for p in model.parameters():
        if p.requires_grad:
          p.add_(0.02 * torch.randn(p.shape, generator=gen))
    model.eval()
    with torch.no_grad():
      out_params = model(x_t, labels_t).permute(0, 2, 3, 1).numpy()
      ema.store(model.parameters())
      ema.copy_to(model.parameters())
      out_ema = model(x_t, labels_t).permute(0, 2, 3, 1).numpy()
      ema.restore(model.parameters())
    path = os.path.join(HERE, f'torch_{name}.pth')
    with legacy_torch_save(save_format == 'legacy'):
      utils.save_checkpoint(path, dict(optimizer=optimizer, model=model, ema=ema, step=STEP))
    expected = f'torch_{name}_expected.npz'
    np.savez(os.path.join(HERE, expected), x=x, labels=labels, out_params=out_params,
             out_ema_params=out_ema)
    entries[os.path.basename(path)] = manifest_entry(
        name, f'pytorch-{save_format}', expected, f'score_sde_pytorch, torch {torch.__version__}',
        patched)
    print(f'{path}: {os.path.getsize(path)} bytes, output scale {np.abs(out_ema).max():.3g}, '
          f'raw vs EMA output differ by {np.abs(out_params - out_ema).max():.3g}')

  # Tensors of every common dtype, views with strides and offsets into a shared storage, a
  # Parameter, and plain containers: for the restricted unpickler, in both torch.save formats.
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  tensors = collections.OrderedDict([
      ('float32', base),
      ('transposed_view', base.t()),
      ('offset_view', base[1:3, 2:5]),
      ('float64', torch.linspace(-1., 1., 5, dtype=torch.float64)),
      ('float16', torch.tensor([0.5, -2., 65504.], dtype=torch.float16)),
      ('bfloat16', torch.tensor([1.5, -3., 256.], dtype=torch.bfloat16)),
      ('int64', torch.tensor([-(2 ** 40), 3])),
      ('int32', torch.tensor([[1, -2], [3, 4]], dtype=torch.int32)),
      ('uint8', torch.tensor([0, 255], dtype=torch.uint8)),
      ('bool', torch.tensor([True, False, True])),
      ('scalar', torch.tensor(3.25)),
      ('empty', torch.zeros(0, 3)),
      ('parameter', torch.nn.Parameter(torch.full((2, 2), 0.75))),
  ])
  obj = {'tensors': tensors, 'step': 7, 'lr': 0.5, 'name': 'x', 'pair': (1, 2),
         'list': [None, True], 'raw': b'\x00\xff'}
  arrays = {k: (v.float() if v.dtype == torch.bfloat16 else v).detach().numpy()
            for k, v in tensors.items()}
  for fmt, flag in (('zip', True), ('legacy', False)):
    torch.save(obj, os.path.join(HERE, f'torch_tensors_{fmt}.pt'),
               _use_new_zipfile_serialization=flag)
  np.savez(os.path.join(HERE, 'torch_tensors_expected.npz'), **arrays)
  update_manifest(entries)

  # Full-size layouts of the released networks: the state dict's keys in order, with shapes, as
  # a DataParallel checkpoint has them; the parameters the EMA keeps (those that require
  # gradients, in model.parameters() order); the noise levels (sigmas buffer: count, first, last).
  layouts = {}
  for release, module in RELEASED.items():
    config = importlib.import_module(module).get_config()
    model = mutils.get_model(config.model.name)(config)
    sigmas = model.sigmas.numpy()
    layouts[release] = {
        'state_dict': [['module.' + k, list(v.shape)] for k, v in model.state_dict().items()],
        'trainable': ['module.' + k for k, p in model.named_parameters() if p.requires_grad],
        'sigmas': [len(sigmas), float(sigmas[0]), float(sigmas[-1])]}
    print(f'{release}: {len(layouts[release]["state_dict"])} state dict entries')
  update_layouts('torch', layouts)


# ------------------------------------------------------------------------------------------------
# JAX original (score_sde), run on current flax


def jax_stage(original):
  sys.path.insert(0, original)
  import flax
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from models import ddpm, ncsnpp  # noqa: F401  (register the networks)
  from models import utils as mutils
  original_get_normalization = ddpm.get_normalization

  def randomise(params, key):
    """Every weight random and O(1)-scaled (as the torch stage); the Fourier W is kept."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, leaf), k in zip(leaves, keys):
      name = path[-1].key
      noise = np.asarray(jax.random.normal(k, leaf.shape), np.float32)
      if path[0].key.startswith('GaussianFourierProjection'):
        out.append(np.asarray(leaf))
      elif leaf.ndim >= 2:  # kernels (..., in, out), NIN W (in, out)
        out.append(noise / np.sqrt(np.prod(leaf.shape[:-1])))
      elif name == 'scale':
        out.append(1. + 0.1 * noise)
      else:
        out.append(0.1 * noise)
    return jax.tree_util.tree_unflatten(treedef, [o.astype(np.float32) for o in out])

  def as_flax_031(params):
    """GroupNorm scale / bias as flax 0.3.1 stored them: (1, 1, 1, C)."""
    def fix(path, leaf):
      in_group_norm = path[-2].key.startswith('GroupNorm')
      return leaf.reshape((1, 1, 1, -1)) if in_group_norm else leaf
    return jax.tree_util.tree_map_with_path(fix, params)

  entries = {}
  for name in FIXTURES:
    config = original_config(name)
    patched = config.model.name == 'ddpm'
    # The original DDPM's get_normalization gives nn.GroupNorm with 32 groups.
    ddpm.get_normalization = (lambda config, conditional=False: functools.partial(
        nn.GroupNorm, num_groups=None, group_size=4)) if patched else original_get_normalization
    model = mutils.get_model(config.model.name)(config=config)
    x, labels = inputs(name, config.data.num_channels)
    seed = 100 + sorted(FIXTURES).index(name)
    init_key, rand_key, drift_key, opt_key = jax.random.split(jax.random.PRNGKey(seed), 4)
    variables = model.init({'params': init_key, 'dropout': init_key}, x, labels, train=False)
    ema_params = randomise(variables['params'], rand_key)
    drift = randomise(ema_params, drift_key)
    params = jax.tree_util.tree_map_with_path(
        lambda p, e, d: e if p[0].key.startswith('GaussianFourierProjection') else e + 0.02 * d,
        ema_params, drift)
    out_params = np.asarray(model.apply({'params': params}, x, labels, train=False))
    out_ema = np.asarray(model.apply({'params': ema_params}, x, labels, train=False))
    moments = randomise(params, opt_key)
    state = {
        'step': np.asarray(STEP, np.int32),
        'optimizer': {
            'target': as_flax_031(params),
            'state': {'step': np.asarray(STEP, np.int32),
                      'param_states': as_flax_031(jax.tree_util.tree_map(
                          lambda m: {'grad_ema': 1e-3 * m, 'grad_sq_ema': 1e-6 * m * m},
                          moments))}},
        'lr': float(config.optim.lr),
        'model_state': {},
        'ema_rate': float(config.model.ema_rate),
        'params_ema': as_flax_031(ema_params),
        'rng': np.asarray(jax.random.key_data(jax.random.PRNGKey(seed)), np.uint32),
    }
    path = os.path.join(HERE, f'jax_{name}.msgpack')
    with open(path, 'wb') as f:
      f.write(flax.serialization.msgpack_serialize(state))
    expected = f'jax_{name}_expected.npz'
    np.savez(os.path.join(HERE, expected), x=x, labels=labels, out_params=out_params,
             out_ema_params=out_ema)
    entries[os.path.basename(path)] = manifest_entry(
        name, 'flax-msgpack', expected,
        f'score_sde (JAX) network code on jax {jax.__version__}, flax {flax.__version__}', patched)
    print(f'{path}: {os.path.getsize(path)} bytes, output scale {np.abs(out_ema).max():.3g}, '
          f'raw vs EMA output differ by {np.abs(out_params - out_ema).max():.3g}')
  update_manifest(entries)
  ddpm.get_normalization = original_get_normalization

  # Full-size layouts of the released networks: the original flax parameter tree (names, shapes).
  from flax import traverse_util
  layouts = {}
  for release, module in RELEASED.items():
    # score_sde's ve/ffhq_ncsnpp_continuous imports torch for a config.device field nothing
    # reads (left over from the PyTorch port); this environment has no torch: a stand-in.
    sys.modules['torch'] = types.SimpleNamespace(
        device=str, cuda=types.SimpleNamespace(is_available=lambda: False))
    try:
      config = importlib.import_module(module).get_config()
    finally:
      del sys.modules['torch']
    model = mutils.get_model(config.model.name)(config=config)
    shape = (1, config.data.image_size, config.data.image_size, config.data.num_channels)
    params = jax.eval_shape(lambda: model.init(
        {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)},
        jnp.zeros(shape), jnp.ones((1,)), train=False)['params'])
    layouts[release] = [  # GroupNorm scale / bias as flax 0.3.1 stored them, as as_flax_031
        ['/'.join(p), [1, 1, 1, v.shape[-1]] if p[-2].startswith('GroupNorm') else list(v.shape)]
        for p, v in traverse_util.flatten_dict(params).items()]
    print(f'{release}: {len(layouts[release])} parameters')
  update_layouts('flax', layouts)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('stage', choices=['setup', 'torch', 'jax'])
  parser.add_argument('--original', help='torch / jax: the scratch copy of score_sde_pytorch / '
                      'score_sde (as made by setup)')
  parser.add_argument('--score_sde', help='setup: the original score_sde checkout')
  parser.add_argument('--score_sde_pytorch', help='setup: the original score_sde_pytorch checkout')
  parser.add_argument('--scratch', help='setup: where to put the copies (must not exist yet)')
  args = parser.parse_args()
  if args.stage == 'setup':
    setup_stage(args.score_sde, args.score_sde_pytorch, os.path.abspath(args.scratch))
  else:
    {'torch': torch_stage, 'jax': jax_stage}[args.stage](os.path.abspath(args.original))
