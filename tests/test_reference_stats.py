"""Reference statistics (FID / KID): computed once on clean 8-bit data, reused, keyed by the data's
path and files (a changed file or another folder recomputes), and `main.py --mode stats`."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import datasets
import evaluation
from configs.default_cifar10_configs import get_default_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(stats_dir, **data):
  config = get_default_configs()
  config.data.update(dict(dict(dataset='digits', image_size=8, num_channels=1,
                               uniform_dequantization=True), **data))
  config.eval.update(batch_size=500, feature_extractor='digits', stats_dir=str(stats_dir))
  return config


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """A stats dir with the trained digits classifier, and the digits training split as a folder of
  8x8 grey PNGs in class folders."""
  base = tmp_path_factory.mktemp('stats')
  stats_dir = base / 'stats'
  extractor = evaluation.get_feature_extractor(_config(stats_dir), str(base))
  folder = base / 'digits_png'
  images, labels = datasets.load_digits_split('train')
  for i, (x, y) in enumerate(zip(images, labels)):
    os.makedirs(folder / str(y), exist_ok=True)
    Image.fromarray(x[..., 0]).save(folder / str(y) / f'{i:04d}.png')
  return base, stats_dir, extractor, folder


def _no_data(*args, **kwargs):
  raise AssertionError('cached statistics must not read the data')


def test_statistics_of_clean_data_cached_and_reused(setup, monkeypatch):
  base, stats_dir, extractor, _ = setup
  config = _config(stats_dir)  # dequantized for training; the reference is the 8-bit data
  path, stats = evaluation.reference_stats(config, None, extractor, progress=False)
  assert os.path.dirname(path) == str(stats_dir) and os.path.isfile(path)
  images, _ = datasets.load_digits_split('train')
  direct = evaluation.extract_features(extractor[1], [images / 255.])
  np.testing.assert_allclose(stats['mu'], direct['pool'].mean(0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(stats['sigma'], np.cov(direct['pool'], rowvar=False), rtol=1e-5,
                             atol=1e-6)
  assert int(stats['n']) == len(images)
  monkeypatch.setattr(datasets, 'get_dataset', _no_data)
  again_path, again = evaluation.reference_stats(config, None, extractor, progress=False)
  assert again_path == path and np.array_equal(again['sigma'], stats['sigma'])


def test_folder_statistics_keyed_by_path_and_files(setup, monkeypatch):
  base, stats_dir, extractor, folder = setup
  config = _config(stats_dir, dataset='folder', path=str(folder))
  # main.py --mode stats writes the file that evaluation then reads.
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--config',
         os.path.join(ROOT, 'configs/digits/vp_ddpmpp_continuous.py'), '--workdir',
         str(base / 'run'), '--mode=stats', '--config.data.dataset=folder',
         f'--config.data.path={folder}', '--config.eval.feature_extractor=digits',
         f'--config.eval.stats_dir={stats_dir}', '--config.eval.batch_size=500']
  out = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'),
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  path = evaluation.stats_path(config, None, extractor[0])
  assert f'stats: 1497 images of folder -> {path}' in out.stdout
  with monkeypatch.context() as m:  # reused: no image is read again
    m.setattr(datasets, 'get_dataset', _no_data)
    _, folder_stats = evaluation.reference_stats(config, None, extractor, progress=False)
  # The same images as the embedded digits (another order): the same statistics.
  _, digits_stats = evaluation.reference_stats(_config(stats_dir), None, extractor,
                                               progress=False)
  np.testing.assert_allclose(folder_stats['mu'], digits_stats['mu'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(folder_stats['sigma'], digits_stats['sigma'], rtol=1e-4, atol=1e-6)
  # A copy of the folder elsewhere has its own statistics file.
  copy = base / 'copy'
  os.makedirs(copy / '0')
  for name in sorted(os.listdir(folder / '0'))[:2]:
    Image.open(folder / '0' / name).save(copy / '0' / name)
  copy_path, copy_stats = evaluation.reference_stats(
      _config(stats_dir, dataset='folder', path=str(copy)), None, extractor, progress=False)
  assert copy_path != path and int(copy_stats['n']) == 2 and os.path.isfile(path)
  # A changed file invalidates the statistics: recomputed, same file name.
  changed = folder / '3' / sorted(os.listdir(folder / '3'))[0]
  x = np.asarray(Image.open(changed)).copy()
  x[2:6, 2:6] = 255 - x[2:6, 2:6]
  Image.fromarray(x).save(changed)
  new_path, new_stats = evaluation.reference_stats(config, None, extractor, progress=False)
  assert new_path == path and int(new_stats['n']) == 1497
  assert not np.allclose(new_stats['mu'], folder_stats['mu'], rtol=1e-7, atol=0)
