"""Checkpoints with orbax that are never trusted blindly and never destroyed.

- `save` writes a step atomically (orbax: a temporary folder, then a rename), then a manifest of
  SHA-256 checksums of every file orbax wrote (`<step>/checksums.json`). A step that already
  exists is never overwritten: kept when it verifies and holds the same state, else moved aside.
- `restore` verifies the checksums and compares the stored arrays' paths, shapes and dtypes with
  the state of the current config before reading anything: a damaged step raises
  CorruptCheckpointError, a step of another model or config raises CheckpointMismatchError.
- `restore_latest` falls back from damaged steps to the newest good one (with a warning) and
  moves the damaged ones aside, kept for inspection, so that the step can be saved again.
- `WorkdirLock` admits one writer per folder; `TerminationFlag` turns SIGTERM into a flag.

Multi-host: process 0 alone hashes, writes manifests and moves folders; every decision it takes
is shared with all processes (parallel.any_process), so all of them restore the same step.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import socket
import sys
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from absl import logging

import parallel

MANIFEST = 'checksums.json'  # in each step folder, written after orbax finished the step


class CorruptCheckpointError(RuntimeError):
  """A checkpoint whose files do not match the checksums written when it was saved."""


class CheckpointMismatchError(ValueError):
  """A checkpoint whose arrays do not match the state of the current config."""


class WorkdirBusyError(RuntimeError):
  """Another live process holds the folder's lock."""


def make_manager(directory: str, max_to_keep: Optional[int] = None, *,
                 clean_tmp: bool = False) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `directory` (created), keeping the last `max_to_keep` steps.

  clean_tmp: removes the `*.orbax-checkpoint-tmp*` folders of saves cut short by a kill; only
  for the folder's single writer (see WorkdirLock), as they may belong to a save in progress.
  """
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                         cleanup_tmp_directories=clean_tmp)
  # The handler named up front: a fresh manager can then read the metadata of existing steps.
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_handlers=ocp.StandardCheckpointHandler())


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
  return os.path.join(os.fspath(manager.directory), str(int(step)))


def all_steps(manager: ocp.CheckpointManager) -> List[int]:
  """The steps in the manager's folder now (re-read from disk), ascending."""
  manager.reload()
  return sorted(int(s) for s in manager.all_steps())


