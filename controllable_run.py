"""Controllable generation from the config: guided sampling and inpainting functions of trained
networks, the `sample` mode of main.py, and two evaluators (class-conditional sampling, inpainting)
that run_lib.evaluate calls through one-line hooks.

Config fields (config.sampling, read here only):
- task: 'sample', 'inpaint' or 'colorize' (the last two on the test split's images);
- mask: the inpainting preset (`controllable_generation.inpainting_mask`);
- guidance: 'none', 'classifier' (a noise-conditional classifier trained with a
  training.objective = 'classifier' config: classifier_config, classifier_workdir) or 'cfg'
  (a class-conditional network, model.num_classes > 0, trained with label dropout);
- guidance_scale (>= 0), labels ('all': a class-balanced batch, or class ids).
Guided sampling uses config.sampling.method (PC, ODE or a fast solver): guidance is a score
transform, so every sampler takes it. Inpainting and colorization use the PC settings.
config.eval (evaluators): enable_guidance with guidance_scales, enable_inpainting with
inpaint_masks and inpaint_num_images (0: the whole test split).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import checkpointing
import controllable_generation as cg
import datasets
import losses
import ode
import parallel
import sampling
import sde_lib
from models import layers
from models import utils as mutils

TASKS = ('sample', 'inpaint', 'colorize')
GUIDANCE = ('none', 'classifier', 'cfg')


# ------------------------------------------------------------------------------------------------
# Checks and the classifier, before any compilation.


def load_config_file(path: str):
  """get_config() of a config file (a path such as configs/digits/vp_classifier.py)."""
  if not path or not os.path.isfile(path):
    raise ValueError(f'config.sampling.classifier_config={path!r} is not a config file; classifier '
                     'guidance needs the classifier\'s config, e.g. configs/digits/vp_classifier.py.')
  spec = importlib.util.spec_from_file_location('_classifier_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _check_classifier_config(config, cls_config) -> None:
  """The classifier must have been trained as one, on the same data, scaling and SDE."""
  path = config.sampling.classifier_config
  if losses.get_objective(cls_config) != 'classifier':
    raise ValueError(f'{path} is not a classifier config (training.objective = '
                     f'{cls_config.training.get("objective", "score")!r}, not \'classifier\').')
  mine, theirs = mutils.input_shape(config), mutils.input_shape(cls_config)
  if mine != theirs or bool(config.data.centered) != bool(cls_config.data.centered):
    raise ValueError(f'The classifier of {path} takes inputs {theirs[1:]} (centered '
                     f'{cls_config.data.centered}) but this model {mine[1:]} (centered '
                     f'{config.data.centered}).')
  sde, _ = sde_lib.get_sde(config)
  cls_sde, _ = sde_lib.get_sde(cls_config)
  t = jnp.linspace(1e-3, 1., 17)
  if not np.allclose(np.asarray(sde.log_snr(t)), np.asarray(cls_sde.log_snr(t)), rtol=1e-5):
    raise ValueError(f'The classifier of {path} was trained under {type(cls_sde).__name__}('
                     f'{cls_config.training.sde}) with other noise levels than this model\'s '
                     f'{type(sde).__name__}; train it with this model\'s SDE and its parameters.')


def num_guidance_classes(config, cls_config=None) -> int:
  """Classes of the guidance: the classifier's, or the class-conditional network's."""
  if config.sampling.guidance == 'classifier':
    return int(cls_config.model.get('num_classes', 10))
  return layers.num_classes(config)


def check_config(config):
  """Validates config.sampling's controllable-generation fields (names, values, the classifier's
  config); returns the classifier's config or None. No I/O but reading that config file."""
  s = config.sampling
  task, guidance = str(s.get('task', 'sample')), str(s.get('guidance', 'none'))
  layers.check_choice('config.sampling.task', task, TASKS)
  layers.check_choice('config.sampling.guidance', guidance, GUIDANCE)
  scale = s.get('guidance_scale', 1.)
  if not (np.isfinite(scale) and scale >= 0):
    raise ValueError(f'config.sampling.guidance_scale must be >= 0, got {scale!r}.')
  if task == 'inpaint':
    cg.inpainting_mask(s.mask, mutils.input_shape(config, 1))
  if task == 'colorize' and mutils.input_shape(config)[-1] != 3:
    raise ValueError(f'config.sampling.task=\'colorize\' needs RGB images (data.num_channels = 3), '
                     f'not {mutils.input_shape(config)[1:]}.')
  cls_config = None
  if guidance == 'classifier':
    cls_config = load_config_file(str(s.classifier_config))
    _check_classifier_config(config, cls_config)
    if not os.path.isdir(os.path.join(str(s.classifier_workdir), 'checkpoints')):
      raise ValueError(f'config.sampling.classifier_workdir={s.classifier_workdir!r} has no '
                       'checkpoints/; train the classifier there first (--mode train with '
                       f'--config {s.classifier_config}).')
  if guidance == 'cfg' and layers.num_classes(config) == 0:
    raise ValueError("config.sampling.guidance='cfg' needs a class-conditional network "
                     '(model.num_classes > 0, trained with training.label_dropout > 0).')
  if guidance != 'none':
    cg.class_labels(s.labels, 1, num_guidance_classes(config, cls_config))
  return cls_config


