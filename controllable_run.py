"""Controllable generation from the config: guided sampling and completion (inpainting,
colorization) functions of trained networks, two registered evaluators (`guidance`: accuracy and
FID per guidance scale; `inpainting`: the error of each mask preset) and `sample`, which
run_lib.sample hands controllable tasks to (`--mode sample`).

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
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

import checkpointing
import configs
import controllable_generation as cg
import datasets
import evaluators
import losses
import outputs
import parallel
import sampling
import sde_lib
import training
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
  return configs.load_module(path, '_classifier_config').get_config()


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
  model, state = training.init_train_state(jax.random.PRNGKey(cls_config.seed), cls_config, mesh)
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
    log_prob_fn = mutils.get_class_log_prob_fn(sde, classifier.model, cls_params,
                                               classifier.model_state)
    return cg.classifier_guided_score_fn(score(None), log_prob_fn, labels, scale)
  return score(None)


def get_guided_sampling_fn(config, sde, model, shape, inverse_scaler, eps, *,
                           classifier: Optional[Classifier] = None, mesh=None) -> Callable:
  """sampling_fn(rng, params, labels [B], scale, model_state=None) -> (samples, nfe): one jitted
  program for every label batch and scale, with config.sampling's method (nfe counts guided
  score evaluations; a CFG evaluation with w > 0 is two network passes)."""
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
    sampling.raise_if_sampler_failed(config, failed, 'guided sampling')
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
# Images: test-split batches and grid rows.


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


def class_rows(samples: np.ndarray, labels: np.ndarray, classes, cols: int = 10) -> np.ndarray:
  """[len(classes), cols, ...]: a row per class, its first `cols` samples (blank if fewer)."""
  rows = np.ones((len(classes), cols) + samples.shape[1:], np.float32)
  for i, k in enumerate(classes):
    picked = samples[labels == k][:cols]
    rows[i, :len(picked)] = picked
  return rows


def masked_view(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
  """The known pixels of images, unknown ones shown mid-grey."""
  return np.where(np.broadcast_to(mask, images.shape) > 0.5, images, 0.5)


def missing_mse(x: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
  """Mean squared error over the missing entries (mask 0), in [0, 1] pixel units."""
  missing = 1. - np.broadcast_to(mask, truth.shape)
  return float(np.sum(missing * (np.asarray(x, np.float64) - truth) ** 2) / np.sum(missing))


# ------------------------------------------------------------------------------------------------
# Evaluators (evaluators.EVALUATORS): built once per evaluation, run(state, outputs_dir) -> dict.


def _tag(value: float) -> str:
  return f'{float(value):g}'


def _mask_tag(preset: str) -> str:
  return str(preset).replace(':', '_')


@evaluators.EVALUATORS.register(name='guidance')
class GuidanceEvaluator(evaluators.Evaluator):
  """Per scale w in eval.guidance_scales: eval.num_samples class-balanced samples under
  config.sampling.guidance ('cfg' or 'classifier'); FID against the training data
  ({guidance}_w{w}_fid) and, with the digits classifier as feature extractor, its accuracy on the
  samples against their requested labels ({guidance}_w{w}_acc: the conditional-generation
  metric). Writes class_grid_w{w}.png (one row per class) and guided_w{w}.npz (samples, labels,
  features; a finished scale is reused)."""
  writes_outputs = True

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.get('enable_guidance', False))

  def __init__(self, run):
    super().__init__(run)
    import evaluation
    c = run.config
    cls_config = check_config(c)
    if c.sampling.guidance == 'none':
      raise ValueError("eval.enable_guidance needs config.sampling.guidance 'cfg' or 'classifier'.")
    for w in c.eval.guidance_scales:
      cg._check_nonnegative('eval.guidance_scales', w)
    self.extractor = evaluation.get_feature_extractor(c, run.workdir)
    classifier = load_classifier(c, cls_config, run.mesh) if cls_config is not None else None
    self.num_classes = num_guidance_classes(c, cls_config)
    self.sampling_fn = get_guided_sampling_fn(
        c, run.sde, run.model, run.data.batch_shape(int(c.eval.batch_size)), run.inverse_scaler,
        run.eps, classifier=classifier, mesh=run.mesh)

  def run(self, state, outputs_dir):
    import evaluation
    run, c = self.ctx, self.ctx.config
    guidance, n = str(c.sampling.guidance), int(c.eval.num_samples)
    _, stats = evaluation.reference_stats(c, run.workdir, self.extractor, progress=run.is_main)
    result = {}
    for w in c.eval.guidance_scales:
      path = os.path.join(outputs_dir, f'guided_w{_tag(w)}.npz')
      out = None
      if os.path.exists(path):
        with np.load(path) as f:
          out = {key: f[key] for key in f.files}
        out = out if len(out['labels']) == n else None  # another eval.num_samples: redo
      if out is None:
        out = self._samples(state, w, n)
        if run.is_main:
          outputs.save_npz(path, **out)  # a finished scale is complete or absent
      metrics = evaluation.compute_metrics(out, stats, kid_subset_size=min(1000, n))
      result[f'{guidance}_w{_tag(w)}_fid'] = metrics['fid']
      if self.extractor[0].startswith('digits'):  # its logits are the digit classes
        result[f'{guidance}_w{_tag(w)}_acc'] = float(np.mean(np.argmax(out['logits'], 1)
                                                             == out['labels']))
      if run.is_main:
        outputs.save_grid(class_rows(out['samples'], out['labels'], range(self.num_classes)),
                          os.path.join(outputs_dir, f'class_grid_w{_tag(w)}.png'))
      logging.info('Guidance %s, w = %g: %s', guidance, w,
                   {k: round(v, 4) for k, v in result.items() if f'_w{_tag(w)}_' in k})
    return result

  def _samples(self, state, w, n) -> Dict[str, np.ndarray]:
    def features(samples):
      feats = jax.device_get(self.extractor[1](samples))
      return {k: np.asarray(feats[k]) for k in ('pool', 'logits')}

    out, _ = draw_guided(self.ctx, state, self.sampling_fn, n, 'all', self.num_classes, w,
                         per_batch=features)
    return out


def draw_guided(run, state, sampling_fn, n: int, labels, num_classes: int, scale,
                per_batch: Optional[Callable] = None) -> Tuple[Dict[str, np.ndarray], int]:
  """n samples of a guided sampling_fn (get_guided_sampling_fn) in batches of eval.batch_size,
  with the label spec `labels` (cg.class_labels; 'all': class-balanced across batches) and
  `scale`: ({'samples', 'labels', and what per_batch(samples) -> dict adds}, nfe per sample).
  Batch r is drawn with the seed of the sample mode's batch r."""
  import run_lib
  batch = int(run.config.eval.batch_size)
  parts, nfe, start = [], 0, time.time()
  for r in range(-(-n // batch)):
    y = cg.class_labels(labels, batch, num_classes, offset=r * batch)
    samples, nfe = run.draw_samples(sampling_fn, state, run_lib.sample_mode_seed(r), y, scale)
    parts.append(dict(samples=samples, labels=y, **(per_batch(samples) if per_batch else {})))
    logging.info('Guided sampling w = %g, round %d: %d samples, %d NFE (%.0f s).', scale, r + 1,
                 batch, nfe, time.time() - start)
  return {k: np.concatenate([p[k] for p in parts])[:n] for k in parts[0]}, nfe


@evaluators.EVALUATORS.register(name='inpainting')
class InpaintingEvaluator(evaluators.Evaluator):
  """Per mask preset of eval.inpaint_masks: unguided inpainting (the unconditional score; the
  null label of a class-conditional network) of the first eval.inpaint_num_images test images
  (0: all) with config.sampling's PC settings; the mean squared error to the truth over the
  missing pixels (inpaint_<mask>_mse, [0, 1] units) and inpaint_<mask>.png (rows: masked input,
  completion, truth). A sample of p(unknown | known) has twice the conditional variance as its
  expected error: benchmarks/guidance.py prints baselines to read it against."""
  writes_outputs = True

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.get('enable_inpainting', False))

  def __init__(self, run):
    super().__init__(run)
    c = run.config
    for preset in c.eval.inpaint_masks:
      cg.inpainting_mask(preset, run.data.batch_shape(1))
    self.complete = get_completion_fn(c, run.sde, run.model, run.scaler, run.inverse_scaler,
                                      run.eps, task='inpaint', guidance='none')

  def run(self, state, outputs_dir):
    run, c = self.ctx, self.ctx.config
    images, _ = test_images(c, int(c.eval.get('inpaint_num_images', 0)))
    result = {}
    for preset in c.eval.inpaint_masks:
      mask = cg.inpainting_mask(preset, images.shape, seed=c.seed)
      start = time.time()
      x, nfe = complete_in_batches(self.complete, run, state, images, mask)
      key = f'inpaint_{_mask_tag(preset)}_mse'
      result[key] = missing_mse(x, images, mask)
      logging.info('Inpainting %s: MSE %.5f over the missing pixels of %d images, %d NFE (%.0f s).',
                   preset, result[key], len(images), nfe, time.time() - start)
      if run.is_main:
        shown = mask[:10] if mask.shape[0] > 1 else mask
        outputs.save_grid(np.stack([masked_view(images[:10], shown), x[:10], images[:10]]),
                          os.path.join(outputs_dir, f'inpaint_{_mask_tag(preset)}.png'))
    return result


def complete_in_batches(complete_fn, run, state, images, mask, labels=None, scale=0.,
                        seed_offset: int = 0) -> Tuple[np.ndarray, int]:
  """Completions of images [N, ...] in batches of eval.batch_size (the last one padded, so one
  program serves all): (completions [N, ...], nfe per image)."""
  batch = int(run.config.eval.batch_size)
  labels = np.zeros(len(images), np.int32) if labels is None else np.asarray(labels, np.int32)
  parts, nfe = [], 0
  for i in range(0, len(images), batch):
    idx = np.arange(i, i + batch) % len(images)  # wrap the last batch around (padding)
    part_mask = mask if mask.shape[0] == 1 else mask[idx]
    rng = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), seed_offset + i)
    x, nfe = complete_fn(rng, state.ema_params, images[idx], part_mask, labels[idx], scale,
                         state.model_state)
    parts.append(np.asarray(parallel.to_host(x))[:len(images) - i])
  return np.concatenate(parts), int(nfe)


