"""The 'folder' data set: a tree of PNG / JPEG files that the tests write (odd sizes, grey and RGB,
class folders): shapes, ranges, crops, labels, resume, per-process shards, bad files, fingerprint."""
import itertools
import os

import numpy as np
import pytest
from PIL import Image

import datasets
import image_folder
from configs.default_cifar10_configs import get_default_configs

# (class folder, file name, height, width); sizes odd on purpose. Every image's short side is >= 8.
RGB_TREE = [('cat', 'a.png', 8, 11), ('cat', 'b.png', 13, 9), ('cat', 'c.jpg', 10, 10),
            ('dog', 'd.png', 12, 12), ('dog', 'e.JPEG', 9, 15), ('dog/deeper', 'f.png', 17, 8),
            ('emu', 'g.png', 8, 8)]


def _write(root, tree, channels=3, seed=0):
  """Writes the tree (uint8 noise images) and returns {relative path: array as written}."""
  rng = np.random.default_rng(seed)
  images = {}
  for folder, name, h, w in tree:
    os.makedirs(os.path.join(root, folder), exist_ok=True)
    shape = (h, w, channels) if channels == 3 else (h, w)
    x = rng.integers(0, 256, shape, dtype=np.uint8)
    rel = f'{folder}/{name}' if folder else name
    Image.fromarray(x).save(os.path.join(root, rel), quality=95)  # quality: JPEG only
    images[rel] = x.reshape(h, w, channels)
  return images


def _decoded(root, rel, channels):
  """The file as a decoder reads it (JPEG is lossy): uint8 [H, W, C]."""
  x = np.asarray(Image.open(os.path.join(root, rel)))
  return x.reshape(x.shape[0], x.shape[1], channels)


def _config(path, *, size=8, channels=3, batch=4, eval_batch=4, flip=False, dequant=False,
            seed=3, **data):
  config = get_default_configs()
  config.data.update(dataset='folder', path=str(path), image_size=size, num_channels=channels,
                     random_flip=flip, uniform_dequantization=dequant, **data)
  config.training.batch_size = batch
  config.eval.batch_size = eval_batch
  config.seed = seed
  return config


def _eval_pass(config, pi=0, pc=1, **kw):
  return list(datasets.get_dataset(config, split='test', evaluation=True, process_index=pi,
                                   process_count=pc, **kw))


def _take(it, n):
  return list(itertools.islice(it, n))


def _central(x, crop=None):
  h, w = x.shape[:2]
  s = crop or min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  return x[top:top + s, left:left + s]


@pytest.fixture(scope='module')
def rgb_tree(tmp_path_factory):
  root = tmp_path_factory.mktemp('rgb')
  images = _write(root, RGB_TREE)
  (root / 'notes.txt').write_text('not an image')  # skipped: other extension
  (root / 'cat' / '.hidden.png').write_bytes(b'resource fork')  # skipped: hidden
  return root, images


def test_listing_labels_and_info(rgb_tree):
  root, _ = rgb_tree
  listing = image_folder.list_images(str(root))
  assert listing.files == ('cat/a.png', 'cat/b.png', 'cat/c.jpg', 'dog/d.png', 'dog/deeper/f.png',
                           'dog/e.JPEG', 'emu/g.png')
  assert listing.classes == ('cat', 'dog', 'emu')
  assert listing.labels == (0, 0, 0, 1, 1, 1, 2)
  info = datasets.dataset_info(_config(root))
  assert info.splits == {'train': 7, 'test': 7} and info.num_classes == 3
  assert info.shape == (8, 8, 3) and info.is_image
  flat = image_folder.list_images(str(root), class_folders=False)
  assert flat.files == listing.files and set(flat.labels) == {-1} and flat.classes == ()