@dataclasses.dataclass
class Classifier:
  """A trained noise-conditional classifier: its network, EMA parameters and state."""
  model: Any
  params: Any
  model_state: Any
  step: int


def load_classifier(config, cls_config, mesh=None) -> Classifier:
  """The newest snapshot of the classifier in config.sampling.classifier_workdir."""
  model, state = losses.init_train_state(jax.random.PRNGKey(cls_config.seed), cls_config, mesh)
  directory = os.path.join(str(config.sampling.classifier_workdir), 'checkpoints')
  state, step = checkpointing.restore_latest(checkpointing.make_manager(directory), state)
  if step is None:
    raise FileNotFoundError(f'No classifier snapshot in {directory}.')
  logging.info('Classifier of %s: snapshot %d (step %d).', config.sampling.classifier_config,
               step, int(state.step))
  return Classifier(model, state.ema_params, state.model_state, int(state.step))


# ------------------------------------------------------------------------------------------------
# Guided score functions and the jitted functions of a trained network.


def guided_score_fn(config, sde, model, params, model_state, labels, scale,
                    classifier: Optional[Classifier] = None, cls_params=None,
                    guidance: Optional[str] = None) -> Callable:
  """The network's score_fn(x, t) under `guidance` (default config.sampling.guidance), for
  labels [B] and a scale (both may be traced): 'none' (unconditional; the null label of a
  conditional network), 'classifier' (+ scale grad log p_t(labels | x)) or 'cfg'
  ((1 + w) s(x | y) - w s(x))."""
  guidance = str(config.sampling.guidance) if guidance is None else guidance
  score = lambda y: mutils.get_score_fn(sde, model, params, model_state, train=False,
                                        continuous=config.training.continuous, class_labels=y)
  if guidance == 'cfg':
    return cg.cfg_score_fn(score(labels), score(None), scale)
  if guidance == 'classifier':
    log_prob_fn = mutils.get_class_log_prob_fn(sde, classifier.model, cls_params, classifier.model_state)
    return cg.classifier_guided_score_fn(score(None), log_prob_fn, labels, scale)
  return score(None)


