"""Checkpoints with orbax: atomic saves, keep the last k, restore onto the current mesh, and skip a
step that was left half-written (with a warning) in favour of the previous complete one."""
from __future__ import annotations

import os
import signal
import warnings
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp


def make_manager(directory: str, max_to_keep: Optional[int] = None) -> ocp.CheckpointManager:
  """An orbax CheckpointManager over `directory` (created), keeping the last `max_to_keep` steps."""
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
  return ocp.CheckpointManager(os.path.abspath(directory), options=options)


def save(manager: ocp.CheckpointManager, step: int, state: Any, *, wait: bool = True) -> None:
  """Saves `state` as checkpoint `step` (atomic: orbax writes a temporary folder, then renames)."""
  manager.save(int(step), args=ocp.args.StandardSave(state), force=True)
  if wait:
    manager.wait_until_finished()


def _abstract(state: Any) -> Any:
  """Shapes, dtypes and shardings of `state`: restoring onto them places arrays on the current mesh."""
  return jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)


def restore(manager: ocp.CheckpointManager, step: int, like: Any) -> Any:
  """Restores checkpoint `step` with the structure and shardings of `like`."""
  return manager.restore(int(step), args=ocp.args.StandardRestore(_abstract(like)))


def restore_latest(manager: ocp.CheckpointManager, like: Any) -> Tuple[Any, Optional[int]]:
  """(state, step) of the newest checkpoint that restores, or (like, None) when there is none.

  A step that fails to restore (left half-written by a crash or a kill, or corrupted) is skipped
  with a warning; the previous complete one is used."""
  manager.reload()
  for step in sorted(manager.all_steps(), reverse=True):
    try:
      return restore(manager, step, like), step
    except Exception as e:  # pylint: disable=broad-except  (any unreadable step is skipped)
      warnings.warn(f'Checkpoint step {step} in {manager.directory} is incomplete or unreadable '
                    f'({type(e).__name__}: {str(e)[:200]}); falling back to an earlier one.')
  return like, None


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
