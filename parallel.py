"""The one place that builds the device mesh and moves host data onto it.

Data parallelism is `jax.jit` with `NamedSharding` on a 1-D mesh with axis 'data' over every
device of every host: batches are sharded on their batch axis, the train state is replicated, and
XLA inserts the gradient all-reduce. The same code runs on 1 CPU, 8 GPUs or a TPU pod slice; no
pmap, no replicate/unreplicate.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA_AXIS = 'data'


def make_mesh(devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A 1-D mesh with axis 'data' over `devices` (default: all devices of all processes)."""
  # Auto axes: shardings are propagated by the compiler (make_mesh's default is Explicit
  # sharding-in-types, which would change the semantics of every jnp op on the batch).
  if devices is None:
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(AxisType.Auto,))
  devices = list(devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device, got an empty list.')
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def batch_sharding(mesh: Mesh, leading_axes: int = 0) -> NamedSharding:
  """Sharding of a batch whose batch axis comes after `leading_axes` unsharded axes."""
  if leading_axes < 0:
    raise ValueError(f'leading_axes must be >= 0, got {leading_axes}.')
  return NamedSharding(mesh, PartitionSpec(*([None] * leading_axes), DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding that keeps a full copy on every device (the train state, scalars)."""
  return NamedSharding(mesh, PartitionSpec())


def num_shards(mesh: Mesh) -> int:
  """Number of devices the batch axis is split over."""
  return int(mesh.shape[DATA_AXIS])


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch size') -> int:
  """Raises a ValueError unless the mesh's device count divides `batch_size` (call before compiling)."""
  return _check_divisible(batch_size, num_shards(mesh), what)


def _check_divisible(batch_size: int, n: int, what: str) -> int:
  if int(batch_size) != batch_size or batch_size < 1 or batch_size % n:
    raise ValueError(f'The {what} ({batch_size}) must be a positive multiple of the number of '
                     f'devices ({n}) so that each device gets an equal shard; use e.g. '
                     f'{max(n, (int(batch_size) // n) * n)}.')
  return int(batch_size)


def shard_batch(mesh: Mesh, local_batch: Any, leading_axes: int = 0) -> Any:
  """Host-local numpy arrays (this process's shard) -> global jax.Arrays sharded over 'data'.

  Works on a pytree of arrays. Each process passes its own slice of the global batch along the
  batch axis (axis `leading_axes`); the global batch is their concatenation in process order.
  """
  sharding = batch_sharding(mesh, leading_axes)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

  def put(x):
    x = np.asarray(x)
    if x.ndim <= leading_axes:
      raise ValueError(f'An array of shape {x.shape} has no batch axis after {leading_axes} leading axes.')
    _check_divisible(x.shape[leading_axes], local_devices, 'per-process batch size')
    return jax.make_array_from_process_local_data(sharding, x)

  return jax.tree_util.tree_map(put, local_batch)


def to_host(x: Any) -> Any:
  """The full value of (a pytree of) global arrays as numpy on every process.

  Arrays sharded over several processes are all-gathered (one collective); single-process and
  fully replicated arrays are plain copies.
  """
  def get(a):
    if isinstance(a, jax.Array) and not a.is_fully_addressable and not a.is_fully_replicated:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(a, tiled=True))
    return np.asarray(jax.device_get(a))

  return jax.tree_util.tree_map(get, x)


def any_process(flag: bool) -> bool:
  """True on every process when `flag` is true on any (e.g. a SIGTERM that reached one host)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.asarray([bool(flag)]))))