def get_guided_sampling_fn(config, sde, model, shape, inverse_scaler, eps, *,
                           classifier: Optional[Classifier] = None, mesh=None) -> Callable:
  """sampling_fn(rng, params, labels [B], scale, model_state=None) -> (samples, nfe): one jitted
  program for every label batch and scale, with config.sampling's method (nfe counts guided
  score evaluations; a CFG evaluation with w > 0 is two network passes)."""
  s = config.sampling
  sampler = sampling.get_sampler(config, shape, eps)
  out = None
  if mesh is not None:
    out = (parallel.batch_sharding(mesh), parallel.replicated(mesh), parallel.replicated(mesh))

  def guided_sample(rng, params, labels, scale, model_state, cls_params):
    score_fn = guided_score_fn(config, sde, model, params, model_state, labels, scale, classifier,
                               cls_params)
    x, nfe, failed = sampler(rng, sde, score_fn)
    return inverse_scaler(x), nfe, failed

  jitted = jax.jit(guided_sample, out_shardings=out)
  cls_params = classifier.params if classifier is not None else None

  def sampling_fn(rng, params, labels, scale, model_state=None):
    x, nfe, failed = jitted(rng, params, jnp.asarray(labels, jnp.int32),
                            jnp.asarray(scale, jnp.float32), model_state, cls_params)
    ode.raise_if_failed(failed, 'guided sampling', solver=s.get('ode_solver', 'tsit5'),
                        rtol=s.get('rtol', 1e-5), atol=s.get('atol', 1e-5), max_steps=4096)
    return x, nfe

  return sampling_fn


def get_completion_fn(config, sde, model, scaler, inverse_scaler, eps, *, task: str,
                      classifier: Optional[Classifier] = None,
                      guidance: Optional[str] = None) -> Callable:
  """complete_fn(rng, params, images [B, ...] in [0, 1], mask, labels, scale, model_state=None)
  -> (completions in [0, 1], nfe) for task 'inpaint' (mask: 1 = known) or 'colorize' (images
  grey, mask ignored), with config.sampling's PC settings and `guidance` (default
  config.sampling.guidance); one jitted program."""
  s = config.sampling
  kwargs = dict(predictor=s.predictor, corrector=s.corrector, snr=s.snr, n_steps=s.n_steps_each,
                eps=eps, denoise=s.noise_removal, probability_flow=s.probability_flow)
  sampling._check_pc_args(sde, s.predictor, s.corrector, s.snr, s.n_steps_each, eps)
  cls_params = classifier.params if classifier is not None else None

  @jax.jit
  def jitted(rng, params, images, mask, labels, scale, model_state, cls_params):
    score_fn = guided_score_fn(config, sde, model, params, model_state, labels, scale, classifier,
                               cls_params, guidance)
    if task == 'colorize':
      x, nfe = cg.colorize(rng, sde, score_fn, scaler(images), **kwargs)
    else:
      x, nfe = cg.inpaint(rng, sde, score_fn, scaler(images), mask, **kwargs)
    return inverse_scaler(x), nfe

  def complete_fn(rng, params, images, mask, labels, scale, model_state=None):
    images = jnp.asarray(images, jnp.float32)
    if task == 'colorize':
      cg._check_gray(images)  # before compiling
    else:
      cg._check_mask(mask, tuple(images.shape))
    return jitted(rng, params, images, jnp.asarray(mask, jnp.float32),
                  jnp.asarray(labels, jnp.int32), jnp.asarray(scale, jnp.float32), model_state,
                  cls_params)

  return complete_fn


# ------------------------------------------------------------------------------------------------
# Images: test-split batches and labelled grids.


