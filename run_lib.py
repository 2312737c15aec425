"""Training and evaluation loops: the only place with I/O loops. Each loop reads as a short list of
named steps; everything numerical runs in the jitted functions of losses / sampling / likelihood."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Iterator, Optional

import jax
import numpy as np
from absl import logging

import checkpointing
import datasets
import likelihood
import losses
import parallel
import plots
import sampling
import sde_lib
from models import utils as mutils


# ------------------------------------------------------------------------------------------------
# Set-up shared by train() and evaluate(): validated before any compilation.


@dataclasses.dataclass
class Run:
  """Everything a loop needs, built once from the config."""
  config: Any
  workdir: str
  mesh: Any
  sde: sde_lib.SDE
  eps: float
  model: Any
  state: Any
  scaler: Any
  inverse_scaler: Any
  is_main: bool
  # Jitted functions built once per run (a new closure would recompile at every checkpoint).
  compiled: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def get(self, name: str, build):
    """The function `name`, built by `build()` on first use."""
    if name not in self.compiled:
      self.compiled[name] = build()
    return self.compiled[name]


def _check_workdir(workdir: str) -> str:
  """Creates the workdir, or raises naming it when it cannot be written."""
  workdir = os.path.abspath(workdir)
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f'.write_test.{os.getpid()}')
    with open(probe, 'w') as f:
      f.write('ok')
    os.remove(probe)
  except OSError as e:
    raise ValueError(f'Workdir {workdir!r} is not writable ({e.strerror}); pass a writable --workdir.') from e
  return workdir


def setup(config, workdir: str) -> Run:
  """Validates names and sizes, then builds the mesh, SDE, model and (replicated) initial state."""
  workdir = _check_workdir(workdir)
  sde, eps = sde_lib.get_sde(config)  # unknown SDE -> ValueError
  mutils.get_model(config.model.name)  # unknown model -> ValueError
  losses.get_optimizer(config)  # unknown optimizer -> ValueError
  datasets.dataset_info(config)  # unknown data set -> ValueError
  sampling.check_sampling_config(config)  # unknown sampler names -> ValueError
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.training.batch_size, mesh, 'config.training.batch_size')
  parallel.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')
  model, state = losses.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  return Run(config, workdir, mesh, sde, eps, model, state, datasets.get_data_scaler(config),
             datasets.get_data_inverse_scaler(config), jax.process_index() == 0)


def _sample_shape(run: Run, n: int):
  return mutils.input_shape(run.config, n)


# ------------------------------------------------------------------------------------------------
# Outputs: metric log, TensorBoard, sample grids.


class MetricLog:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard events; process 0 writes."""

  def __init__(self, workdir: str, is_main: bool):
    self.is_main = is_main
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if is_main:
      from clu import metric_writers
      self.writer = metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard'),
                                                         asynchronous=False)

  def write(self, step: int, **scalars: float) -> None:
    if not self.is_main:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), **{k: float(v) for k, v in scalars.items()}}) + '\n')
    self.writer.write_scalars(int(step), scalars)
    self.writer.flush()


def save_samples(samples: np.ndarray, directory: str, name: str = 'sample') -> str:
  """Writes samples as <name>.npz and a PNG (an image grid, or a 2-D histogram for points)."""
  from PIL import Image
  os.makedirs(directory, exist_ok=True)
  samples = np.asarray(samples)
  np.savez_compressed(os.path.join(directory, f'{name}.npz'), samples=samples)
  if samples.ndim == 4:  # [B, H, W, C] images in [0, 1]
    b, h, w, c = samples.shape
    cols = int(np.ceil(np.sqrt(b)))
    rows = int(np.ceil(b / cols))
    grid = np.ones((rows * (h + 2) + 2, cols * (w + 2) + 2, c), np.float32)
    for i, img in enumerate(np.clip(samples, 0, 1)):
      r, col = divmod(i, cols)
      grid[2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = img
    scale = max(1, 256 // grid.shape[0])
    grid = np.kron(grid, np.ones((scale, scale, 1)))
    image = Image.fromarray((grid[..., 0] if c == 1 else grid).__mul__(255).round().astype(np.uint8))
  else:  # points: the first two coordinates as a 2-D histogram
    pts = samples.reshape(len(samples), -1)[:, :2]
    lim = np.abs(pts).max() * 1.05 + 1e-6
    hist, _, _ = np.histogram2d(pts[:, 1], pts[:, 0], bins=256, range=[[-lim, lim], [-lim, lim]])
    image = Image.fromarray((255 * (1 - hist[::-1] / max(hist.max(), 1))).astype(np.uint8))
  path = os.path.join(directory, f'{name}.png')
  image.save(path)
  return path


def _draw_samples(run: Run, sampling_fn, params, n: int, seed_offset: int):
  rng = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), seed_offset)
  samples, nfe = sampling_fn(rng, params, run.state.model_state)
  return parallel.to_host(samples), int(nfe)  # every process gets all samples