# ------------------------------------------------------------------------------------------------
# The sample mode of controllable tasks.


def handles(config) -> bool:
  """Whether `--mode sample` is a controllable task (guided sampling, inpainting, colorization)."""
  s = config.sampling
  return str(s.get('task', 'sample')) != 'sample' or str(s.get('guidance', 'none')) != 'none'


def _output_name(s) -> str:
  """sample_cfg_w1, inpaint_center, colorize, ...: tasks and settings get their own folders."""
  name = str(s.task) + (f'_{_mask_tag(s.mask)}' if s.task == 'inpaint' else '')
  return name + (f'_{s.guidance}_w{_tag(s.guidance_scale)}' if s.guidance != 'none' else '')


def sample(config, workdir: str, folder: str = 'samples_mode') -> Dict[str, Any]:
  """run_lib.sample for a controllable task: from snapshot config.eval.ckpt (None: the newest),
  config.sampling's task with its guidance, in batches of eval.batch_size:
  - task 'sample': eval.num_samples samples with labels from sampling.labels ('all': balanced);
  - task 'inpaint' / 'colorize': the first eval.num_samples test images completed (mask preset
    sampling.mask / their grey levels); with guidance and labels 'all', each image's own label.
  Writes <workdir>/<folder>/ckpt_<N>_<task and settings>/ (e.g. ckpt_3_sample_cfg_w1,
  ckpt_3_inpaint_center): samples.npz (samples, labels; for completions also the
  inputs and truth), sample.png (one row per class; or masked input / completion / truth rows)
  and sampling.json (settings, snapshot, NFE, seconds, and the MSE to the truth over the missing
  entries of completions). Returns that summary."""
  import run_lib
  cls_config = check_config(config)
  run_lib.check_config(config)
  workdir = run_lib._check_workdir(workdir)
  out_root = os.path.join(workdir, folder)
  os.makedirs(out_root, exist_ok=True)
  with checkpointing.WorkdirLock(out_root, 'sampling'):
    run = run_lib.setup(config, workdir)
    snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
    ckpt, state = run_lib._restore_snapshot(run, snapshots, config.eval.get('ckpt', None))
    s, e, step = config.sampling, config.eval, int(state.step)
    classifier = load_classifier(config, cls_config, run.mesh) if cls_config is not None else None
    task, guidance = str(s.task), str(s.guidance)
    k = num_guidance_classes(config, cls_config) if guidance != 'none' else 0
    out = outputs.fresh_outputs(os.path.join(out_root, f'ckpt_{ckpt}_{_output_name(s)}'),
                                {'step': step, 'seed': config.seed, 'batch_size': e.batch_size,
                                 'num_samples': e.num_samples, 'sampling': s.to_dict()}, run.is_main)
    start = time.time()
    if task == 'sample':
      result, rows = _sample_task(run, state, classifier, k)
    else:
      result, rows = _completion_task(run, state, classifier, k)
    # The keys of run_lib.sample's summary (main.py prints them), then the task's.
    summary = {'ckpt': ckpt, 'step': step, 'num_samples': len(result['samples']),
               'batch_size': int(e.batch_size), 'seed': config.seed, 'sampling': s.to_dict(),
               'seconds': time.time() - start, 'outputs': out, 'task': task,
               'guidance': guidance, 'guidance_scale': float(s.guidance_scale),
               **{key: v for key, v in result.items() if np.ndim(v) == 0}}
    if run.is_main:
      outputs.save_npz(os.path.join(out, 'samples.npz'),
                       **{key: v for key, v in result.items() if np.ndim(v) > 0})
      if rows is not None:
        outputs.save_grid(rows, os.path.join(out, 'sample.png'))
      else:  # vectors: a 2-D histogram
        outputs.save_samples(result['samples'], out, 'sample', npz=False)
      with open(os.path.join(out, 'sampling.json'), 'w') as f:
        json.dump(summary, f, indent=1, default=str)
    logging.info('Wrote %s outputs of snapshot %d (step %d) to %s.', task, ckpt, step, out)
    return summary


