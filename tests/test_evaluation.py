"""Tests of evaluation.py / inception.py: metric math against exact answers, the FID Inception
network with random weights (shapes, weight files), the digits classifier and its metrics."""
import os

import numpy as np
import pytest
from scipy import linalg

import evaluation
import inception
from configs.default_cifar10_configs import get_default_configs


def _spd(rng, d, rank=None):
  a = rng.standard_normal((d, rank or d))
  return a @ a.T / d + (0. if rank else 0.1 * np.eye(d))


# ------------------------------------------------------------------------------------------------
# FID


def test_fid_diagonal_closed_form():
  rng = np.random.default_rng(0)
  d = 16
  m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
  s1, s2 = rng.uniform(0.1, 3., d), rng.uniform(0.1, 3., d)
  want = np.sum((m1 - m2) ** 2) + np.sum(s1 + s2 - 2. * np.sqrt(s1 * s2))
  got = evaluation.frechet_distance(m1, np.diag(s1), m2, np.diag(s2))
  assert got == pytest.approx(want, rel=1e-10)


def test_fid_general_matches_scipy_sqrtm():
  rng = np.random.default_rng(1)
  d = 24
  m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
  a, b = _spd(rng, d), _spd(rng, d)
  assert not np.allclose(a @ b, b @ a)  # a non-commuting pair
  tr_covmean = np.trace(linalg.sqrtm(a @ b)).real
  want = np.sum((m1 - m2) ** 2) + np.trace(a) + np.trace(b) - 2. * tr_covmean
  assert evaluation.frechet_distance(m1, a, m2, b) == pytest.approx(want, rel=1e-9)
  assert evaluation.frechet_distance(m2, b, m1, a) == pytest.approx(want, rel=1e-9)  # symmetric


def test_fid_identical_stats_is_zero():
  for seed in (2, 9):  # seed 9: the unclamped round-off is -8.5e-14
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((300, 40)) ** 2  # skewed, correlated-by-chance features
    mu, sigma = evaluation.feature_stats(feats)
    fid = evaluation.frechet_distance(mu, sigma, mu, sigma)
    assert 0. <= fid < 1e-9 * np.trace(sigma)


