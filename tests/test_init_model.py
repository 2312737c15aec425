"""Initialization without a forward pass: the same parameters as flax's jitted `model.init`."""
import jax
import jax.numpy as jnp
import numpy as np

import training
from configs.toy import vp_ring2d
from models import utils as mutils


def test_init_model_equals_jitted_flax_init():
  """init_model evaluates only what the variables depend on; the values are flax's, bit for bit."""
  config = vp_ring2d.get_config()
  rng = jax.random.PRNGKey(7)
  model, params, model_state = mutils.init_model(rng, config)

  shape = mutils.input_shape(config, 1)

  @jax.jit
  def flax_init(rng):  # the reference: flax's own init, the whole program jitted
    params_rng, dropout_rng = jax.random.split(rng)
    return model.init({'params': params_rng, 'dropout': dropout_rng}, jnp.zeros(shape),
                      jnp.zeros(shape[:1]), train=False)

  expected = flax_init(rng)
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(expected['params'])
  for got, want in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(expected['params'])):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert model_state == {k: v for k, v in expected.items() if k != 'params'}


def test_train_state_has_distinct_buffers_and_fresh_optimizer_state():
  """The EMA starts equal to the parameters in its own buffers (the step donates the state)."""
  config = vp_ring2d.get_config()
  _, state = training.init_train_state(jax.random.PRNGKey(0), config)
  _, params, _ = mutils.init_model(jax.random.split(jax.random.PRNGKey(0))[0], config)
  for p, e, q in zip(*(jax.tree_util.tree_leaves(t) for t in (state.params, state.ema_params, params))):
    np.testing.assert_array_equal(np.asarray(p), np.asarray(q))
    np.testing.assert_array_equal(np.asarray(e), np.asarray(q))
    assert p.unsafe_buffer_pointer() != e.unsafe_buffer_pointer()
  assert int(state.step) == 0
  assert all(float(jnp.abs(x).max()) == 0. for x in jax.tree_util.tree_leaves(state.opt_state))