def _sample_task(run, state, classifier, k):
  c = run.config
  s, batch, n = c.sampling, int(c.eval.batch_size), int(c.eval.num_samples)
  fn = get_guided_sampling_fn(c, run.sde, run.model, run.data.batch_shape(batch),
                              run.inverse_scaler, run.eps, classifier=classifier, mesh=run.mesh)
  out, nfe = draw_guided(run, state, fn, n, s.labels, k, s.guidance_scale)  # k > 0: guided
  x, y = out['samples'], out['labels']
  result = {'samples': x, 'nfe_per_sample': float(nfe), 'labels': y}
  if x.ndim != 4:
    return result, None
  classes = np.unique(y)
  return result, class_rows(x, y, classes, cols=min(10, max(1, n // len(classes))))


def _completion_task(run, state, classifier, k):
  c = run.config
  s, task = c.sampling, str(c.sampling.task)
  images, truth_labels = test_images(c, int(c.eval.num_samples))
  labels = np.zeros(len(images), np.int32)
  if k:
    labels = (truth_labels.astype(np.int32) if str(s.labels).strip().lower() == 'all'
              else cg.class_labels(s.labels, len(images), k))
  if task == 'colorize':
    mask = np.ones((1, 1, 1, 1), np.float32)  # unused: colorize knows the grey level
    inputs = np.repeat(images.mean(-1, keepdims=True), 3, -1)
  else:
    mask = cg.inpainting_mask(s.mask, images.shape, seed=c.seed)
    inputs = images
  fn = get_completion_fn(c, run.sde, run.model, run.scaler, run.inverse_scaler, run.eps,
                         task=task, classifier=classifier)
  x, nfe = complete_in_batches(fn, run, state, inputs, mask, labels, s.guidance_scale)
  shown = inputs if task == 'colorize' else masked_view(images, mask)
  result = {'samples': x, 'inputs': shown, 'truth': images, 'nfe_per_sample': float(nfe),
            'mse': missing_mse(x, images, mask) if task == 'inpaint' else
            float(np.mean((x - images) ** 2)), **({'labels': labels} if k else {})}
  return result, np.stack([shown[:10], x[:10], images[:10]])