def test_eval_pass_crops_resizes_and_labels(rgb_tree):
  root, images = rgb_tree
  listing = image_folder.list_images(str(root))
  batches = _eval_pass(_config(root))
  assert len(batches) == 2 and [b['mask'].tolist() for b in batches] == [[1.] * 4, [1.] * 3 + [0.]]
  x = np.concatenate([b['image'] for b in batches])[:7]
  labels = np.concatenate([b['label'] for b in batches])[:7]
  assert x.dtype == np.float32 and x.shape == (7, 8, 8, 3) and labels.dtype == np.int32
  assert labels.tolist() == list(listing.labels)  # listing order, no shuffle
  assert x.min() >= 0. and x.max() <= 1.
  np.testing.assert_allclose(x * 255, np.round(x * 255), atol=2e-4)  # on the 8-bit grid
  for i, rel in enumerate(listing.files):
    h, w = images[rel].shape[:2]
    if min(h, w) == 8:  # short side 8: the central square is the image, no resize
      np.testing.assert_array_equal(np.round(x[i] * 255), _central(images[rel]))
    else:  # resized with antialiasing: close to PIL's antialiased bilinear reduction
      ref = Image.fromarray(_central(_decoded(root, rel, 3))).resize((8, 8), Image.BILINEAR)
      assert np.abs(np.round(x[i] * 255) - np.asarray(ref, float)).mean() < 6.
  padding = batches[-1]['image'][-1]
  assert np.all(padding == 0) and batches[-1]['label'][-1] == 0


def test_center_crop_knob(tmp_path):
  images = _write(tmp_path, [('', 'big.png', 20, 14)])
  config = _config(tmp_path, center_crop=8)
  (batch,) = _eval_pass(config)
  np.testing.assert_array_equal(np.round(batch['image'][0] * 255),
                                _central(images['big.png'], 8))
  assert batch['label'][0] == -1  # no class folders: unlabelled
  config = _config(tmp_path, size=4, center_crop=12)  # central 12 x 12, then down to 4 x 4
  (batch,) = _eval_pass(config)
  ref = Image.fromarray(_central(images['big.png'], 12)).resize((4, 4), Image.BILINEAR)
  assert np.abs(np.round(batch['image'][0] * 255) - np.asarray(ref, float)).mean() < 6.
  config = _config(tmp_path, center_crop=16)  # larger than the short side (14)
  with pytest.raises(ValueError, match=r'big.png: 20x14 pixels, smaller than .*center_crop=16'):
    _eval_pass(config)


def test_grey_tree(tmp_path):
  images = _write(tmp_path, [('0', 'a.png', 8, 9), ('1', 'b.jpg', 11, 8), ('1', 'c.png', 8, 8)],
                  channels=1)
  config = _config(tmp_path, channels=1, batch=2)
  batch = next(datasets.get_dataset(config, process_index=0, process_count=1))
  assert batch['image'].shape == (2, 8, 8, 1)
  (ev,) = _eval_pass(config)
  np.testing.assert_array_equal(np.round(ev['image'][2] * 255), images['1/c.png'])
  assert ev['label'][:3].tolist() == [0, 1, 1]


def _rows(batches, quantize=np.round, scale=255.):
  """Each image of the batches as bytes of its 8-bit values."""
  return [bytes(quantize(v * scale).astype(np.uint8)) for b in batches for v in b['image']]


def test_training_epochs_flip_dequantization_and_resume(rgb_tree):
  root, _ = rgb_tree
  images = set(_rows(_eval_pass(_config(root, eval_batch=7))))
  assert len(images) == 7
  stream = _take(datasets.get_dataset(_config(root, batch=3), process_index=0, process_count=1),
                 7)
  rows = _rows(stream)  # 21 = 3 epochs of 7 images, batched across epoch boundaries
  epochs = [rows[7 * e:7 * (e + 1)] for e in range(3)]
  assert all(set(e) == images for e in epochs)  # every epoch is a permutation of the folder
  assert epochs[0] != epochs[1] or epochs[1] != epochs[2]  # in its own order
  other_seed = _rows(_take(datasets.get_dataset(_config(root, batch=7, seed=4), process_index=0,
                                                process_count=1), 1))
  assert other_seed != epochs[0]
  # Flip + dequantization, and resume in the middle of an epoch: exactly the same batches.
  config = _config(root, batch=3, flip=True, dequant=True)
  full = _take(datasets.get_dataset(config, process_index=0, process_count=1), 6)
  resumed = _take(datasets.get_dataset(config, start_step=2, process_index=0, process_count=1), 4)
  for a, b in zip(resumed, full[2:]):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  u = np.concatenate([b['image'] for b in full]) * 256.
  frac = u - np.floor(u)  # (x_uint8 + U[0, 1)) / 256
  assert abs(frac.mean() - 0.5) < 0.05 and abs(frac.var() - 1 / 12) < 0.01
  n_mirror = 0
  for v in np.concatenate([b['image'] for b in full]):
    q = np.floor(v * 256.).astype(np.uint8)
    same, mirror = bytes(q) in images, bytes(q[:, ::-1].copy()) in images
    assert same or mirror
    n_mirror += mirror and not same
  assert n_mirror >= 2


