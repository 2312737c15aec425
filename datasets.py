"""Input pipelines: embedded data sets (no download) and the tfds / TFRecord / image-folder pipelines.

Every pipeline yields numpy batches `{'image': float32, 'label': int32}` (+ `'mask'` float32 [B] in
evaluation mode: 1 for real examples, 0 for the zero padding of the last partial batch). Images are
NHWC in [0, 1] BEFORE the data scaler (the training loop applies `get_data_scaler`); vector toy data
are [B, D] in raw coordinates. Labels: the class (CIFAR-10, SVHN, digits, an image folder's class
folders), the mixture component (toy sets), -1 for unlabelled sets (CelebA, LSUN, FFHQ, CelebA-HQ,
a folder without class folders), 0 on padding rows.

Data sets (`config.data.dataset`, case-insensitive):
- embedded: 'ring2d', 'mixture2d', 'gmm_nd' (the closed-form mixtures of `mixtures.py`: fresh exact
  samples per training batch, a fixed seeded 10,000-point test split) and 'digits' (scikit-learn's
  1,797 8x8 handwritten digits, a fixed stratified 1,497 / 300 train / test split);
- tfds: 'CIFAR10', 'SVHN' (svhn_cropped), 'CELEBA' (celeb_a; central crop 140, then resize),
  'LSUN' (lsun/<config.data.category>; central crop to the short side, then resize);
- image folder: 'folder', the PNG / JPEG files under `config.data.path` (layout and labels: see
  image_folder.py; `config.data.class_folders`), each cropped to its central square (or to the
  central `config.data.center_crop` pixels when > 0), then resized. One split, as TFRecords.
- TFRecords: 'FFHQ', 'CelebAHQ' from `config.data.tfrecords_path` (file or glob) in the format of
  the progressive-GAN `dataset_tool.py` that the original read: one `tf.train.Example` per image
  with feature 'shape' (int64 [3], CHW order) and 'data' (bytes: the raw uint8 pixels in CHW order).
  As in the original, such a file set has a single split, used for both training and evaluation;
  images stored at another resolution than config.data.image_size are resized.

Preprocessing follows the original (score_sde, 2021): crop / resize per data set, random left-right
flip when `config.data.random_flip` (training mode only), uniform dequantization
x = (x_uint8 + U[0, 1)) / 256 when `config.data.uniform_dequantization`. One deliberate change:
after any resize the pixels are rounded back onto the 8-bit grid (the original kept CelebA floats
and truncated bicubic LSUN values), so every image is 8-bit data and bits/dim is well defined.

Determinism and resume (same config.seed -> same batches). Training streams are infinite sequences
of epochs; epoch e is the process's shard in an order drawn from (seed, split, process, e), and the
stream is batched across epoch boundaries. `start_step=k` yields exactly batches k, k+1, ... of the
run from 0. Flip and dequantization noise are stateless functions of (seed, stream position), so
they do not depend on threading or on where a run resumed.
- Embedded sets: batch k is a pure function of (seed, k), so resume costs nothing, and the global
  batch is the same for any process count (process p takes its contiguous rows of it).
- tfds / TFRecord: epoch e is a seeded buffer shuffle (`config.data.shuffle_buffer_size`, 10,000 as
  the original) of the shard read in its stored order (tfds already shuffled examples when it
  prepared them). Resume rebuilds epoch e and skips the examples of it already consumed: at most one
  epoch of record reads (encoded images: decoding happens after the skip), no preprocessing.
- Image folder: the records are file names (strided shards, as TFRecords): each epoch shuffles the
  whole shard, resume skips names only, and files are read and decoded in the parallel map.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import math
import os
import zlib
from typing import Callable, Dict, Iterator, Optional, Tuple

import numpy as np

Batch = Dict[str, np.ndarray]

TOY_TEST_SIZE = 10_000  # points in each fixed toy evaluation split
DIGITS_TEST_PER_CLASS = 30  # 10 classes x 30 = 300 test images, 1,497 for training
_FIXED_SPLIT_SEED = 20210101  # the embedded evaluation splits never depend on config.seed


@dataclasses.dataclass(frozen=True)
class _Spec:
  """How one data set is read: its source kind, tfds name and split names."""
  name: str  # canonical name
  kind: str  # 'toy' | 'digits' | 'tfds' | 'tfrecord' | 'folder'
  train_split: str = 'train'
  test_split: str = 'test'
  tfds_name: str = ''
  resize: str = 'plain'  # preprocessing: 'plain' | 'celeba' | 'lsun' | 'folder'
  num_classes: int = 0


_SPECS = {s.name.lower(): s for s in [
    _Spec('CIFAR10', 'tfds', tfds_name='cifar10', num_classes=10),
    _Spec('SVHN', 'tfds', tfds_name='svhn_cropped', num_classes=10),
    _Spec('CELEBA', 'tfds', test_split='validation', tfds_name='celeb_a', resize='celeba'),
    _Spec('LSUN', 'tfds', test_split='validation', tfds_name='lsun/{category}', resize='lsun'),
    _Spec('FFHQ', 'tfrecord', test_split='train'),
    _Spec('CelebAHQ', 'tfrecord', test_split='train'),
    _Spec('folder', 'folder', test_split='train', resize='folder'),
    _Spec('digits', 'digits', num_classes=10),
    _Spec('ring2d', 'toy'),
    _Spec('mixture2d', 'toy'),
    _Spec('gmm_nd', 'toy'),
]}
DATASETS = tuple(s.name for s in _SPECS.values())  # the valid config.data.dataset names
_SPLIT_ALIASES = {'train': 'train', 'test': 'test', 'eval': 'test', 'validation': 'test'}


def _spec(config) -> _Spec:
  """The spec of config.data.dataset; ValueError listing the valid names when unknown."""
  name = str(config.data.dataset)
  if name.lower() not in _SPECS:
    raise ValueError(f'Unknown data set config.data.dataset={name!r}; valid names: '
                     f'{[s.name for s in _SPECS.values()]}.')
  return _SPECS[name.lower()]


def _split_name(spec: _Spec, split: str) -> str:
  """The data set's own split name for 'train' / 'test' (aliases 'eval', 'validation')."""
  if split not in _SPLIT_ALIASES:
    raise ValueError(f'Unknown split {split!r}; valid splits: {sorted(_SPLIT_ALIASES)}.')
  return spec.train_split if _SPLIT_ALIASES[split] == 'train' else spec.test_split