def has_step(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether checkpoint `step` exists, as process 0 sees it, on every process (a training run
  may be writing it while the processes of an evaluation look)."""
  return _agree(int(step) in all_steps(manager))


# ------------------------------------------------------------------------------------------------
# Checksums


def file_sha256(path: str) -> str:
  """sha256 of a file's bytes (hex)."""
  with open(path, 'rb') as f:
    return hashlib.file_digest(f, 'sha256').hexdigest()


def _digests(step_dir: str) -> Dict[str, str]:
  """SHA-256 of every file under step_dir except the manifest, by relative path."""
  out = {}
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in sorted(files):
      path = os.path.join(root, name)
      rel = os.path.relpath(path, step_dir)
      if rel != MANIFEST:
        out[rel] = file_sha256(path)
  return out


def _write_manifest(step_dir: str, info: Dict[str, Any]) -> None:
  manifest = {'info': info, 'files': _digests(step_dir)}
  tmp = os.path.join(step_dir, f'.{MANIFEST}.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))  # atomic: a manifest is whole or absent


def _read_manifest(step_dir: str) -> Optional[Dict[str, Any]]:
  """The step's manifest, or None when it has none (saved by an older version, or killed before
  the manifest was written); a manifest that does not parse raises CorruptCheckpointError."""
  path = os.path.join(step_dir, MANIFEST)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      manifest = json.load(f)
    if not isinstance(manifest.get('files'), dict) or not manifest['files']:
      raise ValueError('no file list')
    return manifest
  except (OSError, ValueError) as e:
    raise CorruptCheckpointError(f'unreadable {MANIFEST} ({e})') from None


def _problem(step_dir: str) -> Tuple[Optional[str], bool]:
  """(what is wrong with the step's files or None, whether checksums were checked)."""
  try:
    manifest = _read_manifest(step_dir)
  except CorruptCheckpointError as e:
    return str(e), True
  if manifest is None:
    return None, False
  for rel, digest in sorted(manifest['files'].items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f'file {rel} is missing', True
    if file_sha256(path) != digest:
      return f'file {rel} does not match its checksum', True
  return None, True


def read_info(manager: ocp.CheckpointManager, step: int) -> Optional[Dict[str, Any]]:
  """The `info` saved with checkpoint `step` (e.g. {'step': training step}), None if unknown."""
  try:
    manifest = _read_manifest(_step_dir(manager, step))
  except CorruptCheckpointError:
    return None
  return None if manifest is None else manifest.get('info')


# ------------------------------------------------------------------------------------------------
# Multi-host agreement and moving aside


def _is_main() -> bool:
  return jax.process_index() == 0


def _agree(flag_on_process_0: bool) -> bool:
  """Process 0's flag, on every process."""
  return parallel.any_process(bool(flag_on_process_0) and _is_main())


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier `name` (a no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def move_aside(manager: ocp.CheckpointManager, step: int, reason: str) -> Optional[str]:
  """Renames step folder `step` to `<step>.<reason>[.k]` next to it (orbax ignores such names):
  kept for inspection, never deleted, and the step number is free to be saved again. Returns
  the new path (on process 0; None on the others). Collective: every process must call it."""
  new = None
  if _is_main():
    old = _step_dir(manager, step)
    new, k = f'{old}.{reason}', 1
    while os.path.exists(new):
      k += 1
      new = f'{old}.{reason}.{k}'
    os.rename(old, new)
    logging.warning('Moved checkpoint step %d aside (%s) to %s.', step, reason, new)
  barrier(f'move_aside_{step}_{reason}')
  manager.reload()
  return new


# ------------------------------------------------------------------------------------------------
# Save and restore


def save(manager: ocp.CheckpointManager, step: int, state: Any,
         info: Optional[Dict[str, Any]] = None) -> bool:
  """Saves `state` as checkpoint `step` and waits until it is written, checksums included.

  `info` (JSON) is stored in the manifest. A step that already exists is never overwritten: when
  it verifies and holds the same `info`, it is kept and nothing is written (returns False); else
  it is moved aside ('replaced') and `state` saved (returns True).
  """
  step, info = int(step), dict(info or {})
  step_dir = _step_dir(manager, step)
  keep = False
  if _is_main() and step in all_steps(manager):
    problem, checked = _problem(step_dir)
    keep = checked and problem is None and read_info(manager, step) == info
  if _agree(keep):
    logging.info('Checkpoint %d in %s already holds this state; not saved again.', step,
                 manager.directory)
    return False
  if has_step(manager, step):
    move_aside(manager, step, 'replaced')
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()
  if _is_main():
    _write_manifest(step_dir, info)
  barrier(f'manifest_{step}')
  return True


def _key_name(key) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _specs(tree: Any) -> Dict[str, Tuple[Tuple[int, ...], str]]:
  """{'a/b/c': (shape, dtype)} of a tree's array leaves (also of orbax's array metadata)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: hasattr(x, 'shape') and hasattr(x, 'dtype'))
  return {'/'.join(_key_name(k) for k in path): (tuple(leaf.shape), str(leaf.dtype))
          for path, leaf in flat if hasattr(leaf, 'shape')}


def _mismatch(manager: ocp.CheckpointManager, step: int, like: Any) -> Optional[str]:
  """How checkpoint `step`'s arrays differ from `like`'s, or None when they match."""
  stored = manager.item_metadata(step)
  stored = _specs(getattr(stored, 'tree', stored)) if stored is not None else {}
  if not stored:  # nothing readable: a damaged step, not another config
    raise CorruptCheckpointError(f'Checkpoint {_step_dir(manager, step)} has no readable array '
                                 'metadata.')
  wanted = _specs(like)
  diffs = [f'{p}: {stored[p][0]} {stored[p][1]} in the checkpoint, {wanted[p][0]} '
           f'{wanted[p][1]} in this config' for p in sorted(stored.keys() & wanted.keys())
           if stored[p] != wanted[p]]
  diffs += [f'{p}: only in this config' for p in sorted(wanted.keys() - stored.keys())]
  diffs += [f'{p}: only in the checkpoint' for p in sorted(stored.keys() - wanted.keys())]
  if not diffs:
    return None
  more = f' (and {len(diffs) - 5} more)' if len(diffs) > 5 else ''
  return '; '.join(diffs[:5]) + more


def _abstract(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`: restoring onto them places arrays on the current mesh."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)


def restore(manager: ocp.CheckpointManager, step: int, like: Any) -> Any:
  """Restores checkpoint `step` with the structure and shardings of `like`, after checks.

  Raises CorruptCheckpointError when its files do not match the checksums written at save time
  (a checkpoint without checksums, from an older version, is restored with a warning), and
  CheckpointMismatchError (a ValueError) when its arrays' paths, shapes or dtypes differ from
  `like`'s: a workdir of another model or config.
  """
  step_dir = _step_dir(manager, step)
  problem, checked = _problem(step_dir) if _is_main() else (None, True)
  if _agree(problem is not None):
    raise CorruptCheckpointError(f'Checkpoint {step_dir}: {problem or "damaged (see process 0)"}.')
  if not checked:
    logging.warning('Checkpoint %s has no %s (saved by an older version, or killed right after '
                    'saving): restored without verification.', step_dir, MANIFEST)
  mismatch = _mismatch(manager, step, like)
  if mismatch:
    raise CheckpointMismatchError(
        f'Checkpoint {step_dir} does not match this config: {mismatch}. The workdir holds a '
        f'run of another model or config: use another --workdir, or the config of that run. '
        f'Nothing in the workdir was changed.')
  return manager.restore(int(step), args=ocp.args.StandardRestore(_abstract(like)))


def restore_latest(manager: ocp.CheckpointManager, like: Any) -> Tuple[Any, Optional[int]]:
  """(state, step) of the newest checkpoint that verifies and restores, or (like, None).

  Damaged steps (checksum mismatch, half-written, unreadable) are skipped with a warning and,
  once a good one is found (or none is left), moved aside ('damaged') so that training can save
  those steps again. A CheckpointMismatchError (another model or config) propagates before
  anything is moved: such a workdir is left exactly as it is.
  """
  damaged, result = [], (like, None)
  for step in reversed(all_steps(manager)):
    error = None
    try:
      state = restore(manager, step, like)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (any unreadable step is skipped)
      error = f'{type(e).__name__}: {str(e)[:300]}'
    if parallel.any_process(error is not None):
      warnings.warn(f'Checkpoint step {step} in {manager.directory} is damaged, incomplete or '
                    f'unreadable ({error or "on another process"}); falling back to an earlier '
                    f'one.')
      damaged.append(step)
      continue
    result = (state, step)
    break
  for step in damaged:
    move_aside(manager, step, 'damaged')
  return result


# ------------------------------------------------------------------------------------------------
# One writer per folder; SIGTERM


class WorkdirLock:
  """An exclusive lock on `directory` for one `purpose` ('training', 'evaluation'), taken on
  enter and released on exit; a second process gets a WorkdirBusyError naming the holder.

  An fcntl.flock on `<directory>/<purpose>.lock`: the kernel releases it when its process dies,
  so a lock left by a killed process is stale and taken over (with a warning). Process 0 locks
  for every process of a multi-host run; all of them raise when it cannot.
  """

  def __init__(self, directory: str, purpose: str):
    self.directory, self.purpose = os.path.abspath(directory), purpose
    self.path = os.path.join(self.directory, f'{purpose}.lock')
    self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    error = None
    if _is_main():
      try:
        self._acquire()
      except WorkdirBusyError as e:
        error = e
    if parallel.any_process(error is not None):
      raise error or WorkdirBusyError(f'{self.directory} is in use by another {self.purpose} run '
                                      '(see process 0).')
    return self

  def _acquire(self) -> None:
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      holder = os.pread(fd, 4096, 0).decode(errors='replace').strip() or 'unknown process'
      os.close(fd)
      raise WorkdirBusyError(
          f'{self.directory} is in use by another {self.purpose} run ({holder}); two writers '
          f'would corrupt each other\'s checkpoints and logs. Wait for it to finish, stop it, or '
          f'use another directory. (The lock {self.path} is released when that process '
          f'exits.)') from None
    stale = os.pread(fd, 4096, 0).decode(errors='replace').strip()
    if stale:
      logging.warning('Taking over the lock %s left by a process that no longer runs (%s).',
                      self.path, stale)
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'since': time.strftime('%Y-%m-%d %H:%M:%S'), 'command': ' '.join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(holder).encode(), 0)
    self._fd = fd

  def __exit__(self, *exc) -> None:
    if self._fd is not None:
      os.ftruncate(self._fd, 0)  # released cleanly: nothing stale for the next run to report
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


class TerminationFlag:
  """Turns SIGTERM (preemption) into a flag the training loop polls between steps, so that it can
  save a checkpoint and exit cleanly instead of dying mid-step."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self) -> 'TerminationFlag':
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler, the flag stays False
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def import_original(path: str, config) -> dict:
  """A released checkpoint of the original score_sde (JAX) or score_sde_pytorch as this project's
  trees: {'params', 'ema_params', 'step'}. See original_checkpoints.import_original (formats,
  layouts, errors) and docs/released_checkpoints.md (which file goes with which config)."""
  import original_checkpoints  # here, not at the top: it builds networks; checkpointing stays light
  return original_checkpoints.import_original(path, config)
