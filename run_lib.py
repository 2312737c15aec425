"""Training, evaluation and sampling loops: the only place with I/O loops. Each loop reads as a
short list of named steps; everything numerical runs in jitted functions (training.py's steps,
evaluators.py's metrics, sampling.py's samplers); outputs.py writes the files."""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Dict, Iterator, Optional, Sequence, Tuple

import jax
import numpy as np
from absl import logging

import checkpointing
import controllable_run
import datasets
import evaluators as evaluators_lib
import outputs
import parallel
import plots
import sampling
import sde_lib
import training
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

  @property
  def scaler(self):
    return self.data.scaler

  @property
  def inverse_scaler(self):
    return self.data.inverse_scaler

  def draw_samples(self, sampling_fn, state, seed_offset: int, *args):
    """(samples on every process, nfe) from sampling_fn(rng, state's EMA params, *args,
    model_state=...) (args: e.g. a guided sampler's labels and scale); the rng is config.seed
    folded with seed_offset, so a batch is the same whenever it is drawn."""
    rng = jax.random.fold_in(jax.random.PRNGKey(self.config.seed), seed_offset)
    samples, nfe = sampling_fn(rng, state.ema_params, *args, model_state=state.model_state)
    return parallel.to_host(samples), int(nfe)


def sample_mode_seed(i: int) -> int:
  """The seed offset of batch i of `--mode sample` (and of guided samples: the same batches)."""
  return 7_000_003 * (i + 1)


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


def eval_range(config, existing: Sequence[int]) -> Tuple[Optional[int], Optional[int]]:
  """(begin, end): the snapshots eval.begin_ckpt..eval.end_ckpt that evaluation sweeps, given the
  snapshot numbers that exist (sorted). None -> the final snapshot of the training config;
  -1 -> the newest existing one (None when there is none)."""
  latest = existing[-1] if len(existing) else None
  begin, end = (_resolve_ckpt(config, config.eval.get(n, None), latest)
                for n in ('begin_ckpt', 'end_ckpt'))
  return begin, end


def check_config(config) -> None:
  """Every check that needs neither I/O nor compilation: names, sizes, schedules."""
  sde_lib.get_sde(config)  # unknown SDE -> ValueError
  mutils.get_model(config.model.name)  # unknown model -> ValueError
  training.get_optimizer(config)  # unknown optimizer -> ValueError
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
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  return Run(config, workdir, mesh, sde, eps, model, state, datasets.dataset_info(config, count=False),
             jax.process_index() == 0)


# ------------------------------------------------------------------------------------------------
# Training.