def _seed_word(*keys) -> int:
  """A 62-bit integer hashed from ints and strings (stable across runs and machines)."""
  ints = []
  for k in keys:  # strings by CRC-32, integers (up to 64 bits, any sign) as two 32-bit words
    ints.extend([zlib.crc32(k.encode())] if isinstance(k, str)
                else divmod(int(k) % 2 ** 64, 2 ** 32))
  return int(np.random.SeedSequence(ints).generate_state(1, np.uint64)[0] >> np.uint64(2))


def _rng(*keys) -> np.random.Generator:
  """A numpy Generator seeded from ints and strings."""
  return np.random.default_rng(_seed_word(*keys))


# ------------------------------------------------------------------------------------------------
# Scalers


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """The one description of the configured data that every module uses (never config.data.dim or
  data-set names): what one example is, how the model sees it, and what identifies it.

  shape: one example's, (H, W, C) images or (D,) vectors. is_image: n_bits-bit images, pipelines
  yield them in [0, 1] (bits/dim applies); otherwise continuous vectors in raw coordinates.
  `scaler` maps pipeline output to the model's space ([-1, 1] when `centered`, images only) and
  `inverse_scaler` back. `cache_key()` identifies the data (name, source path, shape, crop and a
  digest of the files) for caches of anything computed from them (FID statistics); it lists
  folders / TFRecord files, nothing else here does I/O. `splits` ({'train': n, 'test': n}, n
  None for infinite toy training data) only from `dataset_info(config, count=True)`.
  """
  name: str
  shape: Tuple[int, ...]
  is_image: bool
  n_bits: int  # 8 for images, 0 for continuous vectors
  num_classes: int  # 0: no labels
  centered: bool
  dequantized: bool  # uniform dequantization x = (k + U[0, 1)) / 2^n_bits
  fingerprint: Callable[[], dict] = dataclasses.field(repr=False, compare=False)
  splits: Optional[Dict[str, Optional[int]]] = None

  def batch_shape(self, n: int) -> Tuple[int, ...]:
    """[n, *shape]: a model input batch."""
    return (int(n),) + tuple(self.shape)

  def scaler(self, x):
    """Pipeline output -> the model's space: 2x - 1 when centered (images), else the identity."""
    return x * 2. - 1. if self.centered and self.is_image else x

  def inverse_scaler(self, x):
    """The model's space -> pipeline output ([0, 1] images): the inverse of `scaler`."""
    return (x + 1.) / 2. if self.centered and self.is_image else x

  def cache_key(self) -> str:
    """A JSON string of `dataset_fingerprint` (lists files: call once per use)."""
    return json.dumps(self.fingerprint(), sort_keys=True)


