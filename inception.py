"""Inception-v3 of the FID variant in Flax, and its weights file (.npz, checksummed).

The network is the one of the standard TensorFlow FID code (the 2015-12-05 ImageNet graph), as
pytorch-fid rebuilds it on torchvision's Inception3 with its `FIDInceptionA/C/E` patches:
- average pools inside blocks 5b-5d, 6b-6e and 7b ignore the zero padding (TF semantics);
- block 7c pools its last branch with a 3x3 max pool instead of an average pool;
- 1008-way classifier (the TF graph's 1,001 ImageNet classes padded to 1,008).
Inputs are NHWC images in [0, 1]; `preprocess` resizes them bilinearly to 299x299 (half-pixel
centres, no antialiasing: torch's `F.interpolate(..., 'bilinear', align_corners=False)`) and maps
them to [-1, 1] by 2x - 1, exactly as pytorch-fid does with these weights. Outputs: 'pool', the
2048-d pool3 features (FID, KID) and 'logits', the 1008 logits of the fc layer with its bias (IS).

Weights: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` converted once by
`scripts/convert_inception_weights.py` into an .npz of this module's variable tree (keys like
'params/Mixed_5b/branch1x1/conv/kernel'), which also records the sha256 of the source file and a
sha256 of its own arrays; `load_fid_inception` verifies both. Nothing is ever downloaded here.
"""
from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from typing import Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FID_WEIGHTS_FILE = 'pt_inception-2015-12-05-6726825d.pth'
FID_WEIGHTS_URL = ('https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/'
                   + FID_WEIGHTS_FILE)
# sha256 of FID_WEIGHTS_FILE (95,628,359 bytes); torch hub names files after its first 8 digits.
FID_WEIGHTS_SHA256 = '6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2'
INPUT_SIZE = 299  # the resolution the FID reference feeds the network
MIN_INPUT_SIZE = 75  # smallest input for which every stride-2 stage keeps at least one pixel
POOL_DIM, NUM_LOGITS = 2048, 1008
_SOURCE_KEY, _ARRAYS_KEY = '__source_sha256__', '__arrays_sha256__'
# Convs run at full float32 precision: a GPU's default (TF32) would shift the features that
# FID compares against published statistics.
_PRECISION = jax.lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------------------
# Network


def _pad(padding) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """torch-style symmetric conv padding (int or (ph, pw)) as flax explicit padding."""
  ph, pw = (padding, padding) if isinstance(padding, int) else padding
  return ((ph, ph), (pw, pw))


class BasicConv(nn.Module):
  """Conv (no bias) -> batch norm in inference mode (eps 1e-3) -> ReLU, as torchvision's BasicConv2d."""
  features: int
  kernel: Tuple[int, int] = (1, 1)
  strides: int = 1
  padding: object = 0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=_pad(self.padding),
                use_bias=False, precision=_PRECISION, name='conv')(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name='bn')(x)
    return nn.relu(x)


