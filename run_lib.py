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
  data: datasets.DataInfo  # shape, image or vector, bit depth, scalers (the one data description)
  is_main: bool
  # Jitted functions built once per run (a new closure would recompile at every checkpoint).
  compiled: Dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def scaler(self):
    return self.data.scaler

  @property
  def inverse_scaler(self):
    return self.data.inverse_scaler

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


def _check_int(section: str, name: str, value, low: int, *, allowed=()) -> None:
  if value in allowed:
    return
  if isinstance(value, bool) or int(value) != value or value < low:
    extra = ''.join(f' or {a}' for a in allowed)
    raise ValueError(f'config.{section}.{name}={value!r} must be an integer >= {low}{extra}.')


def check_run_config(config) -> None:
  """Raises a ValueError naming the field on a bad training / evaluation schedule (no I/O)."""
  t, e = config.training, config.eval
  for name in ('n_iters', 'n_jitted_steps', 'snapshot_freq'):
    _check_int('training', name, t[name], 1)
  for name in ('log_freq', 'eval_freq', 'snapshot_freq_for_preemption'):  # 0: never
    _check_int('training', name, t[name], 0)
  _check_int('training', 'max_to_keep', t.get('max_to_keep', None), 1, allowed=(None,))
  for name in ('begin_ckpt', 'end_ckpt', 'ckpt'):  # None: the final / newest snapshot; -1: newest
    _check_int('eval', name, e.get(name, None), 1, allowed=(None, -1))
  for name in ('batch_size', 'num_samples'):
    _check_int('eval', name, e[name], 1)
  begin, end = (_resolve_ckpt(config, e.get(n, None), None) for n in ('begin_ckpt', 'end_ckpt'))
  if begin is not None and end is not None and begin > end:
    raise ValueError(f'config.eval.begin_ckpt={e.begin_ckpt} > config.eval.end_ckpt={e.end_ckpt} '
                     f'(snapshots {begin} > {end}; None means the final snapshot of '
                     f'config.training, {final_snapshot(config)}): nothing to evaluate.')


