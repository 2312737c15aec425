"""Evaluators: one per metric family, each `run(state, outputs_dir) -> dict` of metrics.

`run_lib.evaluate` is a loop over snapshots and, per snapshot, over `get_evaluators(run)`: the
registered evaluators whose `enabled(config)` says so. An evaluator is built once per evaluation
(its jitted functions compile once, its set-up errors come before any checkpoint work), and
`outputs_dir` is the snapshot's resumable folder (<eval_folder>/ckpt_<N>) for what it writes. A
new metric is a new registered class (e.g. controllable_run.py's); run_lib needs no edit.

- `loss`: the training objective on the test split (`config.eval.enable_loss`);
- `bpd`: bits/dim over a split by the probability-flow ODE (`config.eval.enable_bpd`);
- `samples`: `config.eval.num_samples` samples in resumable rounds, and FID / IS / KID for image
  data (`config.eval.enable_sampling`).
"""
from __future__ import annotations

import os
import time
from typing import Any, Dict, List

import jax
import numpy as np
from absl import logging

import datasets
import likelihood
import outputs
import parallel
import sampling
import training
from registry import Registry

# Modules outside this one that register evaluators; the registry imports them on first use.
_EVALUATOR_MODULES = ('controllable_run',)


def _import_all() -> None:
  import importlib
  for module in _EVALUATOR_MODULES:
    importlib.import_module(module)


EVALUATORS: Registry[type] = Registry('evaluator', on_miss=_import_all)


class Evaluator:
  """Base class: built once per evaluation run from the `run_lib.Run`."""
  #: Whether run() writes into its outputs_dir (the loop then prepares the snapshot's folder).
  writes_outputs = False

  def __init__(self, run):
    self.ctx = run  # the run_lib.Run: config, mesh, SDE, model, data, workdir

  @classmethod
  def enabled(cls, config) -> bool:
    raise NotImplementedError

  def run(self, state, outputs_dir: str) -> Dict[str, float]:
    raise NotImplementedError


def get_evaluators(run) -> List[Evaluator]:
  """The enabled evaluators of run.config, built (and so validated) before any checkpoint work."""
  return [EVALUATORS.get(name)(run) for name in EVALUATORS.names()
          if EVALUATORS.get(name).enabled(run.config)]


def eval_batches(run, split: str, **kw):
  """The split's evaluation batches, scaled and sharded: {'image', 'label', 'mask'} (global)."""
  for batch in datasets.get_dataset(run.config, split=split, evaluation=True, **kw):
    yield parallel.shard_batch(run.mesh, {'image': run.scaler(batch['image']).astype(np.float32),
                                          'label': batch['label'].astype(np.int32),
                                          'mask': batch['mask'].astype(np.float32)})