def test_images(config, n: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """The first n (0: all) test-split images [n, ...] in [0, 1] and their labels, padding dropped."""
  images, labels = [], []
  for batch in datasets.get_dataset(config, split='test', evaluation=True, process_index=0,
                                    process_count=1):
    real = np.asarray(batch['mask']) > 0
    images.append(np.asarray(batch['image'])[real])
    labels.append(np.asarray(batch['label'])[real])
    if n and sum(map(len, images)) >= n:
      break
  images, labels = np.concatenate(images), np.concatenate(labels)
  return (images[:n], labels[:n]) if n else (images, labels)


def save_grid(rows: np.ndarray, path: str) -> str:
  """Writes images [R, C, H, W, ch] in [0, 1] as one PNG grid, R rows of C images (upscaled to
  about 256 px high), 2 px white borders."""
  from PIL import Image
  rows = np.clip(np.asarray(rows, np.float32), 0., 1.)
  r, c, h, w, ch = rows.shape
  grid = np.ones((r * (h + 2) + 2, c * (w + 2) + 2, ch), np.float32)
  for i in range(r):
    for j in range(c):
      grid[2 + i * (h + 2):2 + i * (h + 2) + h, 2 + j * (w + 2):2 + j * (w + 2) + w] = rows[i, j]
  scale = max(1, 256 // grid.shape[0])
  grid = np.kron(grid, np.ones((scale, scale, 1)))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  Image.fromarray((255 * (grid[..., 0] if ch == 1 else grid)).round().astype(np.uint8)).save(path)
  return path


def class_rows(samples: np.ndarray, labels: np.ndarray, num_classes: int, cols: int = 10) -> np.ndarray:
  """[K, cols, ...]: the first `cols` samples of each class (blank where a class has fewer)."""
  rows = np.ones((num_classes, cols) + samples.shape[1:], np.float32)
  for k in range(num_classes):
    picked = samples[labels == k][:cols]
    rows[k, :len(picked)] = picked
  return rows


def masked_view(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The known pixels of images, unknown ones shown mid-grey."""
  return np.where(np.broadcast_to(mask, images.shape) > 0.5, images, 0.5)


def missing_mse(x: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """Mean squared error over the missing entries (mask 0), in [0, 1] pixel units."""
  missing = 1. - np.broadcast_to(mask, truth.shape)
  return float(np.sum(missing * (np.asarray(x, np.float64) - truth) ** 2) / np.sum(missing))


# ------------------------------------------------------------------------------------------------
# Evaluators: evaluator(run, state, out_dir) -> {metric: value}, called by run_lib.evaluate.


def _data_stats(run, extractor):
  """The data statistics of the FID, as run_lib._sample_quality gets them (cached in workdir)."""
  import evaluation
  c = run.config
  return evaluation.get_data_stats(
      c, run.workdir, extractor,
      lambda: datasets.get_dataset(c, split='train', evaluation=True, process_index=0,
                                   process_count=1))


def _tag(value: float) -> str:
  return f'{float(value):g}'


def evaluate_guidance(run, state, out_dir: str, extractor=None) -> Dict[str, float]:
  """Per scale w in eval.guidance_scales: eval.num_samples class-balanced samples under
  config.sampling.guidance; FID against the training data ({guidance}_w{w}_fid) and, with the
  digits classifier as extractor, its accuracy on the samples against their requested labels
  ({guidance}_w{w}_acc: the conditional-generation metric). Writes class_grid_w{w}.png (one row
  per class) and guided_w{w}.npz (samples, labels, features; a finished scale is reused)."""
  import evaluation
  c = run.config
  cls_config = check_config(c)
  guidance = str(c.sampling.guidance)
  if guidance == 'none':
    raise ValueError("eval.enable_guidance needs config.sampling.guidance 'cfg' or 'classifier'.")
  extractor = extractor or run.get('extractor', lambda: evaluation.get_feature_extractor(
      c, run.workdir))
  classifier = run.get('classifier', lambda: load_classifier(c, cls_config, run.mesh)) \
      if cls_config is not None else None
  k = num_guidance_classes(c, cls_config)
  batch, n = int(c.eval.batch_size), int(c.eval.num_samples)
  sampling_fn = run.get('guided_sampling', lambda: get_guided_sampling_fn(
      c, run.sde, run.model, mutils.input_shape(c, batch), run.inverse_scaler, run.eps,
      classifier=classifier, mesh=run.mesh))
  stats = _data_stats(run, extractor)
  result = {}
  os.makedirs(out_dir, exist_ok=True)
  for w in c.eval.guidance_scales:
    path = os.path.join(out_dir, f'guided_w{_tag(w)}.npz')
    if os.path.exists(path):
      with np.load(path) as f:
        out = {key: f[key] for key in f.files}
    else:
      out = _guided_rounds(run, state, sampling_fn, extractor, w, n, batch, k)
      if run.is_main:
        np.savez_compressed(path + '.tmp.npz', **out)
        os.replace(path + '.tmp.npz', path)  # a finished scale is complete or absent
    metrics = evaluation.compute_metrics(out, stats, kid_subset_size=min(1000, n))
    result[f'{guidance}_w{_tag(w)}_fid'] = metrics['fid']
    if extractor[0].startswith('digits'):
      result[f'{guidance}_w{_tag(w)}_acc'] = float(np.mean(np.argmax(out['logits'], 1) == out['labels']))
    if run.is_main:
      save_grid(class_rows(out['samples'], out['labels'], k),
                os.path.join(out_dir, f'class_grid_w{_tag(w)}.png'))
    logging.info('Guidance %s, w = %g: %s', guidance, w,
                 {key: round(v, 4) for key, v in result.items() if f'_w{_tag(w)}_' in key})
  return result


def _guided_rounds(run, state, sampling_fn, extractor, w, n, batch, k) -> Dict[str, np.ndarray]:
  outs, start = [], time.time()
  for r in range(-(-n // batch)):
    labels = cg.class_labels('all', batch, k, offset=r * batch)
    rng = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), 7_000_003 * (r + 1))
    samples, nfe = sampling_fn(rng, state.ema_params, labels, w, state.model_state)
    samples = parallel.to_host(samples)
    feats = jax.device_get(extractor[1](samples))
    outs.append(dict(samples=samples, labels=labels, **{key: np.asarray(feats[key])
                                                        for key in ('pool', 'logits')}))
    logging.info('Guided sampling w = %g, round %d: %d samples, %d NFE (%.0f s).', w, r + 1,
                 batch, int(nfe), time.time() - start)
  return {key: np.concatenate([o[key] for o in outs])[:n] for key in outs[0]}


def _mask_tag(preset: str) -> str:
  return str(preset).replace(':', '_')


def evaluate_inpainting(run, state, out_dir: str) -> Dict[str, float]:
  """Per mask preset of eval.inpaint_masks: unguided inpainting of the first
  eval.inpaint_num_images test images (0: all) with config.sampling's PC settings; the MSE to the
  truth over the missing pixels (inpaint_<mask>_mse, [0, 1] units) and inpaint_<mask>.png (rows:
  masked input, completion, truth)."""
  c = run.config
  images, _ = test_images(c, int(c.eval.get('inpaint_num_images', 0)))
  complete = run.get('inpaint', lambda: get_completion_fn(
      c, run.sde, run.model, run.scaler, run.inverse_scaler, run.eps, task='inpaint',
      guidance='none'))
  batch, result = int(c.eval.batch_size), {}
  for preset in c.eval.inpaint_masks:
    mask = cg.inpainting_mask(preset, images.shape, seed=c.seed)
    outs, start = [], time.time()
    for i in range(0, len(images), batch):
      part = images[i:i + batch]
      part_mask = mask if mask.shape[0] == 1 else mask[i:i + batch]
      rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), i)
      x, nfe = complete(rng, state.ema_params, part, part_mask, np.zeros(len(part), np.int32), 0.,
                        state.model_state)
      outs.append(np.asarray(x))
    x = np.concatenate(outs)
    result[f'inpaint_{_mask_tag(preset)}_mse'] = missing_mse(x, images, mask)
    logging.info('Inpainting %s: MSE %.5f over the missing pixels of %d images, %d NFE (%.0f s).',
                 preset, result[f'inpaint_{_mask_tag(preset)}_mse'], len(images), nfe,
                 time.time() - start)
    if run.is_main:
      m = mask[:10] if mask.shape[0] > 1 else mask
      save_grid(np.stack([masked_view(images[:10], m), x[:10], images[:10]]),
                os.path.join(out_dir, f'inpaint_{_mask_tag(preset)}.png'))
  return result


def evaluators(config) -> Dict[str, Callable]:
  """The evaluators config.eval enables: name -> evaluator(run, state, out_dir) -> dict; checks
  their config fields first (a ValueError before any checkpoint work)."""
  e, out = config.eval, {}
  if e.get('enable_guidance', False) or e.get('enable_inpainting', False):
    check_config(config)
  if e.get('enable_inpainting', False):
    for preset in e.inpaint_masks:
      cg.inpainting_mask(preset, mutils.input_shape(config, 1))
  if e.get('enable_guidance', False):
    out['guidance'] = evaluate_guidance
  if e.get('enable_inpainting', False):
    out['inpainting'] = evaluate_inpainting
  return out


# ------------------------------------------------------------------------------------------------
# The sample mode.


def sample(config, workdir: str) -> Dict[str, Any]:
  """Samples eval.batch_size images from the newest snapshot in <workdir>/checkpoints under
  config.sampling (task, guidance, labels, mask) and writes <workdir>/samples/<name>/: a PNG
  grid (class rows with labels; masked input / completion / truth rows for inpainting and
  colorization) and samples.npz. Returns {'path', 'nfe', 'snapshot'} (+ 'mse' for inpainting)."""
  import run_lib
  cls_config = check_config(config)
  run = run_lib.setup(config, workdir)
  manager = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
  state, ckpt = checkpointing.restore_latest(manager, run.state)
  if ckpt is None:
    raise FileNotFoundError(f'No snapshot in {manager.directory}; train first (--mode train).')
  s, n = config.sampling, int(config.eval.batch_size)
  classifier = load_classifier(config, cls_config, run.mesh) if cls_config is not None else None
  guidance, task = str(s.guidance), str(s.task)
  k = num_guidance_classes(config, cls_config) if guidance != 'none' else 0
  labels = cg.class_labels(s.labels, n, k) if k else np.zeros(n, np.int32)
  rng = jax.random.PRNGKey(config.seed)
  name = task + (f'_{guidance}_w{_tag(s.guidance_scale)}' if guidance != 'none' else '')
  out_dir = os.path.join(run.workdir, 'samples', name)
  result: Dict[str, Any] = {'snapshot': ckpt}
  if task == 'sample':
    fn = get_guided_sampling_fn(config, run.sde, run.model, mutils.input_shape(config, n),
                                run.inverse_scaler, run.eps, classifier=classifier, mesh=run.mesh)
    x, nfe = fn(rng, state.ema_params, labels, s.guidance_scale, state.model_state)
    x = parallel.to_host(x)
    rows = (class_rows(x, labels, k, cols=max(1, n // k)) if k else x[None]) if x.ndim == 4 else None
  else:
    images, truth_labels = test_images(config, n)
    if guidance != 'none' and str(s.labels).lower() == 'all':
      labels = truth_labels  # complete each test image towards its own class
    fn = get_completion_fn(config, run.sde, run.model, run.scaler, run.inverse_scaler, run.eps,
                           task=task, classifier=classifier)
    if task == 'colorize':
      mask = np.zeros((1,) * images.ndim, np.float32)
      inputs = np.repeat(images.mean(-1, keepdims=True), 3, -1)
    else:
      mask = cg.inpainting_mask(s.mask, images.shape, seed=config.seed)
      inputs = images
    x, nfe = fn(rng, state.ema_params, inputs, mask, labels[:len(images)], s.guidance_scale,
                state.model_state)
    x = np.asarray(x)
    shown = inputs if task == 'colorize' else masked_view(images, mask)
    rows = np.stack([shown, x, images])
    result['mse'] = missing_mse(x, images, mask)
  if run.is_main:
    os.makedirs(out_dir, exist_ok=True)
    np.savez_compressed(os.path.join(out_dir, 'samples.npz'), samples=x,
                        **({'labels': labels[:len(x)]} if guidance != 'none' else {}))
    result['path'] = (save_grid(rows, os.path.join(out_dir, 'grid.png')) if rows is not None
                      else run_lib.save_samples(x, out_dir, 'points'))  # vectors: a 2-D histogram
    with open(os.path.join(out_dir, 'settings.json'), 'w') as f:
      json.dump({'snapshot': ckpt, 'sampling': s.to_dict()}, f, default=str)
  result['nfe'] = int(nfe)
  return result
