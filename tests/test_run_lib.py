"""End to end: main.py on a toy config, exact resume after SIGTERM, checkpoint fallback, NaN stop,
bad input, an evaluation that resumes at its unfinished sampling round; saves that never collide,
damaged or foreign checkpoints, one writer per workdir."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpointing
import datasets
import outputs
import run_lib
from configs.toy import vp_ring2d
from models import utils as mutils
from tests.test_checkpointing import FAULTS, _tree

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
  # 22 steps in fused chunks of 5 (the toy default): stops exactly at 22, not 25. Step 20 is both
  # a snapshot and a preemption checkpoint; the final step 22 is snapshot 3.
  n = ['--config.training.n_iters=22', '--config.training.snapshot_freq=10']
  out = _main(tmp_path, '--mode=train', *n, '--config.training.snapshot_freq_for_preemption=10')
  assert 'train: step 22' in out
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert [l['step'] for l in lines] == [5, 10, 15, 20] and all(np.isfinite(l['training_loss']) for l in lines)
  assert _steps(tmp_path) == [10, 20, 22]
  # end_ckpt left at its default: the final snapshot of the training config (3, step 22).
  out = _main(tmp_path, '--mode=eval', *n, '--config.eval.batch_size=10000',
              '--config.eval.begin_ckpt=2', '--config.eval.enable_sampling=False',
              '--config.eval.bpd_num_repeats=1')
  results = [json.loads(l) for l in open(tmp_path / 'eval' / 'results.jsonl')]
  assert [(r['ckpt'], r['step']) for r in results] == [(2, 20), (3, 22)]
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


# ------------------------------------------------------------------------------------------------
# Saves that never collide; damaged, foreign and shared workdirs. One uninterrupted tiny run (the
# module fixture) is the reference: 8 steps, a resume checkpoint at every step (the last 6 kept:
# 3..8), snapshots every 4 (1: step 4, 2: step 8).


def ref_config(**training):
  return tiny_config(**{'n_iters': 8, 'n_jitted_steps': 1, 'snapshot_freq': 4,
                        'snapshot_freq_for_preemption': 1, 'max_to_keep': 6, **training})


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('trained')
  run_lib.train(ref_config(), str(workdir))
  return workdir


@pytest.fixture
def workdir(trained, tmp_path):
  """A private copy of the reference run."""
  shutil.copytree(trained, tmp_path / 'run')
  return tmp_path / 'run'


def _steps(workdir, folder='checkpoints-meta'):
  return checkpointing.all_steps(checkpointing.make_manager(str(workdir / folder)))


def _params(workdir, step):
  like = run_lib.setup(ref_config(), str(workdir)).state
  manager = checkpointing.make_manager(str(workdir / 'checkpoints-meta'))
  return checkpointing.restore(manager, step, like).params


def _assert_same_params(workdir, reference, step):
  for a, b in zip(jax.tree_util.tree_leaves(_params(workdir, step)),
                  jax.tree_util.tree_leaves(_params(reference, step))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_final_step_snapshot_then_extension_saves_everything(trained, tmp_path):
  # The run: 6 steps, snapshots every 4, the final step snapshotted too (it used to die
  # with StepAlreadyExistsError after training, losing the final state).
  config = ref_config(n_iters=6, snapshot_freq_for_preemption=1000)
  assert run_lib.train(config, str(tmp_path))['step'] == 6
  assert _steps(tmp_path) == [6] and _steps(tmp_path, 'checkpoints') == [1, 2]
  # Evaluable, and by default the final snapshot of this config is evaluated (2, step 6).
  config.eval.update(begin_ckpt=None, end_ckpt=None, enable_bpd=False, enable_sampling=False)
  assert [(r['ckpt'], r['step']) for r in run_lib.evaluate(config, str(tmp_path))] == [(2, 6)]
  # Extending the finished run to 8 steps: snapshot 2 becomes step 8 (step 6 kept aside), and
  # the parameters are bit-identical to the uninterrupted run's.
  assert run_lib.train(ref_config(snapshot_freq_for_preemption=1000), str(tmp_path))['step'] == 8
  assert _steps(tmp_path) == [6, 8] and _steps(tmp_path, 'checkpoints') == [1, 2]
  assert os.path.isdir(tmp_path / 'checkpoints' / '2.replaced')
  _assert_same_params(tmp_path, trained, 8)
  # -1: the newest snapshot; re-evaluated, as it now holds another step.
  config = ref_config()
  config.eval.update(begin_ckpt=-1, end_ckpt=-1, enable_bpd=False, enable_sampling=False)
  assert [(r['ckpt'], r['step']) for r in run_lib.evaluate(config, str(tmp_path))] == [(2, 8)]


def test_damaged_checkpoints_fall_back_and_resume_exactly(trained, workdir):
  # Steps 8..4 damaged in each way (8, the latest, by one flipped bit): the run falls back to 3.
  meta = workdir / 'checkpoints-meta'
  assert _steps(workdir) == [3, 4, 5, 6, 7, 8]
  damaged = {}
  for fault, step in zip(FAULTS, (8, 7, 6, 5, 4)):
    fault(str(meta / str(step)))
    damaged[step] = _tree(meta / str(step))
  # A save killed midway (kill -9) leaves a temporary folder: cleaned on start.
  os.makedirs(meta / '9.orbax-checkpoint-tmp-1700000000' / 'default')
  with pytest.warns(UserWarning, match='Checkpoint step 8 .* damaged') as warned:
    assert run_lib.train(ref_config(), str(workdir))['step'] == 8
  assert sum('damaged, incomplete or unreadable' in str(w.message) for w in warned) == 5
  for step, files in damaged.items():  # kept byte for byte, and the step saved again
    assert _tree(meta / f'{step}.damaged') == files
  assert sorted(os.listdir(meta)) == sorted([str(s) for s in range(3, 9)] +
                                            [f'{s}.damaged' for s in damaged])
  _assert_same_params(workdir, trained, 8)


def test_eval_outputs_of_a_replaced_snapshot_are_moved_aside(tmp_path):
  run = types.SimpleNamespace(config=tiny_config(), is_main=True)
  first = run_lib._outputs_dir(run, str(tmp_path), 2, 6)
  (tmp_path / 'ckpt_2' / 'round_0.npz').write_text('samples of step 6')
  assert run_lib._outputs_dir(run, str(tmp_path), 2, 6) == first  # the same snapshot: reused
  assert (tmp_path / 'ckpt_2' / 'round_0.npz').exists()
  run_lib._outputs_dir(run, str(tmp_path), 2, 8)  # snapshot 2 now holds step 8
  assert (tmp_path / 'ckpt_2.replaced' / 'round_0.npz').read_text() == 'samples of step 6'
  assert not (tmp_path / 'ckpt_2' / 'round_0.npz').exists()
  run.config.sampling.method = 'ode'  # other sampling settings: not reused either
  run_lib._outputs_dir(run, str(tmp_path), 2, 8)
  assert (tmp_path / 'ckpt_2.replaced.2').is_dir()


def test_checkpoints_of_another_model_are_refused_untouched(workdir):
  before = _tree(workdir)
  config = ref_config()
  config.model.nf = 64
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'does not match this config: .*\(32,\) float32 in the checkpoint, '
                           r'\(64,\) float32 in this config'):
    run_lib.train(config, str(workdir))
  assert _tree(workdir) == before


def test_second_trainer_is_refused(workdir):
  with checkpointing.WorkdirLock(str(workdir), 'training'):
    with pytest.raises(checkpointing.WorkdirBusyError, match='in use by another training run'):
      run_lib.train(ref_config(), str(workdir))


def test_eval_of_missing_snapshots_fails_naming_what_exists(workdir):
  config = ref_config()
  config.eval.update(begin_ckpt=3, end_ckpt=3)
  with pytest.raises(FileNotFoundError, match=r'holds snapshots: 1 \(step 4\), 2 \(step 8\)'):
    run_lib.evaluate(config, str(workdir))
  # A shortened digits run: the default range follows n_iters (snapshot 1, not 3).
  from configs.digits import vp_ddpmpp_continuous
  digits = vp_ddpmpp_continuous.get_config()
  assert digits.eval.begin_ckpt is None and digits.eval.end_ckpt is None
  assert run_lib.final_snapshot(digits) == 3
  digits.training.n_iters = 200
  assert run_lib.final_snapshot(digits) == 1


def test_non_finite_message_without_checkpoint(tmp_path):
  meta = checkpointing.make_manager(str(tmp_path / 'meta'))
  error = run_lib._non_finite_error(meta, np.array([np.nan]), 1)
  assert 'No checkpoint was saved before it' in str(error) and 'None' not in str(error)


def test_bad_schedule_and_shapes_are_rejected_before_work(tmp_path, monkeypatch):
  monkeypatch.setattr(run_lib.training, 'init_train_state', lambda *a, **k: pytest.fail('compiled'))
  for training, match in [({'n_iters': 0}, r'config.training.n_iters=0 must be an integer >= 1'),
                          ({'n_jitted_steps': 0}, r'n_jitted_steps=0'),
                          ({'snapshot_freq': 0}, r'snapshot_freq=0')]:
    with pytest.raises(ValueError, match=match):
      run_lib.train(tiny_config(**training), str(tmp_path))
  config = tiny_config()
  config.eval.update(begin_ckpt=3, end_ckpt=2)
  with pytest.raises(ValueError, match=r'begin_ckpt=3 > config.eval.end_ckpt=2'):
    run_lib.evaluate(config, str(tmp_path))
  config.eval.update(begin_ckpt=0)
  with pytest.raises(ValueError, match=r'begin_ckpt=0 must be an integer >= 1 or None or -1'):
    run_lib.evaluate(config, str(tmp_path))
  from configs.digits import vp_ddpmpp_continuous
  digits = vp_ddpmpp_continuous.get_config()
  digits.data.image_size = 16  # a valid digits size, but the tiny U-Net attends at 4x4 only
  with pytest.raises(ValueError, match=r'image_size=16 does not fit the ncsnpp network .*'
                                       r'attn_resolutions=\(4,\)'):
    run_lib.train(digits, str(tmp_path))
  with pytest.raises(ValueError, match=r'Input of shape \(8, 8, 3\) per example, but the ncsnpp '
                                       r'network of this config takes \(8, 8, 1\)'):
    mutils.check_input_shape(vp_ddpmpp_continuous.get_config(), (8, 8, 3))
  from configs.vp import cifar10_ddpmpp_continuous
  cifar = cifar10_ddpmpp_continuous.get_config()
  cifar.data.num_channels = 1  # CIFAR-10 is RGB: the data could never fit this network
  with pytest.raises(ValueError, match='CIFAR10 images are RGB: config.data.num_channels must be'):
    run_lib.train(cifar, str(tmp_path))


def test_validation_does_no_io(monkeypatch):
  from configs.vp import cifar10_ddpmpp_continuous
  monkeypatch.setattr(datasets, '_source', lambda *a, **k: pytest.fail('I/O during validation'))
  run_lib.check_config(cifar10_ddpmpp_continuous.get_config())


def test_metrics_of_lost_steps_are_rolled_back(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps({'step': s}) + '\n'
                                                  for s in (5, 10, 15)))
  outputs.MetricLog(str(tmp_path), True, resume_step=10)
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.jsonl')] == [5, 10]
  assert [json.loads(l)['step'] for l in open(tmp_path / 'metrics.rolled_back.jsonl')] == [15]


@pytest.mark.parametrize('args, match', [
    (['--config', 'configs/digits/__init__.py'],
     r'configs/digits/__init__.py defines no get_config\(\)'),
    (['--config', 'configs/toy/vp_ring2d.py', '--config.training.foo=3'],
     r"--config.training.foo: config.training has no key 'foo'; its keys: \[.*'batch_size'"),
])
def test_bad_config_arguments_give_one_clear_line(tmp_path, args, match):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'main.py'), *args, '--workdir',
                         str(tmp_path), '--mode=train'], cwd=ROOT, capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=300)
  assert proc.returncode == 1 and 'Traceback' not in proc.stderr, proc.stderr[-2000:]
  assert re.search(match, proc.stderr), proc.stderr[-2000:]


def test_sample_mode_writes_outputs_and_resumes_by_batch(tmp_path):
  """main.py --mode sample: batches written as they finish, a rerun after a kill between batches
  redoes none of the finished ones and gives the same samples; another setting gets a new folder
  and the old one is kept aside."""
  from configs.digits import vp_ddpmpp_continuous
  config = vp_ddpmpp_continuous.get_config()
  config.model.update(nf=4, ch_mult=(1, 1), attn_resolutions=())
  config.training.update(n_iters=2, snapshot_freq=2, snapshot_sampling=False, log_freq=0,
                         eval_freq=0)
  config.eval.update(batch_size=4, num_samples=10)
  config.sampling.update(method='ddim', n_steps=3, noise_removal=False)
  run_lib.train(config, str(tmp_path))
  summary = run_lib.sample(config, str(tmp_path))
  out = tmp_path / 'samples_mode' / 'ckpt_1'
  assert summary['ckpt'] == 1 and summary['step'] == 2 and summary['nfe_per_sample'] == 3
  batches = sorted(p.name for p in out.glob('batch_*.npz'))
  assert batches == ['batch_0.npz', 'batch_1.npz', 'batch_2.npz']
  with np.load(out / 'samples.npz') as f:
    samples = f['samples']
  assert samples.shape == (10, 8, 8, 1) and (out / 'sample.png').exists()
  assert json.loads((out / 'sampling.json').read_text())['sampling']['method'] == 'ddim'
  # A kill after batch 1: batch 2 and the final files never got written.
  for name in ('batch_2.npz', 'samples.npz', 'sampling.json'):
    os.remove(out / name)
  kept = {name: (out / name).stat().st_mtime_ns for name in ('batch_0.npz', 'batch_1.npz')}
  run_lib.sample(config, str(tmp_path))
  assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept  # not redone
  with np.load(out / 'samples.npz') as f:
    np.testing.assert_array_equal(f['samples'], samples)
  config.sampling.n_steps = 4
  assert run_lib.sample(config, str(tmp_path))['nfe_per_sample'] == 4
  assert (tmp_path / 'samples_mode' / 'ckpt_1.replaced' / 'batch_2.npz').exists()
  config.eval.ckpt = 5
  with pytest.raises(FileNotFoundError, match=r'Snapshot 5 is not in .*checkpoints; it holds: \[1\]'):
    run_lib.sample(config, str(tmp_path))
