"""Tests of datasets.py: embedded sets, the tfds pipelines on mock data, TFRecords, bad input."""
import itertools
import os
import subprocess
import sys

import numpy as np
import pytest

import datasets
import mixtures
from configs.default_cifar10_configs import get_default_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(dataset='digits', *, image_size=8, channels=1, batch=32, eval_batch=64, flip=False,
            dequant=False, centered=False, seed=42, **data):
  config = get_default_configs()
  config.data.dataset = dataset
  config.data.image_size = image_size
  config.data.num_channels = channels
  config.data.random_flip = flip
  config.data.uniform_dequantization = dequant
  config.data.centered = centered
  for key, value in data.items():
    config.data[key] = value
  config.training.batch_size = batch
  config.eval.batch_size = eval_batch
  config.seed = seed
  return config


def _take(it, n):
  return list(itertools.islice(it, n))


def _same(a, b):
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def _digits_reference():
  """All 1,797 digits mapped independently: round(v * 255 / 16) as uint8 [N, 8, 8, 1]."""
  from sklearn.datasets import load_digits
  d = load_digits()
  return np.round(d.images * 255. / 16.).astype(np.uint8)[..., None], d.target


def _rows(images):
  return sorted(bytes(r) for r in np.asarray(images).reshape(len(images), -1))


# ------------------------------------------------------------------------------------------------
# Scalers and bad input


def test_scalers():
  x = np.linspace(0., 1., 11)
  centered = _config('CIFAR10', channels=3, centered=True)
  np.testing.assert_allclose(datasets.get_data_scaler(centered)(x), 2 * x - 1)
  np.testing.assert_allclose(datasets.get_data_inverse_scaler(centered)(2 * x - 1), x)
  for config in (_config('CIFAR10', channels=3), _config('ring2d', centered=True)):
    np.testing.assert_array_equal(datasets.get_data_scaler(config)(x), x)
    np.testing.assert_array_equal(datasets.get_data_inverse_scaler(config)(x), x)


def test_bad_input():
  with pytest.raises(ValueError, match="'MNIST'.*CIFAR10.*digits"):
    datasets.get_dataset(_config('MNIST'), process_index=0, process_count=1)
  with pytest.raises(ValueError, match='batch_size=10.*process count 3'):
    datasets.get_dataset(_config(batch=10), process_index=0, process_count=3)
  with pytest.raises(ValueError, match='eval.batch_size=10'):
    datasets.get_dataset(_config(eval_batch=10), evaluation=True, process_index=1, process_count=4)
  with pytest.raises(ValueError, match="'dev'"):
    datasets.get_dataset(_config(), split='dev', process_index=0, process_count=1)
  with pytest.raises(ValueError, match='image_size'):
    datasets.get_dataset(_config(image_size=12), process_index=0, process_count=1)
  with pytest.raises(ValueError, match='process_index=2'):
    datasets.get_dataset(_config(), process_index=2, process_count=2)
  missing = '/nonexistent/dir/ffhq-r08.tfrecords'
  with pytest.raises(FileNotFoundError, match=missing):
    datasets.get_dataset(_config('FFHQ', tfrecords_path=missing), process_index=0, process_count=1)


def test_embedded_sets_never_import_tensorflow():
  code = ('import sys, datasets\n'
          'from configs.default_cifar10_configs import get_default_configs\n'
          'c = get_default_configs(); c.data.dataset = "digits"; c.data.image_size = 8\n'
          'c.data.num_channels = 1; c.training.batch_size = 4\n'
          'next(datasets.get_dataset(c, process_index=0, process_count=1))\n'
          'c.data.dataset = "ring2d"\n'
          'next(datasets.get_dataset(c, process_index=0, process_count=1))\n'
          'assert "tensorflow" not in sys.modules, "TensorFlow was imported"\n')
  subprocess.run([sys.executable, '-c', code], cwd=ROOT, check=True,
                 env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS='cpu'))


# ------------------------------------------------------------------------------------------------
# Digits