def snapshot_number(step: int, snapshot_freq: int) -> int:
  """The number of the snapshot (in <workdir>/checkpoints) that holds the state at `step`:
  snapshot i is step i * snapshot_freq, and the final state of a run whose n_iters is not a
  multiple of snapshot_freq is snapshot ceil(n_iters / snapshot_freq)."""
  return -(-int(step) // int(snapshot_freq))


def final_snapshot(config) -> int:
  """The last snapshot that training with this config writes."""
  return snapshot_number(config.training.n_iters, config.training.snapshot_freq)


def _resolve_ckpt(config, value: Optional[int], latest: Optional[int]) -> Optional[int]:
  """eval.begin_ckpt / end_ckpt as a snapshot number: None -> the final snapshot of the
  training config, -1 -> `latest` (the newest existing snapshot; None when there is none)."""
  if value is None:
    return final_snapshot(config)
  return latest if value == -1 else int(value)


def check_config(config) -> None:
  """Every check that needs neither I/O nor compilation: names, sizes, schedules."""
  sde_lib.get_sde(config)  # unknown SDE -> ValueError
  mutils.get_model(config.model.name)  # unknown model -> ValueError
  losses.get_optimizer(config)  # unknown optimizer -> ValueError
  datasets.dataset_info(config, count=False)  # unknown data set -> ValueError
  mutils.check_input_shape(config)  # image size vs the network -> ValueError
  sampling.check_sampling_config(config)  # unknown sampler names -> ValueError
  check_run_config(config)


def setup(config, workdir: str) -> Run:
  """Validates names and sizes, then builds the mesh, SDE, model and (replicated) initial state."""
  check_config(config)
  workdir = _check_workdir(workdir)
  sde, eps = sde_lib.get_sde(config)
  mesh = parallel.make_mesh()
  parallel.check_batch_size(config.training.batch_size, mesh, 'config.training.batch_size')
  parallel.check_batch_size(config.eval.batch_size, mesh, 'config.eval.batch_size')
  model, state = losses.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  return Run(config, workdir, mesh, sde, eps, model, state, datasets.dataset_info(config, count=False),
             jax.process_index() == 0)


def _sample_shape(run: Run, n: int):
  return run.data.batch_shape(n)


# ------------------------------------------------------------------------------------------------
# Outputs: metric log, TensorBoard, sample grids.


class MetricLog:
  """metrics.jsonl (one JSON object per logged step) plus TensorBoard events; process 0 writes."""

  def __init__(self, workdir: str, is_main: bool, resume_step: Optional[int] = None):
    self.is_main = is_main
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writer = None
    if is_main:
      if resume_step is not None:
        self._roll_back(resume_step)
      from clu import metric_writers
      self.writer = metric_writers.create_default_writer(os.path.join(workdir, 'tensorboard'),
                                                         asynchronous=False)

  def _roll_back(self, step: int) -> None:
    """Moves the lines logged after `step` (work lost in a kill since the checkpoint the run
    resumes from) to metrics.rolled_back.jsonl, so that metrics.jsonl has each step once."""
    if not os.path.exists(self.path):
      return
    with open(self.path) as f:
      lines = [l for l in f if l.strip()]
    later = [l for l in lines if json.loads(l)['step'] > step]
    if later:
      with open(self.path.replace('.jsonl', '.rolled_back.jsonl'), 'a') as f:
        f.writelines(later)
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(l for l in lines if json.loads(l)['step'] <= step)
      os.replace(tmp, self.path)

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
  mutils.check_input_shape(run.config, images.shape[2:])  # data vs network, before compiling
  return parallel.shard_batch(run.mesh, {'image': images}, leading_axes=1)


def _crossed(before: int, after: int, freq: int) -> bool:
  """Whether a multiple of `freq` lies in (before, after]."""
  return freq > 0 and after // freq > before // freq


def _chunk(step: int, t) -> int:
  """Steps in the next fused train_step call: n_jitted_steps, cut to end exactly at n_iters and
  at each snapshot step (multiples of snapshot_freq)."""
  return min(int(t.n_jitted_steps), int(t.n_iters) - step,
             int(t.snapshot_freq) - step % int(t.snapshot_freq))


def _managers(run: Run):
  """(checkpoints-meta, checkpoints): the resume checkpoints, by training step, and the
  snapshots that evaluate() sweeps, by snapshot number (snapshot_number)."""
  meta = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints-meta'),
                                    run.config.training.get('max_to_keep', 3), clean_tmp=True)
  snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'), clean_tmp=True)
  return meta, snapshots


def _non_finite_error(meta, losses_: np.ndarray, first: int) -> FloatingPointError:
  """The error that stops training on a non-finite loss, naming the checkpoint to resume from."""
  last_good = meta.latest_step()
  kept = (f'The last checkpoint (step {last_good}) stays in {meta.directory}'
          if last_good is not None else 'No checkpoint was saved before it')
  return FloatingPointError(
      f'Non-finite training loss {losses_.tolist()} at steps {first}..{first + len(losses_) - 1}; '
      f'stopping. {kept}; lower optim.lr or check the data.')


def train(config, workdir: str) -> Dict[str, Any]:
  """Trains from the latest good checkpoint (or from scratch) to exactly config.training.n_iters;
  saves on schedule and on SIGTERM. One training per workdir (checkpointing.WorkdirLock)."""
  check_config(config)
  with checkpointing.WorkdirLock(_check_workdir(workdir), 'training'):
    run = setup(config, workdir)
    meta, snapshots = _managers(run)
    run.state, resumed = checkpointing.restore_latest(meta, run.state)
    step = int(run.state.step)
    logging.info('%s at step %d.', 'Resuming' if resumed is not None else 'Starting', step)
    return _train_loop(run, meta, snapshots, step)


