"""End to end: main.py on a toy config, exact resume after SIGTERM, checkpoint fallback, NaN stop,
bad input, and an evaluation that resumes at its unfinished sampling round."""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpointing
import run_lib
from configs.toy import vp_ring2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config.training.batch_size=64', '--config.training.log_freq=5',
        '--config.training.eval_freq=1000', '--config.training.snapshot_freq=1000',
        '--config.training.snapshot_freq_for_preemption=1000', '--config.training.snapshot_sampling=False',
        '--config.model.num_scales=50', '--config.model.nf=32']


def tiny_config(**training):
  config = vp_ring2d.get_config()
  for flag in TINY:
    key, value = flag[len('--config.'):].split('=')
    section, name = key.split('.')
    config[section][name] = type(config[section][name])(eval(value))  # noqa: S307 (test literals)
  config.training.update(training)
  config.eval.update(batch_size=10000, num_samples=200, bpd_num_repeats=1, begin_ckpt=1, end_ckpt=1)
  return config


def _main(workdir, *args, wait=True):
  cmd = [sys.executable, os.path.join(ROOT, 'main.py'), '--config',
         os.path.join(ROOT, 'configs/toy/vp_ring2d.py'), '--workdir', str(workdir), *TINY, *args]
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  if wait:
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out
  return proc


def _final_params(workdir):
  config = tiny_config()
  run = run_lib.setup(config, str(workdir))
  manager = checkpointing.make_manager(os.path.join(workdir, 'checkpoints-meta'))
  state, step = checkpointing.restore_latest(manager, run.state)
  return step, state.params


def test_main_trains_and_evaluates_toy(tmp_path):
  # The last step is also a preemption checkpoint step: the final save must not write it twice.
  out = _main(tmp_path, '--mode=train', '--config.training.n_iters=20', '--config.training.snapshot_freq=10',
              '--config.training.snapshot_freq_for_preemption=10')
  assert 'train: step 20' in out
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [5, 10, 15, 20] and all(np.isfinite(l['training_loss']) for l in lines)
  out = _main(tmp_path, '--mode=eval', '--config.eval.batch_size=10000', '--config.eval.begin_ckpt=1',
              '--config.eval.end_ckpt=2', '--config.eval.enable_sampling=False', '--config.eval.bpd_num_repeats=1')
  results = [json.loads(l) for l in open(tmp_path / 'eval' / 'results.jsonl')]
  assert [r['ckpt'] for r in results] == [1, 2]
  assert all(np.isfinite(r['bpd']) and np.isfinite(r['loss']) for r in results)