# ------------------------------------------------------------------------------------------------
# Training.


def _next_batches(run: Run, iterator: Iterator, n: int):
  """n host batches stacked to [n, B, ...], scaled, and sharded over the mesh's 'data' axis."""
  images = np.stack([run.scaler(next(iterator)['image']) for _ in range(n)]).astype(np.float32)
  return parallel.shard_batch(run.mesh, {'image': images}, leading_axes=1)


def _crossed(before: int, after: int, freq: int) -> bool:
  """Whether a multiple of `freq` lies in (before, after]."""
  return freq > 0 and after // freq > before // freq


def train(config, workdir: str) -> Dict[str, Any]:
  """Trains from the latest checkpoint (or from scratch); saves on schedule and on SIGTERM."""
  run = setup(config, workdir)
  t = config.training
  meta = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints-meta'),
                                    t.get('max_to_keep', 3))
  snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
  run.state, resumed = checkpointing.restore_latest(meta, run.state)
  step = int(run.state.step)
  logging.info('%s at step %d.', 'Resuming' if resumed is not None else 'Starting', step)

  optimizer = losses.get_optimizer(config)
  train_step = losses.get_step_fn(config, run.sde, run.model, optimizer, train=True, mesh=run.mesh)
  eval_step = losses.get_step_fn(config, run.sde, run.model, optimizer, train=False, mesh=run.mesh)
  train_iter = datasets.get_dataset(config, split='train', start_step=step)
  eval_iter = datasets.get_dataset(config, split='test', start_step=step // max(t.eval_freq, 1))
  sampling_fn = (sampling.get_sampling_fn(config, run.sde, run.model, _sample_shape(run, t.batch_size),
                                          run.inverse_scaler, run.eps, mesh=run.mesh)
                 if t.snapshot_sampling else None)
  log = MetricLog(run.workdir, run.is_main)
  progress = _progress(run, step, t.n_iters)
  n = int(t.n_jitted_steps)
  last_loss = float('nan')

  with checkpointing.TerminationFlag() as termination:
    # All hosts stop at the same step, even when SIGTERM reached only some of them.
    while step < t.n_iters and not parallel.any_process(termination.requested):
      before = step
      new_state, step_losses = train_step(run.state, _next_batches(run, train_iter, n))
      step_losses = np.asarray(jax.device_get(step_losses))
      if not np.all(np.isfinite(step_losses)):
        last_good = meta.latest_step()
        raise FloatingPointError(
            f'Non-finite training loss {step_losses.tolist()} at steps {before + 1}..{before + n}; '
            f'stopping. The last good checkpoint (step {last_good}) stays in '
            f'{os.path.join(run.workdir, "checkpoints-meta")}; lower optim.lr or check the data.')
      run.state, step = new_state, before + n
      last_loss = float(step_losses[-1])
      progress.update(n)
      if _crossed(before, step, t.log_freq):
        log.write(step, training_loss=last_loss)
        progress.set_postfix(loss=f'{last_loss:.4g}')
      if _crossed(before, step, t.eval_freq):
        eval_batch = parallel.shard_batch(run.mesh, {'image': run.scaler(next(eval_iter)['image'])})
        log.write(step, eval_loss=float(eval_step(run.state, eval_batch)))
      if _crossed(before, step, t.snapshot_freq_for_preemption):
        checkpointing.save(meta, step, run.state)
      if _crossed(before, step, t.snapshot_freq) or step >= t.n_iters:
        _snapshot(run, snapshots, sampling_fn, step)
    if meta.latest_step() != step:  # the final or preempted state, unless just saved
      checkpointing.save(meta, step, run.state)
  progress.close()
  preempted = step < t.n_iters  # the loop only ends early on SIGTERM (on this host or another)
  if preempted:
    logging.warning('SIGTERM received: saved step %d in %s and stopped.', step, meta.directory)
  return {'step': step, 'loss': last_loss, 'preempted': preempted}


def _snapshot(run: Run, snapshots, sampling_fn, step: int) -> None:
  """Saves snapshot number step // snapshot_freq (what evaluate() sweeps), and samples if asked."""
  ckpt = max(step // max(run.config.training.snapshot_freq, 1), 1)
  checkpointing.save(snapshots, ckpt, run.state)
  if run.is_main:
    plots.training_plots(run.workdir)
  if sampling_fn is not None:
    samples, nfe = _draw_samples(run, sampling_fn, run.state.ema_params, 0, step)
    if run.is_main:
      path = save_samples(samples, os.path.join(run.workdir, 'samples', f'iter_{step}'))
      logging.info('Step %d: saved checkpoint %d and %d samples (%d NFE) to %s.', step, ckpt,
                   len(samples), nfe, path)


def _progress(run: Run, step: int, total: int):
  from tqdm import tqdm
  return tqdm(total=total, initial=step, disable=not run.is_main, unit='step', dynamic_ncols=True)


# ------------------------------------------------------------------------------------------------
# Evaluation.


def _done_ckpts(results_path: str) -> set:
  if not os.path.exists(results_path):
    return set()
  with open(results_path) as f:
    return {json.loads(line)['ckpt'] for line in f if line.strip()}


def _wait_for_snapshot(run: Run, snapshots, ckpt: int, timeout_s: float):
  """Restores snapshot `ckpt`, waiting up to timeout_s for a training run to write it."""
  deadline = time.time() + timeout_s
  while True:
    snapshots.reload()
    if ckpt in snapshots.all_steps():
      try:
        return checkpointing.restore(snapshots, ckpt, run.state)
      except Exception as e:  # pylint: disable=broad-except  (still being written, or broken)
        logging.warning('Checkpoint %d not readable yet (%s).', ckpt, e)
    if time.time() >= deadline:
      return None
    time.sleep(min(10., max(deadline - time.time(), 0.)))


def _eval_loss(run: Run, state) -> float:
  """Mean eval loss over one pass of the test split (padding masked out)."""
  eval_step = run.get('eval_step', lambda: losses.get_step_fn(
      run.config, run.sde, run.model, losses.get_optimizer(run.config), train=False, mesh=run.mesh))
  total, count = 0., 0.
  for i, batch in enumerate(datasets.get_dataset(run.config, split='test', evaluation=True)):
    sharded = parallel.shard_batch(run.mesh, {'image': run.scaler(batch['image']),
                                              'mask': batch['mask'].astype(np.float32)})
    rng = jax.random.fold_in(jax.random.PRNGKey(run.config.seed), i)
    weight = float(parallel.to_host(sharded['mask']).sum())  # of the global batch
    total += float(eval_step(state, sharded, rng)) * weight
    count += weight
  return total / max(count, 1.)


def _bpd(run: Run, state) -> float:
  """Bits/dim over the whole bpd_dataset split, averaged over eval.bpd_num_repeats passes with
  fresh uniform dequantization noise each (the paper: 5 passes over the CIFAR-10 test set)."""
  c = run.config
  if not c.data.get('dim', None) and not c.data.uniform_dequantization:
    logging.warning('data.uniform_dequantization is off: bits/dim of discrete data is not a code '
                    'length and can be negative.')
  likelihood_fn = run.get('likelihood', lambda: likelihood.get_likelihood_fn(
      c, run.sde, run.model, run.inverse_scaler, data_scaler=run.scaler))
  # Several passes only make sense with fresh dequantization noise each time.
  repeats = int(c.eval.get('bpd_num_repeats', 1)) if c.data.uniform_dequantization else 1
  total, count, nfes, start = 0., 0., [], time.time()
  for repeat in range(repeats):
    for i, batch in enumerate(datasets.get_dataset(c, split=c.eval.bpd_dataset, evaluation=True,
                                                   dequant_seed=repeat)):
      x, mask = parallel.shard_batch(run.mesh, (run.scaler(batch['image']).astype(np.float32),
                                                batch['mask'].astype(np.float32)))
      rng = jax.random.fold_in(jax.random.PRNGKey(c.seed), repeat * 100003 + i)
      bpd, _, nfe = likelihood_fn(rng, state.ema_params, x, state.model_state)
      bpd, mask = parallel.to_host((bpd, mask))  # of the global batch, on every process
      total += float(np.sum(bpd * mask))
      count += float(mask.sum())
      nfes.append(int(nfe))
    logging.info('bits/dim pass %d/%d: %.4f so far (%d examples, mean NFE %.0f, %.0f s).',
                 repeat + 1, repeats, total / max(count, 1.), count, np.mean(nfes),
                 time.time() - start)
  return total / max(count, 1.)


def _sample_rounds(run: Run, state, ckpt_dir: str, extractor) -> Dict[str, np.ndarray]:
  """eval.num_samples samples in rounds of eval.batch_size; each finished round is saved
  (samples and features), so a crashed evaluation resumes at the next unfinished round."""
  c = run.config
  batch = int(c.eval.batch_size)
  n_rounds = int(np.ceil(c.eval.num_samples / batch))
  sampling_fn = run.get('sampling', lambda: sampling.get_sampling_fn(
      c, run.sde, run.model, _sample_shape(run, batch), run.inverse_scaler, run.eps, mesh=run.mesh))
  feats, start = [], time.time()
  for r in range(n_rounds):
    path = os.path.join(ckpt_dir, f'round_{r}.npz')
    if os.path.exists(path):
      with np.load(path) as f:
        feats.append({k: f[k] for k in ('pool', 'logits')} if extractor else {})
      continue
    samples, nfe = _draw_samples(run, sampling_fn, state.ema_params, batch, 1_000_003 * (r + 1))
    logging.info('Sampling round %d/%d: %d samples, %d NFE (%.0f s).', r + 1, n_rounds, batch, nfe,
                 time.time() - start)
    out = {'samples': samples}
    if extractor is not None:
      out.update({k: np.asarray(v) for k, v in jax.device_get(extractor[1](samples)).items()})
    if run.is_main:
      if r == 0:
        save_samples(samples, ckpt_dir)
      tmp = path + '.tmp.npz'
      np.savez_compressed(tmp, **out)
      os.replace(tmp, path)  # atomic: a round file is either complete or absent
    feats.append({k: out[k] for k in ('pool', 'logits')} if extractor else {})
  if not extractor:
    return {}
  return {k: np.concatenate([f[k] for f in feats])[:c.eval.num_samples] for k in ('pool', 'logits')}


def _sample_quality(run: Run, state, ckpt_dir: str, extractor) -> Dict[str, float]:
  """FID / IS / KID of the samples against the data statistics (cached in the workdir); for
  vector data (no extractor) the samples only."""
  import evaluation
  c = run.config
  if extractor is None:
    _sample_rounds(run, state, ckpt_dir, None)
    return {}
  feats = _sample_rounds(run, state, ckpt_dir, extractor)
  _, stats = evaluation.reference_stats(c, run.workdir, extractor, progress=run.is_main)
  return evaluation.compute_metrics(feats, stats, kid_subset_size=min(1000, len(feats['pool'])))


def evaluate(config, workdir: str, eval_folder: str = 'eval') -> list:
  """Evaluates snapshots begin_ckpt..end_ckpt (waiting for unwritten ones up to
  eval.ckpt_timeout_s); appends one JSON object per checkpoint to <eval_folder>/results.jsonl."""
  run = setup(config, workdir)
  e = config.eval
  eval_dir = os.path.join(run.workdir, eval_folder)
  os.makedirs(eval_dir, exist_ok=True)
  results_path = os.path.join(eval_dir, 'results.jsonl')
  snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
  done, results = _done_ckpts(results_path), []
  extractor = None
  if e.enable_sampling and not config.data.get('dim', None):
    import evaluation
    # Before any checkpoint work: missing Inception weights fail here, not after the first sweep.
    extractor = evaluation.get_feature_extractor(config, run.workdir)
  for ckpt in range(int(e.begin_ckpt), int(e.end_ckpt) + 1):
    if ckpt in done:
      logging.info('Checkpoint %d already evaluated in %s.', ckpt, results_path)
      continue
    state = _wait_for_snapshot(run, snapshots, ckpt, float(e.get('ckpt_timeout_s', 0.)))
    if state is None:
      logging.warning('Checkpoint %d did not appear in %s; stopping the sweep.', ckpt,
                      snapshots.directory)
      break
    result: Dict[str, Any] = {'ckpt': ckpt, 'step': int(state.step)}
    if e.enable_loss:
      result['loss'] = _eval_loss(run, state)
    if e.enable_bpd:
      result['bpd'] = _bpd(run, state)
    if e.enable_sampling:
      result.update(_sample_quality(run, state, os.path.join(eval_dir, f'ckpt_{ckpt}'), extractor))
    logging.info('Checkpoint %d: %s', ckpt, result)
    if run.is_main:
      with open(results_path, 'a') as f:
        f.write(json.dumps(result) + '\n')
      plots.eval_plots(eval_dir)
    results.append(result)
  return results
