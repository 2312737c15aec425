"""checkpointing.py on a small state: checksums catch every kind of damage, damaged steps are moved
aside (never deleted) and can be saved again, a checkpoint of another shape is refused without
touching anything, existing steps are never overwritten, and one writer holds a folder."""
import hashlib
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import numpy as np
import pytest

import checkpointing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state(k: float, n: int = 4096):
  return {'w': jnp.arange(n, dtype=jnp.float32) * k, 'step': jnp.array(int(k), jnp.int32)}


def _tree(path):
  """{relative path: sha256} of every file under path: 'nothing changed' means equal trees."""
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, path)] = hashlib.sha256(open(p, 'rb').read()).hexdigest()
  return out


def _data_file(step_dir):
  """The largest array data file orbax wrote for a step (an OCDBT 'd/' blob: the arrays)."""
  return max((os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs
              if os.path.basename(r) == 'd'), key=os.path.getsize)


def flip_bit(step_dir):
  path = _data_file(step_dir)
  data = bytearray(open(path, 'rb').read())
  data[len(data) // 2] ^= 0x01
  open(path, 'wb').write(bytes(data))


def truncate(step_dir):
  path = _data_file(step_dir)
  os.truncate(path, os.path.getsize(path) // 2)


def garbage(step_dir):
  path = _data_file(step_dir)
  open(path, 'wb').write(np.random.default_rng(0).bytes(os.path.getsize(path)))


def delete_manifest(step_dir):
  os.remove(os.path.join(step_dir, 'default', 'manifest.ocdbt'))


def empty_metadata(step_dir):
  open(os.path.join(step_dir, 'default', '_METADATA'), 'w').close()


FAULTS = [flip_bit, truncate, garbage, delete_manifest, empty_metadata]


def _saved(tmp_path, steps=(1, 2)):
  directory = str(tmp_path / 'ckpt')
  manager = checkpointing.make_manager(directory)
  for s in steps:
    assert checkpointing.save(manager, s, _state(s), info={'step': s})
  return directory


@pytest.mark.parametrize('fault', FAULTS, ids=lambda f: f.__name__)
def test_damaged_latest_is_moved_aside_and_can_be_saved_again(tmp_path, fault):
  directory = _saved(tmp_path)
  fault(os.path.join(directory, '2'))
  damaged = _tree(os.path.join(directory, '2'))
  manager = checkpointing.make_manager(directory)
  with pytest.warns(UserWarning, match=r'Checkpoint step 2 .* damaged, incomplete or unreadable'):
    state, step = checkpointing.restore_latest(manager, _state(0))
  assert step == 1
  np.testing.assert_array_equal(state['w'], np.asarray(_state(1)['w']))
  # Kept for inspection, byte for byte; the step is free again.
  assert _tree(os.path.join(directory, '2.damaged')) == damaged
  assert checkpointing.all_steps(manager) == [1]
  assert checkpointing.save(manager, 2, _state(2), info={'step': 2})
  state, step = checkpointing.restore_latest(checkpointing.make_manager(directory), _state(0))
  assert step == 2
  np.testing.assert_array_equal(state['w'], np.asarray(_state(2)['w']))


def test_one_flipped_bit_is_caught_by_the_checksums(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  step_dir = os.path.join(directory, '1')
  flip_bit(step_dir)
  manager = checkpointing.make_manager(directory)
  with pytest.raises(checkpointing.CorruptCheckpointError, match='does not match its checksum'):
    checkpointing.restore(manager, 1, _state(0))
  # Without the checksums orbax restores wrong values silently (one value, or a few dozen when
  # the flipped byte lies in a compressed chunk).
  os.remove(os.path.join(step_dir, checkpointing.MANIFEST))
  restored = np.asarray(checkpointing.restore(manager, 1, _state(0))['w'])
  assert 1 <= np.sum(restored != np.asarray(_state(1)['w'])) < 4096


def test_checkpoint_of_another_shape_is_refused_and_nothing_changes(tmp_path):
  directory = _saved(tmp_path)
  before = _tree(directory)
  with pytest.raises(checkpointing.CheckpointMismatchError,
                     match=r'w: \(4096,\) float32 in the checkpoint, \(32,\) float32 in this '
                           r'config'):
    checkpointing.restore_latest(checkpointing.make_manager(directory), _state(0, n=32))
  with pytest.raises(checkpointing.CheckpointMismatchError, match='extra: only in this config'):
    checkpointing.restore_latest(checkpointing.make_manager(directory),
                                 dict(_state(0), extra=jnp.zeros(2)))
  assert _tree(directory) == before


def test_existing_step_is_kept_when_same_else_moved_aside(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  manager = checkpointing.make_manager(directory)
  first = _tree(os.path.join(directory, '1'))
  assert not checkpointing.save(manager, 1, _state(1), info={'step': 1})  # the same state again
  assert _tree(os.path.join(directory, '1')) == first
  assert checkpointing.save(manager, 1, _state(3), info={'step': 3})  # another state, same number
  assert _tree(os.path.join(directory, '1.replaced')) == first
  assert checkpointing.read_info(manager, 1) == {'step': 3}
  np.testing.assert_array_equal(checkpointing.restore(manager, 1, _state(0))['w'],
                                np.asarray(_state(3)['w']))


def test_checkpoint_without_checksums_restores_with_a_warning(tmp_path, caplog):
  directory = _saved(tmp_path, steps=(1,))
  os.remove(os.path.join(directory, '1', checkpointing.MANIFEST))  # as an older version wrote it
  state, step = checkpointing.restore_latest(checkpointing.make_manager(directory), _state(0))
  assert step == 1 and 'restored without verification' in caplog.text


def test_leftover_tmp_folder_is_cleaned(tmp_path):
  directory = _saved(tmp_path, steps=(1,))
  tmp = os.path.join(directory, '2.orbax-checkpoint-tmp-1700000000')  # a save killed midway
  os.makedirs(os.path.join(tmp, 'default'))
  manager = checkpointing.make_manager(directory, clean_tmp=True)
  checkpointing.save(manager, 2, _state(2))
  assert sorted(os.listdir(directory)) == ['1', '2']


def test_second_writer_is_refused_and_stale_lock_taken_over(tmp_path, caplog):
  with checkpointing.WorkdirLock(str(tmp_path), 'training'):
    with pytest.raises(checkpointing.WorkdirBusyError, match=rf'in use by another training run.*'
                       rf'"pid": {os.getpid()}'):
      checkpointing.WorkdirLock(str(tmp_path), 'training').__enter__()
    with checkpointing.WorkdirLock(str(tmp_path), 'evaluation'):  # another purpose: allowed
      pass
  # A holder in another process, killed without releasing: its lock is stale.
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time, checkpointing; '
       'checkpointing.WorkdirLock(sys.argv[1], "training").__enter__(); '
       'print("locked", flush=True); '
       'time.sleep(600)', str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
      env=dict(os.environ, JAX_PLATFORMS='cpu'))
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(checkpointing.WorkdirBusyError, match=rf'"pid": {holder.pid}'):
      checkpointing.WorkdirLock(str(tmp_path), 'training').__enter__()
  finally:
    holder.kill()
    holder.wait()
  with checkpointing.WorkdirLock(str(tmp_path), 'training'):
    assert 'Taking over the lock' in caplog.text and str(holder.pid) in caplog.text
