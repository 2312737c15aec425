"""Importing the original's released checkpoints: checkpointing.import_original, the restricted
torch unpickler (torch_pickle) and scripts/import_checkpoint.py.

The fixtures in tests/data were made once, by hand, with the ORIGINAL implementations (how: see
tests/data/README.md and tests/data/make_fixtures.py): tiny NCSN++ (VE: FIR, output_skip and
residual input pyramids, Fourier features), DDPM++ (VP, positional embedding) and DDPM networks,
saved by score_sde_pytorch (torch.save, zip and legacy formats) and in score_sde's flax msgpack
training-state layout, with the original networks' outputs on a fixed input. The expected outputs
come from the originals (PyTorch, and score_sde's own flax code), never from this project's code.
"""
import collections
import gzip
import importlib
import importlib.util
import json
import math
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

import checkpointing
import original_checkpoints
import torch_pickle
from models import utils as mutils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, 'tests', 'data')
with open(os.path.join(DATA, 'fixtures.json')) as _f:
  MANIFEST = json.load(_f)


def fixture_config(file, **extra):
  """This project's config of the same name as the fixture's original config, same overrides."""
  entry = MANIFEST[file]
  config = importlib.import_module('configs.' + entry['config'].replace('/', '.')).get_config()
  for key, value in {**entry['overrides'], **extra}.items():
    section, field = key.split('.')
    config[section][field] = tuple(value) if isinstance(value, list) else value
  return config


def data(name):
  return os.path.join(DATA, name)


# ------------------------------------------------------------------------------------------------
# Parity with the original networks


@pytest.mark.parametrize('file', sorted(MANIFEST))
def test_imported_network_matches_the_original(file):
  entry = MANIFEST[file]
  config = fixture_config(file)
  assert original_checkpoints.detect_format(data(file)) == entry['format']
  imported = checkpointing.import_original(data(file), config)
  assert imported['step'] == entry['step']
  expected = np.load(data(entry['expected']))
  model = mutils.create_model(config)
  scale = np.abs(expected['out_ema_params']).max()
  # The file's raw and EMA weights give clearly different outputs, so a swap would fail.
  assert np.abs(expected['out_params'] - expected['out_ema_params']).max() > 1e-2 * scale
  for which in ('params', 'ema_params'):
    out = mutils.get_model_fn(model, imported[which])(jnp.asarray(expected['x']),
                                                      jnp.asarray(expected['labels']))
    np.testing.assert_allclose(np.asarray(out), expected['out_' + which], rtol=1e-5,
                               atol=1e-5 * scale, err_msg=f'{file}: {which}')


# ------------------------------------------------------------------------------------------------
# Full-size released networks: the originals' parameter layouts (recorded from their own code in
# released_layouts.json.gz) convert onto the networks of the configs named for them.

with gzip.open(data('released_layouts.json.gz'), 'rt') as _f:
  RELEASED_LAYOUTS = json.load(_f)
_LAYOUTS = {}


def _layout(config):
  """network_layout, traced once per distinct network (several releases share one)."""
  model = config.model.to_dict()
  model.pop('ema_rate', None)
  key = json.dumps([model, config.data.image_size, config.data.num_channels], sort_keys=True,
                   default=str)
  if key not in _LAYOUTS:
    _LAYOUTS[key] = original_checkpoints.network_layout(config)
  return _LAYOUTS[key]


def _constant(shape, value):
  """A full-size float32 array holding `value` everywhere, without the memory."""
  return np.broadcast_to(np.float32(value), tuple(shape))


def test_every_release_has_a_config():
  assert sorted(original_checkpoints.RELEASED_CONFIGS) == sorted(RELEASED_LAYOUTS)
  for path in original_checkpoints.RELEASED_CONFIGS.values():
    assert os.path.exists(os.path.join(ROOT, path)), path