def avg_pool_3x3_same(x: Array) -> Array:
  """3x3 stride-1 average pool whose border windows average only the real pixels (TF 'SAME')."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3(x: Array, stride: int) -> Array:
  """3x3 max pool; stride 2 means no padding (reduction blocks), stride 1 pads by one (-inf)."""
  padding = 'VALID' if stride == 2 else ((1, 1), (1, 1))
  return nn.max_pool(x, (3, 3), strides=(stride, stride), padding=padding)


class InceptionA(nn.Module):
  """35x35 block (Mixed_5b-5d): 1x1, 5x5, double 3x3 and pooled 1x1 branches."""
  pool_features: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b1 = BasicConv(64, name='branch1x1')(x)
    b5 = BasicConv(48, name='branch5x5_1')(x)
    b5 = BasicConv(64, (5, 5), padding=2, name='branch5x5_2')(b5)
    b3 = BasicConv(64, name='branch3x3dbl_1')(x)
    b3 = BasicConv(96, (3, 3), padding=1, name='branch3x3dbl_2')(b3)
    b3 = BasicConv(96, (3, 3), padding=1, name='branch3x3dbl_3')(b3)
    bp = BasicConv(self.pool_features, name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """35 -> 17 reduction (Mixed_6a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(384, (3, 3), strides=2, name='branch3x3')(x)
    bd = BasicConv(64, name='branch3x3dbl_1')(x)
    bd = BasicConv(96, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = BasicConv(96, (3, 3), strides=2, name='branch3x3dbl_3')(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block (Mixed_6b-6e) with factorized 1x7 / 7x1 convolutions."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c7 = self.channels_7x7
    row, col = dict(kernel=(1, 7), padding=(0, 3)), dict(kernel=(7, 1), padding=(3, 0))
    b1 = BasicConv(192, name='branch1x1')(x)
    b7 = BasicConv(c7, name='branch7x7_1')(x)
    b7 = BasicConv(c7, **row, name='branch7x7_2')(b7)
    b7 = BasicConv(192, **col, name='branch7x7_3')(b7)
    bd = BasicConv(c7, name='branch7x7dbl_1')(x)
    bd = BasicConv(c7, **col, name='branch7x7dbl_2')(bd)
    bd = BasicConv(c7, **row, name='branch7x7dbl_3')(bd)
    bd = BasicConv(c7, **col, name='branch7x7dbl_4')(bd)
    bd = BasicConv(192, **row, name='branch7x7dbl_5')(bd)
    bp = BasicConv(192, name='branch_pool')(avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """17 -> 8 reduction (Mixed_7a)."""

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b3 = BasicConv(192, name='branch3x3_1')(x)
    b3 = BasicConv(320, (3, 3), strides=2, name='branch3x3_2')(b3)
    b7 = BasicConv(192, name='branch7x7x3_1')(x)
    b7 = BasicConv(192, (1, 7), padding=(0, 3), name='branch7x7x3_2')(b7)
    b7 = BasicConv(192, (7, 1), padding=(3, 0), name='branch7x7x3_3')(b7)
    b7 = BasicConv(192, (3, 3), strides=2, name='branch7x7x3_4')(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block (Mixed_7b: average-pool branch, Mixed_7c: max-pool branch, the FID graph's quirk)."""
  pool: str = 'avg'

  @nn.compact
  def __call__(self, x: Array) -> Array:
    row, col = dict(kernel=(1, 3), padding=(0, 1)), dict(kernel=(3, 1), padding=(1, 0))
    b1 = BasicConv(320, name='branch1x1')(x)
    b3 = BasicConv(384, name='branch3x3_1')(x)
    b3 = jnp.concatenate([BasicConv(384, **row, name='branch3x3_2a')(b3),
                          BasicConv(384, **col, name='branch3x3_2b')(b3)], axis=-1)
    bd = BasicConv(448, name='branch3x3dbl_1')(x)
    bd = BasicConv(384, (3, 3), padding=1, name='branch3x3dbl_2')(bd)
    bd = jnp.concatenate([BasicConv(384, **row, name='branch3x3dbl_3a')(bd),
                          BasicConv(384, **col, name='branch3x3dbl_3b')(bd)], axis=-1)
    pooled = avg_pool_3x3_same(x) if self.pool == 'avg' else _max_pool_3x3(x, 1)
    bp = BasicConv(192, name='branch_pool')(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """FID Inception-v3 on preprocessed inputs ([-1, 1], NHWC, H = W >= 75): {'pool', 'logits'}."""

  @nn.compact
  def __call__(self, x: Array) -> Dict[str, Array]:
    x = BasicConv(32, (3, 3), strides=2, name='Conv2d_1a_3x3')(x)
    x = BasicConv(32, (3, 3), name='Conv2d_2a_3x3')(x)
    x = BasicConv(64, (3, 3), padding=1, name='Conv2d_2b_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = BasicConv(80, name='Conv2d_3b_1x1')(x)
    x = BasicConv(192, (3, 3), name='Conv2d_4a_3x3')(x)
    x = _max_pool_3x3(x, 2)
    x = InceptionA(32, name='Mixed_5b')(x)
    x = InceptionA(64, name='Mixed_5c')(x)
    x = InceptionA(64, name='Mixed_5d')(x)
    x = InceptionB(name='Mixed_6a')(x)
    for name, c7 in (('Mixed_6b', 128), ('Mixed_6c', 160), ('Mixed_6d', 160), ('Mixed_6e', 192)):
      x = InceptionC(c7, name=name)(x)
    x = InceptionD(name='Mixed_7a')(x)
    x = InceptionE('avg', name='Mixed_7b')(x)
    x = InceptionE('max', name='Mixed_7c')(x)
    pool = jnp.mean(x, axis=(1, 2))  # global average pool = TF's pool_3 (8x8 window at 299 px)
    logits = nn.Dense(NUM_LOGITS, precision=_PRECISION, name='fc')(pool)
    return {'pool': pool, 'logits': logits}


def preprocess(images: Array, size: int = INPUT_SIZE) -> Array:
  """[0, 1] NHWC images (1 or 3 channels) -> size x size RGB in [-1, 1], as pytorch-fid feeds them."""
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ValueError(f'Inception expects NHWC images with 1 or 3 channels, got shape '
                     f'{images.shape}.')
  x = jnp.asarray(images, jnp.float32)
  if x.shape[-1] == 1:  # grey images: the same value in R, G and B
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (size, size):
    # Half-pixel-centred bilinear, no antialias filter: torch's interpolate(align_corners=False).
    x = jax.image.resize(x, (x.shape[0], size, size, 3), 'bilinear', antialias=False)
  return 2. * x - 1.


def random_variables(seed: int = 0) -> Dict:
  """He-initialised random variables (tests, benchmarks), drawn in numpy: `FIDInceptionV3().init`
  compiles for over a minute on a CPU, this takes a second. BN statistics are the identity."""
  rng = np.random.default_rng(seed)
  flat = {}
  for path, spec in _flat_shapes(variable_shapes()).items():
    leaf, shape = path.rsplit('/', 1)[1], tuple(spec.shape)
    if leaf == 'kernel':
      fan_in = int(np.prod(shape[:-1]))
      value = rng.standard_normal(shape, np.float32) * np.float32(np.sqrt(2. / fan_in))
    else:  # BN scale and var 1, BN bias / mean and fc bias 0
      value = np.full(shape, 1. if leaf in ('scale', 'var') else 0., np.float32)
    flat[path] = value
  return unflatten(flat)


@functools.lru_cache(maxsize=1)
def variable_shapes() -> Dict:
  """The variable tree's shapes and dtypes, without computing anything (cached: callers must not
  mutate it)."""
  return jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                        jnp.zeros((1, MIN_INPUT_SIZE, MIN_INPUT_SIZE, 3), jnp.float32))


# ------------------------------------------------------------------------------------------------
# Variable trees as checksummed .npz files


def flatten(tree: Mapping, prefix: str = '') -> Dict[str, np.ndarray]:
  """Nested dict of arrays -> {'a/b/c': array} (host numpy)."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, Mapping):
      flat.update(flatten(value, path))
    else:
      flat[path] = np.asarray(value)
  return flat


def unflatten(flat: Mapping[str, np.ndarray]) -> Dict:
  """{'a/b/c': array} -> nested dict."""
  tree: Dict = {}
  for path, value in flat.items():
    *parents, leaf = path.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def arrays_sha256(flat: Mapping[str, np.ndarray]) -> str:
  """sha256 over the sorted (name, dtype, shape, bytes) of every array: the file's content id."""
  h = hashlib.sha256()
  for key in sorted(flat):
    a = np.ascontiguousarray(flat[key])
    h.update(f'{key}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes (hex)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def save_variables(path: str, variables: Mapping, source_sha256: str,
                   extra: Optional[Mapping[str, str]] = None) -> str:
  """Writes a variable tree to `path` (.npz) with its source and array checksums; returns the latter."""
  flat = flatten(variables)
  digest = arrays_sha256(flat)
  meta = {_SOURCE_KEY: source_sha256, _ARRAYS_KEY: digest, **{f'__{k}__': v for k, v in
                                                              (extra or {}).items()}}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'wb') as f:  # write then rename: a crash never leaves a half-written file
    np.savez(f, **flat, **{k: np.asarray(v) for k, v in meta.items()})
  os.replace(tmp, path)
  return digest


def load_variables(path: str, expected_source_sha256: Optional[str] = None
                   ) -> Tuple[Dict, Dict[str, str]]:
  """Reads a tree saved by `save_variables`, verifying its array checksum (and source, if given).

  Returns (variables, meta) with meta['source_sha256'], meta['arrays_sha256'] and any extras.
  Raises ValueError on a corrupted or mismatched file.
  """
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # truncated, not an npz, bad CRC
    raise ValueError(f'{path} is not a readable .npz weights file ({type(e).__name__}: {e}). '
                     'Delete it and convert the weights again.') from e
  meta = {k[2:-2]: str(v) for k, v in arrays.items() if k.startswith('__') and k.endswith('__')}
  flat = {k: v for k, v in arrays.items() if not (k.startswith('__') and k.endswith('__'))}
  if 'arrays_sha256' not in meta or 'source_sha256' not in meta:
    raise ValueError(f'{path} lacks the checksums that save_variables writes; it was not written '
                     'by this project. Convert the weights again.')
  actual = arrays_sha256(flat)
  if actual != meta['arrays_sha256']:
    raise ValueError(f'{path} is corrupted: its arrays hash to {actual}, but the file records '
                     f'{meta["arrays_sha256"]}. Delete it and convert the weights again.')
  if expected_source_sha256 is not None and meta['source_sha256'] != expected_source_sha256:
    raise ValueError(f'{path} was converted from a file with sha256 {meta["source_sha256"]}, not '
                     f'the expected {expected_source_sha256}.')
  return unflatten(flat), meta


def _check_tree(variables: Mapping, reference: Mapping, path: str) -> None:
  """ValueError unless `variables` has exactly the reference tree's keys and shapes."""
  got = {k: v.shape for k, v in flatten(variables).items()}
  want = {k: tuple(s.shape) for k, s in _flat_shapes(reference).items()}
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(k for k in set(want) & set(got) if got[k] != want[k])
  if missing or extra or bad:
    raise ValueError(f'{path} does not hold FID Inception-v3 variables: missing {missing[:5]}, '
                     f'unexpected {extra[:5]}, wrong shapes '
                     f'{[(k, got[k], want[k]) for k in bad[:5]]}.')


def _flat_shapes(tree: Mapping, prefix: str = '') -> Dict:
  """Like `flatten`, but keeps the leaves (e.g. ShapeDtypeStruct) as they are."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    out.update(_flat_shapes(value, path) if isinstance(value, Mapping) else {path: value})
  return out


def missing_weights_message(path: str) -> str:
  """The instructions shown when the FID Inception weights file is not configured or absent."""
  where = f'the file {path!r} does not exist' if path else 'it is empty'
  return (
      f'FID Inception-v3 weights not found: config.eval.inception_weights names the converted '
      f'weights file (.npz) and {where}. Nothing is downloaded at run time. To make the file: '
      f'(1) download {FID_WEIGHTS_FILE} (sha256 {FID_WEIGHTS_SHA256[:16]}...) from '
      f'{FID_WEIGHTS_URL} on a machine with internet access; (2) convert it once, where PyTorch '
      f'is installed: python scripts/convert_inception_weights.py {FID_WEIGHTS_FILE} '
      f'fid_inception_v3.npz; (3) run with --config.eval.inception_weights=/path/to/'
      f'fid_inception_v3.npz.')


def load_fid_inception(path: str, expected_source_sha256: Optional[str] = FID_WEIGHTS_SHA256
                       ) -> Tuple[Dict, Dict[str, str]]:
  """Loads and verifies the converted FID weights: (variables, meta); clear errors when missing/bad."""
  if not path or not os.path.isfile(path):
    raise FileNotFoundError(missing_weights_message(path))
  if path.endswith('.pth'):
    raise ValueError(f'{path} is the PyTorch file; convert it first: python '
                     f'scripts/convert_inception_weights.py {path} fid_inception_v3.npz')
  variables, meta = load_variables(path, expected_source_sha256)
  _check_tree(variables, variable_shapes(), path)
  return variables, meta


# ------------------------------------------------------------------------------------------------
# PyTorch state dict -> variable tree (used by scripts/convert_inception_weights.py; no torch here)

# Our leaf name -> (torch leaf name, transposition of the torch array)
_LEAF_MAP = {
    ('conv', 'kernel'): ('conv.weight', (2, 3, 1, 0)),  # [O, I, H, W] -> [H, W, I, O]
    ('bn', 'scale'): ('bn.weight', None),
    ('bn', 'bias'): ('bn.bias', None),
    ('bn', 'mean'): ('bn.running_mean', None),
    ('bn', 'var'): ('bn.running_var', None),
    ('fc', 'kernel'): ('fc.weight', (1, 0)),  # [out, in] -> [in, out]
    ('fc', 'bias'): ('fc.bias', None),
}
# torch entries without a counterpart here: BN step counters; aux classifier (absent in the FID file)
_IGNORED_SUFFIXES = ('num_batches_tracked',)
_IGNORED_PREFIXES = ('AuxLogits.',)


def torch_key(path: str) -> Tuple[str, Optional[Sequence[int]]]:
  """'params/Mixed_5b/branch1x1/conv/kernel' -> ('Mixed_5b.branch1x1.conv.weight', transpose)."""
  _, *modules, layer, leaf = path.split('/')
  name, perm = _LEAF_MAP[(layer, leaf)]
  return '.'.join(modules + [name]), perm


def variables_from_state_dict(state_dict: Mapping[str, np.ndarray]) -> Dict:
  """pytorch-fid's FID Inception state dict (numpy arrays) -> this module's variable tree."""
  state_dict = {k: np.asarray(v) for k, v in state_dict.items()
                if not k.endswith(_IGNORED_SUFFIXES) and not k.startswith(_IGNORED_PREFIXES)}
  flat, used = {}, set()
  for path, spec in _flat_shapes(variable_shapes()).items():
    key, perm = torch_key(path)
    if key not in state_dict:
      raise ValueError(f'State dict lacks {key!r} (for {path}); is this the FID Inception file?')
    value = state_dict[key] if perm is None else np.transpose(state_dict[key], perm)
    if value.shape != tuple(spec.shape):
      raise ValueError(f'{key}: shape {state_dict[key].shape} does not fit {path} {spec.shape}.')
    flat[path] = np.ascontiguousarray(value, dtype=np.float32)
    used.add(key)
  unused = sorted(set(state_dict) - used)
  if unused:
    raise ValueError(f'State dict has entries this network lacks: {unused[:10]}.')
  return unflatten(flat)
