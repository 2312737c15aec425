"""The library's XLA:CPU defaults (xla_settings.py): added to XLA_FLAGS unless the user set them.

Each check runs in a fresh interpreter (XLA reads XLA_FLAGS once per process, when JAX starts its
backend), importing the library the way a user does and printing the flags JAX started with.
"""
import json
import os
import subprocess
import sys

import pytest

import xla_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAG = 'xla_cpu_copy_insertion_use_region_analysis'  # a boolean flag the library sets

PROBE = """
import json, os
import losses  # the library: importing it applies its XLA defaults
import jax, jaxlib, xla_settings
jax.devices()  # start the backend with whatever XLA_FLAGS holds now
print(json.dumps(dict(flags=os.environ.get('XLA_FLAGS', ''), applied=xla_settings.APPLIED,
                      measured=jaxlib.__version__.startswith(xla_settings.MEASURED_JAXLIB))))
"""


def probe(**env) -> dict:
  full = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=ROOT)
  full.pop('XLA_FLAGS', None)
  full.pop(xla_settings.OPT_OUT, None)
  full.update(env)
  out = subprocess.run([sys.executable, '-c', PROBE], env=full, cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_merge_keeps_every_flag_the_user_set():
  """Pure merge rule: a default is added only when the user's string does not name that flag."""
  defaults = {'xla_a': '1', 'xla_b': 'x'}
  assert xla_settings.merged_xla_flags('', defaults) == '--xla_a=1 --xla_b=x'
  assert xla_settings.merged_xla_flags('--xla_b=y', defaults) == '--xla_b=y --xla_a=1'
  assert xla_settings.merged_xla_flags(' --xla_a=0  --xla_b ', defaults) == '--xla_a=0  --xla_b'
  assert xla_settings.merged_xla_flags('--xla_ab=2', defaults) == '--xla_ab=2 --xla_a=1 --xla_b=x'


def test_defaults_added_when_the_user_sets_nothing():
  got = probe()
  if not got['measured']:
    pytest.skip('jaxlib version without measured defaults: nothing is added (by design)')
  assert got['applied']
  for name, value in xla_settings.DEFAULT_FLAGS.items():
    assert f'--{name}={value}' in got['flags'].split()


def test_user_flags_are_never_overridden():
  """The user's own value of a flag the library sets wins, and the user's other flags stay."""
  user = f'--{FLAG}=false --xla_force_host_platform_device_count=2'
  got = probe(XLA_FLAGS=user)
  words = got['flags'].split()
  assert f'--{FLAG}=false' in words and '--xla_force_host_platform_device_count=2' in words
  assert sum(w.startswith(f'--{FLAG}') for w in words) == 1


def test_opt_out_adds_nothing():
  got = probe(**{xla_settings.OPT_OUT: '0', 'XLA_FLAGS': '--xla_cpu_enable_fast_math=false'})
  assert not got['applied'] and got['flags'] == '--xla_cpu_enable_fast_math=false'