def get_data_scaler(config) -> Callable:
  """Data normalizer (the original's name): `dataset_info(config).scaler`."""
  return dataset_info(config, count=False).scaler


def get_data_inverse_scaler(config) -> Callable:
  """Inverse of `get_data_scaler`: `dataset_info(config).inverse_scaler`."""
  return dataset_info(config, count=False).inverse_scaler


# ------------------------------------------------------------------------------------------------
# Batch sizes and sharding


def _local_batch(config, evaluation: bool, process_index: Optional[int],
                 process_count: Optional[int]) -> Tuple[int, int, int, int]:
  """(global batch, per-process batch, process index, process count), validated."""
  if process_index is None or process_count is None:
    import jax  # only for the defaults: data code itself never touches an accelerator
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} must lie in [0, {process_count}).')
  knob = 'eval.batch_size' if evaluation else 'training.batch_size'
  global_batch = int(config.eval.batch_size if evaluation else config.training.batch_size)
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'config.{knob}={global_batch} must be a positive multiple of the process '
                     f'count {process_count}.')
  return global_batch, global_batch // process_count, process_index, process_count


# ------------------------------------------------------------------------------------------------
# Embedded data sets: digits and Gaussian mixtures (numpy only; never imports TensorFlow)


@functools.lru_cache(maxsize=None)
def _digits_splits() -> Dict[str, Tuple[np.ndarray, np.ndarray]]:
  """The fixed stratified digits split: DIGITS_TEST_PER_CLASS images of each class for testing."""
  from sklearn.datasets import load_digits  # ships with scikit-learn: no download
  digits = load_digits()
  # Pixels are counts 0..16 of a 4x4 block; map them onto the 8-bit grid, round(v * 255 / 16),
  # so 0 -> 0 and 16 -> 255 and the data are 8-bit images like every other image set here.
  images = np.round(digits.images * (255. / 16.)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int64)
  rng = np.random.default_rng(_FIXED_SPLIT_SEED)
  per_class = [rng.permutation(np.flatnonzero(labels == c))[:DIGITS_TEST_PER_CLASS]
               for c in range(10)]
  test = np.sort(np.concatenate(per_class))
  train = np.setdiff1d(np.arange(len(labels)), test)
  out = {}
  for name, idx in (('train', train), ('test', test)):
    im, lb = images[idx], labels[idx]
    im.flags.writeable = lb.flags.writeable = False  # cached: callers must not mutate it
    out[name] = (im, lb)
  return out