@pytest.mark.parametrize('release', sorted(RELEASED_LAYOUTS))
def test_full_size_release_converts(release):
  path = original_checkpoints.RELEASED_CONFIGS[release]
  config = importlib.import_module(path[:-len('.py')].replace('/', '.')).get_config()
  layout = _layout(config)
  original = RELEASED_LAYOUTS[release]
  count, first, last = original['torch']['sigmas']
  sigmas = mutils.get_sigmas(config)  # the config's noise levels are the original config's
  assert len(sigmas) == count and np.allclose(sigmas[[0, -1]], [first, last], rtol=1e-6)

  # score_sde: every parameter holds its index in the file; all land, each once, in the shapes
  # the network expects (convert_flax_state raises on any mismatch).
  flat = {tuple(name.split('/')): _constant(shape, i)
          for i, (name, shape) in enumerate(original['flax'])}
  tree = traverse_util.unflatten_dict(flat)
  out = original_checkpoints.convert_flax_state(
      {'step': 1, 'optimizer': {'target': tree}, 'params_ema': tree, 'model_state': {}},
      release, config, layout)
  values = sorted(int(v.flat[0]) for v in jax.tree_util.tree_leaves(out['ema_params']))
  assert values == list(range(len(flat)))

  # score_sde_pytorch: state dict entries hold their index, the EMA of each index + 0.5, in the
  # original's model.parameters() order of the parameters that require gradients.
  state_dict = collections.OrderedDict(
      (name, _constant(shape, i))
      for i, (name, shape) in enumerate(original['torch']['state_dict']))
  state_dict['module.sigmas'] = sigmas
  index = {name: i for i, name in enumerate(state_dict)}
  shadow = [_constant(state_dict[n].shape, index[n] + 0.5) for n in original['torch']['trainable']]
  out = original_checkpoints.convert_torch_state(
      {'model': state_dict, 'ema': {'shadow_params': shadow}, 'optimizer': {}, 'step': 5},
      release, config, layout)
  assert out['step'] == 5
  params = traverse_util.flatten_dict(out['params'])
  ema = traverse_util.flatten_dict(out['ema_params'])
  used = sorted(int(v.flat[0]) for v in params.values())
  assert used == sorted(i for n, i in index.items() if n != 'module.sigmas')
  for p, v in params.items():
    fixed = p[0].startswith('GaussianFourierProjection')  # no gradient, so no EMA: from model
    assert ema[p].flat[0] == v.flat[0] + (0. if fixed else 0.5), p


# ------------------------------------------------------------------------------------------------
# The restricted unpickler


TENSOR_NAMES = ['float32', 'transposed_view', 'offset_view', 'float64', 'float16', 'bfloat16',
                'int64', 'int32', 'uint8', 'bool', 'scalar', 'empty', 'parameter']


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_reads_both_torch_save_layouts(layout):
  obj = torch_pickle.load(data(f'torch_tensors_{layout}.pt'))
  expected = np.load(data('torch_tensors_expected.npz'))
  tensors = obj['tensors']
  assert isinstance(tensors, collections.OrderedDict) and list(tensors) == TENSOR_NAMES
  for name in TENSOR_NAMES:
    got, want = tensors[name], expected[name]
    if name == 'bfloat16':  # stored as float32 in the npz (numpy has no bfloat16)
      assert got.dtype == ml_dtypes.bfloat16
      got = got.astype(np.float32)
    assert got.dtype == want.dtype and got.shape == want.shape, name
    np.testing.assert_array_equal(got, want, err_msg=name)
  np.testing.assert_array_equal(tensors['transposed_view'], tensors['float32'].T)
  assert {k: v for k, v in obj.items() if k != 'tensors'} == {
      'step': 7, 'lr': 0.5, 'name': 'x', 'pair': (1, 2), 'list': [None, True], 'raw': b'\x00\xff'}


