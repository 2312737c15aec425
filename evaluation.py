"""Sample quality: feature extractors, FID / IS / KID, and cached data-set statistics.

The evaluation loop uses four names:

    name, features_fn = get_feature_extractor(config, workdir)
    path, data_stats = reference_stats(config, workdir, (name, features_fn))
    sample_feats = extract_features(features_fn, sample_batches)
    metrics = compute_metrics(sample_feats, data_stats)   # {'fid': ..., 'is': ..., 'kid': ...}

`reference_stats` (also `main.py --mode stats`) computes the statistics of the data set's training
split once and caches them in `stats_dir(config, workdir)` (config.eval.stats_dir, by default
<workdir>/stats); the cache key holds `datasets.dataset_fingerprint(config)` (data set, path,
shape, and a digest of the files of folder / TFRecord sets), the split and the extractor's exact
weights, so a changed file, another folder or another network recomputes them.

`features_fn(images)` maps NHWC images in [0, 1] (any batch size) to {'pool': [B, d],
'logits': [B, K]}: the FID Inception-v3 (d = 2048, K = 1008; `inception.py`) for real image data
sets, and for 'digits' a small CNN trained on the embedded digits (d = 64, K = 10;
`train_digits_classifier`). Images are clipped to [0, 1] and rounded to the 8-bit grid first, as
the original evaluated saved 8-bit samples.

The metrics are exact float64 numpy:
- FID = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), the Frechet distance of two
  Gaussians; tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2))), whose argument is
  symmetric PSD, so eigendecompositions give it without a non-symmetric sqrtm and stay exact for
  singular covariances (fewer samples than features).
- IS = exp(E_x KL(p(y|x) || p(y))) per split, mean over splits (10 by default).
- KID = unbiased MMD^2 with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets
  (100 subsets of 1000, Binkowski et al. 2018), reported as the mean.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import zipfile
from typing import Callable, Dict, Iterable, Mapping, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import special

import datasets
import inception
from models import digits_classifier

Array = jax.Array
FeaturesFn = Callable[[Array], Dict[str, Array]]
Extractor = Tuple[str, FeaturesFn]

EXTRACTORS = ('auto', 'inception', 'digits')
DIGITS_CLASSIFIER_SEED = 0  # fixed, not config.seed: the metric's network is the same for every run


# ------------------------------------------------------------------------------------------------
# Metrics


def feature_stats(pool: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """Mean [d] and unbiased covariance [d, d] of features [N, d], in float64."""
  pool = np.asarray(pool, np.float64)
  if pool.ndim != 2 or pool.shape[0] < 2:
    raise ValueError(f'Feature statistics need [N >= 2, d] features, got shape {pool.shape}.')
  return pool.mean(axis=0), np.cov(pool, rowvar=False)


def _clip_null(w: np.ndarray) -> np.ndarray:
  """Eigenvalues of a PSD matrix with round-off (|w| < d eps max|w|) set to 0.

  Why: a singular covariance has eigenvalues of size +-1e-16 * scale instead of 0, and their
  square roots (1e-8 each) would add up to a visible error across thousands of dimensions.
  """
  tol = np.max(np.abs(w), initial=0.) * len(w) * np.finfo(np.float64).eps
  return np.where(w > tol, w, 0.)


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
  """Square root of a symmetric PSD matrix (eigendecomposition; null space exactly 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2.)
  return (v * np.sqrt(_clip_null(w))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
  """Frechet (2-Wasserstein) distance^2 between N(mu1, sigma1) and N(mu2, sigma2); >= 0 (float
  round-off, e.g. -6e-14 for a set with itself, is clamped to 0)."""
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise ValueError(f'Mismatched statistics: means {mu1.shape}, {mu2.shape}, covariances '
                     f'{s1.shape}, {s2.shape}.')
  root1 = _psd_sqrt(s1)
  m = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh((m + m.T) / 2.)  # = eigenvalues of S1 S2, all >= 0 in exact math
  tr_covmean = np.sum(np.sqrt(_clip_null(eig)))
  diff = mu1 - mu2
  return max(0., float(diff @ diff + np.trace(s1) + np.trace(s2) - 2. * tr_covmean))


def inception_score(logits: np.ndarray, splits: int = 10) -> float:
  """Inception score of class logits [N, K]: mean over `splits` parts of exp(E KL(p(y|x) || p(y)))."""
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 2 or not 1 <= splits <= logits.shape[0]:
    raise ValueError(f'IS needs logits [N, K] with 1 <= splits={splits} <= N, got {logits.shape}.')
  log_p = logits - special.logsumexp(logits, axis=1, keepdims=True)
  p = np.exp(log_p)
  scores = []
  for part, log_part in zip(np.array_split(p, splits), np.array_split(log_p, splits)):
    p_y = part.mean(axis=0)
    kl = np.sum(part * log_part - special.xlogy(part, p_y), axis=1)  # 0 log 0 = 0
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


def polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
  """Unbiased MMD^2 of two samples [m, d], [n, d] under k(a, b) = (a.b / d + 1)^3."""
  d = x.shape[1]
  k_xx = (x @ x.T / d + 1.) ** 3
  k_yy = (y @ y.T / d + 1.) ** 3
  k_xy = (x @ y.T / d + 1.) ** 3
  m, n = len(x), len(y)
  return float((k_xx.sum() - np.trace(k_xx)) / (m * (m - 1))
               + (k_yy.sum() - np.trace(k_yy)) / (n * (n - 1)) - 2. * k_xy.mean())


def kernel_inception_distance(x: np.ndarray, y: np.ndarray, *, subset_size: int = 1000,
                              num_subsets: int = 100, seed: int = 0) -> float:
  """KID: the mean over `num_subsets` random subsets (without replacement) of the unbiased MMD^2.

  The subset size is capped by the smaller set (logged), so small evaluations still run.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
    raise ValueError(f'KID needs features [m, d] and [n, d], got {x.shape} and {y.shape}.')
  m = min(subset_size, len(x), len(y))
  if m < 2 or num_subsets < 1:
    raise ValueError(f'KID needs subsets of at least 2 (got {m}) and num_subsets >= 1 '
                     f'(got {num_subsets}).')
  if m < subset_size:
    logging.info('KID subset size %d capped to %d by the number of features.', subset_size, m)
  rng = np.random.default_rng(seed)
  return float(np.mean([polynomial_mmd2(x[rng.choice(len(x), m, replace=False)],
                                        y[rng.choice(len(y), m, replace=False)])
                        for _ in range(num_subsets)]))


def compute_metrics(sample_feats: Mapping[str, np.ndarray], data_stats: Mapping[str, np.ndarray],
                    *, is_splits: int = 10, kid_subset_size: int = 1000,
                    kid_num_subsets: int = 100, seed: int = 0) -> Dict[str, float]:
  """{'fid', 'is', 'kid'} of sample features {'pool', 'logits'} against `get_data_stats` output."""
  pool = np.asarray(sample_feats['pool'])
  mu, sigma = feature_stats(pool)
  splits = min(is_splits, len(pool))
  return {'fid': frechet_distance(mu, sigma, data_stats['mu'], data_stats['sigma']),
          'is': inception_score(sample_feats['logits'], splits),
          'kid': kernel_inception_distance(pool, data_stats['pool'], subset_size=kid_subset_size,
                                           num_subsets=kid_num_subsets, seed=seed)}


# ------------------------------------------------------------------------------------------------
# Feature extraction


def _features_fn(module: nn.Module, variables: Mapping, prepare: Callable[[Array], Array]
                 ) -> FeaturesFn:
  """Jitted features_fn(images in [0, 1]) of a network: clip, round to 8 bits, prepare, apply."""

  @jax.jit
  def apply(variables, images):
    x = jnp.round(jnp.clip(jnp.asarray(images, jnp.float32), 0., 1.) * 255.) / 255.
    return module.apply(variables, prepare(x))

  # Variables are an argument, not closed-over constants: large constants slow compilation.
  return lambda images: apply(variables, images)


def inception_features_fn(variables: Mapping, size: int = inception.INPUT_SIZE) -> FeaturesFn:
  """features_fn of the FID Inception-v3 with these variables (input resized to `size`)."""
  if size < inception.MIN_INPUT_SIZE:
    raise ValueError(f'Inception input size {size} is below the minimum '
                     f'{inception.MIN_INPUT_SIZE}.')
  return _features_fn(inception.FIDInceptionV3(), variables,
                      lambda x: inception.preprocess(x, size))


def digits_features_fn(variables: Mapping) -> FeaturesFn:
  """features_fn of the digits classifier (any digits-config image size / channel count)."""
  width = int(variables['params']['conv1']['dense']['kernel'].shape[-1])
  return _features_fn(digits_classifier.DigitsClassifier(width=width), variables,
                      digits_classifier.to_classifier_input)


def extract_features(features_fn: FeaturesFn, batches: Iterable,
                     max_examples: Optional[int] = None) -> Dict[str, np.ndarray]:
  """Concatenated {'pool', 'logits'} (numpy) over batches: arrays, or dicts with 'image' and an
  optional 'mask' (rows with mask 0 are padding and dropped), up to `max_examples` rows."""
  pools, logits, n = [], [], 0
  for batch in batches:
    images, mask = (batch['image'], batch.get('mask')) if isinstance(batch, Mapping) else (batch,
                                                                                          None)
    out = jax.device_get(features_fn(images))
    keep = slice(None) if mask is None else np.asarray(mask) > 0
    pools.append(np.asarray(out['pool'])[keep])
    logits.append(np.asarray(out['logits'])[keep])
    n += len(pools[-1])
    if max_examples is not None and n >= max_examples:
      break
  if not pools:
    raise ValueError('extract_features got no batches.')
  feats = {'pool': np.concatenate(pools), 'logits': np.concatenate(logits)}
  return {k: v[:max_examples] for k, v in feats.items()}


# ------------------------------------------------------------------------------------------------
# The digits classifier: trained once on the embedded training split, cached


# Everything that determines the trained network; bump 'version' when DigitsClassifier changes.
_DIGITS_RECIPE = dict(version=1, width=16, steps=800, batch_size=64, lr=5e-3, weight_decay=1e-3,
                      max_shift=1)


def _digits_data(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """The embedded digits split as float32 [N, 8, 8, 1] in [0, 1] and int32 labels."""
  images, labels = datasets.load_digits_split(split)
  return images.astype(np.float32) / 255., np.asarray(labels, np.int32)


def _training_batches(rng: np.random.Generator, images: np.ndarray, labels: np.ndarray,
                      recipe: Mapping) -> Tuple[np.ndarray, np.ndarray]:
  """Every training batch at once, drawn on the host: images [steps, B, 8, 8, 1], labels [steps, B].

  Batches walk through per-epoch permutations; each image is shifted by up to max_shift pixels
  (zero fill) so that the classifier tolerates small offsets in generated digits. Drawing them
  here keeps the compiled training loop small (random sampling inside it triples compile time).
  """
  steps, bs, s = recipe['steps'], recipe['batch_size'], recipe['max_shift']
  n, h, w = images.shape[:3]
  epochs = -(-steps * bs // n)
  idx = np.concatenate([rng.permutation(n) for _ in range(epochs)])[:steps * bs].reshape(steps, bs)
  off = rng.integers(0, 2 * s + 1, size=(steps, bs, 2))
  padded = np.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))
  rows = off[..., 0, None, None] + np.arange(h)[:, None]  # [steps, B, h, 1]
  cols = off[..., 1, None, None] + np.arange(w)[None, :]  # [steps, B, 1, w]
  return padded[idx[..., None, None], rows, cols], labels[idx]


def _train_classifier(seed: int, images: np.ndarray, labels: np.ndarray, recipe: Mapping) -> Dict:
  """Trains the digits CNN with AdamW and cosine decay; every step inside one lax.scan."""
  model = digits_classifier.DigitsClassifier(width=recipe['width'])
  rng = np.random.default_rng(seed)
  # LeCun-normal kernels and zero biases drawn in numpy: compiling flax's initializers costs
  # more CPU time than the whole training run.
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 1)))['params']
  params = jax.tree_util.tree_map(
      lambda s: (rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))).astype(np.float32)
      if len(s.shape) > 1 else np.zeros(s.shape, np.float32), shapes)
  tx = optax.adamw(optax.cosine_decay_schedule(recipe['lr'], recipe['steps']),
                   weight_decay=recipe['weight_decay'])
  batches = _training_batches(rng, images, labels, recipe)

  def loss_fn(params, x, y):
    logits = model.apply({'params': params}, x)['logits']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def step(carry, batch):
    params, opt_state = carry
    grads = jax.grad(loss_fn)(params, *batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state), None

  @jax.jit
  def train(params, batches):
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), batches)
    return params

  return {'params': train(params, batches)}


def digits_accuracy(variables: Mapping, images: np.ndarray, labels: np.ndarray) -> float:
  """Top-1 accuracy of the digits classifier on [N, 8, 8, 1] images in [0, 1]."""
  logits = digits_features_fn(variables)(jnp.asarray(images))['logits']
  return float(np.mean(np.argmax(np.asarray(logits), axis=1) == np.asarray(labels)))


def _cpu_device():
  """The CPU device when the CPU backend is available (same weights on every machine), else None."""
  try:
    return jax.devices('cpu')[0]
  except RuntimeError:
    return None


def train_digits_classifier(seed: int = DIGITS_CLASSIFIER_SEED, cache_path: Optional[str] = None
                            ) -> Tuple[Dict, Dict[str, object]]:
  """The digits classifier's variables and {'test_accuracy', 'arrays_sha256', 'cached'}.

  Trains on the embedded training split (a few seconds, on the CPU so every machine gets the same
  network). With `cache_path`, a file trained with the same seed, recipe and data is reused (its
  checksum verified); a missing, corrupted or mismatched file is (re)written.
  """
  train_x, train_y = _digits_data('train')
  test_x, test_y = _digits_data('test')
  h = hashlib.sha256(json.dumps(dict(_DIGITS_RECIPE, seed=seed), sort_keys=True).encode())
  for a in (train_x, train_y):
    h.update(np.ascontiguousarray(a).tobytes())
  recipe_id = h.hexdigest()  # plays the 'source checksum' role in the cache file
  if cache_path and os.path.isfile(cache_path):
    try:
      variables, meta = inception.load_variables(cache_path, expected_source_sha256=recipe_id)
      return variables, {'test_accuracy': float(meta['test_accuracy']),
                         'arrays_sha256': meta['arrays_sha256'], 'cached': True}
    except ValueError as e:
      logging.warning('Retraining the digits classifier: %s', e)
  device = _cpu_device()
  with jax.default_device(device) if device is not None else contextlib.nullcontext():
    variables = jax.device_get(_train_classifier(seed, train_x, train_y, _DIGITS_RECIPE))
    accuracy = digits_accuracy(variables, test_x, test_y)
  digest = inception.arrays_sha256(inception.flatten(variables))
  if cache_path:
    inception.save_variables(cache_path, variables, recipe_id,
                             extra={'test_accuracy': repr(accuracy)})
  return variables, {'test_accuracy': accuracy, 'arrays_sha256': digest, 'cached': False}


# ------------------------------------------------------------------------------------------------
# Public entry points for the evaluation loop


def _extractor_kind(config) -> str:
  """'inception' or 'digits' from config.eval.feature_extractor ('auto': by data set)."""
  kind = str(config.eval.get('feature_extractor', 'auto'))
  if kind not in EXTRACTORS:
    raise ValueError(f'Unknown config.eval.feature_extractor={kind!r}; valid choices: '
                     f'{list(EXTRACTORS)}.')
  data = datasets.dataset_info(config, count=False)
  if not data.is_image:
    raise ValueError(f'config.data.dataset={config.data.dataset!r} holds vectors, not images: '
                     'FID / IS / KID need an image data set.')
  if kind == 'auto':  # the digits CNN is trained on the embedded digits and fits them only
    kind = 'digits' if data.name == 'digits' else 'inception'
  return kind


def get_feature_extractor(config, workdir: Optional[str] = None) -> Extractor:
  """(name, features_fn): the FID Inception-v3 for real image sets, the digits CNN for 'digits'.

  `name` identifies the network and its exact weights (it keys the statistics cache). Inception
  weights come from config.eval.inception_weights (clear error when missing; never downloaded);
  the digits classifier is cached as digits_classifier.npz in `stats_dir` when workdir is given.
  """
  kind = _extractor_kind(config)
  if kind == 'inception':
    variables, meta = inception.load_fid_inception(str(config.eval.inception_weights))
    return f'inception_fid_{meta["arrays_sha256"][:12]}', inception_features_fn(variables)
  cache = os.path.join(stats_dir(config, workdir), 'digits_classifier.npz') if workdir else None
  variables, info = train_digits_classifier(DIGITS_CLASSIFIER_SEED, cache)
  logging.info('Digits classifier: test accuracy %.4f.', info['test_accuracy'])
  return f'digits_cnn_{info["arrays_sha256"][:12]}', digits_features_fn(variables)


def stats_dir(config, workdir: Optional[str]) -> str:
  """Where data statistics are cached: config.eval.stats_dir, or <workdir>/stats when unset."""
  directory = str(config.eval.get('stats_dir', '') or '')
  if not directory and not workdir:
    raise ValueError('Data statistics need a workdir or config.eval.stats_dir for their cache.')
  return directory or os.path.join(workdir, 'stats')


def _digest(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _stats_file_name(fingerprint: Mapping, extractor_name: str, split: str) -> str:
  """<data set>_<size>px_<split>_<extractor>_<hash of the data's identity>.npz.

  The identity (all of the fingerprint but the file digest) separates two folders or two image
  sizes; a changed file of the same folder keeps the name, and its statistics are replaced."""
  identity = {k: v for k, v in fingerprint.items() if k != 'files'}
  name = str(fingerprint['dataset']).lower()
  if fingerprint['dataset'] == 'folder':
    name = f'folder-{os.path.basename(str(fingerprint["source"]))}'
  elif fingerprint['dataset'] == 'LSUN':
    name = f'lsun-{str(fingerprint["source"][0]).split("/")[-1]}'
  size = f'{fingerprint["shape"][0]}px_' if len(fingerprint['shape']) == 3 else ''
  return (f'{name}_{size}{split}_{extractor_name}_'
          f'{_digest([identity, extractor_name, split])[:10]}.npz')


def stats_path(config, workdir: Optional[str], extractor_name: str, split: str = 'train') -> str:
  """The cache file of the data statistics under `stats_dir`: one per data set and network."""
  fingerprint = datasets.dataset_fingerprint(config)
  return os.path.join(stats_dir(config, workdir),
                      _stats_file_name(fingerprint, extractor_name, split))


def get_data_stats(config, workdir: Optional[str], extractor: Extractor,
                   images: Union[Iterable, Callable[[], Iterable]], *, split: str = 'train',
                   path: Optional[str] = None, max_examples: Optional[int] = None
                   ) -> Dict[str, np.ndarray]:
  """Data statistics {'mu', 'sigma', 'pool', 'is', 'n'} of the data set's images, cached on disk.

  `images` is an iterable of batches (as `extract_features` takes) or a zero-argument callable
  returning one, so a cache hit reads no data. The cache file (`path`, default `stats_path(...)`)
  records `datasets.dataset_fingerprint(config)`, the split, the extractor name and the example
  cap; a file whose record differs (e.g. a file of the folder changed) or that cannot be read is
  recomputed and replaced. Only the caller decides which process writes: every process that calls
  this writes the same file atomically.
  """
  name, features_fn = extractor
  fingerprint = datasets.dataset_fingerprint(config)
  if path is None:
    path = os.path.join(stats_dir(config, workdir), _stats_file_name(fingerprint, name, split))
  key = json.dumps({'data': fingerprint, 'split': split, 'extractor': name,
                    'max_examples': max_examples}, sort_keys=True)
  if os.path.isfile(path):
    try:
      with np.load(path, allow_pickle=False) as f:
        if str(f['key']) == key:
          return {k: f[k] for k in ('mu', 'sigma', 'pool', 'is', 'n')}
        logging.warning('Statistics in %s are for %s, not %s: recomputing.', path, f['key'], key)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
      logging.warning('Unreadable statistics file %s (%s): recomputing.', path, e)
  feats = extract_features(features_fn, images() if callable(images) else images, max_examples)
  mu, sigma = feature_stats(feats['pool'])
  stats = {'mu': mu, 'sigma': sigma, 'pool': feats['pool'].astype(np.float32),
           'is': np.float64(inception_score(feats['logits'], min(10, len(feats['logits'])))),
           'n': np.int64(len(feats['pool']))}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'wb') as f:  # write, then rename: readers never see a partial file
    np.savez(f, key=np.asarray(key), **stats)
  os.replace(tmp, path)
  return stats


def reference_stats(config, workdir: Optional[str], extractor: Optional[Extractor] = None, *,
                    progress: bool = True) -> Tuple[str, Dict[str, np.ndarray]]:
  """(path, statistics) of the data set's training split under the configured feature extractor.

  Reads the whole split once on a cache miss (every image, not dequantized: the reference is the
  8-bit data; one process reads all of it), with a progress bar when `progress`; a hit reads no
  data. `main.py --mode stats` calls this ahead of evaluation; evaluation calls it again and gets
  the cached file.
  """
  extractor = extractor or get_feature_extractor(config, workdir)
  path = stats_path(config, workdir, extractor[0])
  data_config = copy.deepcopy(config)
  data_config.data.uniform_dequantization = False

  def batches():
    from tqdm import tqdm
    n = datasets.dataset_info(config).splits['train']
    total = -(-n // int(config.eval.batch_size)) if n else None
    logging.info('Computing the statistics of %s (%s images) into %s.', config.data.dataset, n,
                 path)
    return tqdm(datasets.get_dataset(data_config, split='train', evaluation=True,
                                     process_index=0, process_count=1),
                total=total, disable=not progress, unit='batch', desc='data statistics')

  return path, get_data_stats(config, workdir, extractor, batches, path=path)