def _next_batches(run: Run, iterator: Iterator, n: int):
  """n host batches stacked to [n, B, ...], scaled, and sharded over the mesh's 'data' axis."""
  batches = [next(iterator) for _ in range(n)]
  images = np.stack([run.scaler(b['image']) for b in batches]).astype(np.float32)
  mutils.check_input_shape(run.config, images.shape[2:])  # data vs network, before compiling
  labels = np.stack([b['label'] for b in batches]).astype(np.int32)  # class-conditional nets
  return parallel.shard_batch(run.mesh, {'image': images, 'label': labels}, leading_axes=1)


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
  train_step = training.get_train_step(config, run.sde, run.model, training.get_optimizer(config),
                                       mesh=run.mesh)
  eval_step = training.get_eval_step(config, run.sde, run.model, mesh=run.mesh)
  train_iter = datasets.get_dataset(config, split='train', start_step=step)
  eval_iter = datasets.get_dataset(config, split='test', start_step=step // max(t.eval_freq, 1))
  sampling_fn = (sampling.get_sampling_fn(config, run.sde, run.model, run.data.batch_shape(t.batch_size),
                                          run.inverse_scaler, run.eps, mesh=run.mesh)
                 if t.snapshot_sampling else None)
  log = outputs.MetricLog(run.workdir, run.is_main, resume_step=step)
  progress = outputs.progress(run.is_main, t.n_iters, step)
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
        batch = next(eval_iter)
        eval_batch = parallel.shard_batch(run.mesh, {'image': run.scaler(batch['image']),
                                                     'label': batch['label'].astype(np.int32)})
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
    samples, nfe = run.draw_samples(sampling_fn, run.state, step)
    if run.is_main:
      path = outputs.save_samples(samples, os.path.join(run.workdir, 'samples', f'iter_{step}'))
      logging.info('Step %d: saved checkpoint %d and %d samples (%d NFE) to %s.', step, ckpt,
                   len(samples), nfe, path)


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
  """<eval_dir>/ckpt_<ckpt>, the outputs (sample rounds) of snapshot `ckpt` at `step` with this
  config's sampling settings (see `outputs.fresh_outputs`)."""
  c = run.config
  return outputs.fresh_outputs(os.path.join(eval_dir, f'ckpt_{ckpt}'),
                               {'step': step, 'seed': c.seed, 'batch_size': c.eval.batch_size,
                                'sampling': c.sampling.to_dict()}, run.is_main)


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
    begin, end = eval_range(config, checkpointing.all_steps(snapshots))
    results = _evaluate_range(run, snapshots, eval_dir, begin, end)
    if not results:
      raise FileNotFoundError(_nothing_evaluated(run, snapshots, begin, end))
    return results


def _evaluate_range(run: Run, snapshots, eval_dir: str, begin: Optional[int],
                    end: Optional[int]) -> list:
  e = run.config.eval
  results_path = os.path.join(eval_dir, 'results.jsonl')
  done, results = _done_ckpts(results_path), []
  evaluators = evaluators_lib.get_evaluators(run)  # set up (and validated) before checkpoint work
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
    result = _evaluate_snapshot(run, state, ckpt, eval_dir, evaluators)
    if run.is_main:
      with open(results_path, 'a') as f:
        f.write(json.dumps(result) + '\n')
      plots.eval_plots(eval_dir)
    results.append(result)
  return results


def _evaluate_snapshot(run: Run, state, ckpt: int, eval_dir: str, evaluators) -> Dict[str, Any]:
  """{'ckpt', 'step'} and the metrics of every enabled evaluator."""
  step = int(state.step)
  result: Dict[str, Any] = {'ckpt': ckpt, 'step': step}
  if any(ev.writes_outputs for ev in evaluators):
    out = _outputs_dir(run, eval_dir, ckpt, step)
  for evaluator in evaluators:
    result.update(evaluator.run(state, out if evaluator.writes_outputs else eval_dir))
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
  Raises FileNotFoundError naming the snapshots that exist when the asked one does not.
  Controllable tasks (config.sampling.task / guidance) go to controllable_run.sample."""
  if controllable_run.handles(config):
    return controllable_run.sample(config, workdir, folder)
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
    out = outputs.fresh_outputs(os.path.join(out_root, f'ckpt_{ckpt}'),
                                {'step': step, 'seed': config.seed, 'batch_size': batch,
                                 'sampling': config.sampling.to_dict()}, run.is_main)
    sampling_fn = sampling.get_sampling_fn(config, run.sde, run.model, run.data.batch_shape(batch),
                                           run.inverse_scaler, run.eps, mesh=run.mesh)
    progress = outputs.progress(run.is_main, n_batches, unit='batch')
    parts, nfes, seconds = [], [], 0.
    for i in range(n_batches):
      path = os.path.join(out, f'batch_{i}.npz')
      if not os.path.exists(path):
        start = time.time()
        samples, nfe = run.draw_samples(sampling_fn, state, sample_mode_seed(i))
        if run.is_main:
          outputs.save_npz(path, samples=samples, nfe=nfe, seconds=time.time() - start)
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
      outputs.save_npz(os.path.join(out, 'samples.npz'), samples=samples)
      outputs.save_samples(samples[:64], out, 'sample', npz=False)  # all are in samples.npz
      with open(os.path.join(out, 'sampling.json'), 'w') as f:
        json.dump(summary, f, indent=1, default=str)
    logging.info('Wrote %d samples of snapshot %d (step %d) to %s: %.1f NFE a sample, %.0f s.',
                 len(samples), ckpt, step, out, summary['nfe_per_sample'], seconds)
    return summary


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
