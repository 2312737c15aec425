"""Every config under configs/ loads, names only registered components, and types its
real-valued fields as floats (so that a command-line override such as
--config.model.sigma_max=50.5 is accepted by ml_collections)."""
import importlib
import os

import pytest

import datasets
import training
import sampling
import sde_lib
from models import utils as mutils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)[:-3].replace(os.sep, '.')
    for d, _, files in os.walk(os.path.join(ROOT, 'configs'))
    for f in files if f.endswith('.py') and not f.startswith(('default_', '__', 'presets'))
    and os.path.basename(d) != 'sweeps')  # sweep files (get_sweep) are tested in test_sweep.py
# Fields that are real numbers in every config; an int here rejects float overrides.
REAL_FIELDS = {
    'model': ('sigma_min', 'sigma_max', 'beta_min', 'beta_max', 'dropout', 'ema_rate', 'fourier_scale',
              'init_scale'),
    'optim': ('lr', 'weight_decay', 'beta1', 'eps', 'grad_clip'),
    'sampling': ('snr', 'rtol', 'atol'),
    'eval': ('rtol', 'atol', 'ckpt_timeout_s'),
}


def test_all_experiment_configs_are_found():
  # 39 image experiments of the original (REFERENCE.md) plus the embedded toy and digits ones.
  image = [c for c in CONFIGS if c.split('.')[1] in ('ve', 'vp', 'subvp')]
  assert len(image) == 39, image
  assert any('.toy.' in c for c in CONFIGS) and any('.digits.' in c for c in CONFIGS)


@pytest.mark.parametrize('name', CONFIGS)
def test_config_is_valid(name):
  config = importlib.import_module(name).get_config()
  sde_lib.get_sde(config)
  mutils.get_model(config.model.name)
  training.get_optimizer(config)
  sampling.check_sampling_config(config)
  assert str(config.data.dataset).lower() in {d.lower() for d in datasets.DATASETS}
  for section, fields in REAL_FIELDS.items():
    for field in fields:
      if field in config[section]:
        value = config[section][field]
        assert isinstance(value, float), f'{name}: config.{section}.{field}={value!r} is not a float'
  # A float override of a real field goes through (it fails when the default is an int).
  config.model.sigma_max = 12.5


def test_bad_sampler_names_are_rejected_before_work():
  config = importlib.import_module('configs.toy.vp_ring2d').get_config()
  config.sampling.predictor = 'nope'
  with pytest.raises(ValueError, match="'nope'.*euler_maruyama"):
    sampling.check_sampling_config(config)
  config = importlib.import_module('configs.toy.vp_ring2d').get_config()
  config.sampling.method, config.sampling.ode_solver = 'ode', 'rk99'
  with pytest.raises(ValueError, match="'rk99'.*tsit5"):
    sampling.check_sampling_config(config)
  # A misspelled knob of a method that is not selected is caught too (before a long run).
  config = importlib.import_module('configs.toy.vp_ring2d').get_config()
  config.sampling.method, config.sampling.schedule = 'pc', 'karas'
  with pytest.raises(ValueError, match="time schedule 'karas'; valid choices.*karras"):
    sampling.check_sampling_config(config)


@pytest.mark.parametrize('method,field,value,match', [
    ('pc', 'snr', -0.1, r"method 'pc'.*snr .* must be positive, got -0.1"),
    ('pc', 'n_steps_each', 0, r'n_steps \(corrector steps per time step\) must be a positive integer'),
    ('ode', 'rtol', 0., 'rtol must be a positive finite tolerance'),
    ('unipc', 'n_steps', 0, r"method 'unipc'.*n_steps must be a positive integer, got 0"),
    ('dpmpp_2m', 'schedule', 'cosine', r"time schedule 'cosine'; valid choices"),
    ('ddim', 'eta', -1., r'eta .* must be >= 0, got -1.0'),
    ('bogus', 'method', 'bogus', r"sampling method 'bogus'; valid choices: \['pc', 'ode', 'ddim'"),
])
def test_bad_sampler_values_are_rejected_before_work(method, field, value, match):
  config = importlib.import_module('configs.toy.vp_ring2d').get_config()
  config.sampling.method = method
  config.sampling.corrector = 'langevin'  # snr and n_steps_each are the corrector's
  config.sampling[field] = value
  with pytest.raises(ValueError, match=match):
    sampling.check_sampling_config(config)