def test_digits_split_is_fixed_and_disjoint():
  ref_images, ref_labels = _digits_reference()
  train_x, train_y = datasets.load_digits_split('train')
  test_x, test_y = datasets.load_digits_split('test')
  assert train_x.shape == (1497, 8, 8, 1) and test_x.shape == (300, 8, 8, 1)
  assert train_x.dtype == np.uint8 and train_x.max() == 255 and train_x.min() == 0
  # The two splits are a partition of the full set (as multisets of (image, label) rows).
  def rows(x, y):
    return sorted(bytes(a) + bytes([b]) for a, b in zip(x.reshape(len(x), -1), y))
  assert rows(np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])) == \
      rows(ref_images, ref_labels)
  assert np.bincount(test_y, minlength=10).tolist() == [30] * 10  # stratified
  # Stable: rebuilt from scratch it is the same, and no config seed enters it.
  datasets._digits_splits.cache_clear()
  np.testing.assert_array_equal(datasets.load_digits_split('test')[0], test_x)
  np.testing.assert_array_equal(datasets.load_digits_split('train')[1], train_y)
  info = datasets.dataset_info(_config())
  assert info.splits == {'train': 1497, 'test': 300}
  assert info.shape == (8, 8, 1) and info.is_image and info.num_classes == 10


def test_digits_epoch_is_a_permutation_on_the_grid():
  train_x, train_y = datasets.load_digits_split('train')
  config = _config(batch=499)  # 3 x 499 = 1497: three batches are exactly one epoch
  batches = _take(datasets.get_dataset(config, process_index=0, process_count=1), 3)
  x = np.concatenate([b['image'] for b in batches])
  assert x.dtype == np.float32 and x.shape == (1497, 8, 8, 1)
  q = x * 255.
  np.testing.assert_allclose(q, np.round(q), atol=1e-4)
  assert _rows(np.round(q).astype(np.uint8)) == _rows(train_x)
  labels = np.concatenate([b['label'] for b in batches])
  assert labels.dtype == np.int32 and sorted(labels) == sorted(train_y)
  # The next epoch is another order of the same images.
  nxt = _take(datasets.get_dataset(config, start_step=3, process_index=0, process_count=1), 1)
  assert not np.array_equal(nxt[0]['image'], batches[0]['image'])


def test_digits_flip_and_dequantization():
  plain = _take(datasets.get_dataset(_config(batch=256), process_index=0, process_count=1), 2)
  flipped = _take(datasets.get_dataset(_config(batch=256, flip=True), process_index=0,
                                       process_count=1), 2)
  n_same = n_mirror = 0
  for a, b in zip(plain, flipped):
    for x, y in zip(a['image'], b['image']):
      same, mirror = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
      assert same or mirror
      n_same += same and not mirror
      n_mirror += mirror and not same
  assert n_same > 100 and n_mirror > 100
  deq = _take(datasets.get_dataset(_config(batch=256, dequant=True), process_index=0,
                                   process_count=1), 2)
  noises = []
  for a, b in zip(plain, deq):
    u = b['image'] * 256. - np.round(a['image'] * 255.)  # (x_uint8 + u) / 256, u ~ U[0, 1)
    assert u.min() >= -1e-4 and u.max() < 1. + 1e-4
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    noises.append(u)
  assert np.abs(noises[0] - noises[1]).mean() > 0.2  # fresh noise in every batch


def test_embedded_resume_is_exact():
  for config in (_config(batch=64, flip=True, dequant=True), _config('ring2d', batch=64)):
    full = _take(datasets.get_dataset(config, process_index=0, process_count=1), 27)
    # Digits: 1497 / 64 = 23.4 batches per epoch, so batches 22..26 cross an epoch boundary.
    resumed = _take(datasets.get_dataset(config, start_step=22, process_index=0,
                                         process_count=1), 5)
    _same(resumed, full[22:])
  other_seed = _take(datasets.get_dataset(_config(batch=64, seed=7), process_index=0,
                                          process_count=1), 1)
  assert not np.array_equal(other_seed[0]['image'], full[0]['image'])


