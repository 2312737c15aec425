"""Reads files written by `torch.save` without torch and without running any code the file names.

A `torch.save` file is a pickle whose tensors point into raw storages, in one of two layouts:

- zip (torch >= 1.6, the default): an archive `<name>/data.pkl` (the pickle), `<name>/data/<key>`
  (one file of raw bytes per storage), `<name>/byteorder` ('little' or 'big'; absent = little);
- legacy (older torch, or `_use_new_zipfile_serialization=False`): five pickles in a row (magic
  number, protocol version, system info, the object, the sorted storage keys), then every storage
  as an int64 element count and its raw bytes.

Unpickling imports and calls whatever globals the pickle names, so a checkpoint from the internet
could run any code (`os.system` ...). This reader's unpickler resolves only the globals that
tensors and plain containers need and rebuilds each tensor as a numpy array from its storage,
offset, shape and strides; any other global raises `UnsafePickleError` naming it, before anything
is called. Allowed: `collections.OrderedDict`; `torch._utils._rebuild_tensor(_v2)` and
`_rebuild_parameter(_with_state)` (a Parameter becomes its data); the typed storage classes
`torch.<Float|Double|Half|BFloat16|Long|Int|Short|Char|Byte|Bool|ComplexFloat|ComplexDouble>`
`Storage`;
numpy scalars and arrays (`numpy.dtype`, `numpy.ndarray`, `numpy._core.multiarray.scalar` /
`_reconstruct`, also under their numpy < 2 module `numpy.core.multiarray`); `_codecs.encode` with
the latin-1 codec (how pickle protocol 2 writes bytes); and the builtins `set`, `frozenset`,
`complex`, `slice`, `bytearray`.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Dict

import numpy as np


class UnsafePickleError(ValueError):
  """The pickle names a global outside the allowed set (maybe malicious, or not a checkpoint)."""


# The legacy format starts with the pickled int 0x1950a86a20f9469cfc6c (LONG1, 10 bytes).
_LEGACY_MAGIC = b'\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19'
_LEGACY_PROTOCOL_VERSION = 1001


_STORAGE_DTYPES = {
    'FloatStorage': np.float32, 'DoubleStorage': np.float64, 'HalfStorage': np.float16,
    'BFloat16Storage': None, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8,
    'BoolStorage': np.bool_, 'ComplexFloatStorage': np.complex64,
    'ComplexDoubleStorage': np.complex128,
}


def is_legacy(head: bytes) -> bool:
  """Whether `head` (the first bytes of a file) starts a legacy-format torch.save file."""
  return head[:1] == b'\x80' and _LEGACY_MAGIC in head[:32]


def is_zip(head: bytes) -> bool:
  """Whether `head` starts a zip archive (the torch.save format since torch 1.6, or another zip)."""
  return head[:4] == b'PK\x03\x04'


class _StorageType:
  """Stands for a typed storage class (torch.FloatStorage, ...): its numpy dtype only."""

  def __init__(self, name: str):
    if name == 'BFloat16Storage':
      import ml_dtypes  # a dependency of jax; numpy has no bfloat16
      self.dtype = np.dtype(ml_dtypes.bfloat16)
    else:
      self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """One storage: dtype and element count from the pickle; its numpy data, read afterwards."""

  def __init__(self, key: str, dtype: np.dtype, numel: int):
    self.key, self.dtype, self.numel = key, dtype, numel
    self.data = None


class _TensorRef:
  """A tensor to rebuild once the storages are read: a strided view into `storage`."""

  def __init__(self, storage, offset, size, stride):
    if not isinstance(storage, _Storage):
      raise ValueError(f'Corrupt torch pickle: a tensor refers to {type(storage).__name__}, not '
                       f'a storage.')
    self.storage, self.offset = storage, int(offset)
    self.size, self.stride = tuple(size), tuple(stride)
    if len(self.size) != len(self.stride):
      raise ValueError(f'Corrupt torch pickle: tensor size {self.size} and stride {self.stride} '
                       f'differ in rank.')

  def to_numpy(self) -> np.ndarray:
    data = self.storage.data
    if any(n == 0 for n in self.size):
      return np.zeros(self.size, data.dtype)
    last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
    if self.offset < 0 or min(self.stride, default=0) < 0 or last >= data.size:
      raise ValueError(f'Corrupt torch file: a tensor of size {self.size}, stride {self.stride} '
                       f'at offset {self.offset} overruns its storage of {data.size} elements.')
    view = np.lib.stride_tricks.as_strided(
        data[self.offset:], shape=self.size, strides=[s * data.itemsize for s in self.stride])
    return np.array(view)  # a copy that owns its memory


def _rebuild_tensor(storage, storage_offset, size, stride, *unused):
  del unused  # requires_grad, backward hooks, metadata: meaningless for numpy
  return _TensorRef(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *unused):
  del unused
  return data


def _latin1_encode(text, encoding='utf-8', errors='strict'):
  if encoding.lower().replace('_', '-') not in ('latin1', 'latin-1'):
    raise UnsafePickleError(f'_codecs.encode with codec {encoding!r}: only latin-1 (how pickle '
                            f'protocol 2 stores bytes) is allowed.')
  return text.encode('latin-1', errors)


def _numpy_globals() -> Dict[tuple, Any]:
  import numpy._core.multiarray as multiarray  # numpy >= 2 (the project pins 2.x)
  found = {}
  for module in ('numpy._core.multiarray', 'numpy.core.multiarray'):
    found[(module, 'scalar')] = multiarray.scalar
    found[(module, '_reconstruct')] = multiarray._reconstruct  # pylint: disable=protected-access
  found[('numpy', 'dtype')] = np.dtype
  found[('numpy', 'ndarray')] = np.ndarray
  return found


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor'): _rebuild_tensor,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
    ('torch._utils', '_rebuild_parameter_with_state'): _rebuild_parameter,
    ('_codecs', 'encode'): _latin1_encode,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('builtins', 'complex'): complex,
    ('builtins', 'slice'): slice,
    ('builtins', 'bytearray'): bytearray,
    **_numpy_globals(),
}


class _Unpickler(pickle.Unpickler):
  """Resolves only the allowed globals; storages become `_Storage` records in `self.storages`."""

  def __init__(self, file, storages: Dict[str, _Storage]):
    super().__init__(file)
    self.storages = storages

  def find_class(self, module, name):
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafePickleError(
        f"Refusing to load the global '{module}.{name}' that this pickle names: a checkpoint may "
        f'only hold tensors, numbers, strings and containers (allowed globals: '
        f'collections.OrderedDict, torch storages and tensor rebuilders, numpy scalars and '
        f'arrays). The file may be malicious, or not a checkpoint; nothing in it was run.')

  def persistent_load(self, pid):
    # ('storage', storage type, key, location, numel[, view metadata (legacy)])
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise ValueError(f'Corrupt torch pickle: unexpected persistent id {pid!r:.200}.')
    if len(pid) > 5 and pid[5] is not None:
      raise ValueError('Unsupported torch file: legacy storage views (torch < 0.4).')
    key, numel = str(pid[2]), int(pid[4])
    storage = self.storages.get(key)
    if storage is None:
      storage = self.storages[key] = _Storage(key, pid[1].dtype, numel)
    return storage


def _materialize(obj, memo=None):
  """`obj` with every `_TensorRef` replaced by its numpy array (shared references stay shared)."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _TensorRef):
    out = obj.to_numpy()
  elif isinstance(obj, dict):  # dict and OrderedDict (keeps its order and type)
    out = type(obj)()
    for k, v in obj.items():
      out[k] = _materialize(v, memo)
  elif isinstance(obj, (list, tuple, set, frozenset)):
    items = [_materialize(v, memo) for v in obj]
    out = items if isinstance(obj, list) else type(obj)(items)
  else:
    return obj
  memo[id(obj)] = out
  return out