def test_fid_singular_covariances():
  rng = np.random.default_rng(3)
  d = 30
  # Rank-1 S1 = u u^T: tr((S1 S2)^(1/2)) = sqrt(u^T S2 u) exactly, whatever S2 is.
  u = rng.standard_normal(d)
  s2 = _spd(rng, d, rank=5)  # singular too
  m1, m2 = rng.standard_normal(d), rng.standard_normal(d)
  want = np.sum((m1 - m2) ** 2) + u @ u + np.trace(s2) - 2. * np.sqrt(u @ s2 @ u)
  got = evaluation.frechet_distance(m1, np.outer(u, u), m2, s2)
  assert got == pytest.approx(want, rel=1e-9)
  # Diagonal with zero variances (commuting, singular).
  a = rng.uniform(0., 2., d) * (rng.random(d) < 0.5)
  b = rng.uniform(0., 2., d) * (rng.random(d) < 0.5)
  want = np.sum(a + b - 2. * np.sqrt(a * b))
  assert evaluation.frechet_distance(m1, np.diag(a), m1, np.diag(b)) == pytest.approx(want, rel=1e-9)
  # Fewer samples than dimensions: rank-deficient covariance against itself.
  mu, sigma = evaluation.feature_stats(rng.standard_normal((10, 50)))
  assert abs(evaluation.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


# ------------------------------------------------------------------------------------------------
# KID and IS


def _brute_force_mmd2(x, y):
  d = x.shape[1]
  k = lambda a, b: (sum(a[i] * b[i] for i in range(d)) / d + 1.) ** 3
  m, n = len(x), len(y)
  xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
  return xx + yy - 2. * xy


def test_kid_matches_brute_force_unbiased_estimator():
  rng = np.random.default_rng(4)
  x, y = rng.standard_normal((7, 5)), rng.standard_normal((9, 5)) + 0.5
  assert evaluation.polynomial_mmd2(x, y) == pytest.approx(_brute_force_mmd2(x, y), rel=1e-10)
  # Subsets as large as both sets are permutations of them; MMD^2 ignores order.
  x, y = x[:6], y[:6]
  kid = evaluation.kernel_inception_distance(x, y, subset_size=100, num_subsets=3, seed=1)
  assert kid == pytest.approx(_brute_force_mmd2(x, y), rel=1e-10)


def test_kid_subsets_average_and_discriminate():
  rng = np.random.default_rng(5)
  a, b = rng.standard_normal((400, 8)), rng.standard_normal((400, 8))
  c = rng.standard_normal((400, 8)) + 1.
  same = evaluation.kernel_inception_distance(a, b, subset_size=100, num_subsets=20)
  diff = evaluation.kernel_inception_distance(a, c, subset_size=100, num_subsets=20)
  assert abs(same) < 0.02 < diff


def test_inception_score_limits():
  logits = np.tile(np.random.default_rng(6).standard_normal(11), (50, 1))
  assert evaluation.inception_score(logits, splits=5) == pytest.approx(1., abs=1e-12)
  k = 7
  confident = 60. * np.eye(k)[np.tile(np.arange(k), 10 * 3)]  # each split: every class 3 times
  assert evaluation.inception_score(confident, splits=10) == pytest.approx(k, rel=1e-9)
  # Two classes, p(y|x) = (.8, .2) or (.2, .8) half the time each: p(y) = (.5, .5).
  logits = np.log(np.array([[.8, .2], [.2, .8]] * 5))
  want = np.exp(.8 * np.log(1.6) + .2 * np.log(.4))
  assert evaluation.inception_score(logits, splits=1) == pytest.approx(want, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# FID Inception-v3 (random weights: the real ones are not available here)


@pytest.fixture(scope='module')
def random_inception():
  return inception.random_variables(0)


def test_inception_parameter_count(random_inception):
  flat = inception.flatten(random_inception)
  n_params = sum(v.size for k, v in flat.items() if k.startswith('params/'))
  # torchvision documents inception_v3 with 27,161,264 parameters; the FID variant drops the aux
  # classifier (conv0 768*128 + BN 2*128, conv1 128*768*25 + BN 2*768, fc 768*1000 + 1000 =
  # 3,326,696) and has 1008 classes instead of 1000 (+8 * 2049).
  assert n_params == 27_161_264 - 3_326_696 + 8 * 2049
  assert flat['params/fc/kernel'].shape == (2048, 1008)


def test_inception_output_shapes(random_inception):
  fn = evaluation.inception_features_fn(random_inception, size=inception.MIN_INPUT_SIZE)
  images = np.random.default_rng(7).random((2, 32, 32, 3), np.float32)
  out = fn(images)
  assert out['pool'].shape == (2, 2048) and out['logits'].shape == (2, 1008)
  assert np.all(np.isfinite(out['pool'])) and np.min(out['pool']) >= 0.  # post-ReLU average
  grey = fn(images[..., :1])  # grey images are copied into R, G and B
  np.testing.assert_allclose(grey['pool'], fn(np.repeat(images[..., :1], 3, -1))['pool'],
                             rtol=1e-6)
  with pytest.raises(ValueError, match='below the minimum'):
    evaluation.inception_features_fn(random_inception, size=64)


def test_avg_pool_ignores_padding():
  x = np.random.default_rng(8).random((1, 4, 5, 2)).astype(np.float32)
  want = np.zeros_like(x)
  for i in range(4):
    for j in range(5):
      want[0, i, j] = x[0, max(i - 1, 0):i + 2, max(j - 1, 0):j + 2].mean(axis=(0, 1))
  np.testing.assert_allclose(inception.avg_pool_3x3_same(x), want, rtol=1e-6)


def test_preprocess_matches_reference_bilinear():
  # torch's bilinear (align_corners=False) upsampling by 2 in 1-D: output i samples the input at
  # (i + .5) / 2 - .5, clamped to the edges. Check along rows of a row-constant-free image.
  x = np.random.default_rng(9).random((1, 6, 6, 3)).astype(np.float32)
  got = np.asarray(inception.preprocess(x, 12) + 1.) / 2.
  pos = np.clip((np.arange(12) + .5) / 2. - .5, 0., 5.)
  lo, frac = np.floor(pos).astype(int), pos - np.floor(pos)
  hi = np.minimum(lo + 1, 5)
  rows = x[0, lo] * (1 - frac)[:, None, None] + x[0, hi] * frac[:, None, None]
  want = rows[:, lo] * (1 - frac)[None, :, None] + rows[:, hi] * frac[None, :, None]
  np.testing.assert_allclose(got[0], want, atol=1e-6)


def test_weights_file_round_trip_and_checks(random_inception, tmp_path):
  path = str(tmp_path / 'w.npz')
  digest = inception.save_variables(path, random_inception, source_sha256='f' * 64)
  variables, meta = inception.load_fid_inception(path, expected_source_sha256='f' * 64)
  assert meta['arrays_sha256'] == digest and meta['source_sha256'] == 'f' * 64
  a, b = inception.flatten(random_inception), inception.flatten(variables)
  assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  # Not converted from the published file: refused by default.
  with pytest.raises(ValueError, match=inception.FID_WEIGHTS_SHA256):
    inception.load_fid_inception(path)


def test_weights_file_corruption_is_detected(tmp_path):
  tree = {'params': {'a': {'kernel': np.arange(6.).reshape(2, 3)}, 'b': np.ones(3, np.float32)}}
  path = str(tmp_path / 't.npz')
  inception.save_variables(path, tree, source_sha256='s')
  meta = {k: v for k, v in np.load(path).items() if k.startswith('__')}
  tampered = str(tmp_path / 'tampered.npz')
  np.savez(tampered, **{'params/a/kernel': np.arange(6.).reshape(2, 3) + 1e-9,
                        'params/b': np.ones(3, np.float32)}, **meta)
  with pytest.raises(ValueError, match='corrupted'):
    inception.load_variables(tampered)
  truncated = str(tmp_path / 'truncated.npz')
  with open(path, 'rb') as f, open(truncated, 'wb') as g:
    g.write(f.read()[:-40])
  with pytest.raises(ValueError, match='not a readable'):
    inception.load_variables(truncated)
  with pytest.raises(ValueError, match='converted from a file with sha256 s'):
    inception.load_variables(path, expected_source_sha256='t')


def test_missing_weights_error_names_knob_path_and_fix(tmp_path):
  config = get_default_configs()
  config.eval.inception_weights = str(tmp_path / 'nowhere.npz')
  with pytest.raises(FileNotFoundError) as e:
    evaluation.get_feature_extractor(config)
  msg = str(e.value)
  for part in ('config.eval.inception_weights', str(tmp_path / 'nowhere.npz'),
               inception.FID_WEIGHTS_FILE, 'convert_inception_weights.py', inception.FID_WEIGHTS_URL):
    assert part in msg
  config.eval.inception_weights = ''
  with pytest.raises(FileNotFoundError, match='config.eval.inception_weights'):
    evaluation.get_feature_extractor(config)


def test_extractor_choice_errors():
  config = get_default_configs()
  config.data.dataset = 'ring2d'
  with pytest.raises(ValueError, match='vectors'):
    evaluation.get_feature_extractor(config)
  config.data.dataset = 'CIFAR10'
  config.eval.feature_extractor = 'vgg'
  with pytest.raises(ValueError, match="'auto', 'inception', 'digits'"):
    evaluation.get_feature_extractor(config)


def test_state_dict_conversion():
  shapes = inception._flat_shapes(inception.variable_shapes())
  rng = np.random.default_rng(10)
  state = {'Mixed_5b.branch1x1.bn.num_batches_tracked': np.array(3)}
  for path, spec in shapes.items():  # torch layout: [O, I, H, W] convs, [out, in] linear
    s = tuple(spec.shape)
    *mods, layer, leaf = path.split('/')[1:]
    name = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
            'var': 'running_var'}[leaf]
    torch_shape = (s[3], s[2], s[0], s[1]) if len(s) == 4 else s[::-1]
    state['.'.join(mods + [layer, name])] = rng.standard_normal(torch_shape).astype(np.float32)
  # Spot checks of torchvision's layout (shapes from its Inception3 definition).
  assert state['Conv2d_1a_3x3.conv.weight'].shape == (32, 3, 3, 3)
  assert state['Mixed_5b.branch_pool.conv.weight'].shape == (32, 192, 1, 1)
  assert state['Mixed_6b.branch7x7_2.conv.weight'].shape == (128, 128, 1, 7)
  assert state['Mixed_7a.branch3x3_2.conv.weight'].shape == (320, 192, 3, 3)
  assert state['Mixed_7c.branch3x3dbl_3b.conv.weight'].shape == (384, 384, 3, 1)
  assert state['fc.weight'].shape == (1008, 2048)
  flat = inception.flatten(inception.variables_from_state_dict(state))
  w = state['Mixed_6b.branch7x7_2.conv.weight']
  k = flat['params/Mixed_6b/branch7x7_2/conv/kernel']
  assert k.shape == (1, 7, 128, 128) and k[0, 5, 3, 2] == w[2, 3, 0, 5]
  assert np.array_equal(flat['params/fc/kernel'], state['fc.weight'].T)
  assert np.array_equal(flat['batch_stats/Mixed_7c/branch_pool/bn/var'],
                        state['Mixed_7c.branch_pool.bn.running_var'])
  with pytest.raises(ValueError, match='lacks'):
    inception.variables_from_state_dict({k: v for k, v in state.items() if k != 'fc.bias'})
  with pytest.raises(ValueError, match='entries this network lacks'):
    inception.variables_from_state_dict(dict(state, **{'extra.weight': np.zeros(1)}))


# ------------------------------------------------------------------------------------------------
# Digits classifier and digits metrics


def _digits_config(size=8, channels=1):
  config = get_default_configs()
  config.data.dataset, config.data.image_size, config.data.num_channels = 'digits', size, channels
  return config


def test_digits_classifier_and_metrics(tmp_path):
  import datasets
  workdir = str(tmp_path)
  cache = os.path.join(workdir, 'stats', 'digits_classifier.npz')
  variables, info = evaluation.train_digits_classifier(cache_path=cache)
  train_u8, _ = datasets.load_digits_split('train')
  test_u8, test_y = datasets.load_digits_split('test')
  print(f"digits classifier test accuracy {info['test_accuracy']:.4f}")
  assert info['test_accuracy'] >= 0.95 and not info['cached']
  assert evaluation.digits_accuracy(variables, test_u8 / 255., test_y) == info['test_accuracy']
  again, info2 = evaluation.train_digits_classifier(cache_path=cache)  # reused, not retrained
  assert info2['cached'] and info2['arrays_sha256'] == info['arrays_sha256']

  config = _digits_config()
  name, fn = evaluation.get_feature_extractor(config, workdir)
  assert name == f"digits_cnn_{info['arrays_sha256'][:12]}"
  batches = lambda: (train_u8[i:i + 500] / 255. for i in range(0, len(train_u8), 500))
  stats = evaluation.get_data_stats(config, workdir, (name, fn), batches)
  assert int(stats['n']) == len(train_u8) and stats['pool'].shape == (len(train_u8), 64)

  def fail():
    raise AssertionError('cached statistics must not read the data')
  cached = evaluation.get_data_stats(config, workdir, (name, fn), fail)
  assert np.array_equal(cached['sigma'], stats['sigma'])

  kw = dict(kid_subset_size=100, kid_num_subsets=20)
  held_out = evaluation.compute_metrics(evaluation.extract_features(fn, [test_u8 / 255.]), stats,
                                        **kw)
  noise = np.random.default_rng(11).random((300, 8, 8, 1)).astype(np.float32)
  bad = evaluation.compute_metrics(evaluation.extract_features(fn, [noise]), stats, **kw)
  print(f'digits metrics: held-out {held_out}, uniform noise {bad}')
  assert held_out['fid'] < bad['fid'] / 20. and abs(held_out['kid']) < bad['kid'] / 20.
  assert held_out['is'] > 8. and bad['is'] < held_out['is']

  # A digits config at 16 px with 3 channels maps its images back onto the same 8x8 inputs.
  big = np.repeat(np.repeat(np.repeat(test_u8[:16] / 255., 2, 1), 2, 2), 3, 3)
  np.testing.assert_allclose(fn(big)['pool'], fn(test_u8[:16] / 255.)['pool'], rtol=1e-5,
                             atol=1e-6)
  # Masked rows (padding of a last eval batch) are dropped.
  feats = evaluation.extract_features(fn, [{'image': test_u8[:8] / 255.,
                                            'mask': np.array([1.] * 5 + [0.] * 3)}])
  assert feats['pool'].shape == (5, 64)
  # Statistics of another extractor live in another file.
  other = evaluation.get_data_stats(config, workdir, ('other', fn), batches, max_examples=100)
  assert int(other['n']) == 100
  assert len(os.listdir(os.path.join(workdir, 'stats'))) == 3