def test_embedded_process_shards():
  config = _config(batch=64, eval_batch=128, flip=True, dequant=True)
  whole = _take(datasets.get_dataset(config, start_step=5, process_index=0, process_count=1), 3)
  parts = [_take(datasets.get_dataset(config, start_step=5, process_index=p, process_count=2), 3)
           for p in range(2)]
  for k in range(3):  # the two processes hold the two halves of the same global batch
    for key in ('image', 'label'):
      np.testing.assert_array_equal(
          np.concatenate([parts[0][k][key], parts[1][k][key]]), whole[k][key])
    assert parts[0][k]['image'].shape == (32, 8, 8, 1)
  # An evaluation pass: same batch count on both processes, every test image exactly once.
  config = _config(eval_batch=128)
  evals = [list(datasets.get_dataset(config, split='test', evaluation=True, process_index=p,
                                     process_count=2)) for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == 3  # ceil(300 / 128)
  seen = [b['image'][b['mask'] == 1] for e in evals for b in e]
  test_x, _ = datasets.load_digits_split('test')
  assert _rows(np.round(np.concatenate(seen) * 255).astype(np.uint8)) == _rows(test_x)
  assert sum(b['mask'].sum() for e in evals for b in e) == 300
  padded = [b['image'][b['mask'] == 0] for e in evals for b in e]
  assert sum(len(p) for p in padded) == 3 * 128 - 300 and all(np.all(p == 0) for p in padded)


def test_digits_eval_dequant_seed():
  config = _config(eval_batch=100, dequant=True)
  a, b, c = (list(datasets.get_dataset(config, split='test', evaluation=True, dequant_seed=s,
                                       process_index=0, process_count=1)) for s in (0, 0, 1))
  _same(a, b)
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  np.testing.assert_array_equal(np.floor(a[0]['image'] * 256), np.floor(c[0]['image'] * 256))


def test_digits_upsampled_rgb():
  batch = next(datasets.get_dataset(_config(image_size=16, channels=3), process_index=0,
                                    process_count=1))
  x = batch['image']
  assert x.shape == (32, 16, 16, 3)
  np.testing.assert_array_equal(x[:, ::2, ::2, 0], x[:, 1::2, 1::2, 2])


# ------------------------------------------------------------------------------------------------
# Gaussian-mixture toy sets


@pytest.mark.parametrize('name,dim', [('ring2d', None), ('mixture2d', None), ('gmm_nd', 5)])
def test_toy_samples_match_mixture(name, dim):
  config = _config(name, batch=8192, dim=dim)
  del config.data.image_size, config.data.num_channels  # as the toy configs: vector data only
  gmm = mixtures.get_mixture(name, dim=dim)
  batch = next(datasets.get_dataset(config, process_index=0, process_count=1))
  x = batch['image']
  assert x.shape == (8192, gmm.dim) and x.dtype == np.float32
  se = np.sqrt(gmm.variance / len(x))
  assert np.all(np.abs(x.mean(0) - gmm.mean) < 5 * se)
  assert np.all(np.abs(x.var(0) / gmm.variance - 1) < 0.1)
  # Labels are the components: each point lies near its own component's mean.
  k = batch['label']
  z = (x - gmm.means[k]) / gmm.stds[k]
  assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
  info = datasets.dataset_info(config)
  assert info.shape == (gmm.dim,) and not info.is_image
  assert info.splits['test'] == datasets.TOY_TEST_SIZE


def test_toy_dim_mismatch():
  with pytest.raises(ValueError, match='dim=3'):
    datasets.get_dataset(_config('ring2d', dim=3), process_index=0, process_count=1)


def test_toy_eval_split_fixed():
  evals = [list(datasets.get_dataset(_config('ring2d', eval_batch=4096, seed=s), split='test',
                                     evaluation=True, process_index=0, process_count=1))
           for s in (1, 2)]
  _same(evals[0], evals[1])  # independent of config.seed
  assert len(evals[0]) == 3
  assert sum(b['mask'].sum() for b in evals[0]) == datasets.TOY_TEST_SIZE
  assert evals[0][-1]['image'].shape == (4096, 2)


# ------------------------------------------------------------------------------------------------
# tfds pipelines on mock data (TensorFlow is imported only from here on)


@pytest.fixture(scope='module')
def tfds():
  import tensorflow_datasets
  return tensorflow_datasets


def _split_honoring_mock(tfds, num_examples, shape=(32, 32, 3)):
  """(factory of `mock_data` contexts that honour sub-splits, images): example i has label i."""
  import tensorflow as tf
  from tensorflow_datasets.core import splits as splits_lib
  images = np.random.default_rng(0).integers(0, 256, (num_examples,) + shape, dtype=np.uint8)
  split_dict = splits_lib.SplitDict([
      splits_lib.SplitInfo(name=n, shard_lengths=[num_examples], num_bytes=0,
                           filename_template=None) for n in ('train', 'test')])

  def as_dataset(self, split, decoders=None, read_config=None, **kwargs):
    del self, decoders, read_config, kwargs
    (inst,) = splits_lib.AbstractSplit.from_spec(split).to_absolute(split_dict)
    lo, hi = inst.from_ or 0, num_examples if inst.to is None else inst.to
    ds = tf.data.Dataset.from_tensor_slices((images[lo:hi], np.arange(lo, hi)))
    ds = ds.map(lambda im, i: {'image': tf.io.encode_png(im), 'label': i,
                               'id': tf.strings.as_string(i)})
    return ds.apply(tf.data.experimental.assert_cardinality(hi - lo))

  return lambda: tfds.testing.mock_data(as_dataset_fn=as_dataset), images


@pytest.mark.parametrize('dataset,size,extra', [
    ('CIFAR10', 32, {}), ('SVHN', 32, {}), ('CIFAR10', 16, {}), ('CELEBA', 32, {}),
    ('LSUN', 32, {'category': 'bedroom'}), ('LSUN', 128, {'category': 'church_outdoor'})])
def test_tfds_pipeline_end_to_end(tfds, dataset, size, extra):
  config = _config(dataset, image_size=size, channels=3, batch=4, eval_batch=8, flip=True,
                   centered=True, **extra)
  with tfds.testing.mock_data(num_examples=6):
    train = _take(datasets.get_dataset(config, process_index=0, process_count=1), 2)
    evals = list(datasets.get_dataset(config, split='test', evaluation=True, process_index=0,
                                      process_count=1))
    info = datasets.dataset_info(config)
  assert info.shape == (size, size, 3) and info.is_image
  assert info.splits == {'train': 6, 'test': 6}
  for batch in train + evals:
    x = batch['image']
    assert x.dtype == np.float32 and x.shape[1:] == (size, size, 3)
    assert batch['label'].dtype == np.int32
    q = x * 255.  # no dequantization: every pixel on the 8-bit grid, even after resizing
    np.testing.assert_allclose(q, np.round(q), atol=2e-4)
    assert x.min() >= 0. and x.max() <= 1.
    scaled = np.asarray(datasets.get_data_scaler(config)(x))
    np.testing.assert_allclose(scaled, 2. * x - 1.)
    assert scaled.min() >= -1. and scaled.max() <= 1.
  assert train[0]['image'].shape[0] == 4 and x.std() > 0
  assert [b['mask'].tolist() for b in evals] == [[1.] * 6 + [0.] * 2]
  assert 'mask' not in train[0]
  labelled = dataset in ('CIFAR10', 'SVHN')
  assert np.all((train[0]['label'] >= 0) == labelled)


def test_tfds_dequantization_and_flip(tfds):
  kw = dict(channels=3, image_size=32, batch=16)
  with tfds.testing.mock_data(num_examples=48):
    runs = {(f, d): _take(datasets.get_dataset(_config('CIFAR10', flip=f, dequant=d, **kw),
                                               process_index=0, process_count=1), 3)
            for f, d in ((False, False), (True, False), (False, True))}
  n_same = n_mirror = 0
  for a, b, c in zip(runs[False, False], runs[True, False], runs[False, True]):
    np.testing.assert_array_equal(a['label'], b['label'])  # the flip leaves the order alone
    for x, y in zip(a['image'], b['image']):
      same, mirror = np.array_equal(x, y), np.array_equal(x[:, ::-1], y)
      assert same or mirror
      n_same, n_mirror = n_same + same, n_mirror + mirror
    u = c['image'] * 256. - np.round(a['image'] * 255.)  # (x_uint8 + u) / 256, u ~ U[0, 1)
    assert u.min() >= -2e-4 and u.max() < 1. + 2e-4
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
  assert n_same >= 8 and n_mirror >= 8


def test_tfds_resume_and_seed(tfds):
  mock, _ = _split_honoring_mock(tfds, 20)
  config = _config('CIFAR10', channels=3, image_size=32, batch=8, flip=True, dequant=True,
                   shuffle_buffer_size=8)
  with mock():
    full = _take(datasets.get_dataset(config, process_index=0, process_count=1), 8)
    # 20 examples, 8 per batch: batch 2 straddles epochs 0 and 1, batch 7 starts epoch 3.
    resumed = _take(datasets.get_dataset(config, start_step=2, process_index=0, process_count=1),
                    6)
    config.seed = 7
    other = _take(datasets.get_dataset(config, process_index=0, process_count=1), 3)
  _same(resumed, full[2:])
  labels = np.concatenate([b['label'] for b in full])
  for e in range(3):  # every epoch is a permutation of the split, each in its own order
    assert sorted(labels[20 * e:20 * (e + 1)]) == list(range(20))
  assert not np.array_equal(labels[:20], labels[20:40])
  assert not np.array_equal(np.concatenate([b['label'] for b in other]), labels[:24])


def test_tfds_process_shards(tfds):
  mock, images = _split_honoring_mock(tfds, 21)
  config = _config('CIFAR10', channels=3, image_size=32, batch=4, eval_batch=8)
  with mock():
    train = [_take(datasets.get_dataset(config, process_index=p, process_count=2), 5)
             for p in range(2)]
    evals = [list(datasets.get_dataset(config, split='test', evaluation=True, process_index=p,
                                       process_count=2)) for p in range(2)]
  # Training: 2 examples per step per process; the first 5 steps read 10 of each shard (11 / 10).
  seen = [set(np.concatenate([b['label'] for b in t]).tolist()) for t in train]
  assert len(seen[0]) == 10 and len(seen[1]) == 10 and not seen[0] & seen[1]
  assert seen[0] <= set(range(11)) and seen[1] <= set(range(11, 21))
  # Evaluation: both processes yield ceil(11 / 4) = 3 batches; together every example once.
  assert len(evals[0]) == len(evals[1]) == 3
  labels = np.concatenate([b['label'][b['mask'] == 1] for e in evals for b in e])
  assert sorted(labels.tolist()) == list(range(21))
  x = np.concatenate([b['image'][b['mask'] == 1] for e in evals for b in e])
  np.testing.assert_allclose(x, images[labels] / 255., atol=1e-6)  # in order, no flip
  # Evaluation dequantization noise belongs to the example, whatever the process count.
  config.data.uniform_dequantization = True
  with mock():
    deq = {pc: [b for p in range(pc) for b in datasets.get_dataset(
        config, split='test', evaluation=True, dequant_seed=3, process_index=p, process_count=pc)]
        for pc in (1, 2)}
  by_label = [{int(l): x for b in deq[pc] for l, x, m in zip(b['label'], b['image'], b['mask'])
               if m} for pc in (1, 2)]
  assert sorted(by_label[0]) == sorted(by_label[1]) == list(range(21))
  for i in range(21):
    np.testing.assert_array_equal(by_label[0][i], by_label[1][i])
    assert not np.allclose(by_label[0][i] * 255, images[i])


def _write_tfrecord(path, images_chw):
  import tensorflow as tf
  with tf.io.TFRecordWriter(str(path)) as writer:
    for im in images_chw:
      feature = {'shape': tf.train.Feature(int64_list=tf.train.Int64List(value=im.shape)),
                 'data': tf.train.Feature(bytes_list=tf.train.BytesList(value=[im.tobytes()]))}
      writer.write(tf.train.Example(features=tf.train.Features(feature=feature))
                   .SerializeToString())


def test_tfrecord_reader(tfds, tmp_path):
  del tfds  # only for the TensorFlow import order
  images = np.random.default_rng(1).integers(0, 256, (7, 3, 8, 8), dtype=np.uint8)  # CHW
  path = tmp_path / 'ffhq-r03.tfrecords'
  _write_tfrecord(path, images)
  config = _config('FFHQ', image_size=8, channels=3, batch=4, eval_batch=4, flip=True,
                   tfrecords_path=str(path))
  evals = list(datasets.get_dataset(config, split='test', evaluation=True, process_index=0,
                                    process_count=1))
  x = np.concatenate([b['image'] for b in evals])
  mask = np.concatenate([b['mask'] for b in evals])
  assert mask.tolist() == [1.] * 7 + [0.]
  np.testing.assert_allclose(x[:7], images.transpose(0, 2, 3, 1) / 255., atol=1e-6)
  full = _take(datasets.get_dataset(config, process_index=0, process_count=1), 5)
  _same(_take(datasets.get_dataset(config, start_step=3, process_index=0, process_count=1), 2),
        full[3:])
  # Two processes read disjoint strided shards (records 0, 2, 4, 6 and 1, 3, 5).
  shards = [np.concatenate([b['image'][b['mask'] == 1] for b in datasets.get_dataset(
      config, split='test', evaluation=True, process_index=p, process_count=2)]) for p in range(2)]
  hwc = images.transpose(0, 2, 3, 1) / 255.
  np.testing.assert_allclose(shards[0], hwc[0::2], atol=1e-6)
  np.testing.assert_allclose(shards[1], hwc[1::2], atol=1e-6)
  info = datasets.dataset_info(config)
  assert info.splits == {'train': 7, 'test': 7} and info.num_classes == 0
  config.data.image_size = 4  # a smaller resolution than stored: resized, on the 8-bit grid
  small = next(datasets.get_dataset(config, process_index=0, process_count=1))['image']
  assert small.shape == (4, 4, 4, 3)
  np.testing.assert_allclose(small * 255, np.round(small * 255), atol=2e-4)