@EVALUATORS.register(name='loss')
class LossEvaluator(Evaluator):
  """{'loss'}: mean eval loss over one pass of the test split (padding masked out)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.enable_loss)

  def __init__(self, run):
    super().__init__(run)
    self.eval_step = training.get_eval_step(run.config, run.sde, run.model, mesh=run.mesh)

  def run(self, state, outputs_dir):
    total, count = 0., 0.
    for i, batch in enumerate(eval_batches(self.ctx, 'test')):
      rng = jax.random.fold_in(jax.random.PRNGKey(self.ctx.config.seed), i)
      weight = float(parallel.to_host(batch['mask']).sum())  # of the global batch
      total += float(self.eval_step(state, batch, rng)) * weight
      count += weight
    return {'loss': total / max(count, 1.)}


@EVALUATORS.register(name='bpd')
class BitsPerDimEvaluator(Evaluator):
  """{'bpd'}: bits/dim over the whole eval.bpd_dataset split, averaged over eval.bpd_num_repeats
  passes with fresh uniform dequantization noise each (the paper: 5 passes over CIFAR-10 test)."""

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.enable_bpd)

  def __init__(self, run):
    super().__init__(run)
    if run.data.is_image and not run.data.dequantized:
      logging.warning('data.uniform_dequantization is off: bits/dim of discrete data is not a '
                      'code length and can be negative.')
    self.likelihood_fn = likelihood.get_likelihood_fn(run.config, run.sde, run.model,
                                                      run.inverse_scaler, data_scaler=run.scaler)

  def run(self, state, outputs_dir):
    c = self.ctx.config
    # Several passes only make sense with fresh dequantization noise each time.
    repeats = int(c.eval.get('bpd_num_repeats', 1)) if self.ctx.data.dequantized else 1
    total, count, nfes, start = 0., 0., [], time.time()
    for repeat in range(repeats):
      for i, batch in enumerate(eval_batches(self.ctx, c.eval.bpd_dataset, dequant_seed=repeat)):
        rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), repeat * 100003 + i)
        bpd, _, nfe = self.likelihood_fn(rng, state.ema_params, batch['image'], state.model_state)
        bpd, mask = parallel.to_host((bpd, batch['mask']))  # of the global batch, every process
        total += float(np.sum(bpd * mask))
        count += float(mask.sum())
        nfes.append(int(nfe))
      logging.info('bits/dim pass %d/%d: %.4f so far (%d examples, mean NFE %.0f, %.0f s).',
                   repeat + 1, repeats, total / max(count, 1.), count, np.mean(nfes),
                   time.time() - start)
    return {'bpd': total / max(count, 1.)}


@EVALUATORS.register(name='samples')
class SampleQualityEvaluator(Evaluator):
  """eval.num_samples samples in rounds of eval.batch_size, each finished round saved (samples
  and features), so a crashed evaluation resumes at the next unfinished round; for image data
  {'fid', 'is', 'kid'} against the data's reference statistics (evaluation.reference_stats)."""
  writes_outputs = True

  @classmethod
  def enabled(cls, config) -> bool:
    return bool(config.eval.enable_sampling)

  def __init__(self, run):
    super().__init__(run)
    self.extractor = None
    if run.data.is_image:
      import evaluation
      # Missing Inception weights fail here, before any checkpoint work.
      self.extractor = evaluation.get_feature_extractor(run.config, run.workdir)
    batch = int(run.config.eval.batch_size)
    self.sampling_fn = sampling.get_sampling_fn(run.config, run.sde, run.model,
                                                run.data.batch_shape(batch), run.inverse_scaler,
                                                run.eps, mesh=run.mesh)

  def run(self, state, outputs_dir):
    feats = self._rounds(state, outputs_dir)
    if self.extractor is None:
      return {}
    import evaluation
    _, stats = evaluation.reference_stats(self.ctx.config, self.ctx.workdir, self.extractor,
                                          progress=self.ctx.is_main)
    return evaluation.compute_metrics(feats, stats, kid_subset_size=min(1000, len(feats['pool'])))

  def _rounds(self, state, outputs_dir) -> Dict[str, np.ndarray]:
    run, e = self.ctx, self.ctx.config.eval
    batch = int(e.batch_size)
    n_rounds = int(np.ceil(e.num_samples / batch))
    feats, start = [], time.time()
    keys = ('pool', 'logits') if self.extractor else ()
    for r in range(n_rounds):
      path = os.path.join(outputs_dir, f'round_{r}.npz')
      if not os.path.exists(path):
        samples, nfe = run.draw_samples(self.sampling_fn, state, 1_000_003 * (r + 1))
        logging.info('Sampling round %d/%d: %d samples, %d NFE (%.0f s).', r + 1, n_rounds, batch,
                     nfe, time.time() - start)
        out: Dict[str, Any] = {'samples': samples}
        if self.extractor is not None:
          out.update({k: np.asarray(v) for k, v in jax.device_get(self.extractor[1](samples)).items()})
        if run.is_main:
          if r == 0:
            outputs.save_samples(samples, outputs_dir)
          outputs.save_npz(path, **out)  # atomic: a round file is either complete or absent
        feats.append({k: out[k] for k in keys})
        continue
      with np.load(path) as f:
        feats.append({k: f[k] for k in keys})
    if not keys:
      return {}
    return {k: np.concatenate([f[k] for f in feats])[:e.num_samples] for k in keys}