def _from_buffer(storage: _Storage, buffer: bytes, big_endian: bool, where: str) -> np.ndarray:
  size = storage.numel * storage.dtype.itemsize
  if len(buffer) < size:
    raise ValueError(f'{where}: truncated torch.save file: storage {storage.key} has '
                     f'{len(buffer)} of its {size} bytes.')
  dtype = storage.dtype.newbyteorder('>') if big_endian else storage.dtype
  return np.frombuffer(buffer, dtype, count=storage.numel).astype(storage.dtype, copy=False)


def _load_zip(path: str):
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f'{path}: a zip archive that cannot be read ({e}): truncated or corrupt; '
                     f'download it again.') from e
  with archive:
    names = archive.namelist()
    pickles = [n for n in names if n.endswith('/data.pkl') and n.count('/') == 1]
    if not pickles:
      raise ValueError(
          f'{path}: a zip archive without <name>/data.pkl, so not a torch.save file (it holds '
          f'{names[:3]}...). If it is a folder downloaded from Google Drive, unzip it and pass '
          f'the checkpoint file inside (checkpoint_N or checkpoint_N.pth).')
    prefix = pickles[0][:-len('data.pkl')]
    storages: Dict[str, _Storage] = {}
    try:
      obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), storages).load()
      big_endian = (prefix + 'byteorder' in names
                    and archive.read(prefix + 'byteorder').strip() == b'big')
      for storage in storages.values():
        storage.data = _from_buffer(storage, archive.read(f'{prefix}data/{storage.key}'),
                                    big_endian, path)
    except (zipfile.BadZipFile, KeyError, EOFError, pickle.UnpicklingError, struct.error) as e:
      raise ValueError(f'{path}: truncated or corrupt torch.save archive ({type(e).__name__}: '
                       f'{e}).') from e
  return obj, storages


