"""Data parallelism: 4 fake CPU devices and 1 device give the same losses and parameters.

The 4-device run happens in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=4
(the device count is fixed when JAX starts); it runs `run_steps` from this very module, so both
sides execute the same code. Also: batch sizes the device count does not divide, and unknown
names, fail with clear ValueErrors before anything compiles.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import training
import mixtures
import parallel
import sde_lib
from configs import default_toy_configs
from models import utils as mutils

N_DEVICES = 4
BATCH = 16  # divisible by 4
N_FUSED = 3  # steps fused per call (lax.scan)
N_CALLS = 2


def tiny_config(batch_size: int = BATCH):
  """A VP toy config with a tiny MLP; dropout on, so the dropout draws must match too."""
  config = default_toy_configs.build('vpsde')
  config.model.nf, config.model.num_layers, config.model.dropout = 16, 1, 0.1
  config.training.batch_size = config.eval.batch_size = batch_size
  config.optim.warmup = 2
  return config


def run_steps(mesh) -> dict:
  """N_CALLS train calls of N_FUSED steps and one eval on `mesh`; returns numpy results."""
  config = tiny_config()
  sde, _ = sde_lib.get_sde(config)
  model, state = training.init_train_state(jax.random.PRNGKey(config.seed), config, mesh)
  init = np.concatenate([np.ravel(p) for p in jax.tree_util.tree_leaves(state.params)] * 2)
  opt = training.get_optimizer(config)
  train_step = training.get_train_step(config, sde, model, opt, mesh=mesh)
  eval_step = training.get_eval_step(config, sde, model, mesh=mesh)
  x = np.asarray(mixtures.ring2d().sample(jax.random.PRNGKey(1), N_CALLS * N_FUSED * BATCH))
  x = x.reshape(N_CALLS, N_FUSED, BATCH, 2)
  train_losses = []
  for batch in x:
    state, loss = train_step(state, {'image': parallel.shard_batch(mesh, batch, leading_axes=1)})
    train_losses.append(np.asarray(loss))
  eval_loss = eval_step(state, {'image': parallel.shard_batch(mesh, x[0, 0])})
  leaves = jax.tree_util.tree_leaves((state.params, state.ema_params))
  return {'losses': np.concatenate(train_losses), 'eval': np.asarray(eval_loss),
          'params': np.concatenate([np.ravel(p) for p in leaves]), 'step': np.asarray(state.step),
          'init': init}


def check_errors(mesh) -> dict:
  """Messages of the errors raised for batch sizes the mesh does not divide (before compiling)."""
  out = {}
  config = tiny_config(batch_size=6)
  sde, _ = sde_lib.get_sde(config)
  model = mutils.create_model(config)  # never initialized: nothing may compile
  try:
    training.get_train_step(config, sde, model, training.get_optimizer(config), mesh=mesh)
  except ValueError as e:
    out['config'] = str(e)
  config = tiny_config()
  step = training.get_train_step(config, sde, model, training.get_optimizer(config), mesh=mesh)
  try:  # the shape check comes before the state is even looked at
    step(None, {'image': np.zeros((N_FUSED, 6, 2), np.float32)})
  except ValueError as e:
    out['batch'] = str(e)
  out['compiled'] = step.jitted._cache_size()  # pylint: disable=protected-access
  return out


def check_shard_batch(mesh) -> dict:
  """shard_batch places each device's rows of the batch axis on it, values unchanged."""
  x = np.arange(N_FUSED * BATCH * 2, dtype=np.float32).reshape(N_FUSED, BATCH, 2)
  arr = parallel.shard_batch(mesh, {'image': x}, leading_axes=1)['image']
  shard_shapes = sorted({tuple(s.data.shape) for s in arr.addressable_shards})
  return {'equal': bool(np.array_equal(np.asarray(arr), x)), 'shard_shapes': shard_shapes,
          'spec': str(arr.sharding.spec)}


def _subprocess_main(out_path: str) -> None:
  mesh = parallel.make_mesh()
  assert jax.device_count() == N_DEVICES, jax.devices()
  np.savez(out_path, **run_steps(mesh))
  print(json.dumps({'errors': check_errors(mesh), 'shard': check_shard_batch(mesh)}))


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(1-device results, 4-device results, 4-device report); the two runs go concurrently."""
  out = tmp_path_factory.mktemp('parallel') / 'four.npz'
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=root,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={N_DEVICES}')
  proc = subprocess.Popen([sys.executable, '-m', 'tests.test_parallel', str(out)], cwd=root,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    one = run_steps(parallel.make_mesh(jax.devices()[:1]))
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, stderr[-4000:]
  return one, dict(np.load(out)), json.loads(stdout.strip().splitlines()[-1])


def test_four_devices_match_one(runs):
  """Same train losses, eval loss, params and EMA params after 6 steps, to 1e-5."""
  one, four, _ = runs
  assert int(one['step']) == int(four['step']) == N_CALLS * N_FUSED
  np.testing.assert_allclose(four['losses'], one['losses'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(four['eval'], one['eval'], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(four['params'], one['params'], rtol=1e-5, atol=1e-5)
  # Not vacuous: training moved the parameters far more than the tolerance.
  assert np.max(np.abs(one['params'] - one['init'])) > 1e-3


def test_indivisible_batch_fails_before_compiling(runs):
  """A batch size the 4 devices do not divide raises a ValueError naming both numbers."""
  report = runs[2]
  errors = report['errors']
  for key in ('config', 'batch'):
    assert '(6)' in errors[key] and '(4)' in errors[key], errors
  assert errors['compiled'] == 0


def test_shard_batch_splits_the_batch_axis(runs):
  """Each of the 4 devices holds BATCH / 4 rows of every fused step; values are unchanged."""
  report = runs[2]
  shard = report['shard']
  assert shard['equal']
  assert shard['shard_shapes'] == [[N_FUSED, BATCH // N_DEVICES, 2]]
  assert 'data' in shard['spec']


def test_unknown_names_raise_clear_errors():
  """Unknown SDE, model and optimizer names raise ValueErrors that list the valid choices."""
  config = tiny_config()
  config.training.sde = 'brownian'
  with pytest.raises(ValueError, match=r"'brownian'.*vpsde"):
    sde_lib.get_sde(config)
  config = tiny_config()
  config.model.name = 'transformer'
  with pytest.raises(ValueError, match=r"'transformer'.*mlp"):
    training.init_train_state(jax.random.PRNGKey(0), config)
  config = tiny_config()
  config.optim.optimizer = 'Lion'
  with pytest.raises(ValueError, match=r"'Lion'.*Adam"):
    training.init_train_state(jax.random.PRNGKey(0), config)


def test_mesh_helpers():
  """make_mesh is 1-D over 'data'; check_batch_size accepts multiples of the device count."""
  mesh = parallel.make_mesh()
  assert mesh.axis_names == ('data',) and mesh.size == jax.device_count()
  assert parallel.check_batch_size(8 * mesh.size, mesh) == 8 * mesh.size
  with pytest.raises(ValueError, match='batch size'):
    parallel.check_batch_size(0, mesh)
  with pytest.raises(ValueError):
    parallel.make_mesh([])
  assert parallel.batch_sharding(mesh, 2).spec == jax.sharding.PartitionSpec(None, None, 'data')


if __name__ == '__main__':
  _subprocess_main(sys.argv[1])