def test_process_shards(rgb_tree):
  root, _ = rgb_tree
  config = _config(root, batch=2, eval_batch=4, dequant=True)
  listing = image_folder.list_images(str(root))
  # Training: process p reads files p, p + 2, ...: disjoint shards covering the folder.
  seen = []
  for p in range(2):
    batches = _take(datasets.get_dataset(config, process_index=p, process_count=2), 4)
    seen.append(set(_rows(batches, np.floor, 256.)))
    assert batches[0]['image'].shape == (1, 8, 8, 3)
  assert len(seen[0]) == 4 and len(seen[1]) == 3 and not seen[0] & seen[1]
  # Evaluation: same batch count on both processes, every image once, the same dequantization
  # noise per image whatever the process count.
  evals = [_eval_pass(config, p, 2, dequant_seed=5) for p in range(2)]
  assert len(evals[0]) == len(evals[1]) == 2  # ceil(4 / 2)
  whole = _eval_pass(config, dequant_seed=5)
  x_whole = np.concatenate([b['image'] for b in whole])[:7]
  for p in range(2):
    x = np.concatenate([b['image'][b['mask'] == 1] for b in evals[p]])
    np.testing.assert_array_equal(x, x_whole[p::2])
  assert sum(b['mask'].sum() for e in evals for b in e) == len(listing.files)


def test_bad_folders(tmp_path):
  with pytest.raises(FileNotFoundError, match='nope'):
    datasets.get_dataset(_config(tmp_path / 'nope'), process_index=0, process_count=1)
  empty = tmp_path / 'empty'
  (empty / 'sub').mkdir(parents=True)
  with pytest.raises(ValueError, match=r'No image .*empty'):
    datasets.get_dataset(_config(empty), process_index=0, process_count=1)
  (empty / 'sub' / 'readme.txt').write_text('x')
  with pytest.raises(ValueError, match=r'1 other files, e.g. .*readme.txt'):
    datasets.get_dataset(_config(empty), process_index=0, process_count=1)
  mixed = tmp_path / 'mixed'
  _write(mixed, [('', 'loose.png', 8, 8), ('cls', 'x.png', 8, 8)])
  with pytest.raises(ValueError, match=r'loose.png lies directly in .*class_folders=False'):
    datasets.get_dataset(_config(mixed), process_index=0, process_count=1)
  config = _config(mixed, class_folders=False)
  assert [b['label'].tolist() for b in _eval_pass(config)] == [[-1, -1, 0, 0]]


def test_unusable_images_are_named(tmp_path):
  _write(tmp_path, [('a', f'{i}.png', 9, 9) for i in range(5)])
  _write(tmp_path, [('a', 'grey.png', 9, 9)], channels=1, seed=1)
  (tmp_path / 'a' / 'text.jpg').write_text('this is not a JPEG')
  whole = (tmp_path / 'a' / '0.png').read_bytes()
  (tmp_path / 'a' / 'cut.png').write_bytes(whole[:len(whole) // 2])  # truncated
  config = _config(tmp_path)
  for make in (lambda: _eval_pass(config),
               lambda: _take(datasets.get_dataset(config, process_index=0, process_count=1), 3)):
    with pytest.raises(ValueError) as e:
      make()
    message = str(e.value)
    assert 'cut.png: not a readable PNG / JPEG image' in message
    assert 'text.jpg: not a readable PNG / JPEG image' in message
    assert 'grey.png: 1 channel(s), not config.data.num_channels=3' in message
    assert '0.png' not in message


def test_fingerprint_tracks_path_and_files(tmp_path):
  a, b = tmp_path / 'a', tmp_path / 'b'
  _write(a, RGB_TREE[:3])
  _write(b, RGB_TREE[:3])  # the same bytes in another folder
  fa, fb = (datasets.dataset_fingerprint(_config(p)) for p in (a, b))
  assert fa['source'] == str(a) and fa['files'] != fb['files']
  assert datasets.dataset_fingerprint(_config(a)) == fa  # stable
  assert datasets.dataset_fingerprint(_config(a, size=16))['shape'] == (16, 16, 3)
  _write(a, [('cat', 'a.png', 8, 11)], seed=9)  # rewrite one file
  assert datasets.dataset_fingerprint(_config(a))['files'] != fa['files']
  digits = get_default_configs()
  digits.data.update(dataset='digits', image_size=8, num_channels=1)
  assert datasets.dataset_fingerprint(digits)['files'] == ''