def test_resume_after_sigterm_is_exact(tmp_path):
  straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
  n = '--config.training.n_iters=300'
  _main(straight, '--mode=train', n)
  proc = _main(resumed, '--mode=train', n, wait=False)
  metrics = resumed / 'metrics.jsonl'
  deadline = time.time() + 300
  while not (metrics.exists() and metrics.read_text().strip()) and proc.poll() is None:
    assert time.time() < deadline
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 0, out[-2000:]
  assert 'stopped by SIGTERM' in out, 'the run finished before SIGTERM arrived'
  stopped_at, _ = _final_params(resumed)
  assert 0 < stopped_at < 300
  out = _main(resumed, '--mode=train', n)
  assert 'train: step 300' in out
  (s1, p1), (s2, p2) = _final_params(straight), _final_params(resumed)
  assert s1 == s2 == 300
  for a, b in zip(jax.tree_util.tree_leaves(p1), jax.tree_util.tree_leaves(p2)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_half_written_checkpoint_is_skipped(tmp_path):
  manager = checkpointing.make_manager(str(tmp_path / 'ckpt'))
  state = {'w': jnp.arange(4.), 'step': jnp.array(1)}
  checkpointing.save(manager, 1, state)
  checkpointing.save(manager, 2, {'w': jnp.arange(4.) * 2, 'step': jnp.array(2)})
  # A kill in the middle of writing step 2 leaves its array data incomplete.
  for root, _, files in os.walk(tmp_path / 'ckpt' / '2'):
    for f in files:
      if f not in ('_CHECKPOINT_METADATA',):
        os.remove(os.path.join(root, f))
  with pytest.warns(UserWarning, match='Checkpoint step 2 .* incomplete or unreadable'):
    restored, step = checkpointing.restore_latest(checkpointing.make_manager(str(tmp_path / 'ckpt')), state)
  assert step == 1
  np.testing.assert_array_equal(restored['w'], np.arange(4.))


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  config = tiny_config(n_iters=50, snapshot_freq_for_preemption=5)
  real = run_lib._next_batches
  calls = []

  def poisoned(run, iterator, n):
    calls.append(1)
    batch = real(run, iterator, n)
    return jax.tree_util.tree_map(lambda x: x * jnp.nan, batch) if len(calls) > 2 else batch

  monkeypatch.setattr(run_lib, '_next_batches', poisoned)
  with pytest.raises(FloatingPointError, match=r'Non-finite training loss.*steps 11\.\.15.*step 10'):
    run_lib.train(config, str(tmp_path))
  manager = checkpointing.make_manager(str(tmp_path / 'checkpoints-meta'))
  assert manager.latest_step() == 10


def test_bad_input(tmp_path):
  config = tiny_config()
  config.data.dataset = 'imagenet64'
  with pytest.raises(ValueError, match="imagenet64"):
    run_lib.setup(config, str(tmp_path))
  config = tiny_config()
  config.training.sde = 'vpsdee'
  with pytest.raises(ValueError, match=r"Unknown SDE 'vpsdee'"):
    run_lib.setup(config, str(tmp_path))
  config = tiny_config()
  config.model.name = 'unet9000'
  with pytest.raises(ValueError, match=r"Unknown model 'unet9000'; valid choices"):
    run_lib.setup(config, str(tmp_path))
  config = tiny_config()
  config.optim.optimizer = 'SGDW'
  with pytest.raises(ValueError, match='SGDW'):
    run_lib.setup(config, str(tmp_path))
  config = tiny_config()
  config.sampling.corrector = 'langevine'
  with pytest.raises(ValueError, match=r"Unknown corrector 'langevine'; valid choices"):
    run_lib.setup(config, str(tmp_path))
  blocker = tmp_path / 'a_file'
  blocker.write_text('x')
  with pytest.raises(ValueError, match=r'Workdir .*a_file/run.* is not writable'):
    run_lib.setup(tiny_config(), str(blocker / 'run'))


def test_evaluation_resumes_at_unfinished_round(tmp_path):
  config = tiny_config(n_iters=10)
  run_lib.train(config, str(tmp_path))
  config.eval.update(enable_loss=False, enable_bpd=False, enable_sampling=True, batch_size=100,
                     num_samples=200)
  config.sampling.update(method='ode')
  run_lib.evaluate(config, str(tmp_path))
  ckpt_dir = tmp_path / 'eval' / 'ckpt_1'
  first = (ckpt_dir / 'round_0.npz').stat().st_mtime_ns
  # Simulate a crash after round 0: round 1 and the result line never got written.
  os.remove(ckpt_dir / 'round_1.npz')
  os.remove(tmp_path / 'eval' / 'results.jsonl')
  results = run_lib.evaluate(config, str(tmp_path))
  assert [r['ckpt'] for r in results] == [1]
  assert (ckpt_dir / 'round_0.npz').stat().st_mtime_ns == first  # not redone
  assert (ckpt_dir / 'round_1.npz').exists()


def test_missing_inception_weights_fail_before_any_checkpoint_work(tmp_path):
  from configs.digits import vp_ddpmpp_continuous
  config = vp_ddpmpp_continuous.get_config()
  config.eval.update(enable_loss=False, enable_bpd=False, enable_sampling=True,
                     feature_extractor='inception', inception_weights=str(tmp_path / 'none.npz'))
  # No checkpoint exists: without the early check the sweep would stop quietly at ckpt 1.
  with pytest.raises(FileNotFoundError, match='none.npz'):
    run_lib.evaluate(config, str(tmp_path))