def _train_loop(run: Run, meta, snapshots, step: int) -> Dict[str, Any]:
  config, t = run.config, run.config.training
  optimizer = losses.get_optimizer(config)
  train_step = losses.get_step_fn(config, run.sde, run.model, optimizer, train=True, mesh=run.mesh)
  eval_step = losses.get_step_fn(config, run.sde, run.model, optimizer, train=False, mesh=run.mesh)
  train_iter = datasets.get_dataset(config, split='train', start_step=step)
  eval_iter = datasets.get_dataset(config, split='test', start_step=step // max(t.eval_freq, 1))
  sampling_fn = (sampling.get_sampling_fn(config, run.sde, run.model, _sample_shape(run, t.batch_size),
                                          run.inverse_scaler, run.eps, mesh=run.mesh)
                 if t.snapshot_sampling else None)
  log = MetricLog(run.workdir, run.is_main, resume_step=step)
  progress = _progress(run, step, t.n_iters)
  last_loss = float('nan')

  with checkpointing.TerminationFlag() as termination:
    # All hosts stop at the same step, even when SIGTERM reached only some of them.
    while step < t.n_iters and not parallel.any_process(termination.requested):
      before, n = step, _chunk(step, t)
      new_state, step_losses = train_step(run.state, _next_batches(run, train_iter, n))
      step_losses = np.asarray(jax.device_get(step_losses))
      if not np.all(np.isfinite(step_losses)):
        raise _non_finite_error(meta, step_losses, before + 1)
      run.state, step = new_state, before + n
      # Saved first: nothing that follows (logging, evaluation, sampling) can lose this state.
      if step == t.n_iters or _crossed(before, step, t.snapshot_freq_for_preemption):
        checkpointing.save(meta, step, run.state)
      last_loss = float(step_losses[-1])
      progress.update(n)
      if _crossed(before, step, t.log_freq):
        log.write(step, training_loss=last_loss)
        progress.set_postfix(loss=f'{last_loss:.4g}')
      if _crossed(before, step, t.eval_freq):
        eval_batch = parallel.shard_batch(run.mesh, {'image': run.scaler(next(eval_iter)['image'])})
        log.write(step, eval_loss=float(eval_step(run.state, eval_batch)))
      if step % t.snapshot_freq == 0 and step < t.n_iters:
        _snapshot(run, snapshots, sampling_fn, step)
    preempted = step < t.n_iters  # the loop only ends early on SIGTERM (on this host or another)
    if preempted and meta.latest_step() != step:
      checkpointing.save(meta, step, run.state)
  if not preempted:  # the final snapshot (kept as it is when a finished run is run again)
    _snapshot(run, snapshots, sampling_fn, step)
  progress.close()
  if preempted:
    logging.warning('SIGTERM received: saved step %d in %s and stopped.', step, meta.directory)
  return {'step': step, 'loss': last_loss, 'preempted': preempted}


def _snapshot(run: Run, snapshots, sampling_fn, step: int) -> None:
  """Saves snapshot snapshot_number(step) (what evaluate() sweeps), then samples if asked."""
  ckpt = snapshot_number(step, run.config.training.snapshot_freq)
  if not checkpointing.save(snapshots, ckpt, run.state, info={'step': step}):
    return  # already there: a finished run run again
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


def _done_ckpts(results_path: str) -> Dict[int, Dict[str, Any]]:
  """{ckpt: its latest result} from results.jsonl."""
  if not os.path.exists(results_path):
    return {}
  with open(results_path) as f:
    return {r['ckpt']: r for r in (json.loads(line) for line in f if line.strip())}


def _wait_for_snapshot(run: Run, snapshots, ckpt: int, timeout_s: float):
  """(state, '') of snapshot `ckpt`, waiting up to timeout_s for a training run to write it, or
  (None, why): 'missing', or what is wrong with a damaged one (skipped, never waited for)."""
  deadline, why = time.time() + timeout_s, 'missing'
  while True:
    if checkpointing.has_step(snapshots, ckpt):
      try:
        return checkpointing.restore(snapshots, ckpt, run.state), ''
      except checkpointing.CorruptCheckpointError as e:
        return None, str(e)
      except checkpointing.CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (still being written, or broken)
        why = f'unreadable ({type(e).__name__}: {str(e)[:300]})'
        logging.warning('Checkpoint %d not readable yet (%s).', ckpt, why)
    if parallel.any_process(time.time() >= deadline):
      return None, why
    time.sleep(min(10., max(deadline - time.time(), 0.)))


def _outputs_dir(run: Run, eval_dir: str, ckpt: int, step: int) -> str:
  """<eval_dir>/ckpt_<ckpt>, the sample rounds of snapshot `ckpt` at `step` with this config's
  sampling settings (see `_fresh_outputs`)."""
  c = run.config
  return _fresh_outputs(run, os.path.join(eval_dir, f'ckpt_{ckpt}'),
                        {'step': step, 'seed': c.seed, 'batch_size': c.eval.batch_size,
                         'sampling': c.sampling.to_dict()})


def _fresh_outputs(run: Run, path: str, key: Dict[str, Any]) -> str:
  """Creates the resumable output folder `path` for the outputs that `key` describes (recorded in
  its outputs_of.json); outputs found there of another key (a snapshot replaced when its run was
  extended, other sampling settings) are moved aside to <path>.replaced[.k], never reused."""
  marker = os.path.join(path, 'outputs_of.json')
  key = json.loads(json.dumps(key))
  if run.is_main:
    if os.path.exists(marker):
      with open(marker) as f:
        stale = json.load(f) != key
    else:  # absent: a new folder, or one written before markers (assumed to match)
      stale = False
    if stale:
      new, k = path + '.replaced', 1
      while os.path.exists(new):
        k += 1
        new = f'{path}.replaced.{k}'
      os.rename(path, new)
      logging.warning('Moved the outputs of another snapshot or setting aside: %s.', new)
    os.makedirs(path, exist_ok=True)
    with open(marker, 'w') as f:
      json.dump(key, f)
  checkpointing.barrier(f'outputs_{os.path.basename(path)}')
  return path


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
  if run.data.is_image and not run.data.dequantized:
    logging.warning('data.uniform_dequantization is off: bits/dim of discrete data is not a code '
                    'length and can be negative.')
  likelihood_fn = run.get('likelihood', lambda: likelihood.get_likelihood_fn(
      c, run.sde, run.model, run.inverse_scaler, data_scaler=run.scaler))
  # Several passes only make sense with fresh dequantization noise each time.
  repeats = int(c.eval.get('bpd_num_repeats', 1)) if run.data.dequantized else 1
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
      _save_npz(path, **out)  # atomic: a round file is either complete or absent
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
  """Evaluates snapshots eval.begin_ckpt..eval.end_ckpt of <workdir>/checkpoints (None: the final
  snapshot of config.training; -1: the newest existing one), waiting for unwritten ones up to
  eval.ckpt_timeout_s. Appends one JSON object per snapshot to <eval_folder>/results.jsonl and
  returns the results of the range (earlier ones included). One evaluation per folder
  (checkpointing.WorkdirLock). Raises FileNotFoundError, listing the snapshots that exist, when
  no snapshot of the range could be evaluated."""
  check_config(config)
  eval_dir = os.path.join(_check_workdir(workdir), eval_folder)
  os.makedirs(eval_dir, exist_ok=True)
  with checkpointing.WorkdirLock(eval_dir, 'evaluation'):
    run = setup(config, workdir)
    # Read only: never cleaned or written here (a training run may be writing it).
    snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
    existing = checkpointing.all_steps(snapshots)
    latest = existing[-1] if existing else None
    begin, end = (_resolve_ckpt(config, config.eval.get(n, None), latest)
                  for n in ('begin_ckpt', 'end_ckpt'))
    results = _evaluate_range(run, snapshots, eval_dir, begin, end)
    if not results:
      raise FileNotFoundError(_nothing_evaluated(run, snapshots, begin, end))
    return results


def _evaluate_range(run: Run, snapshots, eval_dir: str, begin: Optional[int],
                    end: Optional[int]) -> list:
  e = run.config.eval
  results_path = os.path.join(eval_dir, 'results.jsonl')
  done, results = _done_ckpts(results_path), []
  extractor = None
  if e.enable_sampling and run.data.is_image:
    import evaluation
    # Before any checkpoint work: missing Inception weights fail here, not after the first sweep.
    extractor = evaluation.get_feature_extractor(run.config, run.workdir)
  for ckpt in range(begin or 1, (end or 0) + 1):
    info = checkpointing.read_info(snapshots, ckpt) or {}
    if ckpt in done and 'step' in info and done[ckpt].get('step') == info['step']:
      logging.info('Checkpoint %d already evaluated in %s.', ckpt, results_path)
      results.append(done[ckpt])
      continue
    state, why = _wait_for_snapshot(run, snapshots, ckpt, float(e.get('ckpt_timeout_s', 0.)))
    if state is None and why == 'missing':
      logging.warning('Checkpoint %d did not appear in %s; stopping the sweep.', ckpt,
                      snapshots.directory)
      break
    if state is None:
      logging.warning('Skipping checkpoint %d: %s', ckpt, why)
      continue
    step = int(state.step)
    if ckpt in done and done[ckpt].get('step', step) == step:  # no manifest to tell beforehand
      results.append(done[ckpt])
      continue
    result = _evaluate_snapshot(run, state, ckpt, eval_dir, extractor)
    if run.is_main:
      with open(results_path, 'a') as f:
        f.write(json.dumps(result) + '\n')
      plots.eval_plots(eval_dir)
    results.append(result)
  return results


def _evaluate_snapshot(run: Run, state, ckpt: int, eval_dir: str, extractor) -> Dict[str, Any]:
  """{'ckpt', 'step'} and whichever of loss, bpd and sample quality config.eval enables."""
  e = run.config.eval
  step = int(state.step)
  result: Dict[str, Any] = {'ckpt': ckpt, 'step': step}
  if e.enable_loss:
    result['loss'] = _eval_loss(run, state)
  if e.enable_bpd:
    result['bpd'] = _bpd(run, state)
  if e.enable_sampling:
    result.update(_sample_quality(run, state, _outputs_dir(run, eval_dir, ckpt, step), extractor))
  logging.info('Checkpoint %d: %s', ckpt, result)
  return result


def _nothing_evaluated(run: Run, snapshots, begin: Optional[int], end: Optional[int]) -> str:
  t = run.config.training
  existing = checkpointing.all_steps(snapshots)
  steps = {s: (checkpointing.read_info(snapshots, s) or {}).get('step') for s in existing}
  listing = ', '.join(f'{s} (step {steps[s]})' if steps[s] is not None else str(s)
                      for s in existing) or 'none'
  wanted = f'{begin}..{end}' if begin is not None and end is not None else 'the newest'
  return (f'No snapshot evaluated: wanted snapshots {wanted}, but {snapshots.directory} holds '
          f'snapshots: {listing}. Snapshot i is the state at step i * snapshot_freq '
          f'({t.snapshot_freq}); training with this config ends at snapshot '
          f'{final_snapshot(run.config)} (n_iters={t.n_iters}). Choose existing snapshots with '
          f'--config.eval.begin_ckpt / --config.eval.end_ckpt (-1: the newest).')


# ------------------------------------------------------------------------------------------------
# Sampling from a checkpoint.


def sample(config, workdir: str, folder: str = 'samples_mode') -> Dict[str, Any]:
  """Draws config.eval.num_samples samples from snapshot config.eval.ckpt (None: the newest in
  <workdir>/checkpoints) with config.sampling (any method), in batches of config.eval.batch_size.

  Writes <workdir>/<folder>/ckpt_<N>/: batch_<i>.npz as each batch finishes (a rerun resumes at
  the first missing batch; outputs of other settings are moved aside), then samples.npz (all,
  in [0, 1] for images), sample.png (a grid of the first 64) and sampling.json (the settings,
  snapshot, step, NFE per sample and seconds). Returns the summary that sampling.json holds.
  Raises FileNotFoundError naming the snapshots that exist when the asked one does not."""
  check_config(config)
  workdir = _check_workdir(workdir)
  out_root = os.path.join(workdir, folder)
  os.makedirs(out_root, exist_ok=True)
  with checkpointing.WorkdirLock(out_root, 'sampling'):
    run = setup(config, workdir)
    snapshots = checkpointing.make_manager(os.path.join(run.workdir, 'checkpoints'))
    ckpt, state = _restore_snapshot(run, snapshots, config.eval.get('ckpt', None))
    e, step = config.eval, int(state.step)
    batch, n_batches = int(e.batch_size), int(np.ceil(e.num_samples / e.batch_size))
    out = _fresh_outputs(run, os.path.join(out_root, f'ckpt_{ckpt}'),
                         {'step': step, 'seed': config.seed, 'batch_size': batch,
                          'sampling': config.sampling.to_dict()})
    sampling_fn = sampling.get_sampling_fn(config, run.sde, run.model, _sample_shape(run, batch),
                                           run.inverse_scaler, run.eps, mesh=run.mesh)
    progress = _progress(run, 0, n_batches)
    progress.unit = 'batch'
    parts, nfes, seconds = [], [], 0.
    for i in range(n_batches):
      path = os.path.join(out, f'batch_{i}.npz')
      if not os.path.exists(path):
        start = time.time()
        samples, nfe = _draw_samples(run, sampling_fn, state.ema_params, batch, 7_000_003 * (i + 1))
        if run.is_main:
          _save_npz(path, samples=samples, nfe=nfe, seconds=time.time() - start)
        checkpointing.barrier(f'sample_batch_{i}')
      with np.load(path) as f:
        parts.append(f['samples'])
        nfes.append(int(f['nfe']))
        seconds += float(f['seconds'])
      progress.update(1)
    progress.close()
    samples = np.concatenate(parts)[:int(e.num_samples)]
    summary = {'ckpt': ckpt, 'step': step, 'num_samples': len(samples), 'batch_size': batch,
               'seed': config.seed, 'sampling': config.sampling.to_dict(),
               'nfe_per_sample': float(np.mean(nfes)), 'seconds': seconds, 'outputs': out}
    if run.is_main:
      _save_npz(os.path.join(out, 'samples.npz'), samples=samples)
      save_samples(samples[:64], out, 'sample')
      with open(os.path.join(out, 'sampling.json'), 'w') as f:
        json.dump(summary, f, indent=1, default=str)
    logging.info('Wrote %d samples of snapshot %d (step %d) to %s: %.1f NFE a sample, %.0f s.',
                 len(samples), ckpt, step, out, summary['nfe_per_sample'], seconds)
    return summary


def _save_npz(path: str, **arrays) -> None:
  """Writes an .npz atomically: a file that exists is complete."""
  tmp = path + '.tmp.npz'
  np.savez_compressed(tmp, **arrays)
  os.replace(tmp, path)


def _restore_snapshot(run: Run, snapshots, ckpt: Optional[int]):
  """(number, state) of snapshot `ckpt` (None or -1: the newest); FileNotFoundError naming the
  snapshots that exist when it is missing or unreadable."""
  existing = checkpointing.all_steps(snapshots)
  number = existing[-1] if ckpt in (None, -1) and existing else ckpt
  if number is not None and checkpointing.has_step(snapshots, number):
    return number, checkpointing.restore(snapshots, number, run.state)
  raise FileNotFoundError(f'Snapshot {ckpt if ckpt not in (None, -1) else "(the newest)"} is not in '
                          f'{snapshots.directory}; it holds: {existing or "none"}. Train first, '
                          f'import a released checkpoint (scripts/import_checkpoint.py), or pick one '
                          f'with --config.eval.ckpt=N.')