def _load_legacy(path: str):
  with open(path, 'rb') as f:
    buffer = io.BytesIO(f.read())
  storages: Dict[str, _Storage] = {}
  try:
    magic = _Unpickler(buffer, storages).load()
    version = _Unpickler(buffer, storages).load()
    if magic != 0x1950a86a20f9469cfc6c or version != _LEGACY_PROTOCOL_VERSION:
      raise ValueError(f'{path}: not a legacy torch.save file (magic {magic!r:.40}, protocol '
                       f'{version!r:.40}).')
    sys_info = _Unpickler(buffer, storages).load()
    big_endian = isinstance(sys_info, dict) and sys_info.get('little_endian') is False
    obj = _Unpickler(buffer, storages).load()
    keys = _Unpickler(buffer, storages).load()
    for key in keys:
      storage = storages.get(str(key))
      if storage is None:
        raise ValueError(f'{path}: storage {key} is listed but no tensor uses it (corrupt file).')
      count = struct.unpack('<q', buffer.read(8))[0]
      if count != storage.numel:
        raise ValueError(f'{path}: storage {key} holds {count} elements, its tensors expect '
                         f'{storage.numel} (corrupt file).')
      storage.data = _from_buffer(storage, buffer.read(count * storage.dtype.itemsize),
                                  big_endian, path)
  except (EOFError, pickle.UnpicklingError, struct.error) as e:
    raise ValueError(f'{path}: truncated or corrupt legacy torch.save file ({type(e).__name__}: '
                     f'{e}).') from e
  missing = [k for k, s in storages.items() if s.data is None]
  if missing:
    raise ValueError(f'{path}: truncated torch.save file: storages {missing[:5]} are missing.')
  return obj, storages


def load(path: str) -> Any:
  """The object that `torch.save` wrote to `path`, every tensor as a numpy array.

  Reads both torch.save layouts (zip and legacy). Tensors keep their dtype (bfloat16 as
  ml_dtypes.bfloat16) and shape; a torch.nn.Parameter becomes its data; dicts, OrderedDicts,
  lists, tuples and numbers come back as themselves.

  Raises:
    UnsafePickleError (a ValueError): the pickle names a global outside the allowed set (see the
      module docstring); nothing from the file is run.
    ValueError: not a torch.save file, or a truncated / corrupt one.
  """
  with open(path, 'rb') as f:
    head = f.read(32)
  if is_zip(head):
    obj, _ = _load_zip(path)
  elif is_legacy(head):
    obj, _ = _load_legacy(path)
  else:
    raise ValueError(f'{path}: not a torch.save file (neither a zip archive nor the legacy '
                     f'format); it starts with {head[:8]!r}.')
  return _materialize(obj)