def load_digits_split(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """The fixed digits split 'train' (1,497) or 'test' (300): (uint8 [N, 8, 8, 1], labels [N])."""
  if split not in ('train', 'test'):
    raise ValueError(f'Unknown digits split {split!r}; valid splits: [\'test\', \'train\'].')
  return _digits_splits()[split]


def _mixture(config):
  """The `mixtures` preset named by config.data.dataset, of dimension config.data.dim if set."""
  import mixtures
  return mixtures.get_mixture(_spec(config).name, dim=config.data.get('dim', None))


def _sample_mixture(gmm, rng: np.random.Generator, n: int) -> Tuple[np.ndarray, np.ndarray]:
  """n exact samples of the mixture, in numpy (the input pipeline stays off the accelerator)."""
  comp = rng.choice(len(gmm.weights), size=n, p=gmm.weights)
  x = gmm.means[comp] + gmm.stds[comp] * rng.standard_normal((n, gmm.dim))
  return x.astype(np.float32), comp.astype(np.int32)


def _toy_fixed_split(config, split: str) -> Tuple[np.ndarray, np.ndarray]:
  """A fixed seeded sample of TOY_TEST_SIZE points standing for the toy data set's split."""
  gmm = _mixture(config)
  return _sample_mixture(gmm, _rng(_FIXED_SPLIT_SEED, _spec(config).name, gmm.dim, split),
                         TOY_TEST_SIZE)


def _check_digits_shape(config) -> None:
  """Digits are 8x8 grey: image_size must be a multiple of 8 and num_channels 1 or 3."""
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  if size <= 0 or size % 8 or channels not in (1, 3):
    raise ValueError(f'digits need config.data.image_size a multiple of 8 (got {size}) and '
                     f'config.data.num_channels 1 or 3 (got {channels}).')


def _augment_digits(config, u8: np.ndarray, rng: np.random.Generator, flip: bool) -> np.ndarray:
  """uint8 digits -> float32 [0, 1] images: optional flip, dequantization, upsampling, channels."""
  _check_digits_shape(config)
  x = u8.astype(np.float32)
  if flip:
    mirror = rng.random(len(x)) < 0.5
    x[mirror] = x[mirror, :, ::-1]
  if config.data.uniform_dequantization:
    x = (x + rng.random(x.shape, dtype=np.float32)) / 256.
  else:
    x = x / 255.
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  f = size // 8  # nearest-neighbour upsampling keeps the pixels on the 8-bit grid
  x = np.repeat(np.repeat(x, f, axis=1), f, axis=2) if f > 1 else x
  return np.repeat(x, channels, axis=3) if channels == 3 else x


def _embedded_train_batch(config, split: str, k: int, global_batch: int,
                          perms: Dict[int, np.ndarray], gmm=None) -> Batch:
  """Global training batch k: a pure function of (config.seed, split, k)."""
  spec, seed = _spec(config), config.seed
  if spec.kind == 'toy':
    x, comp = _sample_mixture(gmm, _rng(seed, spec.name, split, 'train', k), global_batch)
    return {'image': x, 'label': comp}
  images, labels = load_digits_split(split)
  n = len(labels)
  pos = np.arange(k * global_batch, (k + 1) * global_batch)
  idx = np.empty(global_batch, np.int64)
  for e in np.unique(pos // n):  # per-epoch permutations; a batch may straddle two epochs
    if e not in perms:
      if len(perms) > 2:  # only the current and next epoch are ever needed again
        perms.clear()
      perms[e] = _rng(seed, spec.name, split, 'epoch', e).permutation(n)
    sel = pos // n == e
    idx[sel] = perms[e][pos[sel] % n]
  x = _augment_digits(config, images[idx], _rng(seed, spec.name, split, 'aug', k),
                      flip=bool(config.data.random_flip))
  return {'image': x, 'label': labels[idx].astype(np.int32)}


def _embedded_eval_batches(config, split: str, global_batch: int, dequant_seed: int
                           ) -> Iterator[Batch]:
  """One pass over the fixed split in global batches, the last one zero-padded with mask 0."""
  spec = _spec(config)
  if spec.kind == 'toy':
    x_all, y_all = _toy_fixed_split(config, split)
  else:
    x_all, y_all = load_digits_split(split)
  n = len(y_all)
  for j in range(math.ceil(n / global_batch)):
    idx = np.arange(j * global_batch, (j + 1) * global_batch)
    real = idx < n
    idx = np.where(real, idx, 0)
    if spec.kind == 'toy':
      x = x_all[idx].copy()
    else:
      x = _augment_digits(config, x_all[idx], _rng(config.seed, spec.name, split, 'eval',
                                                   dequant_seed, j), flip=False)
    x[~real] = 0.
    yield {'image': x, 'label': np.where(real, y_all[idx], 0).astype(np.int32),
           'mask': real.astype(np.float32)}


def _embedded_dataset(config, split: str, evaluation: bool, start_step: int, global_batch: int,
                      local_batch: int, process_index: int, dequant_seed: int) -> Iterator[Batch]:
  """Process `process_index`'s contiguous rows of each global batch of an embedded set."""
  rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
  if evaluation:
    batches = _embedded_eval_batches(config, split, global_batch, dequant_seed)
  else:
    perms: Dict[int, np.ndarray] = {}
    gmm = _mixture(config) if _spec(config).kind == 'toy' else None
    batches = (_embedded_train_batch(config, split, k, global_batch, perms, gmm)
               for k in itertools.count(start_step))
  for batch in batches:
    yield {key: np.ascontiguousarray(v[rows]) for key, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# TensorFlow: imported lazily, never allowed onto an accelerator


@functools.lru_cache(maxsize=None)
def _tf():
  """TensorFlow, with every GPU hidden from it (JAX owns the accelerators)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialized its devices elsewhere: leave them as they are
    pass
  return tf


@functools.lru_cache(maxsize=None)
def _tfds():
  """tensorflow_datasets, imported after TF has been kept off the GPUs."""
  _tf()
  import tensorflow_datasets as tfds
  return tfds


def _to_grid(x):
  """float pixels in [0, 255] -> the nearest 8-bit values (float32 integers)."""
  tf = _tf()
  return tf.round(tf.clip_by_value(x, 0., 255.))


def _central_crop(img, size):
  """The central size x size window (size a Python int or a scalar tensor)."""
  tf = _tf()
  h, w = tf.shape(img)[0], tf.shape(img)[1]
  top, left = (h - size) // 2, (w - size) // 2
  return img[top:top + size, left:left + size]


def _resize_small(img, size: int):
  """Resizes so that the short side is `size` (bilinear, antialiased), as the original."""
  tf = _tf()
  hw = tf.cast(tf.shape(img)[:2], tf.float32)
  new_hw = tf.cast(tf.round(hw * size / tf.reduce_min(hw)), tf.int32)
  return tf.image.resize(img, new_hw, antialias=True)


def _resize_op(spec: _Spec, config) -> Callable:
  """uint8 HWC image -> float32 [size, size, C] on the 8-bit grid (values 0..255)."""
  tf = _tf()
  size = int(config.data.image_size)

  def plain(img):  # CIFAR-10 / SVHN / TFRecords: resize only when the size differs
    x = tf.cast(img, tf.float32)
    if img.shape[0] == size and img.shape[1] == size:
      return x
    same = tf.reduce_all(tf.shape(x)[:2] == size)  # TFRecord shapes are known only at run time
    return tf.cond(same, lambda: x,
                   lambda: _to_grid(tf.image.resize(x, [size, size], antialias=True)))

  def celeba(img):  # central 140 x 140 face crop, then resize
    return _to_grid(_resize_small(_central_crop(tf.cast(img, tf.float32), 140), size))

  def lsun(img):
    x = tf.cast(img, tf.float32)
    if size == 128:  # the original's 128px branch: resize the short side, then crop
      return _to_grid(_central_crop(_resize_small(x, size), size))
    short = tf.reduce_min(tf.shape(x)[:2])  # crop to the short side, then bicubic resize
    return _to_grid(tf.image.resize(_central_crop(x, short), [size, size], antialias=True,
                                    method='bicubic'))

  crop = _center_crop(config)

  def folder(img):  # central crop (the short side unless config.data.center_crop), then resize
    return plain(_central_crop(img, crop or tf.reduce_min(tf.shape(img)[:2])))

  op = {'plain': plain, 'celeba': celeba, 'lsun': lsun, 'folder': folder}[spec.resize]
  channels = int(config.data.num_channels)
  return lambda img: tf.ensure_shape(op(img), [size, size, channels])


@dataclasses.dataclass
class _Source:
  """One process's shard of a split as raw records, before any decoding."""
  ds: object  # tf.data.Dataset of raw records
  decode: Callable  # raw record -> (uint8 HWC image, int label)
  n_local: int  # examples in this process's shard
  n_total: int  # examples in the whole split
  start: int  # global index of the shard's first example
  stride: int  # global index step between consecutive shard examples
  shuffle_all: bool = False  # records are small: shuffle the whole shard, not a buffer of it


def _tfds_source(spec: _Spec, config, split: str, pi: int, pc: int) -> _Source:
  """The tfds shard `tfds.split_for_jax_process(split)`, images still encoded."""
  tf, tfds = _tf(), _tfds()
  name = spec.tfds_name.format(category=config.data.get('category', 'bedroom'))
  builder = tfds.builder(name, data_dir=config.data.get('tfds_data_dir', None))
  builder.download_and_prepare()  # as the original; a no-op once prepared

  def read(s):
    options = tf.data.Options()
    options.deterministic = True
    return builder.as_dataset(split=s, shuffle_files=False,  # order comes from our seeded shuffle
                              decoders={'image': tfds.decode.SkipDecoding()},
                              read_config=tfds.ReadConfig(options=options))

  ds = read(tfds.split_for_jax_process(split, process_index=pi, process_count=pc))
  n_total = _count(read(split))
  image_feature = builder.info.features['image']
  has_label = 'label' in builder.info.features

  def decode(ex):
    label = tf.cast(ex['label'], tf.int32) if has_label else tf.constant(-1, tf.int32)
    return image_feature.decode_example(ex['image']), label

  # tfds.even_splits gives the first (n_total % pc) processes one extra example each.
  per, rem = divmod(n_total, pc)
  return _Source(ds, decode, _count(ds), n_total, per * pi + min(pi, rem), 1)


@functools.lru_cache(maxsize=None)
def _count_records(files: Tuple[str, ...]) -> int:
  """Number of records in the TFRecord files (one read of them; cached per process)."""
  tf = _tf()
  return int(tf.data.TFRecordDataset(list(files)).reduce(np.int64(0), lambda c, _: c + 1))


def _tfrecord_files(config) -> Tuple[str, ...]:
  """The files matched by config.data.tfrecords_path; FileNotFoundError naming it when none."""
  path = str(config.data.get('tfrecords_path', '') or '')
  files = tuple(sorted(_tf().io.gfile.glob(path))) if path else ()
  if not files:
    raise FileNotFoundError(f'No TFRecord file at config.data.tfrecords_path={path!r} (data set '
                            f'{config.data.dataset!r}); point it to a .tfrecords file or glob.')
  return files


def _tfrecord_source(config, pi: int, pc: int) -> _Source:
  """Process pi's strided shard of the TFRecord files (progressive-GAN format, CHW uint8)."""
  tf = _tf()
  files = _tfrecord_files(config)
  channels = int(config.data.num_channels)
  features = {'shape': tf.io.FixedLenFeature([3], tf.int64),
              'data': tf.io.FixedLenFeature([], tf.string)}

  def decode(record):
    ex = tf.io.parse_single_example(record, features)
    chw = tf.reshape(tf.io.decode_raw(ex['data'], tf.uint8), ex['shape'])
    img = tf.ensure_shape(tf.transpose(chw, (1, 2, 0)), [None, None, channels])
    return img, tf.constant(-1, tf.int32)

  n_total = _count_records(files)
  ds = tf.data.TFRecordDataset(list(files)).shard(pc, pi)
  return _Source(ds, decode, len(range(pi, n_total, pc)), n_total, pi, pc)


def _folder_listing(config):
  """The image_folder listing of config.data.path (config.data.class_folders: labels or not)."""
  import image_folder
  return image_folder.list_images(str(config.data.get('path', '') or ''),
                                  bool(config.data.get('class_folders', True)))


def _center_crop(config) -> int:
  return int(config.data.get('center_crop', 0) or 0)


def _folder_source(config, pi: int, pc: int) -> _Source:
  """Process pi's strided shard of the image folder: records are file names, decoded later."""
  import image_folder
  tf = _tf()
  listing = _folder_listing(config)
  ds = tf.data.Dataset.from_tensor_slices(
      {'path': listing.paths, 'label': np.asarray(listing.labels, np.int32)}).shard(pc, pi)
  n_total = len(listing.files)
  decode = image_folder.decode_fn(tf, int(config.data.num_channels), _center_crop(config))
  return _Source(ds, decode, len(range(pi, n_total, pc)), n_total, pi, pc, shuffle_all=True)


def _naming_bad_files(batches: Iterator[Batch], config) -> Iterator[Batch]:
  """The folder pipeline's batches; a decoding failure becomes a ValueError naming the bad files."""
  import image_folder
  tf = _tf()
  decode_error = tf.errors.InvalidArgumentError  # resolved now: at exit, module attributes go
  try:
    yield from batches
  except decode_error as e:
    problems = image_folder.find_problems(tf, _folder_listing(config),
                                          int(config.data.num_channels), _center_crop(config))
    if not problems:
      raise
    raise ValueError(f'Unusable images in config.data.path={config.data.path!r} (fix or remove '
                     'them; convert images of another channel count to '
                     'config.data.num_channels):\n  ' + '\n  '.join(problems)) from e


def _count(ds) -> int:
  """Cardinality of a finite tf.data.Dataset, counting only when it is unknown."""
  n = int(ds.cardinality())
  return n if n >= 0 else int(ds.reduce(np.int64(0), lambda c, _: c + 1))


def _source(spec: _Spec, config, split: str, pi: int, pc: int) -> _Source:
  if spec.kind == 'tfrecord':
    return _tfrecord_source(config, pi, pc)
  if spec.kind == 'folder':
    return _folder_source(config, pi, pc)
  return _tfds_source(spec, config, split, pi, pc)


def _preprocess_fn(spec: _Spec, config, source: _Source, *, flip: bool, noise_key: int) -> Callable:
  """(position, raw record) -> {'image', 'label'}; the random ops are stateless in the position."""
  tf = _tf()
  resize = _resize_op(spec, config)
  dequantize = bool(config.data.uniform_dequantization)
  flip_word, dequant_word = _seed_word(noise_key, 'flip'), _seed_word(noise_key, 'dequant')

  def fn(pos, record):
    img, label = source.decode(record)
    q = resize(img)  # integer values 0..255
    if flip:
      q = tf.image.stateless_random_flip_left_right(q, tf.stack([tf.constant(flip_word, tf.int64),
                                                                 pos]))
    if dequantize:  # (x_uint8 + U[0, 1)) / 256, as the original
      u = tf.random.stateless_uniform(tf.shape(q), tf.stack([tf.constant(dequant_word, tf.int64),
                                                             pos]))
      x = (q + u) / 256.
    else:
      x = q / 255.
    return {'image': x, 'label': label}

  return _tf().autograph.experimental.do_not_convert(fn)  # plain graph code: skip AutoGraph


def _tf_train_dataset(spec: _Spec, config, split: str, start_step: int, local_batch: int,
                      pi: int, pc: int):
  """Infinite stream of per-epoch seeded shuffles of the shard, resumable at `start_step`."""
  tf = _tf()
  source = _source(spec, config, split, pi, pc)
  n = source.n_local
  if n == 0:
    raise ValueError(f'Process {pi} of {pc} has no examples of split {split!r} of '
                     f'{spec.name}.')
  key = _seed_word(config.seed, spec.name, split, pi, pc)
  buffer = n if source.shuffle_all else int(config.data.get('shuffle_buffer_size', 10_000))
  shuffle_word = tf.constant(_seed_word(key, 'shuffle') % 2 ** 31, tf.int64)

  def epoch(e):
    return source.ds.shuffle(buffer, seed=(shuffle_word + e * 1_000_003) % (2 ** 31 - 1),
                             reshuffle_each_iteration=False)

  first = start_step * local_batch  # stream position of the first example to yield
  ds = tf.data.Dataset.range(first // n, 2 ** 62).flat_map(epoch).skip(first % n)
  ds = ds.enumerate(start=first)
  ds = ds.map(_preprocess_fn(spec, config, source, flip=bool(config.data.random_flip),
                             noise_key=key),
              num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds.batch(local_batch, drop_remainder=True)


def _tf_eval_dataset(spec: _Spec, config, split: str, local_batch: int, pi: int, pc: int,
                     dequant_seed: int):
  """One ordered pass over the shard, padded so that every process yields the same batch count."""
  tf = _tf()
  source = _source(spec, config, split, pi, pc)
  # Noise keyed by the example's global index: the same for any process count.
  noise_key = _seed_word(config.seed, spec.name, split, 'eval', dequant_seed)
  prep = _preprocess_fn(spec, config, source, flip=False, noise_key=noise_key)
  ds = source.ds.enumerate().map(
      tf.autograph.experimental.do_not_convert(
          lambda i, r: dict(prep(source.start + source.stride * i, r), mask=tf.constant(1.))),
      num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  most = max(source.n_local, -(-source.n_total // pc))  # the largest shard of any process
  n_batches = -(-most // local_batch)
  size, channels = int(config.data.image_size), int(config.data.num_channels)
  pad = {'image': tf.zeros([size, size, channels]), 'label': tf.constant(0, tf.int32),
         'mask': tf.constant(0.)}
  ds = ds.concatenate(tf.data.Dataset.from_tensors(pad).repeat(
      n_batches * local_batch - source.n_local))
  return ds.batch(local_batch, drop_remainder=True)


def _tf_dataset(spec: _Spec, config, split: str, evaluation: bool, start_step: int,
                local_batch: int, pi: int, pc: int, dequant_seed: int) -> Iterator[Batch]:
  """The tfds / TFRecord pipeline as an iterator of numpy batches."""
  tf, tfds = _tf(), _tfds()
  if evaluation:
    ds = _tf_eval_dataset(spec, config, split, local_batch, pi, pc, dequant_seed)
  else:
    ds = _tf_train_dataset(spec, config, split, start_step, local_batch, pi, pc)
  options = tf.data.Options()
  options.deterministic = True
  options.experimental_optimization.map_parallelization = True
  batches = iter(tfds.as_numpy(ds.with_options(options).prefetch(tf.data.AUTOTUNE)))
  return _naming_bad_files(batches, config) if spec.kind == 'folder' else batches


# ------------------------------------------------------------------------------------------------
# Public entry points


def get_dataset(config, *, split: str = 'train', evaluation: bool = False, start_step: int = 0,
                process_index: Optional[int] = None, process_count: Optional[int] = None,
                dequant_seed: int = 0) -> Iterator[Batch]:
  """Iterator of this process's numpy batches {'image', 'label'} (+ 'mask' when evaluating).

  Training mode (evaluation=False): an infinite shuffled stream of the split with random flips and
  dequantization per config, batch config.training.batch_size // process_count, starting at batch
  `start_step` of the seeded sequence. Evaluation mode: one deterministic pass over the split, no
  shuffle, no flip, batch config.eval.batch_size // process_count, the last batch padded (mask 0);
  `dequant_seed` picks the dequantization noise (one value per bits/dim pass).
  """
  spec = _spec(config)
  split_name = _split_name(spec, split)
  global_batch, local_batch, pi, pc = _local_batch(config, evaluation, process_index,
                                                   process_count)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  if spec.kind in ('toy', 'digits'):
    if spec.kind == 'digits':  # fail on bad input now, not at the first batch
      _check_digits_shape(config)
    else:
      _mixture(config)
    return _embedded_dataset(config, split_name, evaluation, start_step, global_batch,
                             local_batch, pi, dequant_seed)
  if spec.kind == 'tfrecord':
    _tfrecord_files(config)  # fail on a missing path before building anything
  if spec.kind == 'folder':
    _folder_listing(config)  # fail on a missing or empty folder before building anything
  return _tf_dataset(spec, config, split_name, evaluation, start_step, local_batch, pi, pc,
                     dequant_seed)


def dataset_info(config, *, count: bool = True, check: bool = True) -> DataInfo:
  """The `DataInfo` of config.data; validates the data set name and (check=True) that its images
  have the configured shape and channels.

  count=False does no I/O (`splits` None); count=True counts both splits (tfds / TFRecord /
  folder sets read their indexes). check=False describes the configured shape as it is (what a
  network built from the config takes, e.g. a 1-channel 8x8 CIFAR-10 test network)."""
  spec = _spec(config)
  d = config.data
  common = dict(name=spec.name, centered=bool(d.get('centered', False)),
                dequantized=bool(d.get('uniform_dequantization', False)),
                fingerprint=functools.partial(dataset_fingerprint, config))
  if spec.kind == 'toy':
    gmm = _mixture(config)
    return DataInfo(shape=(gmm.dim,), is_image=False, n_bits=0, num_classes=len(gmm.weights),
                    splits={'train': None, 'test': TOY_TEST_SIZE} if count else None, **common)
  size, channels = int(d.image_size), int(d.num_channels)
  if check and spec.kind == 'digits':
    _check_digits_shape(config)
  elif check and spec.kind in ('tfds', 'tfrecord') and channels != 3:  # all RGB; no conversion
    raise ValueError(f'{spec.name} images are RGB: config.data.num_channels must be 3, got '
                     f'{channels}.')
  num_classes = (len(_folder_listing(config).classes) if spec.kind == 'folder' and check
                 else spec.num_classes)
  splits = None
  if count and spec.kind == 'digits':
    splits = {s: len(load_digits_split(s)[1]) for s in ('train', 'test')}
  elif count:
    splits = {s: _source(spec, config, _split_name(spec, s), 0, 1).n_total
              for s in ('train', 'test')}
  return DataInfo(shape=(size, size, channels), is_image=True, n_bits=8, num_classes=num_classes,
                  splits=splits, **common)


def dataset_fingerprint(config) -> dict:
  """What determines the images the configured pipeline yields (in evaluation mode), as a dict.

  Keys: 'dataset' (canonical name), 'source' (tfds name, absolute folder / TFRecord paths, or
  'embedded'), 'shape' (one example's), 'preprocess' (crop settings), and 'files': a digest of the
  files' names, sizes and modification times ('' for tfds and embedded sets). Everything but
  'files' names the data; 'files' changes whenever one of its files does. Cache keys of anything
  computed from the data (FID statistics) use it. Lists the folder / globs the TFRecords: no
  decoding.
  """
  spec = _spec(config)
  out = {'dataset': spec.name, 'source': 'embedded', 'preprocess': spec.resize, 'files': ''}
  if spec.kind == 'toy':
    return dict(out, shape=(_mixture(config).dim,))
  out['shape'] = (int(config.data.image_size),) * 2 + (int(config.data.num_channels),)
  if spec.kind == 'tfds':
    out['source'] = [spec.tfds_name.format(category=config.data.get('category', 'bedroom')),
                     config.data.get('tfds_data_dir', None)]
  elif spec.kind == 'tfrecord':
    gfile = _tf().io.gfile
    files = [os.path.abspath(f) if '://' not in f else f for f in _tfrecord_files(config)]
    stats = [gfile.stat(f) for f in files]
    out['source'] = files
    out['files'] = hashlib.sha256(json.dumps(
        [[f, s.length, s.mtime_nsec] for f, s in zip(files, stats)]).encode()).hexdigest()
  elif spec.kind == 'folder':
    listing = _folder_listing(config)
    out['source'] = listing.root
    out['preprocess'] = f'folder:center_crop={_center_crop(config)}'
    out['files'] = listing.digest
  return out