class _Exploit:
  """Pickles as a call of os.mkdir(path): what a malicious checkpoint would run."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return os.mkdir, (self.path,)


def _as_torch_file(payload: bytes, layout: str, path) -> str:
  """`payload` (a pickle) wrapped the way torch.save lays out a file."""
  if layout == 'zip':
    with zipfile.ZipFile(path, 'w') as z:
      z.writestr('archive/data.pkl', payload)
      z.writestr('archive/version', b'3\n')
  else:
    with open(path, 'wb') as f:
      for header in (0x1950a86a20f9469cfc6c, 1001, {'little_endian': True}):
        f.write(pickle.dumps(header, protocol=2))
      f.write(payload + pickle.dumps([], protocol=2))
  return str(path)


@pytest.mark.parametrize('layout', ['zip', 'legacy'])
def test_refuses_any_other_global_and_runs_nothing(tmp_path, layout):
  marker = tmp_path / 'created_by_the_pickle'
  payload = pickle.dumps({'model': _Exploit(str(marker)), 'step': 1}, protocol=2)
  pickle.loads(payload)  # the payload is live: a plain unpickler runs it
  assert marker.is_dir()
  marker.rmdir()
  path = _as_torch_file(payload, layout, tmp_path / 'checkpoint_1.pth')
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"global '\w+\.mkdir'"):
    torch_pickle.load(path)
  with pytest.raises(ValueError, match=r"Refusing to load the global '\w+\.mkdir'"):
    checkpointing.import_original(path, fixture_config('torch_ddpmpp_vp.pth'))
  assert not marker.exists()
  os_system = b'\x80\x02cos\nsystem\nX\x04\x00\x00\x00true\x85R.'  # os.system('true')
  path = _as_torch_file(os_system, layout, tmp_path / 'os_system.pth')
  with pytest.raises(torch_pickle.UnsafePickleError, match=r"global 'os\.system'"):
    torch_pickle.load(path)


# ------------------------------------------------------------------------------------------------
# Clear errors


@pytest.mark.parametrize('file, config_of, extra, message', [
    # A checkpoint of another network: the PyTorch file's first module is the Fourier projection.
    ('torch_ncsnpp_ve.pth', 'torch_ddpmpp_vp.pth', {},
     r"'Dense_0/bias' \(in the file: 'all_modules\.0\.bias'\): checkpoint shape absent, "
     r'network shape \(16,\)'),
    ('jax_ncsnpp_ve.msgpack', 'jax_ddpmpp_vp.msgpack', {},
     r"'Conv_0/kernel': checkpoint shape \(3, 3, 3, 4\), network shape \(3, 3, 1, 4\)"),
    # The same network, wider: a shape mismatch names both shapes.
    ('torch_ncsnpp_ve.pth', 'torch_ncsnpp_ve.pth', {'model.nf': 8},
     r"'GaussianFourierProjection_0/W' \(in the file: 'all_modules\.0\.W'\): checkpoint shape "
     r'\(4,\), network shape \(8,\)'),
    ('jax_ncsnpp_ve.msgpack', 'jax_ncsnpp_ve.msgpack', {'model.nf': 8},
     r"'AttnBlock_0/GroupNorm_0/bias' \(in the file: 'AttnBlockpp_0/GroupNorm_0/bias'\): "
     r'checkpoint shape \(4,\), network shape \(8,\)'),
    # A network without the file's attention blocks: where the file has one, the network
    # expects a residual block, and the message says what the file has there.
    ('torch_ddpm_vp.pth', 'torch_ddpm_vp.pth', {'model.attn_resolutions': []},
     r"'ResnetBlockDDPM_2/Conv_0/bias' \(in the file: 'all_modules\.6\.Conv_0\.bias'\): "
     r"checkpoint shape absent, network shape \(4,\) \(the file's all_modules\.6 has "
     r"\['GroupNorm_0\.bias', 'GroupNorm_0\.weight', 'NIN_0\.W'"),
    # More residual blocks than the file: a file parameter the network has no place for.
    ('torch_ddpmpp_vp.pth', 'torch_ddpmpp_vp.pth', {'model.num_res_blocks': 2},
     r"'all_modules\.4\.Conv_2\.weight': checkpoint shape \(4, 4, 1, 1\), network shape absent"),
])
def test_checkpoint_that_does_not_fit_the_config(file, config_of, extra, message):
  with pytest.raises(ValueError, match="does not fit config model '(ncsnpp|ddpm)'.*" + message):
    checkpointing.import_original(data(file), fixture_config(config_of, **extra))


@pytest.mark.parametrize('file', ['torch_ncsnpp_ve.pth', 'torch_ddpmpp_vp.pth',
                                  'jax_ncsnpp_ve.msgpack'])
@pytest.mark.parametrize('fraction', [0.1, 0.6, 0.999])
def test_truncated_file(tmp_path, file, fraction):
  with open(data(file), 'rb') as f:
    content = f.read()
  path = tmp_path / file
  path.write_bytes(content[:int(len(content) * fraction)])
  with pytest.raises(ValueError, match='truncated'):
    checkpointing.import_original(str(path), fixture_config(file))


@pytest.mark.parametrize('content, message', [
    (b'', 'it is empty'),
    (b'<html>Google Drive - virus scan warning</html>', r"starts with b'<html>Go'"),
    (pickle.dumps({'model': 1}, protocol=4), r"starts with b'\\x80\\x04"),
    (None, r'a zip archive without <name>/data\.pkl.*unzip it'),  # a zip, e.g. a Drive folder
])
def test_unknown_format(tmp_path, content, message):
  path = tmp_path / 'checkpoint_8'
  if content is None:
    np.savez(str(path) + '.npz', x=np.zeros(3))
    path = tmp_path / 'checkpoint_8.npz'
  else:
    path.write_bytes(content)
  with pytest.raises(ValueError, match=message):
    checkpointing.import_original(str(path), fixture_config('torch_ddpmpp_vp.pth'))


def test_other_bad_input(tmp_path):
  config = fixture_config('torch_ddpmpp_vp.pth')
  with pytest.raises(FileNotFoundError):
    checkpointing.import_original(str(tmp_path / 'absent.pth'), config)
  config.model.name = 'ncsnv2_64'
  with pytest.raises(ValueError, match=r"'ncsnv2_64'.*valid choices: \['ncsnpp', 'ddpm'\]"):
    checkpointing.import_original(data('torch_ddpmpp_vp.pth'), config)
  with pytest.raises(ValueError, match='is a directory: pass the checkpoint file inside'):
    checkpointing.import_original(str(tmp_path), fixture_config('torch_ddpm_vp.pth'))
  # A torch.save file that is not a score_sde_pytorch checkpoint.
  with pytest.raises(ValueError, match='not a score_sde_pytorch checkpoint'):
    checkpointing.import_original(data('torch_tensors_zip.pt'), fixture_config('torch_ddpm_vp.pth'))
  # An EMA that does not cover the model's trainable parameters.
  config = fixture_config('torch_ddpm_vp.pth')
  state = torch_pickle.load(data('torch_ddpm_vp.pth'))
  state['ema']['shadow_params'].pop()
  with pytest.raises(ValueError, match='the EMA has 131 tensors but the model has 132 trainable'):
    original_checkpoints.convert_torch_state(state, 'ckpt.pth', config,
                                             original_checkpoints.network_layout(config))


# ------------------------------------------------------------------------------------------------
# The import script, then main.py --mode eval and a training resume


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  return proc.returncode, proc.stdout + proc.stderr


def _load_script():
  spec = importlib.util.spec_from_file_location(
      'import_checkpoint', os.path.join(ROOT, 'scripts', 'import_checkpoint.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_import_script_then_eval_and_train_resume(tmp_path):
  import run_lib
  # The DDPM++ fixture's network on the digits config (embedded data: eval runs anywhere).
  digits = 'configs/digits/vp_ddpmpp_continuous.py'
  net = ['--config.model.nf=4', '--config.model.ch_mult=(1, 1)']
  fixture = data('torch_ddpmpp_vp.pth')
  workdir = tmp_path / 'imported'
  code, out = _run('scripts/import_checkpoint.py', '--config', digits, '--checkpoint', fixture,
                   '--workdir', str(workdir), *net)
  assert code == 0, out[-3000:]
  ckpt = 13  # ceil(step / digits snapshot_freq): the number training gives step 12345
  assert f'checkpoints/{ckpt}' in out
  assert json.loads((workdir / 'imported_from.json').read_text())['format'] == 'pytorch-legacy'

  code, out = _run('main.py', '--config', digits, '--workdir', str(workdir), '--mode=eval', *net,
                   f'--config.eval.begin_ckpt={ckpt}', f'--config.eval.end_ckpt={ckpt}',
                   '--config.eval.enable_sampling=False', '--config.eval.enable_bpd=False')
  assert code == 0, out[-3000:]
  results = [json.loads(line) for line in open(workdir / 'eval' / 'results.jsonl')]
  assert [(r['ckpt'], r['step']) for r in results] == [(ckpt, 12345)]
  assert math.isfinite(results[0]['loss'])

  # What evaluation and a resumed training restore is exactly the imported state.
  config = importlib.import_module('configs.digits.vp_ddpmpp_continuous').get_config()
  config.model.nf, config.model.ch_mult = 4, (1, 1)
  imported = checkpointing.import_original(fixture, config)
  run = run_lib.setup(config, str(workdir))
  snapshot = checkpointing.restore(checkpointing.make_manager(str(workdir / 'checkpoints')), ckpt,
                                   run.state)
  resumed, step = checkpointing.restore_latest(
      checkpointing.make_manager(str(workdir / 'checkpoints-meta')), run.state)
  assert step == 12345 and int(snapshot.step) == int(resumed.step) == 12345
  for state in (snapshot, resumed):
    for which in ('params', 'ema_params'):
      jax.tree_util.tree_map(np.testing.assert_array_equal, getattr(state, which),
                             imported[which])

  # Never overwrites checkpoints already in a workdir.
  with pytest.raises(ValueError, match=r'checkpoints is not empty.*nothing was written'):
    _load_script().import_checkpoint(config, fixture, str(workdir))
